//! The inbound job record: the step a token is at, what the import set aside, and the
//! job's id (derived from the token, so the same token dropped twice is imported once).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::gateway::jobs::{JobRecord, JobSummary, Progress, state_name};
use crate::gateway::reception::batch::StudySummary;

/// Where an inbound job is; the step named is the next one to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InStep {
    /// Download the container and, as one stream, open it, extract and verify the PDI
    /// and C-STORE every verified instance (a container with its manifest last goes on
    /// to Open; one the PACS did not wholly take, to Import).
    Download,
    /// Decrypt and authenticate it (containers with their manifest last, from senders
    /// before the stream, and records written before it).
    Open,
    /// Extract and verify the PDI (as Open).
    Unpack,
    /// C-STORE into the local PACS what it does not hold yet.
    Import,
    /// Send the receipt to the repository.
    Receipt,
    /// Finished.
    Done,
    /// Stopped for good; `last_error` says why.
    Failed,
}

/// An instance the PACS refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAside {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Where the file was put.
    pub file: PathBuf,
    /// The PACS's reason.
    pub reason: String,
}

/// An instance the PACS did not commit (storage commitment): it is sent again, until it
/// failed in too many reports in a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uncommitted {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// The PACS's Failure Reason, as text.
    pub reason: String,
    /// Reports in a row that did not commit it: at `MAX_UNCOMMITTED_ROUNDS` it is set
    /// aside instead of sent again.
    #[serde(default)]
    pub rounds: u32,
}

/// The durable record of one inbound job. No secret: the token is in the job folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboundJob {
    /// `R` + 12 hex digits of SHA-256(repository URL, document ID).
    pub id: String,
    /// The facility that created the document, as the repository names it when it is
    /// downloaded (the token does not carry it): Patient IDs belong to it, so
    /// `inbound.patient_id = "prefix"` uses it. Until then the sealed sender, or empty.
    pub issuer: String,
    /// The document ID (not secret: useless without the token's secret).
    pub document_id: String,
    /// The token's expiry (Unix seconds).
    pub expires_at: u32,
    /// A local Patient ID given with the token, if any.
    pub local_patient_id: Option<String>,
    /// The next step.
    pub step: InStep,
    /// Times, attempts, last error.
    pub progress: Progress,
    /// Instances listed by the PDI.
    pub instances: u64,
    /// Instances the PACS holds.
    pub stored: u64,
    /// Instances refused for good.
    pub set_aside: Vec<SetAside>,
    /// Patient, accession, study date and modality of what was received, read from the
    /// PDI once it is verified (for `cloudpdi status`).
    #[serde(default)]
    pub study: Option<StudySummary>,
    /// The facility whose sealed token arrived in this facility's mailbox (the sender the
    /// repository authenticated); `None` for a token from the watch folder.
    #[serde(default)]
    pub sealed_from: Option<String>,
    /// Instances the PACS committed (`inbound.storage_commitment`).
    #[serde(default)]
    pub committed: u64,
    /// Instances the PACS's latest storage commitment report failed (sent again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uncommitted: Vec<Uncommitted>,
}

impl InboundJob {
    /// The job as `cloudpdi status` lists it.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id.clone(),
            direction: "inbound".into(),
            state: state_name(self.step),
            progress: format!(
                "from {}: {} of {} stored, {} set aside{}",
                match &self.sealed_from {
                    Some(sender) => format!("{sender} (sealed delivery)"),
                    None if self.issuer.is_empty() => "(not known before the download)".into(),
                    None => self.issuer.clone(),
                },
                self.stored,
                self.instances,
                self.set_aside.len(),
                if self.committed > 0 || !self.uncommitted.is_empty() {
                    format!(
                        ", {} committed, {} not committed",
                        self.committed,
                        self.uncommitted.len()
                    )
                } else {
                    String::new()
                }
            ),
            notes: self
                .set_aside
                .iter()
                .map(|s| {
                    format!(
                        "set aside {} in {}: {}",
                        s.sop_instance_uid,
                        s.file.display(),
                        s.reason
                    )
                })
                .chain(self.uncommitted.iter().map(|u| {
                    format!(
                        "not committed {} (sent again): {}",
                        u.sop_instance_uid, u.reason
                    )
                }))
                .collect(),
            bookkeeping: self.progress.clone(),
            study: self.study.clone(),
        }
    }
}

/// The job id of a document: the same for every token of it, whether the token names its
/// repository by community code or by URL, so the same document is imported once.
/// `repository_url` is the token's repository as `[repositories]` resolves it
/// ([`crate::config::Config::repository_url`]).
pub fn job_id(repository_url: &str, document_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(repository_url.as_bytes())
        .chain_update([0])
        .chain_update(document_id.as_bytes())
        .finalize();
    format!("R{}", &hex::encode(digest)[..12])
}

impl JobRecord for InboundJob {
    type Step = InStep;

    fn id(&self) -> &str {
        &self.id
    }

    fn step(&self) -> InStep {
        self.step
    }

    fn set_step(&mut self, next: InStep) {
        self.step = next;
    }

    fn ended(&self) -> bool {
        matches!(self.step, InStep::Done | InStep::Failed)
    }

    fn fail(&mut self, _at: InStep) {
        self.step = InStep::Failed;
    }

    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    /// Done with no instance set aside, and its token expired: a pruned record cannot
    /// let the same token be imported twice.
    fn prunable(&self, now: u64) -> bool {
        self.step == InStep::Done
            && self.set_aside.is_empty()
            && u64::from(self.expires_at) < now / 1000
    }
}
