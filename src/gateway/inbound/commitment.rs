//! Storage commitment on import (`inbound.storage_commitment = true`): after its
//! C-STOREs, the import asks the local PACS to commit every instance it stored (an
//! N-ACTION per [`MAX_REFERENCES`] instances, each with a new Transaction UID) and waits
//! up to `inbound.commitment_timeout` for the PACS's N-EVENT-REPORT, which comes either
//! on the same association or on a new one the PACS opens to the gateway's SCP (called
//! AE title `inbound.calling_ae_title`), handed over here through [`Reports`].
//!
//! Nothing of a wait survives a restart on purpose: the import step runs again and asks
//! again with a new Transaction UID, and a late report of the old one is acknowledged
//! and ignored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use dicom_dictionary_std::uids::{EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::PresentationContextResultReason;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::dicom::commitment::{
    self, Encoding, MAX_REFERENCES, Received, Reference, Report, Request, decode_report,
    encode_request, receive_message, send_message,
};
use crate::dicom::dimse::{Command, Response, action_request, field, status};
use crate::dicom::scu::{PacsError, StoreTarget};

/// Storage commitment reports awaited, by Transaction UID: the SCP hands over those that
/// arrive on a new association.
#[derive(Debug, Default)]
pub struct Reports {
    waiting: Mutex<HashMap<String, oneshot::Sender<Report>>>,
}

/// Removes its transaction from [`Reports`] however the wait ends.
struct Waiting<'a> {
    reports: &'a Reports,
    transaction_uid: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.reports.waiting.lock() {
            waiting.remove(&self.transaction_uid);
        }
    }
}

impl Reports {
    /// Hands a report to the import waiting for its transaction; `false` when none is
    /// (a report of an earlier attempt, from before a restart or after a timeout).
    pub fn deliver(&self, report: Report) -> bool {
        let sender = self
            .waiting
            .lock()
            .ok()
            .and_then(|mut waiting| waiting.remove(&report.transaction_uid));
        sender.is_some_and(|sender| sender.send(report).is_ok())
    }

    fn expect(&self, transaction_uid: &str) -> (Waiting<'_>, oneshot::Receiver<Report>) {
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(transaction_uid.to_owned(), sender);
        }
        (
            Waiting {
                reports: self,
                transaction_uid: transaction_uid.to_owned(),
            },
            receiver,
        )
    }
}

/// What the PACS answered for the instances of an import.
#[derive(Debug, Default)]
pub struct Verdict {
    /// SOP Instance UIDs committed.
    pub committed: Vec<String>,
    /// Instances not committed: SOP Instance UID and the PACS's reason.
    pub failed: Vec<(String, String)>,
}

/// Why the PACS's commitment could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The association could not be opened.
    #[error(transparent)]
    Pacs(#[from] PacsError),
    /// The PACS accepts no Storage Commitment presentation context.
    #[error(
        "the PACS at {0} does not accept the Storage Commitment Push Model SOP class \
         (1.2.840.10008.1.20.1): enable storage commitment for this gateway's AE title in \
         the PACS, or set inbound.storage_commitment = false"
    )]
    NotSupported(String),
    /// The PACS answered the N-ACTION with a failure.
    #[error("the PACS refused the storage commitment request: status 0x{status:04X} {comment}")]
    Refused {
        /// N-ACTION-RSP status.
        status: u16,
        /// Its Error Comment.
        comment: String,
    },
    /// The exchange broke.
    #[error("storage commitment with the PACS at {address} failed: {reason}")]
    Exchange {
        /// The PACS.
        address: String,
        /// What happened.
        reason: String,
    },
    /// No report within the timeout.
    #[error(
        "the PACS did not send its storage commitment report within {0} s \
         (inbound.commitment_timeout); the import asks again with a new transaction"
    )]
    Timeout(u64),
    /// The random source failed.
    #[error("cannot make a Transaction UID: {0}")]
    Random(String),
}

/// Asks the PACS of `target` to commit `references` and waits up to `timeout` for each
/// report: on the association of the request, or through `reports` from the SCP.
///
/// # Errors
/// [`CommitError`] when a request cannot be made or a report does not come in time.
pub async fn commit(
    target: &StoreTarget,
    references: &[Reference],
    reports: &Reports,
    timeout: Duration,
) -> Result<Verdict, CommitError> {
    let mut verdict = Verdict::default();
    for chunk in references.chunks(MAX_REFERENCES) {
        let transaction_uid =
            commitment::new_transaction_uid().map_err(|e| CommitError::Random(e.to_string()))?;
        let (waiting, arrived) = reports.expect(&transaction_uid);
        let request = Request {
            transaction_uid: transaction_uid.clone(),
            references: chunk.to_vec(),
        };
        let report = exchange(target, &request, arrived, timeout).await?;
        drop(waiting);
        info!(
            transaction = %transaction_uid,
            pacs = %target.called_ae,
            requested = chunk.len(),
            committed = report.committed.len(),
            failed = report.failed.len(),
            "storage commitment report received"
        );
        judge(chunk, &report, &mut verdict);
    }
    Ok(verdict)
}

