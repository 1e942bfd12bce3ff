//! The inbound pipeline: a token becomes a study in the local PACS.
//!
//! A token enters through the watch queue ([`crate::gateway::inbound::watch`]) or, sealed
//! by another facility, through the mailbox ([`crate::gateway::inbound::mailbox`]), and
//! becomes a job whose id
//! is derived from its repository's URL (a community code resolved) and document ID, so
//! the same document is imported once, however often and by whichever token it comes. A
//! token naming a community code is resolved through `[repositories]`,
//! and the resulting URL checked against `inbound.allowed_repositories`. Steps, each
//! repeated safely after a crash:
//! 1. **download**, as one stream ([`stream`]): the ranged, resumable download of the
//!    container (`jobs/in/<id>/container.part`, then `container`; the repository names
//!    the facility that created the document, the job's issuer) is read while it grows,
//!    opened chunk by chunk (only authenticated bytes go further), its PDI read front to
//!    back into `pdi/`, every file checked against the manifest (first in the archive),
//!    and each verified instance C-STOREd at once (Patient ID reconciliation as below;
//!    instances stored are appended to `stored` as the PACS answers, so no attempt sends
//!    them again). The whole set is then checked against its DICOMDIR and manifest.
//!    A container whose archive has the manifest last (an older sender) goes on to 2-4;
//!    one the PACS did not wholly take goes on to 4.
//! 2. **open**: decrypt and authenticate; nothing goes further from a container that
//!    fails (`pdi.zip`, committed only when every chunk authenticated);
//! 3. **unpack**: extract the PDI safely and check it against its DICOMDIR and manifest;
//! 4. **import**: Patient ID reconciliation, C-STORE into the local PACS; instances the
//!    PACS refuses for good (or, with storage commitment, never commits) are set aside
//!    (`set-aside/<id>/`) with their reason and not sent again;
//! 5. **receipt**: tell the repository what arrived; the job folder is removed.
//!
//! The token itself stays only in the job folder (mode 0600) while the job runs.

pub mod commitment;
pub mod import;
pub mod mailbox;
pub mod reconcile;
pub mod watch;

mod job;
mod stream;

pub use job::{InStep, InboundJob, SetAside, Uncommitted, job_id};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::clock::now_ms;
use crate::config::{Config, InboundConfig, PatientIdMode, UnknownCommunity};
use crate::dicom::commitment::Reference;
use crate::dicom::scu::{Instance, Outcome, StoreTarget, store_all, store_stream};
use crate::durable;
use crate::gateway::inbound::reconcile::PatientIdPolicy;
use crate::gateway::jobs::{
    Cause, JobRecord, JobSummary, Pipeline, Progress, RetryError, StepError,
};
use crate::gateway::jobs::{blocking, state_name};
use crate::gateway::store::{IndexError, JobStore, RefusalStore, Store};
use crate::gateway::study::StudyDetails;
use crate::repository::api::Receipt;
use crate::repository::client::{Client, ClientError, ClientOptions, DownloadCheck};
use crate::token::Token;

/// Files of one inbound job's working folder.
struct Workdir(PathBuf);

impl Workdir {
    fn token(&self) -> PathBuf {
        self.0.join("token")
    }
    fn container(&self) -> PathBuf {
        self.0.join("container")
    }
    fn partial(&self) -> PathBuf {
        self.0.join("container.part")
    }
    fn pdi_zip(&self) -> PathBuf {
        self.0.join("pdi.zip")
    }
    fn pdi(&self) -> PathBuf {
        self.0.join("pdi")
    }
    /// SOP Instance UIDs the PACS took in an attempt that did not finish, one per line.
    fn stored(&self) -> PathBuf {
        self.0.join("stored")
    }
}

/// Why a token was not queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The token's repository is not on `inbound.allowed_repositories`.
    #[error(
        "the token points at repository {0}, which is not in inbound.allowed_repositories; add it if this hospital trusts it"
    )]
    Repository(String),
    /// The token's community code is not in `[repositories]`.
    #[error(transparent)]
    Community(#[from] UnknownCommunity),
    /// The token has expired.
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    /// The local Patient ID given with the token cannot be written into DICOM.
    #[error(
        "the local Patient ID given with the token is not usable: at most 64 printable ASCII characters, no backslash; give it again"
    )]
    PatientId,
    /// The job could not be recorded.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The job folder could not be written (disk full, permissions).
    #[error("cannot write the job folder {}: {source}; check the data folder's disk and owner", crate::telemetry::escape(&.path.display().to_string()))]
    Io {
        /// The job folder.
        path: PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
}

/// What queueing a token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// A new job.
    New(String),
    /// This token already has a job (running or done): not imported twice. (A failed
    /// job is queued again instead: dropping its token again is how staff retry.)
    Known(String),
}

/// The inbound worker of the daemon.
pub struct Inbound {
    config: Arc<Config>,
    jobs: JobStore,
    /// Senders whose sealed tokens the mailbox refused.
    refusals: RefusalStore,
    dir: PathBuf,
    /// Storage commitment reports awaited by imports, handed over by the SCP.
    reports: Arc<commitment::Reports>,
}

impl Inbound {
    /// Opens the inbound job store in the daemon's database.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be opened.
    pub fn new(config: Arc<Config>, store: &Store) -> Result<Inbound, IndexError> {
        let dir = config.jobs_dir().join("in");
        let jobs = JobStore::open(store, "inbound_jobs")?;
        jobs.reindex::<InboundJob>()?;
        let refusals = RefusalStore::open(store, "mailbox_refusals")?;
        let inbound = Inbound {
            jobs,
            config,
            refusals,
            dir,
            reports: Arc::default(),
        };
        inbound.sweep()?;
        Ok(inbound)
    }

    /// The storage commitment reports imports wait for: the SCP delivers those the PACS
    /// sends on a new association.
    pub fn reports(&self) -> Arc<commitment::Reports> {
        self.reports.clone()
    }

    /// Removes the folders of jobs that ended just before a crash (the end is recorded
    /// first); run once at start, since only a crash leaves one.
    fn sweep(&self) -> Result<(), IndexError> {
        for job in self.jobs.all::<InboundJob>()? {
            if job.ended() && !job.progress.crashed_out() && self.dir.join(&job.id).exists() {
                self.remove_leftovers(&job.id);
            }
        }
        Ok(())
    }

    /// Every inbound job, for `cloudpdi status`.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be read.
    pub fn summaries(&self) -> Result<Vec<JobSummary>, IndexError> {
        Ok(self
            .jobs
            .all::<InboundJob>()?
            .iter()
            .map(InboundJob::summary)
            .collect())
    }

    /// The summary of job `id`, if there is one (what a second hand-off of a token is
    /// told).
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be read.
    pub fn summary(&self, id: &str) -> Result<Option<JobSummary>, IndexError> {
        Ok(self
            .jobs
            .get::<InboundJob>(id)?
            .as_ref()
            .map(InboundJob::summary))
    }

