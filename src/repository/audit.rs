//! The append-only audit trail: who did what to which document, when, from where.
//!
//! One JSON object per line in a file opened with `O_APPEND` (mode 0600). Every real
//! access (created, uploaded, completed, status, downloaded, revoked, extended, receipt, and a
//! facility's refused request) is a line synced before the request is answered.
//! Refusals of requests without credentials (no API key, wrong or missing download
//! proof, rate limited) are aggregated instead, so that a flood of them cannot fill the
//! disk or wear it out with syncs: the first refusal per (client, action, reason) in a
//! [`REJECTION_WINDOW`] is written at once (not synced), the others are counted, and one
//! summary line per key ends the window (one sync for all).
//!
//! It never holds a key, a proof or a hash of either: the fields are typed so that
//! nothing else can be written. Each server writes its own file; with several servers,
//! ship the files to one place (journald, a log collector).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Why the audit trail cannot be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The file cannot be opened or written.
    #[error("cannot write the audit trail {path}: {source}; check the folder and the disk")]
    Io {
        /// The audit file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// How long refusals of unauthenticated requests are aggregated into one summary line.
pub const REJECTION_WINDOW: Duration = Duration::from_secs(60);

/// Distinct (client, action, reason) keys aggregated per window at most; refusals beyond
/// are counted in one "other clients" line, so a flood of addresses cannot exhaust memory.
const MAX_REJECTION_KEYS: usize = 10_000;

/// Who acted.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Actor {
    /// An authenticated facility, by code.
    Facility(String),
    /// Someone showing (or failing to show) a download proof.
    Receiver,
    /// A caller without valid credentials.
    Anonymous,
    /// The server itself (expiry sweep).
    Server,
}

/// One line of the trail.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// Unix seconds.
    pub time: u64,
    /// Who acted.
    pub actor: Actor,
    /// What was done: `create`, `upload_part`, `complete`, `status`, `revoke`,
    /// `extend`, `download`, `receipt`, `expire`, `purge`.
    pub action: &'static str,
    /// The document, when known and well-formed.
    pub document: Option<String>,
    /// `ok` or the error code answered.
    pub outcome: String,
    /// Remote address, when the action came over the network.
    pub from: Option<SocketAddr>,
    /// The client, when it is not the remote address (a trusted proxy named it) or when
    /// the line sums up several refusals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    /// Non-secret detail: part number, byte range, counts.
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A line about something the server did by itself (`expire`, `purge`), now.
    pub fn by_server(action: &'static str, document: String) -> Self {
        AuditEvent {
            time: crate::repository::unix_now(),
            actor: Actor::Server,
            action,
            document: Some(document),
            outcome: "ok".into(),
            from: None,
            client: None,
            detail: None,
        }
    }
}

/// The audit file, shared by all handlers.
#[derive(Debug, Clone)]
pub struct Audit {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    rejections: Arc<Mutex<Rejections>>,
}

/// What an aggregated refusal is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RejectionKey {
    client: IpAddr,
    actor: &'static str,
    action: &'static str,
    outcome: String,
}

/// Refusals seen in the current window beyond the first of each key.
#[derive(Debug, Default)]
struct Rejections {
    more: HashMap<RejectionKey, u64>,
    other_clients: u64,
}

