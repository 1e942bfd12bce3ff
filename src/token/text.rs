//! Text form of a token: Crockford base32 upper case in hyphen groups, one check symbol per
//! group, so a misread group can be named to the person typing it.
//!
//! Each group is 4 data symbols followed by 1 check symbol computed with the Damm algorithm
//! over the group's data, on the quasigroup x * y = 2 (x XOR y) in GF(32). That detects
//! every single-symbol substitution and every adjacent transposition inside a group, the
//! check symbol included (verified over all 32^4 groups; ISO 7064 MOD 33,32, used before,
//! missed 0.2 % of adjacent transpositions); a transposition across a group boundary
//! changes one symbol in each of two groups, so it is caught too.

use thiserror::Error;

/// Version prefix, so a later (e.g. ISO/TS 22691 conformant) encoding can coexist.
pub const PREFIX: &str = "HT2-";
/// Prefix of version 1 tokens, which are no longer read (none was given to a patient).
const PREFIX_V1: &str = "HT1";
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const DATA_PER_GROUP: usize = 4;
const GROUP: usize = DATA_PER_GROUP + 1;
/// Bound on accepted text (bytes) so hostile input cannot make parsing costly; a token is
/// about 100 characters, one carrying a URL at most about 260.
pub const MAX_TEXT: usize = 4096;

/// Why token text was rejected; messages say what the reader should do.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TextError {
    /// The text does not start with a known version prefix.
    #[error("this is not an HI-TOKEN (it must start with {PREFIX})")]
    Prefix,
    /// A version 1 token (`HT1-`), from before the short format.
    #[error(
        "this is a version 1 token, which this cloudpdi no longer reads; ask the sender for \
         a new one"
    )]
    Version1,
    /// A character outside Crockford base32.
    #[error("character {position} is not a valid token character")]
    BadChar {
        /// 1-based position among the token's symbols.
        position: usize,
    },
    /// Symbols missing or extra.
    #[error("the token has a wrong number of characters; check for a missing or extra group")]
    Length,
    /// A group's check symbol does not match.
    #[error("check code does not match: group {group} looks mistyped")]
    Check {
        /// 1-based group number after the prefix.
        group: usize,
    },
    /// Input longer than any token.
    #[error(
        "the token text is longer than {MAX_TEXT} bytes, so it is not a token (a token is \
         about 100 characters); give the token text alone"
    )]
    TooLong,
}

fn value(c: char) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        'O' => '0',
        'I' | 'L' => '1',
        other => other,
    };
    ALPHABET
        .iter()
        .position(|&a| a as char == c)
        .map(|p| p as u8)
}

/// Damm check symbol for `data` (values 0..32): the running value of the quasigroup
/// x * y = 2 (x XOR y) in GF(32) (modulus x^5 + x^2 + 1). The quasigroup is totally
/// anti-symmetric with a zero diagonal, so a group checks (runs to 0 with its check
/// symbol) after no single substitution and no adjacent transposition.
fn check_symbol(data: &[u8]) -> u8 {
    data.iter().fold(0, |interim, &a| {
        let sum = (interim ^ a) << 1;
        if sum & 0x20 == 0 {
            sum
        } else {
            sum ^ 0b10_0101
        }
    })
}

/// Encodes symbol values (each < 32) as grouped text; the value count must be a multiple of 4.
pub fn encode_symbols(values: &[u8]) -> String {
    assert!(
        values.len().is_multiple_of(DATA_PER_GROUP),
        "caller pads to whole groups"
    );
    let groups: Vec<String> = values
        .chunks(DATA_PER_GROUP)
        .map(|g| {
            g.iter()
                .chain(std::iter::once(&check_symbol(g)))
                .map(|&v| ALPHABET[usize::from(v)] as char)
                .collect()
        })
        .collect();
    format!("{PREFIX}{}", groups.join("-"))
}

/// `c` as ASCII when it is a full-width form of it (U+FF01-FF5E, the ideographic space)
/// or a dash a Japanese input method types for '-' (U+30FC, U+2212, U+2010-2015): a
/// scanner or a clerk typing with the input method on gives such text.
fn half_width(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(u32::from(c) - 0xFEE0).unwrap_or(c),
        '\u{30FC}' | '\u{2212}' | '\u{2010}'..='\u{2015}' => '-',
        '\u{3000}' => ' ',
        other => other,
    }
}

