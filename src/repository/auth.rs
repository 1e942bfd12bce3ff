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
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::repository::api::hex32;
use crate::repository::config::FacilityConfig;

/// Prefix of API keys, so a leaked one is recognisable in a scanner.
pub const API_KEY_PREFIX: &str = "cpdi_";

/// (document, client) pairs remembered by the failed-proof limiter at most; beyond, stale
/// ones go first and then the oldest, so a flood of addresses cannot exhaust memory.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// Addresses read from one `X-Forwarded-For` header at most (a proxy chain is short; a
/// client can prepend anything, so the list is read from the right and cut here).
const MAX_FORWARDED_HOPS: usize = 16;

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

/// Compares two 32-byte values in constant time (`subtle`), so the time a comparison
/// takes tells nothing about how much of a guessed proof was right.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
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

/// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` header is believed: a load
/// balancer or TLS proxy in front of the repository. From any other peer the header is
/// ignored, since a client can write whatever it likes there.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `server.trusted_proxies` entries: `10.0.0.5`, `10.0.0.0/8`, `::1`, `fd00::/8`.
    ///
    /// # Errors
    /// The entry that is neither an address nor an address/prefix.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<TrustedProxies, String> {
        let mut nets = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_ref().trim();
            let (addr, prefix) = match entry.split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (entry, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| entry.to_owned())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or(entry)?,
            };
            nets.push((addr, prefix));
        }
        Ok(TrustedProxies(nets))
    }

    /// Whether `addr` is one of the trusted proxies.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.0
            .iter()
            .any(|&(net, prefix)| match (canonical(net), addr) {
                (IpAddr::V4(net), IpAddr::V4(a)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                    u32::from(net) & mask == u32::from(a) & mask
                }
                (IpAddr::V6(net), IpAddr::V6(a)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                    u128::from(net) & mask == u128::from(a) & mask
                }
                _ => false,
            })
    }

    /// The client behind a request from `peer`: `peer` itself, unless `peer` is a trusted
    /// proxy, in which case the `X-Forwarded-For` list is read from the right, skipping
    /// trusted proxies, and the first other address is the client. A malformed header
    /// leaves the last trusted hop as the client.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&[u8]>) -> IpAddr {
        let mut client = canonical(peer);
        if !self.contains(client) {
            return client;
        }
        let Some(list) = forwarded_for.and_then(|v| std::str::from_utf8(v).ok()) else {
            return client;
        };
        for hop in list.rsplit(',').take(MAX_FORWARDED_HOPS) {
            let Ok(hop) = hop.trim().parse::<IpAddr>() else {
                return client;
            };
            client = canonical(hop);
            if !self.contains(client) {
                return client;
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so one client has one key.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// Counts failed download proofs per (document, client) and blocks that pair once it has
/// guessed `limit` times within the window.
///
/// Per document and client, so that behind a NAT or a load balancer (with
/// `trusted_proxies`) one guesser blocks itself, not every receiver of every document;
/// the right proof from another client keeps working. Per server: with N servers behind
/// a load balancer, a client gets up to N times the limit, which with 256-bit proofs
/// still makes guessing hopeless; the limit is there to make scanning loud and slow, not
/// to protect the proof.
#[derive(Debug)]
pub struct ProofLimiter {
    limit: u32,
    window: Duration,
    failures: Mutex<HashMap<(String, IpAddr), (u32, Instant)>>,
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

    /// Whether `client` is blocked now for `document`.
    pub fn is_blocked(&self, document: &str, client: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures
            .get(&(document.to_owned(), client))
            .is_some_and(|(count, since)| *count >= self.limit && since.elapsed() < self.window)
    }

    /// Records one failed proof from `client` for `document`.
    pub fn record_failure(&self, document: &str, client: IpAddr) {
        let key = (document.to_owned(), client);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_ADDRESSES && !failures.contains_key(&key) {
            let window = self.window;
            failures.retain(|_, (_, since)| since.elapsed() < window);
            if failures.len() >= MAX_TRACKED_ADDRESSES
                && let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| k.clone())
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(key).or_insert((0, Instant::now()));
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
            ..FacilityConfig::default()
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
        let other = IpAddr::from([127, 0, 0, 2]);
        limiter.record_failure("d", addr);
        assert!(!limiter.is_blocked("d", addr));
        limiter.record_failure("d", addr);
        assert!(limiter.is_blocked("d", addr));
        assert!(
            !limiter.is_blocked("d", other),
            "another client is not blocked"
        );
        assert!(
            !limiter.is_blocked("e", addr),
            "another document is not blocked"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(!limiter.is_blocked("d", addr));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8", "::1"]).expect("parse");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let xff = Some(&b"6.6.6.6, 192.0.2.7, 10.1.1.1"[..]);
        assert_eq!(proxies.client(ip("10.0.0.5"), xff), ip("192.0.2.7"));
        assert_eq!(proxies.client(ip("::1"), xff), ip("192.0.2.7"));
        assert_eq!(proxies.client(ip("192.0.2.9"), xff), ip("192.0.2.9"));
        assert_eq!(proxies.client(ip("10.0.0.5"), None), ip("10.0.0.5"));
        assert_eq!(
            proxies.client(ip("10.0.0.5"), Some(&b"junk"[..])),
            ip("10.0.0.5")
        );
        assert_eq!(proxies.client(ip("::ffff:192.0.2.9"), xff), ip("192.0.2.9"));
        assert!(TrustedProxies::parse(&["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::parse(&["example.org"]).is_err());
        assert!(
            TrustedProxies::parse(&["0.0.0.0/0"])
                .expect("all")
                .contains(ip("1.2.3.4"))
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(same_hash(&[1; 32], &[1; 32]));
        assert!(!same_hash(&[1; 32], &[2; 32]));
    }
}
