//! The repository client the gateway uses: create, resumable part upload, ranged resumable
//! download, receipt, status, revoke, extend; the directory of facilities and the mailbox of
//! sealed tokens.
//!
//! Memory does not grow with the document: parts are streamed from the file and
//! downloads are streamed to it. Transient failures (connection refused or dropped,
//! timeouts, 5xx, 408, 429) are retried with exponential back-off and jitter; a refusal
//! (other 4xx) is not. [`ClientError::is_permanent`] tells a job whether waiting can help.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderValue, RANGE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use zeroize::Zeroizing;

use crate::repository::api::{
    self, Complete, Created, DocumentStatus, ErrorBody, NOT_AVAILABLE, NewDocument, PartsHash,
    Receipt, State, WholeHash,
};
use crate::token::DownloadProof;

/// How long an idle connection is kept for the next request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Read size when streaming a part from the file being uploaded.
const UPLOAD_READ_CHUNK: usize = 256 * 1024;
/// Received chunks waiting for the download's writer thread.
const SINK_QUEUE: usize = 8;
/// Buffer in front of the file being downloaded, so the disk sees large writes.
const DOWNLOAD_WRITE_BUFFER: usize = 1024 * 1024;
/// Most bytes of an error answer that are read: the repository's JSON error is a few
/// hundred bytes; the rest of a longer (or endless) body is never read.
pub const MAX_ERROR_BODY: usize = 8 * 1024;
/// Most bytes of a JSON answer (a document's status lists the parts it holds: a few
/// hundred KiB for the largest documents); a longer answer is refused unread.
pub const MAX_JSON_BODY: usize = 4 << 20;
/// Characters of a refused answer shown in an error message (escaped).
const EXCERPT_CHARS: usize = 200;

/// Why a repository call failed, and whether trying again later can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The repository does not offer the document to this proof: the token is wrong,
    /// expired or revoked, or its downloads are used up. Permanent.
    #[error(
        "the token is wrong, expired or revoked (or its downloads are used up); \
         ask the sending hospital for a new token"
    )]
    NotAvailable,
    /// The repository refused the request (4xx). Permanent.
    #[error("the repository refused the request ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stable error code from the repository.
        code: String,
        /// The repository's sentence.
        message: String,
    },
    /// The repository could not be reached or kept failing. Transient: retry later.
    #[error(
        "the repository is unreachable or failing after {attempts} attempts ({last}); it will be retried later"
    )]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// What arrived or was stored does not match its SHA-256 or size (the partial
    /// download was removed, or the server dropped the parts). Transient: start over.
    #[error("transfer check failed: {0}; the transfer will start over")]
    Integrity(String),
    /// The local file cannot be read or written. Transient (disk full, permissions).
    #[error("local file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The local file does not fit the document (wrong size). Permanent.
    #[error("{0}")]
    Mismatch(String),
    /// The client cannot be built (bad URL, certificate, plain http). Permanent.
    #[error("repository client setup: {0}")]
    Setup(String),
    /// The repository answered with a redirect, which is never followed: the API key or
    /// download proof must not reach another address. Permanent.
    #[error(
        "the repository answered {status} redirecting to {to}; redirects are not followed \
         (the API key or download proof must not go to another address): use the final \
         address as the repository URL if it is trusted"
    )]
    Redirected {
        /// HTTP status.
        status: u16,
        /// The origin (scheme, host, port) the answer pointed at.
        to: String,
    },
    /// The repository's answer is longer than any answer of a repository. Permanent.
    #[error(
        "the repository's answer is larger than {limit} bytes, more than any valid answer; \
         check that the repository URL points at a Cloud-PDI repository"
    )]
    AnswerTooLarge {
        /// The bound that was reached.
        limit: usize,
    },
    /// The document is larger than this receiver accepts. Permanent.
    #[error(
        "the document has {size} bytes, more than the {limit} bytes this receiver accepts \
         ({key}); nothing was kept; raise {key} if the study is expected to be this large"
    )]
    DocumentTooLarge {
        /// The size the repository announced.
        size: u64,
        /// The configured bound.
        limit: u64,
        /// The configuration key of the bound.
        key: &'static str,
    },
    /// The disk cannot hold the document. Transient: it is tried again later.
    #[error(
        "No space left for the download: {need} bytes needed in {dir}, {free} free (of \
         which {reserve} stay free for the rest of the system); nothing was kept; free disk \
         space, the download is tried again later"
    )]
    NoSpace {
        /// Bytes still to be written.
        need: u64,
        /// Bytes free for an unprivileged writer.
        free: u64,
        /// Bytes that always stay free.
        reserve: u64,
        /// The folder of the download.
        dir: String,
    },
}

impl ClientError {
    /// A download that does not hold the bytes the repository was given (its hash says
    /// so): the client's own check, or its caller's when that authenticates itself
    /// ([`DownloadCheck::ByCaller`]).
    pub fn not_the_repositorys_bytes() -> ClientError {
        ClientError::Integrity("the downloaded bytes do not have the repository's SHA-256".into())
    }

    /// Whether retrying later cannot help (the job should stop and report).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ClientError::NotAvailable
                | ClientError::Refused { .. }
                | ClientError::Mismatch(_)
                | ClientError::Setup(_)
                | ClientError::Redirected { .. }
                | ClientError::AnswerTooLarge { .. }
                | ClientError::DocumentTooLarge { .. }
        )
    }
}

/// Why [`Client::for_facility`] could not make a client: the caller adds which setting
/// to fix, as it knows which part of the configuration named the key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FacilityClientError {
    /// The API key file cannot be read.
    #[error("cannot read the repository API key from {} ({source})", crate::telemetry::escape(&.path.display().to_string()))]
    KeyFile {
        /// The key file.
        path: std::path::PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
    /// The client cannot be built (bad URL, plain http).
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Who checks that a download holds the document's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadCheck {
    /// The client, against the repository's SHA-256 (size and hash after the last byte):
    /// for bytes nobody else checks (`cloudpdi repository download`).
    Sha256,
    /// The caller: it opens the container while it downloads, and the container's AEAD
    /// authenticates every chunk and its end, so a byte the repository changed (or a
    /// truncated file) fails there already. Hashing the same bytes again would cost a
    /// CPU pass of the whole document on the receiver's busiest path for nothing. Nor is
    /// the file synced at the end (a flush of the whole document, which stalls every
    /// other writer of the disk, the PACS among them): the caller reads it at once, and a
    /// copy a power cut damaged fails the same authentication.
    ByCaller,
}

/// What a finished download got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// The document's size in bytes.
    pub size: u64,
    /// The facility that created the document, as the repository names it
    /// ([`api::FACILITY_HEADER`]); `None` when the repository does not say. The token no
    /// longer carries its issuer: this is where the receiver learns it.
    pub facility: Option<String>,
    /// The repository's hash of the document as its answer named it, for a caller that
    /// authenticates the bytes itself ([`DownloadCheck::ByCaller`]).
    pub hash: Option<RepositoryHash>,
}

