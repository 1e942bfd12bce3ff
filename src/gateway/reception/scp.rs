//! The C-STORE / C-ECHO service class provider: the front door of the gateway.
//!
//! [`Listener`] owns accept and back-pressure. At most `max_associations` associations
//! run at once for any caller, plus `reserved_associations` that only callers named in
//! the called route's `allowed_callers` may use, so the PACS still gets in when other
//! hosts hold every general slot. Whether a caller may use the reserve is known only from
//! its A-ASSOCIATE-RQ, so when the general slots are full the request's head is peeked
//! (not consumed) before deciding. One peer address holds at most
//! `max_associations_per_peer` connections; a caller that finds no slot within
//! `association_timeout` seconds, or a peer over its limit, gets a transient A-ASSOCIATE-RJ
//! ("local limit exceeded"), logged once while that peer is at its limit. An association
//! that sends no C-STORE for `store_idle_timeout` seconds is aborted (C-ECHO keep-alives
//! cannot hold a slot forever). Each association runs in its own task as an
//! `AssociationState` that reassembles P-DATA fragments into command sets and datasets,
//! hands complete instances to the [`Spool`] off the async runtime, and answers only once
//! the instance is durable. A bad dataset gets a failure status and the association goes
//! on; a protocol violation aborts that association only; nothing ends the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::Pdu;
use dicom_ul::association::server::ServerAssociationOptions;
use dicom_ul::association::{Association as _, Error as UlError};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::metrics::Metrics;
use crate::config::DicomConfig;
use crate::dicom::commitment::{self, Encoding, Request, encode_report};
use crate::dicom::dimse::event_report_request;
use crate::dicom::dimse::{Command, MAX_COMMAND_LENGTH, Response, command_pdu, field, status};
use crate::dicom::syntax::{ABSTRACT_SYNTAXES, TRANSFER_SYNTAXES, VERIFICATION};
use crate::dicom::tls::{Link, ServerTls};
use crate::gateway::reception::batch::{Joined, Recorded};
use crate::gateway::reception::commitment::{
    self as commitment_scp, CommitmentRoles, ImportReports,
};
use crate::gateway::reception::route::{Route, RouteAccess, Routes};
use crate::gateway::reception::spool::{Incoming, InstanceHeader, Spool, StoreError, Stored};
use crate::repository::listener::PerAddress;

/// What every association task needs.
pub struct ScpContext {
    /// Route table for access control and batching.
    pub routes: Arc<Routes>,
    /// Where instances go.
    pub spool: Arc<Spool>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// Network settings (PDU size, timeouts).
    pub config: DicomConfig,
    /// Where the local PACS's storage commitment reports for imports go, when
    /// `inbound.storage_commitment` is on.
    pub import_reports: Option<Arc<ImportReports>>,
    /// The outbound pipeline's bell: rung when a storage commitment request closes a
    /// batch, so that packing starts at once.
    pub outbound: Arc<tokio::sync::Notify>,
}

/// Bytes of an A-ASSOCIATE-RQ up to the end of the calling AE title (type, reserved,
/// length, version, reserved, called AE, calling AE).
const RQ_HEAD: usize = 42;

/// A-ASSOCIATE-RJ: rejected-transient (2), by the service provider's presentation
/// function (3), local limit exceeded (2). A DICOM peer retries later.
const REJECT_LOCAL_LIMIT: [u8; 10] = [0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02];

/// Connections being turned away at once; beyond, a connection over its peer's limit is
/// closed without an answer (a flood must not cost more than this).
const MAX_TURNING_AWAY: usize = 64;

/// Rejections sent over TLS at once beyond each peer's first (each costs a server
/// handshake); beyond, a connection over its peer's limit on the TLS listener is closed
/// without a handshake.
const MAX_TLS_TURNING_AWAY: usize = 4;

/// Time a turned-away peer has to read the rejection before the socket is closed.
const REJECT_LINGER: Duration = Duration::from_secs(1);

/// Accepts TCP connections and starts one association task per connection.
pub struct Listener {
    listener: TcpListener,
    ctx: Arc<ScpContext>,
    slots: Arc<Slots>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The TLS settings of a DICOM TLS listener; `None` on the plain one.
    tls: Option<Arc<ServerTls>>,
}

/// The association slots and what each peer address holds.
struct Slots {
    /// Slots for any caller (`max_associations`).
    general: Arc<Semaphore>,
    /// Slots only for callers on the called route's allow-list (`reserved_associations`).
    reserve: Arc<Semaphore>,
    /// Connections that hold no slot yet (negotiating or waiting for one), so that
    /// waiting connections cannot pile up: as many as there are slots.
    waiting: Arc<Semaphore>,
    /// Connections being answered "local limit exceeded" ([`MAX_TURNING_AWAY`]).
    turning_away: Arc<Semaphore>,
    /// Of those, the ones answered over TLS after a handshake ([`MAX_TLS_TURNING_AWAY`]).
    tls_turning_away: Arc<Semaphore>,
    /// Connections per peer address (`max_associations_per_peer`).
    peers: Arc<PerAddress>,
}