    /// Records a token as a job (blocking): token file into the job folder first, then
    /// the record, so a crash in between only repeats this call.
    ///
    /// # Errors
    /// [`QueueError`] when the token is expired, from a repository not allowed, or the
    /// job cannot be written.
    pub fn queue(
        &self,
        token: &Token,
        local_patient_id: Option<String>,
    ) -> Result<Queued, QueueError> {
        self.queue_from(token, local_patient_id, None)
    }

    /// [`Inbound::queue`] for a token that `sender` sealed to this facility and posted to
    /// its mailbox: status says it came sealed from the sender, and its receipt names this
    /// facility; the issuer is the sender until the download names the document's creator.
    ///
    /// # Errors
    /// As [`Inbound::queue`].
    pub fn queue_sealed(&self, token: &Token, sender: &str) -> Result<Queued, QueueError> {
        self.queue_from(token, None, Some(sender))
    }

    /// The senders the mailbox refused, with the last reason, for `cloudpdi status`.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be read.
    pub fn refusals(&self) -> Result<Vec<mailbox::Refusal>, IndexError> {
        self.refusals.all()
    }

    fn queue_from(
        &self,
        token: &Token,
        local_patient_id: Option<String>,
        sealed_from: Option<&str>,
    ) -> Result<Queued, QueueError> {
        if local_patient_id
            .as_deref()
            .is_some_and(|id| reconcile::check_id(id).is_err())
        {
            return Err(QueueError::PatientId);
        }
        let id = job_id(
            &self.config.repository_url(&token.repository)?,
            &token.document_id,
        );
        let retry = match self.jobs.get::<InboundJob>(&id)? {
            Some(job) if job.step == InStep::Failed => true,
            Some(_) => return Ok(Queued::Known(id)),
            None => false,
        };
        token.check_not_expired(now_ms() / 1000)?;
        source(token, &self.config)?;
        let dir = Workdir(self.dir.join(&id));
        let folder_error = |source| QueueError::Io {
            path: dir.0.clone(),
            source,
        };
        private_dir(&dir.0).map_err(folder_error)?;
        // The new folder's entry is flushed before the record names it (and before the
        // mailbox deletes the message it came from).
        durable::sync_dir(&self.dir).map_err(folder_error)?;
        durable::write(&dir.token(), token.to_line().as_bytes(), 0o600).map_err(folder_error)?;
        // A sealed token's sender is known now; otherwise the download names the issuer.
        let issuer = sealed_from.map(str::to_owned).unwrap_or_default();
        let job = InboundJob {
            id: id.clone(),
            issuer,
            document_id: token.document_id.clone(),
            expires_at: token.expires_at,
            local_patient_id,
            step: InStep::Download,
            progress: Progress::new(),
            instances: 0,
            stored: 0,
            set_aside: Vec::new(),
            study: None,
            sealed_from: sealed_from.map(str::to_owned),
            committed: 0,
            uncommitted: Vec::new(),
        };
        if retry {
            self.jobs.put(&job)?;
            info!(job = %id, from = sealed_from, "failed inbound job queued again");
            Ok(Queued::New(id))
        } else if self.jobs.create(&job)? {
            info!(job = %id, from = sealed_from, "inbound job created");
            Ok(Queued::New(id))
        } else {
            Ok(Queued::Known(id))
        }
    }

    /// Puts a held job (a failure only a person can fix, e.g. the PACS refusing our AE
    /// title) or one waiting for its back-off back to work at once, with its attempts
    /// reset: `cloudpdi retry` once the cause is fixed. Returns the step it will run.
    ///
    /// # Errors
    /// [`RetryError`] when there is no such job, it is done, or it failed for good (its
    /// token is gone: it is imported anew by dropping the token again).
    pub fn retry(&self, id: &str) -> Result<InStep, RetryError> {
        let Some(mut job) = self.jobs.get::<InboundJob>(id)? else {
            return Err(RetryError::Unknown(id.to_owned()));
        };
        match job.step {
            InStep::Failed => return Err(RetryError::Ended(id.to_owned())),
            InStep::Done => {
                return Err(RetryError::NotFailed(id.to_owned(), state_name(job.step)));
            }
            _ if job.progress.attempts == 0 => {
                return Err(RetryError::NotFailed(id.to_owned(), state_name(job.step)));
            }
            // Due now: a worker may be running it; a retry would race its record.
            _ if !job.progress.held && job.progress.retry_at <= now_ms() => {
                return Err(RetryError::NotFailed(id.to_owned(), "running".into()));
            }
            _ => {}
        }
        job.progress.advanced();
        self.jobs.put(&job)?;
        info!(job = %job.id, step = ?job.step, "inbound job retried by the admin");
        Ok(job.step)
    }

    fn token(dir: &Workdir) -> Result<Token, StepError> {
        let text = std::fs::read_to_string(dir.token())
            .map_err(|e| StepError::file("read the token in", &dir.token(), &e))?;
        let text = zeroize::Zeroizing::new(text);
        Token::from_text(text.trim())
            .map_err(|e| StepError::permanent(e).with_cause(Cause::InvalidToken))
    }

