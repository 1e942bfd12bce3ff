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
    /// Open or stable.
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
