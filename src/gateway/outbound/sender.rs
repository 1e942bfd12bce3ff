//! The work of each outbound step (issue, deliver, post; the streaming step is in
//! `stream.rs`), shared by the daemon's
//! pipeline and `cloudpdi send`; the pipeline in `mod.rs` decides when each runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info};

use crate::clock::now_ms;
use crate::config::{Config, RouteConfig};
use crate::durable;
use crate::facility::{FacilityKey, Fingerprint, PublicKey};
use crate::gateway::jobs::{Cause, StepError};
use crate::gateway::store::JobStore;
use crate::repository::client::{Client, FacilityClientError};
use crate::token::slip::{self, SlipDetails, SlipFormat};
use crate::token::{SECRET_LEN, Secret, Token};

use super::{Delivery, OutboundJob, PrintedStudy};
use crate::gateway::study::StudyDetails;

/// Mode of the token files and slips the pipeline writes: the daemon's group (the clerks
/// who print slips) may read them, nobody else; their folder is 0750 (`serve`).
pub const TOKEN_FILE_MODE: u32 = 0o640;

/// Everything the outbound steps need, shared by the daemon and `cloudpdi send`.
pub struct Sender {
    /// The daemon's configuration (facility, routes, folders).
    pub config: Arc<Config>,
    /// Each route's repository, or why it cannot be used (that route's jobs fail with
    /// the reason; the others go on).
    links: BTreeMap<String, Result<Link, String>>,
    /// This facility's private key, which seals the tokens of routes with `deliver_to`
    /// (loaded at start by `cloudpdi serve`).
    facility_key: Option<Arc<FacilityKey>>,
}

/// A repository a route uploads to.
pub(super) struct Link {
    /// This facility's client there.
    pub(super) client: Client,
    /// Base URL written into tokens.
    pub(super) url: String,
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
        Sender {
            config,
            links,
            facility_key: None,
        }
    }

    /// The sender with this facility's private key, for the routes with `deliver_to`.
    #[must_use]
    pub fn with_facility_key(mut self, key: Arc<FacilityKey>) -> Sender {
        self.facility_key = Some(key);
        self
    }

    fn link_of(config: &Config, name: &str, route: &RouteConfig) -> Result<Link, String> {
        let (url, key_file) = config.repository_of(route);
        let client = Client::for_facility(&url, &key_file, config.repository.allow_plain_http)
            .map_err(|e| match e {
                FacilityClientError::KeyFile { .. } => format!(
                    "route {name}: {e}: set repository.api_key_file (or \
                     route.{name}.repository_api_key_file), restart the daemon, then \
                     `cloudpdi retry` the failed jobs"
                ),
                other => format!("route {name}: {other}"),
            })?;
        Ok(Link { client, url })
    }

    pub(super) fn link(&self, route: &str) -> Result<&Link, StepError> {
        match self.links.get(route) {
            Some(Ok(link)) => Ok(link),
            Some(Err(reason)) => Err(StepError::permanent(reason.clone())),
            None => Err(gone(route)),
        }
    }
}

impl Sender {
    /// The repository's view of a document this gateway uploaded on `route` (downloads,
    /// receipts), for `cloudpdi status`.
    ///
    /// # Errors
    /// A sentence saying why it cannot be read (route gone, no key, repository error).
    pub async fn document_status(
        &self,
        route: &str,
        document_id: &str,
    ) -> Result<crate::repository::api::DocumentStatus, String> {
        let link = self.link(route).map_err(|e| e.to_string())?;
        link.client
            .status(document_id)
            .await
            .map_err(|e| e.to_string())
    }
}

/// How much a person must do about a failed delivery: a held one (a key to check) ranks
/// above one that failed for good, which ranks above one retried by itself.
fn rank(error: &StepError) -> u8 {
    match error {
        StepError::Held { .. } => 2,
        StepError::Permanent { .. } => 1,
        StepError::Transient { .. } => 0,
    }
}

/// A job's route is no longer in the configuration.
fn gone(route: &str) -> StepError {
    StepError::permanent(format!(
        "route {route} is no longer configured: add it back to send this batch"
    ))
}