/// The repository's own hash of a document. A caller that authenticates the bytes itself
/// ([`DownloadCheck::ByCaller`]) compares against it only when that fails, to tell a
/// repository serving other bytes than it was given (worth downloading again) from a
/// container that was damaged before it was uploaded, or a wrong token (final).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepositoryHash(Expected);

impl RepositoryHash {
    /// Whether `file` holds other bytes than the repository's hash says (reads it whole).
    ///
    /// # Errors
    /// [`ClientError::File`] when the file cannot be read.
    pub async fn differs(&self, file: &Path) -> Result<bool, ClientError> {
        let len = file_len(file).await?;
        let (part_size, wanted) = match self.0 {
            Expected::Whole(sha256) => (None, sha256),
            Expected::Parts { digest, part_size } => (Some(part_size), digest),
        };
        let hashed = hash_range(file, 0, len, ContentHasher::new(part_size)).await?;
        Ok(hashed.finalize() != wanted)
    }
}

/// Timeouts, retries and TLS material of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Whole-request limit of small JSON calls.
    pub request_timeout: Duration,
    /// Longest silence while reading an answer (transfers have no total limit).
    pub read_timeout: Duration,
    /// Whole-request limit of one part upload.
    pub part_timeout: Duration,
    /// Parts uploaded at once, so the server's per-part fsync overlaps the transfers.
    pub parallel_parts: usize,
    /// Attempts per call (a download that makes progress starts counting again).
    pub max_attempts: u32,
    /// First back-off delay; doubled each attempt, with jitter.
    pub backoff_base: Duration,
    /// Longest back-off delay.
    pub backoff_max: Duration,
    /// Extra CA certificate (PEM) to trust, e.g. a hospital network's own CA.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM), for facilities authenticated by certificate.
    pub identity_pem: Option<Zeroizing<Vec<u8>>>,
    /// Whether an `http://` repository on a non-loopback host is allowed: the API key or
    /// download proof would cross the network in clear text.
    pub allow_plain_http: bool,
    /// The configuration key that sets [`ClientOptions::allow_plain_http`], named in
    /// the refusal so that the administrator knows what to change.
    pub plain_http_key: &'static str,
    /// Largest document downloaded (bytes); a larger one is refused before anything is
    /// written.
    pub max_download_bytes: u64,
    /// The configuration key of [`ClientOptions::max_download_bytes`], named in the refusal.
    pub max_download_key: &'static str,
    /// Bytes of the download's file system that stay free (at most; never more than 5%
    /// of the file system): a download that would leave less is refused before anything
    /// is written.
    pub disk_reserve_bytes: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(60),
            part_timeout: Duration::from_secs(600),
            parallel_parts: 4,
            max_attempts: 6,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            ca_certificate_pem: None,
            identity_pem: None,
            allow_plain_http: false,
            plain_http_key: "inbound.allow_plain_http",
            max_download_bytes: DEFAULT_MAX_DOWNLOAD_BYTES,
            max_download_key: "inbound.max_document_mb",
            disk_reserve_bytes: DEFAULT_DISK_RESERVE_BYTES,
        }
    }
}

/// Default of [`ClientOptions::max_download_bytes`]: 20 GiB, the default of
/// `inbound.max_document_mb` (a CT/MR study can be several GB).
pub const DEFAULT_MAX_DOWNLOAD_BYTES: u64 = 20 << 30;
/// Default of [`ClientOptions::disk_reserve_bytes`]: 1 GiB (or 5% of a smaller file
/// system) stays free for the database, the spool and the logs.
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = 1 << 30;

/// A failed attempt: retry, or give up with this error.
enum Failure {
    Transient(String),
    Permanent(ClientError),
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Self {
        Failure::Transient(describe(&e))
    }
}

