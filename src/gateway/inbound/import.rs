//! Sending DICOM files into the local PACS: the store target built from `[inbound]` (one
//! constructor, for the inbound pipeline and `cloudpdi import`), and `cloudpdi import`
//! itself (files or folders, e.g. a PDI read from a disc).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::InboundConfig;
use crate::dicom::scu::{Outcome, PacsError, ScuError, StoreTarget, collect, store_all};
use crate::dicom::tls::{DicomTlsError, PacsTls};
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
///
/// # Errors
/// [`DicomTlsError`] when a file of `[inbound.pacs_tls]` cannot be used.
pub fn store_target(
    inbound: &InboundConfig,
    policy: PatientIdPolicy,
) -> Result<StoreTarget, DicomTlsError> {
    let tls = match &inbound.pacs_tls {
        Some(settings) => Some(PacsTls::load(settings, &inbound.pacs)?),
        None => None,
    };
    Ok(StoreTarget {
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
        tls,
        transcode: inbound.transcode,
    })
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
    /// What stopped the associations left instances unsent: one cause for all of them.
    #[error("{} of {total} instances were not sent: {}, then run the import again", .unsent.count, .unsent.cause)]
    Pacs {
        /// The instances not sent and why.
        unsent: Unsent,
        /// Instances found.
        total: usize,
    },
    /// The PACS did not take every instance (each one is listed in the report).
    #[error("{refused} of {total} instances were not stored (listed above)")]
    NotStored {
        /// Instances not stored.
        refused: usize,
        /// Instances found.
        total: usize,
    },
    /// A file of `[inbound.pacs_tls]` cannot be used: nothing was sent.
    #[error("nothing was sent: {0}")]
    Tls(#[from] DicomTlsError),
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
    /// Instances not sent because of what stopped their associations, if any.
    pub unsent: Option<Unsent>,
}

/// Instances an import left unsent because of what stopped their associations (the PACS
/// unreachable, a rejection), with the one cause reported for all of them.
#[derive(Debug, Clone)]
pub struct Unsent {
    /// How many.
    pub count: usize,
    /// Why: a permanent cause if any association met one (it decides that the job waits
    /// for a person), else the first cause met.
    pub cause: PacsError,
}

/// The instances left unsent among `outcomes` (of [`store_all`]) and their one cause;
/// `None` when every instance got its own answer from the PACS.
pub fn unsent<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Option<Unsent> {
    let causes: Vec<&PacsError> = outcomes
        .into_iter()
        .filter_map(|outcome| match outcome {
            Outcome::Unavailable { cause } => Some(cause),
            _ => None,
        })
        .collect();
    let cause = causes
        .iter()
        .find(|c| c.is_permanent())
        .or_else(|| causes.first())?;
    Some(Unsent {
        count: causes.len(),
        cause: (*cause).clone(),
    })
}

impl ImportReport {
    /// The closing line: how many were stored, refused and skipped.
    pub fn summary(&self) -> String {
        let unsent = self.unsent.as_ref().map_or(0, |u| u.count);
        format!(
            "{} of {} instances stored, {} refused, {unsent} not sent, {} files skipped",
            self.total - self.refused - unsent,
            self.total,
            self.refused,
            self.skipped
        )
    }

    /// Whether every instance found was stored.
    ///
    /// # Errors
    /// [`ImportError::Pacs`] with the one cause when some were not sent,
    /// [`ImportError::NotStored`] when the PACS refused some.
    pub fn check(&self) -> Result<(), ImportError> {
        if let Some(unsent) = &self.unsent {
            Err(ImportError::Pacs {
                unsent: unsent.clone(),
                total: self.total,
            })
        } else if self.refused == 0 {
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
        unsent: None,
    };
    if instances.is_empty() {
        return Err(ImportError::NothingToImport {
            paths: paths.len(),
            skipped: skipped.len(),
        });
    }
    let target = Arc::new(store_target(inbound, policy)?);
    let results = store_all(target, instances).await;
    report.unsent = unsent(results.iter().map(|(_, outcome)| outcome));
    for (instance, outcome) in &results {
        if let Outcome::Refused { reason, .. } = outcome {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permanent_cause_wins_and_every_unsent_instance_is_counted() {
        let unreachable = PacsError::Unreachable {
            address: "h:1".into(),
            reason: "refused".into(),
        };
        let rejected = PacsError::CallingAeRejected {
            address: "h:1".into(),
            calling_ae: "A".into(),
            permanent: true,
        };
        let outcomes = [
            Outcome::Stored { status: 0 },
            Outcome::Unavailable {
                cause: unreachable.clone(),
            },
            Outcome::Unavailable {
                cause: rejected.clone(),
            },
            Outcome::Refused {
                status: Some(0xC000),
                reason: "bad".into(),
            },
        ];
        let found = unsent(&outcomes).expect("unsent");
        assert_eq!((found.count, found.cause), (2, rejected));
        assert!(unsent(&outcomes[..2]).is_some_and(|u| u.count == 1 && u.cause == unreachable));
        assert!(unsent(&outcomes[..1]).is_none());
    }
}
