//! The batch index: which instances were received, in which batch, and where each batch
//! is in its life; the rules of batching applied in one transaction each, so an instance
//! is either fully recorded (instance, membership, batch counters) or not at all.
//!
//! Trees:
//! - `instances`: route NUL SOP Instance UID -> [`InstanceRecord`]
//! - `members`: batch id (8 bytes BE) ++ SOP Instance UID -> empty
//! - `batches`: batch id (8 bytes BE) -> [`BatchRecord`]
//! - `open`: route NUL grouping key -> batch id of the open batch
//! - `ready`: batch id (8 bytes BE) -> empty, stable batches not yet packed
//!
//! `open` and `ready` hold one entry per open or stable batch, so counting batches by
//! state ([`BatchIndex::counts`]) reads only those and one counter, never every record.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{
    IndexError, Store, TxResult, corrupt, decode, decode_all, encode, tx_decode, tx_error,
};
use crate::gateway::reception::batch::{
    BatchId, BatchRecord, BatchState, InstanceRecord, Joined, MAX_MISSING, Recorded, ReleaseError,
    StudySummary,
};
use crate::gateway::reception::route::{Route, Routes};

/// How many batches are in each state, for the gauges of `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Still receiving instances.
    pub open: u64,
    /// Quiet, waiting for the outbound pipeline.
    pub stable: u64,
    /// Taken by the outbound pipeline, and still recorded (until `spool.records_days`).
    pub sent: u64,
}

fn batch_key(id: BatchId) -> [u8; 8] {
    id.0.to_be_bytes()
}

fn batch_id(key: &[u8]) -> Option<BatchId> {
    Some(BatchId(u64::from_be_bytes(key.get(..8)?.try_into().ok()?)))
}

/// The index of instances and batches.
#[derive(Clone)]
pub struct BatchIndex {
    store: Store,
    /// Batches recorded, kept beside the trees so that counting them reads no record.
    recorded: Arc<AtomicU64>,
    instances: sled::Tree,
    members: sled::Tree,
    batches: sled::Tree,
    open: sled::Tree,
    ready: sled::Tree,
}

fn instance_key(route: &str, sop_instance_uid: &str) -> Vec<u8> {
    [route.as_bytes(), &[0], sop_instance_uid.as_bytes()].concat()
}

impl BatchIndex {
    /// Opens (or creates) the database in `dir` and its batch index.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the folder cannot be opened (another daemon holds it?).
    pub fn open(dir: &Path) -> Result<BatchIndex, IndexError> {
        let store = Store::open(dir)?;
        let batches = store.tree("batches")?;
        let recorded = Arc::new(AtomicU64::new(batches.len() as u64));
        Ok(BatchIndex {
            instances: store.tree("instances")?,
            members: store.tree("members")?,
            batches,
            open: store.tree("open")?,
            ready: store.tree("ready")?,
            recorded,
            store,
        })
    }