/// A reqwest error with its causes, which hold the useful part ("connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A repository client; cheap to clone and share between jobs.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<Arc<Zeroizing<String>>>,
    options: Arc<ClientOptions>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// The client of this facility at the repository at `base_url`, with its API key read
    /// from `key_file` (`repository.api_key_file`, a route's own, or the embedded
    /// repository's): the one place where the gateway (sender, mailbox, start check)
    /// reads a facility's key, so that they all trim it and refuse plain http alike.
    ///
    /// # Errors
    /// [`FacilityClientError::KeyFile`] when the file cannot be read, else as
    /// [`Client::new`].
    pub fn for_facility(
        base_url: &str,
        key_file: &Path,
        allow_plain_http: bool,
    ) -> Result<Client, FacilityClientError> {
        let key = std::fs::read_to_string(key_file)
            .map(Zeroizing::new)
            .map_err(|source| FacilityClientError::KeyFile {
                path: key_file.to_owned(),
                source,
            })?;
        let options = ClientOptions {
            allow_plain_http,
            plain_http_key: "repository.allow_plain_http",
            ..ClientOptions::default()
        };
        Ok(Client::new(base_url, Some(key.trim().to_owned()), options)?)
    }

    /// A client for the repository at `base_url` (`https://...`, or `http://` on
    /// loopback), sending `api_key` on facility calls.
    ///
    /// # Errors
    /// [`ClientError::Setup`] for a bad URL or TLS material.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| ClientError::Setup(format!("repository URL {base:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ClientError::Setup(format!(
                "repository URL {base:?} must start with https:// (or http://)"
            )));
        }
        if url.scheme() == "http" && !is_loopback(&url) && !options.allow_plain_http {
            return Err(ClientError::Setup(format!(
                "repository URL {base:?} is plain http:// to another host: the API key or \
                 download proof would cross the network unencrypted; use https://, or set {} \
                 = true if this network is trusted",
                options.plain_http_key
            )));
        }
        crate::repository::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            // A redirect would carry the proof or key to another address: none is followed.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            // Below the server's default header_timeout (30 s), which also closes idle
            // keep-alive connections: the client drops them first rather than race it.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .use_rustls_tls();
        if let Some(pem) = &options.ca_certificate_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientError::Setup(format!("CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some(pem) = &options.identity_pem {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| ClientError::Setup(format!("client certificate: {e}")))?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Setup(describe(&e)))?;
        Ok(Client {
            http,
            base,
            api_key: api_key.map(|k| Arc::new(Zeroizing::new(k))),
            options: Arc::new(options),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/documents{path}", self.base)
    }

    /// A facility request about documents (`/v1/documents{path}`) with the API key.
    fn facility_request(&self, method: Method, path: &str) -> RequestBuilder {
        self.keyed(method, self.url(path))
    }

    /// A request to `url` with the facility's API key.
    fn keyed(&self, method: Method, url: String) -> RequestBuilder {
        let request = self.http.request(method, url);
        match &self.api_key {
            Some(key) => {
                let bearer = Zeroizing::new(format!("Bearer {}", key.as_str()));
                let mut value =
                    HeaderValue::from_str(&bearer).unwrap_or_else(|_| HeaderValue::from_static(""));
                value.set_sensitive(true);
                request.header(reqwest::header::AUTHORIZATION, value)
            }
            None => request,
        }
    }

    /// A receiver request with the download proof.
    fn receiver(&self, method: Method, path: &str, proof: &DownloadProof) -> RequestBuilder {
        let hex = Zeroizing::new(hex::encode(proof.bytes()));
        let mut value = HeaderValue::from_str(&hex).expect("hex is a valid header value");
        value.set_sensitive(true);
        self.http
            .request(method, self.url(path))
            .header(api::PROOF_HEADER, value)
    }

    async fn backoff(&self, attempt: u32) {
        let exp = self
            .options
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.options.backoff_max);
        let mut random = [0u8; 8];
        let jitter = match getrandom::fill(&mut random) {
            Ok(()) => u64::from_le_bytes(random) % 1000,
            Err(_) => 500,
        };
        // Equal jitter: between half and all of the exponential delay.
        let delay = exp / 2 + exp.mul_f64(jitter as f64 / 2000.0);
        tokio::time::sleep(delay).await;
    }

    /// Counts one transient failure (`last`) in `tries`: gives up once attempts run out,
    /// else logs `what` and waits (exponential back-off) before the attempt that will
    /// `then` follow.
    async fn wait_to_retry(
        &self,
        tries: &mut u32,
        last: String,
        what: &str,
        then: &str,
    ) -> Result<(), ClientError> {
        *tries += 1;
        if *tries >= self.options.max_attempts {
            return Err(ClientError::Unavailable {
                attempts: *tries,
                last,
            });
        }
        tracing::debug!("{what} ({last}); {then}");
        self.backoff(*tries - 1).await;
        Ok(())
    }

    /// Runs `attempt` until it succeeds, fails permanently, or attempts run out.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(Failure::Permanent(e)) => return Err(e),
                Err(Failure::Transient(last)) => {
                    self.wait_to_retry(&mut tries, last, "repository call failed", "retrying")
                        .await?;
                }
            }
        }
    }

    /// Sends a JSON call and reads a JSON answer, with retries.
    async fn json<T: for<'de> serde::Deserialize<'de>>(
        &self,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        self.retrying(|| async {
            let response = build().timeout(self.options.request_timeout).send().await?;
            let response = check(response).await?;
            let (body, complete) = read_limited(response, MAX_JSON_BODY).await?;
            if !complete {
                return Err(Failure::Permanent(ClientError::AnswerTooLarge {
                    limit: MAX_JSON_BODY,
                }));
            }
            serde_json::from_slice::<T>(&body).map_err(|e| {
                Failure::Transient(format!("the answer is not the expected JSON: {e}"))
            })
        })
        .await
    }

    /// Creates a document; the answer carries its ID and part layout.
    ///
    /// Not idempotent: a create whose answer was lost leaves an unused document that
    /// expires on its own.
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` for limits (size, expiry) or a wrong key.
    pub async fn create(&self, document: &NewDocument) -> Result<Created, ClientError> {
        self.json(|| self.facility_request(Method::POST, "").json(document))
            .await
    }

    /// The sender's view of a document.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn status(&self, document_id: &str) -> Result<DocumentStatus, ClientError> {
        let path = format!("/{}", checked_id(document_id)?);
        self.json(|| self.facility_request(Method::GET, &path))
            .await
    }

    /// Revokes a document: no more downloads, content deleted. Idempotent.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn revoke(&self, document_id: &str) -> Result<DocumentStatus, ClientError> {
        let path = format!("/{}", checked_id(document_id)?);
        self.json(|| self.facility_request(Method::DELETE, &path))
            .await
    }

    /// Extends a document's expiry to `expires_at` (Unix seconds): later than its current
    /// one, within the repository's `server.max_expiry_days`. Not idempotent: a repeat
    /// (or a retry after a lost answer) is refused `invalid_expiry` ("not later"), so a
    /// caller that repeats reads [`Client::status`] to tell it was done.
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` with code [`api::INVALID_EXPIRY`] for an expiry not later
    /// or beyond the limit (the message names it), [`api::GONE`] for a revoked or expired
    /// document.
    pub async fn extend(
        &self,
        document_id: &str,
        expires_at: u64,
    ) -> Result<DocumentStatus, ClientError> {
        let path = format!("/{}", checked_id(document_id)?);
        let body = api::Extend { expires_at };
        self.json(|| self.facility_request(Method::PATCH, &path).json(&body))
            .await
    }

    /// Sends a receipt after import.
    ///
    /// # Errors
    /// [`ClientError`]; `NotAvailable` when the proof does not open the document.
    pub async fn receipt(
        &self,
        document_id: &str,
        proof: &DownloadProof,
        receipt: &Receipt,
    ) -> Result<(), ClientError> {
        let path = format!("/{}/receipts", checked_id(document_id)?);
        self.json::<serde_json::Value>(|| self.receiver(Method::POST, &path, proof).json(receipt))
            .await
            .map(drop)
    }

    /// The directory entry of facility `code`: its name and public key (whose
    /// fingerprint the caller checks against its pin before sealing to it).
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` with code `unknown_facility` (404) when the repository
    /// has no key for it.
    pub async fn facility(&self, code: &str) -> Result<api::FacilityEntry, ClientError> {
        let url = format!("{}/v1/facilities/{}", self.base, checked_code(code)?);
        self.json(|| self.keyed(Method::GET, url.clone())).await
    }

    /// Posts `sealed` (a sealed token) to `recipient`'s mailbox. Idempotent: the same
    /// bytes posted again (a retry after a lost answer) are the same message.
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` for an unknown recipient or a body that is not sealed;
    /// `Unavailable` (transient) when the mailbox stays full (429 `mailbox_full`).
    pub async fn post_message(
        &self,
        recipient: &str,
        sealed: &[u8],
    ) -> Result<api::Posted, ClientError> {
        if sealed.len() > api::MAX_MESSAGE_LEN {
            return Err(ClientError::Mismatch(format!(
                "a mailbox message is at most {} bytes; this one has {}",
                api::MAX_MESSAGE_LEN,
                sealed.len()
            )));
        }
        let url = format!(
            "{}/v1/mailboxes/{}/messages",
            self.base,
            checked_code(recipient)?
        );
        let body = bytes::Bytes::copy_from_slice(sealed);
        self.json(|| {
            self.keyed(Method::POST, url.clone())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )
                .body(body.clone())
        })
        .await
    }

    /// The messages waiting in this facility's own mailbox, oldest first (at most
    /// [`api::MAX_LISTED_MESSAGES`]: delete what was imported and list again).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn messages(&self) -> Result<Vec<api::MessageInfo>, ClientError> {
        let url = format!("{}/v1/mailbox/messages", self.base);
        let messages: Vec<api::MessageInfo> =
            self.json(|| self.keyed(Method::GET, url.clone())).await?;
        if messages.len() > api::MAX_LISTED_MESSAGES
            || messages
                .iter()
                .any(|m| !api::is_message_id(&m.message_id) || !crate::facility::is_code(&m.sender))
        {
            return Err(ClientError::Mismatch(
                "the repository's mailbox list is not valid (too many entries, or a \
                 malformed message ID or sender); check the repository URL"
                    .into(),
            ));
        }
        Ok(messages)
    }

    /// The sealed bytes of message `id` of this facility's mailbox (at most
    /// [`api::MAX_MESSAGE_LEN`]; a longer answer is refused unread).
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` with code `not_found` (404) when it is not there.
    pub async fn message(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}/v1/mailbox/messages/{}", self.base, checked_message(id)?);
        self.retrying(|| async {
            let response = self
                .keyed(Method::GET, url.clone())
                .timeout(self.options.request_timeout)
                .send()
                .await?;
            let response = check(response).await?;
            let (body, complete) = read_limited(response, api::MAX_MESSAGE_LEN).await?;
            if !complete {
                return Err(Failure::Permanent(ClientError::AnswerTooLarge {
                    limit: api::MAX_MESSAGE_LEN,
                }));
            }
            Ok(body)
        })
        .await
    }

    /// Deletes message `id` from this facility's mailbox. Idempotent: an absent message
    /// is no error.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn delete_message(&self, id: &str) -> Result<(), ClientError> {
        let url = format!("{}/v1/mailbox/messages/{}", self.base, checked_message(id)?);
        self.retrying(|| async {
            let response = self
                .keyed(Method::DELETE, url.clone())
                .timeout(self.options.request_timeout)
                .send()
                .await?;
            check(response).await?;
            Ok(())
        })
        .await
    }

    /// Uploads `path` as the content of `document_id`, resuming from the parts the
    /// server already holds, and completes it with the SHA-256 of each part (or, with a
    /// repository older than that form, of the whole file). Idempotent: a complete
    /// document is left as it is. `progress` gets the bytes done so far.
    ///
    /// # Errors
    /// [`ClientError`]; `Mismatch` when the file size differs from the document's.
    pub async fn upload_file(
        &self,
        document_id: &str,
        path: &Path,
        progress: impl Fn(u64),
    ) -> Result<DocumentStatus, ClientError> {
        self.upload_from(document_id, path, None, progress).await
    }

    /// As [`Client::upload_file`] for a streamed document whose parts may come from
    /// several attempts: a part the server holds is skipped only if it is also in
    /// `acknowledged` (the parts of this very file the server confirmed); the others are
    /// sent again from the file.
    ///
    /// # Errors
    /// As [`Client::upload_file`].
    pub async fn resume_upload(
        &self,
        document_id: &str,
        path: &Path,
        acknowledged: &std::collections::BTreeSet<u32>,
        progress: impl Fn(u64),
    ) -> Result<DocumentStatus, ClientError> {
        self.upload_from(document_id, path, Some(acknowledged), progress)
            .await
    }

    async fn upload_from(
        &self,
        document_id: &str,
        path: &Path,
        acknowledged: Option<&std::collections::BTreeSet<u32>>,
        progress: impl Fn(u64),
    ) -> Result<DocumentStatus, ClientError> {
        let status = self.status(document_id).await?;
        match status.state {
            State::Complete => return Ok(status),
            State::Revoked | State::Expired => {
                return Err(ClientError::Refused {
                    status: 409,
                    code: format!("{:?}", status.state).to_lowercase(),
                    message: "the document can no longer be uploaded".into(),
                });
            }
            State::Uploading => {}
        }
        let size = tokio::fs::metadata(path)
            .await
            .map_err(file_error(path))?
            .len();
        // A streamed document's size is 0 until its completion fixes it.
        if size != status.size && status.size != 0 {
            return Err(ClientError::Mismatch(format!(
                "{} has {size} bytes but the document was created for {}",
                path.display(),
                status.size
            )));
        }
        let part_size = status.part_size.max(1);
        let parts = u32::try_from(size.div_ceil(part_size))
            .map_err(|_| ClientError::Mismatch("too many parts".into()))?;
        let held: std::collections::BTreeSet<u32> = status
            .parts_held
            .iter()
            .copied()
            .filter(|n| *n < parts && acknowledged.is_none_or(|a| a.contains(n)))
            .collect();
        let part_len = |n: u32| (size - u64::from(n) * part_size).min(part_size);
        let missing: Vec<u32> = (0..parts).filter(|n| !held.contains(n)).collect();
        let mut done: u64 = held.iter().map(|&n| part_len(n)).sum();
        progress(done);
        // The part hashes are read from the file beside the uploads, so parts can go in
        // any order and several at once; the server checks them against what it recorded.
        let hashing = part_hashes(path, size, part_size);
        let file = &Arc::new(std::fs::File::open(path).map_err(file_error(path))?);
        let uploading = async {
            let mut sends = futures_util::stream::iter(missing)
                .map(|n| async move {
                    let offset = u64::from(n) * part_size;
                    let len = part_len(n);
                    self.put_part_at(document_id, file, path, n, offset, len)
                        .await
                        .map(|_| len)
                })
                .buffer_unordered(self.options.parallel_parts.max(1));
            while let Some(len) = sends.try_next().await? {
                done += len;
                progress(done);
            }
            Ok::<(), ClientError>(())
        };
        let (hashes, ()) = tokio::try_join!(hashing, uploading)?;
        match self.complete_parts(document_id, size, &hashes).await {
            // A repository older than the parts form cannot parse it (400
            // `invalid_request`): complete with the whole-file hash (it reads the parts
            // back). Any other refusal (a wrong size) is the answer itself.
            Err(ClientError::Refused {
                status: 400, code, ..
            }) if code == "invalid_request" => {
                let sha256: [u8; 32] = hash_range(path, 0, size, Sha256::new())
                    .await?
                    .finalize()
                    .into();
                self.complete_with(document_id, &Complete::Whole(WholeHash { sha256 }))
                    .await
            }
            other => other,
        }
    }

    /// Part `n` of a document from bytes in memory (the streaming sender's parts), retried
    /// on transient failures like [`Client::upload_file`]'s parts.
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` for a part the document cannot take.
    pub async fn put_part_bytes(
        &self,
        document_id: &str,
        n: u32,
        bytes: bytes::Bytes,
    ) -> Result<(), ClientError> {
        let path = format!("/{}/parts/{n}", checked_id(document_id)?);
        self.retrying(|| async {
            let response = self
                .facility_request(Method::PUT, &path)
                .header(CONTENT_LENGTH, bytes.len())
                .timeout(self.options.part_timeout)
                .body(bytes.clone())
                .send()
                .await?;
            check(response).await?;
            Ok(())
        })
        .await
    }

    /// Completes a document with its size and the SHA-256 of each part, in order
    /// ([`api::Complete::Parts`]): the repository checks them without reading the content.
    /// Idempotent for the same size and hashes.
    ///
    /// # Errors
    /// [`ClientError`]; `Integrity` when the repository's recorded hashes differ (it
    /// deleted the parts); `Refused` 409 `incomplete` when parts are missing.
    pub async fn complete_parts(
        &self,
        document_id: &str,
        size: u64,
        part_hashes: &[[u8; 32]],
    ) -> Result<DocumentStatus, ClientError> {
        let request = Complete::Parts(PartsHash {
            size,
            parts_sha256: api::parts_digest(part_hashes),
        });
        self.complete_with(document_id, &request).await
    }

    async fn complete_with(
        &self,
        document_id: &str,
        request: &Complete,
    ) -> Result<DocumentStatus, ClientError> {
        let complete_path = format!("/{}/complete", checked_id(document_id)?);
        let result = self
            .json(|| {
                self.facility_request(Method::POST, &complete_path)
                    .json(request)
            })
            .await;
        match result {
            Err(ClientError::Refused { code, message, .. }) if code == "hash_mismatch" => {
                Err(ClientError::Integrity(message))
            }
            other => other,
        }
    }

    /// Part `n` of a document: `len` bytes of `file` from `offset`, read at that offset
    /// (the file may have been renamed, or still grow beyond the part, meanwhile) and
    /// streamed, never held whole in memory; hashed as it is sent. Retried on transient
    /// failures like [`Client::upload_file`]'s parts. `path` names the file in errors.
    /// Returns the SHA-256 of the part the repository acknowledged.
    ///
    /// # Errors
    /// [`ClientError`]; `Refused` for a part the document cannot take, `File` when the
    /// file cannot be read.
    pub async fn put_part_at(
        &self,
        document_id: &str,
        file: &Arc<std::fs::File>,
        path: &Path,
        n: u32,
        offset: u64,
        len: u64,
    ) -> Result<[u8; 32], ClientError> {
        let document_id = checked_id(document_id)?;
        self.retrying(|| self.put_part(document_id, file, path, n, offset, len))
            .await
    }

    /// One attempt at part `n`, streamed from `file` and hashed as it goes.
    async fn put_part(
        &self,
        document_id: &str,
        file: &Arc<std::fs::File>,
        path: &Path,
        n: u32,
        offset: u64,
        len: u64,
    ) -> Result<[u8; 32], Failure> {
        let sent = Arc::new(std::sync::Mutex::new((Sha256::new(), 0u64)));
        let body = part_body(Arc::clone(file), path, offset, len, Arc::clone(&sent));
        let response = self
            .facility_request(Method::PUT, &format!("/{document_id}/parts/{n}"))
            .header(CONTENT_LENGTH, len)
            .timeout(self.options.part_timeout)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await?;
        check(response).await?;
        let (hasher, hashed) = std::mem::take(
            &mut *sent
                .lock()
                .map_err(|_| Failure::Transient("a part hash was poisoned".into()))?,
        );
        if hashed != len {
            return Err(Failure::Permanent(ClientError::Mismatch(format!(
                "{} had {hashed} of the {len} bytes of part {n} when it was sent",
                path.display()
            ))));
        }
        Ok(hasher.finalize().into())
    }

    /// Downloads the document into `partial`, appending to what an earlier attempt left
    /// there (HTTP Range), until the whole document is there; the file is synced and its
    /// size and SHA-256 checked. `progress` gets the bytes held so far. Returns the size
    /// and the facility that created the document ([`api::FACILITY_HEADER`]).
    ///
    /// Not cancel-safe: when the future is dropped mid-transfer, the writer thread still
    /// appends the chunks it was handed (at most a few MiB) before it stops, so a new
    /// download into the same file must not start in the same process until it has (the
    /// daemon only drops it when it stops).
    ///
    /// # Errors
    /// [`ClientError`]; `NotAvailable` when the proof does not open the document;
    /// `Integrity` (partial file removed) when the result does not match.
    pub async fn download_to(
        &self,
        document_id: &str,
        proof: &DownloadProof,
        partial: &Path,
        progress: impl Fn(u64),
    ) -> Result<Downloaded, ClientError> {
        self.download_to_named(
            document_id,
            proof,
            partial,
            DownloadCheck::Sha256,
            |_, _| {},
            progress,
        )
        .await
    }

    /// As [`Client::download_to`], and `named` gets the facility that created the
    /// document ([`Downloaded::facility`]) and the document's size in bytes as soon as an
    /// answer of the repository names them, before its bytes: a receiver that imports while
    /// it downloads needs the issuer (its Patient ID prefix) at the start, not at the end,
    /// and the size to know the room the rest of the download will take. Called once per
    /// answer accepted (again after a resume). `check` says whether the repository's
    /// SHA-256 is checked here or the caller authenticates every byte itself.
    ///
    /// # Errors
    /// As [`Client::download_to`]; with [`DownloadCheck::ByCaller`], no `Integrity` for
    /// bytes that differ from the repository's hash (the caller's check finds them).
    pub async fn download_to_named(
        &self,
        document_id: &str,
        proof: &DownloadProof,
        partial: &Path,
        check: DownloadCheck,
        named: impl Fn(Option<&str>, u64),
        progress: impl Fn(u64),
    ) -> Result<Downloaded, ClientError> {
        let path = format!("/{}/content", checked_id(document_id)?);
        let mut hashed = Hashed {
            enabled: check == DownloadCheck::Sha256,
            ..Hashed::default()
        };
        let mut tries = 0;
        loop {
            let before = file_len(partial).await?;
            match self
                .download_attempt(&path, proof, partial, &mut hashed, (&named, &progress))
                .await
            {
                Ok(size) => return Ok(size),
                Err(Failure::Permanent(e)) => return Err(e),
                Err(Failure::Transient(last)) => {
                    if file_len(partial).await? > before {
                        tries = 0;
                    }
                    self.wait_to_retry(&mut tries, last, "download interrupted", "resuming")
                        .await?;
                }
            }
        }
    }

    async fn download_attempt(
        &self,
        path: &str,
        proof: &DownloadProof,
        partial: &Path,
        hashed: &mut Hashed,
        (named, progress): (&impl Fn(Option<&str>, u64), &impl Fn(u64)),
    ) -> Result<Downloaded, Failure> {
        let have = file_len(partial).await.map_err(Failure::Permanent)?;
        let mut request = self.receiver(Method::GET, path, proof);
        if have > 0 {
            request = request.header(RANGE, format!("bytes={have}-"));
        }
        let response = request.send().await?;
        let facility = document_facility(&response);
        let done = |size, expected: Option<Expected>| Downloaded {
            size,
            facility: facility.clone(),
            hash: expected.map(RepositoryHash),
        };
        if response.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            let total = content_range(&response).map(|(_, total)| total);
            if total == Some(have) {
                // An earlier attempt got every byte but stopped before the checks.
                let expected = expected_check(response.headers()).map_err(Failure::Permanent)?;
                hashed.expect(expected);
                named(facility.as_deref(), have);
                return finish(partial, hashed, have, have, expected)
                    .await
                    .map(|size| done(size, expected));
            }
            truncate(partial).await.map_err(Failure::Permanent)?;
            return Err(Failure::Transient(
                "partial file longer than the document".into(),
            ));
        }
        let response = check(response).await?;
        let expected = expected_check(response.headers()).map_err(Failure::Permanent)?;
        hashed.expect(expected);
        let (start, total) = if response.status() == StatusCode::PARTIAL_CONTENT {
            content_range(&response)
                .ok_or_else(|| Failure::Transient("206 without a Content-Range".into()))?
        } else {
            let total = response
                .content_length()
                .ok_or_else(|| Failure::Transient("answer without a length".into()))?;
            (0, total)
        };
        named(facility.as_deref(), total);
        if start != have {
            if start != 0 {
                return Err(Failure::Transient("the server sent another range".into()));
            }
            truncate(partial).await.map_err(Failure::Permanent)?;
        }
        self.check_room(partial, start, total).await?;
        hashed
            .catch_up(partial, start)
            .await
            .map_err(Failure::Permanent)?;
        let sink = FileSink::open(
            partial,
            hashed.enabled.then(|| hashed.hasher.clone()),
            hashed.enabled,
        )
        .map_err(|e| Failure::Permanent(file_error(partial)(e)))?;
        let mut body = response.bytes_stream();
        let mut held = start;
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => {
                    if held
                        .checked_add(chunk.len() as u64)
                        .is_none_or(|after| after > total)
                    {
                        failure = Some("the server sent more than the document".to_owned());
                        break;
                    }
                    held += chunk.len() as u64;
                    if !sink.send(chunk).await {
                        break;
                    }
                    progress(held);
                }
                Err(e) => {
                    failure = Some(describe(&e));
                    break;
                }
            }
        }
        match sink.finish().await {
            Ok((hasher, written)) => {
                if let Some(hasher) = hasher {
                    hashed.hasher = hasher;
                }
                hashed.len = start + written;
                held = hashed.len;
            }
            Err(e) => {
                hashed.restart();
                return Err(Failure::Permanent(file_error(partial)(e)));
            }
        }
        if let Some(failure) = failure {
            return Err(Failure::Transient(failure));
        }
        finish(partial, hashed, held, total, expected)
            .await
            .map(|size| done(size, expected))
    }
}

