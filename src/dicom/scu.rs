//! The C-STORE service class user: sends DICOM files into the local PACS.
//!
//! Several associations run in parallel, each carrying many instances (one association
//! per image is slow). Presentation contexts are proposed from what the files hold: each
//! (SOP class, transfer syntax) pair as it is, plus the uncompressed syntaxes per SOP
//! class so that an uncompressed file can be converted when the PACS wants another byte
//! order or VR encoding, and a compressed one decoded when the PACS accepts only
//! uncompressed data for its class and `inbound.transcode = "when-refused"` (see
//! [`super::transcode`]); otherwise a PACS that refuses the file's syntax gets a clear
//! refusal naming it.
//!
//! Failures are sorted: what stops a whole association is a [`PacsError`] (unreachable,
//! rejected with its A-ASSOCIATE-RJ reason, aborted, no accepted presentation context,
//! out of resources), one cause for every instance it leaves unsent; a transient one is
//! retried with exponential back-off on a fresh association, a permanent one (a
//! rejection the PACS will repeat until someone changes its configuration or ours) is
//! not. Any other failure status of one instance is permanent and reported with the
//! PACS's own reason, so the instance can be set aside. Retries are logged at debug
//! level only: the caller logs one line per import attempt with the cause.

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dicom_dictionary_std::uids::{
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN as DEFLATED, EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT_LE,
    IMPLICIT_VR_LITTLE_ENDIAN as IMPLICIT_LE, MEDIA_STORAGE_DIRECTORY_STORAGE,
};
use dicom_object::meta::FileMetaTable;
use dicom_ul::Pdu;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceUserReason, AssociationRJSource,
    PDataValueType, PresentationContextResultReason,
};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::dimse::{Response, command_pdu, field, status, store_request};
use super::tls::Link;
use super::transcode;
use crate::config::Transcode;
use crate::gateway::inbound::reconcile::{PatientIdPolicy, Reconciler};

/// Explicit VR Big Endian: retired from the standard, still found on old media.
#[expect(deprecated, reason = "a retired syntax we must still send")]
const EXPLICIT_BE: &str = dicom_dictionary_std::uids::EXPLICIT_VR_BIG_ENDIAN;
/// At most this many presentation contexts per association (PS3.8 allows 128 ids).
const MAX_CONTEXTS: usize = 120;

/// Where and how to store.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// `host:port` of the PACS.
    pub address: String,
    /// The PACS's AE title.
    pub called_ae: String,
    /// Our AE title, as the PACS knows it.
    pub calling_ae: String,
    /// Associations used in parallel.
    pub associations: usize,
    /// Largest PDU we accept from the PACS.
    pub max_pdu_length: u32,
    /// Timeout of every network wait.
    pub timeout: Duration,
    /// Attempts per instance for transient failures (at least 1).
    pub max_attempts: u32,
    /// First back-off delay; doubled after each failed attempt.
    pub backoff: Duration,
    /// Patient ID reconciliation applied to every instance, if any.
    pub reconcile: Option<Reconciler>,
    /// DICOM TLS towards the PACS (`[inbound.pacs_tls]`); `None`: plain DICOM.
    pub tls: Option<super::tls::PacsTls>,
    /// Whether compressed pixel data the PACS refuses is decoded (inbound.transcode).
    pub transcode: Transcode,
}

/// Why a file cannot be sent at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScuError {
    /// The file is not a DICOM Part 10 file with a usable meta header.
    #[error("{path}: not a DICOM Part 10 file ({reason})")]
    NotDicom {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why the PACS took no instance on an association: one cause for every instance the
/// association would have carried, named so that an admin knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacsError {
    /// No connection: refused, timed out, no route, name not resolved.
    #[error(
        "the PACS at {address} cannot be reached ({reason}): check that it runs and \
         listens on that address"
    )]
    Unreachable {
        /// `host:port` of the PACS.
        address: String,
        /// What the system reported.
        reason: String,
    },
    /// A-ASSOCIATE-RJ "calling AE title not recognized": the PACS does not know us.
    #[error(
        "the PACS at {address} refused our AE title {calling_ae} (calling AE title not \
         recognized{}): register {calling_ae} as a modality in the PACS (AE title \
         {calling_ae}, this host's address, and the port of dicom.listen if it asks for one)",
        transience(*permanent)
    )]
    CallingAeRejected {
        /// `host:port` of the PACS.
        address: String,
        /// Our AE title (inbound.calling_ae_title).
        calling_ae: String,
        /// Whether the PACS said the rejection is permanent.
        permanent: bool,
    },
    /// A-ASSOCIATE-RJ "called AE title not recognized": the PACS has another AE title.
    #[error(
        "the PACS at {address} is not {called_ae} (called AE title not recognized{}): set \
         inbound.pacs_ae_title (`cloudpdi import --called`) to the PACS's own AE title",
        transience(*permanent)
    )]
    CalledAeRejected {
        /// `host:port` of the PACS.
        address: String,
        /// The AE title we called (inbound.pacs_ae_title).
        called_ae: String,
        /// Whether the PACS said the rejection is permanent.
        permanent: bool,
    },
    /// Any other A-ASSOCIATE-RJ ("no reason given", "temporary congestion", ...).
    #[error(
        "the PACS at {address} rejected the association ({}, {reason}){}",
        transience(*permanent).trim_start_matches(", "),
        if *permanent {
            ": check in the PACS's log why it refuses our AE title and this host"
        } else {
            ": the PACS is busy; it is tried again later"
        }
    )]
    Rejected {
        /// `host:port` of the PACS.
        address: String,
        /// Whether the PACS said the rejection is permanent.
        permanent: bool,
        /// The PACS's reason, as PS3.8 names it.
        reason: String,
    },
    /// The PACS aborted the association (A-ABORT).
    #[error(
        "the PACS at {address} aborted the association{}: check the PACS's log for why",
        if *during_negotiation { " while it was being negotiated" } else { "" }
    )]
    Aborted {
        /// `host:port` of the PACS.
        address: String,
        /// Whether it aborted before accepting the association.
        during_negotiation: bool,
    },
    /// The PACS accepted the association but none of the SOP classes proposed.
    #[error(
        "the PACS at {address} accepts none of the SOP classes of this study ({}): \
         configure the PACS to store them",
        .classes.join(", ")
    )]
    NoAcceptedContext {
        /// `host:port` of the PACS.
        address: String,
        /// The SOP classes proposed.
        classes: Vec<String>,
    },
    /// The connection broke or timed out during a transfer.
    #[error("the connection to the PACS at {address} was lost ({reason})")]
    Lost {
        /// `host:port` of the PACS.
        address: String,
        /// What was being done and what failed.
        reason: String,
    },
    /// The PACS answered "out of resources" (0xA7xx).
    #[error(
        "the PACS at {address} is out of resources (status 0x{status:04X}{}): free space \
         in the PACS",
        if .comment.is_empty() { String::new() } else { format!(": {}", crate::telemetry::Escaped(comment)) }
    )]
    OutOfResources {
        /// `host:port` of the PACS.
        address: String,
        /// The failure status.
        status: u16,
        /// The PACS's error comment.
        comment: String,
    },
    /// The TLS handshake with the PACS failed (certificate not trusted or expired, or a
    /// plain port), or a plain association met a TLS port.
    #[error("the PACS at {address}: {reason}")]
    Tls {
        /// `host:port` of the PACS.
        address: String,
        /// Which side refused which certificate, or which port speaks what.
        reason: String,
        /// Whether only a change of configuration or certificate helps.
        permanent: bool,
    },
}