    /// Runs one step; returns the next.
    async fn run_step(self: &Arc<Self>, job: &mut InboundJob) -> Result<InStep, StepError> {
        let dir = Workdir(self.dir.join(&job.id));
        match job.step {
            InStep::Download => self.receive(&dir, job).await,
            InStep::Open => {
                let limits = decrypt_limits(&self.config.inbound);
                blocking(move || {
                    let token = Self::token(&dir)?;
                    crate::container::decrypt_file_limited(
                        &token.container_key(),
                        &dir.container(),
                        &dir.pdi_zip(),
                        limits,
                    )?;
                    durable::sync_dir(&dir.0).map_err(|e| StepError::file("flush", &dir.0, &e))?;
                    Ok(())
                })
                .await?;
                Ok(InStep::Unpack)
            }
            InStep::Unpack => {
                let max_bytes = self.config.inbound.max_document_bytes();
                let (count, study) = blocking(move || {
                    durable::remove_dir_all(&dir.pdi())
                        .map_err(|e| StepError::file("remove", &dir.pdi(), &e))?;
                    unpack(&dir.pdi_zip(), &dir.pdi(), max_bytes)?;
                    let summary = crate::pdi::verify(&dir.pdi())?;
                    let study = StudyDetails::gather(&[dir.pdi()]).summary();
                    // One flush of the file system for every extracted file and folder,
                    // before Import is recorded (a file each would be hundreds of fsyncs).
                    std::fs::File::open(dir.pdi())
                        .and_then(|f| rustix::fs::syncfs(f).map_err(std::io::Error::from))
                        .map_err(|e| StepError::file("flush", &dir.pdi(), &e))?;
                    remove_container(&dir);
                    Ok((summary.instances, study))
                })
                .await?;
                job.instances = count as u64;
                job.study = Some(study);
                Ok(InStep::Import)
            }
            InStep::Import => {
                remove_container(&dir);
                self.import(&dir, job).await?;
                Ok(InStep::Receipt)
            }
            InStep::Receipt => {
                remove_container(&dir);
                let token = Self::token(&dir)?;
                let receipt = Receipt {
                    instances_imported: job.stored,
                    instances_refused: job.set_aside.len() as u64,
                    note: String::new(),
                    // The sender's status tells its recipients' receipts apart by it; only a
                    // sealed delivery names this facility (a patient's slip must not tell
                    // the sender which hospital the patient went to).
                    facility: job
                        .sealed_from
                        .as_ref()
                        .map(|_| self.config.facility.code.clone())
                        .filter(|code| crate::facility::is_code(code)),
                };
                match client(&token, &self.config)?
                    .receipt(&token.document_id, &token.download_proof(), &receipt)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.is_permanent() => {
                        warn!(job = %job.id, "the repository did not take the receipt: {e}");
                    }
                    Err(e) => return Err(StepError::transient(e)),
                }
                info!(job = %job.id, from = %job.issuer, stored = job.stored, set_aside = job.set_aside.len(), "import done");
                Ok(InStep::Done)
            }
            InStep::Done | InStep::Failed => Ok(job.step),
        }
    }

    /// Download, open, extract, verify and import as one stream
    /// ([`stream`]): the container is read while it downloads, and each instance goes to
    /// the PACS once its bytes authenticated and matched the manifest. Returns
    /// [`InStep::Receipt`], or [`InStep::Open`] for a container from an older sender whose
    /// archive has the manifest last (extracted whole, verified, then imported, as
    /// before).
    async fn receive(
        self: &Arc<Self>,
        dir: &Workdir,
        job: &mut InboundJob,
    ) -> Result<InStep, StepError> {
        let token = Self::token(dir)?;
        let client = client(&token, &self.config)?;
        // Renamed before a crash: downloading again would use one more of the
        // document's downloads, and the issuer was recorded before the rename.
        let complete = dir.container().exists();
        let container = if complete {
            dir.container()
        } else {
            open_partial(&dir.partial())
                .map_err(|e| StepError::file("create", &dir.partial(), &e))?;
            dir.partial()
        };
        let stored = read_stored(dir)?;
        durable::remove_dir_all(&dir.pdi())
            .map_err(|e| StepError::file("remove", &dir.pdi(), &e))?;
        let growing = Arc::new(stream::Growing::new(complete));
        let _reader_released = stream::EndOnDrop(growing.clone());
        let (negotiated, negotiation) = tokio::sync::oneshot::channel();
        let (instances, feed) = tokio::sync::mpsc::channel(stream::INSTANCE_QUEUE);
        let source = stream::Source {
            container,
            growing: growing.clone(),
            key: token.container_key(),
            limits: decrypt_limits(&self.config.inbound),
            pdi: dir.pdi(),
            stored: stored.clone(),
        };
        let reader = tokio::task::spawn_blocking(move || {
            let read = stream::read(source, negotiated, &instances);
            drop(instances);
            read
        });
        // With inbound.patient_id = "prefix" the lanes wait for the issuer, which the
        // repository names with the download.
        let needs_issuer = job.local_patient_id.is_none()
            && self.config.inbound.patient_id == PatientIdMode::Prefix
            && !complete;
        let (issuer_known, issuer_wait) = tokio::sync::oneshot::channel::<()>();
        let issuer_known = std::sync::Mutex::new(Some(issuer_known));
        // Told once: the issuer is known (the lanes start), or never will be (dropped
        // unsent: the download failed, the lanes do not start).
        let issuer_settled = |known: bool| {
            let sender = issuer_known
                .lock()
                .ok()
                .and_then(|mut sender| sender.take());
            if let (Some(sender), true) = (sender, known) {
                let _ = sender.send(());
            }
        };
        let shared = std::sync::Mutex::new(job.clone());
        let download = async {
            if complete {
                return Ok(Downloaded::Earlier);
            }
            // The lanes start with the repository's first answer, which names the issuer
            // (recorded durably with the rename below).
            let named = |creator: Option<&str>, size: u64| {
                growing.sized(size);
                if let (Some(creator), Ok(mut record)) = (creator, shared.lock()) {
                    record.issuer = creator.to_owned();
                }
                issuer_settled(true);
            };
            let started = std::time::Instant::now();
            let result = client
                .download_to_named(
                    &token.document_id,
                    &token.download_proof(),
                    &dir.partial(),
                    // The stream reader opens every chunk as it arrives (and the Open
                    // step of an older container, the whole): the AEAD is the check.
                    DownloadCheck::ByCaller,
                    named,
                    |_| growing.grew(),
                )
                .await;
            let downloaded = match result {
                Ok(downloaded) => {
                    info!(job = %job.id, bytes = downloaded.size, seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "container downloaded");
                    downloaded
                }
                Err(e) => {
                    growing.end(false);
                    issuer_settled(false);
                    return Err(StepError::from(e));
                }
            };
            let finished = self.downloaded(dir, &shared, downloaded.facility);
            growing.end(finished.is_ok());
            issuer_settled(finished.is_ok());
            finished.map(|()| Downloaded::Now(downloaded.hash))
        };
        let import = async {
            let mut results = Vec::new();
            let Ok(negotiation) = negotiation.await else {
                return Ok((results, 0));
            };
            if needs_issuer && issuer_wait.await.is_err() {
                return Ok((results, negotiation.instances));
            }
            let target = {
                let record = shared.lock().map_err(|_| poisoned())?;
                self.target(&record)?
            };
            let (outcomes, mut arriving) = tokio::sync::mpsc::unbounded_channel();
            info!(job = %job.id, instances = negotiation.instances, "manifest read, sending to the PACS as instances verify");
            let lanes = store_stream(Arc::new(target), negotiation.pairs, feed, outcomes);
            let collect = async {
                let mut log = StoredLog::open(&dir.stored())?;
                let mut count = stored.len() as u64;
                let mut shown = std::time::Instant::now();
                while let Some((instance, outcome)) = arriving.recv().await {
                    if matches!(outcome, Outcome::Stored { .. }) {
                        log.add(&instance.sop_instance_uid)?;
                        count += 1;
                        if shown.elapsed() >= PROGRESS_EVERY {
                            shown = std::time::Instant::now();
                            let record = {
                                let mut record = shared.lock().map_err(|_| poisoned())?;
                                record.instances = negotiation.instances;
                                record.stored = count;
                                record.clone()
                            };
                            self.jobs.put(&record)?;
                        }
                    }
                    results.push((instance, outcome));
                }
                Ok::<(), StepError>(())
            };
            let ((), collected) = tokio::join!(lanes, collect);
            collected?;
            Ok::<_, StepError>((results, negotiation.instances))
        };
        let (downloaded, imported, read) = tokio::join!(download, import, reader);
        *job = shared.into_inner().map_err(|_| poisoned())?;
        let read =
            read.map_err(|e| StepError::transient(format!("the PDI reader stopped: {e}")))?;
        let (results, total) = imported?;
        let mut held = stored;
        held.extend(
            results
                .iter()
                .filter(|(_, o)| matches!(o, Outcome::Stored { .. }))
                .map(|(i, _)| i.sop_instance_uid.clone()),
        );
        let genuine = |e: StepError| -> StepError {
            if held.is_empty() {
                e
            } else {
                noting(
                    e,
                    &format!(
                        "; the {} instances already stored came from authenticated, verified \
                     bytes and are not sent again",
                        held.len()
                    ),
                )
            }
        };
        let downloaded = downloaded.map_err(genuine)?;
        let read = match read {
            Err(e) if e.cause() == Cause::InvalidContainer => {
                Err(whose_fault(&dir.container(), downloaded, e).await)
            }
            read => read,
        };
        match read.map_err(genuine)? {
            stream::Streamed::ManifestLast => {
                legacy_checked(&dir.container(), downloaded).await?;
                Ok(InStep::Open)
            }
            stream::Streamed::Whole { summary } => {
                let instances = summary.instances as u64;
                job.instances = instances;
                let pdi = dir.pdi();
                let unsent = import::unsent(results.iter().map(|(_, outcome)| outcome)).is_some();
                let study = blocking(move || {
                    let study = StudyDetails::gather(std::slice::from_ref(&pdi)).summary();
                    if unsent {
                        // The Import step reads the extracted set after a crash: one flush
                        // of the file system for every file and folder before it is
                        // recorded (a file each would be hundreds of fsyncs). A set whose
                        // every instance is stored is not read again: no flush then.
                        std::fs::File::open(&pdi)
                            .and_then(|f| rustix::fs::syncfs(f).map_err(std::io::Error::from))
                            .map_err(|e| StepError::file("flush", &pdi, &e))?;
                    }
                    Ok(study)
                })
                .await?;
                job.study = Some(study);
                // The container stays until the next step is recorded (removed when it
                // starts): a restart here reads it again instead of downloading again,
                // which would take one more of the document's downloads.
                if !unsent && self.config.inbound.storage_commitment {
                    // Every instance is stored or set aside: the Import step (which sends
                    // neither again) asks the PACS to commit those stored, reading the set
                    // recorded here.
                    self.settle(dir, job, total.max(instances), held.clone(), &results)?;
                    let pdi = dir.pdi();
                    blocking(move || {
                        std::fs::File::open(&pdi)
                            .and_then(|f| rustix::fs::syncfs(f).map_err(std::io::Error::from))
                            .map_err(|e| StepError::file("flush", &pdi, &e))
                    })
                    .await?;
                    record_stored(dir, &held)?;
                    return Ok(InStep::Import);
                }
                if unsent {
                    // The set is whole and verified: the Import step sends what the PACS
                    // did not take, waiting and retrying as it always has.
                    record_stored(dir, &held)?;
                    job.stored = held.len() as u64;
                    info!(job = %job.id, stored = held.len(), "the PACS did not take every instance of the stream; the import step sends the rest");
                    return Ok(InStep::Import);
                }
                self.settle(dir, job, total.max(instances), held, &results)?;
                Ok(InStep::Receipt)
            }
        }
    }

    /// Records what the finished download says (the issuer) and keeps the container
    /// under its final name (unchecked: the stream reader authenticates it).
    fn downloaded(
        &self,
        dir: &Workdir,
        shared: &std::sync::Mutex<InboundJob>,
        facility: Option<String>,
    ) -> Result<(), StepError> {
        // Patient IDs belong to the facility that created the document: it is the
        // issuer even of a sealed token (whose sender stays shown as such).
        if let Some(creator) = facility {
            let record = {
                let mut job = shared.lock().map_err(|_| poisoned())?;
                if let Some(sender) = job.sealed_from.as_ref().filter(|s| **s != creator) {
                    warn!(
                        job = %job.id, from = %sender, creator = %creator,
                        "the sealed token names a document another facility created"
                    );
                }
                job.issuer = creator;
                job.clone()
            };
            // Recorded before the rename: a crash after it skips the download.
            self.jobs.put(&record)?;
        }
        std::fs::rename(dir.partial(), dir.container())
            .map_err(|e| StepError::file("rename the download", &dir.partial(), &e))?;
        durable::sync_dir(&dir.0).map_err(|e| StepError::file("flush", &dir.0, &e))
    }

    /// C-STOREs every instance the PDI lists but those an earlier attempt stored or set
    /// aside; refused ones are set aside.
    async fn import(&self, dir: &Workdir, job: &mut InboundJob) -> Result<(), StepError> {
        let pdi = dir.pdi();
        let instances = blocking(move || {
            let set = crate::pdi::FileSet::open(&pdi)?;
            set.instances()
                .iter()
                .map(|i| Instance::probe(&i.path).map_err(StepError::permanent))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let total = instances.len() as u64;
        // What an earlier attempt already stored is not sent again.
        let stored = read_stored(dir)?;
        let everything: Vec<Reference> = instances
            .iter()
            .map(|i| Reference {
                sop_class_uid: i.sop_class_uid.clone(),
                sop_instance_uid: i.sop_instance_uid.clone(),
            })
            .collect();
        let files: HashMap<String, PathBuf> = instances
            .iter()
            .map(|i| (i.sop_instance_uid.clone(), i.path.clone()))
            .collect();
        // Nor what it set aside: the PACS refused it for good.
        let set_aside: HashSet<String> = job
            .set_aside
            .iter()
            .map(|s| s.sop_instance_uid.clone())
            .collect();
        let mut instances = instances;
        instances.retain(|i| {
            !stored.contains(&i.sop_instance_uid) && !set_aside.contains(&i.sop_instance_uid)
        });
        let target = self.target(job)?;
        let results = store_all(Arc::new(target.clone()), instances).await;
        self.settle(dir, job, total, stored, &results)?;
        if self.config.inbound.storage_commitment {
            self.commit(dir, job, &target, everything, &files).await?;
        }
        Ok(())
    }

    /// Asks the PACS to commit every instance the import stored (all but those set
    /// aside). Those it does not commit are taken off the `stored` list, listed in the
    /// job with the PACS's reason, and the step fails (transient): its retry sends them
    /// again and asks again, as for instances not sent; one not committed by
    /// [`MAX_UNCOMMITTED_ROUNDS`] reports in a row is set aside instead (its file from
    /// `files`). A PACS that does not take storage commitment requests holds the job. The
    /// list is written before the request, so a restart while waiting asks again rather
    /// than sending again.
    async fn commit(
        &self,
        dir: &Workdir,
        job: &mut InboundJob,
        target: &StoreTarget,
        everything: Vec<Reference>,
        files: &HashMap<String, PathBuf>,
    ) -> Result<(), StepError> {
        let set_aside: HashSet<&str> = job
            .set_aside
            .iter()
            .map(|s| s.sop_instance_uid.as_str())
            .collect();
        let held: Vec<Reference> = everything
            .into_iter()
            .filter(|r| !set_aside.contains(r.sop_instance_uid.as_str()))
            .collect();
        let mut stored: HashSet<String> = held.iter().map(|r| r.sop_instance_uid.clone()).collect();
        record_stored(dir, &stored)?;
        let timeout = Duration::from_secs(self.config.inbound.commitment_timeout);
        info!(job = %job.id, instances = held.len(), "asking the PACS for storage commitment");
        let verdict = commitment::commit(target, &held, &self.reports, timeout)
            .await
            .map_err(|e| match &e {
                commitment::CommitError::Pacs(cause) if cause.is_permanent() => StepError::held(
                    Cause::of_pacs(cause),
                    format!("{e}, then run `cloudpdi retry {}`", job.id),
                ),
                commitment::CommitError::Pacs(cause) => {
                    StepError::transient(&e).with_cause(Cause::of_pacs(cause))
                }
                commitment::CommitError::NotSupported(_) => StepError::held(
                    Cause::PacsRejected,
                    format!("{e}, then run `cloudpdi retry {}`", job.id),
                ),
                commitment::CommitError::Refused { status, .. }
                    if *status != crate::dicom::dimse::status::RESOURCE_LIMITATION =>
                {
                    StepError::held(
                        Cause::PacsRejected,
                        format!(
                            "{e}: configure the PACS to accept storage commitment requests from \
                             inbound.calling_ae_title (or set inbound.storage_commitment = \
                             false), then run `cloudpdi retry {}`",
                            job.id
                        ),
                    )
                }
                commitment::CommitError::Refused { .. } => {
                    StepError::transient(&e).with_cause(Cause::PacsBusy)
                }
                _ => StepError::transient(&e).with_cause(Cause::PacsUnreachable),
            })?;
        job.committed = verdict.committed.len() as u64;
        let rounds_before: HashMap<String, u32> = job
            .uncommitted
            .drain(..)
            .map(|u| (u.sop_instance_uid, u.rounds))
            .collect();
        let mut set_aside_now = 0usize;
        for (uid, reason) in &verdict.failed {
            let rounds = rounds_before
                .get(uid)
                .copied()
                .unwrap_or(0)
                .saturating_add(1);
            stored.remove(uid);
            match files.get(uid) {
                Some(file) if rounds >= MAX_UNCOMMITTED_ROUNDS => {
                    let reason = format!(
                        "not committed by the PACS in {rounds} storage commitment reports in a \
                         row (the last: {reason}); not sent again"
                    );
                    self.put_aside(job, file, uid, &reason)?;
                    set_aside_now += 1;
                }
                _ => job.uncommitted.push(Uncommitted {
                    sop_instance_uid: uid.clone(),
                    reason: reason.clone(),
                    rounds,
                }),
            }
        }
        if set_aside_now > 0 {
            self.flush_set_aside(job)?;
        }
        record_stored(dir, &stored)?;
        job.stored = stored.len() as u64;
        let Some(first) = job.uncommitted.first() else {
            info!(
                job = %job.id,
                committed = job.committed,
                set_aside = set_aside_now,
                "the PACS committed every instance{}",
                if set_aside_now > 0 { " not set aside" } else { "" }
            );
            return Ok(());
        };
        Err(StepError::transient(format!(
            "the PACS did not commit {} of {} instances (the first, {}: {}); they are sent \
             again and committed again (set aside after {MAX_UNCOMMITTED_ROUNDS} reports in a \
             row)",
            job.uncommitted.len(),
            held.len(),
            first.sop_instance_uid,
            first.reason
        ))
        .with_cause(Cause::PacsRejected))
    }

    /// What an import attempt's `results` leave: the instances stored so far recorded
    /// (`stored`, with those of earlier attempts) and the job waiting or retrying when some
    /// were not sent; else the refused ones set aside and the counts in the job.
    fn settle(
        &self,
        dir: &Workdir,
        job: &mut InboundJob,
        total: u64,
        mut stored: HashSet<String>,
        results: &[(Instance, Outcome)],
    ) -> Result<(), StepError> {
        if let Some(unsent) = import::unsent(results.iter().map(|(_, outcome)| outcome)) {
            stored.extend(
                results
                    .iter()
                    .filter(|(_, o)| matches!(o, Outcome::Stored { .. }))
                    .map(|(i, _)| i.sop_instance_uid.clone()),
            );
            record_stored(dir, &stored)?;
            let counts = format!(
                "{} of {total} instances not sent; {} stored are not sent again",
                unsent.count,
                stored.len()
            );
            let cause = Cause::of_pacs(&unsent.cause);
            return Err(if unsent.cause.is_permanent() {
                StepError::held(
                    cause,
                    format!(
                        "{}, then run `cloudpdi retry {}` ({counts})",
                        unsent.cause, job.id
                    ),
                )
            } else {
                StepError::transient(format!("{} ({counts})", unsent.cause)).with_cause(cause)
            });
        }
        // Instances set aside by an earlier attempt stay set aside (they are not sent again).
        let before = job.set_aside.len();
        for (instance, outcome) in results {
            if let Outcome::Refused { reason, .. } = outcome {
                self.put_aside(job, &instance.path, &instance.sop_instance_uid, reason)?;
            }
        }
        if job.set_aside.len() > before {
            self.flush_set_aside(job)?;
        }
        job.stored = total - job.set_aside.len() as u64;
        Ok(())
    }

    /// Keeps the file of an instance the PACS refused for good in the job's set-aside
    /// folder and lists it in the job with `reason` (once: a listed one is left as is).
    fn put_aside(
        &self,
        job: &mut InboundJob,
        path: &Path,
        sop_instance_uid: &str,
        reason: &str,
    ) -> Result<(), StepError> {
        if job
            .set_aside
            .iter()
            .any(|s| s.sop_instance_uid == sop_instance_uid)
        {
            return Ok(());
        }
        let set_aside_dir = self.set_aside_dir(job);
        let file = set_aside_dir.join(format!("{}.dcm", job.set_aside.len() + 1));
        std::fs::create_dir_all(&set_aside_dir)
            .map_err(|e| StepError::file("create", &set_aside_dir, &e))?;
        keep_aside(path, &file).map_err(|e| StepError::file("set aside", path, &e))?;
        tracing::debug!(job = %job.id, sop_instance = %sop_instance_uid, "instance set aside: {reason}");
        job.set_aside.push(SetAside {
            sop_instance_uid: sop_instance_uid.to_owned(),
            file,
            reason: reason.to_owned(),
        });
        Ok(())
    }

    fn set_aside_dir(&self, job: &InboundJob) -> PathBuf {
        self.config.spool.data_dir.join("set-aside").join(&job.id)
    }

    /// Makes the set-aside files durable and logs them in one line.
    fn flush_set_aside(&self, job: &InboundJob) -> Result<(), StepError> {
        let set_aside_dir = self.set_aside_dir(job);
        if let Some(first) = job.set_aside.first() {
            // One line for the import, not one per file; status lists each with its reason.
            warn!(job = %job.id, set_aside = job.set_aside.len(), "instances refused by the PACS set aside in {}, the first because: {}", set_aside_dir.display(), first.reason);
            durable::sync_dir(&set_aside_dir)
                .map_err(|e| StepError::file("flush", &set_aside_dir, &e))?;
            if let Some(parent) = set_aside_dir.parent() {
                durable::sync_dir(parent).map_err(|e| StepError::file("flush", parent, &e))?;
            }
        }
        Ok(())
    }

    /// Removes what a finished job left in its folder (the token, the PDI).
    fn remove_leftovers(&self, id: &str) {
        if let Err(e) = durable::remove_dir_all(&self.dir.join(id)) {
            warn!(job = %id, "cannot remove the job folder: {e}");
        }
    }

    /// Where and how the job's instances are stored. With `inbound.patient_id = "prefix"`
    /// the prefix is the issuer the repository named; a job without one is held.
    fn target(&self, job: &InboundJob) -> Result<StoreTarget, StepError> {
        let inbound = &self.config.inbound;
        let policy = match (&job.local_patient_id, inbound.patient_id) {
            (Some(id), _) => PatientIdPolicy::Local(id.clone()),
            (None, PatientIdMode::Prefix) if job.issuer.is_empty() => {
                return Err(StepError::held(
                    Cause::Other,
                    format!(
                        "inbound.patient_id = \"prefix\", but the repository did not say which \
                         facility sent this study (no {} header), so there is no prefix: \
                         hand the token over again with a local Patient ID (`cloudpdi \
                         receive --patient-id`), or set inbound.patient_id = \"keep\" and run \
                         `cloudpdi retry {}`",
                        crate::repository::api::FACILITY_HEADER,
                        job.id
                    ),
                ));
            }
            (None, PatientIdMode::Prefix) => PatientIdPolicy::Prefix(format!("{}-", job.issuer)),
            (None, PatientIdMode::Keep) => PatientIdPolicy::Keep,
        };
        // The files were usable at start: one that cannot be used now is most likely being
        // replaced (a certificate rotation), so the job is tried again.
        import::store_target(inbound, policy).map_err(|e| {
            StepError::transient(format!(
                "{e} (it was usable when the gateway started: a certificate being replaced? \
                 the import is tried again later)"
            ))
        })
    }
}

impl Pipeline for Inbound {
    type Job = InboundJob;
    const NAME: &'static str = "inbound";

    fn due(&self) -> Result<Vec<InboundJob>, IndexError> {
        let now = now_ms();
        Ok(self
            .jobs
            .active::<InboundJob>()?
            .into_iter()
            .filter(|job| !job.ended() && job.progress.due(now))
            .collect())
    }

    fn store(&self) -> &JobStore {
        &self.jobs
    }

    fn max_backoff(&self) -> Duration {
        Duration::from_secs(self.config.inbound.max_backoff)
    }

    async fn step(self: &Arc<Self>, job: &mut InboundJob) -> Result<InStep, StepError> {
        self.run_step(job).await
    }

    /// Only once the end is recorded: a crash before leaves the folder for the step to
    /// run again, a crash after is swept at the next start.
    fn job_ended(&self, job: &InboundJob) {
        if !job.progress.crashed_out() {
            self.remove_leftovers(&job.id);
        }
    }

    /// An import ends with the Import step, or with a streamed Download step that
    /// imported every instance (one from an older sender goes on to Open, one the PACS
    /// did not wholly take to Import, and those count there).
    fn count_step(&self, job: &InboundJob, done: InStep, metrics: &Metrics) {
        let streamed = done == InStep::Download
            && job.study.is_some()
            && job.stored + job.set_aside.len() as u64 >= job.instances;
        if done == InStep::Import || streamed {
            metrics.imports.inc();
            metrics
                .instances_set_aside
                .inc_by(job.set_aside.len() as u64);
        }
    }

    fn crashed(&self, job: &InboundJob) -> String {
        format!(
            "this token's data crashed the importer; kept in {}",
            self.dir.join(&job.id).display()
        )
    }
}

/// Storage commitment reports in a row that may fail an instance before it is set aside
/// (a PACS that keeps losing it would otherwise have it sent for ever).
const MAX_UNCOMMITTED_ROUNDS: u32 = 3;

/// How often a streamed import writes its count of stored instances into the job (for
/// `cloudpdi status`).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// `error` with `note` added to its message.
fn noting(error: StepError, note: &str) -> StepError {
    match error {
        StepError::Transient { message, cause } => StepError::Transient {
            message: message + note,
            cause,
        },
        StepError::Permanent { message, cause } => StepError::Permanent {
            message: message + note,
            cause,
        },
        StepError::Held { message, cause } => StepError::Held {
            message: message + note,
            cause,
        },
    }
}

fn poisoned() -> StepError {
    StepError::transient("an inbound worker stopped in the middle of the job")
}

/// The SOP Instance UIDs earlier attempts stored (one per line in `stored`).
fn read_stored(dir: &Workdir) -> Result<HashSet<String>, StepError> {
    match std::fs::read_to_string(dir.stored()) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(StepError::file("read", &dir.stored(), &e)),
    }
}

