//! The watch queue: token files dropped into a folder become inbound jobs.
//!
//! Staff (or a QR scanner, or `cloudpdi receive`) put a file in the watched folder
//! (`inbound.watch_dir`). Its content is the token text, on one or more lines, and
//! optionally a line `patient-id: <local ID>` asking that the study be filed under that
//! local Patient ID. A file that inotify reports closed after writing (or moved in) is
//! taken at once when it holds a whole token; any other file is taken once it has not
//! changed for half a second. A scan every `inbound.poll_interval` seconds catches
//! anything inotify missed (or all of it where inotify is unavailable, e.g. on network
//! shares).
//!
//! Nothing dropped is lost: a file becomes a job (and is removed only once the job is
//! durable), or is moved to `rejected/` beside a `.reason.txt` that says what to fix.
//! Files starting with `.` or ending in `.tmp` are still being written and are left alone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::durable::{self, sync_dir};
use crate::gateway::inbound::{Inbound, QueueError, Queued};
use crate::token::{Token, TokenError};

/// Token files larger than this are not tokens.
pub const MAX_DROP_BYTES: u64 = 16 * 1024;
/// Files changed more recently than this may still be being written.
const SETTLE: Duration = Duration::from_millis(500);

/// A dropped token and what came with it.
pub struct TokenDrop {
    /// The token.
    pub token: Token,
    /// The local Patient ID to file the study under, if given.
    pub patient_id: Option<String>,
}

/// Parses a dropped file's text.
///
/// # Errors
/// [`TokenError`] naming the mistyped group (never repeating the token text).
pub fn parse_drop(text: &str) -> Result<TokenDrop, TokenError> {
    let mut token_text = String::new();
    let mut patient_id = None;
    for line in text.lines() {
        let line = line.trim();
        let field = line
            .split_once(':')
            .filter(|(key, _)| key.trim().eq_ignore_ascii_case("patient-id"));
        match field {
            Some((_, value)) if !value.trim().is_empty() => {
                patient_id = Some(value.trim().to_owned());
            }
            Some(_) => {}
            None => token_text.push_str(line),
        }
    }
    Ok(TokenDrop {
        token: Token::from_text(&token_text)?,
        patient_id,
    })
}

/// The text of a token hand-off, as [`parse_drop`] reads it: the token line, then the
/// local Patient ID line if given (`cloudpdi receive` sends it to the daemon); wiped when
/// dropped.
pub fn drop_text(token: &Token, patient_id: Option<&str>) -> zeroize::Zeroizing<String> {
    let line = token.to_line();
    let id_line = patient_id.map(|id| format!("patient-id: {id}\n"));
    let mut text = zeroize::Zeroizing::new(String::with_capacity(
        line.len() + id_line.as_ref().map_or(0, String::len),
    ));
    text.push_str(&line);
    text.push_str(id_line.as_deref().unwrap_or_default());
    text
}