/// Sorts the requested instances by the report: committed, failed with the PACS's
/// reason, or failed as not mentioned by the report (the standard says every requested
/// instance is in one of its sequences). An instance is matched by SOP class and SOP
/// instance: committed under another class is not committed.
fn judge(requested: &[Reference], report: &Report, verdict: &mut Verdict) {
    fn key(r: &Reference) -> (&str, &str) {
        (r.sop_class_uid.as_str(), r.sop_instance_uid.as_str())
    }
    let committed: std::collections::HashSet<(&str, &str)> =
        report.committed.iter().map(key).collect();
    let failed: HashMap<(&str, &str), u16> = report
        .failed
        .iter()
        .map(|f| (key(&f.reference), f.reason))
        .collect();
    for reference in requested {
        let uid = reference.sop_instance_uid.as_str();
        if let Some(code) = failed.get(&key(reference)) {
            verdict.failed.push((
                uid.to_owned(),
                format!(
                    "the PACS did not commit it: 0x{code:04X} {}",
                    commitment::reason::name(*code)
                ),
            ));
        } else if committed.contains(&key(reference)) {
            verdict.committed.push(uid.to_owned());
        } else {
            verdict.failed.push((
                uid.to_owned(),
                "the PACS's storage commitment report does not mention it".to_owned(),
            ));
        }
    }
}