/// Writes the `stored` file anew, durably, with `stored` (sorted).
fn record_stored(dir: &Workdir, stored: &HashSet<String>) -> Result<(), StepError> {
    let mut list: Vec<&String> = stored.iter().collect();
    list.sort();
    let text: String = list.iter().map(|uid| format!("{uid}\n")).collect();
    durable::write(&dir.stored(), text.as_bytes(), 0o600)
        .map_err(|e| StepError::file("write", &dir.stored(), &e))
}

/// Where the container a stream read came from.
#[derive(Clone, Copy)]
enum Downloaded {
    /// An earlier attempt downloaded it (and was stopped before the next step): not
    /// synced, so a power cut may have damaged it since.
    Earlier,
    /// This attempt, and the repository's hash of the document when it named one.
    Now(Option<crate::repository::client::RepositoryHash>),
}

/// A container that failed to authenticate (`error`), and whose fault that is. One an
/// earlier attempt downloaded may have lost bytes to a power cut (it is not synced): it
/// is removed and downloaded again. One this attempt downloaded is compared with the
/// repository's hash of the document: when they differ, the repository served other bytes
/// than it was given, so the container is removed and the error is the repository's,
/// retried with a new download; when they match (or the repository named no hash), the
/// container was damaged before it was uploaded, or the token is not its own: `error`,
/// final. Hashing only here keeps a pass over the whole container off every import that
/// authenticates.
async fn whose_fault(container: &Path, downloaded: Downloaded, error: StepError) -> StepError {
    let hash = match downloaded {
        Downloaded::Earlier => {
            remove_file(container);
            return StepError::transient(format!(
                "the container kept from an earlier attempt does not authenticate ({error}); \
                 it may have been damaged by a restart of the machine and is downloaded again"
            ))
            .with_cause(Cause::LocalIo);
        }
        Downloaded::Now(None) => return error,
        Downloaded::Now(Some(hash)) => hash,
    };
    match hash.differs(container).await {
        Ok(true) => {
            remove_file(container);
            StepError::from(ClientError::not_the_repositorys_bytes())
        }
        Ok(false) => error,
        // Not judged: tried again rather than failed for good on a local read error.
        Err(e) => StepError::transient(format!(
            "{error}; whether the repository served other bytes than it was given could \
             not be checked: {e}"
        ))
        .with_cause(Cause::LocalIo),
    }
}

