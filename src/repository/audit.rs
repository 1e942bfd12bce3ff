//! The append-only audit trail: who did what to which document, when, from where.
//!
//! One JSON object per line in a file opened with `O_APPEND` (mode 0600), each line synced
//! before the request is answered. It never holds a key, a proof or a hash of either:
//! the fields are typed so that nothing else can be written. Each server writes its own
//! file; with several servers, ship the files to one place (journald, a log collector).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

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
    /// `download`, `receipt`, `expire`, `purge`.
    pub action: &'static str,
    /// The document, when known and well-formed.
    pub document: Option<String>,
    /// `ok` or the error code answered.
    pub outcome: String,
    /// Remote address, when the action came over the network.
    pub from: Option<SocketAddr>,
    /// Non-secret detail: part number, byte range, counts.
    pub detail: Option<String>,
}

/// The audit file, shared by all handlers.
#[derive(Debug, Clone)]
pub struct Audit {
    path: PathBuf,
    file: Arc<Mutex<File>>,
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
        })
    }

    /// Appends one event and syncs it, off the async runtime.
    ///
    /// # Errors
    /// [`AuditError::Io`]; the caller refuses the request, since an action that cannot be
    /// audited must not happen.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(&event).expect("audit events always serialize");
        line.push(b'\n');
        let this = self.clone();
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        tokio::task::spawn_blocking(move || {
            let mut file = this.file.lock().unwrap_or_else(|e| e.into_inner());
            file.write_all(&line)?;
            file.sync_data()
        })
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
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
}
