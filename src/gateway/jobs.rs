//! Durable jobs: where each study is in the outbound and inbound pipelines.
//!
//! A job is one record in the daemon's database ([`crate::gateway::store::JobStore`]),
//! rewritten (and flushed)
//! after every step, so that after a crash or `kill -9` each job resumes at the step it
//! had not finished. Every step is written to be repeated safely: it produces its result
//! under a fixed name (temp file + rename) and the record moves on only once that result
//! is durable.
//!
//! The records hold no secret: the secret of an outbound study stays in its job folder's
//! pending token file, an inbound token in its job folder's token file (both mode 0600).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::admin::metrics::Metrics;
use crate::clock::now_ms;
use crate::gateway::store::{IndexError, JobStore};

/// Why a step failed, from a small fixed set: the label of
/// `cloudpdi_job_failures_total{cause}` and what `/healthz` looks at. Never free text, so
/// a metric cannot carry patient data or grow without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Cause {
    /// The local PACS rejected the association, aborted it, or accepts none of the
    /// study's SOP classes.
    PacsRejected,
    /// The local PACS cannot be reached, or the connection broke.
    PacsUnreachable,
    /// The local PACS answered "out of resources".
    PacsBusy,
    /// The repository cannot be reached or keeps failing.
    RepositoryUnreachable,
    /// The repository refused the request (the token is used up, a 4xx answer).
    RepositoryRefused,
    /// A local disk is full.
    DiskFull,
    /// Another local file or database failure (permissions, I/O error).
    LocalIo,
    /// The token cannot be read.
    InvalidToken,
    /// The container does not open (damaged, wrong key, unsupported).
    InvalidContainer,
    /// The file set is broken or unsafe.
    InvalidPdi,
    /// The process died during the step again and again.
    Crashed,
    /// A receiving facility's key is not pinned, missing from the repository's directory,
    /// or differs from its pin (sealed delivery).
    RecipientKey,
    /// Anything not sorted above.
    Other,
}

impl Cause {
    /// The label value (`pacs_rejected`, `disk_full`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Cause::PacsRejected => "pacs_rejected",
            Cause::PacsUnreachable => "pacs_unreachable",
            Cause::PacsBusy => "pacs_busy",
            Cause::RepositoryUnreachable => "repository_unreachable",
            Cause::RepositoryRefused => "repository_refused",
            Cause::DiskFull => "disk_full",
            Cause::LocalIo => "local_io",
            Cause::InvalidToken => "invalid_token",
            Cause::InvalidContainer => "invalid_container",
            Cause::InvalidPdi => "invalid_pdi",
            Cause::Crashed => "crashed",
            Cause::RecipientKey => "recipient_key",
            Cause::Other => "other",
        }
    }

    /// What stopped an association to the local PACS.
    pub fn of_pacs(e: &crate::dicom::scu::PacsError) -> Cause {
        use crate::dicom::scu::PacsError;
        match e {
            PacsError::Unreachable { .. } | PacsError::Lost { .. } => Cause::PacsUnreachable,
            PacsError::OutOfResources { .. } => Cause::PacsBusy,
            _ => Cause::PacsRejected,
        }
    }

    /// A failed local file operation: full disk or another failure.
    fn of_io(e: &std::io::Error) -> Cause {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Cause::DiskFull,
            _ => Cause::LocalIo,
        }
    }
}

/// What a job's step reports when it cannot go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Worth another attempt later (repository or PACS unreachable, disk full, ...).
    #[error("{message} (will retry)")]
    Transient {
        /// What failed, and what to do.
        message: String,
        /// Its kind, for metrics and health.
        cause: Cause,
    },
    /// Another attempt would fail the same way; the job stops with this reason.
    #[error("{message}")]
    Permanent {
        /// What failed.
        message: String,
        /// Its kind, for metrics and health.
        cause: Cause,
    },
    /// Another attempt would fail the same way until a person fixes the cause outside
    /// (the PACS's configuration, ours): the job keeps its data and waits, held, for
    /// `cloudpdi retry` instead of retrying for ever. The message says the fix and the
    /// command.
    #[error("{message} (held until `cloudpdi retry`)")]
    Held {
        /// What failed, the fix, and the command.
        message: String,
        /// Its kind, for metrics and health.
        cause: Cause,
    },
}

