//! Work handed to the running daemon by the commands, so that a person at a terminal
//! learns at once whether anything will happen:
//!
//! - `POST /tokens` (`cloudpdi receive`): a token to import, in the watch folder's file
//!   format. The daemon answers whether it queued a job, and if not why: it does not
//!   import (no `inbound.pacs`), the token has expired or names a repository that is not
//!   allowed, or it was already imported. The watch folder stays for other programs; it
//!   cannot answer.
//! - `POST /jobs/sent` (`cloudpdi send`): the record of a send finished by the command,
//!   so that `cloudpdi status` lists it with the daemon's own jobs.
//!
//! Both need the [`ADMIN_HEADER`](super::ADMIN_HEADER), like a retry. The token is never
//! logged nor repeated in an answer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::info;
use zeroize::Zeroizing;

use super::{AdminState, unavailable, without_admin_header};
use crate::gateway::inbound::watch::{MAX_DROP_BYTES, parse_drop};
use crate::gateway::inbound::{QueueError, Queued};
use crate::gateway::outbound::{OutStep, OutboundJob};

/// Largest token hand-off accepted (`POST /tokens`): the watch folder's bound, so a
/// request is refused before it is read whole.
pub const MAX_TOKEN_BYTES: usize = MAX_DROP_BYTES as usize;

/// Largest record of a finished send accepted (`POST /jobs/sent`); a real one is well
/// under 2 KiB.
pub const MAX_SENT_RECORD_BYTES: usize = 16 * 1024;

fn answer(status: StatusCode, text: String) -> Response {
    (status, text).into_response()
}

/// `POST /tokens`: queues a token for import, or says why it will not be imported.
pub(super) async fn token(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = without_admin_header(&headers, "cloudpdi receive") {
        return refusal;
    }
    let text = Zeroizing::new(String::from_utf8_lossy(&body).into_owned());
    let handed = hand_over(&state, &text).await;
    answer(handed.status(), handed.message())
}

/// What handing a token over did: the one answer of `POST /tokens` and of the web page's
/// receive form, which both call [`hand_over`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// Queued as a new job.
    Queued(String),
    /// The token already has a job (running or done): not imported twice.
    Known {
        /// The job.
        id: String,
        /// Its state (`done`, `download`, ...).
        state: String,
    },
    /// This daemon does not import (no `inbound.pacs`).
    NoInbound,
    /// The token (or the Patient ID with it) cannot be used; the message says why.
    Refused(String),
    /// The daemon cannot record the job now (disk, index); the message says why.
    Unavailable(String),
}