/// ", permanent" or ", transient" as the PACS said it in its rejection.
fn transience(permanent: bool) -> &'static str {
    if permanent {
        ", permanent"
    } else {
        ", transient"
    }
}

impl PacsError {
    /// Whether another attempt would meet the same refusal until someone changes the
    /// PACS's configuration or ours: the job then waits for `cloudpdi retry` instead of
    /// retrying for ever.
    pub fn is_permanent(&self) -> bool {
        match self {
            PacsError::CallingAeRejected { permanent, .. }
            | PacsError::CalledAeRejected { permanent, .. }
            | PacsError::Rejected { permanent, .. }
            | PacsError::Tls { permanent, .. } => *permanent,
            PacsError::NoAcceptedContext { .. } => true,
            PacsError::Unreachable { .. }
            | PacsError::Aborted { .. }
            | PacsError::Lost { .. }
            | PacsError::OutOfResources { .. } => false,
        }
    }

    /// Sorts why an association could not be opened to `target`.
    pub(crate) fn establishing(
        target: &StoreTarget,
        e: &dicom_ul::association::Error,
    ) -> PacsError {
        use dicom_ul::association::Error;
        let address = target.address.clone();
        match e {
            Error::Rejected { association_rj, .. } => rejection(target, association_rj),
            Error::Aborted { .. } => PacsError::Aborted {
                address,
                during_negotiation: true,
            },
            Error::UnexpectedPdu { pdu, .. } if matches!(**pdu, Pdu::AbortRQ { .. }) => {
                PacsError::Aborted {
                    address,
                    during_negotiation: true,
                }
            }
            Error::NoAcceptedPresentationContexts { .. } => PacsError::NoAcceptedContext {
                address,
                classes: Vec::new(),
            },
            Error::Connect { source, .. } | Error::ToAddress { source, .. } => {
                PacsError::Unreachable {
                    address,
                    reason: source.to_string(),
                }
            }
            Error::Timeout { .. } => PacsError::Unreachable {
                address,
                reason: format!("no answer within {} s", target.timeout.as_secs()),
            },
            other => PacsError::Lost {
                address,
                reason: format!("opening the association failed: {other}"),
            },
        }
    }
}

/// Names an A-ASSOCIATE-RJ by its source and reason.
fn rejection(target: &StoreTarget, rj: &AssociationRJ) -> PacsError {
    let address = target.address.clone();
    let permanent = rj.result == AssociationRJResult::Permanent;
    match &rj.source {
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized,
        ) => PacsError::CallingAeRejected {
            address,
            calling_ae: target.calling_ae.clone(),
            permanent,
        },
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized,
        ) => PacsError::CalledAeRejected {
            address,
            called_ae: target.called_ae.clone(),
            permanent,
        },
        source => PacsError::Rejected {
            address,
            permanent,
            reason: source.to_string(),
        },
    }
}

/// A Part 10 file ready to send: what its meta header says and where its dataset starts.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The file.
    pub path: PathBuf,
    /// Media Storage SOP Class UID.
    pub sop_class_uid: String,
    /// Media Storage SOP Instance UID.
    pub sop_instance_uid: String,
    /// Transfer syntax of the dataset.
    pub transfer_syntax: String,
    dataset_offset: u64,
    /// The file's bytes when they are still in memory (the inbound stream verified them a
    /// moment ago): sent from there instead of read back from the file, and dropped once
    /// the instance's outcome is known.
    in_memory: Option<Arc<InMemory>>,
}

/// A file's bytes held for sending, and the memory reservation they count against
/// (released when the last holder drops them).
pub(crate) struct InMemory {
    bytes: Vec<u8>,
    _reservation: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for InMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InMemory({} bytes)", self.bytes.len())
    }
}

impl Instance {
    /// Reads the meta header of `path` (with or without the 128-byte preamble).
    ///
    /// # Errors
    /// [`ScuError::NotDicom`] with the reason.
    pub fn probe(path: &Path) -> Result<Instance, ScuError> {
        let not_dicom = |reason: String| ScuError::NotDicom {
            path: path.to_owned(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|e| not_dicom(e.to_string()))?;
        let mut head = [0u8; 132];
        let read = file.read(&mut head).map_err(|e| not_dicom(e.to_string()))?;
        let start = meta_start(&head[..read]).map_err(not_dicom)?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| not_dicom(e.to_string()))?;
        let meta = FileMetaTable::from_reader(std::io::BufReader::new(file))
            .map_err(|e| not_dicom(e.to_string()))?;
        Ok(Instance::from_meta(path, &meta, start, None))
    }

    /// As [`Instance::probe`], from the file's `bytes` already in memory (the file at
    /// `path` holds the same bytes), which are then sent from memory; `reservation` is
    /// held as long as they are.
    ///
    /// # Errors
    /// [`ScuError::NotDicom`] with the reason.
    pub(crate) fn in_memory(
        path: &Path,
        bytes: Vec<u8>,
        reservation: Box<dyn Send + Sync>,
    ) -> Result<Instance, ScuError> {
        let not_dicom = |reason: String| ScuError::NotDicom {
            path: path.to_owned(),
            reason,
        };
        let start = meta_start(&bytes[..bytes.len().min(132)]).map_err(not_dicom)?;
        let header = usize::try_from(start).map_or(&[][..], |start| &bytes[start..]);
        let meta = FileMetaTable::from_reader(header).map_err(|e| not_dicom(e.to_string()))?;
        let held = Arc::new(InMemory {
            bytes,
            _reservation: reservation,
        });
        let instance = Instance::from_meta(path, &meta, start, Some(held));
        if instance.dataset().is_none() {
            return Err(not_dicom("the meta header is longer than the file".into()));
        }
        Ok(instance)
    }

