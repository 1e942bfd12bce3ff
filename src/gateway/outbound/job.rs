//! The outbound job record: the step a batch is at, and what earlier steps fixed
//! (document ID, token and slip paths), so that a repeated step does the same again.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::gateway::jobs::{JobRecord, JobSummary, Progress, state_name};
use crate::gateway::reception::batch::{BatchId, StudySummary};

/// Where an outbound job is; the step named is the next one to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutStep {
    /// Build, seal and upload the container in one stream, then complete the document
    /// (records of the former `pack` and `seal` steps continue here).
    #[serde(alias = "pack", alias = "seal")]
    Upload,
    /// Write the token and the slip.
    Issue,
    /// Run the delivery command.
    Deliver,
    /// Seal the token to each facility of the route's `deliver_to` and post it to their
    /// mailboxes; remove the job folder.
    Post,
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
    /// Size of the sealed container (once its stream finished).
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
    /// Patient, accession, study date and modality of the batch, for `cloudpdi status`.
    #[serde(default)]
    pub study: Option<StudySummary>,
    /// The sealed deliveries of the token, one per facility of the route's `deliver_to`.
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// When the token was revoked (`cloudpdi revoke`, Unix seconds): the repository
    /// refuses every later download; status shows it without asking the repository.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// What the slip prints about the study, kept at issue so that a slip re-issued with a
    /// later expiry (`cloudpdi extend`) says the same; `None` in records issued before.
    #[serde(default)]
    pub printed: Option<PrintedStudy>,
}

/// What a slip prints about the study besides the facility and the token (the patient's
/// name only when the route prints it): the spooled instances it was read from may be
/// gone by the time the slip is re-issued.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrintedStudy {
    /// The patient's name, when `route.slip_patient_name` is on.
    pub patient_name: Option<String>,
    /// Study date(s) as printed.
    pub study_date: Option<String>,
    /// Modalities as printed.
    pub modality: Option<String>,
    /// Study description(s) as printed.
    pub study_description: Option<String>,
    /// What the token gives access to, e.g. `42 DICOM instances`.
    pub content: String,
}

impl PrintedStudy {
    /// What a record issued before [`OutboundJob::printed`] existed can still print: the
    /// study date and modality it kept, and the instance count.
    pub fn of_record(job: &OutboundJob) -> PrintedStudy {
        let study = job.study.clone().unwrap_or_default();
        let date = &study.study_date;
        let study_date = match (date.get(..4), date.get(4..6), date.get(6..8)) {
            (Some(y), Some(m), Some(d)) if date.len() == 8 => Some(format!("{y}-{m}-{d}")),
            _ => None,
        };
        PrintedStudy {
            patient_name: None,
            study_date,
            modality: (!study.modality.is_empty()).then(|| study.modality.replace('/', ", ")),
            study_description: None,
            content: format!("{} DICOM instances", job.instances),
        }
    }
}

/// The sealed delivery of a job's token to one facility: posted (with the repository's
/// message ID), or why not yet. Written after every attempt, so a repeated step posts only
/// to the facilities still waiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The receiving facility's code.
    pub recipient: String,
    /// When the sealed token was posted to its mailbox (Unix milliseconds).
    pub posted_at: Option<u64>,
    /// The repository's ID of the message in the recipient's mailbox.
    pub message_id: Option<String>,
    /// Why the last attempt failed, while not posted.
    pub error: Option<String>,
}

impl OutboundJob {
    pub(super) fn new(id: String, batch: Option<BatchId>, route: &str) -> OutboundJob {
        OutboundJob {
            id,
            batch,
            route: route.to_owned(),
            step: OutStep::Upload,
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
            study: None,
            deliveries: Vec::new(),
            revoked_at: None,
            printed: None,
        }
    }

    /// The job as `cloudpdi status` lists it.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id.clone(),
            direction: "outbound".into(),
            state: state_name(self.step),
            progress: match self.step {
                OutStep::Upload if self.instances == 0 => format!("route {}", self.route),
                _ => format!(
                    "{} instances, {} excluded, {:.1} MB",
                    self.instances,
                    self.excluded,
                    self.container_bytes as f64 / 1e6
                ),
            },
            notes: Vec::new(),
            bookkeeping: self.progress.clone(),
            study: self.study.clone(),
        }
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

    /// Done, its spooled instances removed, and its token unable to download: revoked, or
    /// expired (`now` in Unix milliseconds). A token extended beyond `spool.records_days`
    /// keeps its record, so that `cloudpdi revoke` still finds it.
    fn prunable(&self, now: u64) -> bool {
        self.step == OutStep::Done
            && !self.needs_pipeline()
            && (self.revoked_at.is_some() || u64::from(self.expires_at) < now / 1000)
    }

    /// A revoke and the later expiry of the same document (an extension) are kept: a
    /// worker or the retention sweep that read the record before writes them back.
    fn keep_from(&mut self, stored: &OutboundJob) {
        if self.revoked_at.is_none() {
            self.revoked_at = stored.revoked_at;
        }
        if self.document_id.is_some() && self.document_id == stored.document_id {
            self.expires_at = self.expires_at.max(stored.expires_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::store::{JobStore, Store};

    fn done(expires_at: u32) -> OutboundJob {
        let mut job = OutboundJob::new("B000001".into(), None, "ct");
        job.step = OutStep::Done;
        job.document_id = Some("d".repeat(32));
        job.expires_at = expires_at;
        job
    }

    /// A done job's record stays while its token can download: pruning it would leave an
    /// extended token that `cloudpdi revoke` cannot find.
    #[test]
    fn a_record_is_kept_while_its_token_can_download() {
        let now_ms = 1_000_000_000_000;
        let now = 1_000_000_000;
        assert!(!done(now + 86_400).prunable(now_ms), "token still valid");
        assert!(done(now - 1).prunable(now_ms), "token expired");
        let mut revoked = done(now + 86_400);
        revoked.revoked_at = Some(u64::from(now) - 10);
        assert!(revoked.prunable(now_ms), "token revoked");
    }

    /// A writer holding a copy read before a revoke and an extension (the retention sweep,
    /// a worker) does not undo them; a new document's expiry is not taken from the old.
    #[test]
    fn a_stale_copy_keeps_the_revoke_and_the_later_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Store::open(dir.path()).expect("db");
        let jobs = JobStore::open(&db, "outbound_jobs").expect("store");
        let stale = done(2_000_000_000);
        jobs.put(&stale).expect("put");
        let mut changed = stale.clone();
        changed.expires_at = 2_000_086_400;
        changed.revoked_at = Some(1_999_999_999);
        jobs.put(&changed).expect("put");
        let mut sweep = stale.clone();
        sweep.spool_removed = true;
        jobs.put(&sweep).expect("put the stale copy");
        let stored = jobs
            .get::<OutboundJob>("B000001")
            .expect("get")
            .expect("job");
        assert!(stored.spool_removed);
        assert_eq!(stored.revoked_at, Some(1_999_999_999));
        assert_eq!(stored.expires_at, 2_000_086_400);

        let mut uploaded_again = stale;
        uploaded_again.document_id = Some("e".repeat(32));
        uploaded_again.expires_at = 2_000_000_100;
        jobs.put(&uploaded_again).expect("put");
        let stored = jobs
            .get::<OutboundJob>("B000001")
            .expect("get")
            .expect("job");
        assert_eq!(stored.expires_at, 2_000_000_100);
    }
}
