//! Storage Commitment Push Model, SCP side (PS3.4 Annex J), and the reception of the
//! local PACS's reports for imports.
//!
//! A sender's N-ACTION on a route is answered at once (N-ACTION-RSP), then each
//! referenced instance is checked against the spool's index for that route: committed
//! when the index records it (it is recorded only once its file is durable) under the
//! same SOP class; failed with 0x0119 (class/instance conflict) when recorded under
//! another class, 0x0112 (no such object instance) when not recorded (never received,
//! refused, or its record pruned after delivery). The N-EVENT-REPORT goes back on the same
//! association, or on a new association to the requester when
//! `[dicom.commitment.<CALLING_AE>]` says `report = "new-association"` (the gateway
//! proposes the SCP role for itself, as PS3.4 J.3.3 asks).
//!
//! A request that covers every instance an open batch holds closes that batch at once
//! (no `stable_after` wait): the sender's explicit end of study. A batch with any
//! instance the request does not cover, or held for a refused instance, waits as usual.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids::{EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::association::server::Negotiation;
use dicom_ul::pdu::{PresentationContextResultReason, RequestorRoles};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::clock::now_ms;
use crate::config::{CommitmentPeer, CommitmentReport};
use crate::dicom::commitment::{
    self, Encoding, Failure, Received, Report, Request, decode_report, encode_report, reason,
    receive_message, send_message,
};
use crate::dicom::dimse::{Command, Response, event_report_request, field, status};
use crate::gateway::inbound::commitment::Reports;
use crate::gateway::reception::route::Route;
use crate::gateway::reception::spool::Spool;

/// Attempts to deliver a report on a new association before giving up (the requester
/// then asks again).
const REPORT_ATTEMPTS: u32 = 3;

/// Network timeout of the association that carries a report to its requester.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The role negotiation of the SCP: for the Storage Commitment Push Model SOP class the
/// roles the requester proposes are accepted as proposed (the PACS opening a new
/// association for its report proposes the SCP role); no other class is negotiated.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitmentRoles;

impl Negotiation for CommitmentRoles {
    fn negotiate_roles(&self, sop_class_uid: &str, scu: bool, scp: bool) -> Option<RequestorRoles> {
        (sop_class_uid.trim_end_matches('\0') == commitment::SOP_CLASS)
            .then_some(RequestorRoles { scu, scp })
    }
}

/// Where the reports of imports come from: the local PACS (its AE title and address)
/// calling `ours` (`inbound.calling_ae_title`).
#[derive(Debug)]
pub struct ImportReports {
    /// The gateway's import AE title, the called AE title of the PACS's report.
    pub ours: String,
    /// The PACS's AE title.
    pub pacs_ae: String,
    /// The PACS's `host:port`: a report association must come from its address.
    pub pacs_address: String,
    /// The imports waiting.
    pub reports: Arc<Reports>,
}

/// How each calling AE title gets its reports (`dicom.commitment`).
pub type Peers = BTreeMap<String, CommitmentPeer>;

/// Checks a request against the spool of `route` and closes the batches it completes
/// (counted in `batches_stable` and logged as the stabilizer does, with the reason; `ready`,
/// the outbound pipeline's bell, rung so packing starts at once). Blocking (index reads):
/// run off the async runtime.
pub fn answer(
    spool: &Spool,
    route: &Route,
    request: &Request,
    metrics: &Metrics,
    ready: &Notify,
) -> Report {
    let mut committed = Vec::new();
    let mut failed = Vec::new();
    let mut batches = HashSet::new();
    for reference in &request.references {
        let code = match spool
            .index()
            .instance(&route.name, &reference.sop_instance_uid)
        {
            Ok(Some(record)) if record.sop_class_uid == reference.sop_class_uid => {
                batches.insert(record.batch);
                committed.push(reference.clone());
                continue;
            }
            Ok(Some(_)) => reason::CLASS_INSTANCE_CONFLICT,
            Ok(None) => reason::NO_SUCH_OBJECT_INSTANCE,
            Err(e) => {
                warn!("storage commitment: the spool index cannot be read: {e}");
                reason::PROCESSING_FAILURE
            }
        };
        failed.push(Failure {
            reference: reference.clone(),
            reason: code,
        });
    }
    let uids: HashSet<&str> = committed
        .iter()
        .map(|r| r.sop_instance_uid.as_str())
        .collect();
    let now = now_ms();
    for id in batches {
        match spool.index().close_committed(id, &uids, now) {
            Ok(Some(batch)) => {
                metrics.batches_stable.inc();
                ready.notify_one();
                info!(
                    batch = %batch.id,
                    route = %batch.route,
                    instances = batch.instances,
                    bytes = batch.bytes,
                    reason = "closed by storage commitment",
                    "batch stable, ready for packing"
                );
            }
            Ok(None) => {}
            Err(e) => warn!(batch = %id, "cannot close the committed batch: {e}"),
        }
    }
    Report {
        transaction_uid: request.transaction_uid.clone(),
        committed,
        failed,
    }
}

