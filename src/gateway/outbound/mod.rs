//! The outbound pipeline: a stable batch becomes a token.
//!
//! Steps of a job (one per batch, id = the batch id), each repeated safely after a crash:
//! 1. **upload**, one stream (`stream.rs`): the repository assigns a document ID (kept in
//!    the job record at once); the batch's spooled instances -> AI-image policy -> PDI
//!    ZIP -> zstd (unless the instances are mostly compressed already) -> sealed under a
//!    fresh secret (kept in the job's pending token file, mode 0600, until the token is
//!    issued) -> cut into parts uploaded as they are produced, while the container is
//!    written to `jobs/out/<batch>/container`; then the document is completed with the
//!    part hashes. No PDI ZIP is written. A finished container resumes by sending only
//!    the parts missing; an unfinished one streams again with a fresh salt;
//! 2. **issue**: the token (document ID + secret) is written to the route's token folder,
//!    with the patient's slip (study details read from the batch's instances, see
//!    [`StudyDetails`](crate::gateway::study::StudyDetails); files named by study date, Patient ID, Accession Number and job);
//! 3. **deliver**: the route's delivery command, if any, is run with the slip's path (before
//!    the sealed deliveries: a recipient whose key must be checked never holds the
//!    patient's slip back);
//! 4. **post**: for a route with `deliver_to`, the token is sealed to each facility named
//!    (after checking the key the repository's directory gives for it against its pin)
//!    and posted to its mailbox; each facility's outcome is recorded in the job; then the
//!    job folder is removed.
//!
//! An issued token can be revoked, or extended to a later expiry (the token file and the
//! slip re-issued with the same secret): `slip_action.rs`, for `cloudpdi revoke` and
//! `cloudpdi extend`.
//!
//! The spooled instances are removed once the route's retention has passed.
//! Exactly one token per batch: the secret and the document ID are fixed the first time
//! their step completes, so a repeated issue step writes the same token again.

mod job;
mod sender;
mod slip_action;
mod stream;

pub use job::{Delivery, OutStep, OutboundJob, PrintedStudy};
pub use sender::Sender;
use sender::Workdir;
pub use slip_action::{ExtendedSlip, SlipActionError};
pub use stream::{StreamInput, is_compressed_syntax, worth_compressing};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::clock::now_ms;
use crate::durable;
use crate::gateway::jobs::{JobRecord, JobSummary, Pipeline, StepError, blocking, state_name};
use crate::gateway::reception::spool::Spool;
use crate::gateway::store::{IndexError, JobStore};
use crate::token::Token;

pub use crate::gateway::jobs::RetryError;

/// The name of the outbound jobs' tree in the index (also opened by `cloudpdi send`
/// when no daemon runs).
pub const JOB_STORE: &str = "outbound_jobs";

/// The outbound worker of the daemon.
pub struct Outbound {
    sender: Arc<Sender>,
    spool: Arc<Spool>,
    jobs: JobStore,
    dir: PathBuf,
    slip_locks: slip_action::SlipLocks,
}

impl Outbound {
    /// Opens the outbound job store in the daemon's database.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be opened.
    pub fn new(sender: Sender, spool: Arc<Spool>) -> Result<Outbound, IndexError> {
        let jobs = JobStore::open(spool.index().store(), JOB_STORE)?;
        jobs.reindex::<OutboundJob>()?;
        let dir = sender.config.jobs_dir().join("out");
        let outbound = Outbound {
            sender: Arc::new(sender),
            spool,
            jobs,
            dir,
            slip_locks: slip_action::SlipLocks::default(),
        };
        outbound.recover()?;
        Ok(outbound)
    }

    /// Creates the job of a batch claimed just before a crash (claim and job creation
    /// are two writes); run once at start, since only a crash leaves such a batch.
    fn recover(&self) -> Result<(), IndexError> {
        for batch in self.spool.index().claimed()? {
            let mut job = OutboundJob::new(batch.id.to_string(), Some(batch.id), &batch.route);
            job.study = Some(batch.study.clone());
            if self.jobs.create(&job)? {
                info!(job = %batch.id, "outbound job recovered");
            }
        }
        Ok(())
    }

