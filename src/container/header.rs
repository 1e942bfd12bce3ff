//! The container header: 48 bytes in front of the chunks, bound to every chunk as AAD.
//!
//! ```text
//! offset size field
//!      0    8 magic "CLOUDPDI"
//!      8    1 format version (1)
//!      9    1 algorithm (1 = AES-256-GCM, STREAM with 12-byte nonces)
//!     10    1 compression inside the encryption (0 = none, 1 = zstd)
//!     11    1 log2 of the chunk size (16..=24: 64 KiB ..= 16 MiB)
//!     12    4 reserved, zero
//!     16   32 salt: random per file; the payload key is HKDF(container key, salt)
//! ```

use super::ContainerError;

/// Magic bytes that open every container.
pub const MAGIC: &[u8; 8] = b"CLOUDPDI";
/// Length of the encoded header.
pub const HEADER_LEN: usize = 48;
/// The only format version so far.
pub const VERSION: u8 = 1;
/// AES-256-GCM in the STREAM construction.
pub const ALGORITHM_AES256GCM: u8 = 1;
/// Smallest and largest chunk sizes (log2).
pub const CHUNK_LOG2_RANGE: std::ops::RangeInclusive<u8> = 16..=24;

/// Compression applied to the plaintext before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (a PDI ZIP of compressed images gains little).
    None,
    /// zstd: worthwhile for uncompressed CT/MR pixel data.
    Zstd,
}

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Compression inside the encryption.
    pub compression: Compression,
    /// log2 of the plaintext chunk size.
    pub chunk_log2: u8,
    /// Per-file salt of the payload key.
    pub salt: [u8; 32],
}

impl Header {
    /// Plaintext bytes per chunk (the last chunk may be shorter).
    pub fn chunk_size(&self) -> usize {
        1 << self.chunk_log2
    }

    /// The 48 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8] = VERSION;
        out[9] = ALGORITHM_AES256GCM;
        out[10] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        };
        out[11] = self.chunk_log2;
        out[16..].copy_from_slice(&self.salt);
        out
    }

    /// Parses and validates 48 header bytes.
    ///
    /// # Errors
    /// [`ContainerError::NotAContainer`] or [`ContainerError::Unsupported`].
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, ContainerError> {
        if &bytes[..8] != MAGIC {
            return Err(ContainerError::NotAContainer);
        }
        let unsupported = |what: String| Err(ContainerError::Unsupported(what));
        if bytes[8] != VERSION {
            return unsupported(format!("format version {}", bytes[8]));
        }
        if bytes[9] != ALGORITHM_AES256GCM {
            return unsupported(format!("algorithm {}", bytes[9]));
        }
        let compression = match bytes[10] {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return unsupported(format!("compression {other}")),
        };
        if !CHUNK_LOG2_RANGE.contains(&bytes[11]) {
            return unsupported(format!("chunk size 2^{}", bytes[11]));
        }
        if bytes[12..16] != [0; 4] {
            return unsupported("reserved header bytes set".into());
        }
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&bytes[16..]);
        Ok(Header {
            compression,
            chunk_log2: bytes[11],
            salt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_what_it_does_not_know() {
        let header = Header {
            compression: Compression::Zstd,
            chunk_log2: 20,
            salt: [7; 32],
        };
        let bytes = header.encode();
        assert_eq!(Header::decode(&bytes).expect("valid"), header);
        for (at, value) in [
            (0, b'X'),
            (8, 2),
            (9, 2),
            (10, 9),
            (11, 15),
            (11, 25),
            (13, 1),
        ] {
            let mut bad = bytes;
            bad[at] = value;
            assert!(Header::decode(&bad).is_err(), "byte {at} = {value}");
        }
    }
}
