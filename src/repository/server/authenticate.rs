//! Authentication as axum extractors: a handler names what it needs ([`Facility`],
//! [`Owned`] or [`Proven`]) and receives an authenticated [`Caller`]; the refusal of
//! anyone else, its audit line and the failed-proof accounting happen here and in
//! [`Caller::refused`], never in a handler.
//!
//! Facilities authenticate by client certificate or API key; a receiver by the token's
//! download proof, whose every failure answers alike (`410 not_available`).

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::repository::api::{self, hex32};
use crate::repository::audit::Actor;
use crate::repository::auth::same_hash;
use crate::repository::is_document_id;
use crate::repository::storage::Snapshot;
use crate::repository::tls::Peer;

use super::App;
use super::caller::Caller;
use super::refusal::{RATE_LIMITED, Refusal, UNAUTHORIZED};

/// What a request does, as the audit trail names it. Each route's handler names its
/// action in the type of its extractor, so the extractor can audit a refusal before the
/// handler runs.
pub(super) trait Action {
    /// The `action` of the audit line.
    const NAME: &'static str;
}

macro_rules! actions {
    ($($(#[$doc:meta])* $name:ident = $text:literal;)*) => {$(
        $(#[$doc])*
        pub(super) enum $name {}
        impl Action for $name {
            const NAME: &'static str = $text;
        }
    )*};
}

actions! {
    /// `POST /v1/documents`.
    Create = "create";
    /// `GET /v1/documents/{id}`.
    Status = "status";
    /// `PUT /v1/documents/{id}/parts/{n}`.
    UploadPart = "upload_part";
    /// `POST /v1/documents/{id}/complete`.
    Complete = "complete";
    /// `DELETE /v1/documents/{id}`.
    Revoke = "revoke";
    /// `PATCH /v1/documents/{id}`.
    ExtendExpiry = "extend";
    /// `GET /v1/documents/{id}/content`.
    Download = "download";
    /// `POST /v1/documents/{id}/receipts`.
    SendReceipt = "receipt";
    /// `GET /v1/facilities/{code}`.
    LookUpFacility = "look_up_facility";
    /// `POST /v1/mailboxes/{recipient}/messages`.
    PostMessage = "post_message";
    /// `GET /v1/mailbox/messages`.
    ListMessages = "list_messages";
    /// `GET /v1/mailbox/messages/{id}`.
    FetchMessage = "fetch_message";
    /// `DELETE /v1/mailbox/messages/{id}`.
    DeleteMessage = "delete_message";
}

/// A request from an authenticated facility (client certificate first, then API key).
pub(super) struct Facility<A> {
    /// The facility, audited by name.
    pub(super) caller: Caller,
    /// The facility's code.
    pub(super) name: String,
    action: PhantomData<A>,
}

/// A request from an authenticated facility about one of its own documents.
pub(super) struct Owned<A> {
    /// The facility, audited by name, with the document.
    pub(super) caller: Caller,
    /// The document, as stored now.
    pub(super) snapshot: Snapshot,
    action: PhantomData<A>,
}

/// A request that showed the right download proof for the document in its URL.
pub(super) struct Proven<A> {
    /// The receiver, with the document.
    pub(super) caller: Caller,
    /// The document, as stored now.
    pub(super) snapshot: Snapshot,
    action: PhantomData<A>,
}

/// The `{id}` of a document URL (a part URL has `{n}` too, which its handler reads).
#[derive(serde::Deserialize)]
struct DocumentPath {
    id: String,
}

/// The connection a request came on.
async fn peer(parts: &mut Parts, app: &Arc<App>) -> Result<Peer, Response> {
    let ConnectInfo(peer) = ConnectInfo::<Peer>::from_request_parts(parts, app)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(peer)
}

/// The document ID in the URL, as given.
async fn document_id(parts: &mut Parts, app: &Arc<App>) -> Result<String, Response> {
    let Path(path) = Path::<DocumentPath>::from_request_parts(parts, app)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(path.id)
}

/// The facility behind the request: client certificate first, then API key.
fn facility_of(app: &App, headers: &HeaderMap, peer: &Peer) -> Option<String> {
    if let Some(name) = peer
        .cert_sha256
        .as_ref()
        .and_then(|hash| app.facilities.by_certificate(hash))
    {
        return Some(name.to_owned());
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ")?;
    app.facilities.by_api_key(key).map(str::to_owned)
}

/// Authenticates a facility request about `document` (named in the audit line when it is
/// well-formed), or refuses it 401.
async fn authenticate<A: Action>(
    parts: &mut Parts,
    app: &Arc<App>,
    document: Option<&str>,
) -> Result<(Caller, String), Response> {
    let peer = peer(parts, app).await?;
    let document = document.filter(|id| is_document_id(id)).map(str::to_owned);
    let facility = facility_of(app, &parts.headers, &peer);
    let actor = facility.clone().map_or(Actor::Anonymous, Actor::Facility);
    let caller = Caller::new(app, &parts.headers, &peer, actor, A::NAME, document);
    match facility {
        Some(name) => Ok((caller, name)),
        None => {
            let refusal = Refusal::new(
                StatusCode::UNAUTHORIZED,
                UNAUTHORIZED,
                "no valid facility API key or client certificate: check the key \
                 configured for this facility",
            );
            Err(caller.refused(app, refusal).await.into_response())
        }
    }
}

impl<A: Action> FromRequestParts<Arc<App>> for Facility<A> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let (caller, name) = authenticate::<A>(parts, app, None).await?;
        Ok(Facility {
            caller,
            name,
            action: PhantomData,
        })
    }
}

impl<A: Action> FromRequestParts<Arc<App>> for Owned<A> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let id = document_id(parts, app).await?;
        let (caller, facility) = authenticate::<A>(parts, app, Some(&id)).await?;
        let found = if is_document_id(&id) {
            match app.storage.snapshot(&id).await {
                Ok(Some(snapshot)) if app.owner(&snapshot.meta.facility) == facility => {
                    Ok(snapshot)
                }
                Ok(_) => Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "this facility has no document with this ID",
                )),
                Err(e) => Err(Refusal::unavailable(e)),
            }
        } else {
            Err(Refusal::invalid_id())
        };
        match found {
            Ok(snapshot) => Ok(Owned {
                caller,
                snapshot,
                action: PhantomData,
            }),
            Err(refusal) => Err(caller.refused(app, refusal).await.into_response()),
        }
    }
}

