//! The loopback admin endpoint: what `cloudpdi status` reads, plus health and metrics.
//!
//! It has no authentication, so the configuration refuses any non-loopback address, and
//! it answers only requests addressed to a loopback name (`localhost`, `127.0.0.1`,
//! `[::1]`, with or without the port): a web page that rebinds its own DNS name to
//! 127.0.0.1 gets 421, so a browser on this host cannot be used to read the status or
//! trigger retries. At most [`MAX_CONNECTIONS`] connections are served at once and each
//! must send its headers within [`HEADER_TIMEOUT`] (also between keep-alive requests), so
//! idle sockets cannot pile up and take the file descriptors the DICOM listener needs.
//!
//! - `GET /status`: JSON [`Status`] (routes, batches, counters)
//! - `GET /healthz`: `ok` when the index answers and both pipelines can progress, else
//!   503 `degraded: <reasons>` (listed in docs/pipelines.md)
//! - `GET /metrics`: OpenMetrics text (Prometheus reads it), listed in docs/pipelines.md
//! - `POST /jobs/{id}/retry` (with the `x-cloudpdi-admin` header): puts a failed
//!   outbound job back to the step that failed, or a held or waiting inbound job back to
//!   work
//! - `POST /tokens`, `POST /jobs/sent` (with the header): a token to import, the record
//!   of a `cloudpdi send` ([`handoff`])
//! - `POST /batches/{id}/release` (with the same header): sends a batch held as possibly
//!   incomplete as it is (`cloudpdi release`)
//! - `POST /jobs/{id}/revoke`, `POST /jobs/{id}/extend` with JSON [`ExtendRequest`] (with
//!   the header): revokes an issued token, or re-issues it with a later expiry
//!   (`cloudpdi revoke`, `cloudpdi extend`); `504` when the repository has not answered
//!   within [`SLIP_ACTION_TIMEOUT`] (the action goes on)

pub mod handoff;
pub mod metrics;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::metrics::{Metrics, Snapshot};
use crate::clock::now_ms;
use crate::gateway::inbound::Inbound;
use crate::gateway::jobs::{Cause, JobRecord, JobSummary, Pipeline, RetryError};
use crate::gateway::outbound::{ExtendedSlip, Outbound, OutboundJob, SlipActionError};
use crate::gateway::reception::batch::{BatchId, BatchRecord, ReleaseError};
use crate::gateway::reception::route::Routes;
use crate::gateway::reception::spool::Spool;
use crate::gateway::store::IndexError;
use crate::repository::api::DocumentStatus;
use crate::repository::listener::{self, Limits, PerAddress};

/// What the daemon reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// DICOM associations open now.
    pub associations_active: u64,
    /// Configured routes.
    pub routes: Vec<RouteStatus>,
    /// Every batch known to the index, oldest first.
    pub batches: Vec<BatchView>,
    /// Outbound then inbound jobs, with state, progress, age and last error.
    pub jobs: Vec<JobSummary>,
    /// What an admin asks about an outbound job beyond its state and study:
    /// token and slip files, downloads and receipts (by job ID).
    #[serde(default)]
    pub outbound: Vec<OutboundDetails>,
    /// The daemon's `facility.time_zone` (empty: the system's), in which `cloudpdi status`
    /// prints times, so that they read the same wherever the command runs.
    #[serde(default)]
    pub time_zone: String,
    /// Facilities whose sealed tokens the mailbox refused (not in `inbound.accept_from`,
    /// a key that differs from its pin, ...), with the last reason.
    #[serde(default)]
    pub refused_senders: Vec<crate::gateway::inbound::mailbox::Refusal>,
}

/// A batch as `/status` shows it: its record, plus the state a person reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchView {
    /// The record, its fields unchanged (what scripts read).
    #[serde(flatten)]
    pub record: BatchRecord,
    /// `open`, `held` (possibly incomplete: refused instances not resent), `stable` or
    /// `sent`.
    pub display_state: String,
}

