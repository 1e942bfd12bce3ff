//! Key material of the container, zeroized when dropped and never printed.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// HKDF info label of the per-file payload key.
const PAYLOAD_INFO: &[u8] = b"cloudpdi container payload v1";

/// The 256-bit key that opens a container; derived from the token's secret by the token
/// module, or given to `cloudpdi encrypt` by an operator.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ContainerKey([u8; 32]);

impl ContainerKey {
    /// Wraps key bytes (the caller should zeroize its own copy).
    pub fn from_bytes(bytes: [u8; 32]) -> ContainerKey {
        ContainerKey(bytes)
    }

    /// The per-file payload key: HKDF-SHA-256 with the header's random salt, so no two
    /// containers are ever sealed under the same key and nonces cannot repeat.
    pub fn payload_key(&self, salt: &[u8; 32]) -> PayloadKey {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &self.0)
            .expand(PAYLOAD_INFO, &mut out)
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        PayloadKey(out)
    }
}

impl fmt::Debug for ContainerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContainerKey(..)")
    }
}

/// The key one container's chunks are sealed with.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct PayloadKey([u8; 32]);

impl PayloadKey {
    /// The raw bytes, for the cipher.
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Debug for PayloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PayloadKey(..)")
    }
}
