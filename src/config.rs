//! Typed configuration of the gateway daemon, with every default in one place.
//!
//! The file is `conf/cloudpdi.toml` (every key present and commented there); any key can
//! be overridden from the environment as `CLOUDPDI_<SECTION>__<KEY>`, e.g.
//! `CLOUDPDI_DICOM__LISTEN=0.0.0.0:104` or `CLOUDPDI_ROUTE__CT__STABLE_AFTER=60`.
//! Routes are a table keyed by a route name (`[route.ct]`) rather than an array, so that
//! an environment override names a route that does not move when others are added;
//! an array of `[[route]]` tables with a `name` key is accepted too. A variable changes
//! a route the file defines and cannot create one. Routes are optional: a site without
//! any only receives, and the outbound pipeline is off ([`Config::outbound_off_reason`]).
//! Errors name the key, its value, the file or variable it came from and the form
//! expected (`config/load.rs` reads the file and the variables).
//!
//! Commands find the file in this order: `--config`, the `CLOUDPDI_CONFIG` variable,
//! `conf/cloudpdi.toml` when it exists (a checkout), else `/etc/cloudpdi/cloudpdi.toml`
//! (where `scripts/install.sh` and the systemd unit put it); see [`default_path`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::token::RepositoryRef;

mod load;

pub use load::{KeyError, LoadError, Origin};
pub(crate) use load::{Sources, load, variants_of};

/// The environment variable naming the configuration file (`--config` wins over it).
pub const CONFIG_ENV: &str = "CLOUDPDI_CONFIG";

/// The configuration file of a checkout, used when it exists.
pub const LOCAL_PATH: &str = "conf/cloudpdi.toml";

/// The installed configuration file (`scripts/install.sh`, `systemd/cloudpdi.service`).
pub const SYSTEM_PATH: &str = "/etc/cloudpdi/cloudpdi.toml";

/// The configuration file when neither `--config` nor [`CONFIG_ENV`] names one:
/// [`LOCAL_PATH`] when it exists (running from a checkout), else [`SYSTEM_PATH`], so
/// that commands on an installed host read the file the daemon reads.
pub fn default_path() -> PathBuf {
    first_existing(LOCAL_PATH, SYSTEM_PATH)
}

/// `local` when it exists, else `system`.
pub(crate) fn first_existing(local: &str, system: &str) -> PathBuf {
    if Path::new(local).exists() {
        PathBuf::from(local)
    } else {
        PathBuf::from(system)
    }
}

/// Why a configuration cannot be used; the message names the key to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file, an environment variable or a key (with its value and where it came
    /// from) could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A key's value is well-formed but not usable.
    #[error("{key} = {value}: {problem}")]
    Value {
        /// The key's path, e.g. `inbound.pacs`.
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong and the form expected.
        problem: String,
    },
    /// A value is well-formed but not usable.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// The error with the origin (file or variable) of its key, when it names one.
    fn located(self, origins: &load::Origins) -> ConfigError {
        match self {
            ConfigError::Value {
                key,
                value,
                problem,
            } => ConfigError::Load(LoadError::Key(Box::new(KeyError {
                origin: origins.of(&key),
                key,
                value: Some(value),
                problem,
            }))),
            ConfigError::Invalid(message) => ConfigError::Invalid(origins.locate(&message)),
            other => other,
        }
    }
}

/// The value of `repository.url` and of a `[repositories]` entry that means this
/// daemon's embedded repository.
pub const EMBEDDED: &str = "embedded";

/// Why a token's community code gives no repository.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownCommunity {
    /// The code is not in `[repositories]`.
    #[error(
        "the token names community {0}, which is not in [repositories]: add {0} = \"URL\" \
         (the address of that community's repository) to the configuration"
    )]
    Unlisted(String),
    /// The code means the embedded repository, which this daemon does not run.
    #[error(
        "the token names community {0}, which [repositories] maps to \"embedded\", but \
         repository.url is not \"embedded\": map {0} to the repository's address instead"
    )]
    NoEmbedded(String),
}

/// The whole daemon configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// DICOM network settings (the C-STORE SCP).
    pub dicom: DicomConfig,
    /// Where received instances and the job index live.
    pub spool: SpoolConfig,
    /// The loopback admin endpoint (`cloudpdi status`, health, metrics).
    pub admin: AdminConfig,
    /// Log output.
    pub log: LogConfig,
    /// Routes by name: each called AE title the gateway answers to.
    #[serde(rename = "route", deserialize_with = "routes_from_table_or_list")]
    pub routes: BTreeMap<String, RouteConfig>,
    /// Who we are, as printed in tokens and slips.
    pub facility: FacilityConfig,
    /// Other facilities' public keys, pinned by fingerprint: a sealed token goes to (or is
    /// accepted from) a facility only when the key the repository's directory gives for
    /// it has this fingerprint (`[facilities.B] fingerprint = "..."`).
    pub facilities: BTreeMap<String, PinnedFacility>,
    /// Where containers are uploaded and downloaded.
    pub repository: RepositoryLink,
    /// Repositories by community code (1-6 of `A-Z 0-9`): a repository's URL, or
    /// `"embedded"` for this daemon's embedded repository. A token names a listed
    /// repository by its code (a short token) and any other by its whole URL; a received
    /// token's code is looked up here. Default: none.
    pub repositories: BTreeMap<String, String>,
    /// The outbound pipeline (stable batch -> token).
    pub outbound: OutboundConfig,
    /// The inbound pipeline (token -> local PACS).
    pub inbound: InboundConfig,
    /// The reception web page for clerks (off unless `web.listen` is set).
    pub web: WebConfig,
}

/// The web page for reception and radiology clerks (docs/web.md): scan a token, watch the
/// import, see failed jobs and issued slips.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// `host:port` the page listens on; empty: no page. A non-loopback address needs
    /// `certificate` and `key` (the page carries passwords and tokens).
    pub listen: String,
    /// Server certificate chain (PEM); with `key`, the page is served over HTTPS.
    pub certificate: PathBuf,
    /// The certificate's private key (PEM).
    pub key: PathBuf,
    /// The users file (`name:$argon2id$...` per line, written by `cloudpdi web
    /// add-user`); empty: `<spool.data_dir>/web-users`.
    pub users_file: PathBuf,
    /// Minutes without a request after which a session ends.
    pub session_idle_minutes: u64,
    /// Hours after the login at which a session ends, used or not.
    pub session_max_hours: u64,
    /// Failed logins (per user name, and per client address) after which logins are
    /// refused for `lockout_minutes`.
    pub lockout_after: u32,
    /// Minutes a lock-out lasts, counted from the last failed login.
    pub lockout_minutes: u64,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: String::new(),
            certificate: PathBuf::new(),
            key: PathBuf::new(),
            users_file: PathBuf::new(),
            session_idle_minutes: 30,
            session_max_hours: 12,
            lockout_after: 5,
            lockout_minutes: 15,
        }
    }
}

impl WebConfig {
    /// The address to listen on, `None` when the page is off.
    ///
    /// # Errors
    /// [`ConfigError::Value`] for text that is not `host:port`.
    pub fn address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            value_error(
                "web.listen".into(),
                format!("{listen:?}"),
                "must be an IP address and port such as \"127.0.0.1:8443\" (or empty: no \
                 web page)",
            )
        })
    }

    /// Whether the page is served over HTTPS (certificate and key given).
    pub fn https(&self) -> bool {
        !self.certificate.as_os_str().is_empty()
    }
}

/// The issuing facility.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FacilityConfig {
    /// Short code carried in every token (0-32 printable ASCII characters).
    pub code: String,
    /// Name printed on the patient's slip and in README.TXT.
    pub name: String,
    /// Whom the patient calls with questions or a lost slip (phone, department), printed
    /// on the slip; empty: not printed.
    pub contact: String,
    /// IANA time zone of times printed for people (the slip's expiry), e.g.
    /// `Asia/Tokyo`; empty: the system's (`TZ`, else `/etc/localtime`).
    pub time_zone: String,
    /// This facility's private key (`cloudpdi facility keygen`, mode 0600): seals tokens
    /// sent with `deliver_to` and opens those received from `inbound.accept_from`; empty
    /// when neither is used.
    pub key_file: PathBuf,
    /// This facility's earlier private keys, kept after a rotation so that tokens sealed
    /// to them before the senders re-pinned still open (tried after `key_file`, in
    /// order); each loads at start like `key_file` (mode 0600). Empty: none.
    pub previous_key_files: Vec<PathBuf>,
}

/// Another facility's key as this facility pinned it (read over the phone from the
/// other facility's `cloudpdi facility keygen` or `show`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PinnedFacility {
    /// The fingerprint of the facility's public key (`7KQ2-M9XD-...`); case, spaces and
    /// hyphens are ignored.
    pub fingerprint: String,
}

/// How the gateway reaches the Cloud-PDI repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepositoryLink {
    /// `embedded` (run the repository inside the daemon, on local disk: one machine,
    /// quick start) or the repository's base URL (`https://pdi.example.jp`).
    pub url: String,
    /// Loopback address of the embedded repository.
    pub embedded_listen: SocketAddr,
    /// File holding this facility's API key (one line); empty for the embedded
    /// repository. Kept out of this file so that the configuration may be readable.
    pub api_key_file: PathBuf,
    /// Whether the API key may be sent to an `http://` repository on another host (it
    /// would cross the network unencrypted). Loopback is always allowed.
    pub allow_plain_http: bool,
}