    fn from_meta(
        path: &Path,
        meta: &FileMetaTable,
        start: u64,
        in_memory: Option<Arc<InMemory>>,
    ) -> Instance {
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_owned();
        Instance {
            path: path.to_owned(),
            sop_class_uid: trim(meta.media_storage_sop_class_uid()),
            sop_instance_uid: trim(meta.media_storage_sop_instance_uid()),
            transfer_syntax: trim(meta.transfer_syntax()),
            // "DICM" + the group length element (12 bytes) + the group it measures.
            dataset_offset: start + 4 + 12 + u64::from(meta.information_group_length),
            in_memory,
        }
    }

    /// The dataset's bytes, when the file is held in memory.
    fn dataset(&self) -> Option<&[u8]> {
        let held = self.in_memory.as_ref()?;
        held.bytes.get(usize::try_from(self.dataset_offset).ok()?..)
    }

    /// The instance without its bytes in memory (their reservation released): what is
    /// kept of it once its outcome is known.
    fn settled(mut self) -> Instance {
        self.in_memory = None;
        self
    }
}

/// Where the meta header starts in a file that begins with `head` (its first 132 bytes,
/// or fewer): after the 128-byte preamble, or at 0 for a file without one.
fn meta_start(head: &[u8]) -> Result<u64, String> {
    if head.len() == 132 && &head[128..132] == b"DICM" {
        Ok(128)
    } else if head.len() >= 4 && &head[0..4] == b"DICM" {
        Ok(0)
    } else {
        Err("no DICM magic code".into())
    }
}

/// Every DICOM Part 10 file under `paths` (files, or folders walked recursively), except
/// DICOMDIRs; files that are not DICOM are returned apart so the caller can report them.
/// A symbolic link named in `paths` is followed; one inside a folder is reported, not
/// followed, so the walk never leaves the folders it was given (nor loops).
pub fn collect(paths: &[PathBuf]) -> (Vec<Instance>, Vec<ScuError>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for root in paths {
        for entry in walkdir::WalkDir::new(root) {
            match entry {
                Ok(e) if e.path_is_symlink() && e.depth() > 0 => skipped.push(ScuError::NotDicom {
                    path: e.into_path(),
                    reason: "a symbolic link inside a folder; links there are not followed".into(),
                }),
                Ok(e) if e.file_type().is_dir() || (e.depth() == 0 && root.is_dir()) => {}
                Ok(e) => found.push(e.into_path()),
                Err(e) => found.push(e.path().unwrap_or(root).to_owned()),
            }
        }
    }
    found.sort();
    let mut instances = Vec::new();
    for path in found {
        match Instance::probe(&path) {
            Ok(instance) if instance.sop_class_uid == MEDIA_STORAGE_DIRECTORY_STORAGE => {}
            Ok(instance) => instances.push(instance),
            Err(e) => skipped.push(e),
        }
    }
    (instances, skipped)
}

/// What happened to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The PACS answered Success (0x0000) or a Warning (0x0001, 0xBxxx): it holds it.
    Stored {
        /// The status, kept because a warning (e.g. coercion) is worth showing.
        status: u16,
    },
    /// Not stored, for good: set it aside with this reason.
    Refused {
        /// The PACS's failure status, when it gave one.
        status: Option<u16>,
        /// A sentence an admin can act on.
        reason: String,
    },
    /// Not stored because of what stopped the association: the PACS unreachable or out
    /// of resources through every attempt, or a rejection. The same cause for every
    /// instance the association would have carried; see [`PacsError::is_permanent`].
    Unavailable {
        /// What the last attempt met.
        cause: PacsError,
    },
}

/// How one instance travels on an accepted association.
struct Plan {
    /// The accepted presentation context.
    context_id: u8,
    /// Its transfer syntax.
    syntax: String,
    /// Whether the dataset must be re-encoded (other syntax, or reconciled identity)
    /// rather than streamed from the file as it is.
    rewrite: bool,
    /// Whether its compressed pixel data is decoded first (the PACS accepted only
    /// uncompressed data for its class).
    decode: bool,
}

/// Sends every instance and reports each outcome, in no particular order.
pub async fn store_all(
    target: Arc<StoreTarget>,
    instances: Vec<Instance>,
) -> Vec<(Instance, Outcome)> {
    let mut results = Vec::with_capacity(instances.len());
    let decoded = Arc::new(AtomicUsize::new(0));
    for group in by_context_budget(instances) {
        let lanes = target.associations.max(1).min(group.len().max(1));
        let mut buckets: Vec<Vec<Instance>> = vec![Vec::new(); lanes];
        for (i, instance) in group.into_iter().enumerate() {
            buckets[i % lanes].push(instance);
        }
        let tasks: Vec<_> = buckets
            .into_iter()
            .filter(|b| !b.is_empty())
            .map(|bucket| {
                let mut lane = Lane::new(target.clone(), bucket);
                lane.decoded = decoded.clone();
                tokio::spawn(lane.run())
            })
            .collect();
        for task in tasks {
            match task.await {
                Ok(lane) => results.extend(lane),
                Err(e) => warn!("a PACS sending task failed: {e}"),
            }
        }
    }
    log_decoded(&target, &decoded);
    results
}

/// The one line per import attempt that says how many instances were sent decoded.
fn log_decoded(target: &StoreTarget, decoded: &AtomicUsize) {
    let decoded = decoded.load(Ordering::Relaxed);
    if decoded > 0 {
        info!(
            decoded,
            pacs = %target.address,
            "{decoded} instance(s) stored decoded to native pixel data: the PACS accepts \
             only uncompressed data for their SOP class (inbound.transcode)"
        );
    }
}

