//! HI-TOKEN: the patient's key to a study in the repository, carried instead of a CD.
//!
//! A token holds where the study is (a repository reference and the document ID), the
//! secret that opens it, and when it expires; no patient data and no free text. Its
//! binary envelope (below) is written as grouped Crockford base32 text with check symbols
//! ([`text`]). From the secret, HKDF-SHA-256 derives under distinct labels the
//! [`ContainerKey`] that opens the container and the [`DownloadProof`] shown to the
//! repository, which stores only the proof's SHA-256: the repository never learns the
//! secret.
//!
//! Envelope, format version 2 (all integers big endian), `docs/token.md`:
//!
//! ```text
//! u8  version = 2
//! u8  r   repository reference: r & 0x80 == 0: a community code of r (1..=6) bytes
//!         of A-Z 0-9 follows; r & 0x80 != 0: a URL of r & 0x7f (1..=120) bytes of
//!         printable ASCII follows
//! u32 expiry, Unix seconds (UTC)
//! 10  document ID, raw bytes (the repository's 20 lower-case hex characters)
//! 16  secret (128 random bits from the OS CSPRNG)
//! ```
//!
//! A token naming a known community is at most 38 bytes: 61 symbols, 16 groups. The bytes
//! become 5-bit symbols (zero bits pad the last symbol, zero symbols pad the last group);
//! a parser accepts at most two trailing zero bytes.

pub mod cli;
pub mod qr;
pub mod slip;
pub mod text;

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::clock::date;
use crate::container::ContainerKey;
pub use text::TextError;

/// Envelope format version written by this code.
pub const VERSION: u8 = 2;
/// Secret length in bytes (128 bits).
pub const SECRET_LEN: usize = 16;
/// Document ID length in the envelope, in bytes (80 random bits; the repository writes
/// them as [`crate::repository::DOCUMENT_ID_LEN`] hex characters).
pub const DOCUMENT_ID_BYTES: usize = 10;
/// Longest community code (`[repositories]` key): short enough that a token naming one is
/// at most 16 groups.
pub const MAX_COMMUNITY_LEN: usize = 6;
/// Longest repository URL a token carries (a repository not in `[repositories]`).
pub const MAX_URL_LEN: usize = 120;
/// Flag of the repository reference byte: a URL follows, not a community code.
const URL_FLAG: u8 = 0x80;
const CONTAINER_KEY_INFO: &[u8] = b"cloudpdi token v2 container key";
const DOWNLOAD_PROOF_INFO: &[u8] = b"cloudpdi token v2 download proof";

