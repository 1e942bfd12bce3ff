//! What can be done to an issued token afterwards: revoke it (a slip issued for the wrong
//! patient, or lost), or extend its expiry (a patient who could not hand the slip over in
//! time). Extending checks the token file first (it must be this job's), asks the
//! repository, then writes the token file and the slip again, under the same names, with
//! the same secret and document ID and the repository's new expiry, then records it in
//! the job. A crash in between leaves the repository extended and the old (or new) files:
//! any later extend accepts a token file whose expiry lies between the job's and the
//! repository's, and re-issues with the repository's expiry. The old slip keeps working
//! until the date printed on it (the token holds its expiry); the new slip must be printed
//! and handed over.
//!
//! One action at a time per job (an async lock): two admins, or a command repeated after
//! its answer timed out, never interleave the token, slip and record writes.
//!
//! A job still delivering its token (delivery command, sealed deliveries) is not extended
//! (its worker writes the record); it may be revoked: the job store keeps `revoked_at`
//! (and the later expiry) when a worker writes its older copy of the record.
//!
//! The job's own repository is the one acted on: if the route now sends elsewhere, the
//! action is refused, naming both.
//!
//! Nothing here logs or returns the token's text; the logs name the job only (the files'
//! names hold the Patient ID).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::info;

use crate::clock::now_seconds;
use crate::gateway::jobs::state_name;
use crate::gateway::store::IndexError;
use crate::repository::api::{DocumentStatus, State};
use crate::repository::client::ClientError;
use crate::token::Token;

use super::sender::read_token_file;
use super::{OutStep, Outbound, OutboundJob, PrintedStudy};

/// Why a token could not be revoked or extended; each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlipActionError {
    /// No outbound job has this ID.
    #[error("no outbound job {0}: `cloudpdi status` lists the jobs (e.g. B000042)")]
    Unknown(String),
    /// The job has no token yet.
    #[error(
        "job {id} has no token yet (it is at step {step}): there is nothing to revoke or \
         extend; wait until `cloudpdi status` shows its token file"
    )]
    NotIssued {
        /// The job.
        id: String,
        /// The step it is at.
        step: String,
    },
    /// The job still delivers its token (delivery command, sealed deliveries), with the
    /// expiry it has: the record would be written over.
    #[error(
        "job {id} is still at step {step}: its expiry can change once it is done; run the \
         same command again when `cloudpdi status` shows it done"
    )]
    Busy {
        /// The job.
        id: String,
        /// The step it is at.
        step: String,
    },
    /// The job's token was revoked: its expiry cannot change.
    #[error(
        "the token of job {0} was revoked: its expiry cannot change; send the study again \
         for a new token"
    )]
    Revoked(String),
    /// The expiry asked for is earlier than the token's.
    #[error(
        "an expiry can only be extended: the token of job {id} expires {current}, and \
         {asked} is earlier; ask for a later date"
    )]
    NotLater {
        /// The job.
        id: String,
        /// The token's expiry, in the facility's local time.
        current: String,
        /// The expiry asked for, in the facility's local time.
        asked: String,
        /// The token's expiry (Unix seconds), for a page in another language.
        current_at: u32,
        /// The expiry asked for (Unix seconds).
        asked_at: u32,
    },
    /// The repository refused (expiry beyond its limit, document gone, wrong key).
    #[error("the repository refused to {action} the document of job {id}: {message}")]
    Refused {
        /// The job.
        id: String,
        /// `revoke` or `extend`.
        action: &'static str,
        /// What the repository said (its limit, what is wrong).
        message: String,
    },
    /// The repository did not answer.
    #[error(
        "the repository could not be reached to {action} the document of job {id} \
         ({message}); run the same command again once it answers"
    )]
    Unreachable {
        /// The job.
        id: String,
        /// `revoke` or `extend`.
        action: &'static str,
        /// The last failure.
        message: String,
    },
    /// The job's route has no usable repository (route removed, API key unreadable).
    #[error("job {id}: {reason}")]
    Route {
        /// The job.
        id: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The token file or the slip cannot be read or written.
    #[error(
        "the token and slip of job {id} cannot be re-issued: {why}; fix the cause and run \
         the same command again (a repository already extended keeps its new expiry)"
    )]
    Files {
        /// The job.
        id: String,
        /// What failed (the folder, never the token).
        why: String,
    },
    /// The job index cannot be read or written.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A worker thread of the daemon failed on the way.
    #[error("the daemon could not finish the request ({0}); run the same command again")]
    Worker(String),
    /// The action did not finish within the time the admin endpoint and the web page wait
    /// (`admin::SLIP_ACTION_TIMEOUT`): the repository is slow or does not answer. The
    /// action goes on and may still finish.
    #[error(
        "job {id}: the repository did not answer within {seconds} s; the {action} goes on \
         and may still finish: check `cloudpdi status` in a minute before running the \
         command again"
    )]
    TimedOut {
        /// The job.
        id: String,
        /// `revoke` or `extend`.
        action: &'static str,
        /// The time waited.
        seconds: u64,
    },
}

