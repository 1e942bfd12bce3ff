//! Refusals of the mailbox: one record per key, each write flushed before it returns. What
//! a record says, and its key, are the mailbox's
//! ([`crate::gateway::inbound::mailbox::Refusal`]): a record per sender this facility's
//! configuration names, one shared by all others
//! ([`crate::gateway::inbound::mailbox::OTHER_SENDERS`]), so the tree stays as small as the
//! configuration, however many messages or senders a repository shows.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{IndexError, Store, decode, decode_all, encode};

/// The tree of refusal records.
#[derive(Clone)]
pub struct RefusalStore {
    store: Store,
    tree: sled::Tree,
}

impl RefusalStore {
    /// Opens the tree `name` in the daemon's database.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the tree cannot be opened.
    pub fn open(store: &Store, name: &str) -> Result<RefusalStore, IndexError> {
        Ok(RefusalStore {
            store: store.clone(),
            tree: store.tree(name)?,
        })
    }

    /// The record under `sender`, if any.
    ///
    /// # Errors
    /// [`IndexError`] when it cannot be read.
    pub fn get<T: DeserializeOwned>(&self, sender: &str) -> Result<Option<T>, IndexError> {
        self.tree
            .get(sender.as_bytes())?
            .map(|bytes| decode(sender.as_bytes(), &bytes))
            .transpose()
    }

    /// Writes the record under `sender` durably (flushed before returning).
    ///
    /// # Errors
    /// [`IndexError`] when it cannot be written or flushed.
    pub fn put<T: Serialize>(&self, sender: &str, record: &T) -> Result<(), IndexError> {
        self.tree.insert(sender.as_bytes(), encode(record))?;
        self.store.flush()
    }

    /// Every record, by sender code.
    ///
    /// # Errors
    /// [`IndexError`] when a record cannot be read.
    pub fn all<T: DeserializeOwned>(&self) -> Result<Vec<T>, IndexError> {
        decode_all(&self.tree)
    }
}
