//! A token sealed from one facility to another: HPKE (RFC 9180) in authenticated mode,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.
//!
//! ```text
//! "CPDS" | version u8 = 1 | encapsulated key (32 bytes) | ciphertext (plaintext + 16-byte tag)
//! ```
//!
//! The HPKE `info` names both facilities (`"cloudpdi sealed token v1" 0x00 sender 0x00
//! recipient`), so a message sealed from A to B does not open as if from or to anyone
//! else, even with the right keys; the magic and version are the AEAD's associated data.
//! Authenticated mode ties the message to the sender's private key: it opens only with the
//! sender's public key, which the recipient pinned. The message is one token (a short
//! text), so sizes are small and fixed bounds apply before any work.

use std::convert::Infallible;

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::rand_core::{TryCryptoRng, TryRng};
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::key::{FacilityKey, KemSuite, PublicKey};

/// Largest plaintext sealed (bytes): a token's text is under 200 characters.
pub const MAX_PLAINTEXT: usize = 1024;
/// Largest sealed message (bytes) the repository stores and a client reads.
pub const MAX_SEALED: usize = 4096;

/// The envelope's magic.
const MAGIC: &[u8; 4] = b"CPDS";
/// The envelope's version.
const VERSION: u8 = 1;
/// Length of the magic and version.
const HEADER_LEN: usize = 5;
/// Length of the encapsulated key (an X25519 public key).
const ENC_LEN: usize = 32;
/// Length of the AES-GCM tag.
const TAG_LEN: usize = 16;
/// The start of the HPKE `info`.
const INFO_LABEL: &[u8] = b"cloudpdi sealed token v1";

/// Why a message cannot be sealed or opened. Opening says as little as possible: a wrong
/// key, a wrong sender, swapped codes and a changed byte all read alike.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The plaintext is empty or larger than [`MAX_PLAINTEXT`].
    #[error("a sealed token holds 1 to {MAX_PLAINTEXT} bytes; this one has {0}")]
    Plaintext(usize),
    /// A facility code is not a code.
    #[error("facility code {0:?} is not 1-32 characters of A-Z, a-z, 0-9, _ and -")]
    Code(String),
    /// The bytes are not a sealed message of this version, or are larger than
    /// [`MAX_SEALED`].
    #[error(
        "this is not a cloudpdi sealed token (version 1, at most {MAX_SEALED} bytes); \
         the sender may run another version"
    )]
    Format,
    /// No randomness from the operating system.
    #[error("no randomness from the operating system to seal a token: {0}")]
    Random(String),
    /// HPKE refused to seal (the recipient's public key is not usable).
    #[error(
        "the recipient's public key cannot be used to seal (a degenerate X25519 key): \
         ask the recipient's repository operator to register its real key"
    )]
    Seal,
    /// The message does not open with this key, from this sender, between these codes.
    #[error(
        "the sealed token does not open: it was not sealed by this sender's pinned key \
         to this facility's key, or it was changed on the way; if a facility changed its \
         key, re-pin it and ask the sender to send again"
    )]
    Open,
}

/// The HPKE `info`: label, sender code, recipient code, separated by zero bytes.
fn info(sender_code: &str, recipient_code: &str) -> Result<Vec<u8>, SealError> {
    for code in [sender_code, recipient_code] {
        if !super::is_code(code) {
            return Err(SealError::Code(code.to_owned()));
        }
    }
    let mut info = Vec::with_capacity(INFO_LABEL.len() + 2 + sender_code.len() * 2);
    info.extend_from_slice(INFO_LABEL);
    info.push(0);
    info.extend_from_slice(sender_code.as_bytes());
    info.push(0);
    info.extend_from_slice(recipient_code.as_bytes());
    Ok(info)
}

/// Seals `plaintext` (a token's text) from `sender` (code `sender_code`) to `recipient`
/// (code `recipient_code`).
///
/// # Errors
/// [`SealError::Plaintext`], [`SealError::Code`], [`SealError::Random`] or
/// [`SealError::Seal`].
pub fn seal(
    sender: &FacilityKey,
    sender_code: &str,
    recipient: &PublicKey,
    recipient_code: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut()).map_err(|e| SealError::Random(e.to_string()))?;
    seal_seeded(
        sender,
        sender_code,
        recipient,
        recipient_code,
        plaintext,
        &seed,
    )
}