/// A token re-issued with a later expiry: what to print and hand over.
#[derive(Debug, Clone)]
pub struct ExtendedSlip {
    /// The job.
    pub job_id: String,
    /// The new expiry (Unix seconds): the repository's, at least the one asked.
    pub expires_at: u32,
    /// The expiry of the old slip, which works until then.
    pub previous_expires_at: u32,
    /// The token file, rewritten.
    pub token_file: PathBuf,
    /// The slip to print, rewritten.
    pub slip_file: PathBuf,
    /// The repository's view of the document after the extension.
    pub document: DocumentStatus,
}

impl Outbound {
    /// Revokes the token of job `job_id`: the repository deletes the content and refuses
    /// every later download; the job keeps when (`revoked_at`). Revoking again answers
    /// the document's status. One action at a time per job.
    ///
    /// # Errors
    /// [`SlipActionError`]: unknown job, no token yet, the job's repository no longer the
    /// route's, the repository's refusal or silence, the index.
    pub async fn revoke(&self, job_id: &str) -> Result<DocumentStatus, SlipActionError> {
        let lock = self.slip_locks.of(job_id);
        let _one_action_at_a_time = lock.lock().await;
        let job = self.issued_job(job_id).await?;
        let (client, document) = self.document_of(&job)?;
        let status = client
            .revoke(&document)
            .await
            .map_err(|e| repository_error(&job.id, "revoke", e))?;
        if job.revoked_at.is_none() {
            self.update(&job.id, |job| {
                job.revoked_at.get_or_insert(now_seconds());
            })
            .await?;
        }
        info!(job = %job.id, "token revoked: the repository refuses every later download");
        Ok(status)
    }

    /// Extends the token of job `job_id` to `expires_at` (Unix seconds): the token file
    /// checked to be this job's, the repository's document extended, then the token file
    /// and the slip written again (same names, same secret and document ID) with the
    /// repository's expiry (later than asked when an earlier run asked more), then the
    /// job's `expires_at`. Any later call finishes what a crash interrupted; the same one
    /// again changes nothing. One action at a time per job.
    ///
    /// # Errors
    /// [`SlipActionError`]: unknown job, no token yet, still delivering it, revoked, an
    /// earlier expiry, a token file that is not this job's, the job's repository no longer
    /// the route's, the repository's refusal (beyond its `server.max_expiry_days`, too
    /// many extensions, document expired) or silence, the files, the index.
    pub async fn extend(
        &self,
        job_id: &str,
        expires_at: u32,
    ) -> Result<ExtendedSlip, SlipActionError> {
        let lock = self.slip_locks.of(job_id);
        let _one_action_at_a_time = lock.lock().await;
        let job = self.issued_job(job_id).await?;
        if job.revoked_at.is_some() {
            return Err(SlipActionError::Revoked(job.id));
        }
        if !matches!(job.step, OutStep::Done | OutStep::Failed) {
            return Err(SlipActionError::Busy {
                step: state_name(job.step),
                id: job.id,
            });
        }
        if expires_at < job.expires_at {
            return Err(SlipActionError::NotLater {
                current: self.local_time(job.expires_at),
                asked: self.local_time(expires_at),
                current_at: job.expires_at,
                asked_at: expires_at,
                id: job.id,
            });
        }
        let (Some(token_file), Some(slip_file)) = (job.token_file.clone(), job.slip_file.clone())
        else {
            return Err(not_issued(&job));
        };
        let mut printed = job
            .printed
            .clone()
            .unwrap_or_else(|| PrintedStudy::of_record(&job));
        if !self.prints_patient_name(&job)? {
            printed.patient_name = None;
        }
        let (client, document) = self.document_of(&job)?;
        let status = client
            .status(&document)
            .await
            .map_err(|e| repository_error(&job.id, "extend", e))?;
        self.check_live(&job, &status).await?;
        // Before the repository is asked: a token file that is not this job's must not
        // leave the repository extended and the slip unwritten.
        let mut token = self.issued_token(&job, status.expires_at).await?;
        let document = self.extend_document(&job, status, expires_at).await?;
        // The repository's expiry, which a run before this one may have set later than
        // asked: token and slip say when the repository really deletes the document.
        let new_expiry =
            u32::try_from(document.expires_at).map_err(|_| SlipActionError::Refused {
                id: job.id.clone(),
                action: "extend",
                message: format!(
                    "it answered an expiry ({}) beyond what a token can hold (the year \
                     2106): ask for an earlier date",
                    document.expires_at
                ),
            })?;
        token.expires_at = new_expiry;
        let sender = self.sender.clone();
        let (record, files) = (job.clone(), (token_file.clone(), slip_file.clone()));
        tokio::task::spawn_blocking(move || {
            sender.write_token_and_slip(&record, &token, &printed, &files.0, &files.1)
        })
        .await
        .map_err(worker)?
        .map_err(|e| files_error(&job, e))?;
        self.update(&job.id, move |job| job.expires_at = new_expiry)
            .await?;
        info!(job = %job.id, expires_at = new_expiry, "token and slip re-issued with a later expiry");
        Ok(ExtendedSlip {
            job_id: job.id,
            expires_at: new_expiry,
            previous_expires_at: job.expires_at,
            token_file,
            slip_file,
            document,
        })
    }