/// Sends instances as they arrive on `feed` (e.g. while the rest of their study is still
/// downloading) and reports each outcome on `outcomes` as soon as the PACS answered.
/// The associations are negotiated from `pairs`, the (SOP class, transfer syntax) pairs
/// the study's manifest lists, with the same contexts as [`store_all`]; when they need
/// more than one association's [`MAX_CONTEXTS`], they are split as [`store_all`] splits
/// instances, each share of pairs with its own lanes (`target.associations` shared among
/// them, at least one each), and every instance goes to the lanes of its pair (one whose
/// pair is not listed to the first, where it is converted if it can be or refused with
/// the reason). Returns once `feed` is closed and every instance has its outcome.
pub async fn store_stream(
    target: Arc<StoreTarget>,
    pairs: BTreeSet<(String, String)>,
    mut feed: tokio::sync::mpsc::Receiver<Instance>,
    outcomes: tokio::sync::mpsc::UnboundedSender<(Instance, Outcome)>,
) {
    let mut groups: Vec<BTreeSet<(String, String)>> = vec![BTreeSet::new()];
    for pair in pairs {
        if groups
            .last()
            .is_some_and(|g| (g.len() + 1) * 2 > MAX_CONTEXTS)
        {
            groups.push(BTreeSet::new());
        }
        if let Some(group) = groups.last_mut() {
            group.insert(pair);
        }
    }
    let lanes = (target.associations.max(1) / groups.len()).max(1);
    let decoded = Arc::new(AtomicUsize::new(0));
    let mut feeds = Vec::with_capacity(groups.len());
    let mut tasks = Vec::new();
    for group in &groups {
        let (tx, rx) = tokio::sync::mpsc::channel::<Instance>(STREAM_QUEUE);
        let shared = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..lanes {
            let mut lane = Lane::from_pairs(target.clone(), group.clone());
            lane.decoded = decoded.clone();
            lane.feed = Some(Feed {
                instances: shared.clone(),
                outcomes: outcomes.clone(),
            });
            tasks.push(tokio::spawn(lane.run()));
        }
        feeds.push(tx);
    }
    while let Some(instance) = feed.recv().await {
        let pair = (
            instance.sop_class_uid.clone(),
            instance.transfer_syntax.clone(),
        );
        let at = groups.iter().position(|g| g.contains(&pair)).unwrap_or(0);
        if let Err(lost) = feeds[at].send(instance).await {
            // Every lane of the group ended (a panic): the instance is reported unsent,
            // so the job's import step sends it again.
            let instance = lost.0.settled();
            warn!(
                "no PACS sending task left for {}",
                instance.sop_instance_uid
            );
            let _ = outcomes.send((instance, no_lane_left(&target)));
        }
    }
    drop(outcomes);
    drop(feeds);
    for task in tasks {
        if let Err(e) = task.await {
            warn!("a PACS sending task failed: {e}");
        }
    }
    log_decoded(&target, &decoded);
}

/// The outcome of an instance [`store_stream`] has no lane left for: not stored, a
/// transient cause, so the import step sends it again.
fn no_lane_left(target: &StoreTarget) -> Outcome {
    Outcome::Unavailable {
        cause: PacsError::Lost {
            address: target.address.clone(),
            reason: "every association for its SOP class ended before it was sent (see the \
                     log for why); it is sent again by the import step"
                .into(),
        },
    }
}

/// Instances queued for each group of lanes of [`store_stream`]: a few, so that memory
/// holds paths, never a study.
const STREAM_QUEUE: usize = 16;

/// Where a lane of [`store_stream`] takes its instances from and reports each outcome.
struct Feed {
    instances: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instance>>>,
    outcomes: tokio::sync::mpsc::UnboundedSender<(Instance, Outcome)>,
}

/// Splits instances so that no association needs more than [`MAX_CONTEXTS`] contexts.
fn by_context_budget(mut instances: Vec<Instance>) -> Vec<Vec<Instance>> {
    instances.sort_by(|a, b| {
        (&a.sop_class_uid, &a.transfer_syntax).cmp(&(&b.sop_class_uid, &b.transfer_syntax))
    });
    let mut groups: Vec<Vec<Instance>> = Vec::new();
    let mut pairs = BTreeSet::new();
    for instance in instances {
        let pair = (
            instance.sop_class_uid.clone(),
            instance.transfer_syntax.clone(),
        );
        // Each new pair may need two contexts: as-is and the uncompressed fallback.
        if !pairs.contains(&pair) && (pairs.len() + 1) * 2 > MAX_CONTEXTS {
            pairs.clear();
            groups.push(Vec::new());
        }
        pairs.insert(pair);
        match groups.last_mut() {
            Some(group) => group.push(instance),
            None => groups.push(vec![instance]),
        }
    }
    groups
}

/// One association's worth of work, with its retries.
struct Lane {
    target: Arc<StoreTarget>,
    queue: VecDeque<(Instance, u32)>,
    contexts: Vec<(String, Vec<String>)>,
    association: Option<Association>,
    message_id: u16,
    results: Vec<(Instance, Outcome)>,
    /// For [`store_stream`]: more instances as they arrive, and where outcomes go.
    feed: Option<Feed>,
    /// Set once no association could be opened through every attempt: later instances
    /// of the feed fail at once with this outcome instead of waiting through the same
    /// back-off.
    dead: Option<Outcome>,
    /// Instances stored decoded, counted across the lanes of one import attempt.
    decoded: Arc<AtomicUsize>,
}

type Association = super::tls::ClientAssociation;

impl Lane {
    fn new(target: Arc<StoreTarget>, instances: Vec<Instance>) -> Lane {
        let pairs = instances
            .iter()
            .map(|i| (i.sop_class_uid.clone(), i.transfer_syntax.clone()))
            .collect();
        let mut lane = Lane::from_pairs(target, pairs);
        lane.queue = instances.into_iter().map(|i| (i, 0)).collect();
        lane
    }

