//! Batches: the instances of one study (or one patient) received on one route, which
//! travel together as one PDI container.
//!
//! The index lives in sled and is changed only in transactions, so an instance is either
//! fully recorded (instance, membership, batch counters) or not at all. A batch is *open*
//! while instances arrive and becomes *stable* after the route's quiet period; stable
//! batches are queued in the `ready` tree for the outbound pipeline.
//!
//! Trees:
//! - `instances`: route NUL SOP Instance UID -> [`InstanceRecord`]
//! - `members`: batch id (8 bytes BE) ++ SOP Instance UID -> empty
//! - `batches`: batch id (8 bytes BE) -> [`BatchRecord`]
//! - `open`: route NUL grouping key -> batch id of the open batch
//! - `ready`: batch id (8 bytes BE) -> empty, stable batches not yet packed

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use crate::config::BatchBy;
use crate::gateway::reception::route::{Route, Routes};

/// Why the batch index cannot be read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// sled reported an error (disk full, I/O error, corruption).
    #[error("job index (sled) failed: {0}; check the disk holding the data folder")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded: the index was written by an incompatible version.
    #[error(
        "job index record {key} is unreadable ({source}); was the data folder written by another version?"
    )]
    Corrupt {
        /// The record's key, printable.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
}

/// A batch identifier, unique within one data folder; shown as `B000042`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchId(pub u64);

impl BatchId {
    fn key(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    fn from_key(key: &[u8]) -> Option<BatchId> {
        Some(BatchId(u64::from_be_bytes(key.get(..8)?.try_into().ok()?)))
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "B{:06}", self.0)
    }
}

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    /// Instances are still arriving.
    Open,
    /// Quiet for the route's `stable_after`: ready for packing.
    Stable,
    /// Taken by the outbound pipeline (its job says how far it got); late instances of
    /// the study start a new batch.
    Sent,
}

/// What the index knows about a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// The batch's identifier.
    pub id: BatchId,
    /// The route's name.
    pub route: String,
    /// What groups the batch: Study Instance UID, or Patient ID for patient routes.
    pub key: String,
    /// Whether `key` is a study or a patient.
    pub batch_by: BatchBy,
    /// Open or stable.
    pub state: BatchState,
    /// Distinct instances in the batch.
    pub instances: u64,
    /// Sum of the stored file sizes.
    pub bytes: u64,
    /// When the first instance arrived (Unix milliseconds).
    pub opened_at: u64,
    /// When the latest instance arrived (Unix milliseconds).
    pub last_instance_at: u64,
    /// When the batch became stable (Unix milliseconds).
    pub stable_at: Option<u64>,
}

/// What the index knows about one stored instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The batch holding it.
    pub batch: BatchId,
    /// File path relative to the spool folder.
    pub file: String,
    /// File size in bytes (meta header included).
    pub size: u64,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// Transfer syntax as received.
    pub transfer_syntax: String,
    /// The sender's AE title.
    pub calling_ae: String,
    /// Arrival time (Unix milliseconds).
    pub received_at: u64,
}

/// What recording an instance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new instance in `batch`.
    Added {
        /// The batch it joined.
        batch: BatchId,
        /// How the batch came to be open for it.
        joined: Joined,
    },
    /// The instance was already in this open batch; the file was replaced.
    Replaced(BatchId),
}

/// How an instance found its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The group's batch was open.
    Open,
    /// No batch was open or waiting: this instance started one.
    New,
    /// The group's batch was stable but not yet packed: it is open again, so a study
    /// interrupted (e.g. by a gateway restart) and resent still travels as one.
    Reopened,
}

/// The sled-backed index of instances and batches.
#[derive(Clone)]
pub struct BatchIndex {
    db: sled::Db,
    instances: sled::Tree,
    members: sled::Tree,
    batches: sled::Tree,
    open: sled::Tree,
    ready: sled::Tree,
}

