//! HI-TOKEN: the patient's key to a study in the repository, carried instead of a CD.
//!
//! A token holds where the study is (repository URL, document ID), the secret that opens
//! it, when it expires, and who issued it; no patient data. Its binary envelope (below) is
//! written as grouped Crockford base32 text with check symbols ([`text`]). From the
//! secret, HKDF-SHA-256 derives under distinct labels the [`ContainerKey`] that opens the
//! container and the [`DownloadProof`] shown to the repository, which stores only the
//! proof's SHA-256: the repository never learns the secret.
//!
//! Envelope, format version 1 (all integers big endian):
//!
//! ```text
//! u8  version = 1
//! u32 expiry, Unix seconds (UTC)
//! 16  secret (128 random bits from the OS CSPRNG)
//! u8 len + bytes  repository URL (printable ASCII, 1..=120)
//! u8 len + bytes  document ID (A-Z a-z 0-9 _ -, 1..=64)
//! u8 len + bytes  issuing facility code (printable ASCII, 0..=32)
//! u8 len + bytes  content summary, UTF-8 without patient data (0..=64)
//! ```
//!
//! The bytes become 5-bit symbols (zero bits pad the last symbol, zero symbols pad the
//! last group); a parser accepts at most two trailing zero bytes.

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
pub const VERSION: u8 = 1;
/// Secret length in bytes (128 bits).
pub const SECRET_LEN: usize = 16;
const CONTAINER_KEY_INFO: &[u8] = b"cloudpdi token v1 container key";
const DOWNLOAD_PROOF_INFO: &[u8] = b"cloudpdi token v1 download proof";

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
    /// Repository base URL.
    pub repository: String,
    /// Document ID the repository assigned.
    pub document_id: String,
    /// Expiry, Unix seconds UTC.
    pub expires_at: u32,
    /// Issuing facility code (printed on the slip with the facility's name).
    pub issuer: String,
    /// Optional description of the content, without patient data.
    pub summary: String,
    secret: Secret,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("repository", &self.repository)
            .field("document_id", &self.document_id)
            .field("expires_at", &self.expires_at)
            .field("issuer", &self.issuer)
            .field("summary", &self.summary)
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
        repository: &str,
        document_id: &str,
        expires_at: u32,
        issuer: &str,
        summary: &str,
    ) -> Result<Token, TokenError> {
        let secret = Secret::generate()?;
        Token::for_secret(
            repository,
            document_id,
            expires_at,
            issuer,
            summary,
            &secret,
        )
    }

    /// A token with a given secret: for test vectors and for re-reading.
    ///
    /// # Errors
    /// [`TokenError::Field`] for invalid fields.
    pub fn with_secret(
        repository: &str,
        document_id: &str,
        expires_at: u32,
        issuer: &str,
        summary: &str,
        secret: [u8; SECRET_LEN],
    ) -> Result<Token, TokenError> {
        let token = Token {
            repository: repository.to_owned(),
            document_id: document_id.to_owned(),
            expires_at,
            issuer: issuer.to_owned(),
            summary: summary.to_owned(),
            secret: Secret(secret),
        };
        token.validate()?;
        Ok(token)
    }

    fn validate(&self) -> Result<(), TokenError> {
        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        if self.repository.is_empty() || self.repository.len() > 120 || !printable(&self.repository)
        {
            return Err(TokenError::Field(
                "repository URL: 1-120 printable ASCII characters",
            ));
        }
        if self.document_id.is_empty()
            || self.document_id.len() > 64
            || !self
                .document_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(TokenError::Field("document ID: 1-64 of A-Z a-z 0-9 _ -"));
        }
        if self.issuer.len() > 32 || !printable(&self.issuer) {
            return Err(TokenError::Field(
                "issuer: up to 32 printable ASCII characters",
            ));
        }
        if self.summary.len() > 64 {
            return Err(TokenError::Field("summary: up to 64 bytes of UTF-8"));
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
        repository: &str,
        document_id: &str,
        expires_at: u32,
        issuer: &str,
        summary: &str,
        secret: &Secret,
    ) -> Result<Token, TokenError> {
        Token::with_secret(
            repository,
            document_id,
            expires_at,
            issuer,
            summary,
            secret.0,
        )
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
        let mut out = Zeroizing::new(Vec::with_capacity(128));
        out.push(VERSION);
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.secret.0);
        for field in [
            &self.repository,
            &self.document_id,
            &self.issuer,
            &self.summary,
        ] {
            out.push(u8::try_from(field.len()).expect("validated lengths fit a byte"));
            out.extend_from_slice(field.as_bytes());
        }
        out
    }

    /// Parses a binary envelope (with at most two trailing zero bytes of padding).
    ///
    /// # Errors
    /// [`TokenError`] naming what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Token, TokenError> {
        let mut at = 0;
        let mut take = |n: usize| -> Result<&[u8], TokenError> {
            let slice = bytes
                .get(at..at + n)
                .ok_or(TokenError::Envelope("it ends too early"))?;
            at += n;
            Ok(slice)
        };
        let version = take(1)?[0];
        if version != VERSION {
            return Err(TokenError::Version(version));
        }
        let expires_at = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(take(SECRET_LEN)?);
        let mut field = || -> Result<String, TokenError> {
            let len = usize::from(take(1)?[0]);
            String::from_utf8(take(len)?.to_vec())
                .map_err(|_| TokenError::Envelope("a text field is not UTF-8"))
        };
        let (repository, document_id, issuer, summary) = (field()?, field()?, field()?, field()?);
        let rest = &bytes[at..];
        if rest.len() > 2 || rest.iter().any(|&b| b != 0) {
            return Err(TokenError::Envelope(
                "unexpected bytes after the last field",
            ));
        }
        let token = Token::with_secret(
            &repository,
            &document_id,
            expires_at,
            &issuer,
            &summary,
            secret,
        );
        secret.zeroize();
        token
    }

    /// The text form to print, show as QR code, or send. It is the secret: handle it like
    /// a password (never log it).
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(text::encode_symbols(&to_symbols(&self.to_bytes())))
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

    fn sample() -> Token {
        Token::with_secret(
            "https://repo.example.jp/v1",
            "D7K2M9Q4X1Z8",
            1_796_083_200,
            "KYOTO-UH",
            "CT chest, 1 study",
            [0x42; SECRET_LEN],
        )
        .expect("valid sample")
    }

    #[test]
    fn text_round_trip_and_debug_hides_the_secret() {
        let token = sample();
        let text = token.to_text();
        assert!(text.starts_with("HT1-"));
        assert_eq!(Token::from_text(&text).expect("parse"), token);
        assert_eq!(
            Token::from_text(&text.to_lowercase()).expect("lower"),
            token
        );
        let debug = format!("{token:?}");
        assert!(
            debug.contains("Secret(..)") && !debug.contains("42, 42"),
            "{debug}"
        );
    }

    #[test]
    fn derived_keys_are_separate_and_stable() {
        let token = sample();
        let proof = token.download_proof();
        assert_ne!(proof.bytes(), &token.secret.derive(CONTAINER_KEY_INFO));
        assert_eq!(proof.bytes(), token.download_proof().bytes());
        assert_ne!(proof.hash(), *proof.bytes());
        let other = Token::with_secret("u", "d", 0, "", "", [0x43; SECRET_LEN]).expect("valid");
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
        assert!(Token::with_secret("u", "../x", 0, "", "", [0; SECRET_LEN]).is_err());
        assert!(
            Token::issue("u", "d", 0, "", "").expect("random")
                != Token::issue("u", "d", 0, "", "").expect("random")
        );
    }
}
