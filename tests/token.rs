//! `cloudpdi token new|inspect` and `cloudpdi encrypt|decrypt` as an operator uses them.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::text;

fn cloudpdi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .output()
        .unwrap()
}

const DOCUMENT: &str = "0123456789abcdef0123";

/// A token for `document` at `repository` (`--community CODE` or `--repository URL`),
/// written to `dir/name`; returns `@path`.
fn token_at(dir: &std::path::Path, name: &str, repository: [&str; 2]) -> String {
    let path = dir.join(name);
    let out = cloudpdi(&[
        "token",
        "new",
        repository[0],
        repository[1],
        "--document-id",
        DOCUMENT,
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    format!("@{}", path.display())
}

/// A token of community KYOTO1.
fn new_token(dir: &std::path::Path, name: &str) -> String {
    token_at(dir, name, ["--community", "KYOTO1"])
}

#[test]
fn a_new_token_is_private_inspectable_and_keeps_its_secret_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let file = dir.path().join("t.txt");
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    let token_text = std::fs::read_to_string(&file).unwrap();
    assert!(token_text.starts_with("HT2-"));

    let shown = cloudpdi(&["token", "inspect", &token]);
    let shown_text = text(&shown);
    assert!(shown.status.success(), "{shown_text}");
    assert!(shown_text.contains(DOCUMENT) && shown_text.contains("valid until"));
    assert!(
        shown_text.contains("community KYOTO1 (not in [repositories]"),
        "{shown_text}"
    );
    // The default expiry is a route's (expires_in_days = 14), not a flag's own.
    assert!(
        shown_text.contains("13 days") || shown_text.contains("14 days"),
        "{shown_text}"
    );
    assert!(!shown_text.contains("secret:"), "{shown_text}");
    let secret = cloudpdi(&["token", "inspect", &token, "--show-secret"]);
    assert!(text(&secret).contains("secret:"));

    // A typo in the fourth group is named, and the token text never echoed.
    let mut chars: Vec<char> = token_text.trim().chars().collect();
    let at = "HT2-".len() + 3 * 6 + 1;
    chars[at] = if chars[at] == 'Z' { 'Y' } else { 'Z' };
    let typo: String = chars.into_iter().collect();
    let bad = cloudpdi(&["token", "inspect", &typo]);
    let bad_text = text(&bad);
    assert!(!bad.status.success());
    assert!(bad_text.contains("group 4 looks mistyped"), "{bad_text}");
    assert!(
        !bad_text.contains(&typo[4..20]),
        "error echoes the token: {bad_text}"
    );
}

/// `token inspect` names a community's repository from the configuration's
/// `[repositories]`.
#[test]
fn inspect_resolves_a_community_through_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let config = dir.path().join("cloudpdi.toml");
    std::fs::write(
        &config,
        "[repositories]\nKYOTO1 = \"https://pdi.kyoto.example.jp\"\n",
    )
    .unwrap();
    let shown = cloudpdi(&[
        "token",
        "inspect",
        "--config",
        config.to_str().unwrap(),
        &token,
    ]);
    let shown_text = text(&shown);
    assert!(shown.status.success(), "{shown_text}");
    assert!(
        shown_text.contains("community KYOTO1 = https://pdi.kyoto.example.jp"),
        "{shown_text}"
    );
}