impl Handoff {
    /// The HTTP status `POST /tokens` answers.
    pub fn status(&self) -> StatusCode {
        match self {
            Handoff::Queued(_) => StatusCode::ACCEPTED,
            Handoff::Known { .. } | Handoff::NoInbound => StatusCode::CONFLICT,
            Handoff::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Handoff::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The sentence `POST /tokens` answers (`cloudpdi receive` prints it).
    pub fn message(&self) -> String {
        match self {
            Handoff::Queued(id) => {
                format!("queued for import as job {id}: `cloudpdi status` shows its progress\n")
            }
            Handoff::Known { id, state } if state == "done" => format!(
                "this token was already imported (job {id}): the study is in the PACS; \
                 it is not imported twice\n"
            ),
            Handoff::Known { id, state } => format!(
                "this token is already being imported (job {id}, now at {state}): \
                 `cloudpdi status` shows its progress\n"
            ),
            Handoff::NoInbound => "this daemon does not import tokens: inbound.pacs is empty in \
                 its configuration; set it to the local PACS (host:port), restart the daemon \
                 and receive again, or write the study into a folder with `cloudpdi receive \
                 --out DIR`\n"
                .into(),
            Handoff::Refused(why) | Handoff::Unavailable(why) => format!("{why}\n"),
        }
    }
}

/// Queues the token of `text` (the watch folder's file format: the token line, then an
/// optional `patient-id:` line) for import, or says why it is not imported. The token is
/// never logged nor repeated in the answer.
pub async fn hand_over(state: &Arc<AdminState>, text: &str) -> Handoff {
    let Some(inbound) = state.inbound.clone() else {
        return Handoff::NoInbound;
    };
    let drop = match parse_drop(text) {
        Ok(drop) => drop,
        Err(e) => return Handoff::Refused(e.to_string()),
    };
    let queued = tokio::task::spawn_blocking(move || {
        let queued = inbound.queue(&drop.token, drop.patient_id)?;
        let known = match &queued {
            Queued::Known(id) => inbound.summary(id)?,
            Queued::New(_) => None,
        };
        Ok::<_, QueueError>((queued, known))
    })
    .await;
    match queued {
        Ok(Ok((Queued::New(id), _))) => Handoff::Queued(id),
        Ok(Ok((Queued::Known(id), known))) => {
            let state = known.map_or_else(|| "queued".to_owned(), |job| job.state);
            info!(job = %id, state = %state, "token handed over again: not imported twice");
            Handoff::Known { id, state }
        }
        Ok(Err(
            e @ (QueueError::Repository(_)
            | QueueError::Community(_)
            | QueueError::Token(_)
            | QueueError::PatientId),
        )) => Handoff::Refused(e.to_string()),
        Ok(Err(e @ QueueError::Io { .. })) => Handoff::Unavailable(e.to_string()),
        Ok(Err(e)) => Handoff::Unavailable(format!("index unavailable: {e}")),
        Err(e) => Handoff::Unavailable(format!("index unavailable: {e}")),
    }
}

/// `POST /jobs/sent`: records a send finished by `cloudpdi send` (a JSON
/// [`OutboundJob`] at step `done`, no batch, an `S…` ID).
pub(super) async fn sent(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = without_admin_header(&headers, "cloudpdi send") {
        return refusal;
    }
    let job = match serde_json::from_slice::<OutboundJob>(&body) {
        Ok(job) if is_sent_record(&job) => job,
        Ok(_) => {
            return answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                "only the record of a finished `cloudpdi send` (ID S…, step done, no batch, \
                 no sealed deliveries) can be added\n"
                    .into(),
            );
        }
        Err(e) => {
            return answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("not a send record: {e}\n"),
            );
        }
    };
    if let Err(why) = state.outbound.check_sent(&job) {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("not a send of this daemon's configuration: {why}\n"),
        );
    }
    let outbound = state.outbound.clone();
    let id = job.id.clone();
    match tokio::task::spawn_blocking(move || outbound.record_sent(&job)).await {
        Ok(Ok(true)) => answer(
            StatusCode::CREATED,
            format!("recorded as job {id}: `cloudpdi status` lists it\n"),
        ),
        Ok(Ok(false)) => answer(
            StatusCode::CONFLICT,
            format!("a job {id} is already recorded\n"),
        ),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

/// Whether `job` is what `cloudpdi send` records: finished, from no batch, with the
/// `S` ID the command gives (letters, digits and `-`, bounded), and no sealed deliveries
/// (the command makes none: a record with some could make `cloudpdi retry` seal its
/// token file to the route's facilities).
fn is_sent_record(job: &OutboundJob) -> bool {
    job.step == OutStep::Done
        && job.batch.is_none()
        && job.deliveries.is_empty()
        && job.id.len() <= 32
        && job.id.starts_with('S')
        && job
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record `cloudpdi send` posts, with `deliveries` as given.
    fn record(deliveries: serde_json::Value) -> OutboundJob {
        serde_json::from_value(serde_json::json!({
            "id": "S20261129-100000-4242",
            "batch": null,
            "route": "ct",
            "step": "done",
            "progress": {"created_at": 1, "updated_at": 1, "attempts": 0,
                         "last_error": null, "retry_at": 0},
            "instances": 2,
            "excluded": 0,
            "container_bytes": 100,
            "expires_at": 4_000_000_000_u32,
            "document_id": "0123456789abcdef0123",
            "token_file": null,
            "slip_file": null,
            "spool_removed": false,
            "deliveries": deliveries,
        }))
        .expect("a send record")
    }

    #[test]
    fn a_send_record_with_sealed_deliveries_is_refused() {
        assert!(is_sent_record(&record(serde_json::json!([]))));
        let posted = serde_json::json!([{"recipient": "HOSPB", "posted_at": 1,
                                         "message_id": "0123456789abcdef0123", "error": null}]);
        assert!(!is_sent_record(&record(posted)));
    }
}
