//! Sending DICOM files into the local PACS: the store target built from `[inbound]` (one
//! constructor, for the inbound pipeline and `cloudpdi import`), and `cloudpdi import`
//! itself (files or folders, e.g. a PDI read from a disc).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::InboundConfig;
use crate::dicom::scu::{Outcome, ScuError, StoreTarget, collect, store_all};
use crate::gateway::inbound::reconcile::{PatientIdPolicy, Reconciler};
use crate::telemetry::{Escaped, escape};

/// Largest PDU accepted from the PACS (bytes): the common 128 KiB.
pub const MAX_PDU_LENGTH: u32 = 131_072;

/// Timeout of every network wait on the PACS (connect, negotiation, each response).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// First wait before an instance is tried again (doubled after each failed attempt).
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Where and how instances are stored: the PACS and the limits of `[inbound]`, and what
/// happens to each instance's Patient ID.
pub fn store_target(inbound: &InboundConfig, policy: PatientIdPolicy) -> StoreTarget {
    StoreTarget {
        address: inbound.pacs.clone(),
        called_ae: inbound.pacs_ae_title.clone(),
        calling_ae: inbound.calling_ae_title.clone(),
        associations: inbound.associations,
        max_pdu_length: MAX_PDU_LENGTH,
        timeout: TIMEOUT,
        max_attempts: inbound.attempts,
        backoff: FIRST_BACKOFF,
        reconcile: Some(Reconciler {
            policy,
            local_issuer: inbound.issuer.clone(),
        }),
    }
}

/// Why `cloudpdi import` did not store everything.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The paths given hold no DICOM file.
    #[error(
        "no DICOM file in the {paths} path(s) given ({skipped} file(s) skipped as not \
         DICOM): nothing was sent; give the files or folders of the study"
    )]
    NothingToImport {
        /// Paths given.
        paths: usize,
        /// Files found that are not DICOM.
        skipped: usize,
    },
    /// The PACS did not take every instance (each one is listed in the report).
    #[error("{refused} of {total} instances were not stored (listed above)")]
    NotStored {
        /// Instances not stored.
        refused: usize,
        /// Instances found.
        total: usize,
    },
}

/// What an import did, line by line for the person who ran it.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Files skipped (not DICOM) and instances refused, one line each.
    pub notes: Vec<String>,
    /// Instances found.
    pub total: usize,
    /// Instances the PACS did not take.
    pub refused: usize,
    /// Files that are not DICOM.
    pub skipped: usize,
}

impl ImportReport {
    /// The closing line: how many were stored, refused and skipped.
    pub fn summary(&self) -> String {
        format!(
            "{} of {} instances stored, {} refused, {} files skipped",
            self.total - self.refused,
            self.total,
            self.refused,
            self.skipped
        )
    }

    /// Whether every instance found was stored.
    ///
    /// # Errors
    /// [`ImportError::NotStored`] when some were not.
    pub fn check(&self) -> Result<(), ImportError> {
        if self.refused == 0 {
            Ok(())
        } else {
            Err(ImportError::NotStored {
                refused: self.refused,
                total: self.total,
            })
        }
    }
}

/// Sends every DICOM file under `paths` (walked; DICOMDIRs and other files are skipped)
/// to the PACS of `inbound`, reconciling Patient IDs by `policy`.
///
/// # Errors
/// [`ImportError::NothingToImport`] when no DICOM file was found (nothing is sent).
pub async fn import(
    inbound: &InboundConfig,
    policy: PatientIdPolicy,
    paths: &[PathBuf],
) -> Result<ImportReport, ImportError> {
    let (instances, skipped) = collect(paths);
    let mut report = ImportReport {
        notes: skipped.iter().map(skipped_line).collect(),
        total: instances.len(),
        skipped: skipped.len(),
        refused: 0,
    };
    if instances.is_empty() {
        return Err(ImportError::NothingToImport {
            paths: paths.len(),
            skipped: skipped.len(),
        });
    }
    let target = Arc::new(store_target(inbound, policy));
    for (instance, outcome) in &store_all(target, instances).await {
        if let Outcome::Refused { reason, .. } | Outcome::Unavailable { reason } = outcome {
            report.refused += 1;
            report.notes.push(format!(
                "refused: {}: {}",
                escape(&instance.path.display().to_string()),
                Escaped(reason)
            ));
        }
    }
    Ok(report)
}

fn skipped_line(not_dicom: &ScuError) -> String {
    format!("skipped: {}", Escaped(&not_dicom.to_string()))
}
