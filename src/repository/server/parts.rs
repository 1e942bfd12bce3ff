//! Uploading a document: its parts, each of an exact length, in any order and as often
//! as needed, then the complete, which hashes the parts read back from storage.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::repository::api::Complete as CompleteRequest;
use crate::repository::storage::{CompleteRecord, DocumentMeta, Snapshot, Storage, StorageError};
use crate::repository::unix_now;

use super::authenticate::{Complete, Owned, UploadPart};
use super::body::{read_body, read_json};
use super::caller::Answer;
use super::documents::{check_uploading, status_of};
use super::refusal::Refusal;
use super::{App, Shared};

/// How long a part upload waits for a free upload slot before answering 503.
const UPLOAD_SLOT_WAIT: Duration = Duration::from_secs(30);

/// `PUT /v1/documents/{id}/parts/{n}`.
pub(super) async fn put_part(
    State(app): Shared,
    owned: Owned<UploadPart>,
    Path((_, part)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = store_part(&app, &owned.snapshot, &part, &headers, body).await;
    owned.caller.answer(&app, result).await
}

async fn store_part(
    app: &App,
    snapshot: &Snapshot,
    part: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Answer, Refusal> {
    let (n, expected) = check_part(snapshot, part, headers)?;
    let Ok(_slot) = tokio::time::timeout(UPLOAD_SLOT_WAIT, app.uploads.acquire()).await else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the repository is receiving too many uploads; retry later",
        ));
    };
    let limit = usize::try_from(expected).unwrap_or(usize::MAX);
    let bytes = read_body(body, limit, app.server.body_idle_timeout()).await?;
    if bytes.len() as u64 != expected {
        return Err(length_mismatch(n, expected, bytes.len() as u64));
    }
    app.storage
        .put_part(&snapshot.meta.id, n, bytes)
        .await
        .map_err(Refusal::unavailable)?;
    app.metrics.parts_stored.inc();
    app.metrics.bytes_uploaded.inc_by(expected);
    Ok(Answer::ok(StatusCode::NO_CONTENT).with_detail(format!("part {n} ({expected} bytes)")))
}

fn length_mismatch(n: u32, expected: u64, got: u64) -> Refusal {
    Refusal::new(
        StatusCode::BAD_REQUEST,
        "length_mismatch",
        format!("part {n} must be exactly {expected} bytes, got {got}"),
    )
}

/// Part number and exact length, after checking state and the declared length.
fn check_part(snapshot: &Snapshot, part: &str, headers: &HeaderMap) -> Result<(u32, u64), Refusal> {
    check_uploading(snapshot)?;
    let meta = &snapshot.meta;
    let (n, expected) = part
        .parse::<u32>()
        .ok()
        .and_then(|n| Some((n, meta.part_len(n)?)))
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_part",
                format!(
                    "part numbers of this document are 0 to {}",
                    meta.parts() - 1
                ),
            )
        })?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        None => Err(Refusal::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "a part upload needs a Content-Length header",
        )),
        Some(len) if len > expected => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("part {n} must be exactly {expected} bytes, {len} declared"),
        )),
        Some(len) if len < expected => Err(length_mismatch(n, expected, len)),
        Some(_) => Ok((n, expected)),
    }
}

/// `POST /v1/documents/{id}/complete`: idempotent for the same hash.
pub(super) async fn complete(State(app): Shared, owned: Owned<Complete>, body: Body) -> Response {
    let Owned {
        caller,
        mut snapshot,
        ..
    } = owned;
    let result = complete_document(&app, &mut snapshot, body).await;
    caller.answer(&app, result).await
}

async fn complete_document(
    app: &App,
    snapshot: &mut Snapshot,
    body: Body,
) -> Result<Answer, Refusal> {
    let request: CompleteRequest = read_json(body, app.server.body_idle_timeout()).await?;
    let meta = &snapshot.meta;
    if snapshot.complete && !snapshot.revoked {
        let held = app
            .storage
            .complete_record(&meta.id)
            .await
            .map_err(Refusal::unavailable)?;
        if held.is_some_and(|r| r.sha256 == request.sha256) {
            let status = status_of(app, snapshot).await?;
            return Ok(Answer::ok(status).with_detail("already complete".into()));
        }
    }
    check_uploading(snapshot)?;
    check_all_parts(snapshot)?;
    let sha256 = hash_parts(&app.storage, meta)
        .await
        .map_err(Refusal::unavailable)?;
    if sha256 != request.sha256 {
        app.metrics.hash_mismatches.inc();
        app.storage
            .delete_parts(&meta.id)
            .await
            .map_err(Refusal::unavailable)?;
        return Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            "the stored parts do not have the SHA-256 given; they were deleted, upload again",
        ));
    }
    let completed = CompleteRecord {
        sha256,
        completed_at: unix_now(),
    };
    app.storage
        .put_complete(&meta.id, &completed)
        .await
        .map_err(Refusal::unavailable)?;
    app.metrics.documents_completed.inc();
    snapshot.complete = true;
    Ok(Answer::ok(status_of(app, snapshot).await?))
}

fn check_all_parts(snapshot: &Snapshot) -> Result<(), Refusal> {
    let meta = &snapshot.meta;
    let missing: Vec<u32> = (0..meta.parts())
        .filter(|n| snapshot.parts.get(n).copied() != meta.part_len(*n))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = missing.iter().take(10).map(u32::to_string).collect();
    Err(Refusal::new(
        StatusCode::CONFLICT,
        "incomplete",
        format!(
            "{} parts are missing (e.g. {}); upload them first",
            missing.len(),
            shown.join(", ")
        ),
    ))
}

/// SHA-256 of all parts in order, read back from storage.
async fn hash_parts(storage: &Storage, meta: &DocumentMeta) -> Result<[u8; 32], StorageError> {
    let mut hasher = Sha256::new();
    for n in 0..meta.parts() {
        let len = meta.part_len(n).unwrap_or(0);
        let mut stream = storage.part_stream(&meta.id, n, 0..len).await?;
        while let Some(chunk) = stream.next().await {
            hasher.update(chunk?);
        }
    }
    Ok(hasher.finalize().into())
}