    /// Refuses an extend of a document the repository no longer serves: revoked (the job
    /// then records it), or expired.
    async fn check_live(
        &self,
        job: &OutboundJob,
        status: &DocumentStatus,
    ) -> Result<(), SlipActionError> {
        match status.state {
            State::Revoked => {
                self.update(&job.id, |job| {
                    job.revoked_at.get_or_insert(now_seconds());
                })
                .await?;
                Err(SlipActionError::Revoked(job.id.clone()))
            }
            State::Expired => Err(SlipActionError::Refused {
                id: job.id.clone(),
                action: "extend",
                message: format!(
                    "the document expired {} and its content is deleted: its expiry cannot \
                     change; send the study again for a new token",
                    self.local_time(u32::try_from(status.expires_at).unwrap_or(u32::MAX))
                ),
            }),
            State::Uploading | State::Complete => Ok(()),
        }
    }

    /// Whether a slip of the job's route prints the patient's name now
    /// (`route.slip_patient_name`, which may have been turned off since the issue).
    fn prints_patient_name(&self, job: &OutboundJob) -> Result<bool, SlipActionError> {
        self.sender
            .route_options(&job.route)
            .map(|route| route.slip_patient_name)
            .map_err(|e| SlipActionError::Route {
                id: job.id.clone(),
                reason: e.to_string(),
            })
    }

    /// Job `id`, once its token is issued.
    async fn issued_job(&self, id: &str) -> Result<OutboundJob, SlipActionError> {
        let jobs = self.jobs.clone();
        let asked = id.to_owned();
        let job = tokio::task::spawn_blocking(move || jobs.get::<OutboundJob>(&asked))
            .await
            .map_err(worker)??
            .ok_or_else(|| SlipActionError::Unknown(id.to_owned()))?;
        if job.token_file.is_none() || job.slip_file.is_none() || job.document_id.is_none() {
            return Err(not_issued(&job));
        }
        Ok(job)
    }

    /// The repository client of the job's route and the job's document ID.
    fn document_of(
        &self,
        job: &OutboundJob,
    ) -> Result<(crate::repository::client::Client, String), SlipActionError> {
        let link = self
            .sender
            .link(&job.route)
            .map_err(|e| SlipActionError::Route {
                id: job.id.clone(),
                reason: e.to_string(),
            })?;
        let document = job.document_id.clone().ok_or_else(|| not_issued(job))?;
        if let Some(held_by) = &job.repository {
            let held_by = held_by.trim_end_matches('/');
            if held_by != link.url.trim_end_matches('/') {
                return Err(SlipActionError::Route {
                    id: job.id.clone(),
                    reason: format!(
                        "its document {document} is held by the repository {held_by}, but \
                         route {route} now sends to {now}: nothing was changed; revoke it \
                         there with `cloudpdi repository revoke --url {held_by} \
                         --api-key-file FILE {document}`",
                        route = job.route,
                        now = link.url
                    ),
                });
            }
        }
        Ok((link.client.clone(), document))
    }