    /// Every outbound job, for `cloudpdi status`.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be read.
    pub fn summaries(&self) -> Result<Vec<JobSummary>, IndexError> {
        Ok(self
            .jobs
            .all::<OutboundJob>()?
            .iter()
            .map(OutboundJob::summary)
            .collect())
    }

    /// Why `job` cannot be the record of a `cloudpdi send` of this daemon's
    /// configuration, if it cannot: its route must be configured, its document ID one of
    /// a repository, and its token and slip files in that route's token folder (a record
    /// posted to the admin endpoint must not make status name arbitrary files, or the
    /// repository be asked about arbitrary documents).
    pub fn check_sent(&self, job: &OutboundJob) -> Result<(), String> {
        let config = &self.sender.config;
        if !config.routes.contains_key(&job.route) {
            return Err(format!("route {:?} is not configured", job.route));
        }
        if !job
            .document_id
            .as_deref()
            .is_some_and(crate::repository::is_document_id)
        {
            return Err("the record has no valid document ID".into());
        }
        let folder = config.token_dir(&job.route);
        let outside = [&job.token_file, &job.slip_file]
            .into_iter()
            .flatten()
            .any(|file| file.parent() != Some(folder.as_path()));
        if outside {
            return Err(format!(
                "its token and slip files are not in the token folder of route {}",
                job.route
            ));
        }
        Ok(())
    }

    /// Records a send finished by `cloudpdi send` so that `cloudpdi status` lists it;
    /// `false` when a job with its ID exists (the record is not replaced).
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be written.
    pub fn record_sent(&self, job: &OutboundJob) -> Result<bool, IndexError> {
        let created = self.jobs.create(job)?;
        if created {
            info!(job = %job.id, route = %job.route, "send by `cloudpdi send` recorded");
        }
        Ok(created)
    }

    /// Every outbound job record, for the details `cloudpdi status` shows (patient, token
    /// file, downloads and receipts).
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be read.
    pub fn records(&self) -> Result<Vec<OutboundJob>, IndexError> {
        self.jobs.all::<OutboundJob>()
    }

    /// The repository's view of a job's document (downloads, receipts); `None` when the
    /// job has no document yet.
    ///
    /// # Errors
    /// A sentence saying why the repository could not tell.
    pub async fn document_status(
        &self,
        job: &OutboundJob,
    ) -> Option<Result<crate::repository::api::DocumentStatus, String>> {
        let document = job.document_id.as_deref()?;
        Some(self.sender.document_status(&job.route, document).await)
    }

    /// Puts a failed job back to the step that failed, a held one (a recipient's key to
    /// check) back to work, or a done one with sealed deliveries (and a token not expired)
    /// back to the post step, with its attempts reset (never a revoked one, whatever its
    /// step), once the admin fixed the cause (a key
    /// file, a pin or the configuration: the daemon reads those at start, so after a
    /// restart); the workers take it up on their next scan. Returns the step it will run.
    ///
    /// # Errors
    /// [`RetryError`] when there is no such job or it has not failed.
    pub fn retry(&self, id: &str) -> Result<OutStep, RetryError> {
        let Some(mut job) = self.jobs.get::<OutboundJob>(id)? else {
            return Err(RetryError::Unknown(id.to_owned()));
        };
        if job.revoked_at.is_some() {
            return Err(RetryError::Revoked(id.to_owned()));
        }
        if job.progress.held && !job.ended() {
            job.progress.advanced();
            self.jobs.put(&job)?;
            info!(job = %job.id, step = ?job.step, "held outbound job retried by the admin");
            return Ok(job.step);
        }
        if job.step == OutStep::Done
            && !job.deliveries.is_empty()
            && u64::from(job.expires_at) > now_ms() / 1000
        {
            // A recipient refused or lost the sealed token (a key rotated meanwhile): seal
            // the issued token again to every recipient; one that imported it already
            // recognises it and does not import it twice.
            job.deliveries.clear();
            job.step = OutStep::Post;
            job.progress.advanced();
            self.jobs.put(&job)?;
            info!(job = %job.id, "sealed delivery asked again by the admin");
            return Ok(job.step);
        }
        if job.step != OutStep::Failed {
            return Err(RetryError::NotFailed(id.to_owned(), state_name(job.step)));
        }
        job.step = job.failed_at.take().unwrap_or(OutStep::Upload);
        if job.step == OutStep::Upload {
            // The document may be the cause (refused, gone): upload into a new one; the
            // old one expires in the repository by itself.
            job.document_id = None;
            job.repository = None;
        }
        job.progress.advanced();
        self.jobs.put(&job)?;
        info!(job = %job.id, step = ?job.step, "outbound job retried by the admin");
        Ok(job.step)
    }