    /// A lane without instances yet, proposing the contexts `pairs` need.
    fn from_pairs(target: Arc<StoreTarget>, pairs: BTreeSet<(String, String)>) -> Lane {
        let classes: BTreeSet<String> = pairs.iter().map(|(class, _)| class.clone()).collect();
        // Deflated datasets travel inflated: files in the wild carry bytes after the deflate
        // stream, on which DCMTK-based PACS (Orthanc) wait forever; inflating loses nothing.
        let mut contexts: Vec<(String, Vec<String>)> = pairs
            .into_iter()
            .filter(|(_, ts)| ts != DEFLATED)
            .map(|(class, ts)| (class, vec![ts]))
            .collect();
        contexts.extend(
            classes
                .into_iter()
                .map(|class| (class, vec![EXPLICIT_LE.to_owned(), IMPLICIT_LE.to_owned()])),
        );
        Lane {
            target,
            queue: VecDeque::new(),
            contexts,
            association: None,
            message_id: 0,
            results: Vec::new(),
            feed: None,
            dead: None,
            decoded: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The next instance: a retry first, then the queue, then the feed.
    async fn next(&mut self) -> Option<(Instance, u32)> {
        if let Some(next) = self.queue.pop_front() {
            return Some(next);
        }
        let feed = self.feed.as_ref()?;
        let instance = feed.instances.lock().await.recv().await?;
        Some((instance, 0))
    }

    /// Keeps an outcome, or reports it at once to a [`store_stream`] caller.
    fn record(&mut self, instance: Instance, outcome: Outcome) {
        let instance = instance.settled();
        match &self.feed {
            Some(feed) => {
                // The caller stopped listening only when it is going away.
                let _ = feed.outcomes.send((instance, outcome));
            }
            None => self.results.push((instance, outcome)),
        }
    }

    async fn run(mut self) -> Vec<(Instance, Outcome)> {
        while let Some((instance, attempts)) = self.next().await {
            if let Some(dead) = self.dead.clone() {
                self.record(instance, dead);
                continue;
            }
            let result = self.send(&instance).await;
            match result {
                Ok(outcome) => self.record(instance, outcome),
                Err(cause) => {
                    let attempts = attempts + 1;
                    if cause.is_permanent() || attempts >= self.target.max_attempts.max(1) {
                        debug!(file = %instance.path.display(), "not stored after {attempts} attempt(s): {cause}");
                        let unavailable = Outcome::Unavailable { cause };
                        self.record(instance, unavailable.clone());
                        if self.association.is_none() {
                            // No association could be opened: the rest would only wait
                            // through the same back-off, so they fail now, with the cause.
                            let rest: Vec<_> = self.queue.drain(..).collect();
                            for (i, _) in rest {
                                self.record(i, unavailable.clone());
                            }
                            self.dead = Some(unavailable);
                        }
                    } else {
                        let delay = self.target.backoff * 2u32.saturating_pow(attempts - 1);
                        debug!(file = %instance.path.display(), "PACS did not take the instance ({cause}); retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        self.queue.push_front((instance, attempts));
                    }
                }
            }
        }
        if let Some(association) = self.association.take() {
            let _ = association.release().await;
        }
        self.results
    }

    /// Sends one instance. `Err` is what stopped the association (retried unless
    /// permanent), `Ok` the instance's own outcome.
    async fn send(&mut self, instance: &Instance) -> Result<Outcome, PacsError> {
        let reconcile = self
            .target
            .reconcile
            .clone()
            .filter(|r| r.policy != PatientIdPolicy::Keep);
        let transcode = self.target.transcode;
        let reconciling = reconcile.is_some();
        let association = self.association().await?;
        let refused = |reason| {
            Ok(Outcome::Refused {
                status: None,
                reason,
            })
        };
        let mut plan = match plan_for(association, instance, reconciling, transcode) {
            Ok(plan) => plan,
            Err(reason) => return refused(reason),
        };
        // The memory budget of a decoded instance is held until the PACS answered.
        let (payload, _budget) = match plan.rewrite {
            false => (None, None),
            true => {
                let (object, needed) = match read(instance, reconcile, plan.decode).await {
                    Ok(read) => read,
                    Err(reason) => return refused(reason),
                };
                let budget = match needed {
                    None => None,
                    Some(bytes) => Some(match transcode::try_reserve(bytes) {
                        Some(budget) => budget,
                        None => {
                            // Other instances are being decoded: the wait may be long, and
                            // a PACS may drop an association left idle, so it is released
                            // and opened again (with its plan) once the memory is free.
                            if let Some(association) = self.association.take() {
                                let _ = association.release().await;
                            }
                            let budget = transcode::reserve(bytes).await;
                            let association = self.association().await?;
                            plan = match plan_for(association, instance, reconciling, transcode) {
                                Ok(plan) => plan,
                                Err(reason) => return refused(reason),
                            };
                            budget
                        }
                    }),
                };
                match encode(instance, object, &plan.syntax, plan.decode, budget).await {
                    Ok((bytes, budget)) => (Some(bytes), budget),
                    Err(reason) => return refused(reason),
                }
            }
        };
        self.message_id = self.message_id.wrapping_add(1).max(1);
        let message_id = self.message_id;
        let association = self.association.as_mut().expect("connected above");
        let sent = transmit(association, instance, plan.context_id, payload, message_id).await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                self.association = None;
                return Err(e.into_cause(&self.target.address));
            }
        };
        match response.status {
            status::SUCCESS | 0x0001 | 0xB000..=0xBFFF => {
                if plan.decode {
                    self.decoded.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Stored {
                    status: response.status,
                })
            }
            0xA700..=0xA7FF => Err(PacsError::OutOfResources {
                address: self.target.address.clone(),
                status: response.status,
                comment: response.error_comment,
            }),
            other => Ok(Outcome::Refused {
                status: Some(other),
                reason: format!(
                    "PACS refused the instance with status 0x{other:04X}{}",
                    if response.error_comment.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", response.error_comment)
                    }
                ),
            }),
        }
    }

    async fn association(&mut self) -> Result<&mut Association, PacsError> {
        if self.association.is_none() {
            let mut options = ClientAssociationOptions::new()
                .calling_ae_title(self.target.calling_ae.clone())
                .called_ae_title(self.target.called_ae.clone())
                .max_pdu_length(self.target.max_pdu_length)
                .connection_timeout(self.target.timeout)
                .read_timeout(self.target.timeout)
                .write_timeout(self.target.timeout);
            for (class, syntaxes) in &self.contexts {
                options = options.with_presentation_context(class.clone(), syntaxes.clone());
            }
            let established = open(&self.target, options).await;
            let mut association = established.map_err(|e| match e {
                PacsError::NoAcceptedContext { address, .. } => PacsError::NoAcceptedContext {
                    address,
                    classes: self
                        .contexts
                        .iter()
                        .map(|(c, _)| c.clone())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                },
                cause => cause,
            })?;
            if let Err(e) = association.set_nodelay() {
                debug!("cannot set TCP_NODELAY: {e}");
            }
            self.association = Some(association);
        }
        Ok(self.association.as_mut().expect("set above"))
    }
}

/// Opens an association to the PACS with `options` (whose timeouts bound each read and
/// write), over TLS when `target.tls` says so, within `target.timeout` in all (dicom-ul
/// bounds the TCP connect, not the TLS handshake); a failure says why in words. Every
/// association to the PACS is opened here, so `[inbound.pacs_tls]` applies to all.
///
/// # Errors
/// [`PacsError`]: unreachable, rejected, no answer, or a TLS failure.
pub(crate) async fn open(
    target: &StoreTarget,
    options: ClientAssociationOptions<'_>,
) -> Result<Association, PacsError> {
    let address = target.address.as_str();
    let establishing = async {
        match &target.tls {
            None => options.establish_async(address).await.map(Link::Plain),
            Some(tls) => options
                .tls_config(tls.config.clone())
                .server_name(&tls.server_name)
                .establish_tls_async(address)
                .await
                .map(Link::Tls),
        }
    };
    let Ok(established) = tokio::time::timeout(target.timeout, establishing).await else {
        return Err(PacsError::Unreachable {
            address: target.address.clone(),
            reason: format!(
                "no answer within {} s (TCP connection{}, A-ASSOCIATE)",
                target.timeout.as_secs(),
                if target.tls.is_some() {
                    ", TLS handshake"
                } else {
                    ""
                }
            ),
        });
    };
    match established {
        Err(dicom_ul::association::Error::TlsNotSupported) => Err(unanswered(target).await),
        Err(e) => Err(classify(target, &e)),
        Ok(association) => Ok(association),
    }
}

