//! The repository's HTTP service (API v1, see [`crate::repository::api`]).
//!
//! Every answer that is not a success is a JSON [`ErrorBody`]. A download or receipt that
//! cannot be served (wrong proof, unknown document, expired, revoked, out of downloads)
//! always answers `410 not_available`, so a guesser learns nothing; a client that keeps
//! failing for a document is answered 429 for that document for a while. A receipt is
//! accepted once per download. A background sweep deletes expired content.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::repository::api::{
    self, Complete, Created, DocumentStatus, ErrorBody, NOT_AVAILABLE, NewDocument, Receipt,
    ReceiptRecord, State as DocState,
};
use crate::repository::audit::{Actor, Audit, AuditError, AuditEvent, REJECTION_WINDOW};
use crate::repository::auth::{Facilities, ProofLimiter, TrustedProxies, same_hash};
use crate::repository::config::{
    AuditConfig, FacilityConfig, RepositoryConfig, ServerConfig, StorageConfig,
};
use crate::repository::listener::{self, Limits, PerAddress};
use crate::repository::storage::{CompleteRecord, DocumentMeta, Index, Snapshot, Storage};
use crate::repository::tls::{Peer, TlsListener};
use crate::repository::{is_document_id, unix_now};

/// Largest JSON request body (create, complete, receipt).
const MAX_JSON_BODY: usize = 16 * 1024;
/// How long a part upload waits for a free upload slot before answering 503.
const UPLOAD_SLOT_WAIT: Duration = Duration::from_secs(30);
/// Largest instance count a receipt may report (imported plus refused): a PDI holds at
/// most a million files (`pdi::fileset`), so more is a made-up number.
const MAX_RECEIPT_INSTANCES: u64 = 1_000_000;
/// Header in which a trusted proxy names the client.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// Why the server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Storage cannot be opened.
    #[error(transparent)]
    Storage(#[from] crate::repository::storage::StorageError),
    /// The audit trail cannot be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// TLS files cannot be used.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Binding or serving failed.
    #[error("repository listener: {0}")]
    Io(#[from] std::io::Error),
    /// A key could not be made (embedded mode).
    #[error(transparent)]
    Auth(#[from] crate::repository::auth::AuthError),
    /// A setting cannot be used (when the configuration was not validated).
    #[error("invalid repository configuration: {0}")]
    Config(String),
}

/// Counters for `/metrics`, from the same events as the audit lines.
#[derive(Debug, Default)]
struct Counters {
    documents_created: AtomicU64,
    parts_stored: AtomicU64,
    bytes_uploaded: AtomicU64,
    documents_completed: AtomicU64,
    hash_mismatches: AtomicU64,
    downloads: AtomicU64,
    bytes_downloaded: AtomicU64,
    receipts: AtomicU64,
    revoked: AtomicU64,
    expired: AtomicU64,
    purged: AtomicU64,
    proof_failures: AtomicU64,
    rate_limited: AtomicU64,
    unauthorized: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn render(&self) -> String {
        use std::fmt::Write;
        let rows: [(&str, &str, &AtomicU64); 14] = [
            (
                "documents_created_total",
                "Documents created.",
                &self.documents_created,
            ),
            ("parts_stored_total", "Parts stored.", &self.parts_stored),
            (
                "uploaded_bytes_total",
                "Bytes of parts stored.",
                &self.bytes_uploaded,
            ),
            (
                "documents_completed_total",
                "Documents whose hash was checked.",
                &self.documents_completed,
            ),
            (
                "hash_mismatches_total",
                "Completes refused for a wrong hash.",
                &self.hash_mismatches,
            ),
            (
                "downloads_total",
                "Download requests served.",
                &self.downloads,
            ),
            (
                "downloaded_bytes_total",
                "Bytes sent to receivers.",
                &self.bytes_downloaded,
            ),
            ("receipts_total", "Receipts stored.", &self.receipts),
            ("revoked_total", "Documents revoked.", &self.revoked),
            (
                "expired_total",
                "Documents whose content the sweep deleted.",
                &self.expired,
            ),
            (
                "purged_total",
                "Documents deleted after the tombstone period.",
                &self.purged,
            ),
            (
                "proof_failures_total",
                "Downloads or receipts refused as not available.",
                &self.proof_failures,
            ),
            (
                "rate_limited_total",
                "Requests refused for too many failed proofs.",
                &self.rate_limited,
            ),
            (
                "unauthorized_total",
                "Facility requests without valid credentials.",
                &self.unauthorized,
            ),
        ];
        let mut out = String::new();
        for (name, help, counter) in rows {
            let _ = writeln!(out, "# HELP cloudpdi_repository_{name} {help}");
            let _ = writeln!(out, "# TYPE cloudpdi_repository_{name} counter");
            let _ = writeln!(
                out,
                "cloudpdi_repository_{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Shared state of the handlers.
struct App {
    server: ServerConfig,
    storage: Storage,
    facilities: Facilities,
    audit: Audit,
    limiter: ProofLimiter,
    proxies: TrustedProxies,
    uploads: Semaphore,
    counters: Counters,
}

/// A refusal: status, stable code, sentence.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

fn not_available() -> Refusal {
    refuse(
        StatusCode::GONE,
        NOT_AVAILABLE,
        "the document is not available: the token is wrong, expired or revoked, \
         or its downloads are used up",
    )
}

fn unavailable(e: impl std::fmt::Display) -> Refusal {
    tracing::error!("repository: {e}");
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the repository cannot reach its storage or audit trail; retry later",
    )
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

/// What one request did, for the audit line.
struct Record {
    actor: Actor,
    action: &'static str,
    document: Option<String>,
    from: SocketAddr,
    /// The client: `from`, or the address a trusted proxy named.
    client: IpAddr,
}

impl App {
    async fn audit(
        &self,
        record: Record,
        outcome: &str,
        detail: Option<String>,
    ) -> Result<(), Refusal> {
        self.audit
            .record(event(record, outcome, detail))
            .await
            .map_err(unavailable)
    }

    /// Audits a refusal and passes it on. Refusals of requests without valid credentials
    /// are aggregated (see [`Audit::rejected`]); a facility's refusals are lines of their own.
    async fn refused(&self, record: Record, refusal: Refusal) -> Refusal {
        let audited = match record.actor {
            Actor::Anonymous | Actor::Receiver => {
                let client = record.client;
                self.audit
                    .rejected(event(record, refusal.code, None), client)
                    .await
                    .map_err(unavailable)
            }
            Actor::Facility(_) | Actor::Server => self.audit(record, refusal.code, None).await,
        };
        match audited {
            Ok(()) => refusal,
            Err(audit_failed) => audit_failed,
        }
    }

    /// The audit record of a request from `peer`, naming the client behind a trusted proxy.
    fn record(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        actor: Actor,
        action: &'static str,
        document: Option<String>,
    ) -> Record {
        let forwarded = headers.get(FORWARDED_FOR).map(HeaderValue::as_bytes);
        Record {
            actor,
            action,
            document,
            from: peer.addr,
            client: self.proxies.client(peer.addr.ip(), forwarded),
        }
    }

    /// The facility behind the request: client certificate first, then API key.
    fn facility(&self, headers: &HeaderMap, peer: &Peer) -> Option<String> {
        if let Some(name) = peer
            .cert_sha256
            .as_ref()
            .and_then(|hash| self.facilities.by_certificate(hash))
        {
            return Some(name.to_owned());
        }
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let key = value.strip_prefix("Bearer ")?;
        self.facilities.by_api_key(key).map(str::to_owned)
    }

    /// Authenticates a facility request and loads its document.
    async fn owned(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        id: &str,
        action: &'static str,
    ) -> Result<(Record, Snapshot), Refusal> {
        let (record, facility) = self.authenticate(headers, peer, action, Some(id)).await?;
        if !is_document_id(id) {
            return Err(self.refused(record, invalid_id()).await);
        }
        match self.storage.snapshot(id).await {
            Ok(Some(snapshot)) if snapshot.meta.facility == facility => Ok((record, snapshot)),
            Ok(_) => {
                let refusal = refuse(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "this facility has no document with this ID",
                );
                Err(self.refused(record, refusal).await)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        action: &'static str,
        id: Option<&str>,
    ) -> Result<(Record, String), Refusal> {
        let document = id.filter(|id| is_document_id(id)).map(str::to_owned);
        match self.facility(headers, peer) {
            Some(facility) => Ok((
                self.record(
                    headers,
                    peer,
                    Actor::Facility(facility.clone()),
                    action,
                    document,
                ),
                facility,
            )),
            None => {
                add(&self.counters.unauthorized, 1);
                let record = self.record(headers, peer, Actor::Anonymous, action, document);
                let refusal = refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "no valid facility API key or client certificate: check the key \
                     configured for this facility",
                );
                Err(self.refused(record, refusal).await)
            }
        }
    }

    /// Checks the download proof; every failure answers alike.
    async fn proven(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        id: &str,
        action: &'static str,
    ) -> Result<(Record, Snapshot), Refusal> {
        let document = is_document_id(id).then(|| id.to_owned());
        let record = self.record(headers, peer, Actor::Receiver, action, document);
        if self.limiter.is_blocked(limiter_key(&record), record.client) {
            add(&self.counters.rate_limited, 1);
            let refusal = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many failed attempts for this document from this client; wait up to \
                     {} s (server.failed_proof_window) and check the token",
                    self.server.failed_proof_window
                ),
            );
            return Err(self.refused(record, refusal).await);
        }
        let Some(proof) = headers.get(api::PROOF_HEADER) else {
            let refusal = refuse(
                StatusCode::UNAUTHORIZED,
                "proof_required",
                "a download needs the token's proof in the x-download-proof header",
            );
            return Err(self.refused(record, refusal).await);
        };
        if !is_document_id(id) {
            return Err(self.refused(record, invalid_id()).await);
        }
        let proof = Zeroizing::new(proof.as_bytes().to_vec());
        let proof_sha256: [u8; 32] =
            match std::str::from_utf8(&proof).ok().and_then(api::hex32::parse) {
                Some(mut bytes) => {
                    let hash = Sha256::digest(bytes).into();
                    zeroize::Zeroize::zeroize(&mut bytes);
                    hash
                }
                None => {
                    let refusal = refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid_proof",
                        "the x-download-proof header must be 64 hex digits",
                    );
                    return Err(self.refused(record, refusal).await);
                }
            };
        let snapshot = self.storage.snapshot(id).await.map_err(unavailable)?;
        match snapshot {
            Some(s) if same_hash(&s.meta.proof_sha256, &proof_sha256) => Ok((record, s)),
            _ => Err(self.not_available(record).await),
        }
    }

    async fn not_available(&self, record: Record) -> Refusal {
        add(&self.counters.proof_failures, 1);
        self.limiter
            .record_failure(limiter_key(&record), record.client);
        self.refused(record, not_available()).await
    }
}

/// The document a proof failure is counted against: its ID, or one key for every
/// malformed ID (so that made-up IDs cannot fill the limiter with long strings).
fn limiter_key(record: &Record) -> &str {
    record.document.as_deref().unwrap_or("")
}

/// The audit line of `record`; the client is named when it is not the remote address.
fn event(record: Record, outcome: &str, detail: Option<String>) -> AuditEvent {
    let forwarded = record.client != record.from.ip();
    AuditEvent {
        time: unix_now(),
        actor: record.actor,
        action: record.action,
        document: record.document,
        outcome: outcome.into(),
        from: Some(record.from),
        client: forwarded.then_some(record.client),
        detail,
    }
}

fn invalid_id() -> Refusal {
    refuse(
        StatusCode::BAD_REQUEST,
        "invalid_document_id",
        "a document ID is 32 lower-case hex digits",
    )
}

/// The state a sender sees.
fn state_of(snapshot: &Snapshot, now: u64) -> DocState {
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

async fn read_body(body: Body, limit: usize, idle: Duration) -> Result<Bytes, Refusal> {
    let mut body = body.into_data_stream();
    let mut buffer = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle, body.next()).await.map_err(|_| {
            refuse(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request body stalled; retry",
            )
        })?;
        match frame {
            None => return Ok(buffer.freeze()),
            Some(Ok(chunk)) => {
                if buffer.len() + chunk.len() > limit {
                    return Err(refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!("the request body is larger than the {limit} bytes allowed"),
                    ));
                }
                buffer.extend_from_slice(&chunk);
            }
            Some(Err(e)) => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "body_error",
                    format!("the request body could not be read: {e}"),
                ));
            }
        }
    }
}