impl<A: Action> FromRequestParts<Arc<App>> for Proven<A> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let id = document_id(parts, app).await?;
        let peer = peer(parts, app).await?;
        let document = is_document_id(&id).then(|| id.clone());
        let caller = Caller::new(
            app,
            &parts.headers,
            &peer,
            Actor::Receiver,
            A::NAME,
            document,
        );
        match prove(app, &caller, &parts.headers, &id).await {
            Ok(snapshot) => Ok(Proven {
                caller,
                snapshot,
                action: PhantomData,
            }),
            Err(refusal) => Err(caller.refused(app, refusal).await.into_response()),
        }
    }
}

/// Checks the download proof for document `id`; every failure answers alike.
async fn prove(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    id: &str,
) -> Result<Snapshot, Refusal> {
    if app
        .limiter
        .is_blocked(caller.limiter_key(), caller.client())
    {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            RATE_LIMITED,
            format!(
                "too many failed attempts for this document from this client; wait up to \
                 {} s (server.failed_proof_window) and check the token",
                app.server.failed_proof_window
            ),
        ));
    }
    let Some(proof) = headers.get(api::PROOF_HEADER) else {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "proof_required",
            "a download needs the token's proof in the x-download-proof header",
        ));
    };
    if !is_document_id(id) {
        return Err(Refusal::invalid_id());
    }
    let proof = Zeroizing::new(proof.as_bytes().to_vec());
    let Some(mut bytes) = std::str::from_utf8(&proof).ok().and_then(hex32::parse) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_proof",
            "the x-download-proof header must be 64 hex digits",
        ));
    };
    let proof_sha256: [u8; 32] = Sha256::digest(bytes).into();
    bytes.zeroize();
    match app
        .storage
        .snapshot(id)
        .await
        .map_err(Refusal::unavailable)?
    {
        Some(s) if same_hash(&s.meta.proof_sha256, &proof_sha256) => Ok(s),
        _ => Err(Refusal::not_available()),
    }
}
