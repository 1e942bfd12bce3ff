//! Settings of `cloudpdi repository serve`, with every default in one place.
//!
//! The file is `conf/repository.toml` (every key present and commented there); any key
//! can be overridden from the environment as `CLOUDPDI_REPO_<SECTION>__<KEY>`, e.g.
//! `CLOUDPDI_REPO_SERVER__LISTEN=0.0.0.0:8443` or `CLOUDPDI_REPO_STORAGE__BUCKET=pdi`.
//! S3 credentials come from the usual `AWS_*` variables (or the `storage` keys set through
//! the environment), never from this file.
//!
//! `cloudpdi repository serve` finds the file in this order: `--config`, the
//! `CLOUDPDI_REPO_CONFIG` variable, `conf/repository.toml` when it exists (a checkout),
//! else `/etc/cloudpdi/repository.toml`; see [`default_path`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::LogConfig;

/// The environment variable naming the repository's configuration file.
pub const CONFIG_ENV: &str = "CLOUDPDI_REPO_CONFIG";

/// The repository's configuration file when neither `--config` nor [`CONFIG_ENV`] names
/// one: `conf/repository.toml` when it exists (a checkout), else
/// `/etc/cloudpdi/repository.toml` (`systemd/cloudpdi-repository.service`).
pub fn default_path() -> PathBuf {
    crate::config::first_existing("conf/repository.toml", "/etc/cloudpdi/repository.toml")
}

/// Why the repository configuration cannot be used; the message names the key to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryConfigError {
    /// The file, an environment variable or a key (with its value and where it came
    /// from) could not be read.
    #[error("repository configuration: {0}")]
    Load(#[from] crate::config::LoadError),
    /// A value is well-formed but not usable.
    #[error("invalid repository configuration: {0}")]
    Invalid(String),
}

/// The whole repository configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepositoryConfig {
    /// HTTP listener, limits and timing.
    pub server: ServerConfig,
    /// TLS (off when no certificate is given).
    pub tls: TlsConfig,
    /// Where documents are kept.
    pub storage: StorageConfig,
    /// The append-only audit trail.
    pub audit: AuditConfig,
    /// Log output.
    pub log: LogConfig,
    /// Facilities allowed to upload, by facility code.
    pub facility: BTreeMap<String, FacilityConfig>,
}

/// HTTP listener, limits and timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest document accepted, in MiB.
    pub max_document_mb: u64,
    /// Part size in MiB: on S3 a part is held in memory while it is stored (on local
    /// files it goes to disk as it arrives).
    pub part_size_mb: u64,
    /// Part uploads handled at once (on S3 each holds up to one part in memory); more wait.
    pub max_concurrent_uploads: usize,
    /// Longest expiry a facility may ask for, in days from now.
    pub max_expiry_days: u64,
    /// Highest `max_downloads` a facility may ask for.
    pub max_downloads_limit: u32,
    /// Seconds a client may stay silent while sending a request body.
    pub body_idle_timeout: u64,
    /// Seconds between sweeps that delete expired content.
    pub sweep_interval: u64,
    /// Days an expired or revoked document's metadata and receipts stay for the sender's
    /// status calls before they are deleted too.
    pub tombstone_days: u64,
    /// Failed download proofs for one document from one client within
    /// `failed_proof_window` seconds after which that client is answered 429 for that
    /// document until the window ends (other clients and documents are not affected).
    pub failed_proofs_per_window: u32,
    /// Length of the failed-proof window, in seconds.
    pub failed_proof_window: u64,
    /// Seconds after a download began during which it may be resumed (a range not
    /// starting at byte 0); later, such a request counts as a new download.
    pub download_resume_window: u64,
    /// Resumes allowed per download; beyond, a request counts as a new download. With
    /// `max_downloads` this bounds what one token can fetch.
    pub max_resumes_per_download: u32,
    /// Seconds a client has to send a request's headers, also between keep-alive requests
    /// (slow clients hold sockets); 25 to 3600, above the client's 20 s idle pool.
    pub header_timeout: u64,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections one client address may hold at once; further ones from it are closed
    /// at once, so one host cannot take every slot (1 to `max_connections`).
    pub max_connections_per_address: usize,
    /// Addresses or CIDR blocks of load balancers / TLS proxies in front of the server,
    /// whose `X-Forwarded-For` names the client; from other peers it is ignored.
    pub trusted_proxies: Vec<String>,
}