impl Slots {
    fn new(config: &DicomConfig) -> Slots {
        let total = config
            .max_associations
            .saturating_add(config.reserved_associations);
        Slots {
            general: Arc::new(Semaphore::new(config.max_associations)),
            reserve: Arc::new(Semaphore::new(config.reserved_associations)),
            waiting: Arc::new(Semaphore::new(total)),
            turning_away: Arc::new(Semaphore::new(MAX_TURNING_AWAY)),
            tls_turning_away: Arc::new(Semaphore::new(MAX_TLS_TURNING_AWAY)),
            peers: PerAddress::new(config.max_associations_per_peer),
        }
    }
}

impl Listener {
    /// A listener on an already bound socket; tasks are tracked by `tracker` so that
    /// shutdown can wait for in-flight instances.
    pub fn new(
        listener: TcpListener,
        ctx: Arc<ScpContext>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Listener {
        let slots = Arc::new(Slots::new(&ctx.config));
        Listener {
            listener,
            ctx,
            slots,
            shutdown,
            tracker,
            tls: None,
        }
    }

    /// A DICOM TLS listener on `listener` beside this one: the same routes, spool,
    /// metrics and association slots (the limits count both listeners' associations).
    pub fn tls(&self, listener: TcpListener, tls: Arc<ServerTls>) -> Listener {
        Listener {
            listener,
            ctx: self.ctx.clone(),
            slots: self.slots.clone(),
            shutdown: self.shutdown.clone(),
            tracker: self.tracker.clone(),
            tls: Some(tls),
        }
    }

    /// Serves until `shutdown` is cancelled. Accept errors are logged and retried.
    pub async fn run(self) {
        let mut next_id: u64 = 0;
        loop {
            // Accept first: a listener waiting for a connection holds no `waiting` permit,
            // so an idle listener cannot starve the other one.
            let (socket, peer) = tokio::select! {
                accepted = self.accept() => accepted,
                () = self.shutdown.cancelled() => return,
            };
            next_id += 1;
            let Some(peer_slot) = self.slots.peers.admit(peer.ip()) else {
                self.turn_away(socket, peer);
                continue;
            };
            let waiting = tokio::select! {
                permit = self.slots.waiting.clone().acquire_owned() => {
                    permit.expect("the connection semaphore is never closed")
                }
                () = self.shutdown.cancelled() => return,
            };
            let ctx = self.ctx.clone();
            let slots = self.slots.clone();
            let shutdown = self.shutdown.clone();
            let tls = self.tls.clone();
            let tracker = self.tracker.clone();
            let span = info_span!("association", id = next_id, peer = %peer);
            self.tracker.spawn(
                async move {
                    let Some((slot, socket)) =
                        take_slot(&ctx, &slots, socket, peer, &shutdown, tls.as_deref()).await
                    else {
                        return;
                    };
                    drop(waiting);
                    serve_association(ctx, socket, peer, shutdown, tracker, tls).await;
                    drop((slot, peer_slot));
                }
                .instrument(span),
            );
        }
    }

    /// Answers a peer over its connection limit "local limit exceeded" (logged once while
    /// it stays at its limit), or just closes the connection during a flood. On the TLS
    /// listener the answer costs a server handshake: only the first refusal while the peer
    /// is at its limit, and others while fewer than [`MAX_TLS_TURNING_AWAY`] run, get one.
    fn turn_away(&self, socket: TcpStream, peer: SocketAddr) {
        let first = self.slots.peers.first_refusal(peer.ip());
        if first {
            warn!(
                %peer,
                "association refused: this address already holds {} connections \
                 (dicom.max_associations_per_peer); further ones are rejected (transient, \
                 local limit exceeded) until some end",
                self.slots.peers.limit()
            );
        }
        let Ok(permit) = self.slots.turning_away.clone().try_acquire_owned() else {
            return;
        };
        let handshake = match &self.tls {
            None => None,
            Some(_) => match self.slots.tls_turning_away.clone().try_acquire_owned() {
                Ok(handshake) => Some(handshake),
                Err(_) if first => None,
                Err(_) => return,
            },
        };
        let tls = self.tls.clone();
        self.tracker.spawn(async move {
            reject_local_limit(socket, tls.as_deref()).await;
            drop((permit, handshake));
        });
    }

    async fn accept(&self) -> (TcpStream, SocketAddr) {
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.listener.accept().await {
                Ok((socket, peer)) => {
                    // Nagle + delayed ACK stalls every small PDU (20x slower on loopback).
                    if let Err(e) = socket.set_nodelay(true) {
                        debug!(%peer, "cannot set TCP_NODELAY: {e}");
                    }
                    return (socket, peer);
                }
                Err(e) => {
                    warn!("accepting a DICOM connection failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// An association slot for the connection from `peer`: a general one at once if free;
/// otherwise the caller's A-ASSOCIATE-RQ is peeked to see whether it may use the reserve,
/// and it waits up to `association_timeout` for a slot it may use. `None` when it was
/// rejected (transient, local limit exceeded) or the gateway is stopping.
///
/// On a TLS listener the request is encrypted and dicom-ul reads it in the same call as
/// the handshake, so it cannot be peeked: a TLS connection waits for a general slot only
/// (the reserve serves allowed callers on the plain listener), and its rejection is sent
/// over TLS.
async fn take_slot(
    ctx: &ScpContext,
    slots: &Arc<Slots>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
    tls: Option<&ServerTls>,
) -> Option<(OwnedSemaphorePermit, TcpStream)> {
    if let Ok(slot) = slots.general.clone().try_acquire_owned() {
        return Some((slot, socket));
    }
    let wait = ctx.config.association_timeout();
    let callers = match tls {
        None => tokio::time::timeout(wait, peek_callers(&socket)).await,
        Some(_) => Ok(None),
    };
    let privileged = match &callers {
        Ok(Some((called, calling))) => ctx
            .routes
            .by_called(called)
            .is_some_and(|route| route.allowed_callers.iter().any(|c| c == calling)),
        _ => false,
    };
    if privileged && let Ok(slot) = slots.reserve.clone().try_acquire_owned() {
        return Some((slot, socket));
    }
    let free = async {
        if privileged {
            tokio::select! {
                slot = slots.general.clone().acquire_owned() => slot,
                slot = slots.reserve.clone().acquire_owned() => slot,
            }
        } else {
            slots.general.clone().acquire_owned().await
        }
    };
    tokio::select! {
        slot = free => Some((slot.expect("the association semaphores are never closed"), socket)),
        () = tokio::time::sleep(wait) => {
            if slots.peers.first_refusal(peer.ip()) {
                let calling = callers.ok().flatten().map(|(_, calling)| calling);
                warn!(
                    calling = ?calling.as_deref().unwrap_or("?"),
                    "association refused: all {} association slots stayed busy for {} s \
                     (dicom.max_associations; dicom.reserved_associations serve only a \
                     route's allowed_callers); rejected (transient, local limit exceeded)",
                    ctx.config.max_associations,
                    ctx.config.association_timeout
                );
            }
            reject_local_limit(socket, tls).await;
            None
        }
        () = shutdown.cancelled() => None,
    }
}

/// The called and calling AE titles of the A-ASSOCIATE-RQ waiting on `socket`, read
/// without consuming it (the association negotiation reads it again); `None` when the
/// connection closes or sends something else.
async fn peek_callers(socket: &TcpStream) -> Option<(String, String)> {
    let mut head = [0u8; RQ_HEAD];
    loop {
        let n = socket.peek(&mut head).await.ok()?;
        if n == 0 || head[0] != 0x01 {
            return None;
        }
        if n >= RQ_HEAD {
            break;
        }
        // Part of the head arrived; peek returns at once until more does.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ae = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    Some((ae(&head[10..26]), ae(&head[26..42])))
}

/// Sends a transient A-ASSOCIATE-RJ ("local limit exceeded") and closes the connection
/// once the peer has had [`REJECT_LINGER`] to read it; on a TLS listener, after a
/// handshake that also has [`REJECT_LINGER`] to finish.
async fn reject_local_limit(socket: TcpStream, tls: Option<&ServerTls>) {
    match tls {
        None => send_reject(socket).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
            if let Ok(Ok(socket)) =
                tokio::time::timeout(REJECT_LINGER, acceptor.accept(socket)).await
            {
                send_reject(socket).await;
            }
        }
    }
}

async fn send_reject<S: AsyncRead + AsyncWrite + Unpin>(mut socket: S) {
    let _ = tokio::time::timeout(REJECT_LINGER, async {
        socket.write_all(&REJECT_LOCAL_LIMIT).await?;
        socket.shutdown().await?;
        let mut sink = [0u8; 4096];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

type Options = ServerAssociationOptions<'static, RouteAccess, CommitmentRoles>;

fn negotiation_options(ctx: &ScpContext, peer: SocketAddr, tls: Option<&ServerTls>) -> Options {
    let metrics = ctx.metrics.clone();
    let mut access = RouteAccess::new(
        ctx.routes.clone(),
        peer,
        Box::new(move |refusal| metrics.refused(refusal)),
    );
    if let Some(imports) = &ctx.import_reports {
        access = access.admitting_reports(&imports.ours, &imports.pacs_ae);
    }
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(access)
        .ae_title("CLOUDPDI")
        .max_pdu_length(ctx.config.max_pdu_length)
        .read_timeout(ctx.config.idle_timeout())
        .write_timeout(ctx.config.idle_timeout())
        .with_negotiation(CommitmentRoles)
        .with_abstract_syntax(commitment::SOP_CLASS);
    for uid in ABSTRACT_SYNTAXES.iter() {
        options = options.with_abstract_syntax(*uid);
    }
    for uid in TRANSFER_SYNTAXES.iter() {
        options = options.with_transfer_syntax(*uid);
    }
    if let Some(tls) = tls {
        options = options.tls_config(tls.config.clone());
    }
    options
}

/// Decrements the active-association gauge however the task ends.
struct ActiveGuard(Arc<Metrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.associations_active.dec();
    }
}

async fn serve_association(
    ctx: Arc<ScpContext>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    tls: Option<Arc<ServerTls>>,
) {
    let options = negotiation_options(&ctx, peer, tls.as_deref());
    let negotiation = tokio::time::timeout(
        ctx.config.association_timeout(),
        establish(&options, socket, tls.as_deref()),
    )
    .await;
    let mut association = match negotiation {
        Ok(Ok(Some(association))) => association,
        Ok(Ok(None)) => {
            warn!(
                "a plain (non-TLS) DICOM client connected to the TLS port {} from {peer}; \
                 closed: configure the client for DICOM TLS, or point it at the plain port \
                 dicom.listen = {}",
                tls.as_ref()
                    .map_or(ctx.config.listen, |tls| tls.settings.listen),
                ctx.config.listen
            );
            return;
        }
        // Refusals were logged by the access check, with the reason.
        Ok(Err(UlError::Rejected { .. })) => return,
        Ok(Err(UlError::TlsNotSupported)) => {
            let tls_port = ctx.config.tls.as_ref().map(|tls| tls.listen.to_string());
            warn!(
                "a TLS client connected to the plain DICOM port {} from {peer}; closed: \
                 point it at the DICOM TLS port ({}), or turn TLS off on the client",
                ctx.config.listen,
                tls_port
                    .as_deref()
                    .unwrap_or("none configured: see [dicom.tls]")
            );
            return;
        }
        Ok(Err(e)) => {
            match tls.as_ref().and_then(|tls| tls.handshake_failure(&e)) {
                Some(why) => warn!("TLS handshake with {peer} failed: {why}"),
                None => info!("association negotiation failed: {e}"),
            }
            return;
        }
        Err(_) => {
            info!(
                "peer did not complete {}association negotiation within {} s",
                if tls.is_some() {
                    "the TLS handshake and "
                } else {
                    ""
                },
                ctx.config.association_timeout
            );
            return;
        }
    };
    // Sorted per message, not per association: the PACS calling a route AE title that is
    // also `inbound.calling_ae_title` sends C-STOREs and N-ACTIONs as any sender, and its
    // N-EVENT-REPORTs there are the reports of imports.
    let called = association.called_ae_title().to_owned();
    let calling = association.peer_ae_title().trim().to_owned();
    let route = ctx.routes.admit(&calling, &called).ok().cloned();
    let reports = match &ctx.import_reports {
        Some(imports) => {
            match crate::gateway::reception::commitment::is_report_association(
                imports,
                &called,
                &calling,
                peer,
                ctx.config.association_timeout(),
            )
            .await
            {
                Some(true) => Some(imports.clone()),
                Some(false) if route.is_none() => {
                    warn!(
                        calling = %calling,
                        "association refused: the PACS's AE title calling the import AE title, \
                         but not from inbound.pacs's address"
                    );
                    let _ = association.abort().await;
                    return;
                }
                _ => None,
            }
        }
        None => None,
    };
    let Some(route) = route else {
        if let Some(imports) = reports {
            ctx.metrics.associations_active.inc();
            let _active = ActiveGuard(ctx.metrics.clone());
            info!(calling = %calling, "storage commitment report association from the PACS");
            if let Err(why) = crate::gateway::reception::commitment::serve_reports(
                &mut association,
                &imports,
                &shutdown,
            )
            .await
            {
                warn!("storage commitment report association aborted: {why}");
                let _ = association.abort().await;
            }
            return;
        }
        // The access check admits only known AE titles; abort defensively.
        let _ = association.abort().await;
        return;
    };
    ctx.metrics.associations_active.inc();
    let _active = ActiveGuard(ctx.metrics.clone());
    ctx.metrics.associations_accepted.inc();
    info!(
        calling = %calling,
        called = %route.ae_title,
        route = %route.name,
        "association accepted"
    );
    let mut state = AssociationState::new(ctx, route, calling);
    state.import_reports = reports;
    state.tasks = Some((tracker, shutdown.clone()));
    let end = state.run(&mut association, &shutdown).await;
    if end.needs_abort() {
        let _ = association.abort().await;
    }
    state.log_summary(&end);
}

/// Negotiates the association on `socket`, after the TLS handshake on a TLS listener;
/// `Ok(None)` when a plain DICOM client came to the TLS listener (its first byte is that
/// of an A-ASSOCIATE-RQ, 0x01, where a TLS ClientHello starts with 0x16).
async fn establish(
    options: &Options,
    socket: TcpStream,
    tls: Option<&ServerTls>,
) -> Result<Option<Association>, UlError> {
    if tls.is_none() {
        return options
            .establish_async(socket)
            .await
            .map(|a| Some(Link::Plain(a)));
    }
    let mut first = [0u8; 1];
    if let Ok(1) = socket.peek(&mut first).await
        && first[0] == 0x01
    {
        return Ok(None);
    }
    options
        .establish_tls_async(socket)
        .await
        .map(|a| Some(Link::Tls(a)))
}

/// How an association ended.
enum End {
    Released,
    NoStore(u64),
    PeerAborted,
    Shutdown,
    Lost(String),
    Protocol(String),
}

impl End {
    fn needs_abort(&self) -> bool {
        matches!(self, End::Shutdown | End::Protocol(_) | End::NoStore(_))
    }

    fn describe(&self) -> String {
        match self {
            End::Released => "released".into(),
            End::NoStore(seconds) => format!(
                "aborted: no C-STORE for {seconds} s (dicom.store_idle_timeout); \
                 a C-ECHO does not keep an association open"
            ),
            End::PeerAborted => "aborted by the peer".into(),
            End::Shutdown => "aborted: the gateway is shutting down".into(),
            End::Lost(why) => format!("connection lost: {why}"),
            End::Protocol(why) => format!("aborted: protocol error: {why}"),
        }
    }
}

/// A C-STORE whose dataset is arriving.
struct PendingStore {
    command: Command,
    context_id: u8,
    incoming: Result<Incoming, StoreError>,
}

/// An N-ACTION (or, from the local PACS, an N-EVENT-REPORT) whose dataset is arriving.
struct PendingAction {
    command: Command,
    context_id: u8,
    data: Vec<u8>,
    /// Its share of [`commitment_scp::DATASETS`].
    held: Option<tokio::sync::SemaphorePermit<'static>>,
    /// Why it is being read to its end and discarded: the failure status and comment.
    discarded: Option<(u16, String)>,
}

/// Per-association state: what has been received so far and what to report at the end.
struct AssociationState {
    ctx: Arc<ScpContext>,
    route: Arc<Route>,
    calling: String,
    command: Vec<u8>,
    pending: Option<PendingStore>,
    pending_action: Option<PendingAction>,
    /// Where the local PACS's reports of imports go, when this association is the PACS
    /// calling `inbound.calling_ae_title` (also a route's AE title) from its address.
    import_reports: Option<Arc<ImportReports>>,
    /// Where reports on new associations are spawned and the gateway's stop signal.
    tasks: Option<(TaskTracker, CancellationToken)>,
    /// Message ID of the next N-EVENT-REPORT sent on this association.
    next_message_id: u16,
    contexts: Vec<(u8, String, String)>,
    instances: u64,
    bytes: u64,
    failures: u64,
    started: Instant,
    /// When the association began or its last C-STORE was answered.
    last_store: Instant,
}

type Association = crate::dicom::tls::ServerAssociation;

impl AssociationState {
    fn new(ctx: Arc<ScpContext>, route: Arc<Route>, calling: String) -> AssociationState {
        AssociationState {
            ctx,
            route,
            calling,
            command: Vec::new(),
            pending: None,
            pending_action: None,
            import_reports: None,
            tasks: None,
            next_message_id: 1,
            contexts: Vec::new(),
            instances: 0,
            bytes: 0,
            failures: 0,
            started: Instant::now(),
            last_store: Instant::now(),
        }
    }

    async fn run(&mut self, association: &mut Association, shutdown: &CancellationToken) -> End {
        self.contexts = association
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| {
                (
                    pc.id,
                    pc.abstract_syntax.clone(),
                    pc.transfer_syntax.clone(),
                )
            })
            .collect();
        loop {
            // Shutdown is honoured only between messages: an instance in flight finishes.
            let between_messages =
                self.pending.is_none() && self.pending_action.is_none() && self.command.is_empty();
            let store_idle = self.ctx.config.store_idle_timeout();
            let no_store_until = tokio::time::Instant::from_std(self.last_store + store_idle);
            let received = if between_messages {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return End::Shutdown,
                    () = tokio::time::sleep_until(no_store_until) => {
                        return End::NoStore(store_idle.as_secs());
                    }
                    received = association.receive() => received,
                }
            } else {
                association.receive().await
            };
            match received {
                Ok(Pdu::PData { data }) => {
                    for value in data {
                        if let Err(why) = self.on_value(association, value).await {
                            return End::Protocol(why);
                        }
                    }
                }
                Ok(Pdu::ReleaseRQ) => {
                    let _ = association.send(&Pdu::ReleaseRP).await;
                    return End::Released;
                }
                Ok(Pdu::AbortRQ { .. }) => return End::PeerAborted,
                Ok(other) => {
                    return End::Protocol(format!("unexpected {}", other.short_description()));
                }
                Err(e) => return End::Lost(e.to_string()),
            }
        }
    }

    async fn on_value(
        &mut self,
        association: &mut Association,
        value: PDataValue,
    ) -> Result<(), String> {
        match value.value_type {
            PDataValueType::Command => {
                if self.pending.is_some() || self.pending_action.is_some() {
                    return Err("a command arrived while a dataset was expected".into());
                }
                if self.command.len() + value.data.len() > MAX_COMMAND_LENGTH {
                    return Err("command set larger than 64 KiB".into());
                }
                self.command.extend_from_slice(&value.data);
                if !value.is_last {
                    return Ok(());
                }
                let bytes = std::mem::take(&mut self.command);
                if let Ok(response) = Response::decode(&bytes)
                    && response.field == field::N_EVENT_REPORT_RSP
                {
                    info!(
                        calling = %self.calling,
                        status = format_args!("0x{:04X}", response.status),
                        "storage commitment report answered by the requester"
                    );
                    return Ok(());
                }
                let command = Command::decode(&bytes).map_err(|e| e.to_string())?;
                self.on_command(association, command, value.presentation_context_id)
                    .await
            }
            PDataValueType::Data if self.pending_action.is_some() => {
                let action = self.pending_action.as_mut().expect("checked by the guard");
                if action.context_id != value.presentation_context_id {
                    return Err("dataset fragment on another presentation context".into());
                }
                if action.discarded.is_none() {
                    action.discarded = hold(action, value.data.len());
                    if action.discarded.is_some() {
                        action.data = Vec::new();
                        action.held = None;
                    } else {
                        action.data.extend_from_slice(&value.data);
                    }
                }
                if value.is_last {
                    let action = self.pending_action.take().expect("checked by the guard");
                    self.on_action(association, action).await?;
                }
                Ok(())
            }
            PDataValueType::Data => {
                let Some(pending) = self.pending.as_mut() else {
                    return Err("a dataset fragment arrived without a C-STORE request".into());
                };
                if pending.context_id != value.presentation_context_id {
                    return Err("dataset fragment on another presentation context".into());
                }
                if let Ok(incoming) = &mut pending.incoming {
                    incoming.push(&value.data);
                    if incoming.should_spill() {
                        spill(pending).await;
                    }
                }
                if value.is_last {
                    let pending = self.pending.take().expect("checked above");
                    self.finish_store(association, pending).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_command(
        &mut self,
        association: &mut Association,
        command: Command,
        context_id: u8,
    ) -> Result<(), String> {
        let Some((_, abstract_syntax, transfer_syntax)) =
            self.contexts.iter().find(|(id, _, _)| *id == context_id)
        else {
            return Err(format!(
                "{command} on presentation context {context_id}, which was not accepted"
            ));
        };
        match command.field {
            field::C_ECHO_RQ => {
                debug!("C-ECHO");
                respond(
                    association,
                    context_id,
                    command.response(status::SUCCESS, None),
                )
                .await
            }
            field::C_STORE_RQ if command.has_data_set && abstract_syntax != VERIFICATION => {
                let incoming = if &command.sop_class_uid == abstract_syntax {
                    self.ctx.spool.incoming(InstanceHeader {
                        sop_class_uid: command.sop_class_uid.clone(),
                        sop_instance_uid: command.sop_instance_uid.clone(),
                        transfer_syntax: transfer_syntax.clone(),
                        calling_ae: self.calling.clone(),
                    })
                } else {
                    Err(StoreError::Mismatch(format!(
                        "SOP class {} sent on a presentation context for {abstract_syntax}",
                        command.sop_class_uid
                    )))
                };
                self.pending = Some(PendingStore {
                    command,
                    context_id,
                    incoming,
                });
                Ok(())
            }
            field::N_ACTION_RQ if abstract_syntax == commitment::SOP_CLASS => {
                self.expect_dataset(association, command, context_id).await
            }
            field::N_EVENT_REPORT_RQ
                if abstract_syntax == commitment::SOP_CLASS && self.import_reports.is_some() =>
            {
                self.expect_dataset(association, command, context_id).await
            }
            _ => Err(format!("{command} is not supported by this SCP")),
        }
    }

    /// Waits for the dataset of a Storage Commitment message; one announced without a
    /// dataset is answered 0x0115 at once.
    async fn expect_dataset(
        &mut self,
        association: &mut Association,
        command: Command,
        context_id: u8,
    ) -> Result<(), String> {
        let action = PendingAction {
            discarded: (!command.has_data_set).then(|| {
                (
                    status::INVALID_ARGUMENT_VALUE,
                    format!("{command} without a dataset"),
                )
            }),
            command,
            context_id,
            data: Vec::new(),
            held: None,
        };
        if action.discarded.is_some() {
            return self.on_action(association, action).await;
        }
        self.pending_action = Some(action);
        Ok(())
    }

    /// A whole Storage Commitment message. A request is answered at once, checked against
    /// the spool, reported on this association or on a new one as `dicom.commitment`
    /// says; a report from the local PACS goes to the import waiting for it.
    async fn on_action(
        &mut self,
        association: &mut Association,
        action: PendingAction,
    ) -> Result<(), String> {
        let PendingAction {
            command,
            context_id,
            data,
            held,
            discarded,
        } = action;
        if let Some((code, why)) = discarded {
            warn!(
                calling = %self.calling,
                status = format_args!("0x{code:04X}"),
                "storage commitment message refused: {why}"
            );
            return respond(association, context_id, command.response(code, Some(&why))).await;
        }
        let syntax = self
            .contexts
            .iter()
            .find(|(id, _, _)| *id == context_id)
            .map(|(_, _, ts)| ts.clone())
            .unwrap_or_default();
        if command.field == field::N_EVENT_REPORT_RQ
            && let Some(imports) = &self.import_reports
        {
            let (code, comment) =
                commitment_scp::take_report(imports, &command, Some(&data), &syntax);
            return respond(
                association,
                context_id,
                command.response(code, comment.as_deref()),
            )
            .await;
        }
        let decoded = if command.sop_instance_uid != commitment::SOP_INSTANCE {
            Err((
                status::NO_SUCH_SOP_INSTANCE,
                "N-ACTION not on the Storage Commitment Push Model SOP instance".to_owned(),
            ))
        } else if command.type_id != Some(commitment::ACTION_REQUEST) {
            Err((
                status::NO_SUCH_ACTION,
                "only Action Type ID 1 (request storage commitment) is supported".to_owned(),
            ))
        } else {
            Encoding::of(&syntax)
                .and_then(|encoding| {
                    commitment::decode_request(&data, encoding).map(|r| (r, encoding))
                })
                .map_err(|e| {
                    let code = match e {
                        commitment::CommitmentError::TooManyReferences
                        | commitment::CommitmentError::TooLarge(_) => status::RESOURCE_LIMITATION,
                        _ => status::INVALID_ARGUMENT_VALUE,
                    };
                    (code, e.to_string())
                })
        };
        let (request, encoding) = match decoded {
            Ok(decoded) => decoded,
            Err((code, why)) => {
                warn!(
                    calling = %self.calling,
                    status = format_args!("0x{code:04X}"),
                    "storage commitment request refused: {why}"
                );
                return respond(association, context_id, command.response(code, Some(&why))).await;
            }
        };
        respond(
            association,
            context_id,
            command.response(status::SUCCESS, None),
        )
        .await?;
        info!(
            calling = %self.calling,
            route = %self.route.name,
            transaction = %request.transaction_uid,
            instances = request.references.len(),
            "storage commitment request received"
        );
        drop(data);
        let report = self.check(request).await?;
        drop(held);
        info!(
            calling = %self.calling,
            transaction = %report.transaction_uid,
            committed = report.committed.len(),
            failed = report.failed.len(),
            "storage commitment result"
        );
        if let Some(peer) = commitment_scp::mode(&self.ctx.config.commitment, &self.calling)
            && let Some((tracker, shutdown)) = &self.tasks
        {
            match commitment_scp::REPORT_SENDERS.try_acquire() {
                Ok(sender) => {
                    tracker.spawn(commitment_scp::report_on_new_association(
                        peer.clone(),
                        self.route.ae_title.clone(),
                        self.calling.clone(),
                        report,
                        shutdown.clone(),
                        sender,
                    ));
                    return Ok(());
                }
                Err(_) => warn!(
                    calling = %self.calling,
                    transaction = %report.transaction_uid,
                    "{} storage commitment reports are being sent on new associations already; \
                     this one goes back on the association of its request",
                    commitment_scp::MAX_REPORT_SENDERS
                ),
            }
        }
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1);
        commitment::send_message(
            association,
            context_id,
            event_report_request(
                message_id,
                commitment::SOP_CLASS,
                commitment::SOP_INSTANCE,
                report.event_type(),
            ),
            Some(&encode_report(&report, encoding)),
        )
        .await
        .map_err(|e| format!("cannot send the storage commitment report: {e}"))
    }

    /// The request checked against the spool (off the runtime).
    async fn check(&self, request: Request) -> Result<commitment::Report, String> {
        let spool = self.ctx.spool.clone();
        let route = self.route.clone();
        let (metrics, ready) = (self.ctx.metrics.clone(), self.ctx.outbound.clone());
        tokio::task::spawn_blocking(move || {
            crate::gateway::reception::commitment::answer(
                &spool, &route, &request, &metrics, &ready,
            )
        })
        .await
        .map_err(|e| format!("the storage commitment check stopped: {e}"))
    }

    async fn finish_store(
        &mut self,
        association: &mut Association,
        pending: PendingStore,
    ) -> Result<(), String> {
        let PendingStore {
            command,
            context_id,
            incoming,
        } = pending;
        let result = match incoming {
            Ok(incoming) => {
                let spool = self.ctx.spool.clone();
                let route = self.route.clone();
                tokio::task::spawn_blocking(move || spool.commit(incoming, &route))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e))))
            }
            Err(e) if e.is_local() => {
                // Refused before it could be read (its spill failed): hold the route's
                // open batches, since any of them may be the incomplete one.
                let spool = self.ctx.spool.clone();
                let route = self.route.clone();
                tokio::task::spawn_blocking(move || {
                    spool.refused(&route, None, &e);
                    Err(e)
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e))))
            }
            Err(e) => Err(e),
        };
        let (code, comment) = match &result {
            Ok(stored) => {
                self.count_stored(stored);
                (status::SUCCESS, None)
            }
            Err(e) => {
                self.failures += 1;
                let code = self.count_failure(e);
                warn!(
                    sop_instance_uid = %command.sop_instance_uid,
                    status = format_args!("0x{code:04X}"),
                    "instance refused: {e}"
                );
                (code, Some(e.to_string()))
            }
        };
        self.last_store = Instant::now();
        respond(
            association,
            context_id,
            command.response(code, comment.as_deref()),
        )
        .await
    }

    fn count_stored(&mut self, stored: &Stored) {
        let metrics = &self.ctx.metrics;
        match stored.recorded {
            Some(recorded) => {
                metrics.instances_stored.inc();
                metrics.bytes_stored.inc_by(stored.size);
                if let Recorded::Added { joined, .. } = recorded {
                    let what = match joined {
                        Joined::New => "batch opened",
                        Joined::Reopened => "stable batch reopened for a late instance",
                        Joined::Open => "",
                    };
                    if !what.is_empty() {
                        info!(
                            batch = %stored.batch,
                            route = %self.route.name,
                            study = %stored.study_uid,
                            "{what}"
                        );
                    }
                }
            }
            None => {
                metrics.instances_duplicate.inc();
                debug!(batch = %stored.batch, "instance already in a stable batch; acknowledged");
            }
        }
        self.instances += 1;
        self.bytes += stored.size;
    }

    fn count_failure(&self, error: &StoreError) -> u16 {
        let metrics = &self.ctx.metrics;
        match error {
            StoreError::OutOfSpace(_) => {
                metrics.instances_out_of_space.inc();
                status::OUT_OF_RESOURCES
            }
            StoreError::Unparsable(_) | StoreError::Refused(_) => {
                metrics.instances_unparsable.inc();
                status::CANNOT_UNDERSTAND
            }
            StoreError::Mismatch(_) => {
                metrics.instances_unparsable.inc();
                status::DATA_SET_DOES_NOT_MATCH
            }
            StoreError::Index(e) if e.is_out_of_space() => {
                metrics.instances_out_of_space.inc();
                status::OUT_OF_RESOURCES
            }
            _ => {
                metrics.instances_failed.inc();
                status::PROCESSING_FAILURE
            }
        }
    }

    fn log_summary(&self, end: &End) {
        info!(
            calling = %self.calling,
            called = %self.route.ae_title,
            instances = self.instances,
            bytes = self.bytes,
            failures = self.failures,
            seconds = format_args!("{:.2}", self.started.elapsed().as_secs_f64()),
            "association {}",
            end.describe()
        );
    }
}

/// Takes `more` bytes of the storage commitment budget for the dataset of `action`:
/// `None` when taken, else the failure status and comment it gets once read to its end.
fn hold(action: &mut PendingAction, more: usize) -> Option<(u16, String)> {
    if action.data.len().saturating_add(more) > commitment::MAX_DATASET_LENGTH {
        return Some((
            status::RESOURCE_LIMITATION,
            format!(
                "storage commitment dataset larger than {} bytes: send at most {} instances \
                 per request",
                commitment::MAX_DATASET_LENGTH,
                commitment::MAX_REFERENCES
            ),
        ));
    }
    if !commitment_scp::DATASETS.take(&mut action.held, more) {
        return Some((
            status::RESOURCE_LIMITATION,
            format!(
                "the gateway already holds {} MiB of storage commitment requests from all \
                 associations; ask again later",
                commitment_scp::DATASET_BUDGET >> 20
            ),
        ));
    }
    None
}

/// Writes buffered bytes to the temp file on the blocking pool; a failure is kept and
/// reported in the C-STORE response once the dataset has fully arrived.
async fn spill(pending: &mut PendingStore) {
    let Ok(mut incoming) = std::mem::replace(
        &mut pending.incoming,
        Err(StoreError::Io(std::io::Error::other("spill in progress"))),
    ) else {
        return;
    };
    pending.incoming = tokio::task::spawn_blocking(move || incoming.spill().map(|()| incoming))
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e))));
}

async fn respond(
    association: &mut Association,
    context_id: u8,
    command: Vec<u8>,
) -> Result<(), String> {
    association
        .send(&command_pdu(context_id, command))
        .await
        .map_err(|e| format!("cannot send the response: {e}"))
}