impl Client {
    /// Refuses, before anything more is written, a document larger than the configured
    /// bound or than the disk can hold; the partial file is removed then.
    async fn check_room(&self, partial: &Path, start: u64, total: u64) -> Result<(), Failure> {
        let limit = self.options.max_download_bytes;
        if total > limit {
            truncate(partial).await.map_err(Failure::Permanent)?;
            return Err(Failure::Permanent(ClientError::DocumentTooLarge {
                size: total,
                limit,
                key: self.options.max_download_key,
            }));
        }
        let dir = match partial.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let (free, reserve) = disk_room(dir, self.options.disk_reserve_bytes)
            .map_err(|e| Failure::Permanent(file_error(dir)(e)))?;
        let need = total.saturating_sub(start);
        if need.saturating_add(reserve) > free {
            truncate(partial).await.map_err(Failure::Permanent)?;
            return Err(Failure::Permanent(ClientError::NoSpace {
                need,
                free,
                reserve,
                dir: dir.display().to_string(),
            }));
        }
        Ok(())
    }
}

/// Bytes an unprivileged writer can still put on the file system of `dir`, and the
/// bytes that must stay free there: `reserve`, but at most 5% of the file system (a
/// small volume is not refused outright).
///
/// # Errors
/// The I/O error of `statvfs`.
pub fn disk_room(dir: &Path, reserve: u64) -> std::io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    let size = stat.f_blocks.saturating_mul(stat.f_frsize);
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        reserve.min(size / 20),
    ))
}