    /// The database, for the job stores that live beside the batches.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many batches are in each state; reads the open and ready queues (one entry
    /// per batch still in reception), never the records.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn counts(&self) -> Result<BatchCounts, IndexError> {
        let open = self.open.len() as u64;
        let stable = self.ready.len() as u64;
        let recorded = self.recorded.load(Ordering::Relaxed);
        Ok(BatchCounts {
            open,
            stable,
            sent: recorded.saturating_sub(open + stable),
        })
    }

    /// Forgets a sent batch for good (its record and any membership left), once its
    /// outbound job is done and older than the retention of records; true when it was
    /// recorded. A batch still in reception is never removed.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be changed.
    pub fn forget(&self, id: BatchId) -> Result<bool, IndexError> {
        for key in self.members.scan_prefix(batch_key(id)).keys() {
            self.members.remove(key?)?;
        }
        let removed = self
            .batches
            .transaction(|batches| {
                let Some(bytes) = batches.get(batch_key(id))? else {
                    return Ok(false);
                };
                let batch: BatchRecord = tx_decode(&batch_key(id), &bytes)?;
                if batch.state != BatchState::Sent {
                    return Ok(false);
                }
                batches.remove(&batch_key(id))?;
                Ok(true)
            })
            .map_err(tx_error)?;
        if removed {
            self.recorded.fetch_sub(1, Ordering::Relaxed);
        }
        self.flush()?;
        Ok(removed)
    }

    /// Takes a stable batch off the ready queue for the outbound pipeline, in one
    /// transaction; `None` when it is no longer waiting (reopened, or claimed).
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be changed.
    pub fn claim(&self, id: BatchId) -> Result<Option<BatchRecord>, IndexError> {
        let claimed = (&self.batches, &self.ready)
            .transaction(|(batches, ready)| {
                if ready.remove(&batch_key(id))?.is_none() {
                    return Ok(None);
                }
                let mut batch = load_batch(batches, id)?;
                batch.state = BatchState::Sent;
                batches.insert(&batch_key(id), encode(&batch))?;
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
                .remove([&batch_key(id)[..], uid.as_bytes()].concat())?;
        }
        self.flush()
    }

    /// Makes every recorded change durable (fsync); called before acknowledging.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the write-ahead log cannot be synced.
    pub fn flush(&self) -> Result<(), IndexError> {
        self.store.flush()
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
            .get(batch_key(id))?
            .map(|bytes| decode(&batch_key(id), &bytes))
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
        let fresh_id = BatchId(self.store.db.generate_id()? + 1);
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
                let fresh = || new_batch(fresh_id, route, group_key, record.received_at);
                let (mut batch, joined) = join(batches, open, ready, &open_key, waiting, fresh)?;
                batch.instances += 1;
                batch.missing.retain(|uid| uid != sop_instance_uid);
                save(batches, instances, &ikey, &mut batch, &record)?;
                let member = [&batch_key(batch.id)[..], sop_instance_uid.as_bytes()].concat();
                members.insert(member, &[])?;
                Ok(Recorded::Added {
                    batch: batch.id,
                    joined,
                })
            })
            .map_err(tx_error)
            .inspect(|recorded| {
                if let Recorded::Added {
                    joined: Joined::New,
                    ..
                } = recorded
                {
                    self.recorded.fetch_add(1, Ordering::Relaxed);
                }
            })
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
    /// The quiet period counts from the latest instance, but never from before
    /// `started_at` (when this daemon started): a batch that was open when the daemon
    /// stopped or was killed gets a full `stable_after` after the restart, so the PACS can
    /// resend what the stop interrupted. A held batch (see [`BatchRecord::held`]) waits
    /// for the sender's resend or `cloudpdi release`, however long it is quiet.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read or written.
    pub fn seal_quiet(
        &self,
        routes: &Routes,
        now: u64,
        started_at: u64,
    ) -> Result<Vec<BatchRecord>, IndexError> {
        let mut sealed = Vec::new();
        for entry in self.open.iter() {
            let (open_key, id) = entry?;
            let Some(id) = batch_id(&id) else {
                return Err(corrupt_id(&open_key));
            };
            let Some(batch) = self.batch(id)? else {
                continue;
            };
            if batch.held() {
                continue;
            }
            let since = batch.last_instance_at.max(started_at);
            let quiet_for = Duration::from_millis(now.saturating_sub(since));
            let stable_after = routes
                .by_name(&batch.route)
                .map_or(Duration::ZERO, |r| r.stable_after);
            if quiet_for >= stable_after {
                if let Some(record) = self.seal(&open_key, id, now, None)? {
                    sealed.push(record);
                }
            }
        }
        Ok(sealed)
    }

    /// Records that an instance was refused for a local reason (the sender will resend
    /// it), at `at`, because of `why`; the batch is held as possibly incomplete until the
    /// sender resends (see [`BatchRecord::held`]).
    ///
    /// With the instance known (`instance`: its grouping key and SOP Instance UID), its
    /// group's batch takes the refusal and lists the UID as missing: the open one, else
    /// the stable one still waiting for packing (opened again), else a new batch (empty
    /// until the resend). Without it (a large instance whose spill to disk failed before
    /// it could be read), every open batch of the route, and every stable one still
    /// waiting for packing (opened again), takes it unlisted: any of them may be the
    /// incomplete one. Returns the batches that took it.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be changed.
    pub fn record_refusal(
        &self,
        route: &Route,
        instance: Option<(&str, &str)>,
        at: u64,
        why: &str,
    ) -> Result<Vec<BatchId>, IndexError> {
        let why: String = why.chars().take(MAX_REFUSAL_TEXT).collect();
        let held = match instance {
            Some((key, uid)) => vec![self.refuse_group(route, key, Some(uid), at, &why)?],
            None => {
                let prefix = instance_key(&route.name, "");
                let mut held = Vec::new();
                for entry in self.open.scan_prefix(&prefix) {
                    let (open_key, id) = entry?;
                    let id = batch_id(&id).ok_or_else(|| corrupt_id(&open_key))?;
                    let refused = self
                        .batches
                        .transaction(|batches| {
                            let Some(bytes) = batches.get(batch_key(id))? else {
                                return Ok(false);
                            };
                            let mut batch: BatchRecord = tx_decode(&batch_key(id), &bytes)?;
                            if batch.state != BatchState::Open {
                                return Ok(false);
                            }
                            note_refusal(&mut batch, at, &why, None);
                            batches.insert(&batch_key(id), encode(&batch))?;
                            Ok(true)
                        })
                        .map_err(tx_error)?;
                    if refused {
                        held.push(id);
                    }
                }
                // A stable batch of the route still waiting for packing may be the
                // incomplete one too: opened again and held.
                for id in self.ready()? {
                    let waiting = self.batch(id)?.filter(|b| b.route == route.name);
                    if let Some(batch) = waiting {
                        held.push(self.refuse_group(route, &batch.key, None, at, &why)?);
                    }
                }
                held
            }
        };
        self.flush()?;
        Ok(held)
    }

    /// Holds the batch of one group for a refusal (see [`BatchIndex::record_refusal`]).
    fn refuse_group(
        &self,
        route: &Route,
        group_key: &str,
        uid: Option<&str>,
        at: u64,
        why: &str,
    ) -> Result<BatchId, IndexError> {
        let open_key = instance_key(&route.name, group_key);
        let fresh_id = BatchId(self.store.db.generate_id()? + 1);
        let waiting = self.waiting_batch(&route.name, group_key)?;
        let (id, new) = (&self.batches, &self.open, &self.ready)
            .transaction(|(batches, open, ready)| {
                let fresh = || new_batch(fresh_id, route, group_key, at);
                let (mut batch, joined) = join(batches, open, ready, &open_key, waiting, fresh)?;
                note_refusal(&mut batch, at, why, uid);
                batches.insert(&batch_key(batch.id), encode(&batch))?;
                Ok((batch.id, joined == Joined::New))
            })
            .map_err(tx_error)?;
        if new {
            self.recorded.fetch_add(1, Ordering::Relaxed);
        }
        Ok(id)
    }

    /// Releases a held batch for packing now (`cloudpdi release`): an admin knows the
    /// sender will not resend, or accepts the batch as it is. It becomes stable at once;
    /// a later refusal holds it again while it still waits for packing. A held batch
    /// that holds no instance (every one was refused) has nothing to send: it is
    /// forgotten, and the returned record says `instances: 0`.
    ///
    /// # Errors
    /// [`ReleaseError`] saying why the batch cannot be released.
    pub fn release(&self, id: BatchId, now: u64) -> Result<BatchRecord, ReleaseError> {
        let batch = self.batch(id)?.ok_or(ReleaseError::Unknown(id))?;
        if !batch.held() {
            return Err(ReleaseError::NotHeld(id, batch.state_name()));
        }
        let open_key = instance_key(&batch.route, &batch.key);
        if batch.instances == 0 {
            return self.discard(&open_key, batch);
        }
        let released = self
            .seal(&open_key, id, now, Some(now))?
            .ok_or(ReleaseError::NotHeld(id, "changing"))?;
        self.flush()?;
        Ok(released)
    }

    /// Forgets a held batch without instances (see [`BatchIndex::release`]), unless an
    /// instance arrived meanwhile.
    fn discard(&self, open_key: &[u8], batch: BatchRecord) -> Result<BatchRecord, ReleaseError> {
        let id = batch.id;
        let discarded = (&self.batches, &self.open)
            .transaction(|(batches, open)| {
                if open.get(open_key)?.as_deref() != Some(&batch_key(id)[..]) {
                    return Ok(false);
                }
                let current = load_batch(batches, id)?;
                if current.instances != 0 || !current.held() {
                    return Ok(false);
                }
                open.remove(open_key)?;
                batches.remove(&batch_key(id))?;
                Ok(true)
            })
            .map_err(tx_error)?;
        if !discarded {
            return Err(ReleaseError::NotHeld(id, "changing"));
        }
        self.recorded.fetch_sub(1, Ordering::Relaxed);
        self.flush()?;
        Ok(batch)
    }

    /// Closes an open batch at once, without the quiet period, when a storage commitment
    /// request of its sender covered every instance it holds (`committed`, the SOP
    /// Instance UIDs the gateway just committed to): the sender says the study is
    /// complete. A held batch, or one that received an instance the request did not
    /// cover (even while this runs), stays open and waits as usual. Returns the batch
    /// when it became stable.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read or written.
    pub fn close_committed(
        &self,
        id: BatchId,
        committed: &std::collections::HashSet<&str>,
        now: u64,
    ) -> Result<Option<BatchRecord>, IndexError> {
        let Some(batch) = self.batch(id)? else {
            return Ok(None);
        };
        if batch.state != BatchState::Open || batch.held() {
            return Ok(None);
        }
        let members = self.members(id)?;
        if members.is_empty() || !members.iter().all(|m| committed.contains(m.as_str())) {
            return Ok(None);
        }
        let open_key = instance_key(&batch.route, &batch.key);
        let closed = self.seal_counted(&open_key, id, now, None, Some(members.len() as u64))?;
        if closed.is_some() {
            self.flush()?;
        }
        Ok(closed)
    }

    /// Moves an open batch to the ready queue; `released` is the time of an admin's
    /// release, which must find the batch still held (a resend may have arrived).
    fn seal(
        &self,
        open_key: &[u8],
        id: BatchId,
        now: u64,
        released: Option<u64>,
    ) -> Result<Option<BatchRecord>, IndexError> {
        self.seal_counted(open_key, id, now, released, None)
    }

    /// [`BatchIndex::seal`], only if the batch still holds `instances` when given.
    fn seal_counted(
        &self,
        open_key: &[u8],
        id: BatchId,
        now: u64,
        released: Option<u64>,
        instances: Option<u64>,
    ) -> Result<Option<BatchRecord>, IndexError> {
        (&self.batches, &self.open, &self.ready)
            .transaction(|(batches, open, ready)| {
                // Re-read inside the transaction: an instance may have arrived meanwhile.
                if open.get(open_key)?.as_deref() != Some(&batch_key(id)[..]) {
                    return Ok(None);
                }
                let mut batch = load_batch(batches, id)?;
                // Re-checked here: a refusal may have arrived since the batch was read.
                if batch.state != BatchState::Open || batch.held() != released.is_some() {
                    return Ok(None);
                }
                if instances.is_some_and(|n| n != batch.instances) {
                    return Ok(None);
                }
                if released.is_some() {
                    batch.released_at = released;
                }
                batch.state = BatchState::Stable;
                batch.stable_at = Some(now);
                batches.insert(&batch_key(id), encode(&batch))?;
                open.remove(open_key)?;
                ready.insert(&batch_key(id), &[])?;
                Ok(Some(batch))
            })
            .map_err(tx_error)
    }

    /// Every batch, oldest first.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn batches(&self) -> Result<Vec<BatchRecord>, IndexError> {
        decode_all(&self.batches)
    }

    /// SOP Instance UIDs of a batch, in UID order.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn members(&self, id: BatchId) -> Result<Vec<String>, IndexError> {
        self.members
            .scan_prefix(batch_key(id))
            .map(|entry| {
                let (key, _) = entry?;
                Ok(String::from_utf8_lossy(&key[8..]).into_owned())
            })
            .collect()
    }

    /// Open batches held as possibly incomplete (refused instances not resent), for
    /// `/healthz` and the metrics; reads only the open queue's records.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn held(&self) -> Result<Vec<BatchRecord>, IndexError> {
        let mut held = Vec::new();
        for entry in self.open.iter() {
            let (open_key, id) = entry?;
            let id = batch_id(&id).ok_or_else(|| corrupt_id(&open_key))?;
            if let Some(batch) = self.batch(id)?.filter(BatchRecord::held) {
                held.push(batch);
            }
        }
        Ok(held)
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
                batch_id(&key).ok_or_else(|| corrupt_id(&key))
            })
            .collect()
    }
}