/// Why opening an association failed (but for an unanswered A-ASSOCIATE-RQ:
/// [`unanswered`]).
fn classify(target: &StoreTarget, e: &dicom_ul::association::Error) -> PacsError {
    tls_failure(target, e).unwrap_or_else(|| PacsError::establishing(target, e))
}

/// Why opening an association failed at the TLS level, if it did.
fn tls_failure(target: &StoreTarget, e: &dicom_ul::association::Error) -> Option<PacsError> {
    let tls = target.tls.as_ref()?;
    Some(PacsError::Tls {
        address: target.address.clone(),
        reason: tls.failure(e)?,
        permanent: !matches!(e, dicom_ul::association::Error::TlsHandshake { .. }),
    })
}

/// Why the PACS sent no A-ASSOCIATE answer. dicom-ul calls every such failure "TLS not
/// supported", whatever happened (a PACS restarting or hung, a connection reset, a TLS
/// alert): [`super::tls::unanswered`] finds out with a second connection.
async fn unanswered(target: &StoreTarget) -> PacsError {
    let (reason, permanent) =
        super::tls::unanswered(&target.address, target.tls.as_ref(), target.timeout).await;
    let address = target.address.clone();
    if permanent || target.tls.is_some() {
        PacsError::Tls {
            address,
            reason,
            permanent,
        }
    } else {
        PacsError::Lost { address, reason }
    }
}

/// Syntaxes whose datasets can be re-encoded without touching compressed pixel data.
fn is_uncompressed(ts: &str) -> bool {
    matches!(ts, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE | DEFLATED)
}

/// Picks the accepted presentation context for an instance, or says why there is none:
/// its own syntax as it is; else, for uncompressed data, any accepted uncompressed
/// syntax; else, for compressed data this build decodes and `transcode` allows it,
/// Explicit VR Little Endian (or Implicit, if that is all the PACS accepted) after
/// decoding.
fn plan_for(
    association: &Association,
    instance: &Instance,
    rewrite: bool,
    transcode: Transcode,
) -> Result<Plan, String> {
    let accepted: Vec<_> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| {
            pc.reason == PresentationContextResultReason::Acceptance
                && pc.abstract_syntax == instance.sop_class_uid
        })
        .collect();
    if let Some(pc) = accepted
        .iter()
        .find(|pc| pc.transfer_syntax == instance.transfer_syntax)
    {
        return Ok(Plan {
            context_id: pc.id,
            syntax: pc.transfer_syntax.clone(),
            rewrite,
            decode: false,
        });
    }
    if is_uncompressed(&instance.transfer_syntax) {
        if let Some(pc) = accepted
            .iter()
            .find(|pc| is_uncompressed(&pc.transfer_syntax))
        {
            return Ok(Plan {
                context_id: pc.id,
                syntax: pc.transfer_syntax.clone(),
                rewrite: true,
                decode: false,
            });
        }
    }
    let decodable = transcode::can_decode(&instance.transfer_syntax);
    let native = [EXPLICIT_LE, IMPLICIT_LE]
        .iter()
        .find_map(|ts| accepted.iter().find(|pc| pc.transfer_syntax == *ts));
    if let (true, Transcode::WhenRefused, Some(pc)) = (decodable, transcode, native) {
        return Ok(Plan {
            context_id: pc.id,
            syntax: pc.transfer_syntax.clone(),
            rewrite: true,
            decode: true,
        });
    }
    Err(if accepted.is_empty() {
        format!(
            "the PACS does not accept SOP class {} at all",
            instance.sop_class_uid
        )
    } else if decodable && transcode == Transcode::Never && native.is_some() {
        format!(
            "the PACS does not accept transfer syntax {} for SOP class {}, only \
             uncompressed data, and inbound.transcode = \"never\" forbids decoding it; set \
             inbound.transcode = \"when-refused\" (`cloudpdi import --transcode \
             when-refused`) to send it decoded, or configure the PACS to accept it",
            instance.transfer_syntax, instance.sop_class_uid
        )
    } else {
        format!(
            "the PACS does not accept transfer syntax {} for SOP class {}, and the data \
             cannot be converted without decompressing it; configure the PACS to accept it",
            instance.transfer_syntax, instance.sop_class_uid
        )
    })
}

/// Why a transfer on an open association broke: worth a retry on a fresh one.
enum Broken {
    /// The PACS sent A-ABORT.
    Aborted,
    /// Anything else, said for the log.
    Other(String),
}

impl Broken {
    fn into_cause(self, address: &str) -> PacsError {
        let address = address.to_owned();
        match self {
            Broken::Aborted => PacsError::Aborted {
                address,
                during_negotiation: false,
            },
            Broken::Other(reason) => PacsError::Lost { address, reason },
        }
    }
}

impl From<String> for Broken {
    fn from(reason: String) -> Broken {
        Broken::Other(reason)
    }
}

/// Sends the command and the dataset (`payload`, or the file's own bytes), and waits
/// for the response. Every error is a network failure: worth a retry.
/// Bytes read from an instance file at a time while it is sent.
const SEND_READ_CHUNK: usize = 256 * 1024;