/// Whether a URL's host is this machine (`localhost`, 127.0.0.0/8, `::1`).
pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads at most `limit` bytes of an answer's body; the flag says whether the body
/// ended within them (what follows is never read).
async fn read_limited(response: Response, limit: usize) -> Result<(Vec<u8>, bool), Failure> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// Text from a server made safe to show: control characters escaped, cut after
/// [`EXCERPT_CHARS`] characters.
fn excerpt(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == EXCERPT_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What a download is checked against: the whole SHA-256 ([`api::SHA256_HEADER`]), or
/// the digest of its parts ([`api::PARTS_SHA256_HEADER`], [`api::PART_SIZE_HEADER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Whole([u8; 32]),
    Parts { digest: [u8; 32], part_size: u64 },
}

/// Hashes bytes in order: as a whole, or per block of the part size, each block's
/// SHA-256 fed into the outer hash of [`api::parts_digest`] as it completes (memory does
/// not grow with the number of parts).
#[derive(Clone, Default)]
struct ContentHasher {
    part_size: Option<u64>,
    current: Sha256,
    filled: u64,
    outer: Sha256,
}

impl ContentHasher {
    fn new(part_size: Option<u64>) -> ContentHasher {
        ContentHasher {
            part_size,
            ..ContentHasher::default()
        }
    }

