//! A facility's X25519 key pair: the private key in a file only its owner can read, the
//! public key as text (`x25519:` + base64url) for the repository's directory, and its
//! fingerprint in grouped Crockford base32, short enough to read over the phone.
//!
//! The key file is one line `x25519-private:` + 43 base64url characters (after a comment
//! line), written once (never replaced), mode 0600, durably. Loading refuses a file that
//! its group or others may read: a private key somebody else could have copied no longer
//! proves who sealed a token.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hpke::{Deserializable, Kem, Serializable};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The HPKE KEM of facility keys: DHKEM(X25519, HKDF-SHA256).
pub(super) type KemSuite = hpke::kem::X25519HkdfSha256;

/// Length of a raw X25519 key, private or public.
const KEY_LEN: usize = 32;
/// Prefix of a public key's text form.
const PUBLIC_PREFIX: &str = "x25519:";
/// Prefix of the private key's line in the key file.
const PRIVATE_PREFIX: &str = "x25519-private:";
/// The comment line the key file starts with.
const FILE_COMMENT: &str =
    "# cloudpdi facility private key (X25519): keep it secret, mode 0600, never copy it";
/// Largest key file read (a key file is about 140 bytes): a wrong path cannot make the
/// loader read a large file.
const MAX_KEY_FILE: u64 = 4096;
/// Length of a fingerprint in bytes (the start of a SHA-256).
const FINGERPRINT_LEN: usize = 20;
/// Domain label of the fingerprint hash.
const FINGERPRINT_LABEL: &[u8] = b"cloudpdi facility key";
/// Crockford base32, as in the token text.
const BASE32: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Symbols of a fingerprint: 160 bits in 5-bit symbols.
const FINGERPRINT_SYMBOLS: usize = FINGERPRINT_LEN * 8 / 5;
/// Symbols per group of the fingerprint's text.
const FINGERPRINT_GROUP: usize = 4;

/// Why a key or its text cannot be used; the message says what to do and never holds key
/// material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The operating system gave no randomness.
    #[error("no randomness from the operating system to make a facility key: {0}")]
    Random(String),
    /// The key file cannot be read or written.
    #[error("facility key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The key file may be read by other users.
    #[error(
        "facility key file {path} may be read by its group or others (mode {mode:o}); \
         the private key must be the owner's alone: run `chmod 600 {path}`, and if others \
         could have copied it, make a new key and have it registered again"
    )]
    Readable {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key file written by `cloudpdi facility keygen`.
    #[error(
        "{path} is not a cloudpdi facility key file (one line \"x25519-private:\" and 43 \
         characters, as `cloudpdi facility keygen` writes it)"
    )]
    KeyFile {
        /// The file.
        path: PathBuf,
    },
    /// A public key's text is malformed.
    #[error(
        "a facility public key is \"x25519:\" followed by 43 base64url characters \
         (as `cloudpdi facility show` prints it): {0}"
    )]
    PublicKey(&'static str),
    /// A fingerprint's text is malformed.
    #[error(
        "a key fingerprint is 32 characters in 8 groups of 4 (as `cloudpdi facility show` \
         prints it, e.g. 7KQ2-M9XD-...): {0}"
    )]
    Fingerprint(&'static str),
}

/// This facility's private key: it seals tokens as this facility and opens those sealed
/// to it. Zeroized when dropped; `Debug` shows nothing of it.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct FacilityKey {
    /// The clamped X25519 scalar.
    secret: [u8; KEY_LEN],
}

impl fmt::Debug for FacilityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FacilityKey(..)")
    }
}

