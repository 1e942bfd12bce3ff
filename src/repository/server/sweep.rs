//! The background sweep: deletes the content of expired documents and, after the
//! tombstone period, the rest of them; an entry of an expiry a document was extended
//! beyond is dropped (the entries of its new expiry come due later).
//!
//! A due expiry is settled before its content goes
//! ([`Storage::settle`](crate::repository::storage::Storage::settle)), as an extension of
//! it is settled before it is written: whichever of the two settled it first decides,
//! across servers, so a sender is never told of a new expiry whose content a sweep then
//! deletes. A settlement is carried out by every sweep that finds it, whoever made it: a
//! sweep or an extension stopped half-way is finished by the next sweep.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::repository::audit::AuditEvent;
use crate::repository::storage::{Index, Settlement, StorageError};
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
    sweep_at(app, unix_now()).await
}

/// One sweep, with the clock at `now`. An index entry is deleted only when its work is
/// done, so a sweep cut short is taken up again by the next. A document whose entry
/// fails is logged and left for the next sweep; the others are swept all the same.
async fn sweep_at(app: &App, now: u64) -> Result<(), StorageError> {
    for (entry, id) in app.storage.due(Index::Expiry, now).await? {
        let swept = async {
            if let Some(expiry) = due_expiry(app, &id, now).await? {
                settle_expiry(app, &id, expiry, now).await?;
            }
            app.storage.delete_index(&entry).await
        };
        if let Err(e) = swept.await {
            left_for_next(&id, "expire", &e);
        }
    }
    for (entry, id) in app.storage.due(Index::Purge, now).await? {
        if let Err(e) = purge_entry(app, &entry, &id, now).await {
            left_for_next(&id, "purge", &e);
        }
    }
    Ok(())
}

/// Purges document `id` when its purge entry `entry` came due, unless an extension
/// postponed it.
async fn purge_entry(
    app: &App,
    entry: &object_store::path::Path,
    id: &str,
    now: u64,
) -> Result<(), StorageError> {
    if !purge_postponed(app, id, now).await? {
        app.storage.purge(id).await?;
        app.metrics.purged.inc();
        audit(app, AuditEvent::by_server("purge", id.to_owned())).await;
    }
    app.storage.delete_index(entry).await
}

/// Logs a document the sweep could not `action` this time: one bad document (an object
/// the store refuses, an unreadable record) must not keep every other from expiring.
fn left_for_next(id: &str, action: &str, e: &StorageError) {
    tracing::warn!(
        "repository sweep: cannot {action} document {id} ({e}); the other documents were \
         swept, this one is tried again at the next sweep; if this repeats, look at its \
         objects under documents/{id}/ in the storage (docs/repository.md, \"Storage\")"
    );
}

/// The expiry of document `id` that is due at `now`: its current one, unless that is
/// after `now`. `None` when the document was extended beyond `now` (the index entry that
/// came due is one of an expiry it no longer has; the entries of the new one wait for
/// their time) or is gone.
async fn due_expiry(app: &App, id: &str, now: u64) -> Result<Option<u64>, StorageError> {
    Ok(app
        .storage
        .snapshot(id)
        .await?
        .map(|s| s.meta.expires_at)
        .filter(|&expiry| expiry <= now))
}

/// Settles `expiry` of document `id` as expired, unless an extension settled it first,
/// and carries out the settlement that holds. The snapshot [`due_expiry`] read may be
/// older than an extension of this expiry: the settlement, not that read, decides.
async fn settle_expiry(app: &App, id: &str, expiry: u64, now: u64) -> Result<(), StorageError> {
    let settled = app
        .storage
        .settle(id, expiry, Settlement::Expired { at: now })
        .await?;
    carry_out(app, id, settled, now).await
}

/// Carries out the settlement of an expiry of document `id`, whoever made it (this
/// sweep, another server's sweep, an extension): the content of a document settled as
/// expired is deleted (again, when a sweep did it before: harmless); an extension is
/// written (its server may have stopped after settling; when it wrote it, only the index
/// entries are written again, as they were).
async fn carry_out(app: &App, id: &str, settled: Settlement, now: u64) -> Result<(), StorageError> {
    match settled {
        Settlement::Expired { .. } => {
            app.storage.expire(id, now).await?;
            app.metrics.expired.inc();
            tracing::info!("repository: document {id} expired, content deleted");
            audit(app, AuditEvent::by_server("expire", id.to_owned())).await;
        }
        Settlement::Extended { to, at } => {
            if app.storage.extend(id, to, app.purge_at(to), at).await? {
                tracing::info!(
                    "repository: document {id}: an extension of its expiry to {to} was \
                     settled but not yet written; the sweep wrote it"
                );
                let event = AuditEvent {
                    detail: Some(format!("expires_at {to}, written by the sweep")),
                    ..AuditEvent::by_server("extend", id.to_owned())
                };
                audit(app, event).await;
            }
        }
    }
    Ok(())
}