impl StepError {
    /// A transient error from anything printable.
    pub fn transient(e: impl std::fmt::Display) -> StepError {
        StepError::Transient {
            message: e.to_string(),
            cause: Cause::Other,
        }
    }

    /// A permanent error from anything printable.
    pub fn permanent(e: impl std::fmt::Display) -> StepError {
        StepError::Permanent {
            message: e.to_string(),
            cause: Cause::Other,
        }
    }

    /// An error that holds the job until `cloudpdi retry`; `message` ends with the fix.
    pub fn held(cause: Cause, message: impl std::fmt::Display) -> StepError {
        StepError::Held {
            message: message.to_string(),
            cause,
        }
    }

    /// The same error, sorted as `cause`.
    #[must_use]
    pub fn with_cause(self, cause: Cause) -> StepError {
        match self {
            StepError::Transient { message, .. } => StepError::Transient { message, cause },
            StepError::Permanent { message, .. } => StepError::Permanent { message, cause },
            StepError::Held { message, .. } => StepError::Held { message, cause },
        }
    }

    /// Why the step failed, from the fixed set.
    pub fn cause(&self) -> Cause {
        match self {
            StepError::Transient { cause, .. }
            | StepError::Permanent { cause, .. }
            | StepError::Held { cause, .. } => *cause,
        }
    }

    /// A local file or folder that cannot be used (full disk, permissions): an admin fixes
    /// it, then the step is retried. The message names the file and what was being done.
    pub fn file(action: &str, path: &std::path::Path, e: &std::io::Error) -> StepError {
        StepError::Transient {
            message: format!(
                "cannot {action} {}: {e}",
                crate::telemetry::escape(&path.display().to_string())
            ),
            cause: Cause::of_io(e),
        }
    }
}

impl From<crate::container::ContainerError> for StepError {
    /// A container that does not authenticate is final; a failed read or write (disk
    /// full) is not.
    fn from(e: crate::container::ContainerError) -> Self {
        match e {
            // The container's I/O error keeps only the system's text: ENOSPC reads so.
            crate::container::ContainerError::Io(_) => StepError::Transient {
                cause: if e.to_string().contains("No space left") {
                    Cause::DiskFull
                } else {
                    Cause::LocalIo
                },
                message: e.to_string(),
            },
            _ => StepError::permanent(e).with_cause(Cause::InvalidContainer),
        }
    }
}

impl From<crate::pdi::PdiError> for StepError {
    /// A file set that is broken or unsafe is final; a failed read or write (disk full)
    /// is not.
    fn from(e: crate::pdi::PdiError) -> Self {
        use crate::pdi::{PdiError, zip::ZipError};
        match &e {
            PdiError::Io { source, .. } | PdiError::Zip(ZipError::Io(source)) => {
                let cause = Cause::of_io(source);
                StepError::transient(e).with_cause(cause)
            }
            _ => StepError::permanent(e).with_cause(Cause::InvalidPdi),
        }
    }
}

impl From<IndexError> for StepError {
    fn from(e: IndexError) -> Self {
        let cause = if e.is_out_of_space() {
            Cause::DiskFull
        } else {
            Cause::LocalIo
        };
        StepError::transient(e).with_cause(cause)
    }
}

