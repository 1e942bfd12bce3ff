//! The C-STORE / C-ECHO service class provider: the front door of the gateway.
//!
//! [`Listener`] owns accept and back-pressure (at most `max_associations` at once; further
//! peers wait in the TCP backlog). Each association runs in its own task as an
//! [`AssociationState`] that reassembles P-DATA fragments into command sets and datasets,
//! hands complete instances to the [`Spool`] off the async runtime, and answers only once
//! the instance is durable. A bad dataset gets a failure status and the association goes
//! on; a protocol violation aborts that association only; nothing ends the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dicom_ul::Pdu;
use dicom_ul::association::server::{DefaultNegotiation, ServerAssociationOptions};
use dicom_ul::association::{Association as _, AsyncServerAssociation, Error as UlError};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::dimse::{Command, MAX_COMMAND_LENGTH, command_pdu, field, status};
use super::syntax::{ABSTRACT_SYNTAXES, TRANSFER_SYNTAXES, VERIFICATION};
use crate::batch::{Joined, Recorded};
use crate::config::DicomConfig;
use crate::metrics::{Metrics, inc};
use crate::route::{Route, RouteAccess, Routes};
use crate::spool::{Incoming, InstanceHeader, Spool, StoreError, Stored};

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
}

/// Accepts TCP connections and starts one association task per connection.
pub struct Listener {
    listener: TcpListener,
    ctx: Arc<ScpContext>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
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
        let limit = Arc::new(Semaphore::new(ctx.config.max_associations));
        Listener {
            listener,
            ctx,
            limit,
            shutdown,
            tracker,
        }
    }

    /// Serves until `shutdown` is cancelled. Accept errors are logged and retried.
    pub async fn run(self) {
        let mut next_id: u64 = 0;
        loop {
            let permit = tokio::select! {
                permit = self.limit.clone().acquire_owned() => {
                    permit.expect("the association semaphore is never closed")
                }
                () = self.shutdown.cancelled() => return,
            };
            let (socket, peer) = tokio::select! {
                accepted = self.accept() => accepted,
                () = self.shutdown.cancelled() => return,
            };
            next_id += 1;
            let ctx = self.ctx.clone();
            let shutdown = self.shutdown.clone();
            let span = info_span!("association", id = next_id, peer = %peer);
            self.tracker.spawn(
                async move {
                    serve_association(ctx, socket, peer, shutdown).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
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

type Options = ServerAssociationOptions<'static, RouteAccess, DefaultNegotiation>;

fn negotiation_options(ctx: &ScpContext, peer: SocketAddr) -> Options {
    let metrics = ctx.metrics.clone();
    let access = RouteAccess::new(
        ctx.routes.clone(),
        peer,
        Box::new(move |refusal| metrics.refused(refusal)),
    );
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(access)
        .ae_title("CLOUDPDI")
        .max_pdu_length(ctx.config.max_pdu_length)
        .read_timeout(ctx.config.idle_timeout())
        .write_timeout(ctx.config.idle_timeout());
    for uid in ABSTRACT_SYNTAXES.iter() {
        options = options.with_abstract_syntax(*uid);
    }
    for uid in TRANSFER_SYNTAXES.iter() {
        options = options.with_transfer_syntax(*uid);
    }
    options
}

/// Decrements the active-association gauge however the task ends.
struct ActiveGuard(Arc<Metrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.associations_active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_association(
    ctx: Arc<ScpContext>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let options = negotiation_options(&ctx, peer);
    let negotiation = tokio::time::timeout(
        ctx.config.association_timeout(),
        options.establish_async(socket),
    )
    .await;
    let mut association = match negotiation {
        Ok(Ok(association)) => association,
        // Refusals were logged by the access check, with the reason.
        Ok(Err(UlError::Rejected { .. })) => return,
        Ok(Err(e)) => {
            info!("association negotiation failed: {e}");
            return;
        }
        Err(_) => {
            info!(
                "peer did not complete association negotiation within {} s",
                ctx.config.association_timeout
            );
            return;
        }
    };
    let Some(route) = ctx.routes.by_called(association.called_ae_title()).cloned() else {
        // The access check admits only known AE titles; abort defensively.
        let _ = association.abort().await;
        return;
    };
    ctx.metrics
        .associations_active
        .fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(ctx.metrics.clone());
    inc(&ctx.metrics.associations_accepted);
    let calling = association.peer_ae_title().trim().to_owned();
    info!(
        calling = %calling,
        called = %route.ae_title,
        route = %route.name,
        "association accepted"
    );
    let mut state = AssociationState::new(ctx, route, calling);
    let end = state.run(&mut association, &shutdown).await;
    if end.needs_abort() {
        let _ = association.abort().await;
    }
    state.log_summary(&end);
}

/// How an association ended.
enum End {
    Released,
    PeerAborted,
    Shutdown,
    Lost(String),
    Protocol(String),
}

impl End {
    fn needs_abort(&self) -> bool {
        matches!(self, End::Shutdown | End::Protocol(_))
    }

    fn describe(&self) -> String {
        match self {
            End::Released => "released".into(),
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

/// Per-association state: what has been received so far and what to report at the end.
struct AssociationState {
    ctx: Arc<ScpContext>,
    route: Arc<Route>,
    calling: String,
    command: Vec<u8>,
    pending: Option<PendingStore>,
    contexts: Vec<(u8, String, String)>,
    instances: u64,
    bytes: u64,
    failures: u64,
    started: Instant,
}

type Association = AsyncServerAssociation<TcpStream>;

impl AssociationState {
    fn new(ctx: Arc<ScpContext>, route: Arc<Route>, calling: String) -> AssociationState {
        AssociationState {
            ctx,
            route,
            calling,
            command: Vec::new(),
            pending: None,
            contexts: Vec::new(),
            instances: 0,
            bytes: 0,
            failures: 0,
            started: Instant::now(),
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
            let between_messages = self.pending.is_none() && self.command.is_empty();
            let received = if between_messages {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return End::Shutdown,
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
                if self.pending.is_some() {
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
                let command = Command::decode(&bytes).map_err(|e| e.to_string())?;
                self.on_command(association, command, value.presentation_context_id)
                    .await
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
            _ => Err(format!("{command} is not supported by this SCP")),
        }
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
                inc(&metrics.instances_stored);
                metrics
                    .bytes_stored
                    .fetch_add(stored.size, Ordering::Relaxed);
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
                inc(&metrics.instances_duplicate);
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
                inc(&metrics.instances_out_of_space);
                status::OUT_OF_RESOURCES
            }
            StoreError::Unparsable(_) | StoreError::Refused(_) => {
                inc(&metrics.instances_unparsable);
                status::CANNOT_UNDERSTAND
            }
            StoreError::Mismatch(_) => {
                inc(&metrics.instances_unparsable);
                status::DATA_SET_DOES_NOT_MATCH
            }
            StoreError::Index(crate::batch::IndexError::Sled(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::StorageFull =>
            {
                inc(&metrics.instances_out_of_space);
                status::OUT_OF_RESOURCES
            }
            _ => {
                inc(&metrics.instances_failed);
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
