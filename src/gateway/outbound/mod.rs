//! The outbound pipeline: a stable batch becomes a token.
//!
//! Steps of a job (one per batch, id = the batch id), each repeated safely after a crash:
//! 1. **pack**: the batch's spooled instances -> AI-image policy -> PDI ZIP
//!    (`jobs/out/<batch>/pdi.zip`);
//! 2. **seal**: a fresh secret (kept in the job's pending token file, mode 0600, until the
//!    token is issued) -> compress + encrypt -> `container`;
//! 3. **upload**: the repository assigns a document ID (kept in the job record at once),
//!    the container is uploaded in parts, resuming after any interruption;
//! 4. **issue**: the token (document ID + secret) is written to the route's token folder,
//!    with the patient's slip; the job folder is removed;
//! 5. **deliver**: the route's delivery command, if any, is run with the slip's path.
//!
//! The spooled instances are removed once the route's retention has passed.
//! Exactly one token per batch: the secret and the document ID are fixed the first time
//! their step completes, so a repeated issue step writes the same token again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::admin::metrics::Metrics;
use crate::clock::now_ms;
use crate::config::{Config, RouteConfig};
use crate::container::{self, Compression, Options};
use crate::durable;
use crate::gateway::jobs::{
    JobRecord, JobSummary, Pipeline, Progress, StepError, blocking, state_name,
};
use crate::gateway::reception::batch::BatchId;
use crate::gateway::reception::spool::Spool;
use crate::gateway::store::{IndexError, JobStore};
use crate::pdi::{self, BuildOptions};
use crate::repository::api::NewDocument;
use crate::repository::client::{Client, ClientOptions};
use crate::token::slip::{self, SlipDetails, SlipFormat};
use crate::token::{SECRET_LEN, Secret, Token};

/// Where an outbound job is; the step named is the next one to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutStep {
    /// Build the PDI ZIP.
    Pack,
    /// Encrypt it.
    Seal,
    /// Register and upload the container.
    Upload,
    /// Write the token and the slip.
    Issue,
    /// Run the delivery command.
    Deliver,
    /// Finished.
    Done,
    /// Stopped for good; `last_error` says why.
    Failed,
}

/// The durable record of one outbound job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboundJob {
    /// `B000042` for a batch of the daemon, `S20261125-083000` for `cloudpdi send`;
    /// names the token file and the slip.
    pub id: String,
    /// The batch this job sends, if it came from the spool.
    pub batch: Option<BatchId>,
    /// The batch's route.
    pub route: String,
    /// The next step.
    pub step: OutStep,
    /// Times, attempts, last error.
    pub progress: Progress,
    /// Instances in the PDI.
    pub instances: u64,
    /// Instances left out by the AI-image policy.
    pub excluded: u64,
    /// Size of the sealed container.
    pub container_bytes: u64,
    /// Expiry of token and document (Unix seconds), fixed when the document is created.
    pub expires_at: u32,
    /// The repository's document ID, once assigned.
    pub document_id: Option<String>,
    /// The token file, once issued.
    pub token_file: Option<PathBuf>,
    /// The slip, once rendered.
    pub slip_file: Option<PathBuf>,
    /// Whether the spooled instances were removed after the retention period.
    pub spool_removed: bool,
    /// The step that failed for good, where `cloudpdi retry` starts again.
    #[serde(default)]
    pub failed_at: Option<OutStep>,
    /// Base URL of the repository that holds `document_id` (what the token names).
    #[serde(default)]
    pub repository: Option<String>,
}

impl OutboundJob {
    fn new(id: String, batch: Option<BatchId>, route: &str) -> OutboundJob {
        OutboundJob {
            id,
            batch,
            route: route.to_owned(),
            step: OutStep::Pack,
            progress: Progress::new(),
            instances: 0,
            excluded: 0,
            container_bytes: 0,
            expires_at: 0,
            document_id: None,
            token_file: None,
            slip_file: None,
            spool_removed: false,
            failed_at: None,
            repository: None,
        }
    }

