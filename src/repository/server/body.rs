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

/// A request body read chunk by chunk: at most `limit` bytes in all, each chunk within
/// `idle` of the last.
pub(super) struct BodyChunks {
    body: axum::body::BodyDataStream,
    limit: usize,
    idle: Duration,
    read: usize,
}

impl BodyChunks {
    /// Reads `body` under these bounds.
    pub(super) fn new(body: Body, limit: usize, idle: Duration) -> BodyChunks {
        BodyChunks {
            body: body.into_data_stream(),
            limit,
            idle,
            read: 0,
        }
    }

    /// The next chunk, or `None` at the end of the body.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, Refusal> {
        let frame = tokio::time::timeout(self.idle, self.body.next())
            .await
            .map_err(|_| {
                Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "the request body stalled; retry",
                )
            })?;
        match frame {
            None => Ok(None),
            Some(Ok(chunk)) => {
                self.read = self.read.saturating_add(chunk.len());
                if self.read > self.limit {
                    return Err(Refusal::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!(
                            "the request body is larger than the {} bytes allowed",
                            self.limit
                        ),
                    ));
                }
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "body_error",
                format!("the request body could not be read: {e}"),
            )),
        }
    }
}

/// The whole body, at most `limit` bytes, each chunk within `idle` of the last.
pub(super) async fn read_body(body: Body, limit: usize, idle: Duration) -> Result<Bytes, Refusal> {
    let mut chunks = BodyChunks::new(body, limit, idle);
    let mut buffer = BytesMut::new();
    while let Some(chunk) = chunks.next().await? {
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
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