async fn read_json<T: for<'de> serde::Deserialize<'de>>(
    body: Body,
    idle: Duration,
) -> Result<T, Refusal> {
    let bytes = read_body(body, MAX_JSON_BODY, idle).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the JSON body is not valid: {e}"),
        )
    })
}

type Shared = State<Arc<App>>;
type PeerInfo = ConnectInfo<Peer>;

async fn create(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (mut record, facility) = app.authenticate(&headers, &peer, "create", None).await?;
    let request: NewDocument = match read_json(body, app.server.body_idle_timeout()).await {
        Ok(request) => request,
        Err(refusal) => return Err(app.refused(record, refusal).await),
    };
    let now = unix_now();
    if let Err(refusal) = check_new_document(&app.server, &request, now) {
        return Err(app.refused(record, refusal).await);
    }
    let mut random = [0u8; 16];
    getrandom::fill(&mut random).map_err(unavailable)?;
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
    let purge_at = request
        .expires_at
        .saturating_add(app.server.tombstone_days.saturating_mul(86_400));
    app.storage
        .create(&meta, purge_at)
        .await
        .map_err(unavailable)?;
    add(&app.counters.documents_created, 1);
    record.document = Some(meta.id.clone());
    let detail = format!(
        "size {} expires_at {} max_downloads {}",
        meta.size, meta.expires_at, meta.max_downloads
    );
    app.audit(record, "ok", Some(detail)).await?;
    let created = Created {
        document_id: meta.id.clone(),
        part_size: meta.part_size,
        parts: meta.parts(),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

fn check_new_document(
    server: &ServerConfig,
    request: &NewDocument,
    now: u64,
) -> Result<(), Refusal> {
    let max = server.max_document_bytes();
    if request.size == 0 {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "size must be at least 1 byte",
        ));
    }
    if request.size > max {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("documents are limited to {max} bytes on this repository"),
        ));
    }
    let latest = now.saturating_add(server.max_expiry_days.saturating_mul(86_400));
    if request.expires_at <= now || request.expires_at > latest {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_expiry",
            format!(
                "expires_at must be in the future and at most {} days ahead",
                server.max_expiry_days
            ),
        ));
    }
    if request.max_downloads == 0 || request.max_downloads > server.max_downloads_limit {
        return Err(refuse(
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

async fn status(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (record, snapshot) = app.owned(&headers, &peer, &id, "status").await?;
    let status = status_of(&app, &snapshot).await?;
    app.audit(record, "ok", None).await?;
    Ok(Json(status).into_response())
}

async fn status_of(app: &App, snapshot: &Snapshot) -> Result<DocumentStatus, Refusal> {
    let meta = &snapshot.meta;
    let sha256 = if snapshot.complete {
        app.storage
            .complete_record(&meta.id)
            .await
            .map_err(unavailable)?
            .map(|r| hex::encode(r.sha256))
    } else {
        None
    };
    let receipts = app.storage.receipts(snapshot).await.map_err(unavailable)?;
    Ok(DocumentStatus {
        document_id: meta.id.clone(),
        state: state_of(snapshot, unix_now()),
        size: meta.size,
        part_size: meta.part_size,
        parts_held: snapshot.parts.keys().copied().collect(),
        sha256,
        created_at: meta.created_at,
        expires_at: meta.expires_at,
        max_downloads: meta.max_downloads,
        downloads: snapshot.downloads,
        receipts,
    })
}

/// Refuses changes to a document that is no longer uploading.
fn check_uploading(snapshot: &Snapshot) -> Result<(), Refusal> {
    match state_of(snapshot, unix_now()) {
        DocState::Uploading => Ok(()),
        DocState::Complete => Err(refuse(
            StatusCode::CONFLICT,
            "already_complete",
            "the document is complete; its parts cannot change",
        )),
        DocState::Revoked => Err(refuse(
            StatusCode::CONFLICT,
            "revoked",
            "the document was revoked",
        )),
        DocState::Expired => Err(refuse(
            StatusCode::GONE,
            "expired",
            "the document has expired",
        )),
    }
}

async fn put_part(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    UrlPath((id, part)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (record, snapshot) = app.owned(&headers, &peer, &id, "upload_part").await?;
    let checked = check_part(&snapshot, &part, &headers);
    let (n, expected) = match checked {
        Ok(checked) => checked,
        Err(refusal) => return Err(app.refused(record, refusal).await),
    };
    let Ok(_slot) = tokio::time::timeout(UPLOAD_SLOT_WAIT, app.uploads.acquire()).await else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the repository is receiving too many uploads; retry later",
        ));
    };
    let limit = usize::try_from(expected).unwrap_or(usize::MAX);
    let bytes = match read_body(body, limit, app.server.body_idle_timeout()).await {
        Ok(bytes) if bytes.len() as u64 == expected => bytes,
        Ok(bytes) => {
            let refusal = length_mismatch(n, expected, bytes.len() as u64);
            return Err(app.refused(record, refusal).await);
        }
        Err(refusal) => return Err(app.refused(record, refusal).await),
    };
    app.storage
        .put_part(&snapshot.meta.id, n, bytes)
        .await
        .map_err(unavailable)?;
    add(&app.counters.parts_stored, 1);
    add(&app.counters.bytes_uploaded, expected);
    app.audit(record, "ok", Some(format!("part {n} ({expected} bytes)")))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn length_mismatch(n: u32, expected: u64, got: u64) -> Refusal {
    refuse(
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
            refuse(
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
        None => Err(refuse(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "a part upload needs a Content-Length header",
        )),
        Some(len) if len > expected => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("part {n} must be exactly {expected} bytes, {len} declared"),
        )),
        Some(len) if len < expected => Err(length_mismatch(n, expected, len)),
        Some(_) => Ok((n, expected)),
    }
}

async fn complete(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (record, snapshot) = app.owned(&headers, &peer, &id, "complete").await?;
    let request: Complete = match read_json(body, app.server.body_idle_timeout()).await {
        Ok(request) => request,
        Err(refusal) => return Err(app.refused(record, refusal).await),
    };
    let meta = &snapshot.meta;
    if snapshot.complete && !snapshot.revoked {
        let held = app
            .storage
            .complete_record(&meta.id)
            .await
            .map_err(unavailable)?;
        if held.is_some_and(|r| r.sha256 == request.sha256) {
            app.audit(record, "ok", Some("already complete".into()))
                .await?;
            return Ok(Json(status_of(&app, &snapshot).await?).into_response());
        }
    }
    if let Err(refusal) = check_uploading(&snapshot).and_then(|()| check_all_parts(&snapshot)) {
        return Err(app.refused(record, refusal).await);
    }
    let sha256 = hash_parts(&app.storage, meta).await.map_err(unavailable)?;
    if sha256 != request.sha256 {
        add(&app.counters.hash_mismatches, 1);
        app.storage
            .delete_parts(&meta.id)
            .await
            .map_err(unavailable)?;
        let refusal = refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            "the stored parts do not have the SHA-256 given; they were deleted, upload again",
        );
        return Err(app.refused(record, refusal).await);
    }
    let completed = CompleteRecord {
        sha256,
        completed_at: unix_now(),
    };
    app.storage
        .put_complete(&meta.id, &completed)
        .await
        .map_err(unavailable)?;
    add(&app.counters.documents_completed, 1);
    app.audit(record, "ok", None).await?;
    let mut snapshot = snapshot;
    snapshot.complete = true;
    Ok(Json(status_of(&app, &snapshot).await?).into_response())
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
    Err(refuse(
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
async fn hash_parts(
    storage: &Storage,
    meta: &DocumentMeta,
) -> Result<[u8; 32], crate::repository::storage::StorageError> {
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

async fn revoke(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (record, mut snapshot) = app.owned(&headers, &peer, &id, "revoke").await?;
    if !snapshot.revoked {
        app.storage
            .revoke(&snapshot.meta.id, unix_now())
            .await
            .map_err(unavailable)?;
        add(&app.counters.revoked, 1);
        snapshot.revoked = true;
        snapshot.parts.clear();
    }
    app.audit(record, "ok", None).await?;
    Ok(Json(status_of(&app, &snapshot).await?).into_response())
}

/// A parsed `Range: bytes=a-` or `bytes=a-b`; anything else is ignored (whole content).
fn parse_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    parse_range_value(headers.get(header::RANGE)?.to_str().ok()?)
}

/// Parses the value of a `Range` header (`bytes=a-` or `bytes=a-b`; anything else is
/// `None`). Public so that the fuzz target `http_range` reaches it (fuzz/).
pub fn parse_range_value(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        end => Some(end.parse().ok()?),
    };
    Some((start, end))
}

async fn download(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (record, snapshot) = app.proven(&headers, &peer, &id, "download").await?;
    if state_of(&snapshot, unix_now()) != DocState::Complete {
        return Err(app.not_available(record).await);
    }
    let size = snapshot.meta.size;
    let range = match parse_range(&headers) {
        None => None,
        Some((start, end)) if start < size && end.is_none_or(|e| e >= start) => {
            Some((start, end.map_or(size, |e| e.saturating_add(1).min(size))))
        }
        Some(_) => return range_not_satisfiable(&app, record, size).await,
    };
    let resumed = match range {
        Some((start, _)) if start > 0 => app
            .storage
            .claim_resume(
                &snapshot,
                unix_now(),
                app.server.download_resume_window,
                app.server.max_resumes_per_download,
            )
            .await
            .map_err(unavailable)?,
        _ => false,
    };
    // A range that is not a resume of an open download is answered as a new download
    // from byte 0 (a server may ignore Range); the client then starts its file over.
    let range = if resumed {
        range
    } else {
        if !app
            .storage
            .claim_download(&snapshot, unix_now())
            .await
            .map_err(unavailable)?
        {
            return Err(app.not_available(record).await);
        }
        add(&app.counters.downloads, 1);
        range.filter(|&(start, _)| start == 0)
    };
    let (start, end) = range.unwrap_or((0, size));
    let sha256 = app
        .storage
        .complete_record(&snapshot.meta.id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| unavailable("complete record vanished"))?
        .sha256;
    app.audit(
        record,
        "ok",
        Some(format!(
            "bytes {start}-{}/{size}{}",
            end - 1,
            if resumed { " resumed" } else { "" }
        )),
    )
    .await?;
    add(&app.counters.bytes_downloaded, end - start);
    let body = Body::from_stream(content_stream(
        app.storage.clone(),
        snapshot.meta,
        start,
        end,
    ));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).expect("ASCII header value");
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, value((end - start).to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(api::SHA256_HEADER, value(hex::encode(sha256)));
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            value(format!("bytes {start}-{}/{size}", end - 1)),
        );
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}

/// 416 with the document's size, for a range that lies outside it.
async fn range_not_satisfiable(app: &App, record: Record, size: u64) -> Result<Response, Refusal> {
    let mut response = refuse(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        format!("the document has {size} bytes"),
    )
    .into_response();
    response.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("digits are a header"),
    );
    app.audit(record, "range_not_satisfiable", None).await?;
    Ok(response)
}

