//! A facility's documents: create one, ask for its status, revoke it, extend its expiry;
//! and the state a sender sees, which the part and download handlers check too.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use crate::repository::api::{
    Created, DocumentStatus, Extend, GONE, INVALID_EXPIRY, MAX_EXTENSIONS, NewDocument,
    State as DocState, TOO_MANY_EXTENSIONS,
};
use crate::repository::config::ServerConfig;
use crate::repository::storage::{DocumentMeta, Settlement, Snapshot};
use crate::repository::unix_now;

use super::authenticate::{Create, ExtendExpiry, Facility, Owned, Revoke, Status};
use super::body::read_json;
use super::caller::Answer;
use super::refusal::Refusal;
use super::{App, Shared};

/// `POST /v1/documents`.
pub(super) async fn create(State(app): Shared, facility: Facility<Create>, body: Body) -> Response {
    let result = create_document(&app, facility.name, body).await;
    facility.caller.answer(&app, result).await
}

async fn create_document(app: &App, facility: String, body: Body) -> Result<Answer, Refusal> {
    let request: NewDocument = read_json(body, app.server.body_idle_timeout()).await?;
    let now = unix_now();
    check_new_document(&app.server, &request, now)?;
    let mut random = [0u8; crate::token::DOCUMENT_ID_BYTES];
    getrandom::fill(&mut random).map_err(Refusal::unavailable)?;
    let meta = DocumentMeta {
        id: hex::encode(random),
        facility,
        size: request.size,
        part_size: app.server.part_size(),
        created_at: now,
        expires_at: request.expires_at,
        max_downloads: request.max_downloads,
        proof_sha256: request.proof_hash,
    };
    let purge_at = app.purge_at(request.expires_at);
    app.storage
        .create(&meta, purge_at)
        .await
        .map_err(Refusal::unavailable)?;
    app.metrics.documents_created.inc();
    let size = meta
        .size
        .map_or_else(|| "streamed".to_owned(), |n| n.to_string());
    let detail = format!(
        "size {size} expires_at {} max_downloads {}",
        meta.expires_at, meta.max_downloads
    );
    let created = Created {
        document_id: meta.id.clone(),
        part_size: meta.part_size,
        parts: meta.parts(),
    };
    Ok(Answer::ok((StatusCode::CREATED, Json(created)))
        .with_detail(detail)
        .with_created(meta.id))
}

fn check_new_document(
    server: &ServerConfig,
    request: &NewDocument,
    now: u64,
) -> Result<(), Refusal> {
    let max = server.max_document_bytes();
    if request.size == Some(0) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "size must be at least 1 byte",
        ));
    }
    if request.size.is_some_and(|size| size > max) {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("documents are limited to {max} bytes on this repository"),
        ));
    }
    let latest = now.saturating_add(server.max_expiry_days.saturating_mul(86_400));
    if request.expires_at <= now || request.expires_at > latest {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_expiry",
            format!(
                "expires_at must be in the future and at most {} days ahead",
                server.max_expiry_days
            ),
        ));
    }
    if request.max_downloads == 0 || request.max_downloads > server.max_downloads_limit {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_max_downloads",
            format!(
                "max_downloads must be between 1 and {}",
                server.max_downloads_limit
            ),
        ));
    }
    Ok(())
}

/// `GET /v1/documents/{id}`.
pub(super) async fn status(State(app): Shared, owned: Owned<Status>) -> Response {
    let result = status_of(&app, &owned.snapshot).await.map(Answer::ok);
    owned.caller.answer(&app, result).await
}

/// `DELETE /v1/documents/{id}`: the content goes at once; revoking again is no change.
pub(super) async fn revoke(State(app): Shared, owned: Owned<Revoke>) -> Response {
    let Owned {
        caller,
        mut snapshot,
        ..
    } = owned;
    let result = async {
        if !snapshot.revoked {
            app.storage
                .revoke(&snapshot.meta.id, unix_now())
                .await
                .map_err(Refusal::unavailable)?;
            app.metrics.revoked.inc();
            snapshot.revoked = true;
            snapshot.parts.clear();
        }
        status_of(&app, &snapshot).await.map(Answer::ok)
    }
    .await;
    caller.answer(&app, result).await
}

