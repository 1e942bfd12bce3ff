//! `cloudpdi facility keygen` and `show` as an operator runs them (the real binary, real
//! files), and tokens sealed between keys made that way.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::text;

use cloudpdi::facility::{FacilityKey, Fingerprint, PublicKey, SealError, open, seal};

fn cloudpdi(args: &[&str], file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

/// The value printed after `label` on its own line.
fn printed(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
        .trim()
        .to_owned()
}

#[test]
fn keygen_writes_a_private_key_once_and_show_prints_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("b.key");
    let out = cloudpdi(&["facility", "keygen", "--out"], &key);
    assert!(out.status.success(), "{}", text(&out));
    let made = text(&out);
    let public = printed(&made, "public key:");
    let fingerprint = printed(&made, "fingerprint:");
    let parsed = PublicKey::parse(&public).unwrap();
    assert_eq!(parsed.fingerprint().to_string(), fingerprint);
    assert_eq!(
        Fingerprint::parse(&fingerprint).unwrap(),
        parsed.fingerprint()
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The private key is in the file, never on the screen.
    let file = std::fs::read_to_string(&key).unwrap();
    let secret = file
        .lines()
        .find_map(|l| l.strip_prefix("x25519-private:"))
        .unwrap();
    assert!(!made.contains(secret), "{made}");
    assert_eq!(FacilityKey::load(&key).unwrap().public(), parsed);

    // Never overwritten.
    let again = cloudpdi(&["facility", "keygen", "--out"], &key);
    assert!(!again.status.success());
    assert!(text(&again).contains("exists"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), file);

    let shown = cloudpdi(&["facility", "show", "--key"], &key);
    assert!(shown.status.success(), "{}", text(&shown));
    assert_eq!(printed(&text(&shown), "public key:"), public);
    assert_eq!(printed(&text(&shown), "fingerprint:"), fingerprint);
    assert!(!text(&shown).contains(secret));

    // A key others may read is refused, with the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = cloudpdi(&["facility", "show", "--key"], &key);
    assert!(!refused.status.success());
    let message = text(&refused);
    assert!(message.contains("chmod 600"), "{message}");
    assert!(!message.contains(secret), "{message}");
}

#[test]
fn tokens_sealed_between_generated_keys_open_only_for_their_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    for name in ["a", "b", "c"] {
        let path = dir.path().join(format!("{name}.key"));
        let out = cloudpdi(&["facility", "keygen", "--out"], &path);
        assert!(out.status.success(), "{}", text(&out));
        keys.push(FacilityKey::load(&path).unwrap());
    }
    let (a, b, c) = (&keys[0], &keys[1], &keys[2]);
    let token = b"HT2-0000-TOKEN-TEXT-FOR-B";
    let sealed = seal(a, "A", &b.public(), "B", token).unwrap();
    assert!(!sealed.windows(token.len()).any(|w| w == token));
    assert_eq!(
        open(b, "B", &a.public(), "A", &sealed).unwrap().as_slice(),
        token
    );
    assert_eq!(
        open(c, "B", &a.public(), "A", &sealed),
        Err(SealError::Open)
    );
    assert_eq!(
        open(c, "C", &a.public(), "A", &sealed),
        Err(SealError::Open)
    );
    assert_eq!(
        open(b, "B", &c.public(), "C", &sealed),
        Err(SealError::Open)
    );
}