/// Why `cloudpdi retry` could not put a job back to work (either pipeline).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// No job of either pipeline has this ID.
    #[error("no outbound job {0} and no inbound job {0}: `cloudpdi status` lists the jobs")]
    Unknown(String),
    /// The job is still running or done.
    #[error("job {0} is {1}, not failed: only failed jobs are retried")]
    NotFailed(String, String),
    /// An inbound job that failed for good: its token and files are gone with it.
    #[error(
        "inbound job {0} failed for good and its token and files were removed: drop the \
         token file into the watch folder again to import it anew"
    )]
    Ended(String),
    /// An outbound job whose token was revoked: the repository deleted its document, and
    /// its sealed deliveries must not be posted again.
    #[error(
        "the token of outbound job {0} was revoked (`cloudpdi revoke`): it is not sent or \
         delivered again; send the study again for a new token"
    )]
    Revoked(String),
    /// The job store failed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Bookkeeping shared by both directions: attempts, errors and times.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// When the job was created (Unix milliseconds).
    pub created_at: u64,
    /// When the job last changed (Unix milliseconds).
    pub updated_at: u64,
    /// Failed attempts of the current step.
    pub attempts: u32,
    /// The last error, for `cloudpdi status`.
    pub last_error: Option<String>,
    /// Not before this time (Unix milliseconds) is the step tried again.
    pub retry_at: u64,
    /// Starts of the current step that never returned: the process died during them
    /// (a crash, the OOM killer, `kill -9`). Recorded before the step runs, cleared when it
    /// returns, at a clean shutdown and by a manual retry; at [`MAX_UNFINISHED_STARTS`]
    /// the job is set aside (see [`drive`]).
    #[serde(default)]
    pub unfinished_starts: u32,
    /// Why the last attempt failed, from a fixed set (for `/healthz` and metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// Held after a failure only a person can fix (see [`StepError::Held`]): the job is
    /// not tried again until `cloudpdi retry`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

/// Starts of one step during which the process died, in a row, after which the job is set
/// aside as failed instead of being started again: whatever its data does to the process
/// (a parser bug, memory), it cannot crash-loop the service.
pub const MAX_UNFINISHED_STARTS: u32 = 3;

impl Progress {
    /// A fresh job's bookkeeping.
    pub fn new() -> Progress {
        let now = now_ms();
        Progress {
            created_at: now,
            updated_at: now,
            ..Progress::default()
        }
    }

    /// Records a step that succeeded: the next step starts with a clean slate.
    pub fn advanced(&mut self) {
        self.updated_at = now_ms();
        self.attempts = 0;
        self.last_error = None;
        self.retry_at = 0;
        self.unfinished_starts = 0;
        self.cause = None;
        self.held = false;
    }

    /// Records a transient failure and schedules the retry with exponential back-off
    /// (1 s doubling, at most `max_backoff`).
    pub fn failed(&mut self, error: &StepError, max_backoff: Duration) {
        self.updated_at = now_ms();
        self.attempts = self.attempts.saturating_add(1);
        self.unfinished_starts = 0;
        self.last_error = Some(error.to_string());
        self.cause = Some(error.cause());
        self.held = matches!(error, StepError::Held { .. });
        let backoff = Duration::from_secs(1u64 << self.attempts.min(16)).min(max_backoff);
        self.retry_at = if self.held {
            0
        } else {
            self.updated_at + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX)
        };
    }

    /// Whether the job may run now: its back-off is over and it is not held.
    pub fn due(&self, now: u64) -> bool {
        !self.held && now >= self.retry_at
    }

    /// Whether the job was set aside because the process died during its step
    /// [`MAX_UNFINISHED_STARTS`] times in a row: its folder is kept for a person to look at.
    pub fn crashed_out(&self) -> bool {
        self.unfinished_starts >= MAX_UNFINISHED_STARTS
    }
}

impl From<crate::repository::client::ClientError> for StepError {
    /// The client already retried what can be retried soon; its own verdict decides.
    fn from(e: crate::repository::client::ClientError) -> Self {
        use crate::repository::client::ClientError;
        let cause = match &e {
            ClientError::NoSpace { .. } => Cause::DiskFull,
            ClientError::File { source, .. } => Cause::of_io(source),
            ClientError::Unavailable { .. } | ClientError::Integrity(_) => {
                Cause::RepositoryUnreachable
            }
            _ if e.is_permanent() => Cause::RepositoryRefused,
            _ => Cause::Other,
        };
        if e.is_permanent() {
            StepError::permanent(e).with_cause(cause)
        } else {
            StepError::transient(e).with_cause(cause)
        }
    }
}