impl FacilityKey {
    /// A new random key.
    ///
    /// # Errors
    /// [`KeyError::Random`] without OS entropy.
    pub fn generate() -> Result<FacilityKey, KeyError> {
        let mut random = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(random.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(FacilityKey::from_bytes(&random))
    }

    /// The key with these (possibly unclamped) scalar bytes: for key files and test
    /// vectors.
    pub(crate) fn from_bytes(bytes: &[u8; KEY_LEN]) -> FacilityKey {
        let mut secret = *bytes;
        // RFC 7748 clamping, as HPKE's DeserializePrivateKey does: the stored scalar is
        // the one used.
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        FacilityKey { secret }
    }

    /// The private key as HPKE uses it.
    pub(super) fn hpke_private(&self) -> <KemSuite as Kem>::PrivateKey {
        <KemSuite as Kem>::PrivateKey::from_bytes(&self.secret)
            .expect("an X25519 private key is 32 bytes")
    }

    /// Reads the key file `path`, refusing one that is not a regular file or that its
    /// group or others may read.
    ///
    /// # Errors
    /// [`KeyError::Io`], [`KeyError::Readable`] or [`KeyError::KeyFile`].
    pub fn load(path: &Path) -> Result<FacilityKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(KeyError::KeyFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Readable {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let not_a_key = || KeyError::KeyFile {
            path: path.to_owned(),
        };
        if bytes.len() as u64 > MAX_KEY_FILE {
            return Err(not_a_key());
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| not_a_key())?;
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'));
        let (Some(line), None) = (lines.next(), lines.next()) else {
            return Err(not_a_key());
        };
        let encoded = line.strip_prefix(PRIVATE_PREFIX).ok_or_else(not_a_key)?;
        let secret = decode_key(encoded).ok_or_else(not_a_key)?;
        Ok(FacilityKey::from_bytes(&secret))
    }

    /// Writes the key to the new file `path` (mode 0600, durably); an existing file is
    /// never replaced.
    ///
    /// # Errors
    /// [`KeyError::Io`], with [`std::io::ErrorKind::AlreadyExists`] when `path` exists.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        let text = Zeroizing::new(format!(
            "{FILE_COMMENT}\n{PRIVATE_PREFIX}{}\n",
            Zeroizing::new(URL_SAFE_NO_PAD.encode(self.secret)).as_str()
        ));
        crate::durable::create_new(path, 0o600, |file| file.write_all(text.as_bytes())).map_err(
            |source| KeyError::Io {
                path: path.to_owned(),
                source,
            },
        )
    }

    /// The public key, for the repository's directory.
    pub fn public(&self) -> PublicKey {
        let public = KemSuite::sk_to_pk(&self.hpke_private());
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(&public.to_bytes());
        PublicKey(bytes)
    }
}

/// 43 base64url characters (no padding) to 32 bytes; `None` for anything else.
fn decode_key(encoded: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    if encoded.len() != 43 {
        return None;
    }
    let decoded = Zeroizing::new(URL_SAFE_NO_PAD.decode(encoded).ok()?);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(
        decoded
            .get(..KEY_LEN)
            .filter(|_| decoded.len() == KEY_LEN)?,
    );
    Some(key)
}

/// A facility's public key: what the repository's directory lists, and what senders pin
/// by its [`Fingerprint`].
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; KEY_LEN]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_text())
    }
}

impl PublicKey {
    /// Parses `x25519:` and 43 base64url characters (surrounding spaces ignored).
    ///
    /// # Errors
    /// [`KeyError::PublicKey`] saying what is wrong.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let encoded = text
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or(KeyError::PublicKey("it does not start with \"x25519:\""))?;
        let key = decode_key(encoded).ok_or(KeyError::PublicKey(
            "the characters after \"x25519:\" are not 43 base64url characters",
        ))?;
        Ok(PublicKey(*key))
    }

    /// The public key from its raw 32 bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The text form: `x25519:` and 43 base64url characters.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }

    /// The fingerprint a sender pins and people compare over the phone.
    pub fn fingerprint(&self) -> Fingerprint {
        let digest = Sha256::new()
            .chain_update(FINGERPRINT_LABEL)
            .chain_update(self.0)
            .finalize();
        let mut bytes = [0u8; FINGERPRINT_LEN];
        bytes.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        Fingerprint(bytes)
    }

    /// The public key as HPKE uses it.
    pub(super) fn hpke_public(&self) -> <KemSuite as Kem>::PublicKey {
        <KemSuite as Kem>::PublicKey::from_bytes(&self.0).expect("an X25519 public key is 32 bytes")
    }
}

