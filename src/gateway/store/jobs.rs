//! Job records of one pipeline: one tree keyed by job id, beside an index of the jobs
//! that still need the pipeline, each write flushed before it returns.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;
use sled::Transactional;
use tokio::sync::Notify;

use super::{IndexError, Store, decode, decode_all, encode, tx_error};
use crate::gateway::jobs::{JobRecord, state_name};

/// A tree of job records of one kind, keyed by job id, beside an index of the jobs
/// that still need the pipeline (`<name>.active`): the due-scan twice a second reads
/// those, not the years of finished jobs. The number of jobs in each state is kept in
/// memory as records are written, so a metrics scrape does not decode every record.
#[derive(Clone)]
pub struct JobStore {
    store: Store,
    tree: sled::Tree,
    active: sled::Tree,
    states: Arc<Mutex<BTreeMap<String, u64>>>,
    bell: Arc<Notify>,
}

impl JobStore {
    /// Opens the tree `name` and its index of active jobs in the daemon's database.
    ///
    /// # Errors
    /// [`IndexError::Sled`] when the trees cannot be opened.
    pub fn open(store: &Store, name: &str) -> Result<JobStore, IndexError> {
        Ok(JobStore {
            store: store.clone(),
            tree: store.tree(name)?,
            active: store.tree(&format!("{name}.active"))?,
            states: Arc::default(),
            bell: Arc::default(),
        })
    }

    /// Rung whenever a job that needs the pipeline is written (and by whoever makes work
    /// for it, e.g. a batch turning stable), so the pipeline's scan runs at once instead
    /// of at its next tick: a token dropped in the watch folder starts downloading within
    /// milliseconds, not half a second later.
    pub fn bell(&self) -> Arc<Notify> {
        self.bell.clone()
    }