/// One transaction: the N-ACTION, its response, then the report from either path.
async fn exchange(
    target: &StoreTarget,
    request: &Request,
    mut arrived: oneshot::Receiver<Report>,
    timeout: Duration,
) -> Result<Report, CommitError> {
    let broken = |reason: String| CommitError::Exchange {
        address: target.address.clone(),
        reason,
    };
    // Reads wait as long as the report may take (a PACS may report on this association
    // minutes after its N-ACTION-RSP); the N-ACTION-RSP itself is awaited `target.timeout`.
    let options = ClientAssociationOptions::new()
        .calling_ae_title(target.calling_ae.clone())
        .called_ae_title(target.called_ae.clone())
        .max_pdu_length(target.max_pdu_length)
        .connection_timeout(target.timeout)
        .read_timeout(timeout.max(target.timeout))
        .write_timeout(target.timeout)
        .with_presentation_context(
            commitment::SOP_CLASS,
            vec![EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN],
        );
    let mut association = crate::dicom::scu::open(target, options)
        .await
        .map_err(|e| match e {
            // The association offers this SOP class only.
            PacsError::NoAcceptedContext { .. } => {
                CommitError::NotSupported(target.address.clone())
            }
            e => CommitError::Pacs(e),
        })?;
    let Some((context_id, encoding)) = association
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| (pc.id, Encoding::of(&pc.transfer_syntax)))
    else {
        let _ = association.abort().await;
        return Err(CommitError::NotSupported(target.address.clone()));
    };
    let encoding = encoding.map_err(|e| broken(e.to_string()))?;
    let dataset = encode_request(request, encoding);
    send_message(
        &mut association,
        context_id,
        action_request(
            1,
            commitment::SOP_CLASS,
            commitment::SOP_INSTANCE,
            commitment::ACTION_REQUEST,
        ),
        Some(&dataset),
    )
    .await
    .map_err(|e| broken(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let answer_deadline = tokio::time::Instant::now() + target.timeout;
    // The N-ACTION-RSP first, then the report, on this association or through the SCP.
    let mut answered = false;
    let mut open = true;
    loop {
        let received = if open {
            tokio::select! {
                report = &mut arrived => {
                    let _ = association.release().await;
                    return report.map_err(|_| broken("the report hand-over closed".into()));
                }
                () = tokio::time::sleep_until(deadline) => {
                    let _ = association.abort().await;
                    return Err(CommitError::Timeout(timeout.as_secs()));
                }
                () = tokio::time::sleep_until(answer_deadline), if !answered => {
                    let _ = association.abort().await;
                    return Err(broken(format!(
                        "no N-ACTION-RSP within {} s",
                        target.timeout.as_secs()
                    )));
                }
                received = receive_message(&mut association) => received,
            }
        } else {
            return tokio::select! {
                report = &mut arrived => report.map_err(|_| broken("the report hand-over closed".into())),
                () = tokio::time::sleep_until(deadline) => Err(CommitError::Timeout(timeout.as_secs())),
            };
        };
        let message = match received {
            Ok(Received::Message(message)) => message,
            Ok(Received::Released | Received::Aborted) if answered => {
                open = false;
                continue;
            }
            Ok(Received::Released | Received::Aborted) => {
                return Err(broken(
                    "the PACS closed the association before answering the request".into(),
                ));
            }
            // The connection broke after the answer: the report may still come on a new
            // association.
            Err(_) if answered => {
                open = false;
                continue;
            }
            Err(e) => return Err(broken(e.to_string())),
        };
        if let Ok(response) = Response::decode(&message.command) {
            if response.field == field::N_ACTION_RSP {
                if response.status != status::SUCCESS {
                    let _ = association.release().await;
                    return Err(CommitError::Refused {
                        status: response.status,
                        comment: response.error_comment,
                    });
                }
                answered = true;
            }
            continue;
        }
        let command = Command::decode(&message.command).map_err(|e| broken(e.to_string()))?;
        if command.field != field::N_EVENT_REPORT_RQ {
            let _ = association.abort().await;
            return Err(broken(format!(
                "the PACS sent {command} instead of a report"
            )));
        }
        let report = message
            .dataset
            .as_deref()
            .ok_or(commitment::CommitmentError::Missing("the report's dataset"))
            .and_then(|bytes| decode_report(bytes, encoding));
        let (code, outcome) = match report {
            Ok(report) if report.transaction_uid == request.transaction_uid => {
                (status::SUCCESS, Ok(report))
            }
            Ok(_) => {
                warn!(
                    "a storage commitment report for another transaction on this association; ignored"
                );
                (status::NO_SUCH_SOP_INSTANCE, Err(None))
            }
            Err(e) => (status::INVALID_ARGUMENT_VALUE, Err(Some(e))),
        };
        let comment = outcome
            .as_ref()
            .err()
            .and_then(|e| e.as_ref())
            .map(ToString::to_string);
        send_message(
            &mut association,
            message.context_id,
            command.response(code, comment.as_deref()),
            None,
        )
        .await
        .map_err(|e| broken(e.to_string()))?;
        match outcome {
            Ok(report) => {
                let _ = association.release().await;
                return Ok(report);
            }
            Err(Some(e)) => {
                let _ = association.release().await;
                return Err(broken(format!("the PACS's report cannot be read: {e}")));
            }
            Err(None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(n: u32) -> Reference {
        Reference {
            sop_class_uid: "1.2".into(),
            sop_instance_uid: format!("1.2.{n}"),
        }
    }

    #[test]
    fn an_instance_the_report_does_not_mention_is_failed() {
        let report = Report {
            transaction_uid: "1.2".into(),
            committed: vec![reference(1)],
            failed: vec![commitment::Failure {
                reference: reference(2),
                reason: commitment::reason::NO_SUCH_OBJECT_INSTANCE,
            }],
        };
        let mut verdict = Verdict::default();
        judge(
            &[reference(1), reference(2), reference(3)],
            &report,
            &mut verdict,
        );
        assert_eq!(verdict.committed, ["1.2.1"]);
        assert_eq!(verdict.failed.len(), 2);
        assert!(
            verdict.failed[0]
                .1
                .contains("0x0112 no such object instance")
        );
        assert!(verdict.failed[1].1.contains("does not mention"));
    }

    #[test]
    fn an_instance_committed_under_another_sop_class_is_not_committed() {
        let mut other_class = reference(1);
        other_class.sop_class_uid = "1.3".into();
        let report = Report {
            transaction_uid: "1.2".into(),
            committed: vec![other_class],
            failed: Vec::new(),
        };
        let mut verdict = Verdict::default();
        judge(&[reference(1)], &report, &mut verdict);
        assert!(verdict.committed.is_empty(), "{verdict:?}");
        assert!(
            verdict.failed[0].1.contains("does not mention"),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_report_reaches_only_its_waiting_transaction() {
        let reports = Reports::default();
        let (waiting, mut arrived) = reports.expect("1.2.3");
        let report = |uid: &str| Report {
            transaction_uid: uid.into(),
            committed: Vec::new(),
            failed: Vec::new(),
        };
        assert!(!reports.deliver(report("9.9")));
        assert!(reports.deliver(report("1.2.3")));
        assert_eq!(
            arrived.try_recv().map(|r| r.transaction_uid),
            Ok("1.2.3".into())
        );
        drop(waiting);
        assert!(!reports.deliver(report("1.2.3")), "the wait is over");
    }
}