/// When a job of `pipeline` last finished without error (Unix seconds), from its records:
/// what the `cloudpdi_last_success_timestamp_seconds` gauge says after a restart, so
/// that an alert on an old success does not fire because the daemon restarted.
///
/// # Errors
/// [`IndexError`] when the store cannot be read.
pub fn last_success<P: Pipeline>(pipeline: &P) -> Result<Option<u64>, IndexError> {
    let mut last = None;
    for mut job in pipeline.store().all::<P::Job>()? {
        if job.ended() && job.progress().last_error.is_none() {
            last = last.max(Some(job.progress().updated_at / 1000));
        }
    }
    Ok(last)
}

/// What the shared step loop ([`drive`]) needs of a job record.
pub trait JobRecord: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The job's steps (the record's `step` field).
    type Step: Copy + std::fmt::Debug + Serialize + Send + Sync + 'static;
    /// The job's id (its key in the store).
    fn id(&self) -> &str;
    /// The next step.
    fn step(&self) -> Self::Step;
    /// Moves the record to `next` (a step done, or the job's end).
    fn set_step(&mut self, next: Self::Step);
    /// Whether the job has ended (done, or failed for good).
    fn ended(&self) -> bool;
    /// Ends the job for good after `at` failed permanently.
    fn fail(&mut self, at: Self::Step);
    /// Times, attempts, last error.
    fn progress(&mut self) -> &mut Progress;
    /// Whether the pipeline still has work for the job (it is listed in the store's
    /// index of active jobs): by default, until it ends.
    fn needs_pipeline(&self) -> bool {
        !self.ended()
    }
    /// Whether the record may be forgotten once it is older than `spool.records_days`
    /// (`now` in Unix milliseconds): the job succeeded and neither the pipeline nor a person
    /// needs it any more. By default never: a failed or set-aside job stays until a person
    /// deals with it.
    fn prunable(&self, _now: u64) -> bool {
        false
    }
    /// Takes into `self`, about to be written, what the record `stored` (the one in the
    /// store now) holds that no writer may undo: a writer that read the record before an
    /// admin changed it (outbound: a revoke, an extension) must not write the old value
    /// back. Nothing by default.
    fn keep_from(&mut self, _stored: &Self) {}
}

/// A pipeline whose jobs [`work`] drives.
pub trait Pipeline: Send + Sync + 'static {
    /// The job record.
    type Job: JobRecord;
    /// Name in log lines (`outbound`, `inbound`).
    const NAME: &'static str;
    /// Before each scan: turns work that arrived since the last one into jobs and tidies
    /// after finished ones (outbound: claims the batches that became stable, removes spooled
    /// instances past their retention). Blocking: writes the database. Nothing by default.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be changed.
    fn take_in(&self) -> Result<(), IndexError> {
        Ok(())
    }
    /// The jobs that may run now: a query, it changes nothing (blocking: reads the
    /// database).
    ///
    /// # Errors
    /// [`IndexError`] when the job store cannot be read.
    fn due(&self) -> Result<Vec<Self::Job>, IndexError>;
    /// Where the job records are kept.
    fn store(&self) -> &JobStore;
    /// Longest wait between retries of a failing step.
    fn max_backoff(&self) -> Duration;
    /// Runs the job's next step; returns the step after it.
    fn step(
        self: &Arc<Self>,
        job: &mut Self::Job,
    ) -> impl Future<Output = Result<<Self::Job as JobRecord>::Step, StepError>> + Send;
    /// Called once the job's end is recorded (e.g. to remove its working folder).
    fn job_ended(&self, _job: &Self::Job) {}
    /// Counts what the pipeline's own metrics say about `done`, a step the job has just
    /// finished (tokens issued, imports); failures and finished jobs are counted by
    /// [`drive`].
    fn count_step(
        &self,
        _job: &Self::Job,
        _done: <Self::Job as JobRecord>::Step,
        _metrics: &Metrics,
    ) {
    }
    /// What a person needs to know of a job set aside after the process died during its
    /// step [`MAX_UNFINISHED_STARTS`] times: whose data it was and where it is kept.
    fn crashed(&self, job: &Self::Job) -> String;
}

