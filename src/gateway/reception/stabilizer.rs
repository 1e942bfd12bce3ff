//! The stabilizer: a batch is ready for packing once its route has been quiet for
//! `stable_after` (a study travels whole, not as it trickles in from the PACS).
//!
//! It runs beside the SCP as one task of `cloudpdi serve`, and only moves batches from
//! open to stable in the index; the outbound pipeline picks stable batches up.
//!
//! The quiet period restarts when the daemon starts: a batch that was open when the
//! daemon stopped (or was killed) becomes stable only `stable_after` after this start, so
//! a PACS whose send the stop interrupted has time to resend. A batch that was already
//! stable at the stop stays stable: it had its full quiet period while the gateway was
//! listening, so the stop interrupted no send of it (a late instance still reopens it
//! until the outbound pipeline takes it). A batch held as possibly incomplete (instances
//! refused, not resent) stays held across restarts: the refusals are in its record.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::route::Routes;
use super::spool::Spool;
use crate::admin::metrics::Metrics;
use crate::clock::now_ms;

/// Seals quiet batches; checks often enough for the shortest `stable_after`. Rings
/// `outbound` (the outbound job store's bell) when a batch turned stable, so packing starts
/// at once.
pub async fn stabilize(
    spool: Arc<Spool>,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    outbound: Arc<Notify>,
    cancel: CancellationToken,
) {
    let shortest = routes
        .iter()
        .map(|r| r.stable_after)
        .min()
        .unwrap_or(Duration::from_secs(1));
    let period = (shortest / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let started_at = now_ms();
    match spool.index().counts() {
        Ok(counts) if counts.open > 0 => info!(
            open = counts.open,
            "open batches from before this start get a full quiet period from now"
        ),
        Ok(_) => {}
        Err(e) => error!("cannot count open batches: {e}"),
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let (spool, routes) = (spool.clone(), routes.clone());
        let sealed = tokio::task::spawn_blocking(move || {
            let sealed = spool.index().seal_quiet(&routes, now_ms(), started_at)?;
            if !sealed.is_empty() {
                spool.index().flush()?;
            }
            Ok::<_, crate::gateway::store::IndexError>(sealed)
        })
        .await;
        match sealed {
            Ok(Ok(sealed)) => {
                if !sealed.is_empty() {
                    outbound.notify_one();
                }
                for batch in sealed {
                    metrics.batches_stable.inc();
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