/// Outbound pipeline settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Whether stable batches are sent; `false` holds them in the spool (e.g. while the
    /// repository is being set up) and `cloudpdi status` shows them as stable.
    pub enabled: bool,
    /// Jobs worked on at once.
    pub workers: usize,
    /// Longest wait (seconds) between retries of a failing step.
    pub max_backoff: u64,
    /// zstd level of a route with `compress = true` (1..=19): level 1 keeps compression
    /// off the critical path of the stream; higher levels save a few percent more.
    pub zstd_level: i32,
    /// zstd worker threads (0: one per core, capped at [`MAX_ZSTD_THREADS`]). Default 1:
    /// level 1 on one thread outruns a 1 Gbit/s link, and each further worker costs about
    /// 4 MiB of memory (zstd's multithreaded mode about 15 MiB for the first two), which
    /// one per core would take past the daemon's 64 MiB on a server with many cores.
    pub zstd_threads: u32,
    /// Container parts queued and uploading at once (1..=[`MAX_PARTS_IN_FLIGHT`]): each
    /// is one request to the repository, streamed from the container file (256 KiB read
    /// at a time: parts are not held in memory).
    pub parts_in_flight: usize,
}

/// Most zstd worker threads `outbound.zstd_threads` may ask for (and what 0, one per core,
/// is capped at): each costs about 4 MiB, so 8 keep zstd near 40 MiB, inside the daemon's
/// 64 MiB on a server with any number of cores.
pub const MAX_ZSTD_THREADS: u32 = 8;
/// Most parts `outbound.parts_in_flight` may ask for: 16 requests at once (a repository
/// takes 16 part uploads at once by default, `server.max_concurrent_uploads`).
pub const MAX_PARTS_IN_FLIGHT: usize = 16;

/// Inbound pipeline settings: the watch queue and the local PACS.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Folder watched for token files (empty: `<data_dir>/inbox`).
    pub watch_dir: PathBuf,
    /// Seconds between scans of the watch folder when inotify is unavailable.
    pub poll_interval: u64,
    /// The local PACS, `host:port`; empty disables the inbound pipeline.
    pub pacs: String,
    /// The PACS's AE title.
    pub pacs_ae_title: String,
    /// Our AE title as the PACS knows it.
    pub calling_ae_title: String,
    /// Associations used in parallel for one study.
    pub associations: usize,
    /// Attempts per instance when the PACS is unreachable or out of resources.
    pub attempts: u32,
    /// `keep` the sender's Patient ID, or `prefix` it with the sender's facility code.
    /// A local ID given with the token (`cloudpdi receive --patient-id`) always wins.
    pub patient_id: PatientIdMode,
    /// Issuer of Patient ID written when the Patient ID changes.
    pub issuer: String,
    /// Jobs worked on at once.
    pub workers: usize,
    /// Longest wait (seconds) between retries of a failing step (PACS or repository
    /// unreachable, disk full).
    pub max_backoff: u64,
    /// Repositories tokens may point at (a URL, matching it and the paths below it; the
    /// match ends at a `/`); empty allows any. A token naming another repository is
    /// rejected, so a forged token cannot make the gateway fetch from an arbitrary address.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub allowed_repositories: Vec<String>,
    /// Largest document received, in MiB (1 MiB = 1,048,576 bytes): the download, the
    /// opened container and the extracted PDI are each refused beyond it, so a hostile
    /// token or repository cannot fill the disk. A CT/MR study can be several GB.
    pub max_document_mb: u64,
    /// Whether a token may point at an `http://` repository on another host: the
    /// download proof would cross the network unencrypted. Loopback is always allowed.
    pub allow_plain_http: bool,
    /// Facilities whose sealed tokens (posted to this facility's mailbox in the
    /// repository of `[repository]`) are imported; each needs a `[facilities.CODE]` pin.
    /// Empty: the mailbox is not read.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub accept_from: Vec<String>,
    /// Seconds between two reads of the mailbox (when `accept_from` is set).
    pub mailbox_poll_interval: u64,
    /// DICOM TLS towards the PACS (`[inbound.pacs_tls]`); absent: plain DICOM.
    pub pacs_tls: Option<PacsTlsConfig>,
    /// What happens to an instance whose compressed transfer syntax the PACS refuses
    /// (see [`Transcode`]).
    pub transcode: Transcode,
    /// Whether an import asks the PACS for storage commitment after its C-STOREs and is
    /// done only once the PACS reports every instance committed.
    pub storage_commitment: bool,
    /// Seconds to wait for the PACS's N-EVENT-REPORT after its N-ACTION-RSP (at most
    /// [`MAX_COMMITMENT_TIMEOUT`]); then the step is retried with a new request.
    pub commitment_timeout: u64,
}

impl InboundConfig {
    /// [`InboundConfig::max_document_mb`] in bytes.
    pub fn max_document_bytes(&self) -> u64 {
        self.max_document_mb.saturating_mul(1 << 20)
    }
}

/// Whether compressed pixel data the local PACS does not accept is decoded before it is
/// sent (`inbound.transcode`): many PACS accept only uncompressed data for some SOP
/// classes, and a study they cannot take is worth less than a decoded one.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Transcode {
    /// Never decode: an instance in a syntax the PACS refuses is refused, with the reason.
    Never,
    /// Decode it to Explicit VR Little Endian when the PACS accepts only uncompressed
    /// data for its SOP class (see `dicom::transcode` for the syntaxes covered).
    WhenRefused,
}

impl std::fmt::Display for Transcode {
    /// The name the value takes in the configuration file (and `--transcode`), so that
    /// the command line shows the configuration's default.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transcode::Never => "never",
            Transcode::WhenRefused => "when-refused",
        })
    }
}

/// What the inbound pipeline does with the sender's Patient ID.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PatientIdMode {
    /// Keep it as sent.
    Keep,
    /// Prefix it with the sender's facility code and a hyphen.
    Prefix,
}

/// DICOM network settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DicomConfig {
    /// Address the SCP listens on. Loopback by default; a hospital sets its LAN address.
    pub listen: SocketAddr,
    /// Associations served at once for any caller; further callers wait (at most
    /// `association_timeout` seconds, then a transient "local limit exceeded" rejection).
    pub max_associations: usize,
    /// Associations, on top of `max_associations`, that only a caller named in the
    /// called route's `allowed_callers` may use: the PACS still gets in while others
    /// have taken every general slot.
    pub reserved_associations: usize,
    /// Associations (open or negotiating) one peer IP address may hold at once; further
    /// connections from it get a transient "local limit exceeded" rejection.
    pub max_associations_per_peer: usize,
    /// Largest PDU we accept (bytes); bounds the memory one association can claim.
    pub max_pdu_length: u32,
    /// Seconds a peer has to complete association negotiation (ARTIM timer).
    pub association_timeout: u64,
    /// Seconds without any PDU after which an association is aborted (DIMSE timeout).
    pub idle_timeout: u64,
    /// Seconds an association may stay open without sending a C-STORE (C-ECHOs do not
    /// count; an instance in flight is never cut) before the gateway aborts it, so a peer
    /// keeping itself alive with C-ECHO cannot hold a slot forever.
    pub store_idle_timeout: u64,
    /// Storage commitment per calling AE title (`[dicom.commitment.<CALLING_AE>]`): how
    /// the N-EVENT-REPORT goes back to a requester. A caller not listed gets it on the
    /// association of its N-ACTION.
    pub commitment: BTreeMap<String, CommitmentPeer>,
    /// A DICOM TLS listener beside the plain one (`[dicom.tls]`); absent: none.
    pub tls: Option<DicomTlsConfig>,
}

/// The DICOM TLS listener (PS3.15 B.1, BCP 195: TLS 1.2 and 1.3): it shares routes,
/// limits, allow-lists and spool with the plain listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomTlsConfig {
    /// Address of the TLS listener, e.g. `0.0.0.0:2762`.
    pub listen: SocketAddr,
    /// The gateway's certificate chain (PEM), leaf first.
    pub certificate: PathBuf,
    /// The private key of `certificate` (PEM).
    pub key: PathBuf,
    /// CA certificates (PEM): when set, only peers with a certificate signed by one of
    /// them can associate (the calling AE allow-lists still apply).
    pub client_ca: Option<PathBuf>,
}

/// TLS towards the local PACS (`[inbound.pacs_tls]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacsTlsConfig {
    /// CA certificates (PEM) that sign the PACS's certificate.
    pub ca: PathBuf,
    /// The gateway's client certificate chain (PEM), for a PACS that asks for one.
    pub certificate: Option<PathBuf>,
    /// The private key of `certificate` (PEM).
    pub key: Option<PathBuf>,
    /// Name the PACS's certificate must carry; default: the host of `inbound.pacs`.
    pub server_name: Option<String>,
}