    /// Extends the job's document in the repository to `expires_at`, unless it holds that
    /// expiry (or a later one) already (`status`, read just before): a repeat after a
    /// crash, or after an answer lost on the way (the repository refuses an expiry that is
    /// not later).
    async fn extend_document(
        &self,
        job: &OutboundJob,
        status: DocumentStatus,
        expires_at: u32,
    ) -> Result<DocumentStatus, SlipActionError> {
        let (client, document) = self.document_of(job)?;
        let failed = |e| repository_error(&job.id, "extend", e);
        let asked = u64::from(expires_at);
        if status.expires_at >= asked {
            return Ok(status);
        }
        match client.extend(&document, asked).await {
            Ok(status) => Ok(status),
            Err(refused @ ClientError::Refused { .. }) => match client.status(&document).await {
                Ok(status)
                    if status.expires_at >= asked
                        && !matches!(status.state, State::Revoked | State::Expired) =>
                {
                    Ok(status)
                }
                _ => Err(failed(refused)),
            },
            Err(e) => Err(failed(e)),
        }
    }

    /// The job's token read back from its token file (blocking, off the runtime), if it
    /// is this job's: same document and repository, and an expiry from the job's to the
    /// repository's `latest` (a run that extended the repository and wrote the file, then
    /// stopped before the record). The folder is one the clerks may write: a file
    /// replaced there must not be re-issued as this job's token.
    async fn issued_token(&self, job: &OutboundJob, latest: u64) -> Result<Token, SlipActionError> {
        let path = job.token_file.clone().ok_or_else(|| not_issued(job))?;
        let text = tokio::task::spawn_blocking(move || read_token_file(&path))
            .await
            .map_err(worker)?
            .map_err(|why| files_error(job, why))?;
        let token = Token::from_text(text.trim())
            .map_err(|_| files_error(job, "its token file does not hold a valid token"))?;
        let repository = match &job.repository {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => self
                .sender
                .link(&job.route)
                .map_err(|e| SlipActionError::Route {
                    id: job.id.clone(),
                    reason: e.to_string(),
                })?
                .url
                .clone(),
        };
        let same = job.document_id.as_deref() == Some(token.document_id.as_str())
            && token.expires_at >= job.expires_at
            && u64::from(token.expires_at) <= latest
            && self.sender.config.repository_url(&token.repository).ok() == Some(repository);
        if !same {
            return Err(files_error(
                job,
                "its token file holds another token, not the token of this job's document; \
                 put the job's own token file back (`cloudpdi status` names it)",
            ));
        }
        Ok(token)
    }

    /// Changes job `id` as `change` says, on its record as stored now (the workers may
    /// have written it since it was read).
    async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut OutboundJob) + Send + 'static,
    ) -> Result<(), SlipActionError> {
        let jobs = self.jobs.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let Some(mut job) = jobs.get::<OutboundJob>(&id)? else {
                return Err(SlipActionError::Unknown(id));
            };
            change(&mut job);
            jobs.put(&job)?;
            Ok(())
        })
        .await
        .map_err(worker)?
    }

    /// A time for the admin, in `facility.time_zone`.
    fn local_time(&self, unix_seconds: u32) -> String {
        let zone = crate::clock::time_zone(&self.sender.config.facility.time_zone)
            .unwrap_or(jiff::tz::TimeZone::UTC);
        crate::clock::local_text(u64::from(unix_seconds), &zone)
    }
}

/// The job has no token yet.
fn not_issued(job: &OutboundJob) -> SlipActionError {
    SlipActionError::NotIssued {
        id: job.id.clone(),
        step: state_name(job.step),
    }
}

/// A blocking task of the daemon that did not finish.
fn worker(e: tokio::task::JoinError) -> SlipActionError {
    SlipActionError::Worker(e.to_string())
}

/// The token file or the slip could not be handled.
fn files_error(job: &OutboundJob, why: impl std::fmt::Display) -> SlipActionError {
    SlipActionError::Files {
        id: job.id.clone(),
        why: why.to_string(),
    }
}

/// The repository's refusal or silence.
fn repository_error(id: &str, action: &'static str, e: ClientError) -> SlipActionError {
    match e {
        ClientError::Unavailable { .. } => SlipActionError::Unreachable {
            id: id.to_owned(),
            action,
            message: e.to_string(),
        },
        ClientError::Refused { message, .. } => SlipActionError::Refused {
            id: id.to_owned(),
            action,
            message,
        },
        other => SlipActionError::Refused {
            id: id.to_owned(),
            action,
            message: other.to_string(),
        },
    }
}

/// One async lock per job that an admin acts on, so that two revokes or extends of the
/// same job never interleave their writes; an entry no action holds or waits for is
/// dropped at the next call, so the map holds only the jobs being acted on.
#[derive(Default)]
pub(super) struct SlipLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl SlipLocks {
    /// The lock of job `id`.
    fn of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(id.to_owned()).or_default().clone()
    }
}