/// An outbound job's details for `cloudpdi status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboundDetails {
    /// The job ID, as in [`Status::jobs`].
    pub id: String,
    /// The token file, once issued.
    pub token_file: Option<PathBuf>,
    /// The slip, once rendered.
    pub slip_file: Option<PathBuf>,
    /// Expiry of token and document (Unix seconds; 0 before the document exists).
    pub expires_at: u32,
    /// The repository's view of the document (downloads, receipts), as of `checked_at`.
    pub document: Option<DocumentStatus>,
    /// Why the repository could not tell, if it could not.
    pub document_error: Option<String>,
    /// When the repository was last asked (Unix milliseconds; 0: never).
    pub checked_at: u64,
    /// The sealed deliveries of the token (`deliver_to`), per receiving facility; whether
    /// each imported is told by the document's receipts (their `facility`).
    #[serde(default)]
    pub deliveries: Vec<crate::gateway::outbound::Delivery>,
    /// When the token was revoked (Unix seconds), if it was.
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// The body of `POST /jobs/{id}/extend`: the token's new expiry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    /// Unix seconds (UTC).
    pub expires_at: u32,
}

/// Largest body of `POST /jobs/{id}/extend` (a JSON object with one number).
pub const MAX_EXTEND_BYTES: usize = 256;

/// How long the repository's answer about a document is reused before `cloudpdi status`
/// asks again, so that status (or a script calling it in a loop) does not hammer the
/// repository.
pub const DOCUMENT_CACHE: Duration = Duration::from_secs(10);

/// Documents asked about per status request at most (the most recent issued jobs
/// first); the others show their last known answer.
pub const MAX_DOCUMENT_QUERIES: usize = 8;

/// Time the repository has to answer those queries, together, so that `cloudpdi status`
/// answers within its own timeout even when the repository is slow or down.
pub const DOCUMENT_QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Time a revoke or an extend has to finish before the admin endpoint answers 504 (the
/// action goes on, and may still finish): below the [`status::ADMIN_TIMEOUT`] the commands
/// wait, so that `cloudpdi revoke` / `extend` say the repository is slow instead of
/// blaming the daemon, while the repository client retries.
pub const SLIP_ACTION_TIMEOUT: Duration = Duration::from_secs(8);

const _: () = assert!(SLIP_ACTION_TIMEOUT.as_secs() < status::ADMIN_TIMEOUT.as_secs());

/// The repository's last answer per document ID, with when it was asked.
pub type DocumentCache = tokio::sync::Mutex<HashMap<String, (u64, Result<DocumentStatus, String>)>>;

/// A route as shown by `cloudpdi status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Route name.
    pub name: String,
    /// Called AE title.
    pub ae_title: String,
    /// Quiet seconds before a batch is stable.
    pub stable_after: u64,
}

/// Shared state of the admin handlers.
pub struct AdminState {
    /// The spool, for its index.
    pub spool: Arc<Spool>,
    /// The route table.
    pub routes: Arc<Routes>,
    /// Process counters.
    pub metrics: Arc<Metrics>,
    /// When the daemon started.
    pub started: Instant,
    /// The outbound pipeline, for its jobs.
    pub outbound: Arc<Outbound>,
    /// The inbound pipeline, when a local PACS is configured.
    pub inbound: Option<Arc<Inbound>>,
    /// The repository's recent answers about outbound documents.
    pub documents: DocumentCache,
    /// `facility.time_zone`, passed on in the status.
    pub time_zone: String,
}

/// Every job of both pipelines (off the runtime).
async fn jobs(state: &Arc<AdminState>) -> Result<Vec<JobSummary>, Response> {
    let state = state.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut jobs = state.outbound.summaries()?;
        if let Some(inbound) = &state.inbound {
            jobs.extend(inbound.summaries()?);
        }
        Ok::<_, crate::gateway::store::IndexError>(jobs)
    })
    .await;
    match read {
        Ok(Ok(jobs)) => Ok(jobs),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(e)),
    }
}

/// Connections the admin endpoint serves at once (status, health checks, a Prometheus
/// scrape need a few); further ones wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 16;