fn instance_key(route: &str, sop_instance_uid: &str) -> Vec<u8> {
    [route.as_bytes(), &[0], sop_instance_uid.as_bytes()].concat()
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, IndexError> {
    serde_json::from_slice(bytes).map_err(|source| IndexError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("index records serialize to JSON")
}

type TxResult<T> = Result<T, ConflictableTransactionError<IndexError>>;

fn tx_decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> TxResult<T> {
    decode(key, bytes).map_err(ConflictableTransactionError::Abort)
}

fn tx_error(err: TransactionError<IndexError>) -> IndexError {
    match err {
        TransactionError::Abort(err) => err,
        TransactionError::Storage(err) => IndexError::Sled(err),
    }
}

impl BatchIndex {
    /// Opens (or creates) the index in `dir`.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the folder cannot be opened (another daemon holds it?).
    pub fn open(dir: &std::path::Path) -> Result<BatchIndex, IndexError> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(BatchIndex {
            instances: db.open_tree("instances")?,
            members: db.open_tree("members")?,
            batches: db.open_tree("batches")?,
            open: db.open_tree("open")?,
            ready: db.open_tree("ready")?,
            db,
        })
    }

    /// The database, for the job stores that live beside the batches.
    pub fn database(&self) -> &sled::Db {
        &self.db
    }

    /// Takes a stable batch off the ready queue for the outbound pipeline, in one
    /// transaction; `None` when it is no longer waiting (reopened, or claimed).
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be changed.
    pub fn claim(&self, id: BatchId) -> Result<Option<BatchRecord>, IndexError> {
        let claimed = (&self.batches, &self.ready)
            .transaction(|(batches, ready)| {
                if ready.remove(&id.key())?.is_none() {
                    return Ok(None);
                }
                let mut batch = load_batch(batches, id)?;
                batch.state = BatchState::Sent;
                batches.insert(&id.key(), encode(&batch))?;
                Ok(Some(batch))
            })
            .map_err(tx_error)?;
        self.flush()?;
        Ok(claimed)
    }

    /// Batches taken by the outbound pipeline.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn claimed(&self) -> Result<Vec<BatchRecord>, IndexError> {
        Ok(self
            .batches()?
            .into_iter()
            .filter(|b| b.state == BatchState::Sent)
            .collect())
    }

    /// The instance records of a batch, in UID order.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn member_records(&self, id: BatchId) -> Result<Vec<(String, InstanceRecord)>, IndexError> {
        let Some(batch) = self.batch(id)? else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        for uid in self.members(id)? {
            if let Some(record) = self.instance(&batch.route, &uid)? {
                records.push((uid, record));
            }
        }
        Ok(records)
    }

    /// Forgets a sent batch's instances (their files are already removed), so that a
    /// later resend of the same instances starts a new batch.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be changed.
    pub fn forget_members(&self, id: BatchId) -> Result<(), IndexError> {
        let Some(batch) = self.batch(id)? else {
            return Ok(());
        };
        for uid in self.members(id)? {
            let ikey = instance_key(&batch.route, &uid);
            let owned = match self.instances.get(&ikey)? {
                Some(bytes) => decode::<InstanceRecord>(&ikey, &bytes)?.batch == id,
                None => false,
            };
            if owned {
                self.instances.remove(ikey)?;
            }
            self.members
                .remove([&id.key()[..], uid.as_bytes()].concat())?;
        }
        self.flush()
    }

    /// Makes every recorded change durable (fsync); called before acknowledging.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the write-ahead log cannot be synced.
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }

    /// The record of an instance already received on `route`, if any.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn instance(
        &self,
        route: &str,
        sop_instance_uid: &str,
    ) -> Result<Option<InstanceRecord>, IndexError> {
        let key = instance_key(route, sop_instance_uid);
        self.instances
            .get(&key)?
            .map(|bytes| decode(&key, &bytes))
            .transpose()
    }

    /// The state of a batch.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn batch(&self, id: BatchId) -> Result<Option<BatchRecord>, IndexError> {
        self.batches
            .get(id.key())?
            .map(|bytes| decode(&id.key(), &bytes))
            .transpose()
    }

    /// Records a durably stored instance in its batch, in one transaction.
    ///
    /// `group_key` is the Study Instance UID or Patient ID, as the route groups.
    ///
    /// # Errors
    /// [`IndexError`] when the transaction cannot be written.
    pub fn record(
        &self,
        route: &Route,
        group_key: &str,
        sop_instance_uid: &str,
        record: InstanceRecord,
    ) -> Result<Recorded, IndexError> {
        let open_key = instance_key(&route.name, group_key);
        // Used only if the transaction opens a batch; an unused id is simply skipped.
        let fresh_id = BatchId(self.db.generate_id()? + 1);
        let waiting = self.waiting_batch(&route.name, group_key)?;
        let ikey = instance_key(&route.name, sop_instance_uid);
        (
            &self.instances,
            &self.members,
            &self.batches,
            &self.open,
            &self.ready,
        )
            .transaction(|(instances, members, batches, open, ready)| {
                if let Some(previous) = instances.get(&ikey)? {
                    let previous: InstanceRecord = tx_decode(&ikey, &previous)?;
                    let mut batch = load_batch(batches, previous.batch)?;
                    if batch.state == BatchState::Open {
                        batch.bytes -= previous.size.min(batch.bytes);
                        save(batches, instances, &ikey, &mut batch, &record)?;
                    }
                    return Ok(Recorded::Replaced(previous.batch));
                }
                let (mut batch, joined) = match open.get(&open_key)? {
                    Some(id) => {
                        let id = BatchId::from_key(&id).ok_or_else(|| {
                            ConflictableTransactionError::Abort(corrupt_id(&open_key))
                        })?;
                        (load_batch(batches, id)?, Joined::Open)
                    }
                    None => match still_waiting(ready, waiting)? {
                        Some(id) => {
                            ready.remove(&id.key())?;
                            open.insert(open_key.as_slice(), &id.key())?;
                            let mut batch = load_batch(batches, id)?;
                            batch.state = BatchState::Open;
                            batch.stable_at = None;
                            (batch, Joined::Reopened)
                        }
                        None => {
                            open.insert(open_key.as_slice(), &fresh_id.key())?;
                            let batch = new_batch(fresh_id, route, group_key, record.received_at);
                            (batch, Joined::New)
                        }
                    },
                };
                batch.instances += 1;
                save(batches, instances, &ikey, &mut batch, &record)?;
                let member = [&batch.id.key()[..], sop_instance_uid.as_bytes()].concat();
                members.insert(member, &[])?;
                Ok(Recorded::Added {
                    batch: batch.id,
                    joined,
                })
            })
            .map_err(tx_error)
    }

    /// A stable batch of this route and group still waiting for packing, if any.
    fn waiting_batch(&self, route: &str, group_key: &str) -> Result<Option<BatchId>, IndexError> {
        for id in self.ready()? {
            if let Some(batch) = self.batch(id)? {
                if batch.route == route && batch.key == group_key {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    /// Marks every open batch quiet for its route's `stable_after` as stable and queues it
    /// for packing. Returns the batches that became stable.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read or written.
    pub fn seal_quiet(&self, routes: &Routes, now: u64) -> Result<Vec<BatchRecord>, IndexError> {
        let mut sealed = Vec::new();
        for entry in self.open.iter() {
            let (open_key, id) = entry?;
            let Some(id) = BatchId::from_key(&id) else {
                return Err(corrupt_id(&open_key));
            };
            let Some(batch) = self.batch(id)? else {
                continue;
            };
            let quiet_for = Duration::from_millis(now.saturating_sub(batch.last_instance_at));
            let stable_after = routes
                .by_name(&batch.route)
                .map_or(Duration::ZERO, |r| r.stable_after);
            if quiet_for >= stable_after {
                if let Some(record) = self.seal(&open_key, id, now)? {
                    sealed.push(record);
                }
            }
        }
        Ok(sealed)
    }

    fn seal(
        &self,
        open_key: &[u8],
        id: BatchId,
        now: u64,
    ) -> Result<Option<BatchRecord>, IndexError> {
        (&self.batches, &self.open, &self.ready)
            .transaction(|(batches, open, ready)| {
                // Re-read inside the transaction: an instance may have arrived meanwhile.
                if open.get(open_key)?.as_deref() != Some(&id.key()[..]) {
                    return Ok(None);
                }
                let mut batch = load_batch(batches, id)?;
                if batch.state != BatchState::Open {
                    return Ok(None);
                }
                batch.state = BatchState::Stable;
                batch.stable_at = Some(now);
                batches.insert(&id.key(), encode(&batch))?;
                open.remove(open_key)?;
                ready.insert(&id.key(), &[])?;
                Ok(Some(batch))
            })
            .map_err(tx_error)
    }

    /// Every batch, oldest first.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn batches(&self) -> Result<Vec<BatchRecord>, IndexError> {
        self.batches
            .iter()
            .map(|entry| {
                let (key, bytes) = entry?;
                decode(&key, &bytes)
            })
            .collect()
    }

    /// SOP Instance UIDs of a batch, in UID order.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn members(&self, id: BatchId) -> Result<Vec<String>, IndexError> {
        self.members
            .scan_prefix(id.key())
            .map(|entry| {
                let (key, _) = entry?;
                Ok(String::from_utf8_lossy(&key[8..]).into_owned())
            })
            .collect()
    }

    /// Stable batches waiting for the outbound pipeline.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn ready(&self) -> Result<Vec<BatchId>, IndexError> {
        self.ready
            .iter()
            .keys()
            .map(|key| {
                let key = key?;
                BatchId::from_key(&key).ok_or_else(|| corrupt_id(&key))
            })
            .collect()
    }
}

