//! Uploading a document: its parts, in any order and as often as needed (each of an exact
//! length, or for a streamed document of 1 to `part_size` bytes), each hashed as it
//! arrives; then the complete, which checks the recorded part hashes against the sender's
//! digest (no content read), or for the first form hashes the parts read back.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::repository::api::{Complete as CompleteRequest, PartsHash, parts_digest};
use crate::repository::storage::{
    CompleteRecord, DocumentMeta, Snapshot, Storage, StorageError, parts_of,
};
use crate::repository::unix_now;

use super::authenticate::{Complete, Owned, UploadPart};
use super::body::{BodyChunks, read_json};
use super::caller::Answer;
use super::documents::{check_uploading, status_of};
use super::refusal::Refusal;
use super::{App, Shared};

/// Parts checked at once by a completion: each a small record read and a metadata read
/// (on S3 a GET and a HEAD), or, for a part with no valid record, the part read and hashed.
const HASH_READS_AT_ONCE: usize = 16;

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
    let (n, expected) = check_part(snapshot, part, headers, app.server.max_document_bytes())?;
    let Ok(_slot) = tokio::time::timeout(UPLOAD_SLOT_WAIT, app.uploads.acquire()).await else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the repository is receiving too many uploads; retry later",
        ));
    };
    let limit = usize::try_from(expected).unwrap_or(usize::MAX);
    let mut chunks = BodyChunks::new(body, limit, app.server.body_idle_timeout());
    // Written as it arrives (never held whole on local files); dropped on a refusal
    // below, it leaves no part.
    let mut upload = app
        .storage
        .part_upload(&snapshot.meta.id, n)
        .await
        .map_err(Refusal::unavailable)?;
    let mut received: u64 = 0;
    while let Some(chunk) = chunks.next().await? {
        received += chunk.len() as u64;
        upload.write(&chunk).await.map_err(Refusal::unavailable)?;
    }
    if received != expected {
        return Err(length_mismatch(n, expected, received));
    }
    upload.finish().await.map_err(Refusal::unavailable)?;
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

/// Part number and exact length, after checking state and the declared length: the
/// length the layout fixes, or for a streamed document the declared one (1 to
/// `part_size` bytes, in a part that starts below the repository's document limit).
fn check_part(
    snapshot: &Snapshot,
    part: &str,
    headers: &HeaderMap,
    max_document: u64,
) -> Result<(u32, u64), Refusal> {
    check_uploading(snapshot)?;
    let meta = &snapshot.meta;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let n = part.parse::<u32>().ok();
    let (n, expected) = match meta.size {
        Some(_) => n
            .and_then(|n| Some((n, meta.part_len(n)?)))
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_part",
                    format!(
                        "part numbers of this document are 0 to {}",
                        meta.parts().saturating_sub(1)
                    ),
                )
            })?,
        None => {
            let last = max_document.div_ceil(meta.part_size).saturating_sub(1);
            let n = n
                .filter(|&n| u64::from(n).saturating_mul(meta.part_size) < max_document)
                .ok_or_else(|| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_part",
                        format!(
                            "part numbers of a streamed document are 0 to {last}: documents \
                             are limited to {max_document} bytes on this repository"
                        ),
                    )
                })?;
            (n, declared.unwrap_or(0).clamp(1, meta.part_size))
        }
    };
    match declared {
        None => Err(Refusal::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "a part upload needs a Content-Length header",
        )),
        Some(len) if meta.size.is_none() && len > meta.part_size => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "a part of a streamed document is at most {} bytes, {len} declared",
                meta.part_size
            ),
        )),
        Some(0) if meta.size.is_none() => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "length_mismatch",
            format!("part {n} of a streamed document must have at least 1 byte"),
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
    let id = snapshot.meta.id.clone();
    if snapshot.complete && !snapshot.revoked {
        let held = app
            .storage
            .complete_record(&id)
            .await
            .map_err(Refusal::unavailable)?;
        if held.is_some_and(|r| same_completion(&r, &request)) {
            let status = status_of(app, snapshot).await?;
            return Ok(Answer::ok(status).with_detail("already complete".into()));
        }
    }
    check_uploading(snapshot)?;
    let checked = match &request {
        CompleteRequest::Whole(whole) => check_whole(app, snapshot, whole.sha256).await?,
        CompleteRequest::Parts(parts) => check_parts(app, snapshot, parts).await?,
    };
    let Some(completed) = checked else {
        app.metrics.hash_mismatches.inc();
        app.storage
            .delete_parts(&id)
            .await
            .map_err(Refusal::unavailable)?;
        return Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            "the stored parts do not have the SHA-256 given; they were deleted, upload again",
        ));
    };
    app.storage
        .put_complete(&id, &completed)
        .await
        .map_err(Refusal::unavailable)?;
    app.metrics.documents_completed.inc();
    if let Some(size) = completed.size {
        let parts = parts_of(size, snapshot.meta.part_size);
        snapshot.parts.retain(|&n, _| n < parts);
    }
    snapshot.complete = true;
    Ok(Answer::ok(status_of(app, snapshot).await?))
}