/// Runs a job's steps until it ends, a step fails (it is retried after its back-off), or
/// `cancel` fires. The record is written after every step, before the next one starts.
///
/// Before a step runs, its start is recorded ([`Progress::unfinished_starts`]); a job whose
/// step was started [`MAX_UNFINISHED_STARTS`] times without returning (the process died
/// each time) is set aside as failed instead, so no input can crash-loop the service.
/// Every outcome is counted in `metrics`: a failed attempt by step, a finished job by
/// pipeline.
pub async fn drive<P: Pipeline>(
    pipeline: Arc<P>,
    mut job: P::Job,
    cancel: CancellationToken,
    metrics: &Metrics,
) {
    let name = P::NAME;
    while !cancel.is_cancelled() && !job.ended() {
        let step = job.step();
        if job.progress().crashed_out() {
            metrics.job_failed(name, &state_name_debug(step), Cause::Crashed);
            set_aside_after_crashes(&pipeline, job, step).await;
            return;
        }
        job.progress().unfinished_starts += 1;
        if !save(&pipeline, &job).await {
            return;
        }
        let result = tokio::select! {
            r = pipeline.step(&mut job) => Some(r),
            () = cancel.cancelled() => None,
        };
        let Some(result) = result else {
            // A clean shutdown is no crash: this start does not count. The record as the
            // step left it in the store is kept (what the step changed only in memory is
            // not recorded, as before).
            let (store, id) = (pipeline.store().clone(), job.id().to_owned());
            let cleared = tokio::task::spawn_blocking(move || {
                let Some(mut stored) = store.get::<P::Job>(&id)? else {
                    return Ok(());
                };
                stored.progress().unfinished_starts = 0;
                store.put(&stored)
            })
            .await;
            if !matches!(cleared, Ok(Ok(()))) {
                tracing::warn!(
                    job = job.id(),
                    "cannot record a clean stop of the {name} job"
                );
            }
            return;
        };
        match result {
            Ok(next) => {
                pipeline.count_step(&job, step, metrics);
                job.set_step(next);
                job.progress().advanced();
                tracing::info!(job = job.id(), from = ?step, to = ?next, "{name} step done");
            }
            Err(e @ StepError::Permanent { .. }) => {
                tracing::error!(job = job.id(), step = ?step, cause = e.cause().label(), "{name} job failed: {e}");
                metrics.job_failed(name, &state_name_debug(step), e.cause());
                job.progress().failed(&e, Duration::ZERO);
                job.fail(step);
            }
            Err(e @ StepError::Held { .. }) => {
                let attempt = job.progress().attempts + 1;
                tracing::error!(job = job.id(), step = ?step, attempt, cause = e.cause().label(), "{name} job held: {e}");
                metrics.job_failed(name, &state_name_debug(step), e.cause());
                job.progress().failed(&e, Duration::ZERO);
            }
            Err(e) => {
                let attempt = job.progress().attempts + 1;
                tracing::warn!(job = job.id(), step = ?step, attempt, cause = e.cause().label(), "{name} step failed: {e}");
                metrics.job_failed(name, &state_name_debug(step), e.cause());
                let max = pipeline.max_backoff();
                job.progress().failed(&e, max);
            }
        }
        if !save(&pipeline, &job).await {
            return;
        }
        if job.ended() {
            if job.progress().last_error.is_none() {
                metrics.job_finished(name);
            }
            pipeline.job_ended(&job);
        }
        if job.progress().attempts > 0 {
            return;
        }
    }
}

/// Writes the job record (off the runtime); false, logged, when it cannot be written.
async fn save<P: Pipeline>(pipeline: &Arc<P>, job: &P::Job) -> bool {
    let (store, record) = (pipeline.store().clone(), job.clone());
    let saved = tokio::task::spawn_blocking(move || store.put(&record)).await;
    if !matches!(saved, Ok(Ok(()))) {
        tracing::error!(
            job = job.id(),
            "cannot record the {} job; it will be repeated from its last recorded step",
            P::NAME
        );
        return false;
    }
    true
}

