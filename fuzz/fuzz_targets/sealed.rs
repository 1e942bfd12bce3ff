//! Sealed tokens (`facility::seal::open`, from any facility through the repository's
//! mailbox), and the key texts a facility reads from the repository's directory or its
//! configuration (`PublicKey::parse`, `Fingerprint::parse`).
//!
//! Input: one byte choosing what, then:
//! - 0: bytes opened as a sealed message with fixed keys; they never open (no one but the
//!   fixed sender could have sealed them), and never panic;
//! - 1: a plaintext sealed with the fixed keys, then one byte changed at a position and
//!   with a mask taken from the input: the original opens to the plaintext, the changed
//!   copy is refused;
//! - 2: text parsed as a public key and as a fingerprint; what parses prints to text that
//!   parses to the same.
#![no_main]

use cloudpdi::facility::{FacilityKey, Fingerprint, PublicKey, open, seal, seal::MAX_PLAINTEXT};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// The sender's and the recipient's keys, made once per process.
fn keys() -> &'static (FacilityKey, FacilityKey) {
    static KEYS: OnceLock<(FacilityKey, FacilityKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            FacilityKey::generate().expect("key"),
            FacilityKey::generate().expect("key"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (sender, recipient) = keys();
    match selector % 3 {
        0 => {
            assert!(open(recipient, "B", &sender.public(), "A", rest).is_err());
        }
        1 => {
            let Some((&mask, rest)) = rest.split_first() else {
                return;
            };
            let Some((&position, plaintext)) = rest.split_first() else {
                return;
            };
            if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
                assert!(seal(sender, "A", &recipient.public(), "B", plaintext).is_err());
                return;
            }
            let sealed = seal(sender, "A", &recipient.public(), "B", plaintext).expect("seals");
            let opened = open(recipient, "B", &sender.public(), "A", &sealed).expect("opens");
            assert_eq!(opened.as_slice(), plaintext);
            let mut changed = sealed.clone();
            let at = usize::from(position) * changed.len() / 256;
            changed[at] ^= mask.max(1);
            assert!(open(recipient, "B", &sender.public(), "A", &changed).is_err());
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(public) = PublicKey::parse(text) {
                assert_eq!(PublicKey::parse(&public.to_text()).expect("reads back"), public);
            }
            if let Ok(fingerprint) = Fingerprint::parse(text) {
                let again = Fingerprint::parse(&fingerprint.to_string()).expect("reads back");
                assert_eq!(again, fingerprint);
            }
        }
    }
});