/// Parses grouped text back to symbol values, ignoring case, spaces and hyphens (also
/// their full-width forms: see [`half_width`]).
pub fn decode_symbols(text: &str) -> Result<Vec<u8>, TextError> {
    if text.len() > MAX_TEXT {
        return Err(TextError::TooLong);
    }
    let text: String = text.chars().map(half_width).collect();
    let trimmed = text.trim_start();
    let code = PREFIX.trim_end_matches('-');
    let head = trimmed.get(..code.len()).ok_or(TextError::Prefix)?;
    if head.eq_ignore_ascii_case(PREFIX_V1) {
        return Err(TextError::Version1);
    }
    if !head.eq_ignore_ascii_case(code) {
        return Err(TextError::Prefix);
    }
    let symbols = trimmed[code.len()..]
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .enumerate()
        .map(|(i, c)| value(c).ok_or(TextError::BadChar { position: i + 1 }))
        .collect::<Result<Vec<u8>, _>>()?;
    if symbols.is_empty() || symbols.len() % GROUP != 0 {
        return Err(TextError::Length);
    }
    let mut out = Vec::with_capacity(symbols.len() / GROUP * DATA_PER_GROUP);
    for (i, g) in symbols.chunks(GROUP).enumerate() {
        if check_symbol(&g[..DATA_PER_GROUP]) != g[DATA_PER_GROUP] {
            return Err(TextError::Check { group: i + 1 });
        }
        out.extend_from_slice(&g[..DATA_PER_GROUP]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..32u8).map(|i| (i * 7 + 3) % 32).collect()
    }

    #[test]
    fn round_trip_and_lenient_parsing() {
        let text = encode_symbols(&sample());
        assert_eq!(decode_symbols(&text), Ok(sample()));
        let sloppy = text.to_lowercase().replace('-', " ");
        assert_eq!(decode_symbols(&sloppy), Ok(sample()));
    }

    #[test]
    fn every_adjacent_transposition_of_every_group_is_detected() {
        let checks = |g: &[u8; 5]| check_symbol(&g[..DATA_PER_GROUP]) == g[DATA_PER_GROUP];
        for n in 0..32u32.pow(4) {
            let data = [0, 1, 2, 3].map(|k| ((n >> (5 * k)) & 31) as u8);
            let mut group = [data[0], data[1], data[2], data[3], check_symbol(&data)];
            assert!(checks(&group));
            for i in 0..DATA_PER_GROUP {
                if group[i] != group[i + 1] {
                    group.swap(i, i + 1);
                    assert!(!checks(&group), "{data:?}: swap at {i} undetected");
                    group.swap(i, i + 1);
                }
            }
        }
    }

    #[test]
    fn every_substitution_and_adjacent_swap_is_rejected() {
        let text = encode_symbols(&sample());
        let body: Vec<u8> = text[PREFIX.len()..]
            .bytes()
            .filter(|&b| b != b'-')
            .collect();
        let rebuild = |b: &[u8]| format!("{PREFIX}{}", String::from_utf8_lossy(b));
        for i in 0..body.len() {
            for &c in ALPHABET {
                if c != body[i] {
                    let mut m = body.clone();
                    m[i] = c;
                    assert!(decode_symbols(&rebuild(&m)).is_err(), "substitution at {i}");
                }
            }
            if i + 1 < body.len() && body[i] != body[i + 1] {
                let mut m = body.clone();
                m.swap(i, i + 1);
                assert!(decode_symbols(&rebuild(&m)).is_err(), "swap at {i}");
            }
        }
    }

    #[test]
    fn bad_check_names_the_group() {
        let text = encode_symbols(&sample());
        let mut body: Vec<u8> = text[PREFIX.len()..]
            .bytes()
            .filter(|&b| b != b'-')
            .collect();
        body[3 * GROUP + 1] = if body[3 * GROUP + 1] == b'Z' {
            b'Y'
        } else {
            b'Z'
        };
        let bad = format!("{PREFIX}{}", String::from_utf8_lossy(&body));
        assert_eq!(decode_symbols(&bad), Err(TextError::Check { group: 4 }));
    }

    #[test]
    fn full_width_text_from_an_input_method_reads() {
        let text = encode_symbols(&sample());
        let wide: String = text
            .chars()
            .map(|c| match c {
                '-' => '\u{30FC}',
                c => char::from_u32(u32::from(c) + 0xFEE0).expect("full width"),
            })
            .collect();
        assert_eq!(decode_symbols(&wide), Ok(sample()));
        let spaced = format!("\u{3000}{}", text.replace('-', "\u{2212}"));
        assert_eq!(decode_symbols(&spaced), Ok(sample()));
        let minus = text.replace('-', "\u{FF0D}");
        assert_eq!(decode_symbols(&minus), Ok(sample()));
    }

    #[test]
    fn a_version_1_text_is_named_as_such() {
        assert_eq!(decode_symbols("ht1-05NGF-W3G0N"), Err(TextError::Version1));
        assert_eq!(decode_symbols("HT9-05NGF"), Err(TextError::Prefix));
    }
}