/// Ends a job whose step the process died in [`MAX_UNFINISHED_STARTS`] times in a row:
/// failed, with the reason in its record (and `cloudpdi status`), logged once. Its data is
/// kept; the count stays in the record so that the folder is not removed.
async fn set_aside_after_crashes<P: Pipeline>(
    pipeline: &Arc<P>,
    mut job: P::Job,
    step: <P::Job as JobRecord>::Step,
) {
    let reason = format!(
        "the process died {MAX_UNFINISHED_STARTS} times in a row while this job was in its \
         {} step; set aside as failed so that it cannot crash the service again: {}",
        state_name_debug(step),
        pipeline.crashed(&job)
    );
    tracing::error!(job = job.id(), step = ?step, "{} job set aside: {reason}", P::NAME);
    let progress = job.progress();
    progress.updated_at = now_ms();
    progress.attempts = MAX_UNFINISHED_STARTS;
    progress.last_error = Some(reason);
    progress.retry_at = 0;
    progress.cause = Some(Cause::Crashed);
    job.fail(step);
    if save(pipeline, &job).await {
        pipeline.job_ended(&job);
    }
}

/// A step's name for a message (`Unpack` -> `unpack`).
fn state_name_debug(step: impl std::fmt::Debug) -> String {
    format!("{step:?}").to_lowercase()
}