/// Time a client has to send a request's headers, and to send the next one on a
/// keep-alive connection, before the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoint on `listener` until `shutdown`.
///
/// # Errors
/// None today; the signature keeps room for listener errors.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/jobs/{id}/retry", post(retry))
        .route(
            "/tokens",
            post(handoff::token).layer(DefaultBodyLimit::max(handoff::MAX_TOKEN_BYTES)),
        )
        .route(
            "/jobs/sent",
            post(handoff::sent).layer(DefaultBodyLimit::max(handoff::MAX_SENT_RECORD_BYTES)),
        )
        .route("/batches/{id}/release", post(release))
        .route("/jobs/{id}/revoke", post(revoke))
        .route(
            "/jobs/{id}/extend",
            post(extend).layer(DefaultBodyLimit::max(MAX_EXTEND_BYTES)),
        )
        .layer(axum::middleware::from_fn(loopback_host))
        .with_state(state);
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
    };
    listener::serve(
        listener,
        app,
        limits,
        PerAddress::new(MAX_CONNECTIONS),
        async move { shutdown.cancelled().await },
    )
    .await;
    Ok(())
}

/// Refuses requests whose `Host` is not a loopback name (DNS rebinding).
async fn loopback_host(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if host.is_some_and(is_loopback_host) {
        return next.run(request).await;
    }
    (
        StatusCode::MISDIRECTED_REQUEST,
        "the admin endpoint answers only requests addressed to localhost, 127.0.0.1 or \
         [::1] (the Host header named something else, as a web page using DNS rebinding \
         would); use `cloudpdi status` on this machine\n",
    )
        .into_response()
}

/// Whether `host` (a `Host` header: name, optional `:port`) names this machine's loopback.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') || name.ends_with(']') => (name, Some(port)),
        _ => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok && (name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]")
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("index unavailable: {e}\n"),
    )
        .into_response()
}

/// Every batch from the index (off the runtime), or the 503 to answer instead: a scrape
/// or status must never report an unreadable index as "no batches".
async fn batches(state: &AdminState) -> Result<Vec<BatchRecord>, Response> {
    let spool = state.spool.clone();
    match tokio::task::spawn_blocking(move || spool.index().batches()).await {
        Ok(Ok(batches)) => Ok(batches),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(e)),
    }
}

/// Header a retry must carry: a web page in a browser on this host cannot add it to a
/// cross-site POST without a preflight the endpoint never answers.
pub const ADMIN_HEADER: &str = "x-cloudpdi-admin";

/// The 403 for a request that changes something without [`ADMIN_HEADER`], naming the
/// command that sends it.
fn without_admin_header(headers: &axum::http::HeaderMap, command: &str) -> Option<Response> {
    (!headers.contains_key(ADMIN_HEADER)).then(|| {
        let refusal = format!("this request needs the {ADMIN_HEADER} header: use `{command}`\n");
        (StatusCode::FORBIDDEN, refusal).into_response()
    })
}

/// Puts job `id` of either pipeline back to work (the outbound one is asked first);
/// answers the step it runs again from. The one way to retry, for `POST /jobs/{id}/retry`
/// and the web page's Retry button.
pub async fn retry_job(
    state: &Arc<AdminState>,
    id: &str,
) -> Result<Result<String, RetryError>, tokio::task::JoinError> {
    let (outbound, inbound) = (state.outbound.clone(), state.inbound.clone());
    let asked = id.to_owned();
    tokio::task::spawn_blocking(move || match outbound.retry(&asked) {
        Err(RetryError::Unknown(_)) => match &inbound {
            Some(inbound) => inbound.retry(&asked).map(crate::gateway::jobs::state_name),
            None => Err(RetryError::Unknown(asked)),
        },
        other => other.map(crate::gateway::jobs::state_name),
    })
    .await
}

