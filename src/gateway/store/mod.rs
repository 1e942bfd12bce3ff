//! The daemon's database: the one module that knows it is sled.
//!
//! One sled database in `<data_dir>/index/` holds the batches of received instances
//! ([`BatchIndex`]), the job records of both pipelines ([`JobStore`]) and the senders the
//! mailbox refused ([`RefusalStore`]). Everything else
//! sees typed records and methods and one error type, [`IndexError`]: opening the database,
//! its trees, the JSON encoding of records, transactions and their errors, and the flush
//! that makes a change durable before it is acknowledged all live here.
//!
//! Records are JSON, so that a newer version can add a field with a default. Changes that
//! must hold together (an instance and its batch's counters; a job record and its place in
//! the index of active jobs) are made in one transaction.

mod batches;
mod jobs;
mod refusals;

pub use batches::{BatchCounts, BatchIndex};
pub use jobs::JobStore;
pub use refusals::RefusalStore;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// Why the database cannot be read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// sled reported an error (disk full, I/O error, corruption).
    #[error("job index (sled) failed: {0}; check the disk holding the data folder")]
    Sled(sled::Error),
    /// Another process (a second daemon on the same data folder) holds the database.
    #[error(
        "another cloudpdi daemon is using {}{}: stop it, or give this one another \
         spool.data_dir",
        data_dir(.dir).display(),
        .pid.map_or(String::new(), |pid| format!(" (pid {pid})"))
    )]
    InUse {
        /// The database folder (`<data_dir>/index`).
        dir: PathBuf,
        /// The process holding it, when `/proc/locks` tells.
        pid: Option<u32>,
    },
    /// A record could not be decoded: the index was written by an incompatible version.
    #[error(
        "job index record {key} is unreadable ({reason}); was the data folder written by \
         another version?"
    )]
    Corrupt {
        /// The record's key, printable.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl IndexError {
    /// Whether the database failed for lack of disk space: a C-STORE then answers "out of
    /// resources", which a sender retries later, rather than "processing failure".
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            IndexError::Sled(sled::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
        )
    }
}

impl From<sled::Error> for IndexError {
    fn from(e: sled::Error) -> Self {
        IndexError::Sled(e)
    }
}

/// The open database; cloned cheaply (one database per process: sled locks its folder).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// # Errors
    /// [`IndexError::InUse`] when another process holds it, [`IndexError::Sled`] when
    /// it cannot be opened.
    pub fn open(dir: &Path) -> Result<Store, IndexError> {
        match sled::Config::new().path(dir).open() {
            Ok(db) => Ok(Store { db }),
            Err(e) => Err(match lock_holder(dir) {
                Some(pid) => IndexError::InUse {
                    dir: dir.to_owned(),
                    pid,
                },
                None => IndexError::Sled(e),
            }),
        }
    }

    /// Makes every recorded change durable (fsync); called before acknowledging.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the write-ahead log cannot be synced.
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, IndexError> {
        Ok(self.db.open_tree(name)?)
    }
}

/// The data folder of a database folder (`<data_dir>/index`), as the admin configured it.
fn data_dir(index: &Path) -> &Path {
    index.parent().unwrap_or(index)
}

/// Whether another process holds sled's lock on the database in `dir` (sled reports that
/// only as text): `Some` with that process's id when `/proc/locks` names it.
fn lock_holder(dir: &Path) -> Option<Option<u32>> {
    use rustix::fs::{FlockOperation, flock, fstat};
    let file = std::fs::File::open(dir.join("db")).ok()?;
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {}
        _ => return None,
    }
    let stat = fstat(&file).ok()?;
    let device = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(stat.st_dev),
        rustix::fs::minor(stat.st_dev),
        stat.st_ino
    );
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let pid = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, dev, ..] if *dev == device => pid.parse().ok(),
            _ => None,
        }
    });
    Some(pid)
}

/// A record as stored.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

/// A stored record, or [`IndexError::Corrupt`] naming its key.
fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, IndexError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(key, &e))
}

/// Every record of `tree`, in key order.
fn decode_all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, IndexError> {
    tree.iter()
        .map(|entry| {
            let (key, bytes) = entry?;
            decode(&key, &bytes)
        })
        .collect()
}

fn corrupt(key: &[u8], reason: &dyn std::fmt::Display) -> IndexError {
    IndexError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

/// What a transaction's closure returns.
type TxResult<T> = Result<T, ConflictableTransactionError<IndexError>>;

/// [`decode`] inside a transaction: a corrupt record aborts it.
fn tx_decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> TxResult<T> {
    decode(key, bytes).map_err(ConflictableTransactionError::Abort)
}

/// A transaction's failure as one error: the abort reason, or sled's.
fn tx_error(err: TransactionError<IndexError>) -> IndexError {
    match err {
        TransactionError::Abort(err) => err,
        TransactionError::Storage(err) => IndexError::Sled(err),
    }
}

/// Opens a database again in a test after dropping it: sled's own threads let go of its
/// lock a moment after the last handle is dropped, so the open is retried for a while on
/// [`IndexError::InUse`] (a daemon opens its database once; only tests reopen it).
#[cfg(test)]
pub(crate) fn reopen<T>(open: impl Fn() -> Result<T, IndexError>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(IndexError::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}