/// The first 20 bytes of SHA-256("cloudpdi facility key" || public key): 160 bits, so no
/// one can make a second key with the same fingerprint. Shown as 8 groups of 4 Crockford
/// base32 symbols (`7KQ2-M9XD-...`).
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut symbols = Vec::with_capacity(FINGERPRINT_SYMBOLS);
        let mut acc: u16 = 0;
        let mut bits = 0;
        for &byte in &self.0 {
            acc = (acc << 8) | u16::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                symbols.push(BASE32[usize::from((acc >> bits) & 31)]);
            }
            acc &= (1 << bits) - 1;
        }
        for (i, group) in symbols.chunks(FINGERPRINT_GROUP).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl Fingerprint {
    /// Parses a fingerprint as a person may type it: case, spaces and hyphens ignored,
    /// `O` read as `0`, `I` and `L` as `1`.
    ///
    /// # Errors
    /// [`KeyError::Fingerprint`] saying what is wrong.
    pub fn parse(text: &str) -> Result<Fingerprint, KeyError> {
        if text.len() > 4 * FINGERPRINT_SYMBOLS {
            return Err(KeyError::Fingerprint("the text is too long"));
        }
        let mut out = [0u8; FINGERPRINT_LEN];
        let mut count = 0;
        let mut acc: u16 = 0;
        let mut bits = 0;
        for c in text.chars().filter(|c| !c.is_whitespace() && *c != '-') {
            let c = match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                other => other,
            };
            let value =
                BASE32
                    .iter()
                    .position(|&a| char::from(a) == c)
                    .ok_or(KeyError::Fingerprint(
                        "a character is not one of 0-9 and A-Z without U",
                    ))?;
            count += 1;
            if count > FINGERPRINT_SYMBOLS {
                return Err(KeyError::Fingerprint("it has more than 32 characters"));
            }
            acc = (acc << 5) | u16::try_from(value).unwrap_or(0);
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out[(count * 5) / 8 - 1] = u8::try_from((acc >> bits) & 0xff).unwrap_or(0);
                acc &= (1 << bits) - 1;
            }
        }
        if count != FINGERPRINT_SYMBOLS {
            return Err(KeyError::Fingerprint("it has fewer than 32 characters"));
        }
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_text_round_trips_and_is_strict() {
        let key = FacilityKey::generate().expect("key");
        let public = key.public();
        let text = public.to_text();
        assert_eq!(text.len(), 7 + 43, "{text}");
        assert_eq!(PublicKey::parse(&text).expect("parse"), public);
        assert_eq!(
            PublicKey::parse(&format!("  {text}\n")).expect("spaces"),
            public
        );
        let body = &text[7..];
        for bad in [
            String::new(),
            body.to_owned(),
            format!("x448:{body}"),
            format!("x25519:{}", &body[1..]),
            format!("x25519:{body}A"),
            format!("x25519:{body}="),
            format!("x25519:{}+", &body[1..]),
        ] {
            assert!(
                matches!(PublicKey::parse(&bad), Err(KeyError::PublicKey(_))),
                "{bad:?}"
            );
        }
        // The last character carries 4 unused bits: a non-canonical spelling is refused,
        // so one key has one text.
        let last = body.as_bytes()[42];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let index = alphabet.iter().position(|&a| a == last).expect("base64url");
        let other = alphabet[(index & !0xf) | ((index + 1) & 0xf)];
        let non_canonical = format!("x25519:{}{}", &body[..42], char::from(other));
        assert!(PublicKey::parse(&non_canonical).is_err(), "{non_canonical}");
    }

    #[test]
    fn fingerprints_read_over_the_phone() {
        let public = PublicKey::from_bytes([7; 32]);
        let fingerprint = public.fingerprint();
        let text = fingerprint.to_string();
        assert_eq!(text.len(), 8 * 4 + 7, "{text}");
        assert_eq!(text.split('-').count(), 8);
        assert!(text.bytes().all(|b| b == b'-' || BASE32.contains(&b)));
        assert_eq!(Fingerprint::parse(&text).expect("parse"), fingerprint);
        let spoken = text.to_lowercase().replace('-', " ").replace('0', "o");
        let spoken = spoken.replace('1', "l");
        assert_eq!(Fingerprint::parse(&spoken).expect("spoken"), fingerprint);
        assert_ne!(PublicKey::from_bytes([8; 32]).fingerprint(), fingerprint);
        for bad in [
            "",
            &text[..text.len() - 1],
            &format!("{text}0"),
            &text.replacen(|c: char| c.is_ascii_alphanumeric(), "U", 1),
            &"0".repeat(1000),
        ] {
            assert!(
                matches!(Fingerprint::parse(bad), Err(KeyError::Fingerprint(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fingerprint_is_the_labelled_hash() {
        let public = PublicKey::from_bytes([0; 32]);
        let mut hasher = Sha256::new();
        hasher.update(b"cloudpdi facility key");
        hasher.update([0u8; 32]);
        let digest = hasher.finalize();
        assert_eq!(public.fingerprint().0, digest[..20]);
        // Crockford base32 of 160 bits, most significant bit first.
        let all_ones = Fingerprint([0xff; 20]).to_string();
        assert_eq!(all_ones, "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ");
        let mut one = [0u8; 20];
        one[19] = 1;
        assert_eq!(
            Fingerprint(one).to_string(),
            "0000-0000-0000-0000-0000-0000-0000-0001"
        );
        assert_eq!(
            Fingerprint::parse("0000-0000-0000-0000-0000-0000-0000-0001").expect("parse"),
            Fingerprint(one)
        );
    }

    #[test]
    fn key_files_are_private_and_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("facility.key");
        let key = FacilityKey::generate().expect("key");
        key.save_new(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = FacilityKey::load(&path).expect("load");
        assert_eq!(loaded.public(), key.public());
        let err = FacilityKey::generate()
            .expect("key")
            .save_new(&path)
            .expect_err("overwrite");
        assert!(
            matches!(&err, KeyError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(
            FacilityKey::load(&path).expect("kept").public(),
            key.public()
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = FacilityKey::load(&path).expect_err("group-readable");
        assert!(
            matches!(err, KeyError::Readable { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).expect("chmod");
        assert!(matches!(
            FacilityKey::load(&path),
            Err(KeyError::Readable { .. })
        ));
    }

    #[test]
    fn key_file_errors_hold_no_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("facility.key");
        let key = FacilityKey::generate().expect("key");
        key.save_new(&path).expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        let secret = text
            .lines()
            .find_map(|l| l.strip_prefix(PRIVATE_PREFIX))
            .expect("key line")
            .to_owned();
        for (name, content) in [
            ("truncated", text.replace(&secret, &secret[..40])),
            ("two keys", format!("{text}{text}")),
            ("public key", format!("{}\n", key.public().to_text())),
            ("empty", String::new()),
            ("large", "#".repeat(5000)),
        ] {
            let bad = dir.path().join(name);
            crate::durable::write(&bad, content.as_bytes(), 0o600).expect("write");
            let err = FacilityKey::load(&bad).expect_err(name);
            assert!(matches!(err, KeyError::KeyFile { .. }), "{name}: {err}");
            assert!(!err.to_string().contains(&secret[..20]), "{name}: {err}");
        }
        assert_eq!(format!("{key:?}"), "FacilityKey(..)");
        assert!(!format!("{:?}", KeyError::KeyFile { path: path.clone() }).contains(&secret));
        let missing = FacilityKey::load(&dir.path().join("none")).expect_err("missing");
        assert!(matches!(missing, KeyError::Io { .. }), "{missing}");
        assert!(matches!(
            FacilityKey::load(dir.path()),
            Err(KeyError::KeyFile { .. })
        ));
    }
}
