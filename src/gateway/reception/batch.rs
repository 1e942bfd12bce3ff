//! Batches: the instances of one study (or one patient) received on one route, which
//! travel together as one PDI container.
//!
//! A batch is *open* while instances arrive and becomes *stable* after the route's quiet
//! period; stable batches wait for the outbound pipeline, which claims them (*sent*).
//! These are the records; [`crate::gateway::store::BatchIndex`] keeps them and applies
//! the rules of batching, each change in one transaction.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::BatchBy;
use crate::gateway::store::IndexError;

/// A batch identifier, unique within one data folder; shown as `B000042`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchId(pub u64);

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "B{:06}", self.0)
    }
}

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    /// Instances are still arriving.
    Open,
    /// Quiet for the route's `stable_after`: ready for packing.
    Stable,
    /// Taken by the outbound pipeline (its job says how far it got); late instances of
    /// the study start a new batch.
    Sent,
}

/// What the index knows about a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// The batch's identifier.
    pub id: BatchId,
    /// The route's name.
    pub route: String,
    /// What groups the batch: Study Instance UID, or Patient ID for patient routes.
    pub key: String,
    /// Whether `key` is a study or a patient.
    pub batch_by: BatchBy,
    /// Open, stable or sent (open and refused instances not yet resent: held).
    pub state: BatchState,
    /// Distinct instances in the batch.
    pub instances: u64,
    /// Sum of the stored file sizes.
    pub bytes: u64,
    /// When the first instance arrived (Unix milliseconds).
    pub opened_at: u64,
    /// When the latest instance arrived (Unix milliseconds).
    pub last_instance_at: u64,
    /// When the batch became stable (Unix milliseconds).
    pub stable_at: Option<u64>,
    /// Instances of this batch's group the gateway refused for a local reason (disk
    /// full, out of resources): the sender will resend them, so the batch may be
    /// incomplete until it does.
    #[serde(default)]
    pub refused: u64,
    /// When the latest of those refusals happened (Unix milliseconds).
    #[serde(default)]
    pub last_refused_at: Option<u64>,
    /// Why the latest instance was refused, for `cloudpdi status`.
    #[serde(default)]
    pub refusal: Option<String>,
    /// When an admin released the held batch with `cloudpdi release` (Unix milliseconds).
    #[serde(default)]
    pub released_at: Option<u64>,
    /// SOP Instance UIDs refused and not received since (at most [`MAX_MISSING`]): the
    /// batch is held until each has arrived, so neither a resend of instances already
    /// stored nor other instances of the study sent after the refusal end the hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Whether a refusal could not be listed in `missing` (its instance unknown, or the
    /// list full): then any instance arriving after the latest refusal ends the hold.
    #[serde(default)]
    pub missing_unlisted: bool,
    /// Who and what the batch is about, from its instances, for `cloudpdi status`.
    #[serde(default)]
    pub study: StudySummary,
}

impl BatchRecord {
    /// Whether the batch is held as possibly incomplete: refused instances have not all
    /// arrived since (those listed in `missing`; for unlisted ones, no instance arrived
    /// after the latest refusal), and no admin released it after that refusal. A held
    /// batch never becomes stable by itself until the sender resends.
    pub fn held(&self) -> bool {
        self.state == BatchState::Open
            && self.last_refused_at.is_some_and(|refused| {
                self.released_at.is_none_or(|released| released < refused)
                    && (!self.missing.is_empty()
                        || (self.missing_unlisted && self.last_instance_at <= refused))
            })
    }

    /// The state as `cloudpdi status` names it: `open`, `held`, `stable` or `sent`.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            BatchState::Open if self.held() => "held",
            BatchState::Open => "open",
            BatchState::Stable => "stable",
            BatchState::Sent => "sent",
        }
    }
}

/// Refused SOP Instance UIDs listed per batch (a UID is at most 64 characters, and the
/// record is rewritten with each instance); beyond it the batch falls back to "any
/// instance after the latest refusal".
pub const MAX_MISSING: usize = 1_000;

/// Longest text kept of each study attribute (a hostile dataset may carry a long value;
/// the longest of these VRs, LO, allows 64 characters).
pub const MAX_STUDY_TEXT: usize = 64;

/// Distinct modalities kept per batch; more are summed up as `+`.
pub const MAX_MODALITIES: usize = 4;

/// What identifies a study for a person: read from its instances, shown by `cloudpdi
/// status` for batches and the jobs of both pipelines (an admin asks by patient and
/// accession, not by a 64-character Study Instance UID).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudySummary {
    /// Patient ID (0010,0020).
    #[serde(default)]
    pub patient_id: String,
    /// Accession Number (0008,0050).
    #[serde(default)]
    pub accession: String,
    /// Study Date (0008,0020), as `YYYYMMDD`.
    #[serde(default)]
    pub study_date: String,
    /// The modalities of the instances, e.g. `CT` or `CT/SR`.
    #[serde(default)]
    pub modality: String,
    /// Study Instance UID of the first instance.
    #[serde(default)]
    pub study_uid: String,
}

