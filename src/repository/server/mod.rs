//! The repository's HTTP service (API v1, see [`crate::repository::api`]).
//!
//! Every answer that is not a success is a JSON error (`refusal.rs`). A handler receives
//! an authenticated caller from an extractor (`authenticate.rs`): a facility, a facility
//! and one of its documents, or a receiver that showed the download proof; refusals are
//! audited and counted in one place (`caller.rs`). A download or receipt that cannot be
//! served (wrong proof, unknown document, expired, revoked, out of downloads) always
//! answers `410 not_available`, so a guesser learns nothing; a client that keeps failing
//! for a document is answered 429 for that document for a while. A receipt is accepted
//! once per download. A background `sweep.rs` deletes expired content.
//!
//! The routes: `documents.rs` (create, status, revoke, extend), `parts.rs` (upload, complete),
//! `download.rs` (with `range.rs`), `receipts.rs`; the directory of facilities
//! (`facilities.rs`) and their mailboxes of sealed tokens (`mailboxes.rs`); `/healthz` and
//! `/metrics` (`metrics.rs`).

mod authenticate;
mod body;
mod caller;
mod documents;
mod download;
mod facilities;
mod mailboxes;
mod metrics;
mod parts;
mod range;
mod receipts;
mod refusal;
mod sweep;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::repository::api::FacilityEntry;
use crate::repository::audit::{Audit, AuditError};
use crate::repository::auth::{Facilities, ProofLimiter, TrustedProxies};
use crate::repository::config::{
    AuditConfig, FacilityConfig, RepositoryConfig, ServerConfig, StorageConfig,
};
use crate::repository::listener::{self, Limits, PerAddress};
use crate::repository::storage::Storage;
use crate::repository::tls::TlsListener;

pub use range::parse_range_value;

use metrics::Metrics;
use refusal::Refusal;