/// `PATCH /v1/documents/{id}`: a later expiry, within `server.max_expiry_days` from now,
/// for a document neither revoked nor expired, extended fewer than [`MAX_EXTENSIONS`] times.
/// The sweep then keeps it until the new expiry, and the tombstone period runs from there.
/// The current expiry is settled as extended before the extension is written
/// ([`settle_extension`]): a sweep that settled it as expired first wins, and the extend
/// is answered 410 gone, not with a status the content will no longer be behind.
pub(super) async fn extend(State(app): Shared, owned: Owned<ExtendExpiry>, body: Body) -> Response {
    let Owned {
        caller, snapshot, ..
    } = owned;
    let result = async {
        let request: Extend = read_json(body, app.server.body_idle_timeout()).await?;
        let now = unix_now();
        let before = snapshot.meta.expires_at;
        let snapshot = settle_extension(&app, snapshot, request.expires_at, now).await?;
        if matches!(
            state_of(&snapshot, now),
            DocState::Revoked | DocState::Expired
        ) {
            return Err(swept(before));
        }
        app.metrics.extended.inc();
        let detail = format!("expires_at {} (was {before})", request.expires_at);
        status_of(&app, &snapshot)
            .await
            .map(|status| Answer::ok(status).with_detail(detail))
    }
    .await;
    caller.answer(&app, result).await
}

/// Extends the document of `snapshot` to `expires_at`: checks the request, settles the
/// current expiry as extended (create-if-absent, shared with the sweep: see
/// [`crate::repository::storage`]), writes the extension, and returns the document read
/// again. An expiry the sweep settled first answers 410 gone. Another extension
/// settled first is written out (its server may not have yet), and the request checked
/// again against the expiry that gives; each such round finds one more extension, so
/// there are at most [`MAX_EXTENSIONS`] before [`check_extend`] refuses.
async fn settle_extension(
    app: &App,
    mut snapshot: Snapshot,
    expires_at: u64,
    now: u64,
) -> Result<Snapshot, Refusal> {
    let id = snapshot.meta.id.clone();
    loop {
        check_extend(&app.server, &snapshot, expires_at, now)?;
        let current = snapshot.meta.expires_at;
        let ours = Settlement::Extended {
            to: expires_at,
            at: now,
        };
        let settled = app
            .storage
            .settle(&id, current, ours)
            .await
            .map_err(Refusal::unavailable)?;
        let Settlement::Extended { to, at } = settled else {
            return Err(swept(current));
        };
        app.storage
            .extend(&id, to, app.purge_at(to), at)
            .await
            .map_err(Refusal::unavailable)?;
        snapshot = app
            .storage
            .snapshot(&id)
            .await
            .map_err(Refusal::unavailable)?
            .ok_or_else(|| swept(current))?;
        if settled == ours {
            return Ok(snapshot);
        }
    }
}

