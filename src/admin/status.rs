//! `cloudpdi status` and `cloudpdi retry`: ask the running daemon's admin endpoint what
//! it holds, or to run a failed job again.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;

use crate::admin::Status;
use crate::clock::now_ms;
use crate::gateway::reception::batch::BatchState;
use crate::telemetry::{Escaped, escape};

/// Why the status could not be shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// The daemon did not answer.
    #[error(
        "no answer from the cloudpdi daemon's admin endpoint at {addr}: {source} (is `cloudpdi serve` running with this configuration?)"
    )]
    Unreachable {
        /// The admin address.
        addr: SocketAddr,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// The configuration naming the admin address cannot be read.
    #[error(transparent)]
    Config(Box<crate::config::ConfigError>),
    /// The text given is not a job ID.
    #[error("{0:?} is not a job ID: `cloudpdi status` lists them (e.g. B000042)")]
    NotAJob(String),
    /// The daemon declined the retry; its sentence says why.
    #[error("{0}")]
    Declined(String),
}

impl From<crate::config::ConfigError> for StatusError {
    /// Boxed: a configuration error is large and rare.
    fn from(e: crate::config::ConfigError) -> Self {
        StatusError::Config(Box::new(e))
    }
}

/// The admin endpoint: `given`, else `admin.listen` of the configuration at `config`.
///
/// # Errors
/// [`StatusError::Config`] when the configuration is needed and cannot be read.
pub fn admin_address(given: Option<SocketAddr>, config: &Path) -> Result<SocketAddr, StatusError> {
    Ok(match given {
        Some(addr) => addr,
        None => crate::config::Config::load(config)?.admin.listen,
    })
}

/// Fetches the status from the admin endpoint at `addr`.
///
/// # Errors
/// [`StatusError::Unreachable`] when the daemon does not answer.
pub async fn fetch(addr: SocketAddr) -> Result<Status, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    admin_client()
        .map_err(unreachable)?
        .get(format!("http://{addr}/status"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)
}

/// A client for the loopback admin endpoint, which answers at once or not at all.
fn admin_client() -> reqwest::Result<reqwest::Client> {
    crate::repository::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
}

/// Asks the daemon to run failed job `id` again; returns its answer (a sentence for the
/// admin). The daemon is at `admin`, else where the configuration at `config` says.
///
/// # Errors
/// [`StatusError::NotAJob`] for text that cannot be a job ID (checked before anything is
/// read or sent), [`StatusError::Config`], [`StatusError::Unreachable`] when the daemon
/// does not answer, [`StatusError::Declined`] with the daemon's reason.
pub async fn retry(
    admin: Option<SocketAddr>,
    config: &Path,
    id: &str,
) -> Result<String, StatusError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(StatusError::NotAJob(id.to_owned()));
    }
    let addr = admin_address(admin, config)?;
    post(addr, &format!("/jobs/{id}/retry"), None).await
}

/// Posts a request to the admin endpoint at `addr` (with [`crate::admin::ADMIN_HEADER`])
/// and returns the daemon's answer, a sentence for the person at the terminal; `body` is
/// the content type and bytes to send, if any.
///
/// # Errors
/// [`StatusError::Unreachable`] when the daemon does not answer, [`StatusError::Declined`]
/// with the daemon's reason when it refuses.
pub(crate) async fn post(
    addr: SocketAddr,
    path: &str,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<String, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    let mut request = admin_client()
        .map_err(unreachable)?
        .post(format!("http://{addr}{path}"))
        .header(crate::admin::ADMIN_HEADER, "1");
    if let Some((content_type, bytes)) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes);
    }
    let response = request.send().await.map_err(unreachable)?;
    let accepted = response.status().is_success();
    let answer = response.text().await.map_err(unreachable)?;
    let answer = Escaped(answer.trim_end()).to_string();
    if accepted {
        Ok(answer)
    } else {
        Err(StatusError::Declined(answer))
    }
}

/// Renders the status as a table for a person at a terminal.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cloudpdi {} up {} s, {} association(s) open",
        status.version, status.uptime_seconds, status.associations_active
    );
    for route in &status.routes {
        let _ = writeln!(
            out,
            "route {:<12} AE {:<16} stable after {} s",
            escape(&route.name),
            escape(&route.ae_title),
            route.stable_after
        );
    }
    render_jobs(&mut out, status);
    if status.batches.is_empty() {
        out.push_str("no batches\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<9} {:<12} {:<7} {:>9} {:>11} {:>10}  KEY",
        "BATCH", "ROUTE", "STATE", "INSTANCES", "SIZE", "IDLE"
    );
    let now = now_ms();
    for batch in &status.batches {
        let state = match batch.state {
            BatchState::Open => "open",
            BatchState::Stable => "stable",
            BatchState::Sent => "sent",
        };
        let _ = writeln!(
            out,
            "{:<9} {:<12} {:<7} {:>9} {:>8.1} MB {:>8} s  {}",
            batch.id.to_string(),
            escape(&batch.route),
            state,
            batch.instances,
            batch.bytes as f64 / 1e6,
            now.saturating_sub(batch.last_instance_at) / 1000,
            Escaped(&batch.key)
        );
    }
    out
}

fn render_jobs(out: &mut String, status: &Status) {
    if status.jobs.is_empty() {
        out.push_str("no jobs\n");
        return;
    }
    let _ = writeln!(
        out,
        "{:<14} {:<8} {:<8} {:>8}  PROGRESS / LAST ERROR",
        "JOB", "SIDE", "STATE", "AGE"
    );
    let now = now_ms();
    for job in &status.jobs {
        let b = &job.bookkeeping;
        let _ = writeln!(
            out,
            "{:<14} {:<8} {:<8} {:>6} s  {}{}",
            escape(&job.id),
            job.direction,
            escape(&job.state),
            now.saturating_sub(b.created_at) / 1000,
            Escaped(&job.progress),
            b.last_error
                .as_deref()
                .map(|e| format!(" | attempt {}: {}", b.attempts, Escaped(e)))
                .unwrap_or_default()
        );
        for note in &job.notes {
            let _ = writeln!(out, "{:<14} {}", "", Escaped(note));
        }
        if job.state == "failed" {
            let hint = if job.direction == "outbound" {
                format!("fix the cause, then: cloudpdi retry {}", Escaped(&job.id))
            } else {
                "fix the cause, then drop the token into the watch folder again".to_owned()
            };
            let _ = writeln!(out, "{:<14} {hint}", "");
        }
    }
}