    /// The job as `cloudpdi status` lists it.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id.clone(),
            direction: "outbound".into(),
            state: state_name(self.step),
            progress: match self.step {
                OutStep::Pack => format!("route {}", self.route),
                _ => format!(
                    "{} instances, {} excluded, {:.1} MB",
                    self.instances,
                    self.excluded,
                    self.container_bytes as f64 / 1e6
                ),
            },
            notes: Vec::new(),
            bookkeeping: self.progress.clone(),
        }
    }
}

/// Why a job could not be retried.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// No outbound job has this ID.
    #[error("no outbound job {0}: `cloudpdi status` lists the jobs")]
    Unknown(String),
    /// The job is still running or done.
    #[error("job {0} is {1}, not failed: only failed jobs are retried")]
    NotFailed(String, String),
    /// The job store failed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Everything the outbound steps need, shared by the daemon and `cloudpdi send`.
pub struct Sender {
    /// The daemon's configuration (facility, routes, folders).
    pub config: Arc<Config>,
    /// Each route's repository, or why it cannot be used (that route's jobs fail with
    /// the reason; the others go on).
    links: BTreeMap<String, Result<Link, String>>,
}

/// A repository a route uploads to.
struct Link {
    client: Client,
    /// Base URL written into tokens.
    url: String,
}

impl Sender {
    /// The sender of a configuration: for each route its repository (the route's own,
    /// else `[repository]`) and this facility's API key there. A route whose key cannot be
    /// read is logged and its jobs fail with the reason; the other routes work.
    pub fn from_config(config: Arc<Config>) -> Sender {
        let links = config
            .routes
            .iter()
            .map(|(name, route)| {
                let link = Self::link_of(&config, name, route);
                if let Err(reason) = &link
                    && config.outbound.enabled
                {
                    error!(route = %name, "{reason}");
                }
                (name.clone(), link)
            })
            .collect();
        Sender { config, links }
    }

    fn link_of(config: &Config, name: &str, route: &RouteConfig) -> Result<Link, String> {
        let (url, key_file) = config.repository_of(route);
        let key = std::fs::read_to_string(&key_file).map_err(|e| {
            format!(
                "route {name}: cannot read the repository API key from {} ({e}): set \
                 repository.api_key_file (or route.{name}.repository_api_key_file), restart \
                 the daemon, then `cloudpdi retry` the failed jobs",
                key_file.display()
            )
        })?;
        let options = ClientOptions {
            allow_plain_http: config.repository.allow_plain_http,
            plain_http_key: "repository.allow_plain_http",
            ..ClientOptions::default()
        };
        let client = Client::new(&url, Some(key.trim().to_owned()), options)
            .map_err(|e| format!("route {name}: {e}"))?;
        Ok(Link { client, url })
    }

    fn link(&self, route: &str) -> Result<&Link, StepError> {
        match self.links.get(route) {
            Some(Ok(link)) => Ok(link),
            Some(Err(reason)) => Err(StepError::permanent(reason.clone())),
            None => Err(gone(route)),
        }
    }
}

/// A job's route is no longer in the configuration.
fn gone(route: &str) -> StepError {
    StepError::permanent(format!(
        "route {route} is no longer configured: add it back to send this batch"
    ))
}

/// Files of one job's working folder.
struct Workdir(PathBuf);

impl Workdir {
    fn pdi(&self) -> PathBuf {
        self.0.join("pdi.zip")
    }
    fn container(&self) -> PathBuf {
        self.0.join("container")
    }
    fn secret(&self) -> PathBuf {
        self.0.join("pending-token")
    }
}

impl Sender {
    fn route_options(&self, route: &str) -> Result<&crate::config::RouteConfig, StepError> {
        self.config.routes.get(route).ok_or_else(|| gone(route))
    }