fn corrupt_id(key: &[u8]) -> IndexError {
    IndexError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source: serde::de::Error::custom("batch id is not 8 bytes"),
    }
}

fn load_batch(batches: &TransactionalTree, id: BatchId) -> TxResult<BatchRecord> {
    let bytes = batches
        .get(id.key())?
        .ok_or_else(|| ConflictableTransactionError::Abort(corrupt_id(&id.key())))?;
    tx_decode(&id.key(), &bytes)
}

/// Adds the instance's size and time to its batch and writes both records.
fn save(
    batches: &TransactionalTree,
    instances: &TransactionalTree,
    instance_key: &[u8],
    batch: &mut BatchRecord,
    record: &InstanceRecord,
) -> TxResult<()> {
    batch.bytes += record.size;
    batch.last_instance_at = record.received_at;
    batches.insert(&batch.id.key(), encode(batch))?;
    let record = InstanceRecord {
        batch: batch.id,
        ..record.clone()
    };
    instances.insert(instance_key, encode(&record))?;
    Ok(())
}

/// The candidate batch, if it is still queued for packing inside this transaction.
fn still_waiting(
    ready: &TransactionalTree,
    candidate: Option<BatchId>,
) -> TxResult<Option<BatchId>> {
    match candidate {
        Some(id) if ready.get(id.key())?.is_some() => Ok(Some(id)),
        _ => Ok(None),
    }
}