/// Whether a completion asks for what `record` already holds (a retry after a lost answer).
fn same_completion(record: &CompleteRecord, request: &CompleteRequest) -> bool {
    match request {
        CompleteRequest::Whole(whole) => record.sha256 == Some(whole.sha256),
        CompleteRequest::Parts(parts) => {
            record.parts_sha256 == Some(parts.parts_sha256) && record.size == Some(parts.size)
        }
    }
}

/// The first form: every part read back and hashed. `None` on a mismatch.
async fn check_whole(
    app: &App,
    snapshot: &Snapshot,
    expected: [u8; 32],
) -> Result<Option<CompleteRecord>, Refusal> {
    if snapshot.meta.size.is_none() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a streamed document (created without a size) is completed with its size and \
             parts_sha256",
        ));
    }
    check_all_parts(snapshot, &snapshot.meta)?;
    let sha256 = hash_parts(&app.storage, &snapshot.meta)
        .await
        .map_err(Refusal::unavailable)?;
    Ok((sha256 == expected).then(|| CompleteRecord {
        sha256: Some(sha256),
        parts_sha256: None,
        size: None,
        completed_at: unix_now(),
    }))
}

/// The second form: the layout of `size` fully held, every part's recorded hash read
/// (no content) while the part keeps the identity recorded with it, else the part read
/// and hashed again ([`Storage::checked_part_hash`]), their digest compared; parts beyond
/// the end (an abandoned attempt's) deleted. `None` on a mismatch.
async fn check_parts(
    app: &App,
    snapshot: &Snapshot,
    request: &PartsHash,
) -> Result<Option<CompleteRecord>, Refusal> {
    let meta = &snapshot.meta;
    let max = app.server.max_document_bytes();
    if request.size == 0 || request.size > max || meta.size.is_some_and(|s| s != request.size) {
        let allowed = meta
            .size
            .map_or_else(|| format!("1 to {max}"), |s| s.to_string());
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_size",
            format!(
                "the size given ({}) does not fit this document: it must be {allowed} bytes",
                request.size
            ),
        ));
    }
    let layout = DocumentMeta {
        size: Some(request.size),
        ..meta.clone()
    };
    check_all_parts(snapshot, &layout)?;
    let parts = layout.parts();
    let hashes: Vec<[u8; 32]> = futures_util::stream::iter(0..parts)
        .map(|n| {
            let storage = app.storage.clone();
            let id = meta.id.clone();
            async move {
                match storage.checked_part_hash(&id, n).await {
                    Ok(Some(hash)) => Ok(hash),
                    Ok(None) => Err(missing_refusal(&[n], "are missing")),
                    Err(e) => Err(Refusal::unavailable(e)),
                }
            }
        })
        .buffered(HASH_READS_AT_ONCE)
        .try_collect()
        .await?;
    if parts_digest(&hashes) != request.parts_sha256 {
        return Ok(None);
    }
    let leftovers: std::collections::BTreeSet<u32> = snapshot
        .parts
        .keys()
        .chain(snapshot.hashes.iter())
        .copied()
        .filter(|&n| n >= parts)
        .collect();
    for n in leftovers {
        app.storage
            .delete_part(&meta.id, n)
            .await
            .map_err(Refusal::unavailable)?;
    }
    Ok(Some(CompleteRecord {
        sha256: None,
        parts_sha256: Some(request.parts_sha256),
        size: Some(request.size),
        completed_at: unix_now(),
    }))
}

fn check_all_parts(snapshot: &Snapshot, layout: &DocumentMeta) -> Result<(), Refusal> {
    let missing: Vec<u32> = (0..layout.parts())
        .filter(|n| snapshot.parts.get(n).copied() != layout.part_len(*n))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(missing_refusal(&missing, "are missing"))
}

/// 409 `incomplete`, naming the first few parts that `what`.
fn missing_refusal(missing: &[u32], what: &str) -> Refusal {
    let shown: Vec<String> = missing.iter().take(10).map(u32::to_string).collect();
    Refusal::new(
        StatusCode::CONFLICT,
        "incomplete",
        format!(
            "{} parts {what} (e.g. {}); upload them first",
            missing.len(),
            shown.join(", ")
        ),
    )
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
