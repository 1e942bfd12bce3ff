//! Facility keys and sealed delivery: how one hospital hands a token to another without
//! paper, and the receiver knows who sent it.
//!
//! Every facility has an X25519 key pair ([`key`]): the private key stays in a file only
//! its owner can read (`cloudpdi facility keygen`), the public key is registered at the
//! repository by its operator and pinned by the other facilities through its
//! [`key::Fingerprint`], read over the phone. A token is sealed to a recipient with HPKE
//! (RFC 9180) in authenticated mode ([`mod@seal`]): only the recipient's private key opens it,
//! and it opens only with the sender's public key, so the recipient knows who sent it.
//! The repository carries the sealed bytes in the recipient's mailbox and can read none
//! of them.
//!
//! - [`key`]: the key pair, its key file, the public key's text form and fingerprint;
//! - [`mod@seal`]: the sealed message (`CPDS` envelope) and its bounds;
//! - [`cli`]: `cloudpdi facility keygen` and `show`.

pub mod cli;
pub mod key;
pub mod seal;

pub use key::{FacilityKey, Fingerprint, KeyError, PublicKey};
pub use seal::{SealError, open, seal};

/// Longest facility code (the name in `[facility.CODE]` of the repository and in
/// `deliver_to`, `accept_from` of the gateway).
pub const MAX_CODE_LEN: usize = 32;

/// Whether `code` is a facility code: 1 to [`MAX_CODE_LEN`] characters of `A-Z a-z 0-9 _ -`,
/// so it can name a storage folder, a header value and an audit field as it is.
pub fn is_code(code: &str) -> bool {
    (1..=MAX_CODE_LEN).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_strict() {
        for good in ["B", "HOSP_A", "a-1", &"X".repeat(32)] {
            assert!(is_code(good), "{good:?}");
        }
        for bad in ["", "..", "a/b", "A B", "é", &"X".repeat(33), "a\0"] {
            assert!(!is_code(bad), "{bad:?}");
        }
    }
}