/// The bytes `start..end` of a document, part after part, read as the client takes them.
fn content_stream(
    storage: Storage,
    meta: DocumentMeta,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, crate::repository::storage::StorageError>> {
    let first = u32::try_from(start / meta.part_size).unwrap_or(u32::MAX);
    let last = u32::try_from((end - 1) / meta.part_size).unwrap_or(u32::MAX);
    futures_util::stream::iter(first..=last)
        .then(move |n| {
            let storage = storage.clone();
            let part_start = u64::from(n) * meta.part_size;
            let part_len = meta.part_len(n).unwrap_or(0);
            let from = start.saturating_sub(part_start);
            let to = (end - part_start).min(part_len);
            let id = meta.id.clone();
            async move { storage.part_stream(&id, n, from..to).await }
        })
        .flat_map(|opened| match opened {
            Ok(stream) => stream,
            Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
        })
}

async fn receipt(
    State(app): Shared,
    ConnectInfo(peer): PeerInfo,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (record, snapshot) = app.proven(&headers, &peer, &id, "receipt").await?;
    if !snapshot.complete || snapshot.downloads == 0 {
        return Err(app.not_available(record).await);
    }
    let receipt: Receipt = match read_json(body, app.server.body_idle_timeout()).await {
        Ok(receipt) => receipt,
        Err(refusal) => return Err(app.refused(record, refusal).await),
    };
    if receipt.note.len() > api::MAX_NOTE_LEN || receipt.note.chars().any(char::is_control) {
        let refusal = refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "the note is limited to {} bytes without control characters",
                api::MAX_NOTE_LEN
            ),
        );
        return Err(app.refused(record, refusal).await);
    }
    let counted = receipt
        .instances_imported
        .checked_add(receipt.instances_refused);
    if counted.is_none_or(|n| n > MAX_RECEIPT_INSTANCES) {
        let refusal = refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "instances_imported plus instances_refused is limited to {MAX_RECEIPT_INSTANCES}"
            ),
        );
        return Err(app.refused(record, refusal).await);
    }
    let detail = format!(
        "imported {} refused {}",
        receipt.instances_imported, receipt.instances_refused
    );
    let stored = ReceiptRecord {
        received_at: unix_now(),
        receipt,
    };
    let added = app
        .storage
        .add_receipt(&snapshot, &stored)
        .await
        .map_err(unavailable)?;
    if !added {
        let refusal = refuse(
            StatusCode::CONFLICT,
            "receipt_exists",
            format!(
                "every download of this document already has its receipt ({} downloads); \
                 a receipt is sent once per download",
                snapshot.downloads
            ),
        );
        return Err(app.refused(record, refusal).await);
    }
    add(&app.counters.receipts, 1);
    app.audit(record, "ok", Some(detail)).await?;
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

