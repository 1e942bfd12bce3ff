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
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
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

/// Message ID of the report sent on a new association (its only message).
const REPORT_MESSAGE_ID: u16 = 1;

/// Bytes of storage commitment request datasets held at once by all associations
/// together (each request at most [`commitment::MAX_DATASET_LENGTH`], decoded to a few
/// times its size while checked): a request that would go beyond is read to its end,
/// discarded and answered 0x0213 (resource limitation), the requester asks again later.
pub const DATASET_BUDGET: usize = 64 * 1024 * 1024;

/// Reports sent on new associations at once (`report = "new-association"`): beyond, a
/// report goes back on the association of its request.
pub const MAX_REPORT_SENDERS: usize = 16;

/// A byte budget shared by every association of the process.
#[derive(Debug)]
pub struct Budget(Semaphore);

impl Budget {
    /// A budget of `bytes`.
    pub const fn new(bytes: usize) -> Budget {
        Budget(Semaphore::const_new(bytes))
    }

    /// Adds `bytes` to what `held` holds, or returns `false` (taking nothing) when the
    /// budget has not that many free. What is held returns to the budget when dropped.
    pub fn take(&'static self, held: &mut Option<SemaphorePermit<'static>>, bytes: usize) -> bool {
        let Ok(count) = u32::try_from(bytes) else {
            return false;
        };
        let Ok(more) = self.0.try_acquire_many(count) else {
            return false;
        };
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        true
    }
}

/// The budget of storage commitment request datasets ([`DATASET_BUDGET`]).
pub static DATASETS: Budget = Budget::new(DATASET_BUDGET);

/// The senders of reports on new associations ([`MAX_REPORT_SENDERS`]).
pub static REPORT_SENDERS: Semaphore = Semaphore::const_new(MAX_REPORT_SENDERS);

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
/// `ae_title`, else `calling`), from `ours`, proposing the SCP role; a few attempts,
/// given up when the gateway stops. `_sender` is its place among [`REPORT_SENDERS`].
pub async fn report_on_new_association(
    peer: CommitmentPeer,
    ours: String,
    calling: String,
    report: Report,
    shutdown: CancellationToken,
    _sender: SemaphorePermit<'static>,
) {
    let called = if peer.ae_title.is_empty() {
        calling
    } else {
        peer.ae_title.clone()
    };
    for attempt in 1..=REPORT_ATTEMPTS {
        let delivered = tokio::select! {
            delivered = deliver(&peer.address, &ours, &called, &report) => delivered,
            () = shutdown.cancelled() => {
                warn!(
                    transaction = %report.transaction_uid,
                    requester = %called,
                    "storage commitment report not sent: the gateway is shutting down; the \
                     requester must ask again"
                );
                return;
            }
        };
        match delivered {
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
                if attempt < REPORT_ATTEMPTS {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(u64::from(attempt))) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
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
            REPORT_MESSAGE_ID,
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
                    && response.responding_to == REPORT_MESSAGE_ID
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
/// import; `None` when the AE titles are not those of such an association at all. The
/// address `inbound.pacs` names is resolved within `wait`; an IPv4 peer seen as an
/// IPv4-mapped IPv6 address (a dual-stack listener) matches its IPv4 address.
pub async fn is_report_association(
    imports: &ImportReports,
    called: &str,
    calling: &str,
    peer: SocketAddr,
    wait: Duration,
) -> Option<bool> {
    if called.trim() != imports.ours || calling.trim() != imports.pacs_ae {
        return None;
    }
    let peer = peer.ip().to_canonical();
    let from_pacs =
        match tokio::time::timeout(wait, tokio::net::lookup_host(imports.pacs_address.as_str()))
            .await
        {
            Ok(Ok(mut addresses)) => addresses.any(|a| a.ip().to_canonical() == peer),
            Ok(Err(e)) => {
                warn!(
                    address = %imports.pacs_address,
                    "inbound.pacs cannot be resolved to check a storage commitment report \
                     association: {e}"
                );
                false
            }
            Err(_) => {
                warn!(
                    address = %imports.pacs_address,
                    "inbound.pacs was not resolved within {} s to check a storage commitment \
                     report association (dicom.association_timeout)",
                    wait.as_secs()
                );
                false
            }
        };
    Some(from_pacs)
}

/// Serves an association the local PACS opened to deliver storage commitment reports:
/// N-EVENT-REPORTs only, each handed to the import waiting for its transaction and
/// answered; anything else, or the gateway stopping between messages, aborts the
/// association.
pub async fn serve_reports<A: crate::dicom::tls::Messages>(
    association: &mut A,
    imports: &ImportReports,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let contexts: Vec<(u8, String)> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .filter(|pc| pc.abstract_syntax.trim_end_matches('\0') == commitment::SOP_CLASS)
        .map(|pc| (pc.id, pc.transfer_syntax.clone()))
        .collect();
    loop {
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Err("the gateway is shutting down".into()),
            received = receive_message(association) => received,
        };
        let message = match received.map_err(|e| e.to_string())? {
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
        let (code, comment) = take_report(imports, &command, message.dataset.as_deref(), syntax);
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

/// Reads a report of the local PACS (`command` and its dataset, in `syntax`) and hands it
/// to the import waiting for its transaction: the N-EVENT-REPORT-RSP status and comment.
pub fn take_report(
    imports: &ImportReports,
    command: &Command,
    dataset: Option<&[u8]>,
    syntax: &str,
) -> (u16, Option<String>) {
    if command.sop_instance_uid != commitment::SOP_INSTANCE {
        let why = "N-EVENT-REPORT not on the Storage Commitment Push Model SOP instance";
        warn!("the PACS's storage commitment report refused: {why}");
        return (status::NO_SUCH_SOP_INSTANCE, Some(why.to_owned()));
    }
    if !matches!(
        command.type_id,
        Some(commitment::EVENT_SUCCESS | commitment::EVENT_FAILURES)
    ) {
        let why = "only Event Type ID 1 or 2 (storage commitment result) is known";
        warn!("the PACS's storage commitment report refused: {why}");
        return (status::NO_SUCH_EVENT_TYPE, Some(why.to_owned()));
    }
    let decoded = dataset
        .ok_or(commitment::CommitmentError::Missing("the report's dataset"))
        .and_then(|bytes| Encoding::of(syntax).and_then(|e| decode_report(bytes, e)));
    match decoded {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget is shared by every holder, refuses what would go beyond it without
    /// taking anything, and gets back what a holder drops.
    #[test]
    fn the_dataset_budget_is_shared_and_given_back() {
        static SMALL: Budget = Budget::new(100);
        let (mut a, mut b) = (None, None);
        assert!(SMALL.take(&mut a, 60));
        assert!(!SMALL.take(&mut b, 50), "over the budget");
        assert!(SMALL.take(&mut b, 40));
        assert!(!SMALL.take(&mut a, 1), "spent");
        drop(a);
        assert!(SMALL.take(&mut b, 60), "given back");
        assert!(!SMALL.take(&mut b, usize::MAX), "beyond any budget");
    }

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