async fn retry(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(refusal) = without_admin_header(&headers, "cloudpdi retry") {
        return refusal;
    }
    match retry_job(&state, &id).await {
        Ok(Ok(step)) => (
            StatusCode::OK,
            format!("job {id} runs again from step {step}\n"),
        )
            .into_response(),
        Ok(Err(e @ RetryError::Unknown(_))) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Ok(Err(
            e @ (RetryError::NotFailed(..) | RetryError::Ended(_) | RetryError::Revoked(_)),
        )) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Ok(Err(RetryError::Index(e))) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

async fn release(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(refusal) = without_admin_header(&headers, "cloudpdi release") {
        return refusal;
    }
    let Some(batch) = id
        .strip_prefix(['B', 'b'])
        .and_then(|digits| digits.parse::<u64>().ok())
        .map(BatchId)
    else {
        let refusal = format!("{id:?} is not a batch ID: `cloudpdi status` lists them\n");
        return (StatusCode::NOT_FOUND, refusal).into_response();
    };
    let spool = state.spool.clone();
    let released =
        tokio::task::spawn_blocking(move || spool.index().release(batch, now_ms())).await;
    match released {
        Ok(Ok(record)) if record.instances == 0 => {
            tracing::warn!(batch = %record.id, "empty held batch discarded by an admin");
            let answer = format!(
                "batch {} held no instance (all {} were refused): nothing to send, it is \
                 discarded; have the PACS send the study again once the cause is fixed\n",
                record.id, record.refused
            );
            (StatusCode::OK, answer).into_response()
        }
        Ok(Ok(record)) => {
            tracing::warn!(
                batch = %record.id,
                instances = record.instances,
                refused = record.refused,
                "held batch released by an admin: it is sent as it is"
            );
            let answer = format!(
                "batch {} released: its {} instance(s) are packed and sent as they are \
                 ({} refused instance(s) were not resent)\n",
                record.id, record.instances, record.refused
            );
            (StatusCode::OK, answer).into_response()
        }
        Ok(Err(e @ ReleaseError::Unknown(_))) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Ok(Err(ReleaseError::Index(e))) => unavailable(e),
        Ok(Err(e)) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let batches = match batches(&state).await {
        Ok(batches) => batches
            .into_iter()
            .map(|record| BatchView {
                display_state: record.state_name().to_owned(),
                record,
            })
            .collect(),
        Err(response) => return response,
    };
    let jobs = match jobs(&state).await {
        Ok(jobs) => jobs,
        Err(response) => return response,
    };
    let outbound = match outbound_details(&state).await {
        Ok(outbound) => outbound,
        Err(response) => return response,
    };
    let inbound = state.inbound.clone();
    let refused = tokio::task::spawn_blocking(move || match inbound {
        Some(inbound) => inbound.refusals(),
        None => Ok(Vec::new()),
    })
    .await;
    let refused_senders = match refused {
        Ok(Ok(refused)) => refused,
        Ok(Err(e)) => return unavailable(e),
        Err(e) => return unavailable(e),
    };
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: state.started.elapsed().as_secs(),
        associations_active: u64::try_from(state.metrics.associations_active.get()).unwrap_or(0),
        routes: state
            .routes
            .iter()
            .map(|r| RouteStatus {
                name: r.name.clone(),
                ae_title: r.ae_title.clone(),
                stable_after: r.stable_after.as_secs(),
            })
            .collect(),
        batches,
        jobs,
        outbound,
        time_zone: state.time_zone.clone(),
        refused_senders,
    })
    .into_response()
}

/// The outbound jobs' details, the repository asked about issued documents whose
/// cached answer is older than [`DOCUMENT_CACHE`] (at most [`MAX_DOCUMENT_QUERIES`], within
/// [`DOCUMENT_QUERY_TIMEOUT`]).
pub(crate) async fn outbound_details(
    state: &Arc<AdminState>,
) -> Result<Vec<OutboundDetails>, Response> {
    let outbound = state.outbound.clone();
    let records = match tokio::task::spawn_blocking(move || outbound.records()).await {
        Ok(Ok(records)) => records,
        Ok(Err(e)) => return Err(unavailable(e)),
        Err(e) => return Err(unavailable(e)),
    };
    let now = now_ms();
    let mut cache = state.documents.lock().await;
    let mut stale: Vec<&OutboundJob> = records
        .iter()
        .filter(|job| job.token_file.is_some() && job.document_id.is_some())
        .filter(|job| u64::from(job.expires_at).saturating_mul(1000) > now)
        .filter(|job| {
            job.document_id.as_ref().is_some_and(|d| {
                cache.get(d).is_none_or(|(at, _)| {
                    now.saturating_sub(*at) >= DOCUMENT_CACHE.as_millis() as u64
                })
            })
        })
        .collect();
    stale.sort_by_key(|job| std::cmp::Reverse(job.progress.created_at));
    stale.truncate(MAX_DOCUMENT_QUERIES);
    let queries = stale.iter().map(|job| async {
        let answer = state.outbound.document_status(job).await;
        (job.document_id.clone(), answer)
    });
    if let Ok(answers) = tokio::time::timeout(
        DOCUMENT_QUERY_TIMEOUT,
        futures_util::future::join_all(queries),
    )
    .await
    {
        for (document, answer) in answers {
            if let (Some(document), Some(answer)) = (document, answer) {
                cache.insert(document, (now, answer));
            }
        }
    }
    let known: std::collections::HashSet<&str> = records
        .iter()
        .filter_map(|job| job.document_id.as_deref())
        .collect();
    cache.retain(|document, _| known.contains(document.as_str()));
    Ok(records
        .iter()
        .map(|job| {
            let cached = job.document_id.as_ref().and_then(|d| cache.get(d));
            OutboundDetails {
                id: job.id.clone(),
                token_file: job.token_file.clone(),
                slip_file: job.slip_file.clone(),
                expires_at: job.expires_at,
                document: cached.and_then(|(_, answer)| answer.as_ref().ok().cloned()),
                document_error: cached.and_then(|(_, answer)| answer.as_ref().err().cloned()),
                checked_at: cached.map_or(0, |(at, _)| *at),
                deliveries: job.deliveries.clone(),
                revoked_at: job.revoked_at,
            }
        })
        .collect())
}

/// The answer to a revoke or an extend that failed: what to do, with a status that says
/// whose the fault is.
fn slip_action_refused(e: &SlipActionError) -> Response {
    let status = match e {
        SlipActionError::Unknown(_) => StatusCode::NOT_FOUND,
        SlipActionError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
        SlipActionError::Index(_) | SlipActionError::Worker(_) => StatusCode::SERVICE_UNAVAILABLE,
        SlipActionError::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::CONFLICT,
    };
    (status, format!("{e}\n")).into_response()
}

/// Keeps the repository's fresh answer about `document` for `cloudpdi status` and the
/// Sent page, without waiting: a status query may hold the cache while it asks the
/// repository (up to its own timeout), and the action's answer must not wait for that
/// beyond [`SLIP_ACTION_TIMEOUT`]. The answer is stored once the cache is free.
fn remember(state: &Arc<AdminState>, document: &DocumentStatus) {
    let (state, document) = (state.clone(), document.clone());
    tokio::spawn(async move {
        state
            .documents
            .lock()
            .await
            .insert(document.document_id.clone(), (now_ms(), Ok(document)));
    });
}

/// The daemon's `facility.time_zone`, for the times in answers.
fn zone(state: &AdminState) -> jiff::tz::TimeZone {
    crate::clock::time_zone(&state.time_zone).unwrap_or(jiff::tz::TimeZone::UTC)
}

async fn revoke(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(refusal) = without_admin_header(&headers, "cloudpdi revoke") {
        return refusal;
    }
    match revoke_token(&state, &id).await {
        Ok(document) => {
            let answer = format!(
                "job {id}: the token is revoked; the repository refuses every later download \
                 ({} of {} downloads were used)\n",
                document.downloads, document.max_downloads
            );
            (StatusCode::OK, answer).into_response()
        }
        Err(e) => slip_action_refused(&e),
    }
}

/// Revokes the token of job `id` ([`Outbound::revoke`]), waiting at most
/// [`SLIP_ACTION_TIMEOUT`]; the repository's answer is kept for `cloudpdi status`. The one
/// way to revoke, for `POST /jobs/{id}/revoke` and the web page's Revoke button.
///
/// # Errors
/// [`SlipActionError`]; [`SlipActionError::TimedOut`] when the repository has not answered
/// in time (the revoke goes on, and may still finish).
pub(crate) async fn revoke_token(
    state: &Arc<AdminState>,
    id: &str,
) -> Result<DocumentStatus, SlipActionError> {
    let outbound = state.outbound.clone();
    let job = id.to_owned();
    let action = tokio::spawn(async move { outbound.revoke(&job).await });
    let document = within_slip_action_timeout(id, "revoke", action).await?;
    remember(state, &document);
    Ok(document)
}

/// Extends the token of job `id` to `expires_at` (Unix seconds, [`Outbound::extend`]),
/// waiting at most [`SLIP_ACTION_TIMEOUT`]; the repository's answer is kept for `cloudpdi
/// status`. The one way to extend, for `POST /jobs/{id}/extend` and the web page's Extend
/// form.
///
/// # Errors
/// [`SlipActionError`]; [`SlipActionError::TimedOut`] when the repository has not answered
/// in time (the extension goes on, and may still finish).
pub(crate) async fn extend_token(
    state: &Arc<AdminState>,
    id: &str,
    expires_at: u32,
) -> Result<ExtendedSlip, SlipActionError> {
    let outbound = state.outbound.clone();
    let job = id.to_owned();
    let action = tokio::spawn(async move { outbound.extend(&job, expires_at).await });
    let slip = within_slip_action_timeout(id, "extend", action).await?;
    remember(state, &slip.document);
    Ok(slip)
}

/// The outcome of a revoke or extend of job `id` run as `task`, or
/// [`SlipActionError::TimedOut`] when it did not finish within [`SLIP_ACTION_TIMEOUT`] (it
/// goes on, and may still finish), or [`SlipActionError::Worker`] when its task failed.
async fn within_slip_action_timeout<T>(
    id: &str,
    action: &'static str,
    task: tokio::task::JoinHandle<Result<T, SlipActionError>>,
) -> Result<T, SlipActionError> {
    match tokio::time::timeout(SLIP_ACTION_TIMEOUT, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(SlipActionError::Worker(e.to_string())),
        Err(_) => Err(SlipActionError::TimedOut {
            id: id.to_owned(),
            action,
            seconds: SLIP_ACTION_TIMEOUT.as_secs(),
        }),
    }
}

async fn extend(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refusal) = without_admin_header(&headers, "cloudpdi extend") {
        return refusal;
    }
    let Ok(request) = serde_json::from_slice::<ExtendRequest>(&body) else {
        let refusal = "the body must be {\"expires_at\": <Unix seconds>}: use `cloudpdi extend`\n";
        return (StatusCode::BAD_REQUEST, refusal).into_response();
    };
    match extend_token(&state, &id, request.expires_at).await {
        Ok(slip) => {
            let zone = zone(&state);
            let answer = format!(
                "job {id}: the token now expires {}; print the new slip and hand it over: {} \
                 (the old slip works until {})\n",
                crate::clock::local_text(u64::from(slip.expires_at), &zone),
                slip.slip_file.display(),
                crate::clock::local_text(u64::from(slip.previous_expires_at), &zone)
            );
            (StatusCode::OK, answer).into_response()
        }
        Err(e) => slip_action_refused(&e),
    }
}

