//! TLS for the repository (rustls with the ring provider): a listener that hands axum
//! connections whose handshake already finished, with the client certificate's SHA-256
//! when a facility presented one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::dicom::tls as pem;
use crate::repository::config::TlsConfig;
use crate::repository::listener::{PerAddress, turned_away, when_free};

/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for axum to take them.
const READY_QUEUE: usize = 64;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// SHA-256 of the client certificate (DER), when one was presented and verified.
    pub cert_sha256: Option<[u8; 32]>,
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        Peer {
            addr,
            cert_sha256: None,
        }
    }
}

/// Makes ring the process-wide rustls provider. The HTTP clients that do not take a
/// provider of their own (reqwest's, object_store's S3 client) need one installed, and
/// ring is the one the server already uses: one TLS implementation in the binary.
/// Call before building any HTTP client; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only when another provider was installed first, which then serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Builds the rustls server configuration from PEM files, read as DICOM TLS reads its
/// own ([`crate::dicom::tls`]: the same checks and messages, the key zeroized).
///
/// # Errors
/// A sentence naming the key and the file that cannot be used.
pub fn server_config(config: &TlsConfig) -> Result<rustls::ServerConfig, String> {
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Err("tls.cert and tls.key are both needed".into());
    };
    let certs = pem::certificates("tls.cert", cert).map_err(|e| e.to_string())?;
    let private_key = pem::private_key("tls.key", key).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = pem::roots("tls.client_ca", ca).map_err(|e| e.to_string())?;
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("tls.client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, private_key)
        .map_err(|e| pem::key_error("tls.key", key, cert, &e).to_string())
}

/// A listener whose connections have finished their TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; handshakes run in their own tasks, so a slow client
    /// cannot hold up the others.
    ///
    /// # Errors
    /// The listener's address cannot be read.
    /// At most `max_pending` connections are in their handshake or waiting to be served
    /// at once; further ones wait in the kernel's accept queue. Handshakes count against
    /// `per_address`; an address at its limit is closed before the handshake.
    pub fn new(
        tcp: TcpListener,
        config: rustls::ServerConfig,
        max_pending: usize,
        per_address: Arc<PerAddress>,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let pending = Arc::new(Semaphore::new(max_pending.max(1)));
        tokio::spawn(accept_loop(tcp, acceptor, tx, pending, per_address));
        Ok(TlsListener { ready, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, Peer)>,
    pending: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = when_free(&pending, tcp.accept()) => accepted,
            () = tx.closed() => return,
        };
        let (accepted, permit) = accepted;
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("repository: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(held) = per_address.admit(addr.ip()) else {
            turned_away(&per_address, addr.ip());
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _held = (permit, held);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let cert_sha256 = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map(|cert| Sha256::digest(cert.as_ref()).into());
                    let handed = tx.send((tls, Peer { addr, cert_sha256 }));
                    if tokio::time::timeout(HANDSHAKE_TIMEOUT, handed)
                        .await
                        .is_err()
                    {
                        tracing::info!("repository: no free connection slot for {addr}; closed");
                    }
                }
                Ok(Err(e)) => tracing::info!("repository: TLS handshake from {addr} failed: {e}"),
                Err(_) => tracing::info!("repository: TLS handshake from {addr} timed out"),
            }
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop only ends when this receiver is gone; never reached.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            cert_sha256: None,
        })
    }
}
