//! Request bodies, read with a size limit and an idle timeout so a client can neither
//! fill memory nor hold a slot by going silent.

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::refusal::Refusal;

/// Largest JSON request body (create, complete, receipt).
const MAX_JSON_BODY: usize = 16 * 1024;

/// The whole body, at most `limit` bytes, each chunk within `idle` of the last.
pub(super) async fn read_body(body: Body, limit: usize, idle: Duration) -> Result<Bytes, Refusal> {
    let mut body = body.into_data_stream();
    let mut buffer = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle, body.next()).await.map_err(|_| {
            Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request body stalled; retry",
            )
        })?;
        match frame {
            None => return Ok(buffer.freeze()),
            Some(Ok(chunk)) => {
                if buffer.len() + chunk.len() > limit {
                    return Err(Refusal::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!("the request body is larger than the {limit} bytes allowed"),
                    ));
                }
                buffer.extend_from_slice(&chunk);
            }
            Some(Err(e)) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "body_error",
                    format!("the request body could not be read: {e}"),
                ));
            }
        }
    }
}

/// A JSON body of at most [`MAX_JSON_BODY`] bytes.
pub(super) async fn read_json<T: for<'de> serde::Deserialize<'de>>(
    body: Body,
    idle: Duration,
) -> Result<T, Refusal> {
    let bytes = read_body(body, MAX_JSON_BODY, idle).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the JSON body is not valid: {e}"),
        )
    })
}