/// As [`seal`] with the ephemeral key drawn from `seed`: [`seal`] passes 32 bytes from the
/// operating system; test vectors pass a fixed seed.
pub(crate) fn seal_seeded(
    sender: &FacilityKey,
    sender_code: &str,
    recipient: &PublicKey,
    recipient_code: &str,
    plaintext: &[u8],
    seed: &[u8; 32],
) -> Result<Vec<u8>, SealError> {
    if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
        return Err(SealError::Plaintext(plaintext.len()));
    }
    let info = info(sender_code, recipient_code)?;
    let mode = OpModeS::<KemSuite>::Auth((sender.hpke_private(), sender.public().hpke_public()));
    let mut rng = SeededRng::new(seed);
    let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, KemSuite>(
        &mode,
        &recipient.hpke_public(),
        &info,
        plaintext,
        &header(),
        &mut rng,
    )
    .map_err(|_| SealError::Seal)?;
    let mut sealed = Vec::with_capacity(HEADER_LEN + ENC_LEN + ciphertext.len());
    sealed.extend_from_slice(&header());
    sealed.extend_from_slice(&enc.to_bytes());
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Whether `bytes` have the form of a sealed message (magic, version, length within
/// bounds), without any key: the repository refuses to carry anything else, so a token
/// posted by mistake in clear is never stored.
pub fn is_envelope(bytes: &[u8]) -> bool {
    (HEADER_LEN + ENC_LEN + TAG_LEN + 1..=MAX_SEALED).contains(&bytes.len())
        && bytes[..HEADER_LEN] == header()
}

/// Opens `sealed`, addressed to `recipient` (code `recipient_code`), which must have been
/// sealed by the holder of `sender` (code `sender_code`).
///
/// # Errors
/// [`SealError::Format`] for bytes that are not a sealed message, [`SealError::Code`] for
/// a malformed code, [`SealError::Open`] for everything else.
pub fn open(
    recipient: &FacilityKey,
    recipient_code: &str,
    sender: &PublicKey,
    sender_code: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if !is_envelope(sealed) {
        return Err(SealError::Format);
    }
    let (enc, ciphertext) = sealed[HEADER_LEN..].split_at(ENC_LEN);
    let info = info(sender_code, recipient_code)?;
    let enc = <KemSuite as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| SealError::Open)?;
    let mode = OpModeR::<KemSuite>::Auth(sender.hpke_public());
    let plaintext = hpke::single_shot_open::<AesGcm256, HkdfSha256, KemSuite>(
        &mode,
        &recipient.hpke_private(),
        &enc,
        &info,
        ciphertext,
        &header(),
    )
    .map_err(|_| SealError::Open)?;
    Ok(Zeroizing::new(plaintext))
}

/// Magic and version: the envelope's first bytes and the AEAD's associated data.
fn header() -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = VERSION;
    header
}

/// The randomness HPKE asks for while sealing (one ephemeral X25519 key): SHA-256 in
/// counter mode over a 32-byte seed. Sealing thus cannot panic on a failing OS source
/// (the seed is fetched, with its error, beforehand), and test vectors are reproducible.
struct SeededRng {
    seed: Zeroizing<[u8; 32]>,
    counter: u64,
}

impl SeededRng {
    fn new(seed: &[u8; 32]) -> Self {
        SeededRng {
            seed: Zeroizing::new(*seed),
            counter: 0,
        }
    }
}

impl TryRng for SeededRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0u8; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0u8; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(32) {
            let mut block = Zeroizing::new([0u8; 32]);
            block.copy_from_slice(
                &Sha256::new()
                    .chain_update(b"cloudpdi seal rng")
                    .chain_update(self.seed.as_ref())
                    .chain_update(self.counter.to_be_bytes())
                    .finalize(),
            );
            self.counter = self.counter.wrapping_add(1);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}

