//! Mailboxes: a facility posts a sealed token to another facility's mailbox; the
//! recipient lists, fetches and deletes what is in its own mailbox, and only its own (the
//! `/v1/mailbox/...` routes name no facility: the caller's is meant).
//!
//! The repository keeps the sealed bytes, the sender it authenticated, the recipient, the
//! size and the time; it cannot open the bytes and refuses anything that is not a sealed
//! envelope. The audit trail names sender, recipient, size and message ID, never content.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::repository::api::{
    self, MAILBOX_FULL, MAX_LISTED_MESSAGES, MAX_MAILBOX_MESSAGES, MAX_MESSAGE_LEN, MessageInfo,
    Posted,
};
use crate::repository::storage::MessageMeta;
use crate::repository::unix_now;

use super::authenticate::{DeleteMessage, Facility, FetchMessage, ListMessages, PostMessage};
use super::body::read_body;
use super::caller::Answer;
use super::refusal::Refusal;
use super::{App, Shared};

/// `POST /v1/mailboxes/{recipient}/messages`.
pub(super) async fn post(
    State(app): Shared,
    facility: Facility<PostMessage>,
    Path(recipient): Path<String>,
    body: Body,
) -> Response {
    let result = post_message(&app, &facility.name, &recipient, body).await;
    facility.caller.answer(&app, result).await
}

/// The ID of `sealed` from `sender` to `recipient`: the same post repeated (a retry whose
/// answer was lost) is the same message, while another sender's copy of the bytes is not.
fn message_id(sender: &str, recipient: &str, sealed: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"cloudpdi mailbox message\0")
        .chain_update(sender.as_bytes())
        .chain_update([0])
        .chain_update(recipient.as_bytes())
        .chain_update([0])
        .chain_update(sealed)
        .finalize();
    hex::encode(&digest[..api::MESSAGE_ID_LEN / 2])
}

/// What the audit line says of a message.
fn describe(meta: &MessageMeta) -> String {
    format!(
        "message {} from {} to {}, {} bytes",
        meta.id, meta.sender, meta.recipient, meta.size
    )
}

async fn post_message(
    app: &App,
    sender: &str,
    recipient: &str,
    body: Body,
) -> Result<Answer, Refusal> {
    if !crate::facility::is_code(recipient) {
        return Err(Refusal::invalid_facility_code());
    }
    if !app.directory.contains_key(recipient) {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "unknown_facility",
            format!(
                "this repository has no facility {recipient} with a registered public key \
                 to deliver to; check deliver_to, or ask the repository operator"
            ),
        ));
    }
    let sealed = read_body(body, MAX_MESSAGE_LEN, app.server.body_idle_timeout()).await?;
    if !crate::facility::seal::is_envelope(&sealed) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "not_sealed",
            "a mailbox message is a sealed token (cloudpdi sealed envelope, version 1); \
             the repository carries nothing else",
        ));
    }
    let id = message_id(sender, recipient, &sealed);
    let storage_failed = Refusal::unavailable;
    if let Some(existing) = app
        .storage
        .message_meta(recipient, &id)
        .await
        .map_err(storage_failed)?
    {
        let detail = format!("{} (posted again)", describe(&existing));
        return Ok(Answer::ok(Json(Posted { message_id: id })).with_detail(detail));
    }
    let waiting = app
        .storage
        .mailbox(recipient)
        .await
        .map_err(storage_failed)?
        .len();
    if waiting >= MAX_MAILBOX_MESSAGES {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            MAILBOX_FULL,
            format!(
                "the mailbox of {recipient} holds {waiting} messages, the most it may hold \
                 ({MAX_MAILBOX_MESSAGES}); the recipient is not fetching them: ask it to \
                 check its daemon; the delivery is tried again later"
            ),
        ));
    }
    let meta = MessageMeta {
        id: id.clone(),
        sender: sender.to_owned(),
        recipient: recipient.to_owned(),
        size: sealed.len() as u64,
        posted_at: unix_now(),
    };
    app.storage
        .post_message(&meta, sealed)
        .await
        .map_err(storage_failed)?;
    Ok(
        Answer::ok((StatusCode::CREATED, Json(Posted { message_id: id })))
            .with_detail(describe(&meta)),
    )
}

/// `GET /v1/mailbox/messages`: the oldest [`MAX_LISTED_MESSAGES`] of the caller's.
pub(super) async fn list(State(app): Shared, facility: Facility<ListMessages>) -> Response {
    let result = list_messages(&app, &facility.name).await;
    facility.caller.answer(&app, result).await
}

async fn list_messages(app: &App, recipient: &str) -> Result<Answer, Refusal> {
    let ids = app
        .storage
        .mailbox(recipient)
        .await
        .map_err(Refusal::unavailable)?;
    let mut messages = Vec::new();
    for id in ids.iter().take(MAX_LISTED_MESSAGES) {
        if let Some(meta) = app
            .storage
            .message_meta(recipient, id)
            .await
            .map_err(Refusal::unavailable)?
        {
            messages.push(MessageInfo {
                message_id: meta.id,
                sender: meta.sender,
                size: meta.size,
                posted_at: meta.posted_at,
            });
        }
    }
    messages.sort_by(|a, b| (a.posted_at, &a.message_id).cmp(&(b.posted_at, &b.message_id)));
    let detail = format!("{} of {} messages", messages.len(), ids.len());
    Ok(Answer::ok(Json(messages)).with_detail(detail))
}

/// `GET /v1/mailbox/messages/{id}`: the sealed bytes, with the sender in
/// [`api::MESSAGE_SENDER_HEADER`].
pub(super) async fn fetch(
    State(app): Shared,
    facility: Facility<FetchMessage>,
    Path(id): Path<String>,
) -> Response {
    let result = fetch_message(&app, &facility.name, &id).await;
    facility.caller.answer(&app, result).await
}

fn no_such_message() -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "this facility's mailbox has no message with this ID (it may have been deleted)",
    )
}

async fn fetch_message(app: &App, recipient: &str, id: &str) -> Result<Answer, Refusal> {
    if !api::is_message_id(id) {
        return Err(Refusal::invalid_message_id());
    }
    let Some((meta, sealed)) = app
        .storage
        .message(recipient, id, MAX_MESSAGE_LEN)
        .await
        .map_err(Refusal::unavailable)?
    else {
        return Err(no_such_message());
    };
    let sender = HeaderValue::from_str(&meta.sender).map_err(Refusal::unavailable)?;
    let mut response = sealed.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(api::MESSAGE_SENDER_HEADER, sender);
    Ok(Answer::ok(response).with_detail(describe(&meta)))
}

/// `DELETE /v1/mailbox/messages/{id}`: 204, also when the message is not there (a
/// repeated delete after a lost answer).
pub(super) async fn delete(
    State(app): Shared,
    facility: Facility<DeleteMessage>,
    Path(id): Path<String>,
) -> Response {
    let result = delete_message(&app, &facility.name, &id).await;
    facility.caller.answer(&app, result).await
}

async fn delete_message(app: &App, recipient: &str, id: &str) -> Result<Answer, Refusal> {
    if !api::is_message_id(id) {
        return Err(Refusal::invalid_message_id());
    }
    let meta = app
        .storage
        .message_meta(recipient, id)
        .await
        .map_err(Refusal::unavailable)?;
    app.storage
        .delete_message(recipient, id)
        .await
        .map_err(Refusal::unavailable)?;
    let detail = match &meta {
        Some(meta) => describe(meta),
        None => format!("message {id} was not there"),
    };
    Ok(Answer::ok(StatusCode::NO_CONTENT).with_detail(detail))
}