fn corrupt_id(key: &[u8]) -> IndexError {
    corrupt(key, &"batch id is not 8 bytes")
}

fn load_batch(batches: &TransactionalTree, id: BatchId) -> TxResult<BatchRecord> {
    let bytes = batches
        .get(batch_key(id))?
        .ok_or_else(|| ConflictableTransactionError::Abort(corrupt_id(&batch_key(id))))?;
    tx_decode(&batch_key(id), &bytes)
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
    batch.study.add(record);
    batches.insert(&batch_key(batch.id), encode(batch))?;
    let record = InstanceRecord {
        batch: batch.id,
        ..record.clone()
    };
    instances.insert(instance_key, encode(&record))?;
    Ok(())
}

/// The candidate batch, if it is still queued for packing inside this transaction.
/// The batch of group `open_key` that an instance or a refusal joins, inside a
/// transaction: the open one, else the stable one still waiting for packing (open again,
/// so an interrupted and resent study travels as one), else `fresh()`, opened now.
fn join(
    batches: &TransactionalTree,
    open: &TransactionalTree,
    ready: &TransactionalTree,
    open_key: &[u8],
    waiting: Option<BatchId>,
    fresh: impl FnOnce() -> BatchRecord,
) -> TxResult<(BatchRecord, Joined)> {
    if let Some(id) = open.get(open_key)? {
        let id = batch_id(&id)
            .ok_or_else(|| ConflictableTransactionError::Abort(corrupt_id(open_key)))?;
        return Ok((load_batch(batches, id)?, Joined::Open));
    }
    if let Some(id) = still_waiting(ready, waiting)? {
        ready.remove(&batch_key(id))?;
        open.insert(open_key, &batch_key(id))?;
        let mut batch = load_batch(batches, id)?;
        batch.state = BatchState::Open;
        batch.stable_at = None;
        return Ok((batch, Joined::Reopened));
    }
    let batch = fresh();
    open.insert(open_key, &batch_key(batch.id))?;
    Ok((batch, Joined::New))
}