/// Why a token cannot be read or used. Messages never contain the token text.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The text form is wrong (prefix, character, length, check symbol).
    #[error(transparent)]
    Text(#[from] TextError),
    /// The envelope cannot be parsed.
    #[error("the token is not readable ({0}); ask the issuing hospital for a new one")]
    Envelope(&'static str),
    /// A version this program does not know.
    #[error("token format version {0} is not supported; a newer cloudpdi may read it")]
    Version(u8),
    /// A field value is not allowed.
    #[error("invalid token field: {0}")]
    Field(&'static str),
    /// The token is past its expiry.
    #[error("token expired on {0} (UTC)")]
    Expired(String),
    /// The OS did not provide randomness.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// Whether `code` is a community code: 1 to [`MAX_COMMUNITY_LEN`] characters of `A-Z 0-9`
/// (a `[repositories]` key, and what a short token names).
pub fn is_community_code(code: &str) -> bool {
    (1..=MAX_COMMUNITY_LEN).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Where the token's document is: a community code the receiver resolves through its
/// `[repositories]` (a short token), or the repository's whole URL (any repository).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RepositoryRef {
    /// A community code (1-6 of `A-Z 0-9`).
    Community(String),
    /// A repository base URL (1-120 printable ASCII characters).
    Url(String),
}

impl RepositoryRef {
    fn validate(&self) -> Result<(), TokenError> {
        match self {
            RepositoryRef::Community(code) if !is_community_code(code) => Err(TokenError::Field(
                "community code: 1-6 characters of A-Z 0-9",
            )),
            RepositoryRef::Url(url)
                if url.is_empty()
                    || url.len() > MAX_URL_LEN
                    || !url.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
            {
                Err(TokenError::Field(
                    "repository URL: 1-120 printable ASCII characters",
                ))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for RepositoryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepositoryRef::Community(code) => write!(f, "community {code}"),
            RepositoryRef::Url(url) => f.write_str(url),
        }
    }
}
/// The 128-bit secret; zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret([u8; SECRET_LEN]);

impl Secret {
    /// A fresh secret from the OS CSPRNG.
    ///
    /// # Errors
    /// [`TokenError::Random`] without entropy.
    pub fn generate() -> Result<Secret, TokenError> {
        let mut secret = Secret([0u8; SECRET_LEN]);
        getrandom::fill(&mut secret.0).map_err(|e| TokenError::Random(e.to_string()))?;
        Ok(secret)
    }

    /// The secret kept in a pending token file (see [`Secret::to_bytes`]).
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Secret {
        Secret(bytes)
    }

    /// The raw secret, only for the file that holds the pending token; wiped when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; SECRET_LEN]> {
        Zeroizing::new(self.0)
    }

    /// The key that opens the container sealed under this secret.
    pub fn container_key(&self) -> ContainerKey {
        ContainerKey::from_bytes(self.derive(CONTAINER_KEY_INFO))
    }

    /// The proof of possession shown to the repository when downloading.
    pub fn download_proof(&self) -> DownloadProof {
        DownloadProof(self.derive(DOWNLOAD_PROOF_INFO))
    }

    fn derive(&self, info: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, &self.0)
            .expand(info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        out
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What the downloader shows the repository; zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DownloadProof([u8; 32]);

impl DownloadProof {
    /// The proof bytes, to send in the download request.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// SHA-256 of the proof: the only thing the repository keeps.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }
}

impl fmt::Debug for DownloadProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DownloadProof(..)")
    }
}

/// A token's data items.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The repository holding the document: a community code or a URL.
    pub repository: RepositoryRef,
    /// Document ID the repository assigned: 20 lower-case hex characters (10 bytes).
    pub document_id: String,
    /// Expiry, Unix seconds UTC.
    pub expires_at: u32,
    secret: Secret,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("repository", &self.repository)
            .field("document_id", &self.document_id)
            .field("expires_at", &self.expires_at)
            .field("secret", &self.secret)
            .finish()
    }
}

impl Token {
    /// Issues a token with a fresh secret from the OS CSPRNG.
    ///
    /// # Errors
    /// [`TokenError::Field`] for invalid fields, [`TokenError::Random`] without entropy.
    pub fn issue(
        repository: RepositoryRef,
        document_id: &str,
        expires_at: u32,
    ) -> Result<Token, TokenError> {
        let secret = Secret::generate()?;
        Token::for_secret(repository, document_id, expires_at, &secret)
    }

    /// A token with a given secret: for test vectors and for re-reading.
    ///
    /// # Errors
    /// [`TokenError::Field`] for invalid fields.
    pub fn with_secret(
        repository: RepositoryRef,
        document_id: &str,
        expires_at: u32,
        secret: [u8; SECRET_LEN],
    ) -> Result<Token, TokenError> {
        let token = Token {
            repository,
            document_id: document_id.to_owned(),
            expires_at,
            secret: Secret(secret),
        };
        token.validate()?;
        Ok(token)
    }

    fn validate(&self) -> Result<(), TokenError> {
        self.repository.validate()?;
        if self.document_id.len() != crate::repository::DOCUMENT_ID_LEN
            || !crate::repository::is_document_id(&self.document_id)
        {
            return Err(TokenError::Field(
                "document ID: 20 lower-case hex characters, as the repository assigns them",
            ));
        }
        Ok(())
    }

    /// The key that opens this token's container.
    pub fn container_key(&self) -> ContainerKey {
        self.secret.container_key()
    }

    /// The proof of possession shown to the repository when downloading.
    pub fn download_proof(&self) -> DownloadProof {
        self.secret.download_proof()
    }

    /// A token for a secret chosen before the document ID was known: the sender seals
    /// the container and registers the proof first, and learns the ID only then.
    ///
    /// # Errors
    /// [`TokenError::Field`] for invalid fields.
    pub fn for_secret(
        repository: RepositoryRef,
        document_id: &str,
        expires_at: u32,
        secret: &Secret,
    ) -> Result<Token, TokenError> {
        Token::with_secret(repository, document_id, expires_at, secret.0)
    }

    /// Fails if the token is past its expiry at `now` (Unix seconds).
    ///
    /// # Errors
    /// [`TokenError::Expired`] with the date.
    pub fn check_not_expired(&self, now: u64) -> Result<(), TokenError> {
        if now > u64::from(self.expires_at) {
            return Err(TokenError::Expired(date(u64::from(self.expires_at))));
        }
        Ok(())
    }

    /// The binary envelope. It holds the secret, so it is wiped when dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(2 + MAX_URL_LEN + 30));
        out.push(VERSION);
        let (flag, reference) = match &self.repository {
            RepositoryRef::Community(code) => (0, code),
            RepositoryRef::Url(url) => (URL_FLAG, url),
        };
        let len = u8::try_from(reference.len()).expect("validated lengths fit 7 bits");
        out.push(flag | len);
        out.extend_from_slice(reference.as_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        let mut id = [0u8; DOCUMENT_ID_BYTES];
        hex::decode_to_slice(&self.document_id, &mut id).expect("validated hex");
        out.extend_from_slice(&id);
        out.extend_from_slice(&self.secret.0);
        out
    }

    /// Parses a binary envelope (with at most two trailing zero bytes of padding).
    ///
    /// # Errors
    /// [`TokenError`] naming what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Token, TokenError> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], TokenError> {
            let slice = at
                .checked_add(n)
                .and_then(|end| bytes.get(at..end))
                .ok_or(TokenError::Envelope("it ends too early"))?;
            at += n;
            Ok(slice)
        };
        let version = take(1)?[0];
        if version != VERSION {
            return Err(TokenError::Version(version));
        }
        let r = take(1)?[0];
        let len = usize::from(r & !URL_FLAG);
        let limit = if r & URL_FLAG == 0 {
            MAX_COMMUNITY_LEN
        } else {
            MAX_URL_LEN
        };
        if len == 0 || len > limit {
            return Err(TokenError::Envelope(
                "the repository reference has a wrong length",
            ));
        }
        let reference = String::from_utf8(take(len)?.to_vec())
            .map_err(|_| TokenError::Envelope("the repository reference is not text"))?;
        let repository = if r & URL_FLAG == 0 {
            RepositoryRef::Community(reference)
        } else {
            RepositoryRef::Url(reference)
        };
        let expires_at = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
        let document_id = hex::encode(take(DOCUMENT_ID_BYTES)?);
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(take(SECRET_LEN)?);
        let rest = bytes.get(at..).unwrap_or_default();
        if rest.len() > 2 || rest.iter().any(|&b| b != 0) {
            secret.zeroize();
            return Err(TokenError::Envelope(
                "unexpected bytes after the last field",
            ));
        }
        let token = Token::with_secret(repository, &document_id, expires_at, secret);
        secret.zeroize();
        token
    }

    /// The text form to print or send: `HT2-` and hyphen-separated groups of 5. It is the
    /// secret: handle it like a password (never log it).
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(text::encode_symbols(&to_symbols(&self.to_bytes())))
    }

    /// What the QR code holds: [`Token::to_text`] without the hyphens between groups
    /// (`HT2-` and the symbols), fewer characters for a smaller QR version; it parses as
    /// the token, since parsing ignores hyphens.
    pub fn to_qr_text(&self) -> Zeroizing<String> {
        let text = self.to_text();
        let body = text.get(text::PREFIX.len()..).unwrap_or_default();
        let mut out = Zeroizing::new(String::with_capacity(text.len()));
        out.push_str(text::PREFIX);
        out.extend(body.chars().filter(|&c| c != '-'));
        out
    }

    /// [`Token::to_text`] with a line end, as a token file holds it (built in place, so no
    /// copy of the text is left behind unwiped).
    pub fn to_line(&self) -> Zeroizing<String> {
        let text = self.to_text();
        let mut line = Zeroizing::new(String::with_capacity(text.len() + 1));
        line.push_str(&text);
        line.push('\n');
        line
    }

    /// Parses the text form (case, spaces and hyphens ignored; O read as 0, I and L as 1).
    ///
    /// # Errors
    /// [`TokenError`]: a mistyped group is named.
    pub fn from_text(text: &str) -> Result<Token, TokenError> {
        let symbols = Zeroizing::new(text::decode_symbols(text)?);
        Token::from_bytes(&from_symbols(&symbols))
    }
}