/// TLS settings; plain HTTP when `cert` is empty (loopback, or behind a TLS proxy).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// Server private key, PEM.
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that sign facilities' client certificates; when set, a
    /// client certificate is asked for (optional: API keys keep working).
    pub client_ca: Option<PathBuf>,
}

/// Which object store holds documents.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A folder on the local file system (`storage.path`).
    Local,
    /// An S3-compatible bucket (`storage.bucket`, `storage.endpoint`, ...).
    S3,
}

/// Storage settings (`Debug` leaves out the secret key).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` or `s3`.
    pub backend: Backend,
    /// Folder of the local backend (created if missing).
    pub path: PathBuf,
    /// S3 bucket name.
    pub bucket: String,
    /// S3 region.
    pub region: String,
    /// S3 endpoint URL for S3-compatible stores; empty for AWS itself.
    pub endpoint: String,
    /// Allow `http://` endpoints (only for a store on the same host or private network).
    pub allow_http: bool,
    /// Key prefix inside the bucket, so one bucket can hold several repositories.
    pub prefix: String,
    /// S3 access key ID; empty to take `AWS_ACCESS_KEY_ID` (or the instance's role).
    pub access_key_id: String,
    /// S3 secret key; empty to take `AWS_SECRET_ACCESS_KEY`. Set it through the
    /// environment (`CLOUDPDI_REPO_STORAGE__SECRET_ACCESS_KEY`), not in the file.
    pub secret_access_key: String,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("allow_http", &self.allow_http)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Audit trail settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON-lines file, opened append-only; each line is synced before the answer.
    pub path: PathBuf,
}

/// One facility allowed to upload, and its entry in the directory of facilities.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FacilityConfig {
    /// SHA-256 (hex) of the facility's API key (`cloudpdi repository new-key`).
    pub api_key_sha256: String,
    /// SHA-256 (hex) of the facility's client certificate (DER), when it uses one.
    pub client_cert_sha256: String,
    /// The facility's name, for people (at most [`MAX_FACILITY_NAME`] bytes).
    pub name: String,
    /// The facility's public key (`x25519:...`, from `cloudpdi facility keygen` at the
    /// facility), registered by the repository's operator; empty when the facility takes
    /// no sealed deliveries (it is then not in the directory).
    pub public_key: String,
}

/// Longest facility name in the directory (bytes).
pub const MAX_FACILITY_NAME: usize = 200;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8480)),
            max_document_mb: 16 * 1024,
            part_size_mb: 8,
            max_concurrent_uploads: 16,
            max_expiry_days: 180,
            max_downloads_limit: 100,
            body_idle_timeout: 60,
            sweep_interval: 60,
            tombstone_days: 30,
            failed_proofs_per_window: 20,
            failed_proof_window: 600,
            download_resume_window: 24 * 3600,
            max_resumes_per_download: 20,
            header_timeout: 30,
            max_connections: 512,
            max_connections_per_address: 32,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Local,
            path: PathBuf::from("./data/repository"),
            bucket: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            allow_http: false,
            prefix: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: PathBuf::from("./data/repository-audit.jsonl"),
        }
    }
}

impl ServerConfig {
    /// Largest document in bytes.
    pub fn max_document_bytes(&self) -> u64 {
        self.max_document_mb.saturating_mul(1 << 20)
    }

    /// Part size in bytes.
    pub fn part_size(&self) -> u64 {
        self.part_size_mb.saturating_mul(1 << 20)
    }

    /// The body idle timeout as a duration.
    pub fn body_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.body_idle_timeout)
    }
}

