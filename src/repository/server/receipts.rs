//! `POST /v1/documents/{id}/receipts`: what the receiver imported, once per download.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use crate::repository::api::{self, Receipt, ReceiptRecord};
use crate::repository::storage::Snapshot;
use crate::repository::unix_now;

use super::authenticate::{Proven, SendReceipt};
use super::body::read_json;
use super::caller::Answer;
use super::refusal::Refusal;
use super::{App, Shared};

/// Largest instance count a receipt may report (imported plus refused): a PDI holds at
/// most a million files (`pdi::fileset`), so more is a made-up number.
const MAX_RECEIPT_INSTANCES: u64 = 1_000_000;

/// `POST /v1/documents/{id}/receipts`.
pub(super) async fn receipt(
    State(app): Shared,
    proven: Proven<SendReceipt>,
    body: Body,
) -> Response {
    let result = store_receipt(&app, &proven.snapshot, body).await;
    proven.caller.answer(&app, result).await
}

async fn store_receipt(app: &App, snapshot: &Snapshot, body: Body) -> Result<Answer, Refusal> {
    if !snapshot.complete || snapshot.downloads == 0 {
        return Err(Refusal::not_available());
    }
    let receipt: Receipt = read_json(body, app.server.body_idle_timeout()).await?;
    if receipt.note.len() > api::MAX_NOTE_LEN || receipt.note.chars().any(char::is_control) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "the note is limited to {} bytes without control characters",
                api::MAX_NOTE_LEN
            ),
        ));
    }
    if receipt
        .facility
        .as_deref()
        .is_some_and(|code| !crate::facility::is_code(code))
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "facility is a facility code: 1 to {} characters of A-Z, a-z, 0-9, _ and -",
                crate::facility::MAX_CODE_LEN
            ),
        ));
    }
    let counted = receipt
        .instances_imported
        .checked_add(receipt.instances_refused);
    if counted.is_none_or(|n| n > MAX_RECEIPT_INSTANCES) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "instances_imported plus instances_refused is limited to {MAX_RECEIPT_INSTANCES}"
            ),
        ));
    }
    let mut detail = format!(
        "imported {} refused {}",
        receipt.instances_imported, receipt.instances_refused
    );
    if let Some(facility) = &receipt.facility {
        detail.push_str(&format!(" by facility {facility}"));
    }
    let stored = ReceiptRecord {
        received_at: unix_now(),
        receipt,
    };
    let added = app
        .storage
        .add_receipt(snapshot, &stored)
        .await
        .map_err(Refusal::unavailable)?;
    if !added {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "receipt_exists",
            format!(
                "every download of this document already has its receipt ({} downloads); \
                 a receipt is sent once per download",
                snapshot.downloads
            ),
        ));
    }
    app.metrics.receipts.inc();
    Ok(Answer::ok((StatusCode::CREATED, Json(stored))).with_detail(detail))
}