impl TryCryptoRng for SeededRng {}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"HT2-05NGF-W3G0N-60RKW-4CSMW-6MV3P-EE1SX-C5H6E-6S354";

    fn keys() -> (FacilityKey, FacilityKey, FacilityKey) {
        (
            FacilityKey::generate().expect("a"),
            FacilityKey::generate().expect("b"),
            FacilityKey::generate().expect("c"),
        )
    }

    #[test]
    fn opens_only_for_the_recipient_from_the_sender_between_the_codes() {
        let (a, b, c) = keys();
        let sealed = seal(&a, "A", &b.public(), "B", TOKEN).expect("seal");
        assert_eq!(sealed.len(), HEADER_LEN + ENC_LEN + TOKEN.len() + TAG_LEN);
        assert_eq!(&sealed[..5], b"CPDS\x01");
        let opened = open(&b, "B", &a.public(), "A", &sealed).expect("open");
        assert_eq!(opened.as_slice(), TOKEN);
        // Not with another recipient key.
        assert_eq!(
            open(&c, "B", &a.public(), "A", &sealed),
            Err(SealError::Open)
        );
        // Not as from another sender, even one the recipient knows.
        assert_eq!(
            open(&b, "B", &c.public(), "A", &sealed),
            Err(SealError::Open)
        );
        assert_eq!(
            open(&b, "B", &c.public(), "C", &sealed),
            Err(SealError::Open)
        );
        // Not with swapped or other codes.
        assert_eq!(
            open(&b, "A", &a.public(), "B", &sealed),
            Err(SealError::Open)
        );
        assert_eq!(
            open(&b, "B", &a.public(), "A2", &sealed),
            Err(SealError::Open)
        );
        assert_eq!(
            open(&b, "B2", &a.public(), "A", &sealed),
            Err(SealError::Open)
        );
        // Two seals of one token differ (a fresh ephemeral key each time).
        assert_ne!(
            seal(&a, "A", &b.public(), "B", TOKEN).expect("again"),
            sealed
        );
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let (a, b, _) = keys();
        let sealed = seal(&a, "A", &b.public(), "B", TOKEN).expect("seal");
        for i in 0..sealed.len() {
            for flip in [0x01, 0x80] {
                let mut changed = sealed.clone();
                changed[i] ^= flip;
                let result = open(&b, "B", &a.public(), "A", &changed);
                assert!(
                    matches!(result, Err(SealError::Open | SealError::Format)),
                    "byte {i} flip {flip:#x}: {result:?}"
                );
            }
        }
        for len in 0..sealed.len() {
            assert!(open(&b, "B", &a.public(), "A", &sealed[..len]).is_err());
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(
            open(&b, "B", &a.public(), "A", &longer),
            Err(SealError::Open)
        );
        assert_eq!(
            open(&b, "B", &a.public(), "A", &vec![0; MAX_SEALED + 1]),
            Err(SealError::Format)
        );
    }

    #[test]
    fn bounds_and_codes_are_checked_before_any_work() {
        let (a, b, _) = keys();
        assert_eq!(
            seal(&a, "A", &b.public(), "B", b""),
            Err(SealError::Plaintext(0))
        );
        assert_eq!(
            seal(&a, "A", &b.public(), "B", &[b'x'; MAX_PLAINTEXT + 1]),
            Err(SealError::Plaintext(MAX_PLAINTEXT + 1))
        );
        let largest = seal(&a, "A", &b.public(), "B", &[b'x'; MAX_PLAINTEXT]).expect("largest");
        assert!(largest.len() <= MAX_SEALED);
        assert!(is_envelope(&largest));
        assert!(!is_envelope(TOKEN));
        assert!(!is_envelope(&largest[..HEADER_LEN + ENC_LEN + TAG_LEN]));
        for bad in ["", "A\0B", "a/b", &"X".repeat(33)] {
            assert_eq!(
                seal(&a, bad, &b.public(), "B", TOKEN),
                Err(SealError::Code(bad.to_owned()))
            );
            assert_eq!(
                seal(&a, "A", &b.public(), bad, TOKEN),
                Err(SealError::Code(bad.to_owned()))
            );
        }
        // A degenerate (all-zero) recipient key gives no shared secret: refused.
        assert_eq!(
            seal(&a, "A", &PublicKey::from_bytes([0; 32]), "B", TOKEN),
            Err(SealError::Seal)
        );
    }

    /// tests/vectors/sealed/*.txt: fixed keys, codes, seed and plaintext -> exact bytes;
    /// the sealed bytes open to the plaintext. A change to the format or the suite breaks
    /// this test, and every facility that runs another version with it.
    #[test]
    fn committed_vectors_match_exactly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/sealed");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("vector folder") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("vector");
            let field = |name: &str| -> Vec<u8> {
                let value = text
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .unwrap_or_else(|| panic!("{}: no {name}", path.display()));
                hex::decode(value).expect("hex")
            };
            let code = |name: &str| String::from_utf8(field(name)).expect("code");
            let key =
                |name: &str| FacilityKey::from_bytes(&field(name).try_into().expect("32-byte key"));
            let (sender, recipient) = (key("sender_private"), key("recipient_private"));
            let (sender_code, recipient_code) = (code("sender_code"), code("recipient_code"));
            let seed: [u8; 32] = field("seed").try_into().expect("32-byte seed");
            let plaintext = field("plaintext");
            let expected = field("sealed");
            assert_eq!(
                sender.public().as_bytes().as_slice(),
                field("sender_public"),
                "{}",
                path.display()
            );
            let sealed = seal_seeded(
                &sender,
                &sender_code,
                &recipient.public(),
                &recipient_code,
                &plaintext,
                &seed,
            )
            .expect("seal");
            assert_eq!(
                hex::encode(&sealed),
                hex::encode(&expected),
                "{}",
                path.display()
            );
            let opened = open(
                &recipient,
                &recipient_code,
                &sender.public(),
                &sender_code,
                &expected,
            )
            .expect("open");
            assert_eq!(opened.as_slice(), plaintext);
            checked += 1;
        }
        assert!(
            checked >= 2,
            "expected at least two vectors in {}",
            dir.display()
        );
    }
}