impl RepositoryConfig {
    /// Loads `path` (TOML), applies `CLOUDPDI_REPO_<SECTION>__<KEY>` overrides, validates.
    ///
    /// # Errors
    /// [`RepositoryConfigError`] naming the file, the key, or the value to fix.
    pub fn load(path: &Path) -> Result<RepositoryConfig, RepositoryConfigError> {
        let (config, origins) = crate::config::load::<RepositoryConfig>(&crate::config::Sources {
            path,
            prefix: "CLOUDPDI_REPO_",
            skip: &[],
            named_tables: &["facility"],
            enums: &[
                crate::config::variants_of::<Backend>(),
                crate::config::variants_of::<crate::config::LogFormat>(),
            ],
        })?;
        config.validate().map_err(|e| match e {
            RepositoryConfigError::Invalid(message) => {
                RepositoryConfigError::Invalid(origins.locate(&message))
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Checks what serde cannot: sizes, facility keys, TLS pairs, S3 bucket.
    ///
    /// # Errors
    /// [`RepositoryConfigError::Invalid`] with the offending key.
    pub fn validate(&self) -> Result<(), RepositoryConfigError> {
        let invalid = |msg: &str| Err(RepositoryConfigError::Invalid(msg.to_owned()));
        let s = &self.server;
        if !(1..=256).contains(&s.part_size_mb) {
            return invalid("server.part_size_mb must be between 1 and 256");
        }
        if s.max_document_mb == 0 || s.max_document_mb / s.part_size_mb > 100_000 {
            return invalid("server.max_document_mb must be at least 1 and at most 100000 parts");
        }
        if s.max_concurrent_uploads == 0 || s.max_downloads_limit == 0 || s.max_expiry_days == 0 {
            return invalid(
                "server.max_concurrent_uploads, max_downloads_limit and max_expiry_days \
                 must be at least 1",
            );
        }
        if s.sweep_interval == 0 || s.body_idle_timeout == 0 || s.failed_proof_window == 0 {
            return invalid(
                "server.sweep_interval, body_idle_timeout and failed_proof_window \
                 must be at least 1 second",
            );
        }
        if !(25..=3600).contains(&s.header_timeout) {
            return invalid(
                "server.header_timeout must be between 25 and 3600 seconds (clients keep \
                 idle connections 20 s; the server must not close them first)",
            );
        }
        if !(1..=65_536).contains(&s.max_connections) {
            return invalid("server.max_connections must be between 1 and 65536");
        }
        if !(1..=s.max_connections).contains(&s.max_connections_per_address) {
            return invalid(
                "server.max_connections_per_address must be between 1 and server.max_connections",
            );
        }
        if let Err(entry) = crate::repository::auth::TrustedProxies::parse(&s.trusted_proxies) {
            return Err(RepositoryConfigError::Invalid(format!(
                "server.trusted_proxies: {entry:?} is not an address or address/prefix \
                 (e.g. \"10.0.0.5\" or \"10.0.0.0/8\")"
            )));
        }
        if s.max_resumes_per_download > 1000 {
            return invalid("server.max_resumes_per_download must be at most 1000");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls.cert and tls.key go together: set both or neither");
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return invalid("tls.client_ca needs tls.cert and tls.key");
        }
        if self.storage.backend == Backend::S3 && self.storage.bucket.is_empty() {
            return invalid("storage.backend = \"s3\" needs storage.bucket");
        }
        for (name, facility) in &self.facility {
            check_facility(name, facility)?;
        }
        Ok(())
    }
}

fn check_facility(name: &str, facility: &FacilityConfig) -> Result<(), RepositoryConfigError> {
    let invalid = |msg: String| Err(RepositoryConfigError::Invalid(msg));
    if !crate::facility::is_code(name) {
        return invalid(format!(
            "facility {name:?}: the code must be 1-32 characters of A-Z, a-z, 0-9, _ and -"
        ));
    }
    let is_hash = |h: &str| h.is_empty() || crate::repository::api::hex32::parse(h).is_some();
    if !is_hash(&facility.api_key_sha256) || !is_hash(&facility.client_cert_sha256) {
        return invalid(format!(
            "facility.{name}: api_key_sha256 and client_cert_sha256 are 64 hex digits \
             (make one with `cloudpdi repository new-key`)"
        ));
    }
    if facility.api_key_sha256.is_empty() && facility.client_cert_sha256.is_empty() {
        return invalid(format!(
            "facility.{name}: set api_key_sha256 or client_cert_sha256"
        ));
    }
    if facility.name.len() > MAX_FACILITY_NAME || facility.name.chars().any(char::is_control) {
        return invalid(format!(
            "facility.{name}.name: at most {MAX_FACILITY_NAME} bytes, without control characters"
        ));
    }
    if let Some(Err(e)) = (!facility.public_key.is_empty())
        .then(|| crate::facility::PublicKey::parse(&facility.public_key))
    {
        return invalid(format!(
            "facility.{name}.public_key: {e}; copy the line `cloudpdi facility show` prints \
             at the facility"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<RepositoryConfig, RepositoryConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.toml");
        std::fs::write(&path, toml).expect("write config");
        RepositoryConfig::load(&path)
    }

    #[test]
    fn shipped_file_loads() {
        let config = RepositoryConfig::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/conf/repository.toml"
        )))
        .expect("conf/repository.toml");
        assert_eq!(config.server.part_size(), 8 << 20);
        // Every section shows the defaults: the file says what the code does.
        assert_eq!(
            format!("{config:#?}"),
            format!("{:#?}", RepositoryConfig::default())
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse("[facility.A]\napi_key_sha256 = \"abc\"\n").expect_err("short hash");
        assert!(err.to_string().contains("facility.A"), "{err}");
        let err = parse("[tls]\ncert = \"c.pem\"\n").expect_err("cert without key");
        assert!(err.to_string().contains("tls.key"), "{err}");
        let err = parse("[storage]\nbackend = \"s3\"\n").expect_err("no bucket");
        assert!(err.to_string().contains("bucket"), "{err}");
        let err = parse("[server]\nlisen = \"1.2.3.4:1\"\n").expect_err("typo");
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = parse(&format!(
            "[facility.B]\napi_key_sha256 = \"{}\"\npublic_key = \"x25519:abc\"\n",
            "ab".repeat(32)
        ))
        .expect_err("short public key");
        assert!(err.to_string().contains("facility.B.public_key"), "{err}");
        assert!(err.to_string().contains("cloudpdi facility show"), "{err}");
        let err = parse(&format!(
            "[facility.B]\napi_key_sha256 = \"{}\"\nname = \"B\\nGeneral\"\n",
            "ab".repeat(32)
        ))
        .expect_err("control character in the name");
        assert!(err.to_string().contains("facility.B.name"), "{err}");
        let err = parse(&format!(
            "[facility.B]\napi_key_sha256 = \"{}\"\nname = \"{}\"\n",
            "ab".repeat(32),
            "B".repeat(MAX_FACILITY_NAME + 1)
        ))
        .expect_err("a name over the bound");
        assert!(err.to_string().contains("at most 200 bytes"), "{err}");
        let key = crate::facility::FacilityKey::generate().expect("key");
        let config = parse(&format!(
            "[facility.B]\napi_key_sha256 = \"{}\"\nname = \"B General Hospital\"\n\
             public_key = \"{}\"\n",
            "ab".repeat(32),
            key.public().to_text()
        ))
        .expect("a registered key");
        assert_eq!(config.facility["B"].public_key, key.public().to_text());
        for (setting, key) in [
            ("header_timeout = 0", "header_timeout"),
            ("header_timeout = 99999999999", "header_timeout"),
            ("max_connections = 0", "max_connections"),
            (
                "max_connections_per_address = 0",
                "max_connections_per_address",
            ),
            ("trusted_proxies = [\"10.0.0.0/99\"]", "trusted_proxies"),
        ] {
            let err = parse(&format!("[server]\n{setting}\n")).expect_err(setting);
            assert!(err.to_string().contains(key), "{setting}: {err}");
        }
    }
}
