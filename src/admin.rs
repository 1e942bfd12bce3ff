//! The loopback admin endpoint: what `cloudpdi status` reads, plus health and metrics.
//!
//! It has no authentication, so the configuration refuses any non-loopback address.
//!
//! - `GET /status`: JSON [`Status`] (routes, batches, counters)
//! - `GET /healthz`: `ok` when the index answers
//! - `GET /metrics`: Prometheus text format
//! - `POST /jobs/{id}/retry` (with the `x-cloudpdi-admin` header): puts a failed
//!   outbound job back to the step that failed

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::batch::{BatchRecord, BatchState};
use crate::inbound::Inbound;
use crate::jobs::JobSummary;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, RetryError};
use crate::route::Routes;
use crate::spool::Spool;

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
    pub batches: Vec<BatchRecord>,
    /// Outbound then inbound jobs, with state, progress, age and last error.
    pub jobs: Vec<JobSummary>,
}

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
}

/// Every job of both pipelines (off the runtime).
async fn jobs(state: &Arc<AdminState>) -> Result<Vec<JobSummary>, Response> {
    let state = state.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut jobs = state.outbound.summaries()?;
        if let Some(inbound) = &state.inbound {
            jobs.extend(inbound.summaries()?);
        }
        Ok::<_, crate::batch::IndexError>(jobs)
    })
    .await;
    match read {
        Ok(Ok(jobs)) => Ok(jobs),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(e)),
    }
}

/// Serves the admin endpoint on `listener` until `shutdown`.
///
/// # Errors
/// The I/O error that ended the server.
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
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
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

async fn retry(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !headers.contains_key(ADMIN_HEADER) {
        let refusal = format!("a retry needs the {ADMIN_HEADER} header: use `cloudpdi retry`\n");
        return (StatusCode::FORBIDDEN, refusal).into_response();
    }
    let outbound = state.outbound.clone();
    let asked = id.clone();
    let retried = tokio::task::spawn_blocking(move || outbound.retry(&asked)).await;
    match retried {
        Ok(Ok(step)) => (
            StatusCode::OK,
            format!(
                "job {id} runs again from step {}\n",
                crate::jobs::state_name(step)
            ),
        )
            .into_response(),
        Ok(Err(e @ RetryError::Unknown(_))) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Ok(Err(e @ RetryError::NotFailed(..))) => {
            (StatusCode::CONFLICT, format!("{e}\n")).into_response()
        }
        Ok(Err(RetryError::Index(e))) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let batches = match batches(&state).await {
        Ok(batches) => batches,
        Err(response) => return response,
    };
    let jobs = match jobs(&state).await {
        Ok(jobs) => jobs,
        Err(response) => return response,
    };
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: state.started.elapsed().as_secs(),
        associations_active: state
            .metrics
            .associations_active
            .load(std::sync::atomic::Ordering::Relaxed),
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
    })
    .into_response()
}

async fn healthz(State(state): State<Arc<AdminState>>) -> Response {
    let spool = state.spool.clone();
    match tokio::task::spawn_blocking(move || spool.index().ready()).await {
        Ok(Ok(_)) => "ok\n".into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let batches = match batches(&state).await {
        Ok(batches) => batches,
        Err(response) => return response,
    };
    let count = |s: BatchState| batches.iter().filter(|b| b.state == s).count() as u64;
    let body = state.metrics.render(&[
        (
            "batches_open",
            "Batches still receiving instances.",
            count(BatchState::Open),
        ),
        (
            "batches_stable",
            "Stable batches held in the spool.",
            count(BatchState::Stable),
        ),
        (
            "batches_sent",
            "Batches taken by the outbound pipeline.",
            count(BatchState::Sent),
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