/// Runs a pipeline until `cancel`: at once when its job store's bell rings (a job
/// written, work arrived, a worker freed) and every half second for the rest (back-offs
/// ending), starts its due jobs, at most `workers` at once and each job once; on cancel, waits for the running jobs to reach
/// a safe point. What the jobs do is counted in `metrics`.
pub async fn work<P: Pipeline>(
    pipeline: Arc<P>,
    workers: usize,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let running = Arc::new(Mutex::new(BTreeSet::new()));
    let slots = Arc::new(Semaphore::new(workers.max(1)));
    let tracker = TaskTracker::new();
    let bell = pipeline.store().bell();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = bell.notified() => {}
            () = cancel.cancelled() => break,
        }
        let scan = pipeline.clone();
        let due = tokio::task::spawn_blocking(move || {
            scan.take_in()?;
            scan.due()
        });
        let due = match due.await {
            Ok(Ok(due)) => due,
            Ok(Err(e)) => {
                tracing::error!("{}: cannot read the job index: {e}", P::NAME);
                continue;
            }
            Err(e) => {
                tracing::error!("{}: job scan failed: {e}", P::NAME);
                continue;
            }
        };
        for job in due {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            let id = job.id().to_owned();
            if !lock(&running).insert(id.clone()) {
                continue;
            }
            let (pipeline, running, cancel) = (pipeline.clone(), running.clone(), cancel.clone());
            let (metrics, bell) = (metrics.clone(), bell.clone());
            tracker.spawn(async move {
                if let Some(job) = still_due(&pipeline, job).await {
                    drive(pipeline, job, cancel, &metrics).await;
                }
                lock(&running).remove(&id);
                drop(permit);
                // A worker is free: a job waiting for one starts now.
                bell.notify_one();
            });
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// The job's record as stored now, when the scan's copy `seen` is still current. A scan
/// can read a job while an earlier run of it is still writing (the store's bell rings on
/// each write), and that run may end (failed for good, or backing off) before the scan
/// claims the job: driving the scan's old copy would write it back over the job's end, or
/// start it before its back-off. Such a job is left to the next scan, which reads it anew.
async fn still_due<P: Pipeline>(pipeline: &Arc<P>, mut seen: P::Job) -> Option<P::Job> {
    let (store, id) = (pipeline.store().clone(), seen.id().to_owned());
    let mut stored = match tokio::task::spawn_blocking(move || store.get::<P::Job>(&id)).await {
        Ok(Ok(Some(stored))) => stored,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::error!(job = seen.id(), "{}: cannot read the job: {e}", P::NAME);
            return None;
        }
        Err(e) => {
            tracing::error!(job = seen.id(), "{}: reading the job failed: {e}", P::NAME);
            return None;
        }
    };
    let unchanged = state_name(stored.step()) == state_name(seen.step())
        && stored.progress() == seen.progress();
    (unchanged && !stored.ended() && stored.progress().due(now_ms())).then_some(stored)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The name a step has in status and in the job records (its serde name, e.g. `upload`).
pub fn state_name(step: impl serde::Serialize) -> String {
    serde_json::to_value(step)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One job as `cloudpdi status` lists it, whatever its direction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job id (`B000042` outbound, `R1a2b3c4d5e6f` inbound).
    pub id: String,
    /// `outbound` or `inbound`.
    pub direction: String,
    /// The step the job is at (or `done` / `failed`).
    pub state: String,
    /// A short progress text ("120 instances", "35 of 120 stored").
    pub progress: String,
    /// What needs a person's attention, one line each (instances set aside and why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Bookkeeping: times, attempts, last error.
    #[serde(flatten)]
    pub bookkeeping: Progress,
    /// Patient, accession, study date and modality, once known (outbound: from the
    /// batch or the files sent; inbound: from the verified PDI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<crate::gateway::reception::batch::StudySummary>,
}

/// Runs a step's blocking work (files, hashing, sealing) off the async runtime; a worker
/// thread that panicked is a transient failure of the step, retried.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StepError> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(StepError::transient(format!("worker thread failed: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Clone, Serialize, Deserialize)]
    struct TestJob {
        id: String,
        step: TestStep,
        progress: Progress,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
    enum TestStep {
        Work,
        Failed,
    }

    impl JobRecord for TestJob {
        type Step = TestStep;
        fn id(&self) -> &str {
            &self.id
        }
        fn step(&self) -> TestStep {
            self.step
        }
        fn set_step(&mut self, next: TestStep) {
            self.step = next;
        }
        fn ended(&self) -> bool {
            self.step == TestStep::Failed
        }
        fn fail(&mut self, _at: TestStep) {
            self.step = TestStep::Failed;
        }
        fn progress(&mut self) -> &mut Progress {
            &mut self.progress
        }
    }

    /// A pipeline whose one step fails for good, and whose scan, once the job has ended,
    /// hands out a copy of the job read while its step was running: the window between a
    /// scan's read and its claim, made certain.
    struct StaleScan {
        jobs: JobStore,
        steps: AtomicUsize,
        ended: AtomicBool,
        stale: Mutex<Option<TestJob>>,
        stale_given: AtomicBool,
    }

    impl Pipeline for StaleScan {
        type Job = TestJob;
        const NAME: &'static str = "test";
        fn due(&self) -> Result<Vec<TestJob>, IndexError> {
            if self.stale_given.load(Ordering::SeqCst) {
                return Ok(Vec::new());
            }
            let Some(stale) = lock(&self.stale).clone() else {
                let due = self.jobs.active::<TestJob>()?;
                return Ok(due.into_iter().filter(|job| !job.ended()).collect());
            };
            while !self.ended.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            // The run that ended is out of the engine's set of running jobs by now.
            std::thread::sleep(Duration::from_millis(300));
            self.stale_given.store(true, Ordering::SeqCst);
            Ok(vec![stale])
        }
        fn store(&self) -> &JobStore {
            &self.jobs
        }
        fn max_backoff(&self) -> Duration {
            Duration::from_secs(60)
        }
        async fn step(self: &Arc<Self>, job: &mut TestJob) -> Result<TestStep, StepError> {
            self.steps.fetch_add(1, Ordering::SeqCst);
            let copy = self.jobs.get::<TestJob>(&job.id)?;
            *lock(&self.stale) = copy;
            Err(StepError::permanent("the input is broken"))
        }
        fn job_ended(&self, _job: &TestJob) {
            self.ended.store(true, Ordering::SeqCst);
        }
        fn crashed(&self, job: &TestJob) -> String {
            job.id.clone()
        }
    }

    #[tokio::test]
    async fn a_job_read_by_a_scan_before_it_failed_is_not_run_again_over_its_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::gateway::store::Store::open(dir.path()).expect("store");
        let jobs = JobStore::open(&store, "test").expect("job store");
        let job = TestJob {
            id: "T1".into(),
            step: TestStep::Work,
            progress: Progress::new(),
        };
        jobs.put(&job).expect("job written");
        let pipeline = Arc::new(StaleScan {
            jobs: jobs.clone(),
            steps: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
            stale: Mutex::new(None),
            stale_given: AtomicBool::new(false),
        });
        let cancel = CancellationToken::new();
        let engine = tokio::spawn(work(
            pipeline.clone(),
            2,
            cancel.clone(),
            Arc::new(Metrics::default()),
        ));
        for _ in 0..500 {
            if pipeline.stale_given.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pipeline.stale_given.load(Ordering::SeqCst), "the scan ran");
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
        engine.await.expect("engine");
        let mut stored = jobs.get::<TestJob>("T1").expect("read").expect("record");
        assert_eq!(
            pipeline.steps.load(Ordering::SeqCst),
            1,
            "the job was run again from the scan's old copy"
        );
        assert_eq!(stored.step, TestStep::Failed);
        assert_eq!(stored.progress().unfinished_starts, 0);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut p = Progress::new();
        let err = StepError::transient("repository unreachable");
        p.failed(&err, Duration::from_secs(60));
        assert_eq!(p.attempts, 1);
        assert_eq!(p.retry_at - p.updated_at, 2_000);
        for _ in 0..10 {
            p.failed(&err, Duration::from_secs(60));
        }
        assert_eq!(p.retry_at - p.updated_at, 60_000);
        assert!(!p.due(p.updated_at));
        assert!(p.due(p.retry_at));
        p.advanced();
        assert_eq!((p.attempts, p.last_error.as_deref()), (0, None));
    }

    #[test]
    fn a_held_job_is_not_due_until_retried_and_records_without_the_fields_decode() {
        let old = r#"{"created_at":1,"updated_at":2,"attempts":0,"last_error":null,"retry_at":0}"#;
        let p: Progress = serde_json::from_str(old).expect("old record");
        assert_eq!((p.held, p.cause), (false, None));
        let mut p = Progress::new();
        p.failed(
            &StepError::transient("no room").with_cause(Cause::DiskFull),
            Duration::from_secs(1),
        );
        assert_eq!((p.held, p.cause), (false, Some(Cause::DiskFull)));
        assert!(p.due(p.retry_at));
        let held = StepError::held(Cause::PacsRejected, "the PACS refused our AE title");
        p.failed(&held, Duration::from_secs(1));
        assert!(p.held && !p.due(u64::MAX), "held: never due by time");
        assert_eq!(p.cause, Some(Cause::PacsRejected));
        assert_eq!(
            p.last_error.as_deref(),
            Some("the PACS refused our AE title (held until `cloudpdi retry`)")
        );
        let json = serde_json::to_string(&p).expect("json");
        assert!(
            json.contains(r#""cause":"pacs_rejected","held":true"#),
            "{json}"
        );
        p.advanced();
        assert!(!p.held && p.cause.is_none() && p.due(now_ms()));
    }

    #[test]
    fn records_written_before_the_crash_count_decode_and_a_returned_step_clears_it() {
        let old = r#"{"created_at":1,"updated_at":2,"attempts":0,"last_error":null,"retry_at":0}"#;
        let mut p: Progress = serde_json::from_str(old).expect("old record");
        assert_eq!(p.unfinished_starts, 0);
        p.unfinished_starts = MAX_UNFINISHED_STARTS;
        assert!(p.crashed_out());
        p.failed(
            &StepError::transient("PACS unreachable"),
            Duration::from_secs(1),
        );
        assert_eq!(p.unfinished_starts, 0);
        p.unfinished_starts = 2;
        p.advanced();
        assert!(!p.crashed_out() && p.unfinished_starts == 0);
    }
}