/// Files of one job's working folder.
pub(super) struct Workdir(pub(super) PathBuf);

impl Workdir {
    /// The sealed container, once its stream finished.
    pub(super) fn container(&self) -> PathBuf {
        self.0.join("container")
    }
    /// The container while its stream runs.
    pub(super) fn partial(&self) -> PathBuf {
        self.0.join("container.partial")
    }
    /// The parts of this stream the repository acknowledged, one number a line.
    pub(super) fn acked(&self) -> PathBuf {
        self.0.join("acked")
    }
    fn secret(&self) -> PathBuf {
        self.0.join("pending-token")
    }
}

impl Sender {
    pub(super) fn route_options(
        &self,
        route: &str,
    ) -> Result<&crate::config::RouteConfig, StepError> {
        self.config.routes.get(route).ok_or_else(|| gone(route))
    }

    /// The job's secret: created once, then read back on every later attempt.
    pub(super) fn secret(dir: &Workdir) -> Result<Secret, StepError> {
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

    /// The job's token, from its secret and its document: the same at every call.
    fn token(&self, dir: &Workdir, job: &OutboundJob) -> Result<Token, StepError> {
        let secret = Self::secret(dir)?;
        let document_id = job.document_id.as_deref().unwrap_or_default();
        let repository = match &job.repository {
            Some(url) => url.clone(),
            None => self.link(&job.route)?.url.clone(),
        };
        Token::for_secret(
            self.config.repository_ref(&repository),
            document_id,
            job.expires_at,
            &secret,
        )
        .map_err(StepError::permanent)
    }

    /// Seals the job's token to each facility of the route's `deliver_to` not yet posted
    /// to, and posts it to that facility's mailbox, recording each outcome in the job
    /// (durably, after each facility). Every facility is tried; the worst failure is
    /// returned: held (a key to check, a facility missing from the directory) before
    /// permanent before transient.
    pub(super) async fn post(
        &self,
        dir: &Workdir,
        job: &mut OutboundJob,
        store: &JobStore,
    ) -> Result<(), StepError> {
        let recipients = self.route_options(&job.route)?.deliver_to.clone();
        if recipients.is_empty() {
            return Ok(());
        }
        let key = self.facility_key.clone().ok_or_else(|| {
            StepError::permanent(
                "route with deliver_to, but this facility's key (facility.key_file) is not \
                 loaded: set it and restart the daemon",
            )
        })?;
        let waiting: Vec<String> = recipients
            .into_iter()
            .filter(|code| {
                !job.deliveries
                    .iter()
                    .any(|d| d.recipient == *code && d.posted_at.is_some())
            })
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let token = if dir.0.exists() {
            self.token(dir, job)?
        } else {
            self.issued_token(job).await?
        };
        let text = token.to_text();
        let mut worst: Option<StepError> = None;
        for code in &waiting {
            let outcome = self.post_to(&key, job, code, text.as_bytes()).await;
            let index = match job.deliveries.iter().position(|d| d.recipient == *code) {
                Some(index) => index,
                None => {
                    job.deliveries.push(Delivery {
                        recipient: code.clone(),
                        posted_at: None,
                        message_id: None,
                        error: None,
                    });
                    job.deliveries.len() - 1
                }
            };
            let delivery = &mut job.deliveries[index];
            match outcome {
                Ok(message_id) => {
                    delivery.posted_at = Some(now_ms());
                    delivery.message_id = Some(message_id.clone());
                    delivery.error = None;
                    info!(job = %job.id, to = %code, message = %message_id, "sealed token posted");
                }
                Err(e) => {
                    delivery.error = Some(e.to_string());
                    worst = Some(match worst {
                        Some(before) if rank(&before) >= rank(&e) => before,
                        _ => e,
                    });
                }
            }
            store.put(job)?;
        }
        worst.map_or(Ok(()), Err)
    }

    /// The token of a job whose folder is gone (a delivery asked again by `cloudpdi retry`
    /// after the job was done): read back from its token file, and sealed only if it is
    /// this job's token (same document, expiry and repository). The file sits in a folder
    /// the clerks may read: a file replaced there must not make the daemon seal another
    /// token to the route's facilities.
    async fn issued_token(&self, job: &OutboundJob) -> Result<Token, StepError> {
        let gone = |why: &str| {
            StepError::permanent(format!(
                "the token of job {} cannot be delivered again: {why}; hand the slip over \
                 instead",
                job.id
            ))
        };
        let path = job
            .token_file
            .clone()
            .ok_or_else(|| gone("the job has no token file"))?;
        let text = tokio::task::spawn_blocking(move || read_token_file(&path))
            .await
            .map_err(StepError::transient)?
            .map_err(|why| gone(&why))?;
        let token = Token::from_text(text.trim())
            .map_err(|_| gone("its token file does not hold a valid token"))?;
        let repository = match &job.repository {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => self.link(&job.route)?.url.clone(),
        };
        let same = job.document_id.as_deref() == Some(token.document_id.as_str())
            && token.expires_at == job.expires_at
            && self.config.repository_url(&token.repository).ok() == Some(repository);
        if !same {
            // The file's name holds the Patient ID: `cloudpdi status` shows it, not the
            // error (which is logged).
            return Err(StepError::permanent(format!(
                "the token of job {} cannot be delivered again: its token file holds another \
                 job's token, not the token of document {}; nothing was sent. Put the job's \
                 own token file back (`cloudpdi status` names it) and run `cloudpdi retry {}`, \
                 or hand the slip over instead",
                job.id,
                job.document_id.as_deref().unwrap_or_default(),
                job.id
            )));
        }
        Ok(token)
    }

    /// Looks `code` up in the repository's directory, checks its key against the pin,
    /// seals `plaintext` to it and posts it; returns the message ID.
    async fn post_to(
        &self,
        key: &FacilityKey,
        job: &OutboundJob,
        code: &str,
        plaintext: &[u8],
    ) -> Result<String, StepError> {
        let retry = format!("then run `cloudpdi retry {}`", job.id);
        let pinned = self
            .config
            .facilities
            .get(code)
            .and_then(|pin| Fingerprint::parse(&pin.fingerprint).ok())
            .ok_or_else(|| {
                StepError::held(
                    Cause::RecipientKey,
                    format!(
                        "facility {code} has no pinned key: nothing was sent to {code}; add \
                         [facilities.{code}] fingerprint = \"...\" as {code} reads it to \
                         you, restart the daemon, {retry}"
                    ),
                )
            })?;
        let link = self.link(&job.route)?;
        let entry = link.client.facility(code).await.map_err(|e| {
            if e.is_permanent() {
                StepError::held(
                    Cause::RecipientKey,
                    format!(
                        "the repository's directory has no key for facility {code} ({e}): \
                         nothing was sent to {code}; ask the repository operator to register \
                         {code}'s public key, {retry}"
                    ),
                )
            } else {
                StepError::from(e)
            }
        })?;
        let public = PublicKey::parse(&entry.public_key).map_err(|e| {
            StepError::held(
                Cause::RecipientKey,
                format!(
                    "the repository's directory gives facility {code} a key this gateway \
                     cannot read ({e}): nothing was sent to {code}; tell the repository \
                     operator, {retry}"
                ),
            )
        })?;
        let found = public.fingerprint();
        if found != pinned {
            return Err(StepError::held(
                Cause::RecipientKey,
                format!(
                    "the repository's directory gives facility {code} a key with fingerprint \
                     {found}, but facilities.{code}.fingerprint pins {pinned}: nothing was \
                     sent to {code}. Call {code} and compare the fingerprint of their key \
                     (`cloudpdi facility show`): if they changed their key, pin the new \
                     fingerprint and restart the daemon; if not, the directory is wrong: tell \
                     the repository operator; {retry}"
                ),
            ));
        }
        let sealed =
            crate::facility::seal(key, &self.config.facility.code, &public, code, plaintext)
                .map_err(StepError::permanent)?;
        let posted = link.client.post_message(code, &sealed).await?;
        Ok(posted.message_id)
    }

    /// Writes the token file and the slip (blocking); the same files on a repeat. The slip
    /// and the file names carry the study details read from `instances` (the batch's
    /// spooled files, or what `cloudpdi send` was given); what the slip prints is kept in
    /// the job ([`OutboundJob::printed`]) for a slip re-issued later.
    pub(super) fn issue(
        &self,
        dir: &Workdir,
        job: &mut OutboundJob,
        instances: &[PathBuf],
    ) -> Result<Token, StepError> {
        let route = self.route_options(&job.route)?;
        let token = self.token(dir, job)?;
        let study = StudyDetails::gather(instances);
        job.study.get_or_insert_with(|| study.summary());
        let printed = PrintedStudy {
            patient_name: study
                .patient_name
                .clone()
                .filter(|_| route.slip_patient_name),
            study_date: study.study_date(),
            modality: study.modality(),
            study_description: study.description(),
            content: format!("{} DICOM instances", job.instances),
        };
        let folder = self.config.token_dir(&job.route);
        let stem = study.file_stem(&job.id);
        let token_file = folder.join(format!("{stem}.token"));
        let slip_file = folder.join(format!("{stem}.{}", route.slip));
        self.write_token_and_slip(job, &token, &printed, &token_file, &slip_file)?;
        job.token_file = Some(token_file);
        job.slip_file = Some(slip_file);
        job.printed = Some(printed);
        Ok(token)
    }

    /// Writes `token` into `token_file` and its slip, printing `printed`, into `slip_file`
    /// (blocking; each durably, mode [`TOKEN_FILE_MODE`], replacing what was there): at
    /// issue, and again with a later expiry (`cloudpdi extend`).
    pub(super) fn write_token_and_slip(
        &self,
        job: &OutboundJob,
        token: &Token,
        printed: &PrintedStudy,
        token_file: &Path,
        slip_file: &Path,
    ) -> Result<(), StepError> {
        let time_zone = crate::clock::time_zone(&self.config.facility.time_zone)
            .map_err(|e| StepError::permanent(format!("facility.time_zone: {e}")))?;
        let folder = self.config.token_dir(&job.route);
        durable::write(token_file, token.to_line().as_bytes(), TOKEN_FILE_MODE)
            .map_err(|e| StepError::file("write the token file into", &folder, &e))?;
        let contact = &self.config.facility.contact;
        let details = SlipDetails {
            facility_name: self.config.facility.name.clone(),
            facility_contact: (!contact.is_empty()).then(|| contact.clone()),
            patient_name: printed.patient_name.clone(),
            study_date: printed.study_date.clone(),
            modality: printed.modality.clone(),
            study_description: printed.study_description.clone(),
            content: printed.content.clone(),
            time_zone: Some(time_zone),
        };
        let format = SlipFormat::from_path(slip_file).ok_or_else(|| {
            StepError::permanent(format!("route.{}.slip: unknown format", job.route))
        })?;
        let bytes = slip::render_bytes(token, &details, format).map_err(StepError::transient)?;
        durable::write(slip_file, &bytes, TOKEN_FILE_MODE)
            .map_err(|e| StepError::file("write the slip into", &folder, &e))
    }
}

/// The text of a token file (blocking): a regular file of at most
/// [`MAX_TEXT`](crate::token::text::MAX_TEXT) bytes, opened without waiting on a FIFO,
/// read into a buffer wiped when dropped.
pub(super) fn read_token_file(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let limit = crate::token::text::MAX_TEXT;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
        .open(path)
        .map_err(|e| format!("its token file cannot be read ({e})"))?;
    let is_file = file.metadata().is_ok_and(|m| m.is_file());
    if !is_file {
        return Err("its token file is not a regular file".into());
    }
    let mut text = zeroize::Zeroizing::new(String::with_capacity(limit + 1));
    file.take(limit as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|_| "its token file is not text".to_owned())?;
    if text.len() > limit {
        return Err(format!(
            "its token file is larger than {limit} bytes, more than any token"
        ));
    }
    Ok(text)
}