/// Why the server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Storage cannot be opened.
    #[error(transparent)]
    Storage(#[from] crate::repository::storage::StorageError),
    /// The audit trail cannot be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// TLS files cannot be used.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Binding or serving failed.
    #[error("repository listener: {0}")]
    Io(#[from] std::io::Error),
    /// A key could not be made (embedded mode).
    #[error(transparent)]
    Auth(#[from] crate::repository::auth::AuthError),
    /// A setting cannot be used (when the configuration was not validated).
    #[error("invalid repository configuration: {0}")]
    Config(String),
}

/// Shared state of the handlers.
struct App {
    server: ServerConfig,
    storage: Storage,
    facilities: Facilities,
    /// Facilities with a registered public key, by code.
    directory: BTreeMap<String, FacilityEntry>,
    audit: Audit,
    limiter: ProofLimiter,
    proxies: TrustedProxies,
    uploads: Semaphore,
    metrics: Metrics,
    /// In the embedded repository, its one facility (`facility.code`), which also owns
    /// the documents recorded as [`FORMER_EMBEDDED_FACILITY`]; `None` in a standalone one.
    embedded_owner: Option<String>,
}

/// The facility name the embedded repository gave the gateway before it took the
/// gateway's `facility.code`: documents created then stay the gateway's (status, revoke).
pub const FORMER_EMBEDDED_FACILITY: &str = "embedded";

impl App {
    /// The shared state of a server run with `config`: storage and audit trail opened,
    /// facilities and trusted proxies read.
    ///
    /// # Errors
    /// [`ServerError`] when storage or the audit trail cannot be opened, or a setting
    /// cannot be used.
    fn new(config: &RepositoryConfig, embedded_owner: Option<String>) -> Result<App, ServerError> {
        let storage = Storage::open(&config.storage)?;
        let audit = Audit::open(&config.audit.path)?;
        let server = config.server.clone();
        let proxies = TrustedProxies::parse(&server.trusted_proxies).map_err(|entry| {
            ServerError::Config(format!(
                "server.trusted_proxies: {entry:?} is not an address or address/prefix"
            ))
        })?;
        Ok(App {
            facilities: Facilities::new(&config.facility),
            directory: directory(&config.facility)?,
            proxies,
            limiter: ProofLimiter::new(
                server.failed_proofs_per_window,
                Duration::from_secs(server.failed_proof_window),
            ),
            uploads: Semaphore::new(server.max_concurrent_uploads),
            metrics: Metrics::new(),
            storage,
            audit,
            server,
            embedded_owner,
        })
    }

    /// When a document expiring at `expires_at` is deleted altogether: the tombstone
    /// period (`server.tombstone_days`) after it.
    fn purge_at(&self, expires_at: u64) -> u64 {
        expires_at.saturating_add(self.server.tombstone_days.saturating_mul(86_400))
    }

    /// The facility that owns a document whose metadata records `recorded` as its
    /// creator: `recorded`, except in the embedded repository, whose documents from before
    /// it named its facility by `facility.code` are its facility's.
    fn owner<'a>(&'a self, recorded: &'a str) -> &'a str {
        match &self.embedded_owner {
            Some(owner) if recorded == FORMER_EMBEDDED_FACILITY => owner,
            _ => recorded,
        }
    }
}

/// The state as handlers extract it.
type Shared = State<Arc<App>>;

async fn healthz(State(app): Shared) -> Response {
    match app.storage.ready().await {
        Ok(()) => "ok\n".into_response(),
        Err(e) => Refusal::unavailable(e).into_response(),
    }
}

async fn fallback() -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        "no_such_endpoint",
        "no such endpoint; see docs/repository-api.yaml",
    )
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/documents", post(documents::create))
        .route(
            "/v1/documents/{id}",
            get(documents::status)
                .delete(documents::revoke)
                .patch(documents::extend),
        )
        .route("/v1/documents/{id}/parts/{n}", put(parts::put_part))
        .route("/v1/documents/{id}/complete", post(parts::complete))
        .route("/v1/documents/{id}/content", get(download::download))
        .route("/v1/documents/{id}/receipts", post(receipts::receipt))
        .route("/v1/facilities/{code}", get(facilities::look_up))
        .route("/v1/mailboxes/{recipient}/messages", post(mailboxes::post))
        .route("/v1/mailbox/messages", get(mailboxes::list))
        .route(
            "/v1/mailbox/messages/{id}",
            get(mailboxes::fetch).delete(mailboxes::delete),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .fallback(fallback)
        .with_state(app)
}

/// Runs the repository on `listener` until `shutdown` completes, then lets requests in
/// flight finish. TLS is used when the configuration names a certificate.
///
/// # Errors
/// [`ServerError`] when storage, the audit trail or TLS cannot be set up, or serving fails.
pub async fn run(
    config: RepositoryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(config, listener, shutdown, None).await
}

/// [`run`], with the embedded repository's facility when embedded.
async fn run_with(
    config: RepositoryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    embedded_owner: Option<String>,
) -> Result<(), ServerError> {
    let app = Arc::new(App::new(&config, embedded_owner)?);
    let stop = CancellationToken::new();
    let sweeper = tokio::spawn(sweep::sweep_loop(
        app.clone(),
        Duration::from_secs(app.server.sweep_interval),
        stop.clone(),
    ));
    let summaries = tokio::spawn(app.audit.clone().summarize_until(stop.clone()));
    let limits = Limits {
        max_connections: app.server.max_connections,
        header_timeout: Duration::from_secs(app.server.header_timeout),
    };
    let per_address = PerAddress::new(app.server.max_connections_per_address);
    let router = router(app);
    let local = listener.local_addr()?;
    if config.tls.cert.is_some() {
        let tls = crate::repository::tls::server_config(&config.tls).map_err(ServerError::Tls)?;
        tracing::info!("repository: listening on https://{local}");
        let tls = TlsListener::new(listener, tls, limits.max_connections, per_address.clone())?;
        listener::serve(tls, router, limits, per_address, shutdown).await;
    } else {
        tracing::info!("repository: listening on http://{local}");
        listener::serve(listener, router, limits, per_address, shutdown).await;
    }
    stop.cancel();
    let _ = sweeper.await;
    let _ = summaries.await;
    Ok(())
}

/// The directory of facilities: those with a public key, in its canonical text.
///
/// # Errors
/// [`ServerError::Config`] naming a facility whose key is not a key.
fn directory(
    facilities: &BTreeMap<String, FacilityConfig>,
) -> Result<BTreeMap<String, FacilityEntry>, ServerError> {
    let mut directory = BTreeMap::new();
    for (code, facility) in facilities {
        if facility.public_key.is_empty() {
            continue;
        }
        let key = crate::facility::PublicKey::parse(&facility.public_key)
            .map_err(|e| ServerError::Config(format!("facility.{code}.public_key: {e}")))?;
        directory.insert(
            code.clone(),
            FacilityEntry {
                code: code.clone(),
                name: facility.name.clone(),
                public_key: key.to_text(),
            },
        );
    }
    Ok(directory)
}

/// The repository running inside the gateway (`repository.url = "embedded"`).
pub struct Embedded {
    /// Base URL on loopback, e.g. `http://127.0.0.1:11190`: what tokens name.
    pub base_url: String,
    /// The server task; it ends after the shutdown future completes.
    pub task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// Starts an in-process repository on `listener` (loopback), storing under
/// `data_dir/repository/`, with one facility `facility` (the gateway's code, which
/// downloads name as the sender: [`crate::repository::api::FACILITY_HEADER`]) whose API key
/// hashes to `api_key_sha256`, so a single machine has a whole working system without
/// another service. The gateway keeps the address and the key stable across restarts:
/// tokens name the address.
///
/// # Errors
/// [`ServerError`] when the folder, the audit trail or the listener cannot be set up.
pub async fn start_embedded(
    data_dir: &Path,
    listener: TcpListener,
    api_key_sha256: &str,
    facility: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Embedded, ServerError> {
    let root = data_dir.join("repository");
    let config = RepositoryConfig {
        storage: StorageConfig {
            path: root.join("store"),
            ..StorageConfig::default()
        },
        audit: AuditConfig {
            path: root.join("audit.jsonl"),
        },
        facility: [(
            facility.to_owned(),
            FacilityConfig {
                api_key_sha256: api_key_sha256.to_owned(),
                ..FacilityConfig::default()
            },
        )]
        .into(),
        ..RepositoryConfig::default()
    };
    let base_url = format!("http://{}", listener.local_addr()?);
    // Open storage and audit here, so a bad folder fails the start, not the task.
    Storage::open(&config.storage)?;
    Audit::open(&config.audit.path)?;
    let task = tokio::spawn(run_with(
        config,
        listener,
        shutdown,
        Some(facility.to_owned()),
    ));
    Ok(Embedded { base_url, task })
}