    fn finalize(mut self) -> [u8; 32] {
        match self.part_size {
            None => self.current.finalize().into(),
            Some(_) => {
                if self.filled > 0 {
                    self.outer.update(self.current.finalize());
                }
                self.outer.finalize().into()
            }
        }
    }
}

/// Something bytes are fed into, in order.
trait Feed {
    fn feed(&mut self, data: &[u8]);
}

impl Feed for Sha256 {
    fn feed(&mut self, data: &[u8]) {
        self.update(data);
    }
}

impl Feed for ContentHasher {
    fn feed(&mut self, mut data: &[u8]) {
        let Some(part_size) = self.part_size else {
            self.current.update(data);
            return;
        };
        while !data.is_empty() {
            let room = usize::try_from(part_size - self.filled).unwrap_or(usize::MAX);
            let take = room.min(data.len());
            self.current.update(&data[..take]);
            self.filled += take as u64;
            data = &data[take..];
            if self.filled == part_size {
                let block = self.current.finalize_reset();
                self.outer.update(block);
                self.filled = 0;
            }
        }
    }
}

/// The hash of the first `len` bytes of the partial file, kept across attempts so that
/// a resume only hashes what it adds.
#[derive(Default)]
struct Hashed {
    hasher: ContentHasher,
    len: u64,
    /// `false` for [`DownloadCheck::ByCaller`]: nothing is hashed.
    enabled: bool,
}

