//! A refused request: the HTTP status, a stable error code and a sentence, answered as
//! the JSON [`ErrorBody`] every non-success of the API has.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::repository::api::{ErrorBody, NOT_AVAILABLE};

/// The code of a facility request without valid credentials (counted in `/metrics`).
pub(super) const UNAUTHORIZED: &str = "unauthorized";
/// The code of a proof refused for too many failures (counted in `/metrics`).
pub(super) const RATE_LIMITED: &str = "rate_limited";

/// A refusal: status, stable code, sentence.
#[derive(Debug)]
pub(super) struct Refusal {
    status: StatusCode,
    pub(super) code: &'static str,
    message: String,
}

impl Refusal {
    /// A refusal with `status`, the stable `code` clients match on, and a sentence that
    /// says what to do.
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    /// The one answer for every download or receipt that cannot be served (wrong proof,
    /// unknown document, expired, revoked, out of downloads), so a guesser learns nothing.
    pub(super) fn not_available() -> Self {
        Refusal::new(
            StatusCode::GONE,
            NOT_AVAILABLE,
            "the document is not available: the token is wrong, expired or revoked, \
             or its downloads are used up",
        )
    }

    /// Storage or the audit trail failed: logged here (the cause stays in the log), and
    /// answered 503 so the client retries.
    pub(super) fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::error!("repository: {e}");
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the repository cannot reach its storage or audit trail; retry later",
        )
    }

    /// A malformed document ID in the URL.
    pub(super) fn invalid_id() -> Self {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_document_id",
            "a document ID is 20 lower-case hex digits",
        )
    }

    /// A malformed facility code in the URL.
    pub(super) fn invalid_facility_code() -> Self {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_facility_code",
            "a facility code is 1 to 32 characters of A-Z, a-z, 0-9, _ and -",
        )
    }

    /// A malformed message ID in the URL.
    pub(super) fn invalid_message_id() -> Self {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_message_id",
            "a message ID is 20 lower-case hex digits, as the mailbox list gives it",
        )
    }

    /// Whether this is the answer to a failed download proof, which counts against the
    /// client in the failed-proof limiter.
    pub(super) fn is_not_available(&self) -> bool {
        self.code == NOT_AVAILABLE
    }

    /// Whether the repository itself could not serve (503): the caller did nothing
    /// wrong, so this is not audited (the audit trail may be what failed).
    pub(super) fn is_server_failure(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.code.into(),
                message: self.message,
            }),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}