/// Whether document `id` was extended so that its purge time is still ahead of `now`:
/// the purge entry that came due is one of an expiry it no longer has.
async fn purge_postponed(app: &App, id: &str, now: u64) -> Result<bool, StorageError> {
    Ok(app
        .storage
        .snapshot(id)
        .await?
        .is_some_and(|s| now < app.purge_at(s.meta.expires_at)))
}

/// Audits what the sweep did; a failure is logged (the sweep goes on: what it did is
/// done).
async fn audit(app: &App, event: AuditEvent) {
    if let Err(e) = app.audit.record(event).await {
        tracing::error!("repository: {e}");
    }
}

#[cfg(test)]
mod tests {
    //! The sweep against an extension of the same expiry, each step of the sweep run by
    //! hand between the requests, so every interleaving is certain, not timing luck: a
    //! real server on 127.0.0.1 answers the sender and the receiver, and a second server's
    //! state on the same storage folder (as two servers on one bucket) sweeps, its clock at
    //! the document's expiry while the serving server's is a minute before it (another
    //! server's clock, or the same second boundary).

    use super::*;

    use std::path::Path;

    use tokio::net::TcpListener;

    use crate::repository::api::{DocumentStatus, NewDocument, State};
    use crate::repository::client::{Client, ClientError, ClientOptions};
    use crate::repository::config::{
        AuditConfig, FacilityConfig, RepositoryConfig, ServerConfig, StorageConfig,
    };
    use crate::repository::server::ServerError;
    use crate::token::{RepositoryRef, Token};

    /// The serving server and the sweeping one.
    struct Servers {
        url: String,
        key: String,
        work: tempfile::TempDir,
        sweeper: App,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ServerError>>,
    }

    /// A server on the storage folder under `work`, auditing to `audit`, with facility
    /// HOSP_A; its own sweep runs once at its start, then not within a test.
    fn config(work: &Path, audit: &str, key_sha256: &str) -> RepositoryConfig {
        RepositoryConfig {
            server: ServerConfig {
                part_size_mb: 1,
                sweep_interval: 3600,
                ..ServerConfig::default()
            },
            storage: StorageConfig {
                path: work.join("store"),
                ..StorageConfig::default()
            },
            audit: AuditConfig {
                path: work.join(audit),
            },
            facility: [(
                "HOSP_A".to_owned(),
                FacilityConfig {
                    api_key_sha256: key_sha256.to_owned(),
                    ..FacilityConfig::default()
                },
            )]
            .into(),
            ..RepositoryConfig::default()
        }
    }

    impl Servers {
        async fn start() -> Servers {
            let work = tempfile::tempdir().expect("tempdir");
            let (key, hash) = crate::repository::auth::new_api_key().expect("API key");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("address"));
            let stop = CancellationToken::new();
            let shutdown = stop.clone();
            let task = tokio::spawn(crate::repository::server::run(
                config(work.path(), "audit.jsonl", &hash),
                listener,
                async move { shutdown.cancelled().await },
            ));
            let sweeper = App::new(&config(work.path(), "sweeper-audit.jsonl", &hash), None)
                .expect("the sweeping server's state");
            Servers {
                url,
                key: key.to_string(),
                work,
                sweeper,
                stop,
                task,
            }
        }

        fn client(&self, key: Option<&str>) -> Client {
            Client::new(&self.url, key.map(str::to_owned), ClientOptions::default())
                .expect("client")
        }

        /// A document of 1000 random bytes expiring in a minute, uploaded and complete:
        /// its ID, its token, its bytes.
        async fn uploaded(&self) -> (String, Token, Vec<u8>) {
            let expires_at = unix_now() + 60;
            let secret = [7u8; 16];
            let repository = RepositoryRef::Url("http://127.0.0.1".into());
            let token = Token::with_secret(
                repository,
                "00000000000000000000",
                u32::try_from(expires_at).expect("expiry fits a token"),
                secret,
            )
            .expect("token");
            let mut bytes = vec![0u8; 1000];
            getrandom::fill(&mut bytes).expect("random bytes");
            let source = self.work.path().join("container");
            std::fs::write(&source, &bytes).expect("write container");
            let sender = self.client(Some(&self.key));
            let document = NewDocument {
                size: Some(1000),
                expires_at,
                max_downloads: 5,
                proof_hash: token.download_proof().hash(),
            };
            let id = sender.create(&document).await.expect("create").document_id;
            sender
                .upload_file(&id, &source, |_| {})
                .await
                .expect("upload");
            (id, token, bytes)
        }

