//! The repository's accept loop. It owns what protects the server from its clients before
//! any handler runs: how many connections are served at once (back-pressure: the rest
//! wait in the kernel's accept queue), how many of them one client address may hold (one
//! host must not take every slot), how long a client may take to send its headers (a
//! slow or silent client must not hold a socket forever), and a graceful stop that lets
//! transfers in flight finish for a bounded time.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
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
/// `per_address` is shared with the TLS handshakes, so both count against one limit.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    per_address: Arc<PerAddress>,
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
        let Some(held) = per_address.admit(peer.addr.ip()) else {
            turned_away(&per_address, peer.addr.ip());
            drop(io);
            continue;
        };
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
            drop((slot, held));
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

/// Connections open per client address, so that one host (a scanner, a stuck client, an
/// attacker opening sockets and sending nothing) cannot take every connection slot.
#[derive(Debug)]
pub struct PerAddress {
    limit: usize,
    open: Mutex<HashMap<IpAddr, Held>>,
}

#[derive(Debug)]
struct Held {
    count: usize,
    warned: bool,
}

/// One connection counted against its address; released when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<PerAddress>,
    addr: IpAddr,
}

impl PerAddress {
    /// At most `limit` connections per address.
    pub fn new(limit: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            limit: limit.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The most connections one address may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts a connection from `addr`, or `None` when `addr` already holds the limit
    /// (the caller turns the connection away, logging [`PerAddress::first_refusal`]).
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let held = open.entry(addr).or_insert(Held {
            count: 0,
            warned: false,
        });
        if held.count >= self.limit {
            return None;
        }
        held.count += 1;
        Some(AddressSlot {
            table: self.clone(),
            addr,
        })
    }

    /// Whether a refusal of `addr` is the first while it holds connections: only that one
    /// is logged, not the rest of a flood.
    pub fn first_refusal(&self, addr: IpAddr) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        match open.get_mut(&addr) {
            Some(held) => !std::mem::replace(&mut held.warned, true),
            None => true,
        }
    }
}

/// Logs the first refusal of `addr` by a repository or admin listener.
pub(super) fn turned_away(per_address: &PerAddress, addr: IpAddr) {
    if per_address.first_refusal(addr) {
        tracing::warn!(
            "{addr} already holds {} connections (for the repository: \
             server.max_connections_per_address); further connections from it are closed \
             until some end",
            per_address.limit
        );
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = open.get_mut(&self.addr) {
            held.count = held.count.saturating_sub(1);
            if held.count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_limit_counts_and_releases() {
        let table = PerAddress::new(2);
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let first = table.admit(a).expect("first");
        let _second = table.admit(a).expect("second");
        assert!(table.admit(a).is_none(), "third from the same address");
        assert!(table.first_refusal(a), "the first refusal is logged");
        assert!(!table.first_refusal(a), "the rest of a flood is not");
        assert!(table.admit(b).is_some(), "another address is not affected");
        drop(first);
        assert!(table.admit(a).is_some(), "a slot is free again");
    }
}