impl StudySummary {
    /// Fills what is still unknown from one instance, and adds its modality.
    pub fn add(&mut self, instance: &InstanceRecord) {
        let fill = |field: &mut String, value: &str| {
            if field.is_empty() {
                *field = clip(value);
            }
        };
        fill(&mut self.patient_id, &instance.patient_id);
        fill(&mut self.accession, &instance.accession);
        fill(&mut self.study_date, &instance.study_date);
        fill(&mut self.study_uid, &instance.study_uid);
        let modality = clip(&instance.modality);
        if modality.is_empty() || self.modality.split('/').any(|m| m == modality || m == "+") {
            return;
        }
        let kept = self.modality.split('/').filter(|m| !m.is_empty()).count();
        let next = if kept >= MAX_MODALITIES {
            "+"
        } else {
            &modality
        };
        if self.modality.is_empty() {
            self.modality = next.to_owned();
        } else {
            self.modality = format!("{}/{next}", self.modality);
        }
    }
}

/// `value` cut to [`MAX_STUDY_TEXT`] characters: what reception keeps of an attribute
/// that only identifies the study for a person.
pub fn clip(value: &str) -> String {
    value.chars().take(MAX_STUDY_TEXT).collect()
}

/// What the index knows about one stored instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The batch holding it.
    pub batch: BatchId,
    /// File path relative to the spool folder.
    pub file: String,
    /// File size in bytes (meta header included).
    pub size: u64,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// Transfer syntax as received.
    pub transfer_syntax: String,
    /// The sender's AE title.
    pub calling_ae: String,
    /// Arrival time (Unix milliseconds).
    pub received_at: u64,
    /// Patient ID (0010,0020).
    #[serde(default)]
    pub patient_id: String,
    /// Accession Number (0008,0050).
    #[serde(default)]
    pub accession: String,
    /// Study Date (0008,0020).
    #[serde(default)]
    pub study_date: String,
    /// Modality (0008,0060).
    #[serde(default)]
    pub modality: String,
    /// Size, SHA-256 and CRC-32 of the file, computed while it was spooled, so that
    /// packing reads it once; `None` in a record of an older version (packing then hashes
    /// the file, as it does one replaced since: [`crate::pdi::KnownHash`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<crate::pdi::KnownHash>,
}

/// What recording an instance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new instance in `batch`.
    Added {
        /// The batch it joined.
        batch: BatchId,
        /// How the batch came to be open for it.
        joined: Joined,
    },
    /// The instance was already in this open batch; the file was replaced.
    Replaced(BatchId),
}

/// How an instance found its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The group's batch was open.
    Open,
    /// No batch was open or waiting: this instance started one.
    New,
    /// The group's batch was stable but not yet packed: it is open again, so a study
    /// interrupted (e.g. by a gateway restart) and resent still travels as one.
    Reopened,
}

/// Why `cloudpdi release` cannot release a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// No such batch.
    #[error("no batch {0}: `cloudpdi status` lists the batches")]
    Unknown(BatchId),
    /// The batch is not held.
    #[error(
        "batch {0} is {1}, not held: only a batch held as possibly incomplete (refused \
         instances not resent) needs a release"
    )]
    NotHeld(BatchId, &'static str),
    /// The index cannot be read or changed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(modality: &str, accession: &str) -> InstanceRecord {
        InstanceRecord {
            batch: BatchId(1),
            file: "f".into(),
            size: 1,
            sop_class_uid: "1.2".into(),
            study_uid: "1.2.3".into(),
            series_uid: "1.2.3.4".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            calling_ae: "PACS".into(),
            received_at: 1,
            patient_id: "P1".into(),
            accession: accession.into(),
            study_date: "20261124".into(),
            modality: modality.into(),
            hash: None,
        }
    }

    #[test]
    fn a_record_of_an_older_version_has_no_hash_and_a_hash_is_kept_as_hex() {
        let old = serde_json::to_value(instance("CT", "A1")).expect("encodes");
        assert!(old.get("hash").is_none(), "{old}");
        let read: InstanceRecord = serde_json::from_value(old).expect("decodes");
        assert_eq!(read.hash, None);

        let hashed = InstanceRecord {
            hash: Some(crate::pdi::KnownHash {
                hash: crate::pdi::FileHash {
                    size: 1,
                    sha256: [0xab; 32],
                    crc: 7,
                },
                inode: 9,
                modified: (1_764_460_800, 5),
            }),
            ..instance("CT", "A1")
        };
        let text = serde_json::to_string(&hashed).expect("encodes");
        assert!(text.contains(&format!("\"{}\"", "ab".repeat(32))), "{text}");
        let read: InstanceRecord = serde_json::from_str(&text).expect("decodes");
        assert_eq!(read, hashed);
        let broken = text.replace(&"ab".repeat(32), "not hex");
        assert!(serde_json::from_str::<InstanceRecord>(&broken).is_err());
    }

    #[test]
    fn a_study_summary_keeps_short_text_and_few_modalities() {
        let mut study = StudySummary::default();
        let long = "A".repeat(10_000);
        for modality in ["CT", "SR", "CT", "PR", "KO", "SEG", "OT", "MR"] {
            study.add(&instance(modality, &long));
        }
        assert_eq!(study.accession.chars().count(), MAX_STUDY_TEXT);
        assert_eq!(study.modality, "CT/SR/PR/KO/+");
        assert_eq!(
            (study.patient_id.as_str(), study.study_date.as_str()),
            ("P1", "20261124")
        );
    }
}
