//! The repository's Prometheus metrics (`GET /metrics`), counted from the same events as
//! the audit lines, on one `prometheus-client` [`Registry`] owned by the server state.
//! Names are `cloudpdi_repository_*_total`; the text is Prometheus's format 0.0.4.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::Shared;
use crate::repository::api::NOT_AVAILABLE;

use super::refusal::{RATE_LIMITED, Refusal, UNAUTHORIZED};

/// The counters, registered in their registry.
#[derive(Debug)]
pub(super) struct Metrics {
    registry: Registry,
    pub(super) documents_created: Counter,
    pub(super) parts_stored: Counter,
    pub(super) bytes_uploaded: Counter,
    pub(super) documents_completed: Counter,
    pub(super) hash_mismatches: Counter,
    pub(super) downloads: Counter,
    pub(super) bytes_downloaded: Counter,
    pub(super) receipts: Counter,
    pub(super) revoked: Counter,
    pub(super) extended: Counter,
    pub(super) expired: Counter,
    pub(super) purged: Counter,
    proof_failures: Counter,
    rate_limited: Counter,
    unauthorized: Counter,
}

impl Metrics {
    /// Every counter at zero, registered.
    pub(super) fn new() -> Self {
        let mut registry = Registry::with_prefix("cloudpdi_repository");
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        // The encoder adds `_total` to each name and a full stop to each help text.
        Metrics {
            documents_created: counter("documents_created", "Documents created"),
            parts_stored: counter("parts_stored", "Parts stored"),
            bytes_uploaded: counter("uploaded_bytes", "Bytes of parts stored"),
            documents_completed: counter("documents_completed", "Documents whose hash was checked"),
            hash_mismatches: counter("hash_mismatches", "Completes refused for a wrong hash"),
            downloads: counter("downloads", "Download requests served"),
            bytes_downloaded: counter("downloaded_bytes", "Bytes sent to receivers"),
            receipts: counter("receipts", "Receipts stored"),
            revoked: counter("revoked", "Documents revoked"),
            extended: counter("extended", "Document expiries extended"),
            expired: counter("expired", "Documents whose content the sweep deleted"),
            purged: counter("purged", "Documents deleted after the tombstone period"),
            proof_failures: counter(
                "proof_failures",
                "Downloads or receipts refused as not available",
            ),
            rate_limited: counter(
                "rate_limited",
                "Requests refused for too many failed proofs",
            ),
            unauthorized: counter(
                "unauthorized",
                "Facility requests without valid credentials",
            ),
            registry,
        }
    }

    /// Counts a refusal that has a counter of its own.
    pub(super) fn refused(&self, refusal: &Refusal) {
        let counter = match refusal.code {
            NOT_AVAILABLE => &self.proof_failures,
            RATE_LIMITED => &self.rate_limited,
            UNAUTHORIZED => &self.unauthorized,
            _ => return,
        };
        counter.inc();
    }

    /// The registry in Prometheus text format.
    fn render(&self) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// `GET /metrics`.
pub(super) async fn metrics(State(app): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        app.metrics.render(),
    )
        .into_response()
}
