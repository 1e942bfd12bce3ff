//! The Cloud-PDI repository: keeps encrypted containers by document ID until they expire,
//! and can never read them.
//!
//! A sending facility ([`auth`]: API key or client certificate) creates a document with
//! its size, expiry, download limit and the SHA-256 of the token's download proof, uploads
//! it in parts that can be re-sent in any order, and completes it with the SHA-256 of the
//! whole ciphertext, which the server checks. A receiver downloads it (ranged, resumable)
//! by showing the proof, and sends a receipt. The sender asks for its status or revokes it.
//!
//! - [`api`]: the JSON types and header names shared by server and client (API v1,
//!   written up in `docs/repository-api.yaml`);
//! - [`server`]: the axum HTTP service (`cloudpdi repository serve`, or embedded in the
//!   gateway), with [`storage`] on the `object_store` crate (local files or S3), the
//!   append-only [`audit`] trail, and its settings in [`config`];
//! - [`client`]: what the gateway uses to upload and download, streamed and resumable.
//!
//! Servers keep no state of their own besides an in-memory rate limiter: every fact
//! about a document is an object written once, so several servers can share one bucket.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub(crate) mod listener;
pub mod server;
pub mod storage;
pub mod tls;

/// Length of a document ID: 80 random bits ([`crate::token::DOCUMENT_ID_BYTES`]) as
/// lower-case hex. Unguessable on its own, and useless without the token's download proof;
/// short, as the token carries it.
pub const DOCUMENT_ID_LEN: usize = 2 * crate::token::DOCUMENT_ID_BYTES;

/// Length of the document IDs assigned before token version 2 (128 bits as hex). Such
/// documents stay reachable for their sender's status, revoke and the expiry sweep after
/// an upgrade; no new token can name one.
pub const LEGACY_DOCUMENT_ID_LEN: usize = 32;

/// Whether `id` has the exact form of a document ID the server assigns (now, or before
/// token version 2), so nothing else (`..`, `/`, encoded separators) ever reaches a
/// storage path.
pub fn is_document_id(id: &str) -> bool {
    matches!(id.len(), DOCUMENT_ID_LEN | LEGACY_DOCUMENT_ID_LEN)
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) use crate::clock::now_seconds as unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_ids_are_strict() {
        assert!(is_document_id("0123456789abcdef0123"));
        for bad in [
            "",
            "..",
            "0123456789ABCDEF0123",
            "0123456789abcdef012/",
            "0123456789abcdef01234",
            "0123456789abcdef0123456789abcdef0",
            "%2e%2e",
        ] {
            assert!(!is_document_id(bad), "{bad:?}");
        }
        assert!(
            is_document_id("0123456789abcdef0123456789abcdef"),
            "a document stored before token v2 stays reachable"
        );
    }
}