/// How the Storage Commitment result goes back to one requester.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CommitmentPeer {
    /// On the association of the N-ACTION, or on a new one to `address`.
    pub report: CommitmentReport,
    /// The requester's `host:port`, for `report = "new-association"`.
    pub address: String,
    /// The AE title to call there; empty: the calling AE title of the request.
    pub ae_title: String,
}

impl Default for CommitmentPeer {
    fn default() -> Self {
        CommitmentPeer {
            report: CommitmentReport::SameAssociation,
            address: String::new(),
            ae_title: String::new(),
        }
    }
}

/// Which association carries the N-EVENT-REPORT.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CommitmentReport {
    /// The association of the N-ACTION (the requester must keep it open).
    SameAssociation,
    /// A new association the gateway opens to the requester (SCP role proposed).
    NewAssociation,
}

/// Longest `inbound.commitment_timeout` (seconds): one day.
pub const MAX_COMMITMENT_TIMEOUT: u64 = 86_400;

/// Spool and state settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Folder holding `spool/` (received instances) and `index/` (sled database).
    pub data_dir: PathBuf,
    /// Refuse new instances ("out of resources") when less than this many MiB are free,
    /// so a burst of studies cannot fill the disk the operating system needs.
    pub min_free_mb: u64,
    /// Days the records of jobs that finished cleanly (and their batches) are kept for
    /// `cloudpdi status` before they are removed, so the database does not grow for ever;
    /// failed and set-aside jobs are never removed automatically, and a job whose token can
    /// still download (not revoked, not expired) stays until it cannot. 0 keeps every
    /// record.
    pub records_days: u64,
}

impl SpoolConfig {
    /// How long finished records are kept ([`SpoolConfig::records_days`]); zero for ever.
    pub fn records_kept(&self) -> Duration {
        Duration::from_secs(self.records_days.saturating_mul(86_400))
    }
}

/// Admin endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback address of the admin HTTP endpoint; other addresses are refused.
    pub listen: SocketAddr,
}

/// How log lines are written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `plain` (one readable line per event, for journald) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `cloudpdi=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    Plain,
    /// One JSON object per line, for log shippers.
    Json,
}

/// One route: a called AE title and what happens to the studies sent to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name when routes are given as a `[[route]]` list (ignored in table form).
    pub name: Option<String>,
    /// The called AE title that selects this route (1-16 characters).
    pub ae_title: String,
    /// Calling AE titles allowed to send; empty means any.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub allowed_callers: Vec<String>,
    /// How instances are grouped into batches.
    pub batch_by: BatchBy,
    /// Seconds without a new instance after which a batch is stable.
    pub stable_after: u64,
    /// Days a token (and its container in the repository) stays valid.
    pub expires_in_days: u32,
    /// Downloads the repository allows per document.
    pub max_downloads: u32,
    /// Folder receiving token files and slips (empty: `<data_dir>/tokens/<route>`).
    pub token_dir: PathBuf,
    /// Slip format: `html`, `svg`, `png` or `pdf`.
    pub slip: String,
    /// Command run with the slip's path as last argument once a token is issued (e.g.
    /// `["lp", "-d", "reception"]`); empty for none.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub deliver_command: Vec<String>,
    /// Hours the spooled instances of a sent batch are kept before removal.
    pub retention_hours: u64,
    /// Compress the PDI with zstd inside the encryption.
    pub compress: bool,
    /// Base URL of the repository this route uploads to, when it is not the daemon's
    /// `[repository]` (e.g. a regional repository for one partner); empty for that one.
    pub repository_url: String,
    /// File holding this facility's API key for `repository_url` (one line).
    pub repository_api_key_file: PathBuf,
    /// What happens to AI support images (CAD overlays, AI results) in this route's file
    /// sets; defaults in [`crate::pdi::AiPolicy::default`].
    pub ai_support: crate::pdi::AiPolicy,
    /// Whether the slip prints the patient's name (never in the QR code); `false` for
    /// routes whose slips pass through other hands first.
    pub slip_patient_name: bool,
    /// Facilities (codes in the repository's directory) the token is sealed to and posted
    /// to, in their mailbox: the study reaches their PACS with no slip carried. Each needs
    /// a `[facilities.CODE]` pin and this facility a `facility.key_file`.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub deliver_to: Vec<String>,
}

/// The grouping key of a batch.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BatchBy {
    /// One batch per Study Instance UID.
    Study,
    /// One batch per Patient ID (all studies of a patient travel together).
    Patient,
}

impl Default for DicomConfig {
    fn default() -> Self {
        DicomConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 11112)),
            max_associations: 32,
            reserved_associations: 4,
            max_associations_per_peer: 8,
            max_pdu_length: 131_072,
            association_timeout: 30,
            idle_timeout: 120,
            store_idle_timeout: 300,
            tls: None,
            commitment: BTreeMap::new(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            data_dir: PathBuf::from("./data"),
            min_free_mb: 1024,
            records_days: 90,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 11180)),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            name: None,
            ae_title: String::new(),
            allowed_callers: Vec::new(),
            batch_by: BatchBy::Study,
            stable_after: 30,
            ai_support: crate::pdi::AiPolicy::default(),
            expires_in_days: 14,
            max_downloads: 5,
            token_dir: PathBuf::new(),
            slip: "html".into(),
            deliver_command: Vec::new(),
            retention_hours: 168,
            compress: true,
            repository_url: String::new(),
            repository_api_key_file: PathBuf::new(),
            slip_patient_name: true,
            deliver_to: Vec::new(),
        }
    }
}

impl Default for FacilityConfig {
    fn default() -> Self {
        FacilityConfig {
            code: "HOSPITAL".into(),
            name: "Hospital".into(),
            contact: String::new(),
            time_zone: String::new(),
            key_file: PathBuf::new(),
            previous_key_files: Vec::new(),
        }
    }
}

impl Default for RepositoryLink {
    fn default() -> Self {
        RepositoryLink {
            url: "embedded".into(),
            embedded_listen: SocketAddr::from(([127, 0, 0, 1], 11190)),
            api_key_file: PathBuf::new(),
            allow_plain_http: false,
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            enabled: true,
            workers: 2,
            max_backoff: 300,
            zstd_level: 1,
            zstd_threads: 1,
            parts_in_flight: 4,
        }
    }
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            watch_dir: PathBuf::new(),
            poll_interval: 5,
            pacs: String::new(),
            pacs_ae_title: "PACS".into(),
            calling_ae_title: "CLOUDPDI".into(),
            associations: 4,
            attempts: 5,
            patient_id: PatientIdMode::Keep,
            issuer: "LOCAL".into(),
            workers: 1,
            max_backoff: 300,
            allowed_repositories: Vec::new(),
            max_document_mb: 20_480,
            allow_plain_http: false,
            accept_from: Vec::new(),
            mailbox_poll_interval: 30,
            pacs_tls: None,
            transcode: Transcode::WhenRefused,
            storage_commitment: false,
            commitment_timeout: 600,
        }
    }
}

impl DicomConfig {
    /// The ARTIM timer as a duration.
    pub fn association_timeout(&self) -> Duration {
        Duration::from_secs(self.association_timeout)
    }

    /// The DIMSE idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout)
    }

    /// The longest time without a C-STORE as a duration.
    pub fn store_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.store_idle_timeout)
    }
}