impl Hashed {
    /// Hashes the way `expected` needs from now on (starting over if it differs).
    fn expect(&mut self, expected: Option<Expected>) {
        let part_size = match expected {
            Some(Expected::Parts { part_size, .. }) => Some(part_size),
            _ => None,
        };
        if self.hasher.part_size != part_size {
            self.hasher = ContentHasher::new(part_size);
            self.len = 0;
        }
    }

    /// Forgets what was hashed (the partial file is gone or no longer trusted).
    fn restart(&mut self) {
        self.hasher = ContentHasher::default();
        self.len = 0;
    }

    async fn catch_up(&mut self, partial: &Path, upto: u64) -> Result<(), ClientError> {
        if self.len == upto || !self.enabled {
            return Ok(());
        }
        let fresh = ContentHasher::new(self.hasher.part_size);
        self.hasher = hash_range(partial, 0, upto, fresh).await?;
        self.len = upto;
        Ok(())
    }
}

/// Chunks of a download on their way to the partial file: appended and hashed on a
/// blocking thread, so that receiving, writing and hashing overlap; a bounded queue keeps
/// memory to a few chunks.
struct FileSink {
    chunks: tokio::sync::mpsc::Sender<bytes::Bytes>,
    writer: tokio::task::JoinHandle<std::io::Result<(Option<ContentHasher>, u64)>>,
}

impl FileSink {
    /// Opens `partial` for appending (mode 0600); `hasher`, when the download is hashed,
    /// holds the bytes already there; `sync`: the file is synced at the end.
    fn open(
        partial: &Path,
        mut hasher: Option<ContentHasher>,
        sync: bool,
    ) -> std::io::Result<FileSink> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(partial)?;
        let (chunks, mut queue) = tokio::sync::mpsc::channel::<bytes::Bytes>(SINK_QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(DOWNLOAD_WRITE_BUFFER, file);
            let mut written = 0;
            while let Some(chunk) = queue.blocking_recv() {
                out.write_all(&chunk)?;
                if let Some(hasher) = hasher.as_mut() {
                    hasher.feed(&chunk);
                }
                written += chunk.len() as u64;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            if sync {
                file.sync_all()?;
            }
            Ok((hasher, written))
        });
        Ok(FileSink { chunks, writer })
    }

    /// Queues a chunk; `false` when the writer stopped (its error comes from `finish`).
    async fn send(&self, chunk: bytes::Bytes) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    /// Waits until every queued chunk is written (and synced, when asked): the hash of the
    /// whole file (when hashed) and the bytes this sink appended.
    async fn finish(self) -> std::io::Result<(Option<ContentHasher>, u64)> {
        drop(self.chunks);
        self.writer
            .await
            .map_err(|e| std::io::Error::other(format!("download writer stopped: {e}")))?
    }
}

/// Checks size and hash once the partial file holds `held` of `total` bytes.
async fn finish(
    partial: &Path,
    hashed: &mut Hashed,
    held: u64,
    total: u64,
    expected: Option<Expected>,
) -> Result<u64, Failure> {
    if held != total {
        return Err(Failure::Transient(format!(
            "the answer ended after {held} of {total} bytes"
        )));
    }
    if !hashed.enabled {
        return Ok(total);
    }
    hashed
        .catch_up(partial, held)
        .await
        .map_err(Failure::Permanent)?;
    let actual = hashed.hasher.clone().finalize();
    let wanted = match expected {
        Some(Expected::Whole(sha256)) => Some(sha256),
        Some(Expected::Parts { digest, .. }) => Some(digest),
        None => None,
    };
    if wanted.is_some_and(|e| e != actual) {
        truncate(partial).await.map_err(Failure::Permanent)?;
        hashed.restart();
        return Err(Failure::Permanent(ClientError::not_the_repositorys_bytes()));
    }
    Ok(total)
}

/// `len` bytes of `file` from `offset` as a request body, read [`UPLOAD_READ_CHUNK`] at a
/// time at explicit offsets (off the async threads), each chunk fed to `sent` (hash,
/// bytes) as it is read. An error names `path`.
fn part_body(
    file: Arc<std::fs::File>,
    path: &Path,
    offset: u64,
    len: u64,
    sent: Arc<std::sync::Mutex<(Sha256, u64)>>,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let path = path.display().to_string();
    futures_util::stream::try_unfold((offset, len), move |(at, left)| {
        let (file, sent, path) = (Arc::clone(&file), Arc::clone(&sent), path.clone());
        async move {
            if left == 0 {
                return Ok(None);
            }
            let want =
                usize::try_from(left).map_or(UPLOAD_READ_CHUNK, |l| l.min(UPLOAD_READ_CHUNK));
            let chunk = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buffer = vec![0u8; want];
                let got = file.read_at(&mut buffer, at)?;
                if got == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file ended before the part",
                    ));
                }
                buffer.truncate(got);
                let mut sent = sent
                    .lock()
                    .map_err(|_| std::io::Error::other("a part hash was poisoned"))?;
                sent.0.update(&buffer);
                sent.1 += got as u64;
                Ok(bytes::Bytes::from(buffer))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
            let got = chunk.len() as u64;
            Ok(Some((chunk, (at + got, left - got))))
        }
    })
}

/// The SHA-256 of each `part_size` block of the first `size` bytes of `path`, in order.
async fn part_hashes(path: &Path, size: u64, part_size: u64) -> Result<Vec<[u8; 32]>, ClientError> {
    let mut hashes = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(part_size);
        hashes.push(
            hash_range(path, offset, len, Sha256::new())
                .await?
                .finalize()
                .into(),
        );
        offset += len;
    }
    Ok(hashes)
}

/// Feeds `len` bytes of `path` from `offset` into `hasher`.
async fn hash_range<H: Feed>(
    path: &Path,
    offset: u64,
    len: u64,
    mut hasher: H,
) -> Result<H, ClientError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(file_error(path))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(file_error(path))?;
    let mut reader = file.take(len);
    let mut buffer = vec![0u8; UPLOAD_READ_CHUNK];
    let mut read_total = 0;
    loop {
        let n = reader.read(&mut buffer).await.map_err(file_error(path))?;
        if n == 0 {
            break;
        }
        hasher.feed(&buffer[..n]);
        read_total += n as u64;
    }
    if read_total != len {
        return Err(ClientError::Mismatch(format!(
            "{} changed while it was being sent",
            path.display()
        )));
    }
    Ok(hasher)
}

async fn file_len(path: &Path) -> Result<u64, ClientError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(file_error(path)(e)),
    }
}