/// Watches the folder and queues what is dropped into it.
pub struct Watch {
    dir: PathBuf,
    inbound: Arc<Inbound>,
    poll: Duration,
    /// Files inotify reported closed after writing or moved in since the last scan: whole
    /// unless their writer opens them again, so taken without the settle wait when they
    /// parse (a file that does not parse yet is left to settle, never rejected early).
    closed: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Watch {
    /// A watch of `dir` feeding `inbound`.
    pub fn new(dir: PathBuf, inbound: Arc<Inbound>, poll: Duration) -> Watch {
        Watch {
            dir,
            inbound,
            poll,
            closed: Arc::default(),
        }
    }

    /// Runs until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        if let Err(e) = std::fs::create_dir_all(self.dir.join("rejected")) {
            error!(dir = %self.dir.display(), "cannot create the watch folder: {e}; tokens cannot be received");
            return;
        }
        let (wake, mut woken) = tokio::sync::mpsc::channel::<()>(1);
        let _watcher = self.inotify(wake);
        let this = Arc::new(self);
        loop {
            let scan = this.clone();
            let unsettled = tokio::task::spawn_blocking(move || scan.scan())
                .await
                .unwrap_or_else(|e| {
                    error!("watch folder scan failed: {e}");
                    false
                });
            // A file still settling is looked at again when it may have settled.
            let next = match unsettled {
                true => SETTLE.min(this.poll),
                false => this.poll,
            };
            tokio::select! {
                _ = woken.recv() => {}
                () = tokio::time::sleep(next) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    /// Asks inotify to wake the scan; `None` (polling only) where it is unavailable.
    fn inotify(&self, wake: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher;
        let closed = self.closed.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else {
                let _ = wake.try_send(());
                return;
            };
            // The scan's own reads (opening the folder, reading a file) are events too:
            // waking on them would scan in a loop.
            if matches!(event.kind, notify::EventKind::Access(_)) && !is_written(&event.kind) {
                return;
            }
            if is_written(&event.kind) {
                closed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(event.paths);
            }
            let _ = wake.try_send(());
        };
        let watcher = notify::recommended_watcher(handler).and_then(|mut w| {
            w.watch(&self.dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(dir = %self.dir.display(), "inotify unavailable ({e}); scanning every {} s", self.poll.as_secs());
                None
            }
        }
    }

    /// Takes every file that is whole; true when a file was left because it may still be
    /// being written.
    fn scan(&self) -> bool {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                error!(dir = %self.dir.display(), "cannot read the watch folder: {e}");
                return false;
            }
        };
        let closed =
            std::mem::take(&mut *self.closed.lock().unwrap_or_else(PoisonError::into_inner));
        let mut unsettled = false;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(meta) = entry.metadata().ok().filter(|m| m.is_file()) else {
                continue;
            };
            if name.starts_with('.') || name.ends_with(".tmp") {
                continue;
            }
            let settled = meta
                .modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= SETTLE);
            let path = entry.path();
            if settled {
                self.take(&path, &name, true);
            } else if !(closed.contains(&path) && self.take(&path, &name, false)) {
                unsettled = true;
            }
        }
        unsettled
    }

    /// Queues one dropped file, or (when `settled`) moves it to `rejected/` with the
    /// reason; true when the file was dealt with. An unsettled file that does not parse is
    /// left as it is: its writer may not be done.
    fn take(&self, path: &Path, name: &str, settled: bool) -> bool {
        let parsed =
            read_bounded(path).and_then(|text| parse_drop(&text).map_err(Rejection::Token));
        if !settled && parsed.is_err() {
            return false;
        }
        let result = parsed.and_then(|drop| {
            self.inbound
                .queue(&drop.token, drop.patient_id)
                .map_err(Rejection::Queue)
        });
        match result {
            Ok(queued) => {
                let job = match &queued {
                    Queued::New(id) => id,
                    Queued::Known(id) => {
                        info!(file = name, job = %id, "token already received: not imported twice");
                        id
                    }
                };
                if let Err(e) = std::fs::remove_file(path).and_then(|()| sync_dir(&self.dir)) {
                    warn!(file = name, job = %job, "cannot remove the queued token file: {e}");
                }
            }
            Err(Rejection::Queue(QueueError::Index(e))) => {
                error!(file = name, "cannot record the token (will retry): {e}");
            }
            Err(Rejection::Queue(e @ QueueError::Io { .. })) => {
                error!(file = name, "cannot store the token (will retry): {e}");
            }
            Err(reason) => self.reject(path, name, &reason.to_string()),
        }
        true
    }

    fn reject(&self, path: &Path, name: &str, reason: &str) {
        warn!(file = name, "token file rejected: {reason}");
        let rejected = self.dir.join("rejected");
        let moved = durable::write(
            &rejected.join(format!("{name}.reason.txt")),
            format!("{reason}\n").as_bytes(),
            0o644,
        )
        .and_then(|()| std::fs::rename(path, rejected.join(name)))
        .and_then(|()| sync_dir(&rejected))
        .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = moved {
            error!(file = name, "cannot move the rejected token file: {e}");
        }
    }
}

/// A file closed after writing, or renamed into the folder: its writer is done with it.
fn is_written(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    matches!(
        kind,
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write))
            | notify::EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

/// Why a dropped file was not queued.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("{0}")]
    File(String),
    #[error("{0}")]
    Token(TokenError),
    #[error("{0}")]
    Queue(QueueError),
}

/// The file's text, wiped when dropped (it holds the token); read into a buffer that never
/// grows, so no copy is left behind.
fn read_bounded(path: &Path) -> Result<zeroize::Zeroizing<String>, Rejection> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| Rejection::File(format!("cannot read: {e}")))?;
    let capacity = usize::try_from(MAX_DROP_BYTES + 1).expect("a small constant");
    let mut text = zeroize::Zeroizing::new(String::with_capacity(capacity));
    file.take(MAX_DROP_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|_| {
            Rejection::File("not a text file: a token file holds the token text".into())
        })?;
    if text.len() as u64 > MAX_DROP_BYTES {
        return Err(Rejection::File(format!(
            "larger than {MAX_DROP_BYTES} bytes: a token file holds only the token text"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Token {
        Token::with_secret(
            crate::token::RepositoryRef::Url("https://repo.example".into()),
            "0123456789abcdef0123",
            u32::MAX,
            [7; 16],
        )
        .expect("valid token")
    }

    #[test]
    fn a_drop_carries_the_token_over_lines_and_a_patient_id() {
        let text = sample().to_text();
        let (head, tail) = text.split_at(text.len() / 2);
        let drop = parse_drop(&format!("{head}\n{tail}\nPatient-ID: 00771234\n")).expect("parse");
        assert_eq!(drop.token, sample());
        assert_eq!(drop.patient_id.as_deref(), Some("00771234"));
        let plain = parse_drop(&format!("  {}  \n", text.to_lowercase())).expect("lower case");
        assert_eq!((plain.token, plain.patient_id), (sample(), None));
    }

    #[test]
    fn a_damaged_drop_is_an_error_without_the_token_text() {
        let mut text = sample().to_text().to_string();
        text.replace_range(8..9, if &text[8..9] == "A" { "B" } else { "A" });
        let err = parse_drop(&text).err().expect("typo is rejected");
        let message = err.to_string();
        assert!(message.contains("group"), "{message}");
        assert!(!message.contains(&text[4..20]), "{message}");
    }
}