    /// Jobs by state (the step's name, `done`, `failed`), as counted since
    /// [`JobStore::reindex`] (run at start) from every record written or removed.
    pub fn state_counts(&self) -> BTreeMap<String, u64> {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Moves one job from the state of `old` (the record replaced or removed, if any) to
    /// `new` (the record written, if any) in the counts.
    fn count<T: JobRecord>(&self, id: &[u8], old: Option<&[u8]>, new: Option<&T>) {
        let old = old.and_then(|bytes| decode::<T>(id, bytes).ok());
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = old {
            let state = state_name(old.step());
            if let Some(n) = states.get_mut(&state) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    states.remove(&state);
                }
            }
        }
        if let Some(new) = new {
            *states.entry(state_name(new.step())).or_default() += 1;
        }
    }

    /// Rebuilds the index of active jobs and the counts by state from the records. Run
    /// once at start: a store written before the index existed gets one, and any drift is
    /// repaired by one scan.
    ///
    /// # Errors
    /// [`IndexError`] when a record cannot be read or the index written.
    pub fn reindex<T: JobRecord + DeserializeOwned>(&self) -> Result<(), IndexError> {
        self.active.clear()?;
        let mut states = BTreeMap::<String, u64>::new();
        for job in self.all::<T>()? {
            *states.entry(state_name(job.step())).or_default() += 1;
            if job.needs_pipeline() {
                self.active.insert(job.id().as_bytes(), &[])?;
            }
        }
        *self.states.lock().unwrap_or_else(PoisonError::into_inner) = states;
        self.store.flush()?;
        Ok(())
    }

    /// The job `id`, if recorded.
    ///
    /// # Errors
    /// [`IndexError`] when the record cannot be read.
    pub fn get<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>, IndexError> {
        self.tree
            .get(id.as_bytes())?
            .map(|bytes| decode(id.as_bytes(), &bytes))
            .transpose()
    }

    /// Writes `job` durably (flushed before returning), with its place in the index. What
    /// the stored record holds that no writer may undo ([`JobRecord::keep_from`]) is kept,
    /// in the same transaction: a worker or a sweep that read the record before an admin
    /// changed it does not write the old value back.
    ///
    /// # Errors
    /// [`IndexError`] when the record cannot be written or flushed.
    pub fn put<T: JobRecord>(&self, job: &T) -> Result<(), IndexError> {
        self.write(job, false)?;
        Ok(())
    }

    /// Inserts `job` unless one with its id exists; true when this call created it.
    ///
    /// # Errors
    /// [`IndexError`] when the record cannot be written or flushed.
    pub fn create<T: JobRecord>(&self, job: &T) -> Result<bool, IndexError> {
        self.write(job, true)
    }

    fn write<T: JobRecord>(&self, job: &T, only_new: bool) -> Result<bool, IndexError> {
        let id = job.id().as_bytes();
        let written = (&self.tree, &self.active)
            .transaction(|(tree, index)| {
                let stored = tree.get(id)?;
                if only_new && stored.is_some() {
                    return Ok(None);
                }
                let mut job = job.clone();
                if let Some(stored) = stored.as_deref().and_then(|b| decode::<T>(id, b).ok()) {
                    job.keep_from(&stored);
                }
                let old = tree.insert(id, encode(&job))?;
                if job.needs_pipeline() {
                    index.insert(id, &[])?;
                } else {
                    index.remove(id)?;
                }
                Ok(Some((old, job)))
            })
            .map_err(tx_error)?;
        let Some((old, job)) = written else {
            return Ok(false);
        };
        self.count(id, old.as_deref(), Some(&job));
        self.store.flush()?;
        if job.needs_pipeline() {
            self.bell.notify_one();
        }
        Ok(true)
    }

    /// The jobs that finished cleanly ([`JobRecord::prunable`] at `now`) and last changed
    /// before `cutoff` (both Unix milliseconds): what the retention of records forgets.
    ///
    /// # Errors
    /// [`IndexError`] when a record cannot be read.
    pub fn prunable<T: JobRecord>(&self, cutoff: u64, now: u64) -> Result<Vec<T>, IndexError> {
        let mut jobs = Vec::new();
        for mut job in self.all::<T>()? {
            if job.prunable(now) && job.progress().updated_at < cutoff {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// Forgets the job `id` for good (record and index entry, flushed); true when it was
    /// recorded.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be changed.
    pub fn remove<T: JobRecord>(&self, id: &str) -> Result<bool, IndexError> {
        let id = id.as_bytes();
        let removed = (&self.tree, &self.active)
            .transaction(|(tree, index)| {
                index.remove(id)?;
                Ok(tree.remove(id)?)
            })
            .map_err(tx_error)?;
        self.count::<T>(id, removed.as_deref(), None);
        self.store.flush()?;
        Ok(removed.is_some())
    }

    /// Every job, in id order.
    ///
    /// # Errors
    /// [`IndexError`] when a record cannot be read.
    pub fn all<T: DeserializeOwned>(&self) -> Result<Vec<T>, IndexError> {
        decode_all(&self.tree)
    }

    /// The jobs that still need the pipeline ([`JobRecord::needs_pipeline`]), in id order.
    ///
    /// # Errors
    /// [`IndexError`] when a record cannot be read.
    pub fn active<T: DeserializeOwned>(&self) -> Result<Vec<T>, IndexError> {
        let mut jobs = Vec::new();
        for key in self.active.iter().keys() {
            let key = key?;
            if let Some(bytes) = self.tree.get(&key)? {
                jobs.push(decode(&key, &bytes)?);
            }
        }
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::jobs::Progress;
    use serde::Serialize;

    #[derive(Clone, Serialize, serde::Deserialize, Debug, PartialEq)]
    struct TestJob {
        id: String,
        value: u32,
        done: bool,
        progress: Progress,
    }

    /// The two states of a test job, named as a step is in the counts.
    #[derive(Clone, Copy, Debug, Serialize)]
    #[serde(rename_all = "lowercase")]
    enum Phase {
        Running,
        Done,
    }

    impl JobRecord for TestJob {
        type Step = Phase;
        fn id(&self) -> &str {
            &self.id
        }
        fn step(&self) -> Phase {
            if self.done {
                Phase::Done
            } else {
                Phase::Running
            }
        }
        fn set_step(&mut self, next: Phase) {
            self.done = matches!(next, Phase::Done);
        }
        fn ended(&self) -> bool {
            self.done
        }
        fn fail(&mut self, _at: Phase) {
            self.done = true;
        }
        fn progress(&mut self) -> &mut Progress {
            &mut self.progress
        }
    }

    fn job(id: &str, value: u32, done: bool) -> TestJob {
        TestJob {
            id: id.into(),
            value,
            done,
            progress: Progress::new(),
        }
    }

    fn values(jobs: &[TestJob]) -> Vec<u32> {
        jobs.iter().map(|j| j.value).collect()
    }

    #[test]
    fn create_only_once_and_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Store::open(dir.path()).expect("db");
            let store = JobStore::open(&db, "jobs").expect("store");
            assert!(store.create(&job("a", 1, false)).expect("create"));
            assert!(!store.create(&job("a", 2, false)).expect("again"));
            store.put(&job("b", 3, false)).expect("put");
        }
        let db = crate::gateway::store::reopen(|| Store::open(dir.path()));
        let store = JobStore::open(&db, "jobs").expect("store");
        assert_eq!(
            store.get::<TestJob>("a").expect("get").map(|j| j.value),
            Some(1)
        );
        assert_eq!(values(&store.all::<TestJob>().expect("all")), [1, 3]);
    }

    #[test]
    fn states_are_counted_as_records_are_written_and_rebuilt_at_reindex() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Store::open(dir.path()).expect("db");
        let store = JobStore::open(&db, "jobs").expect("store");
        let counts = |s: &JobStore| {
            s.state_counts()
                .into_iter()
                .map(|(state, n)| format!("{state}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        store.create(&job("a", 1, false)).expect("create");
        store.create(&job("b", 2, false)).expect("create");
        assert!(!store.create(&job("b", 3, true)).expect("again"));
        assert_eq!(counts(&store), "running=2");
        store.put(&job("a", 1, true)).expect("a ends");
        assert_eq!(counts(&store), "done=1 running=1");
        store.put(&job("c", 4, true)).expect("c");
        assert!(store.remove::<TestJob>("a").expect("remove"));
        assert!(!store.remove::<TestJob>("a").expect("gone"));
        assert_eq!(counts(&store), "done=1 running=1");
        assert!(store.remove::<TestJob>("c").expect("remove"));
        assert_eq!(counts(&store), "running=1");
        let reopened = JobStore::open(&db, "jobs").expect("store");
        assert_eq!(counts(&reopened), "");
        reopened.reindex::<TestJob>().expect("reindex");
        assert_eq!(counts(&reopened), "running=1");
    }

    #[test]
    fn only_jobs_that_need_the_pipeline_are_active() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Store::open(dir.path()).expect("db");
        let store = JobStore::open(&db, "jobs").expect("store");
        store.create(&job("a", 1, false)).expect("create");
        store.create(&job("b", 2, true)).expect("create ended");
        store.put(&job("c", 3, false)).expect("put");
        assert_eq!(values(&store.active::<TestJob>().expect("active")), [1, 3]);
        store.put(&job("a", 1, true)).expect("a ends");
        store.put(&job("b", 2, false)).expect("b is retried");
        assert_eq!(values(&store.active::<TestJob>().expect("active")), [2, 3]);
        // A store written before the index existed: rebuilt from the records.
        db.db.drop_tree("jobs.active").expect("drop the index");
        let store = JobStore::open(&db, "jobs").expect("store");
        assert!(store.active::<TestJob>().expect("empty").is_empty());
        store.reindex::<TestJob>().expect("reindex");
        assert_eq!(values(&store.active::<TestJob>().expect("active")), [2, 3]);
        assert_eq!(values(&store.all::<TestJob>().expect("all")), [1, 2, 3]);
    }
}