fn new_batch(id: BatchId, route: &Route, group_key: &str, now: u64) -> BatchRecord {
    BatchRecord {
        id,
        route: route.name.clone(),
        key: group_key.to_owned(),
        batch_by: route.batch_by,
        state: BatchState::Open,
        instances: 0,
        bytes: 0,
        opened_at: now,
        last_instance_at: now,
        stable_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use std::collections::BTreeMap;

    fn routes() -> Routes {
        let mut config = BTreeMap::new();
        config.insert(
            "ct".to_owned(),
            RouteConfig {
                ae_title: "CLOUDPDI".into(),
                stable_after: 10,
                ..RouteConfig::default()
            },
        );
        Routes::new(&config)
    }

    fn record(size: u64, at: u64) -> InstanceRecord {
        InstanceRecord {
            batch: BatchId(0),
            file: "f".into(),
            size,
            sop_class_uid: "1.2".into(),
            study_uid: "1.2.3".into(),
            series_uid: "1.2.3.4".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            calling_ae: "PACS".into(),
            received_at: at,
        }
    }

    #[test]
    fn instances_group_resends_count_once_and_quiet_batches_seal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = BatchIndex::open(dir.path()).expect("open");
        let routes = routes();
        let route = routes.by_name("ct").expect("route");
        let first = index
            .record(route, "study-1", "1.1", record(100, 1_000))
            .expect("record");
        let Recorded::Added {
            batch,
            joined: Joined::New,
        } = first
        else {
            panic!("first instance opens a batch: {first:?}");
        };
        assert_eq!(
            index
                .record(route, "study-1", "1.2", record(50, 2_000))
                .expect("second"),
            Recorded::Added {
                batch,
                joined: Joined::Open
            }
        );
        assert_eq!(
            index
                .record(route, "study-1", "1.1", record(120, 3_000))
                .expect("resend"),
            Recorded::Replaced(batch)
        );
        let other = index
            .record(route, "study-2", "2.1", record(10, 3_000))
            .expect("other");
        assert!(matches!(
            other,
            Recorded::Added {
                joined: Joined::New,
                ..
            }
        ));

        let b = index.batch(batch).expect("read").expect("exists");
        assert_eq!((b.instances, b.bytes, b.state), (2, 170, BatchState::Open));
        assert_eq!(index.members(batch).expect("members"), ["1.1", "1.2"]);

        assert!(index.seal_quiet(&routes, 12_999).expect("seal").is_empty());
        let sealed = index.seal_quiet(&routes, 13_000).expect("seal");
        assert_eq!(sealed.len(), 2);
        assert_eq!(index.ready().expect("ready").len(), 2);

        // A late instance reopens its stable batch while it waits for packing.
        let later = index
            .record(route, "study-1", "1.3", record(1, 20_000))
            .expect("later");
        assert_eq!(
            later,
            Recorded::Added {
                batch,
                joined: Joined::Reopened
            }
        );
        let b = index.batch(batch).expect("read").expect("exists");
        assert_eq!(
            (b.instances, b.state, b.stable_at),
            (3, BatchState::Open, None)
        );
        assert_eq!(index.ready().expect("ready").len(), 1);

        // Once packed (taken off the ready queue), the study starts a new batch.
        assert_eq!(index.seal_quiet(&routes, 30_000).expect("seal").len(), 1);
        index.ready.remove(batch.key()).expect("take");
        let newer = index
            .record(route, "study-1", "1.4", record(1, 40_000))
            .expect("newer");
        assert!(matches!(
            newer,
            Recorded::Added {
                joined: Joined::New,
                ..
            }
        ));
    }
}
