//! The daemon's database: the one module that knows it is sled.
//!
//! One sled database in `<data_dir>/index/` holds the batches of received instances
//! ([`BatchIndex`]) and the job records of both pipelines ([`JobStore`]). Everything else
//! sees typed records and methods and one error type, [`IndexError`]: opening the database,
//! its trees, the JSON encoding of records, transactions and their errors, and the flush
//! that makes a change durable before it is acknowledged all live here.
//!
//! Records are JSON, so that a newer version can add a field with a default. Changes that
//! must hold together (an instance and its batch's counters; a job record and its place in
//! the index of active jobs) are made in one transaction.

mod batches;
mod jobs;

pub use batches::{BatchCounts, BatchIndex};
pub use jobs::JobStore;

use std::path::Path;

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
    /// [`IndexError::Sled`] when the folder cannot be opened (another daemon holds it?).
    pub fn open(dir: &Path) -> Result<Store, IndexError> {
        Ok(Store {
            db: sled::Config::new().path(dir).open()?,
        })
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

/// A record as stored.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

/// A stored record, or [`IndexError::Corrupt`] naming its key.
fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, IndexError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(key, &e))
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
