//! The background sweep: deletes the content of expired documents and, after the
//! tombstone period, the rest of them; an entry of an expiry a document was extended
//! beyond is dropped (the entries of its new expiry come due later).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::repository::audit::AuditEvent;
use crate::repository::storage::{Index, StorageError};
use crate::repository::unix_now;

use super::App;

/// Sweeps every `interval` until `stop` is cancelled; a failed sweep is logged and
/// retried at the next one.
pub(super) async fn sweep_loop(app: Arc<App>, interval: Duration, stop: CancellationToken) {
    loop {
        if let Err(e) = sweep(&app).await {
            tracing::warn!("repository sweep: {e}; retrying at the next sweep");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn sweep(app: &App) -> Result<(), StorageError> {
    let now = unix_now();
    let tombstone = app.server.tombstone_days.saturating_mul(86_400);
    for (entry, id) in app.storage.due(Index::Expiry, now).await? {
        if extended_beyond(app, &id, now, 0).await? {
            app.storage.delete_index(&entry).await?;
            continue;
        }
        app.storage.expire(&id, now).await?;
        app.storage.delete_index(&entry).await?;
        app.metrics.expired.inc();
        tracing::info!("repository: document {id} expired, content deleted");
        audit(app, "expire", id).await;
    }
    for (entry, id) in app.storage.due(Index::Purge, now).await? {
        if extended_beyond(app, &id, now, tombstone).await? {
            app.storage.delete_index(&entry).await?;
            continue;
        }
        app.storage.purge(&id).await?;
        app.storage.delete_index(&entry).await?;
        app.metrics.purged.inc();
        audit(app, "purge", id).await;
    }
    Ok(())
}

/// Whether document `id` was extended so that its expiry plus `after` seconds is still
/// ahead of `now`: the index entry that came due is one of an expiry it no longer has
/// (the entries of the new one wait for their time).
async fn extended_beyond(app: &App, id: &str, now: u64, after: u64) -> Result<bool, StorageError> {
    Ok(app
        .storage
        .snapshot(id)
        .await?
        .is_some_and(|s| now < s.meta.expires_at.saturating_add(after)))
}

/// Audits what the sweep did; a failure is logged (the sweep goes on: the content is
/// already gone).
async fn audit(app: &App, action: &'static str, id: String) {
    if let Err(e) = app.audit.record(AuditEvent::by_server(action, id)).await {
        tracing::error!("repository: {e}");
    }
}