async fn transmit(
    association: &mut Association,
    instance: &Instance,
    context_id: u8,
    payload: Option<Vec<u8>>,
    message_id: u16,
) -> Result<Response, Broken> {
    let command = store_request(
        message_id,
        &instance.sop_class_uid,
        &instance.sop_instance_uid,
    );
    association
        .send(&command_pdu(context_id, command))
        .await
        .map_err(|e| format!("sending the command failed: {e}"))?;
    {
        let mut writer = association.send_pdata(context_id);
        match (payload, instance.dataset()) {
            (Some(bytes), _) => writer.write_all(&bytes).await,
            (None, Some(held)) => writer.write_all(held).await,
            (None, None) => {
                let mut file = tokio::fs::File::open(&instance.path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", instance.path.display()))?;
                file.seek(SeekFrom::Start(instance.dataset_offset))
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", instance.path.display()))?;
                // Large reads: each read of a tokio file is a blocking task, and `copy`'s
                // own 8 KiB buffer made 64 of them for a 512 KiB CT slice.
                let mut file = tokio::io::BufReader::with_capacity(SEND_READ_CHUNK, file);
                tokio::io::copy_buf(&mut file, &mut writer)
                    .await
                    .map(|_| ())
            }
        }
        .map_err(|e| format!("sending the dataset failed: {e}"))?;
        writer
            .finish()
            .await
            .map_err(|e| format!("sending the dataset failed: {e}"))?;
    }
    receive_response(association, message_id).await
}

async fn receive_response(
    association: &mut Association,
    message_id: u16,
) -> Result<Response, Broken> {
    let mut command = Vec::new();
    loop {
        let pdu = association
            .receive()
            .await
            .map_err(|e| format!("no response from the PACS: {e}"))?;
        match pdu {
            Pdu::PData { data } => {
                for value in data {
                    if value.value_type != PDataValueType::Command {
                        continue;
                    }
                    command.extend_from_slice(&value.data);
                    if value.is_last {
                        let response = Response::decode(&command).map_err(|e| e.to_string())?;
                        if response.field == field::C_STORE_RSP
                            && response.responding_to == message_id
                        {
                            return Ok(response);
                        }
                        command.clear();
                    }
                }
            }
            Pdu::AbortRQ { .. } => return Err(Broken::Aborted),
            Pdu::ReleaseRQ => return Err("the PACS released the association".to_owned().into()),
            other => {
                return Err(
                    format!("unexpected {} from the PACS", other.short_description()).into(),
                );
            }
        }
    }
}

/// Reads an instance to re-encode it ([`encode`]) and reconciles its patient identity;
/// with `decode`, also says how much memory decoding its compressed pixel data will take
/// ([`transcode::memory_needed`], refused over [`transcode::MAX_DECODED_BYTES`] decoded
/// before anything is allocated), to be reserved from the budget shared by all
/// associations ([`transcode::reserve`]) before [`encode`] runs. Blocking work with the
/// whole instance in memory, off the async runtime: only for reconciliation, for the
/// rare PACS that needs another byte order, and for decoding.
async fn read(
    instance: &Instance,
    reconcile: Option<Reconciler>,
    decode: bool,
) -> Result<(transcode::DicomFile, Option<u64>), String> {
    let path = instance.path.clone();
    let (offset, own_ts) = (instance.dataset_offset, instance.transfer_syntax.clone());
    tokio::task::spawn_blocking(move || {
        // dicom-object's parser recurses per sequence level: bounded bytes only.
        super::depth::check_file(&path, offset, &own_ts, offset.saturating_sub(132))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut object = dicom_object::open_file(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Some(reconciler) = reconcile {
            reconciler
                .apply(&mut object)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let needed = match decode {
            false => None,
            true => Some(
                transcode::memory_needed(&object, transcode::MAX_DECODED_BYTES)
                    .map_err(|e| e.to_string())?,
            ),
        };
        Ok::<_, String>((object, needed))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Re-encodes a dataset read by [`read`] into `ts` (its own syntax or another
/// uncompressed one), with `decode` after decoding its compressed pixel data
/// ([`transcode::decode`]); without it, compressed pixel data is carried over as it is.
/// The memory reservation (`budget`) goes into the blocking task and comes back with the
/// bytes, to be held until they are sent: a send cancelled meanwhile does not free
/// memory the decoder still uses.
async fn encode(
    instance: &Instance,
    mut object: transcode::DicomFile,
    ts: &str,
    decode: bool,
    budget: Option<tokio::sync::SemaphorePermit<'static>>,
) -> Result<(Vec<u8>, Option<tokio::sync::SemaphorePermit<'static>>), String> {
    let path = instance.path.clone();
    let ts = ts.to_owned();
    tokio::task::spawn_blocking(move || {
        use dicom_encoding::TransferSyntaxIndex;
        let target = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(&ts)
            .ok_or_else(|| format!("unknown transfer syntax {ts}"))?;
        if decode {
            transcode::decode(&mut object, transcode::MAX_DECODED_BYTES)
                .map_err(|e| e.to_string())?;
        }
        let mut bytes = Vec::new();
        object
            .write_dataset_with_ts(&mut bytes, target)
            .map_err(|e| format!("cannot convert {} to {ts}: {e}", path.display()))?;
        Ok::<_, String>((bytes, budget))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::AssociationRJServiceProviderPresentationReason;

    /// A Part 10 file (preamble, meta group, a small dataset) written to `path`.
    fn part10(path: &Path) -> Vec<u8> {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let meta = dicom_object::FileMetaTableBuilder::new()
            .transfer_syntax(dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
            .media_storage_sop_instance_uid("1.2.3.4.5")
            .build()
            .expect("a complete meta group");
        let mut object = dicom_object::FileDicomObject::new_empty_with_meta(meta);
        object.put(DataElement::new(
            dicom_dictionary_std::tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("Doe^Jane"),
        ));
        object.write_to_file(path).expect("written");
        std::fs::read(path).expect("read back")
    }

    /// An instance handed over in memory says what its file says, sends the file's
    /// dataset bytes, and lets its reservation go once settled.
    #[test]
    fn an_instance_in_memory_reads_as_its_file_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.dcm");
        let bytes = part10(&path);
        let from_file = Instance::probe(&path).expect("probed");
        let released = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let held = Instance::in_memory(&path, bytes.clone(), Box::new(Count(released.clone())))
            .expect("parsed");
        assert_eq!(
            (
                &held.sop_class_uid,
                &held.sop_instance_uid,
                &held.transfer_syntax,
                held.dataset_offset
            ),
            (
                &from_file.sop_class_uid,
                &from_file.sop_instance_uid,
                &from_file.transfer_syntax,
                from_file.dataset_offset
            )
        );
        assert_eq!(held.sop_instance_uid, "1.2.3.4.5");
        let offset = usize::try_from(from_file.dataset_offset).expect("small");
        assert_eq!(held.dataset(), Some(&bytes[offset..]));
        assert_eq!(
            from_file.dataset(),
            None,
            "a probed instance is read from its file"
        );
        let copy = held.clone();
        drop(held.settled());
        assert_eq!(
            released.load(Ordering::Relaxed),
            0,
            "a clone still holds them"
        );
        assert_eq!(copy.settled().dataset(), None);
        assert_eq!(released.load(Ordering::Relaxed), 1);

        let cut = bytes[..140].to_vec();
        let error = Instance::in_memory(&path, cut, Box::new(())).expect_err("cut short");
        assert!(error.to_string().contains("a.dcm"), "{error}");
        let error =
            Instance::in_memory(&path, b"not DICOM".to_vec(), Box::new(())).expect_err("no magic");
        assert!(error.to_string().contains("DICM"), "{error}");
    }

    fn target() -> StoreTarget {
        StoreTarget {
            address: "10.0.0.5:104".into(),
            called_ae: "PACS".into(),
            calling_ae: "CLOUDPDI_B".into(),
            associations: 1,
            max_pdu_length: 16_384,
            timeout: Duration::from_secs(30),
            max_attempts: 3,
            backoff: Duration::from_millis(500),
            reconcile: None,
            tls: None,
            transcode: Transcode::WhenRefused,
        }
    }

    fn rj(result: AssociationRJResult, source: AssociationRJSource) -> PacsError {
        rejection(&target(), &AssociationRJ { result, source })
    }

    #[test]
    fn a_rejection_of_our_ae_title_names_it_and_the_fix_and_is_permanent() {
        let cause = rj(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
        );
        assert!(cause.is_permanent());
        assert_eq!(
            cause.to_string(),
            "the PACS at 10.0.0.5:104 refused our AE title CLOUDPDI_B (calling AE title not \
             recognized, permanent): register CLOUDPDI_B as a modality in the PACS (AE title \
             CLOUDPDI_B, this host's address, and the port of dicom.listen if it asks for one)"
        );
        let called = rj(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
        );
        assert!(called.is_permanent());
        assert!(
            called.to_string().contains(
                "is not PACS (called AE title not recognized, permanent): set inbound.pacs_ae_title"
            ),
            "{called}"
        );
    }

    #[test]
    fn a_transient_rejection_keeps_the_back_off() {
        let busy = rj(
            AssociationRJResult::Transient,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::TemporaryCongestion,
            ),
        );
        assert!(!busy.is_permanent());
        assert_eq!(
            busy.to_string(),
            "the PACS at 10.0.0.5:104 rejected the association (transient, temporary \
             congestion): the PACS is busy; it is tried again later"
        );
        let refused = rj(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
        );
        assert!(refused.is_permanent());
        assert!(
            refused.to_string().contains("(permanent, no reason given)"),
            "{refused}"
        );
    }

    #[test]
    fn a_connection_refused_is_unreachable_and_transient() {
        let e = dicom_ul::association::Error::Connect {
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            backtrace: std::backtrace::Backtrace::capture(),
        };
        let cause = PacsError::establishing(&target(), &e);
        assert!(matches!(cause, PacsError::Unreachable { .. }), "{cause:?}");
        assert!(!cause.is_permanent());
    }

    fn tls_target(timeout: Duration) -> StoreTarget {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        StoreTarget {
            timeout,
            tls: Some(super::super::tls::PacsTls {
                config: Arc::new(config),
                server_name: "127.0.0.1".into(),
                settings: crate::config::PacsTlsConfig {
                    ca: "/etc/pacs-ca.pem".into(),
                    certificate: None,
                    key: None,
                    server_name: None,
                },
            }),
            ..target()
        }
    }

    #[test]
    fn a_certificate_error_in_the_handshake_is_permanent_and_an_os_error_transient() {
        let target = tls_target(Duration::from_secs(30));
        let untrusted = dicom_ul::association::Error::Connect {
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ),
            backtrace: std::backtrace::Backtrace::capture(),
        };
        let cause = classify(&target, &untrusted);
        assert!(cause.is_permanent(), "{cause:?}");
        assert!(
            cause.to_string().contains(
                "TLS: the PACS's certificate is not trusted: it is not signed by a CA in the \
                 CA file inbound.pacs_tls.ca = /etc/pacs-ca.pem"
            ),
            "{cause}"
        );
        let refused = dicom_ul::association::Error::Connect {
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            backtrace: std::backtrace::Backtrace::capture(),
        };
        let cause = classify(&target, &refused);
        assert!(matches!(cause, PacsError::Unreachable { .. }), "{cause:?}");
        assert!(!cause.is_permanent());
    }

    /// A TCP server on 127.0.0.1 that accepts every connection and closes it at once
    /// (`hold` false) or keeps it open, silent (`hold` true).
    async fn listener(hold: bool) -> (String, tokio::task::JoinHandle<()>) {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let address = socket.local_addr().expect("its address").to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = socket.accept().await {
                if hold {
                    held.push(connection);
                }
            }
        });
        (address, task)
    }

    async fn open(target: StoreTarget) -> PacsError {
        let pairs = BTreeSet::from([(
            "1.2.840.10008.5.1.4.1.1.2".to_owned(),
            EXPLICIT_LE.to_owned(),
        )]);
        let mut lane = Lane::from_pairs(Arc::new(target), pairs);
        let opened = tokio::time::timeout(Duration::from_secs(20), lane.association())
            .await
            .expect("opening the association is bounded");
        match opened {
            Ok(_) => panic!("an association was opened"),
            Err(cause) => cause,
        }
    }

    #[tokio::test]
    async fn a_pacs_that_closes_before_answering_is_transient_and_not_called_tls() {
        let (address, server) = listener(false).await;
        let cause = open(StoreTarget {
            address,
            ..target()
        })
        .await;
        server.abort();
        assert!(!cause.is_permanent(), "{cause:?}");
        let text = cause.to_string();
        assert!(
            text.contains(
                "no A-ASSOCIATE answer: the PACS closed the connection before \
                 answering, or did not answer within 30 s (if the PACS's port speaks DICOM \
                 TLS, configure [inbound.pacs_tls]); it is tried again later"
            ),
            "{text}"
        );
        assert!(!text.contains("answered with TLS"), "{text}");
    }

    #[tokio::test]
    async fn a_silent_pacs_is_given_up_after_the_timeout_plain_or_tls() {
        for tls in [false, true] {
            let (address, server) = listener(true).await;
            let target = if tls {
                tls_target(Duration::from_secs(1))
            } else {
                StoreTarget {
                    timeout: Duration::from_secs(1),
                    ..target()
                }
            };
            let started = std::time::Instant::now();
            let cause = open(StoreTarget { address, ..target }).await;
            server.abort();
            assert!(started.elapsed() < Duration::from_secs(5), "tls {tls}");
            assert!(!cause.is_permanent(), "{cause:?}");
            // Plain, dicom-ul's read timeout may fire first: then it is told as unanswered.
            let expected = if tls {
                "cannot be reached (no answer within 1 s (TCP connection, TLS handshake, \
                 A-ASSOCIATE))"
            } else {
                "answer within 1 s"
            };
            assert!(cause.to_string().contains(expected), "{cause}");
        }
    }
}