    /// Builds the PDI ZIP of `instances` into the job folder (blocking).
    fn pack(
        &self,
        dir: &Workdir,
        route: &str,
        instances: &[PathBuf],
        attachments: &[PathBuf],
    ) -> Result<pdi::BuildReport, StepError> {
        let options = BuildOptions {
            facility: self.config.facility.name.clone(),
            attachments: attachments.to_vec(),
            policy: self.route_options(route)?.ai_support.clone(),
            // On the data disk with the job, not in a tmpfs /tmp; removed by the build,
            // or with the job's folder after a crash.
            scratch: Some(dir.0.clone()),
            ..BuildOptions::default()
        };
        std::fs::create_dir_all(&dir.0).map_err(|e| StepError::file("create", &dir.0, &e))?;
        let path = dir.pdi();
        let mut pending = durable::Pending::beside(&path, 0o600)
            .map_err(|e| StepError::file("create a file beside", &path, &e))?;
        let report = pdi::build_zip(instances, &options, std::io::BufWriter::new(pending.file()))?;
        pending
            .commit(&path)
            .map_err(|e| StepError::file("write", &path, &e))?;
        Ok(report)
    }

    /// The job's secret: created once, then read back on every later attempt.
    fn secret(dir: &Workdir) -> Result<Secret, StepError> {
        let path = dir.secret();
        match std::fs::read(&path).map(zeroize::Zeroizing::new) {
            Ok(bytes) => {
                let bytes: [u8; SECRET_LEN] = bytes.as_slice().try_into().map_err(|_| {
                    StepError::permanent(format!(
                        "{} is damaged; remove the job folder to start the batch again",
                        path.display()
                    ))
                })?;
                Ok(Secret::from_bytes(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = Secret::generate().map_err(StepError::transient)?;
                durable::write(&path, secret.to_bytes().as_slice(), 0o600)
                    .map_err(|e| StepError::file("write", &path, &e))?;
                Ok(secret)
            }
            Err(e) => Err(StepError::file("read", &path, &e)),
        }
    }

    /// Encrypts the PDI into the container (blocking); returns its size.
    fn seal(&self, dir: &Workdir, compress: bool) -> Result<u64, StepError> {
        let secret = Self::secret(dir)?;
        let options = Options {
            compression: if compress {
                Compression::Zstd
            } else {
                Compression::None
            },
            ..Options::default()
        };
        let input =
            std::fs::File::open(dir.pdi()).map_err(|e| StepError::file("open", &dir.pdi(), &e))?;
        let path = dir.container();
        let file_error = |e: std::io::Error| StepError::file("write", &path, &e);
        let mut pending = durable::Pending::beside(&path, 0o600).map_err(file_error)?;
        let output = std::io::BufWriter::new(pending.file());
        container::encrypt(
            &secret.container_key(),
            &options,
            std::io::BufReader::new(input),
            output,
        )?
        .into_inner()
        .map_err(|e| file_error(e.into_error()))?;
        let bytes = pending.file().metadata().map_err(file_error)?.len();
        pending.commit(&path).map_err(file_error)?;
        Ok(bytes)
    }

    /// Registers the document (once) and uploads the container, resuming.
    async fn upload(
        &self,
        dir: &Workdir,
        job: &mut OutboundJob,
        store: Option<&JobStore>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), StepError> {
        let route = self.route_options(&job.route)?;
        let link = self.link(&job.route)?;
        if job.repository.as_deref() != Some(link.url.as_str()) {
            // Created at a repository the route no longer uses: start a new document.
            job.document_id = None;
        }
        if job.document_id.is_none() {
            let secret = Self::secret(dir)?;
            let expires = now_ms() / 1000 + u64::from(route.expires_in_days) * 86_400;
            job.expires_at = u32::try_from(expires)
                .map_err(|_| StepError::permanent("expiry beyond the year 2106"))?;
            let request = NewDocument {
                size: job.container_bytes,
                expires_at: u64::from(job.expires_at),
                max_downloads: route.max_downloads,
                proof_hash: secret.download_proof().hash(),
            };
            let created = link.client.create(&request).await?;
            job.document_id = Some(created.document_id);
            job.repository = Some(link.url.clone());
            if let Some(store) = store {
                store.put(job)?;
            }
        }
        let id = job.document_id.clone().unwrap_or_default();
        link.client
            .upload_file(&id, &dir.container(), progress)
            .await
            .map(drop)
            .map_err(StepError::from)
    }

    /// Writes the token file and the slip (blocking); the same files on a repeat.
    fn issue(&self, dir: &Workdir, job: &mut OutboundJob) -> Result<Token, StepError> {
        let route = self.route_options(&job.route)?;
        let secret = Self::secret(dir)?;
        let document_id = job.document_id.as_deref().unwrap_or_default();
        let summary = format!("{} DICOM instances", job.instances);
        let repository = match &job.repository {
            Some(url) => url.clone(),
            None => self.link(&job.route)?.url.clone(),
        };
        let token = Token::for_secret(
            &repository,
            document_id,
            job.expires_at,
            &self.config.facility.code,
            &summary,
            &secret,
        )
        .map_err(StepError::permanent)?;
        let folder = self.config.token_dir(&job.route);
        let token_file = folder.join(format!("{}.token", job.id));
        durable::write(&token_file, token.to_line().as_bytes(), 0o600)
            .map_err(|e| StepError::file("write", &token_file, &e))?;
        let slip_file = folder.join(format!("{}.{}", job.id, route.slip));
        let details = SlipDetails {
            facility_name: self.config.facility.name.clone(),
            content: summary,
            ..SlipDetails::default()
        };
        let format = SlipFormat::from_path(&slip_file).ok_or_else(|| {
            StepError::permanent(format!("route.{}.slip: unknown format", job.route))
        })?;
        slip::render(&token, &details, format, &slip_file).map_err(StepError::transient)?;
        job.token_file = Some(token_file);
        job.slip_file = Some(slip_file);
        Ok(token)
    }
}

/// The outbound worker of the daemon.
pub struct Outbound {
    sender: Sender,
    spool: Arc<Spool>,
    jobs: JobStore,
    dir: PathBuf,
}

impl Outbound {
    /// Opens the outbound job store in the daemon's database.
    ///
    /// # Errors
    /// [`IndexError`] when the store cannot be opened.
    pub fn new(sender: Sender, spool: Arc<Spool>) -> Result<Outbound, IndexError> {
        let jobs = JobStore::open(spool.index().store(), "outbound_jobs")?;
        jobs.reindex::<OutboundJob>()?;
        let dir = sender.config.jobs_dir().join("out");
        let outbound = Outbound {
            sender,
            spool,
            jobs,
            dir,
        };
        outbound.recover()?;
        Ok(outbound)
    }

    /// Creates the job of a batch claimed just before a crash (claim and job creation
    /// are two writes); run once at start, since only a crash leaves such a batch.
    fn recover(&self) -> Result<(), IndexError> {
        for batch in self.spool.index().claimed()? {
            let job = OutboundJob::new(batch.id.to_string(), Some(batch.id), &batch.route);
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

    /// Puts a failed job back to the step that failed, with its attempts reset, once the
    /// admin fixed the cause (a key file or the configuration: the daemon reads those at
    /// start, so after a restart); the workers take it up on their next scan. Returns the
    /// step it will run.
    ///
    /// # Errors
    /// [`RetryError`] when there is no such job or it has not failed.
    pub fn retry(&self, id: &str) -> Result<OutStep, RetryError> {
        let Some(mut job) = self.jobs.get::<OutboundJob>(id)? else {
            return Err(RetryError::Unknown(id.to_owned()));
        };
        if job.step != OutStep::Failed {
            return Err(RetryError::NotFailed(id.to_owned(), state_name(job.step)));
        }
        job.step = job.failed_at.take().unwrap_or(OutStep::Pack);
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
            OutStep::Pack => {
                let this = self.clone();
                let (batch, route) = (job.batch, job.route.clone());
                let report = blocking(move || {
                    let files = match batch {
                        Some(batch) => this.spool.batch_files(batch)?,
                        None => Vec::new(),
                    };
                    this.sender.pack(&Workdir(dir.0), &route, &files, &[])
                })
                .await?;
                job.instances = report.instances as u64;
                job.excluded = report.excluded as u64;
                if report.instances == 0 {
                    return Err(StepError::permanent(
                        "no instance left to send after the AI-image policy",
                    ));
                }
                Ok(OutStep::Seal)
            }
            OutStep::Seal => {
                let this = self.clone();
                let compress = self.sender.route_options(&job.route)?.compress;
                job.container_bytes = blocking(move || this.sender.seal(&dir, compress)).await?;
                Ok(OutStep::Upload)
            }
            OutStep::Upload => {
                let _ = std::fs::remove_file(dir.pdi());
                let jobs = self.jobs.clone();
                self.sender.upload(&dir, job, Some(&jobs), &|_| {}).await?;
                Ok(OutStep::Issue)
            }
            OutStep::Issue => {
                let this = self.clone();
                let mut issued = job.clone();
                let issued = blocking(move || {
                    this.sender.issue(&dir, &mut issued)?;
                    Ok(issued)
                })
                .await?;
                *job = issued;
                info!(job = %job.id, route = %job.route, document = job.document_id.as_deref().unwrap_or(""),
                      token_file = %job.token_file.as_deref().unwrap_or(Path::new("")).display(), "token issued");
                Ok(OutStep::Deliver)
            }
            OutStep::Deliver => {
                durable::remove_dir_all(&dir.0)
                    .map_err(|e| StepError::file("remove", &dir.0, &e))?;
                self.deliver(job).await?;
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
                let job = OutboundJob::new(batch.id.to_string(), Some(batch.id), &batch.route);
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

impl JobRecord for OutboundJob {
    type Step = OutStep;

    fn id(&self) -> &str {
        &self.id
    }

    fn step(&self) -> OutStep {
        self.step
    }

    fn set_step(&mut self, next: OutStep) {
        self.step = next;
    }

    fn ended(&self) -> bool {
        matches!(self.step, OutStep::Done | OutStep::Failed)
    }

    fn fail(&mut self, at: OutStep) {
        self.failed_at = Some(at);
        self.step = OutStep::Failed;
    }

    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    /// A sent batch's spooled instances still wait for their retention to pass.
    fn needs_pipeline(&self) -> bool {
        !self.ended() || (self.step == OutStep::Done && self.batch.is_some() && !self.spool_removed)
    }

    /// Done, and its spooled instances removed.
    fn prunable(&self, _now: u64) -> bool {
        self.step == OutStep::Done && !self.needs_pipeline()
    }
}

/// The outbound pipeline from the command line (`cloudpdi send`): pack, seal, upload and
/// issue in one go, in `workdir` (removed at the end). Returns the token and the job
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
    let id = format!(
        "S{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let mut job = OutboundJob::new(id, None, route);
    let compress = sender.route_options(route)?.compress;
    let (this, dir, route_name) = (sender.clone(), workdir.clone(), route.to_owned());
    let (report, bytes) = blocking(move || {
        let dir = Workdir(dir);
        let report = this.pack(&dir, &route_name, &files, &attachments)?;
        let bytes = this.seal(&dir, compress)?;
        Ok((report, bytes))
    })
    .await?;
    job.instances = report.instances as u64;
    job.excluded = report.excluded as u64;
    job.container_bytes = bytes;
    let dir = Workdir(workdir);
    sender.upload(&dir, &mut job, None, progress).await?;
    let token = sender.issue(&dir, &mut job)?;
    durable::remove_dir_all(&dir.0).map_err(|e| StepError::file("remove", &dir.0, &e))?;
    Ok((token, job))
}