/// A container from an older sender (its manifest last), which the stream did not
/// authenticate and which is opened whole after this step: checked against the
/// repository's hash first (as every download was before the stream), so that bytes the
/// repository changed are downloaded again rather than failing the job for good, then
/// synced, since the next step reads it after a restart.
async fn legacy_checked(container: &Path, downloaded: Downloaded) -> Result<(), StepError> {
    if let Downloaded::Now(Some(hash)) = downloaded {
        if hash.differs(container).await.map_err(StepError::from)? {
            remove_file(container);
            return Err(StepError::from(ClientError::not_the_repositorys_bytes()));
        }
    }
    let path = container.to_owned();
    blocking(move || {
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| StepError::file("flush", &path, &e))
    })
    .await
}

/// Removes the job's downloaded container once a step after the stream is recorded
/// (the extracted set has everything the job still needs): a missing one is fine.
fn remove_container(dir: &Workdir) {
    remove_file(&dir.container());
}

/// Removes a file the job no longer wants; a missing one is fine, a failure is logged.
fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Creates the download's partial file (mode 0600) if it is not there, so that the
/// reader can follow it from the start.
fn open_partial(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// The `stored` file of a streamed import, one line appended per instance the PACS took
/// as soon as the collector takes its answer (the page cache outlives the process): a
/// `kill -9` or a power cut loses only the answers not yet written (still queued for
/// the collector), whose instances are then sent again (the PACS keeps one copy per SOP
/// Instance UID).
struct StoredLog {
    file: std::fs::File,
    path: PathBuf,
}

impl StoredLog {
    fn open(path: &Path) -> Result<StoredLog, StepError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StepError::file("open", path, &e))?;
        Ok(StoredLog {
            file,
            path: path.to_owned(),
        })
    }

    fn add(&mut self, uid: &str) -> Result<(), StepError> {
        use std::io::Write;
        self.file
            .write_all(format!("{uid}\n").as_bytes())
            .map_err(|e| StepError::file("write", &self.path, &e))
    }
}