    /// Removes a sent batch's spooled instances once the route's retention has passed.
    fn expire_spool(&self, job: &mut OutboundJob, now: u64) -> Result<(), IndexError> {
        let retention = self
            .sender
            .config
            .routes
            .get(&job.route)
            .map_or(0, |r| r.retention_hours);
        let Some(batch) = job.batch else {
            return Ok(());
        };
        if job.spool_removed || now < job.progress.updated_at + retention * 3_600_000 {
            return Ok(());
        }
        let removed = self.spool.remove_batch(batch);
        match removed {
            Ok(count) => {
                job.spool_removed = true;
                self.jobs.put(job)?;
                info!(job = %job.id, instances = count, "retention over: spooled instances removed");
            }
            Err(e) => warn!(job = %job.id, "cannot remove spooled instances: {e}"),
        }
        Ok(())
    }

    /// Runs one step; returns the next.
    async fn run_step(self: &Arc<Self>, job: &mut OutboundJob) -> Result<OutStep, StepError> {
        let dir = Workdir(self.dir.join(&job.id));
        match job.step {
            OutStep::Upload => {
                let this = self.clone();
                let (batch, route) = (job.batch, job.route.clone());
                let input = blocking(move || {
                    let records = match batch {
                        Some(batch) => this.spool.index().member_records(batch)?,
                        None => Vec::new(),
                    };
                    let compress = this.sender.route_options(&route)?.compress
                        && worth_compressing(
                            records
                                .iter()
                                .map(|(_, r)| (r.transfer_syntax.as_str(), r.size)),
                        );
                    let files = records
                        .iter()
                        .map(|(_, record)| this.spool.path_of(record))
                        .collect();
                    let known = records
                        .iter()
                        .filter_map(|(_, r)| Some((this.spool.path_of(r), r.hash?)))
                        .collect();
                    Ok(StreamInput {
                        files,
                        attachments: Vec::new(),
                        compress,
                        known,
                    })
                })
                .await?;
                let jobs = self.jobs.clone();
                self.sender
                    .stream(&dir, job, input, Some(&jobs), &|_| {})
                    .await?;
                Ok(OutStep::Issue)
            }
            OutStep::Issue => {
                let this = self.clone();
                let mut issued = job.clone();
                let issued = blocking(move || {
                    let files = match issued.batch {
                        Some(batch) => this.spool.batch_files(batch)?,
                        None => Vec::new(),
                    };
                    this.sender.issue(&dir, &mut issued, &files)?;
                    Ok(issued)
                })
                .await?;
                *job = issued;
                // The file's name holds the Patient ID: the log names the job and folder
                // only (`cloudpdi status` shows the file).
                info!(job = %job.id, route = %job.route, document = job.document_id.as_deref().unwrap_or(""),
                      folder = %self.sender.config.token_dir(&job.route).display(), "token issued");
                Ok(OutStep::Deliver)
            }
            OutStep::Deliver => {
                self.deliver(job).await?;
                Ok(OutStep::Post)
            }
            OutStep::Post => {
                // Without its folder, the job was done and its delivery is asked again
                // (`cloudpdi retry`), or the folder was removed just before a crash: the
                // token is read back from its file.
                self.sender.post(&dir, job, &self.jobs).await?;
                durable::remove_dir_all(&dir.0)
                    .map_err(|e| StepError::file("remove", &dir.0, &e))?;
                Ok(OutStep::Done)
            }
            OutStep::Done | OutStep::Failed => Ok(job.step),
        }
    }