async fn truncate(path: &Path) -> Result<(), ClientError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_error(path)(e)),
    }
}

fn checked_id(id: &str) -> Result<&str, ClientError> {
    if crate::repository::is_document_id(id) {
        Ok(id)
    } else {
        Err(ClientError::Mismatch(format!(
            "{id:?} is not a document ID of this repository"
        )))
    }
}

fn checked_code(code: &str) -> Result<&str, ClientError> {
    if crate::facility::is_code(code) {
        Ok(code)
    } else {
        Err(ClientError::Mismatch(format!(
            "{code:?} is not a facility code (1 to 32 characters of A-Z, a-z, 0-9, _ and -)"
        )))
    }
}

fn checked_message(id: &str) -> Result<&str, ClientError> {
    if api::is_message_id(id) {
        Ok(id)
    } else {
        Err(ClientError::Mismatch(format!(
            "{id:?} is not a message ID of this repository"
        )))
    }
}

/// `Content-Range: bytes a-b/total` or `bytes */total` -> (a, total).
fn content_range(response: &Response) -> Option<(u64, u64)> {
    parse_content_range(response.headers().get(CONTENT_RANGE)?.to_str().ok()?)
}

/// Parses the value of a `Content-Range` header: `bytes a-b/total` or `bytes */total` ->
/// (a, total); `None` unless `a <= b < total`. Public so that the fuzz target
/// `http_content_range` reaches it (fuzz/).
pub fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let total: u64 = total.parse().ok()?;
    let start = match range {
        "*" => total,
        range => {
            let (first, last) = range.split_once('-')?;
            let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
            if first > last || last >= total {
                return None;
            }
            first
        }
    };
    Some((start, total))
}

/// The facility code in [`api::FACILITY_HEADER`], if the answer has one of the form the
/// repository gives facility codes (1-32 of `A-Z a-z 0-9 _ -`): anything else is ignored,
/// as it would end up in Patient IDs and logs.
fn document_facility(response: &Response) -> Option<String> {
    let value = response
        .headers()
        .get(api::FACILITY_HEADER)?
        .to_str()
        .ok()?;
    crate::facility::is_code(value).then(|| value.to_owned())
}

/// Smallest part size a download answer may announce (`x-content-part-size`): the
/// repository's `server.part_size_mb` is at least 1 MiB. A smaller one would cost the
/// receiver one SHA-256 finalization per few bytes of the download (a hostile repository's
/// CPU attack).
pub const MIN_ANNOUNCED_PART_SIZE: u64 = 1 << 20;
/// Largest part size a download answer may announce: `server.part_size_mb` is at most
/// 256 MiB.
pub const MAX_ANNOUNCED_PART_SIZE: u64 = 256 << 20;

/// The check a download answer names: the parts digest with its part size when given,
/// else the whole SHA-256, else none.
///
/// # Errors
/// [`ClientError::Integrity`] when the part size announced is outside
/// [`MIN_ANNOUNCED_PART_SIZE`]..=[`MAX_ANNOUNCED_PART_SIZE`] (nothing is downloaded).
fn expected_check(headers: &reqwest::header::HeaderMap) -> Result<Option<Expected>, ClientError> {
    let header = |name: &str| headers.get(name)?.to_str().ok();
    let digest = header(api::PARTS_SHA256_HEADER).and_then(api::hex32::parse);
    let part_size = header(api::PART_SIZE_HEADER);
    if let (Some(digest), Some(part_size)) = (digest, part_size) {
        let bytes = part_size
            .parse::<u64>()
            .ok()
            .filter(|n| (MIN_ANNOUNCED_PART_SIZE..=MAX_ANNOUNCED_PART_SIZE).contains(n));
        let Some(part_size) = bytes else {
            return Err(ClientError::Integrity(format!(
                "the repository announced a part size of {:?} bytes ({}), outside 1 MiB to \
                 256 MiB (the range of a repository's server.part_size_mb): nothing was \
                 downloaded; check that the repository URL points at a Cloud-PDI repository, \
                 or ask its operator to check its part_size_mb",
                part_size.chars().take(40).collect::<String>(),
                api::PART_SIZE_HEADER,
            )));
        };
        return Ok(Some(Expected::Parts { digest, part_size }));
    }
    Ok(header(api::SHA256_HEADER)
        .and_then(api::hex32::parse)
        .map(Expected::Whole))
}

/// Sorts an answer: success passes, 410 `not_available` and other 4xx are permanent,
/// 408, 429 and 5xx transient.
async fn check(response: Response) -> Result<Response, Failure> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status.is_redirection() {
        let to = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| response.url().join(l).ok())
            .map_or_else(
                || "an address it did not give".to_owned(),
                |url| excerpt(&url.origin().ascii_serialization()),
            );
        return Err(Failure::Permanent(ClientError::Redirected {
            status: status.as_u16(),
            to,
        }));
    }
    // Only the start of an error answer is read: a hostile server's body may be endless.
    let (body, _) = read_limited(response, MAX_ERROR_BODY).await?;
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => (excerpt(&b.error), excerpt(&b.message)),
        Err(_) if body.is_empty() => (String::new(), status.to_string()),
        Err(_) => (
            String::new(),
            format!("{status}: {}", excerpt(&String::from_utf8_lossy(&body))),
        ),
    };
    if status == StatusCode::GONE && code == NOT_AVAILABLE {
        return Err(Failure::Permanent(ClientError::NotAvailable));
    }
    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        return Err(Failure::Transient(format!("{status}: {message}")));
    }
    Err(Failure::Permanent(ClientError::Refused {
        status: status.as_u16(),
        code,
        message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn answer(part_size: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            api::PARTS_SHA256_HEADER,
            HeaderValue::from_static(
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            ),
        );
        headers.insert(
            api::PART_SIZE_HEADER,
            HeaderValue::from_str(part_size).expect("ascii"),
        );
        headers
    }

    /// A hostile repository's tiny (or huge, or garbled) part size is refused before any
    /// byte is downloaded; 1 MiB and 256 MiB are accepted.
    #[test]
    fn announced_part_size_is_bounded() {
        for bad in ["1", "1048575", "268435457", "0", "-5", "lots"] {
            let refused = expected_check(&answer(bad));
            assert!(
                matches!(&refused, Err(ClientError::Integrity(m)) if m.contains("outside 1 MiB to 256 MiB")),
                "{bad}: {refused:?}"
            );
        }
        for good in [MIN_ANNOUNCED_PART_SIZE, 8 << 20, MAX_ANNOUNCED_PART_SIZE] {
            let accepted = expected_check(&answer(&good.to_string())).expect("in range");
            assert!(
                matches!(accepted, Some(Expected::Parts { part_size, .. }) if part_size == good),
                "{good}"
            );
        }
    }
}
