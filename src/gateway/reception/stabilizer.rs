//! The stabilizer: a batch is ready for packing once its route has been quiet for
//! `stable_after` (a study travels whole, not as it trickles in from the PACS).
//!
//! It runs beside the SCP as one task of `cloudpdi serve`, and only moves batches from
//! open to stable in the index; the outbound pipeline picks stable batches up.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::route::Routes;
use super::spool::Spool;
use crate::admin::metrics::Metrics;
use crate::clock::now_ms;

/// Seals quiet batches; checks often enough for the shortest `stable_after`.
pub async fn stabilize(
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
            Ok::<_, crate::gateway::store::IndexError>(sealed)
        })
        .await;
        match sealed {
            Ok(Ok(sealed)) => {
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