impl Audit {
    /// Opens (creating) the trail for appending.
    ///
    /// # Errors
    /// [`AuditError::Io`] when the file or its folder cannot be created.
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        Ok(Audit {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(file)),
            rejections: Arc::new(Mutex::new(Rejections::default())),
        })
    }

    /// Records the refusal of a request that showed no valid credentials: written at once
    /// (without a sync) when it is the first of its (client, action, reason) in this
    /// window, otherwise only counted for the window's summary ([`Audit::flush_rejections`]).
    ///
    /// # Errors
    /// [`AuditError::Io`] when the first line cannot be written.
    pub async fn rejected(&self, event: AuditEvent, client: IpAddr) -> Result<(), AuditError> {
        let key = RejectionKey {
            client,
            actor: actor_kind(&event.actor),
            action: event.action,
            outcome: event.outcome.clone(),
        };
        {
            let mut rejections = self.rejections.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = rejections.more.get_mut(&key) {
                *count = count.saturating_add(1);
                return Ok(());
            }
            if rejections.more.len() >= MAX_REJECTION_KEYS {
                rejections.other_clients = rejections.other_clients.saturating_add(1);
                return Ok(());
            }
            rejections.more.insert(key, 0);
        }
        self.write(event, false).await
    }

    /// Writes one summary line per (client, action, reason) that was refused more than
    /// once since the last call, and syncs the file once. Called every
    /// [`REJECTION_WINDOW`] and at shutdown.
    ///
    /// # Errors
    /// [`AuditError::Io`] when the lines cannot be written.
    pub async fn flush_rejections(&self) -> Result<(), AuditError> {
        let taken = std::mem::take(&mut *self.rejections.lock().unwrap_or_else(|e| e.into_inner()));
        let now = crate::repository::unix_now();
        let window = REJECTION_WINDOW.as_secs();
        let mut lines = Vec::new();
        for (key, more) in taken.more.into_iter().filter(|(_, more)| *more > 0) {
            lines.push(AuditEvent {
                time: now,
                actor: match key.actor {
                    "receiver" => Actor::Receiver,
                    _ => Actor::Anonymous,
                },
                action: key.action,
                document: None,
                outcome: key.outcome,
                from: None,
                client: Some(key.client),
                detail: Some(format!(
                    "{more} more refused like this from this client within {window} s"
                )),
            });
        }
        if taken.other_clients > 0 {
            lines.push(AuditEvent {
                time: now,
                actor: Actor::Anonymous,
                action: "refused",
                document: None,
                outcome: "many_clients".into(),
                from: None,
                client: None,
                detail: Some(format!(
                    "{} more refusals from clients beyond the {MAX_REJECTION_KEYS} \
                     summarised within {window} s",
                    taken.other_clients
                )),
            });
        }
        let mut bytes = Vec::new();
        for line in &lines {
            bytes.extend(serde_json::to_vec(line).expect("audit events always serialize"));
            bytes.push(b'\n');
        }
        self.append(bytes, true).await
    }

    /// Writes the summary of aggregated refusals every [`REJECTION_WINDOW`], and once
    /// more when `stop` is cancelled. A failed write is logged and tried again at the
    /// next window.
    pub async fn summarize_until(self, stop: CancellationToken) {
        loop {
            let stopped = tokio::select! {
                () = tokio::time::sleep(REJECTION_WINDOW) => false,
                () = stop.cancelled() => true,
            };
            if let Err(e) = self.flush_rejections().await {
                tracing::error!("repository: {e}");
            }
            if stopped {
                return;
            }
        }
    }

    /// Appends one event and syncs it, off the async runtime.
    ///
    /// # Errors
    /// [`AuditError::Io`]; the caller refuses the request, since an action that cannot be
    /// audited must not happen.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.write(event, true).await
    }

    async fn write(&self, event: AuditEvent, sync: bool) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(&event).expect("audit events always serialize");
        line.push(b'\n');
        self.append(line, sync).await
    }

    /// Appends `bytes` (whole lines), synced when `sync`, off the async runtime.
    async fn append(&self, bytes: Vec<u8>, sync: bool) -> Result<(), AuditError> {
        let this = self.clone();
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        tokio::task::spawn_blocking(move || {
            let mut file = this.file.lock().unwrap_or_else(|e| e.into_inner());
            if !bytes.is_empty() {
                file.write_all(&bytes)?;
            }
            if sync { file.sync_data() } else { Ok(()) }
        })
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
    }
}

/// The `kind` an actor is written with.
fn actor_kind(actor: &Actor) -> &'static str {
    match actor {
        Actor::Facility(_) => "facility",
        Actor::Receiver => "receiver",
        Actor::Anonymous => "anonymous",
        Actor::Server => "server",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_appended_never_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.jsonl");
        for action in ["create", "revoke"] {
            let audit = Audit::open(&path).expect("open");
            audit
                .record(AuditEvent {
                    time: 1,
                    actor: Actor::Facility("HOSP_A".into()),
                    action,
                    document: None,
                    outcome: "ok".into(),
                    from: None,
                    client: None,
                    detail: None,
                })
                .await
                .expect("record");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("\"action\":\"create\""), "{}", lines[0]);
        assert!(lines[1].contains("\"kind\":\"facility\",\"name\":\"HOSP_A\""));
    }

    #[tokio::test]
    async fn rejections_are_summed_up_per_client_and_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(&path).expect("open");
        let refusal = |outcome: &str| AuditEvent {
            time: 1,
            actor: Actor::Anonymous,
            action: "create",
            document: None,
            outcome: outcome.into(),
            from: None,
            client: None,
            detail: None,
        };
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        for _ in 0..1000 {
            audit.rejected(refusal("unauthorized"), a).await.expect("a");
        }
        audit.rejected(refusal("unauthorized"), b).await.expect("b");
        audit
            .rejected(refusal("invalid"), a)
            .await
            .expect("a invalid");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 3, "{text}");
        audit.flush_rejections().await.expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[3].contains("999 more refused"), "{}", lines[3]);
        assert!(
            lines[3].contains("\"client\":\"192.0.2.1\""),
            "{}",
            lines[3]
        );
        audit.flush_rejections().await.expect("empty flush");
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            4
        );
    }
}