/// Whether repository URL `url` is `allowed` or below it: the match ends at a `/`, so
/// `https://repo.example` does not let `https://repo.example.evil.com` through.
fn within(url: &str, allowed: &str) -> bool {
    let allowed = allowed.trim_end_matches('/');
    url.strip_prefix(allowed)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Keeps a refused instance at `to` (a link to the extracted file when the folder is on
/// the same file system, else a synced copy): the job folder goes once the job is done.
fn keep_aside(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
        std::fs::File::open(to)?.sync_all()?;
    }
    Ok(())
}

/// The base URL of the token's repository: its URL or its community code resolved through
/// `[repositories]`, on `inbound.allowed_repositories` when that lists any.
///
/// # Errors
/// [`QueueError::Community`] for an unknown code, [`QueueError::Repository`] for a
/// repository not allowed.
pub fn source(token: &Token, config: &Config) -> Result<String, QueueError> {
    let url = config.repository_url(&token.repository)?;
    let allowed = &config.inbound.allowed_repositories;
    if !allowed.is_empty() && !allowed.iter().any(|a| within(&url, a)) {
        return Err(QueueError::Repository(url));
    }
    Ok(url)
}

/// A repository client for the token's own repository (no API key: the proof is the
/// authorization), within the receiving side's bounds.
///
/// # Errors
/// A permanent [`StepError`] for a repository not resolved or not allowed ([`source`]),
/// or a URL the client refuses (plain http to another host).
pub fn client(token: &Token, config: &Config) -> Result<Client, StepError> {
    let url = source(token, config).map_err(StepError::permanent)?;
    let inbound = &config.inbound;
    let options = ClientOptions {
        allow_plain_http: inbound.allow_plain_http,
        plain_http_key: "inbound.allow_plain_http",
        max_download_bytes: inbound.max_document_bytes(),
        max_download_key: "inbound.max_document_mb",
        ..ClientOptions::default()
    };
    Client::new(&url, None, options).map_err(StepError::permanent)
}

/// What opening a container may write on the receiving side.
fn decrypt_limits(inbound: &InboundConfig) -> crate::container::DecryptLimits {
    crate::container::DecryptLimits {
        max_output: inbound.max_document_bytes(),
        ..crate::container::DecryptLimits::default()
    }
}

/// Creates a job or work folder readable by its owner only (it holds the token and
/// patient data), and makes an existing one so.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Extracts the PDI ZIP into `dest` after checking what it declares against
/// `max_bytes` (`inbound.max_document_mb`) and the free disk space, so a ZIP that would
/// fill the disk is refused before anything is written.
fn unpack(zip: &Path, dest: &Path, max_bytes: u64) -> Result<(), StepError> {
    use crate::pdi::{PdiError, zip};
    let limits = zip::Limits {
        max_total_bytes: max_bytes,
        ..zip::Limits::default()
    };
    let declared = zip::declared(zip, limits).map_err(PdiError::from)?;
    room_for(dest, declared.bytes, 0)?;
    zip::extract(zip, dest, limits).map_err(PdiError::from)?;
    Ok(())
}

/// Refuses, before anything is written, to extract `bytes` into `dest` when the free
/// disk space (less the reserve for the rest of the system) cannot hold them and the
/// `to_come` bytes of the container that its download, running alongside, has still to
/// write: a transient failure, tried again later.
fn room_for(dest: &Path, bytes: u64, to_come: u64) -> Result<(), StepError> {
    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let (free, reserve) = crate::repository::client::disk_room(
        parent,
        crate::repository::client::DEFAULT_DISK_RESERVE_BYTES,
    )
    .map_err(|e| StepError::file("measure the free space of", parent, &e))?;
    let need = bytes.saturating_add(to_come);
    if need.saturating_add(reserve) > free {
        let parts = if to_come > 0 {
            format!(
                " ({bytes} for the PDI, {to_come} for the rest of the container, still downloading)"
            )
        } else {
            String::new()
        };
        return Err(StepError::transient(format!(
            "No space left to extract the PDI: {need} bytes needed in {}{parts}, {free} free \
             (of which {reserve} stay free for the rest of the system); no file of the study \
             was extracted; free disk space, the step is tried again later",
            parent.display()
        ))
        .with_cause(Cause::DiskFull));
    }
    Ok(())
}

/// Downloads, decrypts and extracts a token's PDI into `out` without a daemon, as if
/// reading the disc (`cloudpdi receive --out`), within `config`'s `[inbound]` bounds and
/// from the repository its `[repositories]` resolves. The container is read as it
/// downloads, as the daemon does: the set is extracted beside `out` and renamed to it
/// once whole and verified.
///
/// # Errors
/// [`StepError`] saying what failed; `out` must not exist, and nothing appears there from
/// a container that fails authentication or verification.
pub async fn receive_to_folder(
    token: &Token,
    out: &Path,
    config: &Config,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<crate::pdi::Summary, StepError> {
    token
        .check_not_expired(now_ms() / 1000)
        .map_err(StepError::permanent)?;
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(StepError::permanent(format!(
            "{} exists: name a folder that does not exist yet (the study is extracted there \
             whole, or not at all)",
            out.display()
        )));
    }
    let work = Workdir(out.with_extension("cloudpdi-download"));
    private_dir(&work.0).map_err(|e| StepError::file("create", &work.0, &e))?;
    let result = match stream_to_folder(token, &work, config, progress).await {
        Ok(summary) => rustix::fs::renameat_with(
            rustix::fs::CWD,
            work.pdi(),
            rustix::fs::CWD,
            out,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map(|()| summary)
        .map_err(|e| StepError::file("move the study to", out, &std::io::Error::from(e))),
        Err(e) => Err(e),
    };
    // A partial download is kept to be resumed by the next run; after a refusal or once
    // done, nothing is.
    if !matches!(result, Err(StepError::Transient { .. })) || !work.partial().exists() {
        durable::remove_dir_all(&work.0).map_err(|e| StepError::file("remove", &work.0, &e))?;
    } else {
        durable::remove_dir_all(&work.pdi())
            .map_err(|e| StepError::file("remove", &work.pdi(), &e))?;
    }
    result
}

/// Downloads the token's container into `work` and, alongside, reads it into the set
/// `work.pdi()` ([`stream::read`]); a container from an older sender, whose archive has
/// the manifest last, is opened and extracted once downloaded.
async fn stream_to_folder(
    token: &Token,
    work: &Workdir,
    config: &Config,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<crate::pdi::Summary, StepError> {
    let client = client(token, config)?;
    open_partial(&work.partial()).map_err(|e| StepError::file("create", &work.partial(), &e))?;
    durable::remove_dir_all(&work.pdi()).map_err(|e| StepError::file("remove", &work.pdi(), &e))?;
    let growing = Arc::new(stream::Growing::new(false));
    let _reader_released = stream::EndOnDrop(growing.clone());
    let (negotiated, _no_lanes) = tokio::sync::oneshot::channel();
    let (instances, mut feed) = tokio::sync::mpsc::channel(stream::INSTANCE_QUEUE);
    let source = stream::Source {
        container: work.partial(),
        growing: growing.clone(),
        key: token.container_key(),
        limits: decrypt_limits(&config.inbound),
        pdi: work.pdi(),
        stored: HashSet::new(),
    };
    let reader = tokio::task::spawn_blocking(move || stream::read(source, negotiated, &instances));
    // No PACS here: the verified instances the reader hands on are only counted off.
    let drain = async { while feed.recv().await.is_some() {} };
    let download = async {
        let result = client
            .download_to_named(
                &token.document_id,
                &token.download_proof(),
                &work.partial(),
                DownloadCheck::ByCaller,
                |_, size| growing.sized(size),
                |bytes| {
                    growing.grew();
                    progress(bytes);
                },
            )
            .await;
        growing.end(result.is_ok());
        result.map_err(StepError::from)
    };
    let (downloaded, (), read) = tokio::join!(download, drain, reader);
    let downloaded = Downloaded::Now(downloaded?.hash);
    let read = read.map_err(|e| StepError::transient(format!("the PDI reader stopped: {e}")))?;
    let read = match read {
        Err(e) if e.cause() == Cause::InvalidContainer => {
            Err(whose_fault(&work.partial(), downloaded, e).await)
        }
        read => read,
    };
    match read? {
        stream::Streamed::Whole { summary } => Ok(summary),
        stream::Streamed::ManifestLast => {
            legacy_checked(&work.partial(), downloaded).await?;
            let (key, work) = (token.container_key(), Workdir(work.0.clone()));
            let limits = decrypt_limits(&config.inbound);
            let max_bytes = config.inbound.max_document_bytes();
            blocking(move || {
                durable::remove_dir_all(&work.pdi())
                    .map_err(|e| StepError::file("remove", &work.pdi(), &e))?;
                crate::container::decrypt_file_limited(
                    &key,
                    &work.partial(),
                    &work.pdi_zip(),
                    limits,
                )?;
                unpack(&work.pdi_zip(), &work.pdi(), max_bytes)?;
                Ok(crate::pdi::verify(&work.pdi())?)
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_repositories_match_at_a_path_boundary() {
        let allowed = "https://repo.example/";
        assert!(within("https://repo.example", allowed));
        assert!(within("https://repo.example/tenant-a", allowed));
        assert!(!within("https://repo.example.evil.com", allowed));
        assert!(!within("https://repo.example:8443", allowed));
        assert!(!within("http://repo.example", allowed));
        assert!(within("https://repo.example/a/b", "https://repo.example/a"));
        assert!(!within("https://repo.example/ab", "https://repo.example/a"));
    }

    /// A document named by its community code in one token and by its URL in another is
    /// one job: imported once.
    #[test]
    fn a_document_named_by_community_or_by_url_is_one_job() {
        use crate::token::RepositoryRef;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.spool.data_dir = dir.path().to_owned();
        config
            .repositories
            .insert("R1".into(), "https://r.example.jp/".into());
        let store = Store::open(&config.index_dir()).expect("store");
        let inbound = Inbound::new(Arc::new(config), &store).expect("inbound");
        let expires = u32::try_from(now_ms() / 1000 + 3600).expect("expiry");
        let document = "0123456789abcdef0123";
        let by_code =
            Token::issue(RepositoryRef::Community("R1".into()), document, expires).expect("token");
        let by_url = Token::issue(
            RepositoryRef::Url("https://r.example.jp".into()),
            document,
            expires,
        )
        .expect("token");
        let Queued::New(id) = inbound.queue(&by_code, None).expect("queued") else {
            panic!("the first token makes a job");
        };
        assert_eq!(
            inbound.queue(&by_url, None).expect("queued"),
            Queued::Known(id)
        );
    }

    /// The `[inbound.pacs_tls]` files were usable at start; one that cannot be read at job
    /// time (a certificate being replaced) is named, and the job is tried again.
    #[test]
    fn a_tls_file_unreadable_at_job_time_is_transient_and_named() {
        use crate::token::RepositoryRef;
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("rotating-ca.pem");
        let mut config = Config::default();
        config.spool.data_dir = dir.path().to_owned();
        config.inbound.pacs = "127.0.0.1:104".into();
        config.inbound.pacs_tls = Some(crate::config::PacsTlsConfig {
            ca: missing.clone(),
            certificate: None,
            key: None,
            server_name: None,
        });
        let store = Store::open(&config.index_dir()).expect("store");
        let inbound = Inbound::new(Arc::new(config), &store).expect("inbound");
        let expires = u32::try_from(now_ms() / 1000 + 3600).expect("expiry");
        let token = Token::issue(
            RepositoryRef::Url("https://r.example.jp".into()),
            "0123456789abcdef0123",
            expires,
        )
        .expect("token");
        let Queued::New(id) = inbound
            .queue(&token, Some("LOCAL1".into()))
            .expect("queued")
        else {
            panic!("a new job");
        };
        let job: InboundJob = inbound.jobs.get(&id).expect("read").expect("the job");
        let error = inbound.target(&job).expect_err("the CA file is missing");
        assert!(matches!(error, StepError::Transient { .. }), "{error:?}");
        assert!(
            error.to_string().contains(&format!(
                "inbound.pacs_tls.ca = {}: cannot read the file",
                missing.display()
            )),
            "{error}"
        );
    }

    #[test]
    fn a_set_aside_file_is_kept_when_the_job_folder_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (
            dir.path().join("job/pdi/IM1"),
            dir.path().join("aside/1.dcm"),
        );
        std::fs::create_dir_all(from.parent().expect("parent")).expect("mkdir");
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::write(&from, b"refused instance").expect("write");
        std::fs::write(&to, b"left by an earlier attempt").expect("write");
        keep_aside(&from, &to).expect("kept");
        durable::remove_dir_all(&dir.path().join("job")).expect("job folder removed");
        assert_eq!(std::fs::read(&to).expect("read"), b"refused instance");
    }
}