/// Refuses an extend to `expires_at` of a document gone (revoked, expired), not later than
/// its expiry, or beyond the repository's limit from `now`.
fn check_extend(
    server: &ServerConfig,
    snapshot: &Snapshot,
    expires_at: u64,
    now: u64,
) -> Result<(), Refusal> {
    let current = snapshot.meta.expires_at;
    match state_of(snapshot, now) {
        DocState::Revoked => {
            return Err(Refusal::new(
                StatusCode::GONE,
                GONE,
                "the document was revoked: its expiry cannot change; send the study again \
                 for a new token",
            ));
        }
        DocState::Expired => {
            return Err(Refusal::new(
                StatusCode::GONE,
                GONE,
                format!(
                    "the document expired at {} and its content is deleted: its expiry \
                     cannot change; send the study again for a new token",
                    crate::clock::rfc3339(current)
                ),
            ));
        }
        DocState::Uploading | DocState::Complete => {}
    }
    if expires_at <= current {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            INVALID_EXPIRY,
            format!(
                "an expiry can only be extended: the document expires at {} ({current}); \
                 ask for a later time",
                crate::clock::rfc3339(current)
            ),
        ));
    }
    let latest = now.saturating_add(server.max_expiry_days.saturating_mul(86_400));
    if expires_at > latest {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            INVALID_EXPIRY,
            format!(
                "expires_at is beyond this repository's limit of {} days ahead \
                 (server.max_expiry_days): the latest expiry allowed now is {} ({latest})",
                server.max_expiry_days,
                crate::clock::rfc3339(latest)
            ),
        ));
    }
    if snapshot.extensions >= MAX_EXTENSIONS {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            TOO_MANY_EXTENSIONS,
            format!(
                "the document's expiry was extended {} times already, the most this \
                 repository allows ({MAX_EXTENSIONS}): it stays until {}; send the study \
                 again for a new token",
                snapshot.extensions,
                crate::clock::rfc3339(current)
            ),
        ));
    }
    Ok(())
}

/// The refusal of an extend the sweep overtook: the document expired (its content
/// deleted) at `expires_at`, or was revoked, while the extension was being settled.
fn swept(expires_at: u64) -> Refusal {
    Refusal::new(
        StatusCode::GONE,
        GONE,
        format!(
            "the document expired at {} (or was revoked) while it was being extended, and \
             its content is deleted: send the study again for a new token",
            crate::clock::rfc3339(expires_at)
        ),
    )
}

/// What a sender sees of its document: state, parts held, hash, downloads, receipts.
pub(super) async fn status_of(
    app: &App,
    snapshot: &Snapshot,
) -> Result<Json<DocumentStatus>, Refusal> {
    let meta = &snapshot.meta;
    let record = if snapshot.complete {
        app.storage
            .complete_record(&meta.id)
            .await
            .map_err(Refusal::unavailable)?
    } else {
        None
    };
    let size = record
        .as_ref()
        .and_then(|r| r.size)
        .or(meta.size)
        .unwrap_or(0);
    let (sha256, parts_sha256) = record.map_or((None, None), |r| {
        (r.sha256.map(hex::encode), r.parts_sha256.map(hex::encode))
    });
    let receipts = app
        .storage
        .receipts(snapshot)
        .await
        .map_err(Refusal::unavailable)?;
    Ok(Json(DocumentStatus {
        document_id: meta.id.clone(),
        state: state_of(snapshot, unix_now()),
        size,
        part_size: meta.part_size,
        parts_held: snapshot.parts.keys().copied().collect(),
        sha256,
        parts_sha256,
        created_at: meta.created_at,
        expires_at: meta.expires_at,
        max_downloads: meta.max_downloads,
        downloads: snapshot.downloads,
        receipts,
    }))
}

/// The state a sender sees.
pub(super) fn state_of(snapshot: &Snapshot, now: u64) -> DocState {
    if snapshot.revoked {
        DocState::Revoked
    } else if snapshot.expired || now >= snapshot.meta.expires_at {
        DocState::Expired
    } else if snapshot.complete {
        DocState::Complete
    } else {
        DocState::Uploading
    }
}

/// Refuses changes to a document that is no longer uploading.
pub(super) fn check_uploading(snapshot: &Snapshot) -> Result<(), Refusal> {
    match state_of(snapshot, unix_now()) {
        DocState::Uploading => Ok(()),
        DocState::Complete => Err(Refusal::new(
            StatusCode::CONFLICT,
            "already_complete",
            "the document is complete; its parts cannot change",
        )),
        DocState::Revoked => Err(Refusal::new(
            StatusCode::CONFLICT,
            "revoked",
            "the document was revoked",
        )),
        DocState::Expired => Err(Refusal::new(
            StatusCode::GONE,
            "expired",
            "the document has expired",
        )),
    }
}