/// How the report of `calling` goes back.
pub fn mode<'a>(peers: &'a Peers, calling: &str) -> Option<&'a CommitmentPeer> {
    peers
        .get(calling)
        .or_else(|| {
            peers
                .iter()
                .find(|(ae, _)| ae.eq_ignore_ascii_case(calling))
                .map(|(_, p)| p)
        })
        .filter(|peer| peer.report == CommitmentReport::NewAssociation)
}

/// Sends `report` on a new association to the requester `peer` (AE title: its
/// `ae_title`, else `calling`), from `ours`, proposing the SCP role; a few attempts.
pub async fn report_on_new_association(
    peer: CommitmentPeer,
    ours: String,
    calling: String,
    report: Report,
) {
    let called = if peer.ae_title.is_empty() {
        calling
    } else {
        peer.ae_title.clone()
    };
    for attempt in 1..=REPORT_ATTEMPTS {
        match deliver(&peer.address, &ours, &called, &report).await {
            Ok(status) if status == status::SUCCESS => {
                info!(
                    transaction = %report.transaction_uid,
                    requester = %called,
                    "storage commitment report sent on a new association ({report})"
                );
                return;
            }
            Ok(code) => {
                warn!(
                    transaction = %report.transaction_uid,
                    requester = %called,
                    "the requester answered the storage commitment report with status 0x{code:04X}"
                );
                return;
            }
            Err(e) => {
                warn!(
                    transaction = %report.transaction_uid,
                    requester = %called,
                    address = %peer.address,
                    attempt,
                    "cannot send the storage commitment report: {e}"
                );
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
            }
        }
    }
    warn!(
        transaction = %report.transaction_uid,
        requester = %called,
        "storage commitment report not delivered after {REPORT_ATTEMPTS} attempts; the \
         requester must ask again (check dicom.commitment.{called}.address)"
    );
}