/// Bytes to 5-bit symbols, padded with zero bits and then zero symbols to whole groups.
fn to_symbols(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut symbols = Zeroizing::new(Vec::with_capacity(bytes.len() * 8 / 5 + 4));
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            symbols.push(((acc >> bits) & 31) as u8);
        }
    }
    if bits > 0 {
        symbols.push(((acc << (5 - bits)) & 31) as u8);
    }
    while symbols.len() % 4 != 0 {
        symbols.push(0);
    }
    symbols
}

/// 5-bit symbols back to bytes (trailing partial bits dropped).
fn from_symbols(symbols: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(symbols.len() * 5 / 8));
    let (mut acc, mut bits) = (0u32, 0u32);
    for &s in symbols {
        acc = (acc << 5) | u32::from(s & 31);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            bytes.push((acc >> bits) as u8);
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = "0123456789abcdef0123";

    fn sample() -> Token {
        Token::with_secret(
            RepositoryRef::Community("KYOTO1".into()),
            DOCUMENT,
            1_796_083_200,
            [0x42; SECRET_LEN],
        )
        .expect("valid sample")
    }

    #[test]
    fn text_round_trip_and_debug_hides_the_secret() {
        let token = sample();
        let text = token.to_text();
        assert!(text.starts_with("HT2-"));
        assert_eq!(Token::from_text(&text).expect("parse"), token);
        assert_eq!(
            Token::from_text(&text.to_lowercase()).expect("lower"),
            token
        );
        assert_eq!(Token::from_text(&token.to_qr_text()).expect("qr"), token);
        let debug = format!("{token:?}");
        assert!(
            debug.contains("Secret(..)") && !debug.contains("42, 42"),
            "{debug}"
        );
    }

    #[test]
    fn a_known_community_fits_sixteen_groups_and_a_url_is_longer() {
        let token = Token::with_secret(
            RepositoryRef::Community("ABCDEF".into()),
            DOCUMENT,
            u32::MAX,
            [0xff; SECRET_LEN],
        )
        .expect("valid");
        assert_eq!(token.to_bytes().len(), 38);
        assert_eq!(token.to_text().split('-').count(), 1 + 16);
        let url = Token::with_secret(
            RepositoryRef::Url("https://repo.example.jp".into()),
            DOCUMENT,
            u32::MAX,
            [0xff; SECRET_LEN],
        )
        .expect("valid");
        assert!(url.to_text().len() > token.to_text().len());
        assert_eq!(Token::from_text(&url.to_text()).expect("parse"), url);
    }

    #[test]
    fn derived_keys_are_separate_and_stable() {
        let token = sample();
        let proof = token.download_proof();
        assert_ne!(proof.bytes(), &token.secret.derive(CONTAINER_KEY_INFO));
        assert_eq!(proof.bytes(), token.download_proof().bytes());
        assert_ne!(proof.hash(), *proof.bytes());
        let other = Token::with_secret(
            RepositoryRef::Url("u".into()),
            DOCUMENT,
            0,
            [0x43; SECRET_LEN],
        )
        .expect("valid");
        assert_ne!(other.download_proof().bytes(), proof.bytes());
    }

    #[test]
    fn expiry_names_the_date() {
        let token = sample();
        assert_eq!(token.check_not_expired(1_796_083_200), Ok(()));
        assert_eq!(
            token.check_not_expired(1_796_083_201),
            Err(TokenError::Expired("2026-12-01".into()))
        );
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
    }

    #[test]
    fn bad_envelopes_and_fields_are_refused() {
        let bytes = sample().to_bytes();
        assert!(Token::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut extra = bytes.clone();
        extra.extend_from_slice(&[0, 0, 0]);
        assert!(Token::from_bytes(&extra).is_err());
        let mut version = bytes.clone();
        version[0] = 9;
        assert_eq!(Token::from_bytes(&version), Err(TokenError::Version(9)));
        for r in [0x00, 0x07, 0x80, 0x80 | 121] {
            let mut reference = bytes.clone();
            reference[1] = r;
            assert!(Token::from_bytes(&reference).is_err(), "{r:#x}");
        }
        let mut lower = bytes.clone();
        lower[2] = b'a';
        assert!(Token::from_bytes(&lower).is_err());
        let community = |code: &str| RepositoryRef::Community(code.into());
        for code in ["", "ABCDEFG", "abc", "A-B"] {
            assert!(Token::with_secret(community(code), DOCUMENT, 0, [0; 16]).is_err());
        }
        for id in ["../x", "0123456789ABCDEF0123", "0123456789abcdef012"] {
            assert!(Token::with_secret(community("A"), id, 0, [0; 16]).is_err());
        }
        assert!(
            Token::issue(community("A"), DOCUMENT, 0).expect("random")
                != Token::issue(community("A"), DOCUMENT, 0).expect("random")
        );
    }
}