/// Failed attempts in a row on an unreachable repository or PACS after which `/healthz`
/// calls the pipeline degraded: the back-offs before it (2, 4, 8 s at least) ride out a
/// restart of the peer without an alert.
pub const HEALTH_UNREACHABLE_ATTEMPTS: u32 = 3;

/// Below this many bytes free the spool counts as full for `/healthz` even with
/// `spool.min_free_mb = 0`: no instance fits any more.
pub const FULL_SPOOL_BYTES: u64 = 1024 * 1024;

/// Jobs `/healthz` names at most (then how many more), so its answer stays one short line.
pub const HEALTH_MAX_JOBS: usize = 3;

/// What one pipeline's jobs tell the metrics and `/healthz`: the store's counts by state
/// and its active jobs, never the records of every finished job.
struct Figures {
    pipeline: &'static str,
    states: BTreeMap<String, u64>,
    retry_queue: u64,
    held: u64,
    /// One sentence per job that cannot progress without help.
    stuck: Vec<String>,
}

/// Reads the figures of `pipeline` (blocking: reads the database).
fn figures<P: Pipeline>(pipeline: &P) -> Result<Figures, IndexError> {
    let store = pipeline.store();
    let mut figures = Figures {
        pipeline: P::NAME,
        states: store.state_counts(),
        retry_queue: 0,
        held: 0,
        stuck: Vec::new(),
    };
    for mut job in store.active::<P::Job>()? {
        let id = job.id().to_owned();
        let progress = job.progress();
        let error = progress.last_error.as_deref().unwrap_or_default();
        let name = P::NAME;
        if progress.held {
            figures.held += 1;
            figures
                .stuck
                .push(format!("{name} job {id} is held: {error}"));
            continue;
        }
        if progress.attempts == 0 {
            continue;
        }
        figures.retry_queue += 1;
        let attempts = progress.attempts;
        match progress.cause {
            Some(Cause::DiskFull) => figures.stuck.push(format!(
                "{name} job {id} is stopped by a full disk: {error}"
            )),
            Some(Cause::RepositoryUnreachable | Cause::PacsUnreachable)
                if attempts >= HEALTH_UNREACHABLE_ATTEMPTS =>
            {
                figures.stuck.push(format!(
                    "{name} job {id} failed {attempts} attempts: {error}"
                ));
            }
            _ => {}
        }
    }
    Ok(figures)
}