impl Config {
    /// Loads `path` (TOML), applies `CLOUDPDI_<SECTION>__<KEY>` overrides and validates:
    /// what every command reads (`status`, `receive`, `send`), wherever it runs.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or the variable, the key, its value, and the form
    /// expected.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, false)
    }

    /// [`Config::load`], then the values that depend on the daemon's machine
    /// ([`Config::check_host`]): what `cloudpdi serve` reads, so that a clerk's `status`
    /// does not fail on the daemon's disk or programs.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_to_serve(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, true)
    }

    fn load_with(path: &Path, host: bool) -> Result<Config, ConfigError> {
        let (config, origins) = load::load::<Config>(&Sources {
            path,
            prefix: "CLOUDPDI_",
            skip: &["CLOUDPDI_REPO_"],
            named_tables: &["route", "repositories", "facilities"],
            enums: &[
                load::variants_of::<BatchBy>(),
                load::variants_of::<PatientIdMode>(),
                load::variants_of::<LogFormat>(),
                load::variants_of::<crate::pdi::AiAction>(),
                load::variants_of::<Transcode>(),
            ],
        })?;
        config
            .validate()
            .and_then(|()| if host { config.check_host() } else { Ok(()) })
            .map_err(|e| e.located(&origins))?;
        Ok(config)
    }

    /// Why the outbound pipeline does not run, for the one line the daemon logs at start;
    /// `None` when it runs.
    pub fn outbound_off_reason(&self) -> Option<&'static str> {
        if self.routes.is_empty() {
            Some("no [route.NAME] is configured, so this site only receives")
        } else if !self.outbound.enabled {
            Some("outbound.enabled = false: stable batches are held in the spool")
        } else {
            None
        }
    }

    /// Checks the values that depend on this machine: the spool's reserve against the
    /// size of the disk holding `spool.data_dir`, and that each route's
    /// `deliver_command` program exists.
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the key.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        let data_dir = &self.spool.data_dir;
        if let Some(disk_mb) = disk_size_mb(data_dir)
            && self.spool.min_free_mb > 0
            && self.spool.min_free_mb >= disk_mb
        {
            return Err(ConfigError::Value {
                key: "spool.min_free_mb".into(),
                value: self.spool.min_free_mb.to_string(),
                problem: format!(
                    "the disk holding {} has {disk_mb} MiB in all, so the spool would refuse \
                     every instance; set a reserve well below that (e.g. a tenth of it), or \
                     0 to disable it",
                    data_dir.display()
                ),
            });
        }
        for (name, route) in &self.routes {
            if let Some(program) = route.deliver_command.first()
                && !program_exists(program)
            {
                return Err(ConfigError::Value {
                    key: format!("route.{name}.deliver_command"),
                    value: format!("{:?}", route.deliver_command),
                    problem: format!(
                        "the program {program:?} is not a file and not found in PATH; give \
                         its full path (e.g. /usr/bin/lp) or install it"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks what serde cannot: AE title rules, unique routes, loopback admin address,
    /// addresses and URLs.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] or [`ConfigError::Value`] with the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = BTreeMap::new();
        for (name, route) in &self.routes {
            if name.is_empty()
                || name.len() > 32
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(value_error(
                    format!("route.{name}"),
                    format!("{name:?}"),
                    "a route name is 1-32 characters of A-Z, a-z, 0-9, _ and -",
                ));
            }
            check_ae_title(&format!("route.{name}.ae_title"), &route.ae_title)?;
            for caller in &route.allowed_callers {
                check_ae_title(&format!("route.{name}.allowed_callers"), caller)?;
            }
            route
                .ai_support
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("route.{name}.ai_support: {e}")))?;
            if let Some(other) = seen.insert(route.ae_title.trim(), name) {
                return Err(value_error(
                    format!("route.{name}.ae_title"),
                    format!("{:?}", route.ae_title),
                    &format!("route.{other} uses this AE title too: each route needs its own"),
                ));
            }
        }
        if !self.admin.listen.ip().is_loopback() {
            return Err(value_error(
                "admin.listen".into(),
                self.admin.listen.to_string(),
                "not a loopback address: the admin endpoint has no authentication and must \
                 stay on 127.0.0.1 or ::1",
            ));
        }
        let dicom = &self.dicom;
        let numbers = [
            (
                "dicom.max_pdu_length",
                u64::from(dicom.max_pdu_length),
                (4096..=16 * 1024 * 1024).contains(&dicom.max_pdu_length),
                "between 4096 and 16777216",
            ),
            (
                "dicom.max_associations",
                dicom.max_associations as u64,
                dicom.max_associations > 0,
                "at least 1",
            ),
            (
                "dicom.max_associations_per_peer",
                dicom.max_associations_per_peer as u64,
                dicom.max_associations_per_peer > 0,
                "at least 1",
            ),
            (
                "dicom.reserved_associations",
                dicom.reserved_associations as u64,
                dicom.reserved_associations <= 1024,
                "at most 1024",
            ),
            (
                "dicom.store_idle_timeout",
                dicom.store_idle_timeout,
                dicom.store_idle_timeout > 0,
                "at least 1 second",
            ),
        ];
        if let Some(tls) = &dicom.tls
            && tls.listen == dicom.listen
        {
            return Err(value_error(
                "dicom.tls.listen".into(),
                tls.listen.to_string(),
                "the plain listener dicom.listen uses this address: give the TLS listener \
                 its own port (2762 is the registered DICOM TLS port)",
            ));
        }
        if let Some((key, value, _, form)) = numbers.into_iter().find(|(_, _, ok, _)| !ok) {
            return Err(value_error(
                key.into(),
                value.to_string(),
                &format!("must be {form}"),
            ));
        }
        for (calling, peer) in &dicom.commitment {
            check_ae_title(&format!("dicom.commitment.{calling}"), calling)?;
            if peer.report == CommitmentReport::NewAssociation {
                if !is_host_port(&peer.address) {
                    return Err(value_error(
                        format!("dicom.commitment.{calling}.address"),
                        format!("{:?}", peer.address),
                        "report = \"new-association\" needs the requester's address, \
                         host:port, where its storage commitment SCU listens",
                    ));
                }
                if !peer.ae_title.is_empty() {
                    check_ae_title(
                        &format!("dicom.commitment.{calling}.ae_title"),
                        &peer.ae_title,
                    )?;
                }
            }
        }
        self.validate_web()?;
        self.validate_pipelines()
    }

    /// `[web]`: a well-formed address; outside loopback only with a certificate and key;
    /// certificate and key together; sessions and lock-outs of at least one unit.
    fn validate_web(&self) -> Result<(), ConfigError> {
        let web = &self.web;
        let Some(address) = web.address()? else {
            return Ok(());
        };
        let (certificate, key) = (
            web.certificate.as_os_str().is_empty(),
            web.key.as_os_str().is_empty(),
        );
        if certificate != key {
            return Err(value_error(
                "web.certificate".into(),
                format!("{:?}", web.certificate),
                "web.certificate and web.key go together: give both (HTTPS) or neither \
                 (plain HTTP, loopback only)",
            ));
        }
        if !address.ip().is_loopback() && certificate {
            return Err(value_error(
                "web.listen".into(),
                address.to_string(),
                "not a loopback address, and web.certificate and web.key are empty: on the \
                 network the page must be HTTPS (passwords and tokens cross it); set \
                 web.certificate and web.key, or listen on 127.0.0.1",
            ));
        }
        let numbers = [
            ("web.session_idle_minutes", web.session_idle_minutes),
            ("web.session_max_hours", web.session_max_hours),
            ("web.lockout_after", u64::from(web.lockout_after)),
            ("web.lockout_minutes", web.lockout_minutes),
        ];
        if let Some((key, value)) = numbers.into_iter().find(|(_, value)| *value == 0) {
            return Err(value_error(
                key.into(),
                value.to_string(),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_pipelines(&self) -> Result<(), ConfigError> {
        let facility = &self.facility.code;
        if facility.len() > 32 || !facility.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(value_error(
                "facility.code".into(),
                format!("{facility:?}"),
                "up to 32 printable ASCII characters (carried in every token)",
            ));
        }
        let most = crate::token::slip::MAX_FIELD_CHARS;
        for (key, value, example) in [
            (
                "facility.name",
                &self.facility.name,
                "Kyoto University Hospital",
            ),
            (
                "facility.contact",
                &self.facility.contact,
                "075-000-0000 (radiology reception)",
            ),
        ] {
            if value.chars().count() > most || value.chars().any(char::is_control) {
                let shown: String = value.chars().take(most).collect();
                return Err(value_error(
                    key.into(),
                    format!("{shown:?}"),
                    &format!(
                        "at most {most} characters on one line (it is printed on every slip), \
                         e.g. \"{example}\""
                    ),
                ));
            }
        }
        crate::clock::time_zone(&self.facility.time_zone).map_err(|e| {
            value_error(
                "facility.time_zone".into(),
                format!("{:?}", self.facility.time_zone),
                &e.to_string(),
            )
        })?;
        let url = &self.repository.url;
        if url != "embedded" && !url.is_empty() && !is_http(url) {
            return Err(ConfigError::Value {
                key: "repository.url".into(),
                value: format!("{url:?}"),
                problem: "expected \"embedded\", the repository's address with its scheme \
                          (e.g. https://pdi.example.jp), or \"\" on a site that only receives"
                    .into(),
            });
        }
        self.validate_outbound_links()?;
        self.validate_delivery()?;
        if url == "embedded" && !self.repository.embedded_listen.ip().is_loopback() {
            return Err(value_error(
                "repository.embedded_listen".into(),
                self.repository.embedded_listen.to_string(),
                "must be a loopback address (127.0.0.1 or ::1)",
            ));
        }
        for (name, route) in &self.routes {
            if !["html", "svg", "png", "pdf"].contains(&route.slip.as_str()) {
                return Err(value_error(
                    format!("route.{name}.slip"),
                    format!("{:?}", route.slip),
                    "use html, svg, png or pdf",
                ));
            }
            if !route.repository_url.is_empty()
                && (!is_http(&route.repository_url)
                    || route.repository_api_key_file.as_os_str().is_empty())
            {
                return Err(value_error(
                    format!("route.{name}.repository_url"),
                    format!("{:?}", route.repository_url),
                    &format!(
                        "give the repository's http(s):// address and \
                         route.{name}.repository_api_key_file, or leave both out to use \
                         [repository]"
                    ),
                ));
            }
            for (key, value) in [
                ("expires_in_days", u64::from(route.expires_in_days)),
                ("max_downloads", u64::from(route.max_downloads)),
            ] {
                if value == 0 {
                    return Err(value_error(
                        format!("route.{name}.{key}"),
                        "0".into(),
                        "must be at least 1",
                    ));
                }
            }
        }
        for (key, value) in [
            ("outbound.workers", self.outbound.workers as u64),
            ("inbound.workers", self.inbound.workers as u64),
            ("inbound.max_document_mb", self.inbound.max_document_mb),
        ] {
            if value == 0 {
                return Err(value_error(key.into(), "0".into(), "must be at least 1"));
            }
        }
        self.validate_outbound_stream()?;
        self.validate_repositories()?;
        for entry in &self.inbound.allowed_repositories {
            if !is_http(entry) {
                return Err(ConfigError::Value {
                    key: "inbound.allowed_repositories".into(),
                    value: format!("{entry:?}"),
                    problem: "each entry is a repository's address with its scheme, e.g. \
                              \"https://pdi.example.jp\""
                        .into(),
                });
            }
        }
        if !self.inbound.pacs.is_empty() {
            if !is_host_port(&self.inbound.pacs) {
                return Err(ConfigError::Value {
                    key: "inbound.pacs".into(),
                    value: format!("{:?}", self.inbound.pacs),
                    problem: "write host:port of the local PACS's DICOM port, e.g. \
                              \"10.1.2.20:104\" or \"pacs.hospital.local:11112\""
                        .into(),
                });
            }
            check_ae_title("inbound.pacs_ae_title", &self.inbound.pacs_ae_title)?;
            check_ae_title("inbound.calling_ae_title", &self.inbound.calling_ae_title)?;
            if !(1..=MAX_COMMITMENT_TIMEOUT).contains(&self.inbound.commitment_timeout) {
                return Err(value_error(
                    "inbound.commitment_timeout".into(),
                    self.inbound.commitment_timeout.to_string(),
                    &format!(
                        "must be 1 to {MAX_COMMITMENT_TIMEOUT} seconds (one day): how long an \
                         import waits for the PACS's storage commitment report; set a value \
                         in that range"
                    ),
                ));
            }
        }
        if let Some(tls) = &self.inbound.pacs_tls
            && tls.certificate.is_some() != tls.key.is_some()
        {
            return Err(ConfigError::Invalid(
                "inbound.pacs_tls: certificate and key go together (the client certificate \
                 and its private key): set both, or neither for no client certificate"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `[outbound]` zstd level and threads, parts in flight.
    fn validate_outbound_stream(&self) -> Result<(), ConfigError> {
        let o = &self.outbound;
        if !(1..=19).contains(&o.zstd_level) {
            return Err(value_error(
                "outbound.zstd_level".into(),
                o.zstd_level.to_string(),
                "must be between 1 and 19 (1 is fastest; a route's compress = false turns \
                 compression off)",
            ));
        }
        if o.zstd_threads > MAX_ZSTD_THREADS {
            return Err(value_error(
                "outbound.zstd_threads".into(),
                o.zstd_threads.to_string(),
                &format!(
                    "must be between 0 (one per core, at most {MAX_ZSTD_THREADS}) and \
                     {MAX_ZSTD_THREADS}: each zstd thread costs about 4 MiB of memory"
                ),
            ));
        }
        if !(1..=MAX_PARTS_IN_FLIGHT).contains(&o.parts_in_flight) {
            return Err(value_error(
                "outbound.parts_in_flight".into(),
                o.parts_in_flight.to_string(),
                &format!("must be between 1 and {MAX_PARTS_IN_FLIGHT} (parts uploading at once)"),
            ));
        }
        Ok(())
    }

    /// `[repositories]`: community codes a token can carry, each to `"embedded"` or an
    /// address a token could carry as well.
    fn validate_repositories(&self) -> Result<(), ConfigError> {
        for (code, url) in &self.repositories {
            if !crate::token::is_community_code(code) {
                return Err(value_error(
                    format!("repositories.{code}"),
                    format!("{url:?}"),
                    &format!(
                        "a community code is 1-{} characters of A-Z and 0-9 (it is carried \
                         in every token naming the repository), e.g. KYOTO",
                        crate::token::MAX_COMMUNITY_LEN
                    ),
                ));
            }
            let fits = url.len() <= crate::token::MAX_URL_LEN
                && url.bytes().all(|b| (0x21..0x7f).contains(&b));
            if url != EMBEDDED && (!is_http(url) || !fits) {
                return Err(value_error(
                    format!("repositories.{code}"),
                    format!("{url:?}"),
                    &format!(
                        "expected \"embedded\" (this daemon's embedded repository) or the \
                         repository's address with its scheme, at most {} characters, e.g. \
                         \"https://pdi.example.jp\"",
                        crate::token::MAX_URL_LEN
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A site with routes sends: each route needs a repository and, on a shared one,
    /// this facility's API key file. Checked at start, so that a route cannot fail every
    /// job later for want of them; a site without routes needs neither.
    fn validate_outbound_links(&self) -> Result<(), ConfigError> {
        if !self.outbound.enabled {
            return Ok(());
        }
        let repository = &self.repository;
        for (name, route) in &self.routes {
            if !route.repository_url.is_empty() {
                check_plain_http(
                    &format!("route.{name}.repository_url"),
                    &route.repository_url,
                    repository.allow_plain_http,
                )?;
                continue;
            }
            if repository.url.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "route.{name} sends studies, but repository.url is empty: set \
                     repository.url (\"embedded\", or the repository's https:// address with \
                     repository.api_key_file), or route.{name}.repository_url; on a site \
                     that only receives, remove the route"
                )));
            }
            if repository.url != "embedded" && repository.api_key_file.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "route.{name} uploads to {}, but repository.api_key_file is empty: set it \
                     to the file holding this facility's API key (the repository's admin \
                     makes one with `cloudpdi repository new-key`); on a site that only \
                     receives, remove the route",
                    repository.url
                )));
            }
            if repository.url != "embedded" {
                check_plain_http(
                    "repository.url",
                    &repository.url,
                    repository.allow_plain_http,
                )?;
            }
        }
        Ok(())
    }

    /// Whether this facility seals or opens tokens (a route with `deliver_to`, or
    /// `inbound.accept_from`): then it needs `facility.key_file`.
    pub fn uses_facility_key(&self) -> bool {
        !self.inbound.accept_from.is_empty()
            || self
                .routes
                .values()
                .any(|route| !route.deliver_to.is_empty())
    }

    /// Sealed delivery needs this facility's key, a pin for every facility named, codes
    /// the repository can have, and a repository shared with the other facilities (the
    /// embedded one knows only this facility). Checked at start, so that no delivery
    /// fails later for want of them.
    fn validate_delivery(&self) -> Result<(), ConfigError> {
        let mut named: Vec<(String, &str)> = Vec::new();
        for (name, route) in &self.routes {
            for code in &route.deliver_to {
                named.push((format!("route.{name}.deliver_to"), code));
            }
            if !route.deliver_to.is_empty()
                && route.repository_url.is_empty()
                && self.repository.url == "embedded"
            {
                return Err(value_error(
                    format!("route.{name}.deliver_to"),
                    format!("{:?}", route.deliver_to),
                    "the embedded repository knows only this facility, so no other facility \
                     can read a mailbox there: set repository.url (or \
                     route.{name}.repository_url) to the repository shared with them",
                ));
            }
        }
        for code in &self.inbound.accept_from {
            named.push(("inbound.accept_from".into(), code));
        }
        if !self.inbound.accept_from.is_empty() {
            let url = &self.repository.url;
            if url.is_empty() || url == "embedded" {
                return Err(value_error(
                    "inbound.accept_from".into(),
                    format!("{:?}", self.inbound.accept_from),
                    "the mailbox is read in the repository of repository.url, which must be \
                     the repository shared with those facilities (https://...), with \
                     repository.api_key_file",
                ));
            }
            if self.repository.api_key_file.as_os_str().is_empty() {
                return Err(value_error(
                    "repository.api_key_file".into(),
                    "\"\"".into(),
                    "inbound.accept_from reads this facility's mailbox in the repository of \
                     repository.url with this facility's API key there: put the key in a \
                     file readable by the daemon's user only and set repository.api_key_file \
                     to it",
                ));
            }
            if self.inbound.pacs.is_empty() {
                return Err(value_error(
                    "inbound.accept_from".into(),
                    format!("{:?}", self.inbound.accept_from),
                    "sealed tokens are imported into the local PACS, but inbound.pacs is \
                     empty: set it, or remove accept_from",
                ));
            }
            if !(1..=3600).contains(&self.inbound.mailbox_poll_interval) {
                return Err(value_error(
                    "inbound.mailbox_poll_interval".into(),
                    self.inbound.mailbox_poll_interval.to_string(),
                    "must be between 1 and 3600 seconds (30 by default)",
                ));
            }
        }
        for (key, code) in &named {
            if !crate::facility::is_code(code) {
                return Err(value_error(
                    key.clone(),
                    format!("{code:?}"),
                    "a facility code as the repository's directory knows it: 1-32 \
                     characters of A-Z, a-z, 0-9, _ and -",
                ));
            }
            if !self.facilities.contains_key(*code) {
                return Err(value_error(
                    key.clone(),
                    format!("{code:?}"),
                    &format!(
                        "facility {code} has no pinned key: add [facilities.{code}] with \
                         fingerprint = \"...\" as {code} read it to you from `cloudpdi \
                         facility show` (never copy it from the repository)"
                    ),
                ));
            }
        }
        for (code, pin) in &self.facilities {
            if !crate::facility::is_code(code) {
                return Err(value_error(
                    format!("facilities.{code}"),
                    format!("{code:?}"),
                    "a facility code as the repository's directory knows it: 1-32 \
                     characters of A-Z, a-z, 0-9, _ and -",
                ));
            }
            if let Err(e) = crate::facility::Fingerprint::parse(&pin.fingerprint) {
                return Err(value_error(
                    format!("facilities.{code}.fingerprint"),
                    format!("{:?}", pin.fingerprint),
                    &format!("{e}; write it as {code} reads it from `cloudpdi facility show`"),
                ));
            }
        }
        if !self.facility.previous_key_files.is_empty()
            && self.facility.key_file.as_os_str().is_empty()
        {
            return Err(value_error(
                "facility.previous_key_files".into(),
                format!("{:?}", self.facility.previous_key_files),
                "earlier keys are kept beside the current one after a rotation: set \
                 facility.key_file to the new key (or empty previous_key_files)",
            ));
        }
        if self.uses_facility_key() {
            if self.facility.key_file.as_os_str().is_empty() {
                return Err(value_error(
                    "facility.key_file".into(),
                    "\"\"".into(),
                    "deliver_to and inbound.accept_from seal and open tokens with this \
                     facility's private key: create it with `cloudpdi facility keygen --out \
                     /etc/cloudpdi/facility.key` and set facility.key_file to it",
                ));
            }
            if !crate::facility::is_code(&self.facility.code) {
                return Err(value_error(
                    "facility.code".into(),
                    format!("{:?}", self.facility.code),
                    "sealed delivery names this facility by its code in the repository's \
                     directory: 1-32 characters of A-Z, a-z, 0-9, _ and -",
                ));
            }
        }
        Ok(())
    }

    /// The sled database folder.
    pub fn index_dir(&self) -> PathBuf {
        self.spool.data_dir.join("index")
    }

    /// The folder of received instances.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool.data_dir.join("spool")
    }

    /// The folder of job working files (PDI, containers, pending tokens).
    pub fn jobs_dir(&self) -> PathBuf {
        self.spool.data_dir.join("jobs")
    }

    /// The API key file of the embedded repository (written by `cloudpdi serve`, read
    /// by `cloudpdi send`; mode 0600).
    pub fn embedded_key_file(&self) -> PathBuf {
        self.spool.data_dir.join("repository").join("api-key")
    }

    /// The repository a route uploads to: its base URL (what tokens name) and the file
    /// holding this facility's API key there.
    pub fn repository_of(&self, route: &RouteConfig) -> (String, PathBuf) {
        if !route.repository_url.is_empty() {
            let url = route.repository_url.trim_end_matches('/').to_owned();
            return (url, route.repository_api_key_file.clone());
        }
        if let Some(url) = self.embedded_url() {
            return (url, self.embedded_key_file());
        }
        let url = self.repository.url.trim_end_matches('/').to_owned();
        (url, self.repository.api_key_file.clone())
    }

    /// What a token for a document at `url` (a route's repository, as
    /// [`Config::repository_of`] gives it) names: the community code `[repositories]`
    /// lists for it (`"embedded"` for the embedded repository), else the whole URL.
    pub fn repository_ref(&self, url: &str) -> RepositoryRef {
        let url = url.trim_end_matches('/');
        let embedded = self.embedded_url();
        self.repositories
            .iter()
            .find(|(_, listed)| {
                if listed.as_str() == EMBEDDED {
                    embedded.as_deref() == Some(url)
                } else {
                    listed.trim_end_matches('/') == url
                }
            })
            .map_or_else(
                || RepositoryRef::Url(url.to_owned()),
                |(code, _)| RepositoryRef::Community(code.clone()),
            )
    }

    /// The base URL of a token's repository: its URL, or its community code looked up in
    /// `[repositories]`.
    ///
    /// # Errors
    /// [`UnknownCommunity`] for a code not listed, or listed as `"embedded"` on a daemon
    /// without an embedded repository.
    pub fn repository_url(&self, repository: &RepositoryRef) -> Result<String, UnknownCommunity> {
        let code = match repository {
            RepositoryRef::Url(url) => return Ok(url.trim_end_matches('/').to_owned()),
            RepositoryRef::Community(code) => code,
        };
        match self.repositories.get(code).map(String::as_str) {
            None => Err(UnknownCommunity::Unlisted(code.clone())),
            Some(EMBEDDED) => self
                .embedded_url()
                .ok_or_else(|| UnknownCommunity::NoEmbedded(code.clone())),
            Some(url) => Ok(url.trim_end_matches('/').to_owned()),
        }
    }

    /// The embedded repository's base URL, when this daemon runs one.
    fn embedded_url(&self) -> Option<String> {
        (self.repository.url == EMBEDDED)
            .then(|| format!("http://{}", self.repository.embedded_listen))
    }

    /// The watched folder of the inbound pipeline.
    pub fn watch_dir(&self) -> PathBuf {
        non_empty_or(&self.inbound.watch_dir, || {
            self.spool.data_dir.join("inbox")
        })
    }

    /// The web page's users file (`web.users_file`, default `<data_dir>/web-users`).
    pub fn web_users_file(&self) -> PathBuf {
        non_empty_or(&self.web.users_file, || {
            self.spool.data_dir.join("web-users")
        })
    }

    /// Where a route's tokens and slips are written.
    pub fn token_dir(&self, route: &str) -> PathBuf {
        let configured = self.routes.get(route).map(|r| r.token_dir.as_path());
        non_empty_or(configured.unwrap_or(Path::new("")), || {
            self.spool.data_dir.join("tokens").join(route)
        })
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

/// A repository the API key is sent to must be `https://`, or `http://` on loopback, or
/// allowed by `repository.allow_plain_http`: checked at start, not at the first upload.
fn check_plain_http(key: &str, url: &str, allowed: bool) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ConfigError::Value {
        key: key.to_owned(),
        value: format!("{url:?}"),
        problem: format!("not a URL ({e}); write e.g. https://pdi.example.jp"),
    })?;
    if parsed.scheme() == "http" && !crate::repository::client::is_loopback(&parsed) && !allowed {
        return Err(ConfigError::Value {
            key: key.to_owned(),
            value: format!("{url:?}"),
            problem: "plain http:// to another host would send the API key unencrypted: \
                      use https://, or set repository.allow_plain_http = true if this \
                      network is trusted"
                .into(),
        });
    }
    Ok(())
}

/// `host:port` with a port 1-65535, the host a name, an IPv4 address or a bracketed
/// IPv6 address (`[fd00::5]:104`).
fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !host.is_empty() && !host.contains(':') && !host.contains('/'),
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// The size of the file system holding `dir` (or its nearest existing parent: the data
/// folder may not exist yet), in MiB; `None` when it cannot be told.
fn disk_size_mb(dir: &Path) -> Option<u64> {
    let existing = dir
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())?;
    let stat = rustix::fs::statvfs(existing).ok()?;
    let bytes = stat.f_blocks.checked_mul(stat.f_frsize)?;
    (bytes > 0).then_some(bytes / (1 << 20))
}

/// Whether `program` is a file (a path with a `/`) or is found in `PATH`.
fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn non_empty_or(path: &Path, default: impl FnOnce() -> PathBuf) -> PathBuf {
    if path.as_os_str().is_empty() {
        default()
    } else {
        path.to_owned()
    }
}

/// AE titles are 1-16 characters of the Default Character Repertoire without backslash or
/// control characters (PS3.5 §6.2, VR AE); leading/trailing spaces are not significant.
fn check_ae_title(key: &str, title: &str) -> Result<(), ConfigError> {
    let trimmed = title.trim();
    if trimmed.is_empty()
        || trimmed.len() > 16
        || !trimmed
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return Err(value_error(
            key.into(),
            format!("{title:?}"),
            "not a valid AE title: 1-16 printable ASCII characters, no backslash",
        ));
    }
    Ok(())
}

/// A key whose value is well-formed but not usable; [`Config::load`] adds where it came
/// from (the file or the variable).
fn value_error(key: String, value: String, problem: &str) -> ConfigError {
    ConfigError::Value {
        key,
        value,
        problem: problem.to_owned(),
    }
}

/// Routes come as a table keyed by name, or as a list whose items carry `name`. A visitor
/// rather than an untagged enum, so that an error inside a route (a misspelt key, a
/// value of the wrong type) surfaces with its path instead of "did not match any variant".
fn routes_from_table_or_list<'de, D>(de: D) -> Result<BTreeMap<String, RouteConfig>, D::Error>
where
    D: Deserializer<'de>,
{
    struct Routes;
    impl<'de> serde::de::Visitor<'de> for Routes {
        type Value = BTreeMap<String, RouteConfig>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("[route.NAME] tables or a [[route]] list")
        }

        fn visit_map<A>(self, map: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::MapAccess<'de>,
        {
            BTreeMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }

        fn visit_seq<A>(self, seq: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::SeqAccess<'de>,
        {
            let list: Vec<RouteConfig> =
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
            Ok(list
                .into_iter()
                .enumerate()
                .map(|(i, route)| {
                    let name = route
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("route{}", i + 1));
                    (name, route)
                })
                .collect())
        }
    }
    de.deserialize_any(Routes)
}

/// A list in TOML, or a comma-separated string (the only list form an environment
/// variable can carry).
fn list_or_comma_string<'de, D>(de: D) -> Result<Vec<String>, D::Error>
where
    D: Deserializer<'de>,
{
    struct ListOrText;
    impl<'de> serde::de::Visitor<'de> for ListOrText {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list such as [\"A\", \"B\"] or comma-separated text \"A,B\"")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }

        fn visit_seq<A>(self, seq: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::SeqAccess<'de>,
        {
            Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    de.deserialize_any(ListOrText)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcode_is_shown_by_the_name_the_configuration_takes() {
        for mode in [Transcode::Never, Transcode::WhenRefused] {
            let shown = mode.to_string();
            let read = Transcode::deserialize(serde::de::value::StrDeserializer::<
                serde::de::value::Error,
            >::new(&shown));
            assert_eq!(read.ok(), Some(mode), "{shown}");
        }
        assert_eq!(
            InboundConfig::default().transcode.to_string(),
            "when-refused"
        );
    }

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write config");
        Config::load(&path)
    }

    /// The page is off by default; a LAN address needs HTTPS, certificate and key go
    /// together, and the session and lock-out numbers are at least 1.
    #[test]
    fn the_web_page_needs_https_off_loopback() {
        let off = parse("").expect("no [web]");
        assert_eq!(off.web.address().expect("empty"), None);
        let local = parse("[web]\nlisten = \"127.0.0.1:8443\"\n").expect("loopback");
        assert!(local.web.address().expect("address").is_some() && !local.web.https());
        let err = parse("[web]\nlisten = \"0.0.0.0:8443\"\n").expect_err("LAN without TLS");
        let text = err.to_string();
        assert!(
            text.contains("web.listen") && text.contains("web.certificate and web.key"),
            "{text}"
        );
        let lan =
            parse("[web]\nlisten = \"10.1.2.3:8443\"\ncertificate = \"c.pem\"\nkey = \"k.pem\"\n")
                .expect("LAN with TLS");
        assert!(lan.web.https());
        let err = parse("[web]\nlisten = \"127.0.0.1:1\"\ncertificate = \"c.pem\"\n")
            .expect_err("certificate without key");
        assert!(err.to_string().contains("go together"), "{err}");
        let err = parse("[web]\nlisten = \"localhost\"\n").expect_err("no port");
        assert!(err.to_string().contains("web.listen"), "{err}");
        let err = parse("[web]\nlisten = \"127.0.0.1:1\"\nlockout_after = 0\n").expect_err("zero");
        assert!(err.to_string().contains("web.lockout_after"), "{err}");
        let users = parse("[spool]\ndata_dir = \"/d\"\n").expect("default users file");
        assert_eq!(users.web_users_file(), Path::new("/d/web-users"));
    }

    /// The shipped file lists every key with its default: it must load, and every section
    /// (the route's too, with its AI support-image rules) must say what the code does
    /// when a key is left out. Only the route's AE title is not a default (a route
    /// needs one), nor the `[repositories]` entry of the embedded repository.
    #[test]
    fn the_shipped_configuration_loads_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(LOCAL_PATH);
        let shipped = Config::load(&path).expect("conf/cloudpdi.toml loads");
        let route = RouteConfig {
            ae_title: "CLOUDPDI".into(),
            ..RouteConfig::default()
        };
        // And [repositories] names the embedded repository (LOCAL), so the quick start
        // issues short tokens; by default no code is known and tokens carry URLs.
        let expected = Config {
            routes: BTreeMap::from([("ct".to_owned(), route)]),
            repositories: BTreeMap::from([("LOCAL".to_owned(), EMBEDDED.to_owned())]),
            ..Config::default()
        };
        assert_eq!(format!("{shipped:#?}"), format!("{expected:#?}"));
        assert_eq!(
            shipped.repository_ref(&shipped.repository_of(&shipped.routes["ct"]).0),
            RepositoryRef::Community("LOCAL".into())
        );
    }

    /// `CLOUDPDI_CONFIG` (and the other variables the commands read) name no key, so
    /// they are not taken for overrides; a `SECTION__KEY` variable still is.
    #[test]
    fn variables_without_a_section_are_not_overrides() {
        // The environment is process-wide: the test looks at the filter, not at a load.
        let found = |prefix, skip: &[&str]| {
            let all = [
                ("CLOUDPDI_CONFIG", "x"),
                ("CLOUDPDI_REPO_CONFIG", "x"),
                ("CLOUDPDI_REPOSITORY_API_KEY", "x"),
                ("CLOUDPDI_REPO_SERVER__LISTEN", "x"),
                ("CLOUDPDI_DICOM__LISTEN", "x"),
            ];
            all.iter()
                .filter(|(name, _)| load::override_name(name, prefix, skip))
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            found("CLOUDPDI_", &["CLOUDPDI_REPO_"]),
            ["CLOUDPDI_DICOM__LISTEN"]
        );
        assert_eq!(
            found("CLOUDPDI_REPO_", &[]),
            ["CLOUDPDI_REPO_SERVER__LISTEN"]
        );
    }

    #[test]
    fn table_and_list_routes_are_both_accepted() {
        let table =
            parse("[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 5\n").expect("table form");
        assert_eq!(table.routes["ct"].stable_after, 5);
        let list = parse("[[route]]\nname = \"mr\"\nae_title = \"MR\"\n").expect("list form");
        assert_eq!(list.routes["mr"].ae_title, "MR");
        assert_eq!(list.dicom.listen.port(), 11112);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err =
            parse("[route.ct]\nae_title = \"WAY_TOO_LONG_AE_TITLE\"\n").expect_err("long AE title");
        assert!(err.to_string().contains("route.ct.ae_title"), "{err}");
        let err = parse("[admin]\nlisten = \"0.0.0.0:1\"\n[route.ct]\nae_title = \"A\"\n")
            .expect_err("public admin");
        assert!(err.to_string().contains("loopback"), "{err}");
        let receiver = parse("").expect("a site without routes only receives");
        assert!(
            receiver
                .outbound_off_reason()
                .is_some_and(|r| r.contains("no [route.NAME]")),
            "{receiver:?}"
        );
        let err = parse("[route.a]\nae_title = \"X\"\n[route.b]\nae_title = \"X\"\n")
            .expect_err("duplicate AE");
        assert!(err.to_string().contains("uses this AE title too"), "{err}");
        let err = parse("[dicom]\nlisen = \"1.2.3.4:1\"\n[route.a]\nae_title = \"X\"\n")
            .expect_err("typo");
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    /// The path reaches inside routes (table or list form) and lists; enum values are
    /// listed from the type.
    #[test]
    fn errors_name_the_key_the_value_and_the_form() {
        let says = |toml: &str, parts: &[&str]| {
            let err = parse(toml).expect_err(toml).to_string();
            for part in parts {
                assert!(err.contains(part), "{part:?} not in {err}");
            }
        };
        says(
            "[[route]]\nname = \"mr\"\nae_title = \"MR\"\nstable_after = \"soon\"\n",
            &["route[0].stable_after = \"soon\"", "whole seconds"],
        );
        says(
            "[inbound]\npatient_id = \"prefixed\"\n",
            &["inbound.patient_id = \"prefixed\"", "keep, prefix"],
        );
        says(
            "[route.ct]\nae_title = \"CT\"\nallowed_callers = 5\n",
            &["route.ct.allowed_callers = 5", "comma-separated"],
        );
        says(
            "[route.ct]\nae_title = \"CT\"\n[route.ct.ai_support]\naction = \"lable\"\n",
            &[
                "route.ct.ai_support.action = \"lable\"",
                "include, exclude, label",
            ],
        );
        says(
            "[inbound]\npacs = \"[fd00::5]\"\n",
            &["inbound.pacs = \"[fd00::5]\"", "host:port"],
        );
        parse("[inbound]\npacs = \"[fd00::5]:104\"\n").expect("IPv6 PACS");
        says(
            "[repository]\nurl = \"http://10.1.2.3:8480\"\napi_key_file = \"/k\"\n\
             [route.ct]\nae_title = \"CT\"\n",
            &[
                "repository.url = \"http://10.1.2.3:8480\"",
                "allow_plain_http",
            ],
        );
    }

    /// A token names a listed repository by its code and any other by its URL; a
    /// received code resolves to its URL, an unknown one names the key to add.
    #[test]
    fn repositories_map_community_codes_both_ways() {
        let c = parse(
            "[repository]\nembedded_listen = \"127.0.0.1:11190\"\n\
             [repositories]\nLOCAL = \"embedded\"\nKINKI = \"https://pdi.kinki.example.jp/\"\n",
        )
        .expect("repositories");
        let community = |code: &str| RepositoryRef::Community(code.into());
        assert_eq!(
            c.repository_ref("http://127.0.0.1:11190"),
            community("LOCAL")
        );
        assert_eq!(
            c.repository_ref("https://pdi.kinki.example.jp"),
            community("KINKI")
        );
        assert_eq!(
            c.repository_ref("https://other.example.jp/"),
            RepositoryRef::Url("https://other.example.jp".into())
        );
        assert_eq!(
            c.repository_url(&community("LOCAL")).as_deref(),
            Ok("http://127.0.0.1:11190")
        );
        assert_eq!(
            c.repository_url(&community("KINKI")).as_deref(),
            Ok("https://pdi.kinki.example.jp")
        );
        let err = c.repository_url(&community("TOHOKU")).expect_err("unknown");
        assert!(
            err.to_string()
                .contains("community TOHOKU, which is not in [repositories]: add TOHOKU = \"URL\""),
            "{err}"
        );
        let remote = parse("[repository]\nurl = \"\"\n[repositories]\nLOCAL = \"embedded\"\n")
            .expect("receive only");
        assert_eq!(
            remote.repository_url(&community("LOCAL")),
            Err(UnknownCommunity::NoEmbedded("LOCAL".into()))
        );
        assert_eq!(
            remote.repository_ref("https://x.example"),
            RepositoryRef::Url("https://x.example".into())
        );
        for (bad, says) in [
            ("TOOLONG = \"https://x.example\"", "repositories.TOOLONG"),
            (
                "kinki = \"https://x.example\"",
                "1-6 characters of A-Z and 0-9",
            ),
            ("K = \"pdi.example.jp\"", "with its scheme"),
        ] {
            let err = parse(&format!("[repositories]\n{bad}\n")).expect_err(bad);
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_route_may_have_its_own_repository() {
        let c = parse(
            "[repository]\nurl = \"https://main.example.jp/\"\napi_key_file = \"/k\"\n\
             [route.ct]\nae_title = \"CT\"\n[route.far]\nae_title = \"FAR\"\n\
             repository_url = \"https://far.example.jp/\"\nrepository_api_key_file = \"/f\"\n",
        )
        .expect("route repository");
        let of = |route: &str| c.repository_of(&c.routes[route]);
        assert_eq!(of("ct"), ("https://main.example.jp".into(), "/k".into()));
        assert_eq!(of("far"), ("https://far.example.jp".into(), "/f".into()));
        let err = parse("[route.far]\nae_title = \"FAR\"\nrepository_url = \"https://far\"\n")
            .expect_err("no key file");
        assert!(
            err.to_string()
                .contains("route.far.repository_api_key_file"),
            "{err}"
        );
        let embedded = parse("[route.ct]\nae_title = \"CT\"\n").expect("embedded");
        let (url, key) = embedded.repository_of(&embedded.routes["ct"]);
        assert_eq!(url, "http://127.0.0.1:11190");
        assert!(key.ends_with("repository/api-key"), "{}", key.display());
    }

    #[test]
    fn allowed_callers_accept_a_comma_string() {
        let c = parse("[route.ct]\nae_title = \"CLOUDPDI\"\nallowed_callers = \"PACS, MOD1\"\n")
            .expect("comma list");
        assert_eq!(c.routes["ct"].allowed_callers, ["PACS", "MOD1"]);
    }

    #[test]
    fn the_facility_time_zone_and_contact_are_checked_at_start() {
        let route = "[route.ct]\nae_title = \"CLOUDPDI\"\n";
        let err = parse(&format!("{route}[facility]\ntime_zone = \"Asia/Tokio\"\n"))
            .expect_err("unknown zone");
        let err = err.to_string();
        assert!(
            err.contains("facility.time_zone") && err.contains("Asia/Tokio"),
            "{err}"
        );
        let ok = parse(&format!("{route}[facility]\ntime_zone = \"Asia/Tokyo\"\n"))
            .expect("a known zone");
        assert_eq!(ok.facility.time_zone, "Asia/Tokyo");
        let err = parse(&format!(
            "{route}[facility]\ncontact = \"{}\"\n",
            "0".repeat(61)
        ))
        .expect_err("long contact");
        assert!(err.to_string().contains("facility.contact"), "{err}");
        let err = parse(&format!(
            "{route}[facility]\nname = \"{}\"\n",
            "病".repeat(61)
        ))
        .expect_err("long name");
        assert!(err.to_string().contains("facility.name"), "{err}");
        let off = parse(&format!("{route}slip_patient_name = false\n")).expect("route option");
        assert!(!off.routes["ct"].slip_patient_name);
    }

    /// deliver_to and accept_from are refused at start without this facility's key, a
    /// pin for every facility named (a pin that parses), a shared repository and, to
    /// receive, a PACS; the poll interval is bounded.
    #[test]
    fn sealed_delivery_is_checked_at_start() {
        let pin = crate::facility::FacilityKey::generate()
            .expect("key")
            .public()
            .fingerprint()
            .to_string();
        let shared = "[repository]\nurl = \"https://pdi.example.jp\"\napi_key_file = \"/k\"\n";
        let key = "[facility]\ncode = \"HOSPA\"\nkey_file = \"/etc/cloudpdi/facility.key\"\n";
        let pins = format!("[facilities.HOSPB]\nfingerprint = \"{pin}\"\n");
        let route = "[route.ct]\nae_title = \"CT\"\ndeliver_to = [\"HOSPB\"]\n";
        let inbound = "[inbound]\npacs = \"127.0.0.1:4242\"\naccept_from = \"HOSPB\"\n";
        let says = |toml: &str, parts: &[&str]| {
            let err = parse(toml).expect_err(toml).to_string();
            for part in parts {
                assert!(err.contains(part), "{part:?} not in {err}");
            }
        };
        let sender = parse(&format!("{shared}{key}{pins}{route}")).expect("a sender");
        assert_eq!(sender.routes["ct"].deliver_to, ["HOSPB"]);
        assert!(sender.uses_facility_key());
        let receiver = parse(&format!("{shared}{key}{pins}{inbound}")).expect("a receiver");
        assert_eq!(receiver.inbound.accept_from, ["HOSPB"]);
        assert_eq!(receiver.inbound.mailbox_poll_interval, 30);
        says(
            &format!("{shared}{pins}{route}"),
            &["facility.key_file", "cloudpdi facility keygen"],
        );
        says(
            &format!("{shared}{key}{route}"),
            &["route.ct.deliver_to", "no pinned key", "[facilities.HOSPB]"],
        );
        says(
            &format!("{shared}{key}{inbound}"),
            &["inbound.accept_from", "no pinned key"],
        );
        says(
            &format!("{shared}{key}[facilities.HOSPB]\nfingerprint = \"7KQ2\"\n{route}"),
            &["facilities.HOSPB.fingerprint", "cloudpdi facility show"],
        );
        says(
            &format!("{key}{pins}{route}"),
            &["route.ct.deliver_to", "embedded repository"],
        );
        says(
            &format!("{shared}{key}{pins}[inbound]\naccept_from = [\"HOSPB\"]\n"),
            &["inbound.accept_from", "inbound.pacs"],
        );
        says(
            &format!("[repository]\nurl = \"https://pdi.example.jp\"\n{key}{pins}{inbound}"),
            &["repository.api_key_file", "inbound.accept_from"],
        );
        says(
            &format!("{shared}[facility]\nprevious_key_files = [\"/old.key\"]\n"),
            &["facility.previous_key_files", "facility.key_file"],
        );
        let rotated = parse(&format!(
            "{shared}[facility]\ncode = \"HOSPA\"\nkey_file = \"/new.key\"\n\
             previous_key_files = [\"/old.key\"]\n"
        ))
        .expect("a rotated key");
        assert_eq!(
            rotated.facility.previous_key_files,
            [PathBuf::from("/old.key")]
        );
        says(
            &format!("{shared}{key}{pins}{inbound}mailbox_poll_interval = 0\n"),
            &["inbound.mailbox_poll_interval", "between 1 and 3600"],
        );
        says(
            &format!(
                "{shared}{key}{pins}[route.ct]\nae_title = \"CT\"\ndeliver_to = [\"HOSP B\"]\n"
            ),
            &["route.ct.deliver_to", "facility code"],
        );
        says(
            &format!("{shared}[facilities.\"HOSP B\"]\nfingerprint = \"{pin}\"\n"),
            &["facilities.HOSP B", "facility code"],
        );
    }

    /// The outbound stream's zstd level, zstd threads and parts in flight are refused out
    /// of range, naming the key and the range.
    #[test]
    fn outbound_stream_settings_are_bounded() {
        for (setting, says) in [
            ("zstd_level = 0", "between 1 and 19"),
            ("zstd_level = 20", "between 1 and 19"),
            (
                "zstd_threads = 9",
                "between 0 (one per core, at most 8) and 8",
            ),
            ("parts_in_flight = 0", "between 1 and 16"),
            ("parts_in_flight = 17", "between 1 and 16"),
        ] {
            let err = parse(&format!("[outbound]\n{setting}\n"))
                .expect_err(setting)
                .to_string();
            let key = setting.split(' ').next().unwrap_or_default();
            assert!(
                err.contains(&format!("outbound.{key}")) && err.contains(says),
                "{setting}: {err}"
            );
        }
        let fine = parse("[outbound]\nzstd_level = 19\nzstd_threads = 8\nparts_in_flight = 16\n")
            .expect("the largest values load");
        assert_eq!(fine.outbound.parts_in_flight, MAX_PARTS_IN_FLIGHT);
    }
}