async fn deliver(address: &str, ours: &str, called: &str, report: &Report) -> Result<u16, String> {
    let mut association = ClientAssociationOptions::new()
        .calling_ae_title(ours.to_owned())
        .called_ae_title(called.to_owned())
        .connection_timeout(REPORT_TIMEOUT)
        .read_timeout(REPORT_TIMEOUT)
        .write_timeout(REPORT_TIMEOUT)
        .with_presentation_context(
            commitment::SOP_CLASS,
            vec![EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN],
        )
        .with_role_selection(commitment::SOP_CLASS, false, true)
        .establish_async(address)
        .await
        .map_err(|e| format!("association to {address} failed: {e}"))?;
    let Some((context_id, encoding)) = association
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| (pc.id, pc.transfer_syntax.clone()))
    else {
        let _ = association.abort().await;
        return Err("the requester accepts no Storage Commitment presentation context".into());
    };
    let encoding = Encoding::of(&encoding).map_err(|e| e.to_string())?;
    send_message(
        &mut association,
        context_id,
        event_report_request(
            1,
            commitment::SOP_CLASS,
            commitment::SOP_INSTANCE,
            report.event_type(),
        ),
        Some(&encode_report(report, encoding)),
    )
    .await
    .map_err(|e| e.to_string())?;
    loop {
        match receive_message(&mut association).await {
            Ok(Received::Message(message)) => {
                if let Ok(response) = Response::decode(&message.command)
                    && response.field == field::N_EVENT_REPORT_RSP
                {
                    let _ = association.release().await;
                    return Ok(response.status);
                }
            }
            Ok(_) => return Err("the requester closed the association before answering".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Whether `called` / `calling` from `peer` is the local PACS with a report for an
/// import; `None` when it is not such an association at all.
pub async fn is_report_association(
    imports: &ImportReports,
    called: &str,
    calling: &str,
    peer: SocketAddr,
) -> Option<bool> {
    if called.trim() != imports.ours || calling.trim() != imports.pacs_ae {
        return None;
    }
    let from_pacs = match tokio::net::lookup_host(imports.pacs_address.as_str()).await {
        Ok(mut addresses) => addresses.any(|a| a.ip() == peer.ip()),
        Err(_) => false,
    };
    Some(from_pacs)
}

/// Serves an association the local PACS opened to deliver storage commitment reports:
/// N-EVENT-REPORTs only, each handed to the import waiting for its transaction and
/// answered; anything else aborts the association.
pub async fn serve_reports<A: crate::dicom::tls::Messages>(
    association: &mut A,
    imports: &ImportReports,
) -> Result<(), String> {
    let contexts: Vec<(u8, String)> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .filter(|pc| pc.abstract_syntax.trim_end_matches('\0') == commitment::SOP_CLASS)
        .map(|pc| (pc.id, pc.transfer_syntax.clone()))
        .collect();
    loop {
        let message = match receive_message(association)
            .await
            .map_err(|e| e.to_string())?
        {
            Received::Message(message) => message,
            Received::Released | Received::Aborted => return Ok(()),
        };
        let command = Command::decode(&message.command).map_err(|e| e.to_string())?;
        let Some((_, syntax)) = contexts.iter().find(|(id, _)| *id == message.context_id) else {
            return Err(format!(
                "{command} on a presentation context other than Storage Commitment"
            ));
        };
        if command.field != field::N_EVENT_REPORT_RQ {
            return Err(format!(
                "{command} on the storage commitment report association"
            ));
        }
        let decoded = Encoding::of(syntax).and_then(|encoding| {
            decode_report(message.dataset.as_deref().unwrap_or_default(), encoding)
        });
        let (code, comment) = match decoded {
            Ok(report) => {
                let transaction = report.transaction_uid.clone();
                let summary = report.to_string();
                if imports.reports.deliver(report) {
                    info!(%transaction, "storage commitment report from the PACS ({summary})");
                } else {
                    info!(
                        %transaction,
                        "storage commitment report from the PACS for a transaction no import \
                         waits for (an earlier attempt's); acknowledged and ignored"
                    );
                }
                (status::SUCCESS, None)
            }
            Err(e) => {
                warn!("the PACS's storage commitment report cannot be read: {e}");
                (status::INVALID_ARGUMENT_VALUE, Some(e.to_string()))
            }
        };
        send_message(
            association,
            message.context_id,
            command.response(code, comment.as_deref()),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration keeps the case of `[dicom.commitment.<AE>]` as the file writes it,
    /// while an environment variable can only name it in lower case: the calling AE title
    /// finds its entry either way.
    #[test]
    fn a_requester_finds_its_entry_whatever_the_case_of_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[dicom.commitment.Modality_1]\nreport = \"new-association\"\n\
             address = \"127.0.0.1:11112\"\n\
             [dicom.commitment.CT2]\nreport = \"same-association\"\n",
        )
        .expect("write");
        let config = crate::config::Config::load(&path).expect("loads");
        let peers = &config.dicom.commitment;
        assert!(peers.contains_key("Modality_1"), "{peers:?}");
        for calling in ["Modality_1", "MODALITY_1", "modality_1"] {
            assert_eq!(
                mode(peers, calling).map(|p| p.address.as_str()),
                Some("127.0.0.1:11112"),
                "{calling}"
            );
        }
        assert!(mode(peers, "CT2").is_none(), "same association");
        assert!(
            mode(peers, "OTHER").is_none(),
            "not listed: same association"
        );
        let lower: Peers = BTreeMap::from([("modality_1".to_owned(), peers["Modality_1"].clone())]);
        assert!(mode(&lower, "MODALITY_1").is_some());
    }
}