/// The figures of both pipelines (blocking).
fn all_figures(state: &AdminState) -> Result<Vec<Figures>, IndexError> {
    let mut all = vec![figures(&*state.outbound)?];
    if let Some(inbound) = &state.inbound {
        all.push(figures(&**inbound)?);
    }
    Ok(all)
}

/// Why the spool cannot take instances, if it cannot: `free` is what statvfs said, `floor`
/// is `spool.min_free_mb` in bytes.
fn spool_degraded(free: std::io::Result<u64>, floor: u64) -> Option<String> {
    const MIB: u64 = 1024 * 1024;
    let free = match free {
        Ok(free) => free,
        Err(e) => return Some(format!("the spool's free space cannot be read ({e})")),
    };
    if floor > 0 && free < floor {
        Some(format!(
            "the spool has {} MiB free, below spool.min_free_mb = {}: instances are refused; \
             free space on the disk of spool.data_dir",
            free / MIB,
            floor / MIB
        ))
    } else if free < FULL_SPOOL_BYTES {
        Some(format!(
            "the spool's disk is full ({free} bytes free): instances are refused; free \
             space on the disk of spool.data_dir"
        ))
    } else {
        None
    }
}

/// The reasons `/healthz` gives: the spool's, then at most [`HEALTH_MAX_JOBS`] stuck jobs
/// and how many more there are.
fn health_reasons(spool: Option<String>, stuck: Vec<String>) -> Vec<String> {
    let more = stuck.len().saturating_sub(HEALTH_MAX_JOBS);
    let mut reasons: Vec<String> = spool.into_iter().collect();
    reasons.extend(stuck.into_iter().take(HEALTH_MAX_JOBS));
    if more > 0 {
        reasons.push(format!("{more} more job(s): `cloudpdi status` lists them"));
    }
    reasons
}