    /// Runs the route's delivery command with the slip's path.
    async fn deliver(&self, job: &OutboundJob) -> Result<(), StepError> {
        let command = &self.sender.route_options(&job.route)?.deliver_command;
        let (Some(program), Some(slip)) = (command.first(), job.slip_file.as_ref()) else {
            return Ok(());
        };
        let status = tokio::process::Command::new(program)
            .args(&command[1..])
            .arg(slip)
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(Duration::from_secs(120), status)
            .await
            .map_err(|_| {
                StepError::transient(format!(
                    "delivery command {program} did not finish in 120 s"
                ))
            })?
            .map_err(|e| {
                StepError::transient(format!("delivery command {program} cannot start: {e}"))
            })?;
        if !status.success() {
            return Err(StepError::transient(format!(
                "delivery command {program} failed ({status})"
            )));
        }
        Ok(())
    }
}

impl Pipeline for Outbound {
    type Job = OutboundJob;
    const NAME: &'static str = "outbound";

    /// Claims newly stable batches as jobs, and removes the spooled instances of sent
    /// batches once the route's retention has passed.
    fn take_in(&self) -> Result<(), IndexError> {
        let index = self.spool.index();
        for id in index.ready()? {
            if let Some(batch) = index.claim(id)? {
                let mut job = OutboundJob::new(batch.id.to_string(), Some(batch.id), &batch.route);
                job.study = Some(batch.study.clone());
                if self.jobs.create(&job)? {
                    info!(job = %batch.id, route = %batch.route, instances = batch.instances, "outbound job created");
                }
            }
        }
        let now = now_ms();
        for mut job in self.jobs.active::<OutboundJob>()? {
            if job.step == OutStep::Done {
                self.expire_spool(&mut job, now)?;
            }
        }
        Ok(())
    }

    fn due(&self) -> Result<Vec<OutboundJob>, IndexError> {
        let now = now_ms();
        Ok(self
            .jobs
            .active::<OutboundJob>()?
            .into_iter()
            .filter(|job| !matches!(job.step, OutStep::Done | OutStep::Failed))
            .filter(|job| job.progress.due(now))
            .collect())
    }

    fn store(&self) -> &JobStore {
        &self.jobs
    }

    fn max_backoff(&self) -> Duration {
        Duration::from_secs(self.sender.config.outbound.max_backoff)
    }

    async fn step(self: &Arc<Self>, job: &mut OutboundJob) -> Result<OutStep, StepError> {
        self.run_step(job).await
    }

    fn count_step(&self, _job: &OutboundJob, done: OutStep, metrics: &Metrics) {
        if done == OutStep::Issue {
            metrics.tokens_issued.inc();
        }
    }

    fn crashed(&self, job: &OutboundJob) -> String {
        format!(
            "this batch's data crashed the sender; kept in {} and in the spool",
            self.dir.join(&job.id).display()
        )
    }
}

/// The outbound pipeline from the command line (`cloudpdi send`): the stream (build,
/// seal, upload) and the issue in one go, in `workdir` (removed at the end). Returns the token and the job
/// with the token and slip paths.
///
/// # Errors
/// [`StepError`] of the step that failed; the work folder is kept for a retry.
pub async fn send_files(
    sender: Arc<Sender>,
    route: &str,
    files: Vec<PathBuf>,
    attachments: Vec<PathBuf>,
    workdir: PathBuf,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Token, OutboundJob), StepError> {
    let t = crate::clock::civil(crate::clock::now_seconds());
    // The process ID keeps two sends in the same second apart (job and token file).
    let id = format!(
        "S{:04}{:02}{:02}-{:02}{:02}{:02}-{}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        std::process::id()
    );
    let mut job = OutboundJob::new(id, None, route);
    let input = StreamInput {
        files: files.clone(),
        attachments,
        compress: sender.route_options(route)?.compress,
        known: HashMap::new(),
    };
    let dir = Workdir(workdir);
    sender.stream(&dir, &mut job, input, None, progress).await?;
    let inputs = files;
    let token = sender.issue(&dir, &mut job, &inputs)?;
    durable::remove_dir_all(&dir.0).map_err(|e| StepError::file("remove", &dir.0, &e))?;
    Ok((token, job))
}
