//! Who may do what: facilities (API key or client certificate) create, upload, complete,
//! ask for status and revoke; a receiver downloads and sends a receipt by showing the
//! token's download proof. The server keeps only SHA-256 hashes of keys and proofs.
//!
//! API keys are 256 random bits, so a plain SHA-256 is enough to store them (no password
//! stretching is needed for keys nobody chose).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::repository::api::hex32;
use crate::repository::config::FacilityConfig;

/// Prefix of API keys, so a leaked one is recognisable in a scanner.
pub const API_KEY_PREFIX: &str = "cpdi_";

/// Addresses remembered by the failed-proof limiter at most; beyond, stale ones go first
/// and then the oldest, so a flood of addresses cannot exhaust memory.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// Why a key cannot be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The OS did not provide randomness.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// A new API key (shown once to the operator) and the hash for the configuration.
///
/// # Errors
/// [`AuthError::Random`] without OS entropy.
pub fn new_api_key() -> Result<(Zeroizing<String>, String), AuthError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).map_err(|e| AuthError::Random(e.to_string()))?;
    let key = Zeroizing::new(format!("{API_KEY_PREFIX}{}", hex::encode(bytes.as_ref())));
    let hash = api_key_hash(&key);
    Ok((key, hash))
}

/// SHA-256 (hex) of an API key, as written in `facility.NAME.api_key_sha256`.
pub fn api_key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

/// Compares two 32-byte values in constant time.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The facilities allowed to upload, looked up by key hash or certificate hash.
#[derive(Debug, Default)]
pub struct Facilities {
    by_key: HashMap<[u8; 32], String>,
    by_cert: HashMap<[u8; 32], String>,
}

impl Facilities {
    /// Builds the lookup from the (validated) configuration.
    pub fn new<'a>(facilities: impl IntoIterator<Item = (&'a String, &'a FacilityConfig)>) -> Self {
        let mut table = Facilities::default();
        for (name, facility) in facilities {
            if let Some(hash) = hex32::parse(&facility.api_key_sha256) {
                table.by_key.insert(hash, name.clone());
            }
            if let Some(hash) = hex32::parse(&facility.client_cert_sha256) {
                table.by_cert.insert(hash, name.clone());
            }
        }
        table
    }

    /// The facility holding this API key.
    pub fn by_api_key(&self, key: &str) -> Option<&str> {
        let hash: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        self.by_key.get(&hash).map(String::as_str)
    }

    /// The facility holding the client certificate with this DER SHA-256.
    pub fn by_certificate(&self, cert_sha256: &[u8; 32]) -> Option<&str> {
        self.by_cert.get(cert_sha256).map(String::as_str)
    }
}

/// Counts failed download proofs per address and blocks an address that guesses.
///
/// Per server: with N servers behind a load balancer, an address gets up to N times the
/// limit, which with 256-bit proofs still makes guessing hopeless; the limit is there to
/// make scanning loud and slow, not to protect the proof.
#[derive(Debug)]
pub struct ProofLimiter {
    limit: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl ProofLimiter {
    /// `limit` failures per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        ProofLimiter {
            limit,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `addr` is blocked now.
    pub fn is_blocked(&self, addr: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures
            .get(&addr)
            .is_some_and(|(count, since)| *count >= self.limit && since.elapsed() < self.window)
    }

    /// Records one failed proof from `addr`.
    pub fn record_failure(&self, addr: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_ADDRESSES && !failures.contains_key(&addr) {
            let window = self.window;
            failures.retain(|_, (_, since)| since.elapsed() < window);
            if failures.len() >= MAX_TRACKED_ADDRESSES
                && let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(a, _)| *a)
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(addr).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 = entry.0.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_their_hash_only() {
        let (key, hash) = new_api_key().expect("key");
        assert!(key.starts_with(API_KEY_PREFIX));
        let config = FacilityConfig {
            api_key_sha256: hash,
            client_cert_sha256: String::new(),
        };
        let name = "HOSP_A".to_owned();
        let table = Facilities::new([(&name, &config)]);
        assert_eq!(table.by_api_key(&key), Some("HOSP_A"));
        assert_eq!(table.by_api_key("cpdi_00"), None);
    }

    #[test]
    fn limiter_blocks_after_the_limit_and_forgets_after_the_window() {
        let limiter = ProofLimiter::new(2, Duration::from_millis(50));
        let addr = IpAddr::from([127, 0, 0, 1]);
        limiter.record_failure(addr);
        assert!(!limiter.is_blocked(addr));
        limiter.record_failure(addr);
        assert!(limiter.is_blocked(addr));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!limiter.is_blocked(addr));
    }

    #[test]
    fn constant_time_compare() {
        assert!(same_hash(&[1; 32], &[1; 32]));
        assert!(!same_hash(&[1; 32], &[2; 32]));
    }
}
