//! The repository's accept loop. It owns what protects the server from its clients before
//! any handler runs: how many connections are served at once (back-pressure: the rest
//! wait in the kernel's accept queue), how long a client may take to send its headers
//! (a slow or silent client must not hold a socket forever), and a graceful stop that
//! lets transfers in flight finish for a bounded time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::repository::tls::Peer;

/// How long a stop waits for requests in flight (a download may be long) before the
/// remaining connections are closed; clients resume them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, also between keep-alive requests.
    pub header_timeout: Duration,
}

/// Serves `router` on the connections `listener` accepts until `shutdown` completes,
/// then waits for requests in flight (at most [`DRAIN_TIMEOUT`]).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
    L::Addr: Into<Peer>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&mut listener, &slots) => accepted,
        };
        let (io, peer, slot) = accepted;
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("repository: connection from {} ended: {e}", peer.addr);
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "repository: {} connection(s) still busy after {} s; closed (clients resume)",
            connections.len(),
            DRAIN_TIMEOUT.as_secs()
        );
    }
    connections.shutdown().await;
}

/// The next connection, once a slot is free for it.
async fn accept<L>(listener: &mut L, slots: &Arc<Semaphore>) -> (L::Io, Peer, OwnedSemaphorePermit)
where
    L: Listener,
    L::Addr: Into<Peer>,
{
    let ((io, addr), slot) = when_free(slots, listener.accept()).await;
    (io, addr.into(), slot)
}

/// Runs `next` once one of `slots` is free; the slot is held until the permit is dropped.
/// Taking the slot first keeps waiting connections in the kernel's accept queue.
pub(super) async fn when_free<F: Future>(
    slots: &Arc<Semaphore>,
    next: F,
) -> (F::Output, OwnedSemaphorePermit) {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("a connection semaphore is never closed");
    (next.await, slot)
}