async fn healthz(State(app): Shared) -> Response {
    match app.storage.ready().await {
        Ok(()) => "ok\n".into_response(),
        Err(e) => unavailable(e).into_response(),
    }
}

async fn metrics(State(app): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.counters.render(),
    )
        .into_response()
}

async fn fallback() -> Refusal {
    refuse(
        StatusCode::NOT_FOUND,
        "no_such_endpoint",
        "no such endpoint; see docs/repository-api.yaml",
    )
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/documents", post(create))
        .route("/v1/documents/{id}", get(status).delete(revoke))
        .route("/v1/documents/{id}/parts/{n}", put(put_part))
        .route("/v1/documents/{id}/complete", post(complete))
        .route("/v1/documents/{id}/content", get(download))
        .route("/v1/documents/{id}/receipts", post(receipt))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .with_state(app)
}

/// Deletes expired content and, after the tombstone period, the rest; every `interval`.
async fn sweep_loop(app: Arc<App>, interval: Duration, stop: CancellationToken) {
    loop {
        if let Err(e) = sweep(&app).await {
            tracing::warn!("repository sweep: {e}; retrying at the next sweep");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn sweep(app: &App) -> Result<(), crate::repository::storage::StorageError> {
    let now = unix_now();
    for (entry, id) in app.storage.due(Index::Expiry, now).await? {
        app.storage.expire(&id, now).await?;
        app.storage.delete_index(&entry).await?;
        add(&app.counters.expired, 1);
        tracing::info!("repository: document {id} expired, content deleted");
        sweep_audit(app, "expire", id).await;
    }
    for (entry, id) in app.storage.due(Index::Purge, now).await? {
        app.storage.purge(&id).await?;
        app.storage.delete_index(&entry).await?;
        add(&app.counters.purged, 1);
        sweep_audit(app, "purge", id).await;
    }
    Ok(())
}

async fn sweep_audit(app: &App, action: &'static str, id: String) {
    let event = AuditEvent {
        time: unix_now(),
        actor: Actor::Server,
        action,
        document: Some(id),
        outcome: "ok".into(),
        from: None,
        client: None,
        detail: None,
    };
    if let Err(e) = app.audit.record(event).await {
        tracing::error!("repository: {e}");
    }
}

/// Writes the summary of aggregated refusals every [`REJECTION_WINDOW`], and once more
/// when stopped.
async fn rejection_loop(audit: Audit, stop: CancellationToken) {
    loop {
        let stopped = tokio::select! {
            () = tokio::time::sleep(REJECTION_WINDOW) => false,
            () = stop.cancelled() => true,
        };
        if let Err(e) = audit.flush_rejections().await {
            tracing::error!("repository: {e}");
        }
        if stopped {
            return;
        }
    }
}

/// Runs the repository on `listener` until `shutdown` completes, then lets requests in
/// flight finish. TLS is used when the configuration names a certificate.
///
/// # Errors
/// [`ServerError`] when storage, the audit trail or TLS cannot be set up, or serving fails.
pub async fn run(
    config: RepositoryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let storage = Storage::open(&config.storage)?;
    let audit = Audit::open(&config.audit.path)?;
    let server = config.server.clone();
    let proxies = TrustedProxies::parse(&server.trusted_proxies).map_err(|entry| {
        ServerError::Config(format!(
            "server.trusted_proxies: {entry:?} is not an address or address/prefix"
        ))
    })?;
    let app = Arc::new(App {
        facilities: Facilities::new(&config.facility),
        proxies,
        limiter: ProofLimiter::new(
            server.failed_proofs_per_window,
            Duration::from_secs(server.failed_proof_window),
        ),
        uploads: Semaphore::new(server.max_concurrent_uploads),
        counters: Counters::default(),
        storage,
        audit,
        server,
    });
    let stop = CancellationToken::new();
    let sweeper = tokio::spawn(sweep_loop(
        app.clone(),
        Duration::from_secs(app.server.sweep_interval),
        stop.clone(),
    ));
    let summaries = tokio::spawn(rejection_loop(app.audit.clone(), stop.clone()));
    let limits = Limits {
        max_connections: app.server.max_connections,
        header_timeout: Duration::from_secs(app.server.header_timeout),
    };
    let per_address = PerAddress::new(app.server.max_connections_per_address);
    let router = router(app);
    let local = listener.local_addr()?;
    if config.tls.cert.is_some() {
        let tls = crate::repository::tls::server_config(&config.tls).map_err(ServerError::Tls)?;
        tracing::info!("repository: listening on https://{local}");
        let tls = TlsListener::new(listener, tls, limits.max_connections, per_address.clone())?;
        listener::serve(tls, router, limits, per_address, shutdown).await;
    } else {
        tracing::info!("repository: listening on http://{local}");
        listener::serve(listener, router, limits, per_address, shutdown).await;
    }
    stop.cancel();
    let _ = sweeper.await;
    let _ = summaries.await;
    Ok(())
}

/// The repository running inside the gateway (`repository.url = "embedded"`).
pub struct Embedded {
    /// Base URL on loopback, e.g. `http://127.0.0.1:11190`: what tokens name.
    pub base_url: String,
    /// The server task; it ends after the shutdown future completes.
    pub task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// Starts an in-process repository on `listener` (loopback), storing under
/// `data_dir/repository/`, with one facility `embedded` whose API key hashes to
/// `api_key_sha256`, so a single machine has a whole working system without another
/// service. The gateway keeps the address and the key stable across restarts: tokens
/// name the address.
///
/// # Errors
/// [`ServerError`] when the folder, the audit trail or the listener cannot be set up.
pub async fn start_embedded(
    data_dir: &Path,
    listener: TcpListener,
    api_key_sha256: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Embedded, ServerError> {
    let root = data_dir.join("repository");
    let config = RepositoryConfig {
        storage: StorageConfig {
            path: root.join("store"),
            ..StorageConfig::default()
        },
        audit: AuditConfig {
            path: root.join("audit.jsonl"),
        },
        facility: [(
            "embedded".to_owned(),
            FacilityConfig {
                api_key_sha256: api_key_sha256.to_owned(),
                client_cert_sha256: String::new(),
            },
        )]
        .into(),
        ..RepositoryConfig::default()
    };
    let base_url = format!("http://{}", listener.local_addr()?);
    // Open storage and audit here, so a bad folder fails the start, not the task.
    Storage::open(&config.storage)?;
    Audit::open(&config.audit.path)?;
    let task = tokio::spawn(run(config, listener, shutdown));
    Ok(Embedded { base_url, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_range(&headers), None);
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        assert_eq!(parse_range(&headers), Some((10, None)));
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=1-5"));
        assert_eq!(parse_range(&headers), Some((1, Some(5))));
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=1-5,7-9"));
        assert_eq!(parse_range(&headers), None);
        headers.insert(header::RANGE, HeaderValue::from_static("items=1-5"));
        assert_eq!(parse_range(&headers), None);
    }
}