/// Why a held batch needs a person, for `/healthz`.
fn held_reason(batch: &BatchRecord) -> String {
    format!(
        "batch {} (route {}) is held as possibly incomplete: {} instance(s) refused ({}); \
         resend them from the PACS, or send it as it is with `cloudpdi release {}`",
        batch.id,
        crate::telemetry::escape(&batch.route),
        batch.refused,
        crate::telemetry::escape(batch.refusal.as_deref().unwrap_or("no reason recorded")),
        batch.id
    )
}

/// `ok`, or 503 `degraded: <reasons>` when a pipeline cannot progress: the spool below
/// its floor (or full), a batch held as possibly incomplete, a job held until `cloudpdi
/// retry`, a job stopped by a full disk, the repository or the PACS unreachable for
/// [`HEALTH_UNREACHABLE_ATTEMPTS`] attempts.
async fn healthz(State(state): State<Arc<AdminState>>) -> Response {
    let read = tokio::task::spawn_blocking(move || {
        state.spool.index().ready()?;
        let spool = spool_degraded(state.spool.free_bytes(), state.spool.min_free_bytes());
        let held = state.spool.index().held()?;
        let stuck = held
            .iter()
            .map(held_reason)
            .chain(all_figures(&state)?.into_iter().flat_map(|f| f.stuck))
            .collect();
        Ok::<_, IndexError>(health_reasons(spool, stuck))
    })
    .await;
    match read {
        Ok(Ok(reasons)) if reasons.is_empty() => "ok\n".into_response(),
        Ok(Ok(reasons)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: {}\n", reasons.join("; ")),
        )
            .into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

/// Encodes the registry after setting what only a scrape can know: batches by state,
/// jobs by pipeline and state (the store's counts), jobs waiting to retry or held (its
/// active jobs), and the spool's free space and floor. An unreadable index answers 503,
/// never "no batches".
async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let read = tokio::task::spawn_blocking(move || {
        let counts = state.spool.index().counts()?;
        let held = state.spool.index().held()?.len() as u64;
        let figures = all_figures(&state)?;
        let free = state.spool.free_bytes().ok();
        let mut snapshot = Snapshot {
            batches: vec![
                ("open", counts.open.saturating_sub(held)),
                ("held", held),
                ("stable", counts.stable),
                ("sent", counts.sent),
            ],
            spool_free_bytes: free,
            spool_min_free_bytes: state.spool.min_free_bytes(),
            ..Snapshot::default()
        };
        for f in figures {
            let pipeline = f.pipeline.to_owned();
            snapshot.jobs.extend(
                f.states
                    .into_iter()
                    .map(|(step, n)| (pipeline.clone(), step, n)),
            );
            snapshot.retry_queue.push((pipeline.clone(), f.retry_queue));
            snapshot.held.push((pipeline, f.held));
        }
        Ok::<_, IndexError>(state.metrics.render(&snapshot))
    })
    .await;
    match read {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spool_is_degraded_below_its_floor_or_when_full() {
        const MIB: u64 = 1024 * 1024;
        let below = spool_degraded(Ok(6 * MIB), 8 * MIB).expect("below the floor");
        assert!(
            below.starts_with("the spool has 6 MiB free, below spool.min_free_mb = 8:"),
            "{below}"
        );
        assert_eq!(spool_degraded(Ok(9 * MIB), 8 * MIB), None);
        let full = spool_degraded(Ok(FULL_SPOOL_BYTES - 1), 0).expect("full without a floor");
        assert!(
            full.starts_with("the spool's disk is full (1048575 bytes free)"),
            "{full}"
        );
        assert_eq!(spool_degraded(Ok(FULL_SPOOL_BYTES), 0), None);
        let unreadable = spool_degraded(Err(std::io::ErrorKind::NotFound.into()), 0);
        assert!(unreadable.is_some_and(|r| r.contains("cannot be read")));
    }

    #[test]
    fn health_names_a_few_jobs_and_counts_the_rest() {
        let stuck: Vec<String> = (1..=5).map(|n| format!("job {n}")).collect();
        assert_eq!(
            health_reasons(Some("spool".into()), stuck),
            [
                "spool",
                "job 1",
                "job 2",
                "job 3",
                "2 more job(s): `cloudpdi status` lists them"
            ]
        );
        assert!(health_reasons(None, Vec::new()).is_empty());
    }

    #[test]
    fn only_loopback_names_are_hosts() {
        for host in [
            "localhost",
            "LOCALHOST:11180",
            "127.0.0.1",
            "127.0.0.1:11180",
            "[::1]",
            "[::1]:11180",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:11180",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "127.0.0.1:",
            "127.0.0.1:x",
            "::1",
            "[::1]x",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
