//! `cloudpdi serve`: wires the SCP, the batch stabilizer and the admin endpoint together,
//! and stops them in order.
//!
//! Shutdown (SIGTERM from systemd, or Ctrl-C): stop accepting associations, let every
//! instance in flight finish and be acknowledged, abort idle associations, flush the
//! index, exit 0.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::batch::now_ms;
use crate::config::Config;
use crate::dicom::scp::{Listener, ScpContext};
use crate::metrics::Metrics;
use crate::route::Routes;
use crate::spool::{Spool, StoreError};

/// How long shutdown waits for associations to finish their instance in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The spool or its index cannot be opened.
    #[error("cannot open the spool under {dir}: {source}")]
    Spool {
        /// The data folder.
        dir: std::path::PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// A listening socket cannot be bound.
    #[error("cannot listen on {addr} for {what}: {source} (is another program using this port?)")]
    Bind {
        /// The address from the configuration.
        addr: SocketAddr,
        /// `DICOM` or `admin`.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Runs the daemon until `shutdown` completes.
///
/// # Errors
/// [`ServeError`] when the spool cannot be opened or a port cannot be bound.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let started = Instant::now();
    let spool = open_spool(&config).await?;
    let dicom = bind(config.dicom.listen, "DICOM").await?;
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let routes = Arc::new(Routes::new(&config.routes));
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let ctx = Arc::new(ScpContext {
        routes: routes.clone(),
        spool: spool.clone(),
        metrics: metrics.clone(),
        config: config.dicom.clone(),
    });
    let scp = Listener::new(dicom, ctx, cancel.clone(), tracker.clone());
    let scp = tokio::spawn(scp.run());
    let stabilizer = tokio::spawn(stabilize(
        spool.clone(),
        routes.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        spool: spool.clone(),
        routes: routes.clone(),
        metrics,
        started,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, cancel.clone()));

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(
        dicom = %config.dicom.listen,
        admin = %config.admin.listen,
        data = %config.spool.data_dir.display(),
        routes = %routes.iter().map(|r| format!("{}={}", r.ae_title, r.name)).collect::<Vec<_>>().join(","),
        "cloudpdi serve ready"
    );

    shutdown.await;
    info!("shutting down: no new associations; finishing instances in flight");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    let _ = scp.await;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "associations still open after {} s; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    let _ = stabilizer.await;
    match admin_task.await {
        Ok(Err(e)) => warn!("admin endpoint ended with an error: {e}"),
        Err(e) => warn!("admin endpoint task failed: {e}"),
        Ok(Ok(())) => {}
    }
    let flushed = tokio::task::spawn_blocking(move || spool.index().flush()).await;
    match flushed {
        Ok(Ok(())) => info!("stopped; index flushed"),
        Ok(Err(e)) => error!("index flush at shutdown failed: {e}"),
        Err(e) => error!("index flush at shutdown failed: {e}"),
    }
    Ok(())
}

async fn open_spool(config: &Config) -> Result<Arc<Spool>, ServeError> {
    let (spool_dir, index_dir) = (config.spool_dir(), config.index_dir());
    let min_free_mb = config.spool.min_free_mb;
    let routes: Vec<String> = config.routes.keys().cloned().collect();
    let opened = tokio::task::spawn_blocking(move || {
        let spool = Spool::open(&spool_dir, &index_dir, min_free_mb)?;
        routes
            .iter()
            .try_for_each(|route| spool.prepare_route(route))?;
        Ok(spool)
    })
    .await
    .unwrap_or_else(|e| Err(StoreError::Io(io::Error::other(e))));
    opened.map(Arc::new).map_err(|source| ServeError::Spool {
        dir: config.spool.data_dir.clone(),
        source,
    })
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, what, source })
}

/// Seals quiet batches; checks often enough for the shortest `stable_after`.
async fn stabilize(
    spool: Arc<Spool>,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let shortest = routes
        .iter()
        .map(|r| r.stable_after)
        .min()
        .unwrap_or(Duration::from_secs(1));
    let period = (shortest / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let (spool, routes) = (spool.clone(), routes.clone());
        let sealed = tokio::task::spawn_blocking(move || {
            let sealed = spool.index().seal_quiet(&routes, now_ms())?;
            if !sealed.is_empty() {
                spool.index().flush()?;
            }
            Ok::<_, crate::batch::IndexError>(sealed)
        })
        .await;
        match sealed {
            Ok(Ok(sealed)) => {
                for batch in sealed {
                    crate::metrics::inc(&metrics.batches_stable);
                    info!(
                        batch = %batch.id,
                        route = %batch.route,
                        instances = batch.instances,
                        bytes = batch.bytes,
                        "batch stable, ready for packing"
                    );
                }
            }
            Ok(Err(e)) => error!("cannot check batches for stability: {e}"),
            Err(e) => error!("batch stability check failed: {e}"),
        }
    }
}
