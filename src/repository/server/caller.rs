//! Who made a request and what became of it: the [`Caller`] every handler receives from
//! the authentication extractors ([`super::authenticate`]), and the one place where an
//! answer or a refusal is audited and counted ([`Caller::answer`]).

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::repository::audit::{Actor, AuditEvent};
use crate::repository::tls::Peer;
use crate::repository::unix_now;

use super::App;
use super::refusal::Refusal;

/// Header in which a trusted proxy names the client.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// Who is asking, doing what, to which document, from where: what the audit line of the
/// request says.
pub(super) struct Caller {
    actor: Actor,
    action: &'static str,
    document: Option<String>,
    from: SocketAddr,
    /// The client: `from`, or the address a trusted proxy named.
    client: IpAddr,
}

/// A served request: the response and what its audit line says besides the caller.
pub(super) struct Answer {
    response: Response,
    outcome: &'static str,
    detail: Option<String>,
    created: Option<String>,
}

impl Answer {
    /// A success (`outcome` "ok") answered with `response`.
    pub(super) fn ok(response: impl IntoResponse) -> Self {
        Answer {
            response: response.into_response(),
            outcome: "ok",
            detail: None,
            created: None,
        }
    }

    /// The answer, audited with `outcome` instead of "ok" (a 416 is served, not refused).
    pub(super) fn with_outcome(mut self, outcome: &'static str) -> Self {
        self.outcome = outcome;
        self
    }

    /// The answer, audited with a non-secret `detail` (part number, byte range, counts).
    pub(super) fn with_detail(mut self, detail: String) -> Self {
        self.detail = Some(detail);
        self
    }

    /// The answer to a create: the audit line names the document it made.
    pub(super) fn with_created(mut self, document: String) -> Self {
        self.created = Some(document);
        self
    }
}

impl Caller {
    /// The caller of a request from `peer`, naming the client behind a trusted proxy.
    pub(super) fn new(
        app: &App,
        headers: &HeaderMap,
        peer: &Peer,
        actor: Actor,
        action: &'static str,
        document: Option<String>,
    ) -> Self {
        let forwarded = headers
            .get(FORWARDED_FOR)
            .map(axum::http::HeaderValue::as_bytes);
        Caller {
            actor,
            action,
            document,
            from: peer.addr,
            client: app.proxies.client(peer.addr.ip(), forwarded),
        }
    }

    /// The document a proof failure is counted against: its ID, or one key for every
    /// malformed ID (so that made-up IDs cannot fill the limiter with long strings).
    pub(super) fn limiter_key(&self) -> &str {
        self.document.as_deref().unwrap_or("")
    }

    /// The client (behind a trusted proxy, the one it named).
    pub(super) fn client(&self) -> IpAddr {
        self.client
    }

    /// Answers the request: a served answer is audited (a line synced before the
    /// response goes out; if it cannot be written the answer is 503), a refusal goes
    /// through [`Caller::refused`].
    pub(super) async fn answer(mut self, app: &App, result: Result<Answer, Refusal>) -> Response {
        let answer = match result {
            Ok(answer) => answer,
            Err(refusal) => return self.refused(app, refusal).await.into_response(),
        };
        if answer.created.is_some() {
            self.document = answer.created;
        }
        match app
            .audit
            .record(self.event(answer.outcome, answer.detail))
            .await
        {
            Ok(()) => answer.response,
            Err(e) => Refusal::unavailable(e).into_response(),
        }
    }

    /// Counts and audits a refusal and passes it on: the one place where refusals are
    /// accounted. A failed proof (`not_available`) counts against the (document, client)
    /// pair in the failed-proof limiter. Refusals of callers without valid credentials
    /// (anonymous, or a receiver's proof) are aggregated (see
    /// [`crate::repository::audit::Audit::rejected`]); a facility's refusals are lines of
    /// their own. A 503 is the repository's failure, not the caller's: not audited.
    pub(super) async fn refused(self, app: &App, refusal: Refusal) -> Refusal {
        if refusal.is_server_failure() {
            return refusal;
        }
        app.metrics.refused(&refusal);
        if refusal.is_not_available() {
            app.limiter.record_failure(self.limiter_key(), self.client);
        }
        let audited = match self.actor {
            Actor::Anonymous | Actor::Receiver => {
                let client = self.client;
                app.audit
                    .rejected(self.event(refusal.code, None), client)
                    .await
            }
            Actor::Facility(_) | Actor::Server => {
                app.audit.record(self.event(refusal.code, None)).await
            }
        };
        match audited {
            Ok(()) => refusal,
            Err(e) => Refusal::unavailable(e),
        }
    }

    /// The audit line; the client is named when it is not the remote address.
    fn event(self, outcome: &str, detail: Option<String>) -> AuditEvent {
        let forwarded = self.client != self.from.ip();
        AuditEvent {
            time: unix_now(),
            actor: self.actor,
            action: self.action,
            document: self.document,
            outcome: outcome.into(),
            from: Some(self.from),
            client: forwarded.then_some(self.client),
            detail,
        }
    }
}