        async fn status(&self, id: &str) -> DocumentStatus {
            self.client(Some(&self.key))
                .status(id)
                .await
                .expect("status")
        }

        async fn extend(&self, id: &str, to: u64) -> Result<DocumentStatus, ClientError> {
            self.client(Some(&self.key)).extend(id, to).await
        }

        /// The content of `id` as a receiver with `token` downloads it.
        async fn download(&self, id: &str, token: &Token) -> Result<Vec<u8>, ClientError> {
            let out = self.work.path().join("downloaded");
            let _ = std::fs::remove_file(&out);
            self.client(None)
                .download_to(id, &token.download_proof(), &out, |_| {})
                .await?;
            Ok(std::fs::read(&out).expect("read download"))
        }

        /// Whether an expiry index entry of `id` is due at `at`.
        async fn entry_due(&self, id: &str, at: u64) -> bool {
            self.sweeper
                .storage
                .due(Index::Expiry, at)
                .await
                .expect("index")
                .iter()
                .any(|(_, due)| due == id)
        }

        fn sweeper_audit(&self) -> String {
            std::fs::read_to_string(self.work.path().join("sweeper-audit.jsonl"))
                .unwrap_or_default()
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.expect("server task").expect("server");
        }
    }

    /// The race: the sweep reads a due document (not extended), then an extension of it
    /// is answered, then the sweep goes on. The extension wins: 200 with the new expiry,
    /// the content stays downloadable, and the next sweep drops the old expiry's entry.
    /// (Before settlements, the sweep deleted the content after the 200.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_extension_after_the_sweep_read_the_document_wins() {
        let servers = Servers::start().await;
        let (id, token, bytes) = servers.uploaded().await;
        let expiry = u64::from(token.expires_at);
        assert!(servers.entry_due(&id, expiry).await);
        let due = due_expiry(&servers.sweeper, &id, expiry)
            .await
            .expect("sweep reads");
        assert_eq!(due, Some(expiry));

        let later = expiry + 3600;
        let extended = servers
            .extend(&id, later)
            .await
            .expect("extension answered");
        assert_eq!(extended.expires_at, later);

        settle_expiry(&servers.sweeper, &id, expiry, expiry)
            .await
            .expect("sweep goes on");
        let status = servers.status(&id).await;
        assert_eq!(status.state, State::Complete, "{status:?}");
        assert!(
            !status.parts_held.is_empty(),
            "content deleted after the extension was answered 200: {status:?}"
        );
        assert_eq!(status.expires_at, later);
        assert_eq!(
            servers.download(&id, &token).await.expect("download"),
            bytes
        );

        sweep_at(&servers.sweeper, expiry)
            .await
            .expect("next sweep");
        assert!(!servers.entry_due(&id, expiry).await, "old entry kept");
        assert!(servers.entry_due(&id, later).await, "new entry missing");
        assert_eq!(
            servers.download(&id, &token).await.expect("download"),
            bytes
        );
        assert!(!servers.sweeper_audit().contains("\"action\":\"expire\""));
        servers.stop().await;
    }

    /// The other order, with the sweep stopped right after it settled the expiry (a
    /// crash): the extension answers 410 gone and writes nothing; the next sweep finds the
    /// settlement and deletes the content.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_extension_after_the_sweep_settled_is_gone_and_the_next_sweep_expires() {
        let servers = Servers::start().await;
        let (id, token, _) = servers.uploaded().await;
        let expiry = u64::from(token.expires_at);
        let due = due_expiry(&servers.sweeper, &id, expiry)
            .await
            .expect("sweep reads");
        assert_eq!(due, Some(expiry));
        let settled = servers
            .sweeper
            .storage
            .settle(&id, expiry, Settlement::Expired { at: expiry })
            .await
            .expect("sweep settles");
        assert_eq!(settled, Settlement::Expired { at: expiry });

        match servers.extend(&id, expiry + 3600).await {
            Err(ClientError::Refused {
                status: 410,
                code,
                message,
            }) => {
                assert_eq!(code, "gone");
                assert!(message.contains("expired"), "{message}");
            }
            other => panic!("an extension of an expiry settled as expired: {other:?}"),
        }
        assert_eq!(servers.status(&id).await.expires_at, expiry);

        sweep_at(&servers.sweeper, expiry)
            .await
            .expect("next sweep");
        let status = servers.status(&id).await;
        assert_eq!(status.state, State::Expired, "{status:?}");
        assert!(status.parts_held.is_empty(), "content left: {status:?}");
        assert!(matches!(
            servers.download(&id, &token).await,
            Err(ClientError::NotAvailable)
        ));
        assert!(!servers.entry_due(&id, expiry).await, "entry kept");
        assert!(servers.sweeper_audit().contains("\"action\":\"expire\""));
        servers.stop().await;
    }

    /// A document the sweep cannot settle (its settlement record unreadable) is left for
    /// the next sweep and logged; the other documents due are expired all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_document_the_sweep_cannot_settle_does_not_keep_others_from_expiring() {
        let servers = Servers::start().await;
        let (stuck, stuck_token, _) = servers.uploaded().await;
        let (other, other_token, _) = servers.uploaded().await;
        let expiry = u64::from(stuck_token.expires_at).max(u64::from(other_token.expires_at));
        let record = servers
            .work
            .path()
            .join(format!("store/documents/{stuck}/settled"));
        std::fs::create_dir_all(&record).expect("settled folder");
        std::fs::write(
            record.join(format!("{:011}", stuck_token.expires_at)),
            b"not a settlement",
        )
        .expect("corrupt settlement");

        sweep_at(&servers.sweeper, expiry).await.expect("sweep");
        let status = servers.status(&other).await;
        assert_eq!(status.state, State::Expired, "{status:?}");
        assert!(servers.status(&stuck).await.state != State::Expired);
        assert!(
            servers.entry_due(&stuck, expiry).await,
            "left for the next sweep"
        );
        assert!(!servers.entry_due(&other, expiry).await);
        servers.stop().await;
    }

    /// An extension whose server stopped after settling the expiry, before writing the
    /// extension: the sweep writes it out (its record and index entries, audited) and
    /// keeps the content; the document lives until the new expiry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_extension_settled_but_not_written_is_written_by_the_sweep() {
        let servers = Servers::start().await;
        let (id, token, bytes) = servers.uploaded().await;
        let expiry = u64::from(token.expires_at);
        let later = expiry + 3600;
        let extension = Settlement::Extended {
            to: later,
            at: unix_now(),
        };
        let settled = servers
            .sweeper
            .storage
            .settle(&id, expiry, extension)
            .await
            .expect("settle");
        assert_eq!(settled, extension);
        assert_eq!(servers.status(&id).await.expires_at, expiry);

        sweep_at(&servers.sweeper, expiry).await.expect("sweep");
        let status = servers.status(&id).await;
        assert_eq!(status.expires_at, later);
        assert_eq!(status.state, State::Complete, "{status:?}");
        assert_eq!(
            servers.download(&id, &token).await.expect("download"),
            bytes
        );
        assert!(!servers.entry_due(&id, expiry).await, "old entry kept");
        assert!(servers.entry_due(&id, later).await, "new entry missing");
        let audit = servers.sweeper_audit();
        assert!(audit.contains("\"action\":\"extend\""), "{audit}");
        assert!(!audit.contains("\"action\":\"expire\""), "{audit}");
        servers.stop().await;
    }

    /// Two extensions of the same expiry: the one settled first (on another server, not
    /// yet written) is written out, and this one applied after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_extension_settled_first_by_another_is_applied_before_this_one() {
        let servers = Servers::start().await;
        let (id, token, bytes) = servers.uploaded().await;
        let expiry = u64::from(token.expires_at);
        let other = Settlement::Extended {
            to: expiry + 600,
            at: unix_now(),
        };
        servers
            .sweeper
            .storage
            .settle(&id, expiry, other)
            .await
            .expect("settle");

        let latest = expiry + 3600;
        let extended = servers.extend(&id, latest).await.expect("extension");
        assert_eq!(extended.expires_at, latest);
        let (status, code, message) = match servers.extend(&id, expiry + 600).await {
            Err(ClientError::Refused {
                status,
                code,
                message,
            }) => (status, code, message),
            other => panic!("an extension not later: {other:?}"),
        };
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_expiry"),
            "{message}"
        );

        sweep_at(&servers.sweeper, expiry + 600)
            .await
            .expect("sweep");
        assert_eq!(servers.status(&id).await.expires_at, latest);
        assert_eq!(
            servers.download(&id, &token).await.expect("download"),
            bytes
        );
        servers.stop().await;
    }
}