/// The summary, the one field whose text a sender chose freely, is gone; the URL is the
/// only text left, and it is printable ASCII: a token carrying a terminal escape in it is
/// refused, by the parser and by `token new`.
#[test]
fn a_url_with_terminal_escapes_cannot_fake_a_line_of_inspect() {
    use cloudpdi::token::{Token, TokenError};
    let url = b"https://evil.example\x1b[2K\rrepository:  https://good.example";
    let mut bytes = vec![2u8, 0x80 | u8::try_from(url.len()).unwrap()];
    bytes.extend_from_slice(url);
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(&[0x01; 10]);
    bytes.extend_from_slice(&[0x02; 16]);
    assert!(matches!(
        Token::from_bytes(&bytes),
        Err(TokenError::Field(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let out = cloudpdi(&[
        "token",
        "new",
        "--repository",
        std::str::from_utf8(url).unwrap(),
        "--document-id",
        DOCUMENT,
        "--out",
        dir.path().join("t.txt").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("printable ASCII"), "{}", text(&out));
    assert!(!dir.path().join("t.txt").exists());
}

/// Issue 13: a token from a known community (the longest code, the latest expiry) is at
/// most 16 groups of 5 and its QR code version 5 or lower at level Q, which zbarimg reads
/// back to the same token; a token carrying a URL still works, longer. (Version 1 tokens
/// were 44 groups, QR version 8-9.)
#[test]
fn a_community_token_is_at_most_16_groups_and_a_version_5_qr_code() {
    use cloudpdi::token::slip::{SlipDetails, SlipFormat, render_bytes};
    use cloudpdi::token::{RepositoryRef, Token, qr};
    let worst = Token::with_secret(
        RepositoryRef::Community("ZZZZZZ".into()),
        "ffffffffffffffffffff",
        u32::MAX,
        [0xff; 16],
    )
    .unwrap();
    let printed = worst.to_text();
    let groups = printed.trim_start_matches("HT2-").split('-').count();
    assert!(groups <= 16, "{groups} groups");
    assert!(
        printed.len() <= 4 + 16 * 5 + 15, // prefix, groups, hyphens
        "{} characters",
        printed.len()
    );
    let matrix = qr::encode(&worst.to_qr_text()).unwrap();
    assert!(matrix.version() <= 5, "QR version {}", matrix.version());

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("qr.png");
    let details = SlipDetails {
        facility_name: "Hospital A".into(),
        ..SlipDetails::default()
    };
    std::fs::write(
        &png,
        render_bytes(&worst, &details, SlipFormat::Png).unwrap(),
    )
    .unwrap();
    let decoded = slip::decode_qr(&png);
    assert_eq!(decoded, *worst.to_qr_text());
    assert_eq!(Token::from_text(&decoded).unwrap(), worst);

    // A repository not in [repositories] travels whole: longer, still a token.
    let url = Token::with_secret(
        RepositoryRef::Url("https://pdi.partner.example.jp/v1".into()),
        "ffffffffffffffffffff",
        u32::MAX,
        [0xff; 16],
    )
    .unwrap();
    let url_groups = url.to_text().split('-').count() - 1;
    assert!(url_groups > groups, "{url_groups} groups");
    assert_eq!(Token::from_text(&url.to_text()).unwrap(), url);
    let shown = cloudpdi(&["token", "inspect", &url.to_text()]);
    assert!(
        text(&shown).contains("repository:  https://pdi.partner.example.jp/v1"),
        "{}",
        text(&shown)
    );
}

/// A version 1 token (`HT1-`, 44 groups) is refused with a message saying so and what to
/// do, without echoing it.
#[test]
fn a_version_1_token_is_refused_naming_its_version() {
    let v1 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/vectors/token/fail_version.txt"),
    )
    .unwrap();
    assert!(v1.starts_with("HT1-"));
    let out = cloudpdi(&["token", "inspect", v1.trim()]);
    let out_text = text(&out);
    assert!(!out.status.success());
    assert!(
        out_text.contains("this is a version 1 token")
            && out_text.contains("ask the sender for a new one"),
        "{out_text}"
    );
    assert!(!out_text.contains(&v1[4..20]), "{out_text}");
}

#[test]
fn encrypt_and_decrypt_with_the_token_and_refuse_the_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let other = new_token(dir.path(), "other.txt");
    let plain = dir.path().join("study.zip");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&plain, &data).unwrap();
    let sealed = dir.path().join("study.cpdi");
    for zstd in [false, true] {
        let _ = std::fs::remove_file(&sealed);
        let mut args = vec!["encrypt", "--token", &token];
        if zstd {
            args.push("--zstd");
        }
        let (p, s) = (plain.to_str().unwrap(), sealed.to_str().unwrap());
        args.extend([p, s]);
        let out = cloudpdi(&args);
        assert!(out.status.success(), "{}", text(&out));
        let opened = dir.path().join(format!("opened-{zstd}.zip"));
        let out = cloudpdi(&["decrypt", "--token", &token, s, opened.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(std::fs::read(&opened).unwrap(), data);
    }
    let refused = dir.path().join("refused.zip");
    let out = cloudpdi(&[
        "decrypt",
        "--token",
        &other,
        sealed.to_str().unwrap(),
        refused.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("damaged or the token is wrong (chunk 0"),
        "{}",
        text(&out)
    );
    assert!(!refused.exists());
}

mod vectors {
    use cloudpdi::token::text::{MAX_TEXT, TextError};
    use cloudpdi::token::{RepositoryRef, Token, TokenError};
    use proptest::prelude::*;

    fn vector_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/token")
    }

    fn sample() -> Token {
        Token::with_secret(
            RepositoryRef::Community("KYOTO1".into()),
            "0123456789abcdef0123",
            1_796_083_200,
            *b"0123456789abcdef",
        )
        .unwrap()
    }

    /// The text's symbols without prefix and hyphens, and the text rebuilt from them.
    fn body(text: &str) -> Vec<u8> {
        text["HT2-".len()..]
            .bytes()
            .filter(|&b| b != b'-')
            .collect()
    }

    fn rebuild(body: &[u8]) -> String {
        let groups: Vec<&str> = body
            .chunks(5)
            .map(|g| std::str::from_utf8(g).unwrap())
            .collect();
        format!("HT2-{}", groups.join("-"))
    }

    /// The failing vectors derived from the sample text: one symbol substituted in group
    /// 3, two adjacent symbols swapped in group 5, the last group missing, and an envelope
    /// of version 3 behind the HT2 prefix (with valid check symbols).
    fn failing(sample: &str) -> Vec<(&'static str, String)> {
        let mut substituted = body(sample);
        substituted[11] = if substituted[11] == b'7' { b'8' } else { b'7' };
        let mut swapped = body(sample);
        let at = (20..24).find(|&i| swapped[i] != swapped[i + 1]).unwrap();
        swapped.swap(at, at + 1);
        let truncated = body(sample)[..body(sample).len() - 5].to_vec();
        let mut envelope = sample_bytes();
        envelope[0] = 3;
        vec![
            ("fail_substitution.txt", rebuild(&substituted)),
            ("fail_swap.txt", rebuild(&swapped)),
            ("fail_truncated.txt", rebuild(&truncated)),
            ("fail_envelope_version.txt", encode(&envelope)),
        ]
    }

    fn sample_bytes() -> Vec<u8> {
        sample().to_bytes().to_vec()
    }

    /// Bytes to grouped text, as the envelope is written (5-bit symbols, zero padded).
    fn encode(bytes: &[u8]) -> String {
        let mut bits: Vec<u8> = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        while !bits.len().is_multiple_of(20) {
            bits.push(0);
        }
        let symbols: Vec<u8> = bits
            .chunks(5)
            .map(|c| c.iter().fold(0, |acc, b| (acc << 1) | b))
            .collect();
        cloudpdi::token::text::encode_symbols(&symbols)
    }

    /// tests/vectors/token/sample.txt: fixed fields and secret -> exact text, download
    /// proof hash and the container key's first sealed bytes; fail_*.txt must not parse
    /// (fail_version.txt is a version 1 token, refused as such).
    #[test]
    fn committed_token_vector_matches_exactly() {
        let token = sample();
        let mut sealed = cloudpdi::container::Encryptor::with_salt(
            &token.container_key(),
            &cloudpdi::container::Options::default(),
            [9; 32],
            Vec::new(),
        )
        .unwrap();
        std::io::Write::write_all(&mut sealed, b"cloudpdi").unwrap();
        let sealed = sealed.finish().unwrap();
        let actual = format!(
            "text {}\nqr {}\nproof_sha256 {}\nsealed_cloudpdi {}\n",
            token.to_text().as_str(),
            token.to_qr_text().as_str(),
            hex::encode(token.download_proof().hash()),
            hex::encode(&sealed[48..])
        );
        let path = vector_dir().join("sample.txt");
        let text = actual.lines().next().unwrap().trim_start_matches("text ");
        if std::env::var_os("WRITE_TEST_VECTORS").is_some() {
            std::fs::write(&path, &actual).unwrap();
            for (name, content) in failing(text) {
                std::fs::write(vector_dir().join(name), format!("{content}\n")).unwrap();
            }
        }
        assert_eq!(actual, std::fs::read_to_string(&path).unwrap_or_default());
        assert_eq!(Token::from_text(text).unwrap(), token);
        for (name, content) in failing(text) {
            let committed = std::fs::read_to_string(vector_dir().join(name)).unwrap();
            assert_eq!(committed.trim(), content, "{name}");
        }
        let mut failures = 0;
        for entry in std::fs::read_dir(vector_dir()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("fail_") {
                let text = std::fs::read_to_string(&path).unwrap();
                let err = Token::from_text(text.trim()).expect_err(&name);
                let expected = match name.as_str() {
                    "fail_version.txt" => matches!(err, TokenError::Text(TextError::Version1)),
                    "fail_envelope_version.txt" => err == TokenError::Version(3),
                    "fail_substitution.txt" => {
                        err == TokenError::Text(TextError::Check { group: 3 })
                    }
                    "fail_swap.txt" => err == TokenError::Text(TextError::Check { group: 5 }),
                    _ => true,
                };
                assert!(expected, "{name}: {err}");
                failures += 1;
            }
        }
        assert_eq!(failures, 5);
    }

    #[test]
    fn input_beyond_the_bound_is_refused_unread() {
        let long = format!("HT2-{}", "0".repeat(MAX_TEXT));
        let err = Token::from_text(&long).unwrap_err();
        assert_eq!(err, TokenError::Text(TextError::TooLong));
        assert!(err.to_string().contains("4096 bytes"), "{err}");
    }

    fn any_repository() -> impl Strategy<Value = RepositoryRef> {
        prop_oneof![
            "[A-Z0-9]{1,6}".prop_map(RepositoryRef::Community),
            "[ -~]{1,120}".prop_map(RepositoryRef::Url),
        ]
    }

    fn any_token() -> impl Strategy<Value = Token> {
        (
            any_repository(),
            "[0-9a-f]{20}",
            any::<u32>(),
            any::<[u8; 16]>(),
        )
            .prop_map(|(repository, id, expires_at, secret)| {
                Token::with_secret(repository, &id, expires_at, secret).unwrap()
            })
    }

    proptest! {
        #[test]
        fn any_valid_token_round_trips_through_text(token in any_token()) {
            let text = token.to_text();
            prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase() || b == b'-'));
            prop_assert_eq!(Token::from_text(&text).unwrap(), token.clone());
            prop_assert_eq!(Token::from_text(&token.to_qr_text()).unwrap(), token.clone());
            prop_assert_eq!(Token::from_text(&text.to_lowercase().replace('-', " ")).unwrap(), token.clone());
            // O for 0, I and L for 1, as people read them.
            let misread = text[4..].replace('0', "O").replacen('1', "I", 1).replace('1', "l");
            prop_assert_eq!(Token::from_text(&format!("HT2-{misread}")).unwrap(), token);
        }

        #[test]
        fn a_substitution_or_swap_names_its_group(
            token in any_token(),
            at in any::<prop::sample::Index>(),
            with in 0usize..32,
        ) {
            let text = token.to_text();
            let symbols = body(&text);
            let i = at.index(symbols.len());
            let alphabet = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
            let mut substituted = symbols.clone();
            substituted[i] = alphabet[with];
            if substituted[i] != symbols[i] {
                prop_assert_eq!(
                    Token::from_text(&rebuild(&substituted)).unwrap_err(),
                    TokenError::Text(TextError::Check { group: i / 5 + 1 })
                );
            }
            if i % 5 != 4 && symbols[i] != symbols[i + 1] {
                let mut swapped = symbols.clone();
                swapped.swap(i, i + 1);
                prop_assert_eq!(
                    Token::from_text(&rebuild(&swapped)).unwrap_err(),
                    TokenError::Text(TextError::Check { group: i / 5 + 1 })
                );
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = Token::from_text(&text);
        }
    }
}

/// `cloudpdi token slip`: each rendering is checked by independent tools from Debian:
/// zbarimg (zbar-tools) decodes the QR code from the PNG and from the SVG, HTML and PDF
/// rasterized by rsvg-convert (librsvg2-bin) and pdftoppm (poppler-utils); qpdf checks the
/// PDF's structure, pdftotext reads its text, Python's XML parser the SVG and HTML.
mod slip {
    use super::*;
    use std::path::Path;

    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} is required (scripts/test.sh installs it): {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The QR code's content as zbarimg reads it from a raster image.
    pub(super) fn decode_qr(image: &Path) -> String {
        run("zbarimg", &["--raw", "-q", image.to_str().unwrap()])
            .trim_end()
            .to_owned()
    }

    fn make_slip(dir: &Path, token: &str, name: &str) -> std::path::PathBuf {
        let out = dir.join(name);
        let result = cloudpdi(&[
            "token",
            "slip",
            token,
            "--out",
            out.to_str().unwrap(),
            "--facility-name",
            "京都大学医学部附属病院 放射線部",
            "--contact",
            "075-000-0000",
            "--patient-name",
            "山田 太郎",
            "--content",
            "CT 胸部 2026-11-20",
        ]);
        assert!(result.status.success(), "{}", text(&result));
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name} holds the token");
        out
    }

    fn xml_well_formed(path: &Path) {
        let script = "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])";
        run("python3", &["-c", script, path.to_str().unwrap()]);
    }

    /// The token (`@FILE`) and what its QR code holds: the text without the hyphens
    /// between groups.
    fn token_text(dir: &Path) -> (String, String) {
        let token = new_token(dir, "t.txt");
        let text = std::fs::read_to_string(dir.join("t.txt")).unwrap();
        let parsed = cloudpdi::token::Token::from_text(text.trim()).unwrap();
        (token, parsed.to_qr_text().to_string())
    }

    #[test]
    fn png_qr_decodes_to_exactly_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let (token, expected) = token_text(dir.path());
        let png = make_slip(dir.path(), &token, "slip.png");
        let decoded = decode_qr(&png);
        assert_eq!(decoded, expected, "the QR holds the token and nothing else");
        assert!(cloudpdi::token::Token::from_text(&decoded).is_ok());
    }

    #[test]
    fn svg_and_html_are_well_formed_complete_and_their_qr_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let (token, expected) = token_text(dir.path());
        // The first two groups as printed.
        let printed = format!("{}-{}", &expected[..9], &expected[9..14]);
        let svg = make_slip(dir.path(), &token, "slip.svg");
        let html = make_slip(dir.path(), &token, "slip.html");
        for page in [&svg, &html] {
            xml_well_formed(page);
            let content = std::fs::read_to_string(page).unwrap();
            for needle in [
                "京都大学医学部附属病院 放射線部",
                "山田 太郎",
                "075-000-0000",
                "有効期限 / Valid until",
                "受け取る",
                "hospital or clinic",
                &printed,
            ] {
                assert!(
                    content.contains(needle),
                    "{} lacks {needle}",
                    page.display()
                );
            }
        }
        let raster = dir.path().join("svg.png");
        run(
            "rsvg-convert",
            &[
                "-w",
                "900",
                "-o",
                raster.to_str().unwrap(),
                svg.to_str().unwrap(),
            ],
        );
        assert_eq!(decode_qr(&raster), expected);

        // The HTML's inline QR code, cut out and rasterized alone.
        let qr_svg = dir.path().join("html-qr.svg");
        let script = "import re, sys; page = open(sys.argv[1], encoding='utf-8').read(); \
                      open(sys.argv[2], 'w').write(re.search(r'<svg class=\"qr\".*?</svg>', page, re.S).group(0))";
        run(
            "python3",
            &[
                "-c",
                script,
                html.to_str().unwrap(),
                qr_svg.to_str().unwrap(),
            ],
        );
        let raster = dir.path().join("html.png");
        run(
            "rsvg-convert",
            &[
                "-w",
                "400",
                "-b",
                "white",
                "-o",
                raster.to_str().unwrap(),
                qr_svg.to_str().unwrap(),
            ],
        );
        assert_eq!(decode_qr(&raster), expected);
    }

    #[test]
    fn pdf_passes_qpdf_shows_the_text_and_its_qr_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let (token, expected) = token_text(dir.path());
        // The first two groups as printed.
        let printed = format!("{}-{}", &expected[..9], &expected[9..14]);
        let pdf = make_slip(dir.path(), &token, "slip.pdf");
        run("qpdf", &["--check", pdf.to_str().unwrap()]);
        let text = run("pdftotext", &["-layout", pdf.to_str().unwrap(), "-"]);
        for needle in ["Valid until", "hospital or clinic", &printed, "山田 太郎"] {
            assert!(text.contains(needle), "PDF text lacks {needle}:\n{text}");
        }
        let prefix = dir.path().join("page");
        run(
            "pdftoppm",
            &[
                "-r",
                "200",
                "-png",
                "-singlefile",
                pdf.to_str().unwrap(),
                prefix.to_str().unwrap(),
            ],
        );
        assert_eq!(decode_qr(&dir.path().join("page.png")), expected);
    }

    #[test]
    fn an_unknown_extension_or_a_bad_token_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (token, _) = token_text(dir.path());
        let out = dir.path().join("slip.txt");
        // The facility's name is given: the token no longer carries an issuer.
        let result = cloudpdi(&[
            "token",
            "slip",
            &token,
            "--facility-name",
            "Hospital A",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!result.status.success());
        assert!(
            text(&result).contains(".html, .pdf, .png or .svg"),
            "{}",
            text(&result)
        );
        let out = dir.path().join("slip.pdf");
        let result = cloudpdi(&[
            "token",
            "slip",
            "HT2-00000-00000",
            "--facility-name",
            "Hospital A",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!result.status.success());
        assert!(!out.exists());
    }
}