fn still_waiting(
    ready: &TransactionalTree,
    candidate: Option<BatchId>,
) -> TxResult<Option<BatchId>> {
    match candidate {
        Some(id) if ready.get(batch_key(id))?.is_some() => Ok(Some(id)),
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
        refused: 0,
        last_refused_at: None,
        refusal: None,
        released_at: None,
        missing: Vec::new(),
        missing_unlisted: false,
        study: StudySummary::default(),
    }
}

/// Counts one refused instance on `batch`.
/// Notes a refusal of instance `uid` (if known) on `batch`.
fn note_refusal(batch: &mut BatchRecord, at: u64, why: &str, uid: Option<&str>) {
    match uid {
        Some(uid) if batch.missing.iter().any(|m| m == uid) => {}
        Some(uid) if batch.missing.len() < MAX_MISSING => batch.missing.push(uid.to_owned()),
        _ => batch.missing_unlisted = true,
    }
    batch.refused = batch.refused.saturating_add(1);
    batch.last_refused_at = Some(at);
    batch.refusal = Some(why.to_owned());
}

/// Longest refusal reason kept on a batch (characters); the reasons are the gateway's
/// own messages, cut so that a long I/O error cannot bloat every batch record.
pub const MAX_REFUSAL_TEXT: usize = 240;

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
            patient_id: "P1".into(),
            accession: "A1".into(),
            study_date: "20261129".into(),
            modality: "CT".into(),
            hash: None,
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
        assert_eq!(
            index.counts().expect("counts"),
            BatchCounts {
                open: 2,
                stable: 0,
                sent: 0
            }
        );
        assert_eq!(index.members(batch).expect("members"), ["1.1", "1.2"]);

        assert!(
            index
                .seal_quiet(&routes, 12_999, 0)
                .expect("seal")
                .is_empty()
        );
        let sealed = index.seal_quiet(&routes, 13_000, 0).expect("seal");
        assert_eq!(sealed.len(), 2);
        assert_eq!(
            index.counts().expect("counts"),
            BatchCounts {
                open: 0,
                stable: 2,
                sent: 0
            }
        );
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
        assert_eq!(
            index.counts().expect("counts"),
            BatchCounts {
                open: 1,
                stable: 1,
                sent: 0
            }
        );

        // Once claimed by the outbound pipeline, the study starts a new batch.
        assert_eq!(index.seal_quiet(&routes, 30_000, 0).expect("seal").len(), 1);
        index.claim(batch).expect("claim").expect("claimed");
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
        assert_eq!(
            index.counts().expect("counts"),
            BatchCounts {
                open: 1,
                stable: 1,
                sent: 1
            }
        );
        // The counter of recorded batches survives a reopen.
        drop(index);
        let index = crate::gateway::store::reopen(|| BatchIndex::open(dir.path()));
        assert_eq!(
            index.counts().expect("counts"),
            BatchCounts {
                open: 1,
                stable: 1,
                sent: 1
            }
        );
    }

    #[test]
    fn refusals_hold_a_batch_until_a_resend_or_a_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = BatchIndex::open(dir.path()).expect("open");
        let routes = routes();
        let route = routes.by_name("ct").expect("route");
        let Recorded::Added { batch, .. } = index
            .record(route, "study-1", "1.1", record(100, 1_000))
            .expect("record")
        else {
            panic!("first instance opens a batch");
        };
        let held = index
            .record_refusal(route, Some(("study-1", "1.9")), 2_000, "out of disk space")
            .expect("refusal");
        assert_eq!(held, [batch]);
        let b = index.batch(batch).expect("read").expect("exists");
        assert!(b.held() && b.state_name() == "held", "{b:?}");
        assert_eq!((b.refused, b.last_refused_at), (1, Some(2_000)));
        // Quiet for far longer than stable_after: still held.
        assert!(
            index
                .seal_quiet(&routes, 100_000, 0)
                .expect("seal")
                .is_empty()
        );
        // Neither a resend of a stored instance nor another instance ends the hold: the
        // refused one is missing until it arrives.
        index
            .record(route, "study-1", "1.1", record(100, 105_000))
            .expect("resend of a stored instance");
        index
            .record(route, "study-1", "1.2", record(100, 106_000))
            .expect("another instance");
        let b = index.batch(batch).expect("read").expect("exists");
        assert!(b.held() && b.missing == ["1.9"], "{b:?}");
        // The resend clears the hold; stable only after a full quiet period from it.
        index
            .record(route, "study-1", "1.9", record(100, 110_000))
            .expect("resend");
        assert!(!index.batch(batch).expect("read").expect("exists").held());
        assert!(
            index
                .seal_quiet(&routes, 119_999, 0)
                .expect("seal")
                .is_empty()
        );
        assert_eq!(
            index.seal_quiet(&routes, 120_000, 0).expect("seal").len(),
            1
        );

        // A refusal for a study without a batch opens an empty held one, which cannot
        // be released (nothing to send); a refusal of unknown study holds open batches.
        let empty = index
            .record_refusal(
                route,
                Some(("study-2", "2.1")),
                130_000,
                &"x".repeat(10_000),
            )
            .expect("refusal")[0];
        let reason = index.batch(empty).expect("read").expect("exists").refusal;
        assert_eq!(reason.map(|r| r.len()), Some(MAX_REFUSAL_TEXT));
        let forgotten = index
            .record_refusal(route, Some(("study-4", "4.1")), 130_000, "full")
            .expect("refusal")[0];
        assert_eq!(
            index
                .release(forgotten, 130_500)
                .expect("release")
                .instances,
            0
        );
        assert_eq!(index.batch(forgotten).expect("read"), None);
        index
            .record(route, "study-3", "3.1", record(1, 130_000))
            .expect("record");
        let held = index
            .record_refusal(route, None, 131_000, "spill failed")
            .expect("refusal");
        assert_eq!(
            held.len(),
            3,
            "both open batches of the route and the stable one waiting: {held:?}"
        );
        assert!(
            held.contains(&batch),
            "the waiting batch is opened and held"
        );
        let study3 = held
            .into_iter()
            .find(|id| *id != empty && *id != batch)
            .expect("study-3");
        index.release(batch, 131_500).expect("release");
        assert!(matches!(
            index.release(batch, 132_000),
            Err(ReleaseError::NotHeld(_, "stable"))
        ));
        let released = index.release(study3, 132_000).expect("release");
        assert_eq!(
            (released.state, released.released_at),
            (BatchState::Stable, Some(132_000))
        );
        // A refusal while it waits for packing opens and holds it again.
        index
            .record_refusal(route, Some(("study-3", "3.2")), 133_000, "full")
            .expect("refusal");
        assert!(index.batch(study3).expect("read").expect("exists").held());
    }

    #[test]
    fn the_quiet_period_restarts_with_the_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = BatchIndex::open(dir.path()).expect("open");
        let routes = routes();
        let route = routes.by_name("ct").expect("route");
        index
            .record(route, "study-1", "1.1", record(100, 1_000))
            .expect("record");
        // Started at 50 000, long after the last instance: not before 60 000.
        assert!(
            index
                .seal_quiet(&routes, 50_002, 50_000)
                .expect("seal")
                .is_empty()
        );
        assert!(
            index
                .seal_quiet(&routes, 59_999, 50_000)
                .expect("seal")
                .is_empty()
        );
        assert_eq!(
            index
                .seal_quiet(&routes, 60_000, 50_000)
                .expect("seal")
                .len(),
            1
        );
    }
}
