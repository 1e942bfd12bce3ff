//! Storage Commitment Push Model (PS3.4 Annex J): the datasets of the N-ACTION request
//! (Storage Commitment Request: a Transaction UID and the instances to commit) and of the
//! N-EVENT-REPORT (Storage Commitment Result: the instances committed and those that
//! failed, each with its Failure Reason).
//!
//! These datasets are small and flat (two sequences of items of two or three UIDs), so
//! they are read and written here directly, in Implicit or Explicit VR Little Endian,
//! with every length checked and every bound named below: a request from any caller is
//! untrusted input.

use std::fmt;

use crate::dicom::tls::Messages;

/// Storage Commitment Push Model SOP Class UID.
pub const SOP_CLASS: &str = "1.2.840.10008.1.20.1";

/// The well-known Storage Commitment Push Model SOP Instance UID (PS3.4 J.3.5): every
/// N-ACTION and N-EVENT-REPORT names it.
pub const SOP_INSTANCE: &str = "1.2.840.10008.1.20.1.1";

/// Action Type ID of a Storage Commitment Request.
pub const ACTION_REQUEST: u16 = 1;

/// Event Type ID: storage commitment request successful (every instance committed).
pub const EVENT_SUCCESS: u16 = 1;

/// Event Type ID: storage commitment request complete, failures exist.
pub const EVENT_FAILURES: u16 = 2;

/// Most instances one request or report may reference (Referenced SOP Sequence plus
/// Failed SOP Sequence): 100,000, more than the largest study a modality sends in one
/// go. A caller with more sends several requests; the SCU here does so itself.
pub const MAX_REFERENCES: usize = 100_000;

/// Largest request or report dataset accepted (bytes): 100,000 references of two
/// 64-character UIDs and their headers (about 16 MB) with room for the padding and
/// optional attributes of other encoders.
pub const MAX_DATASET_LENGTH: usize = 24 * 1024 * 1024;

/// Deepest nesting of sequences read: the standard's datasets nest one level (items of
/// the two sequences); an unexpected sequence inside an item is skipped up to this depth.
pub const MAX_DEPTH: usize = 3;

/// Longest UID (PS3.5 §9.1).
pub const MAX_UID_LENGTH: usize = 64;

/// Failure Reasons (0008,1197), PS3.3 C.14.1.1 / PS3.4 J.3.3.1.
pub mod reason {
    /// Processing failure: a local error while checking.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// No such object instance: the instance is not held.
    pub const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
    /// Class / instance conflict: the instance is held under another SOP class.
    pub const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;

    /// The reason's name, for logs and `cloudpdi status`.
    pub fn name(code: u16) -> &'static str {
        match code {
            PROCESSING_FAILURE => "processing failure",
            NO_SUCH_OBJECT_INSTANCE => "no such object instance",
            CLASS_INSTANCE_CONFLICT => "class/instance conflict",
            0x0122 => "referenced SOP class not supported",
            0x0131 => "duplicate transaction UID",
            0x0213 => "resource limitation",
            _ => "unknown reason",
        }
    }
}

const TRANSACTION_UID: u32 = 0x0008_1195;
const REFERENCED_SOP_SEQUENCE: u32 = 0x0008_1199;
const FAILED_SOP_SEQUENCE: u32 = 0x0008_1198;
const REFERENCED_SOP_CLASS_UID: u32 = 0x0008_1150;
const REFERENCED_SOP_INSTANCE_UID: u32 = 0x0008_1155;
const FAILURE_REASON: u32 = 0x0008_1197;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQUENCE_END: u32 = 0xFFFE_E0DD;
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Why a commitment dataset cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitmentError {
    /// The bytes end inside an element.
    #[error("storage commitment dataset is truncated at byte {0}")]
    Truncated(usize),
    /// Larger than [`MAX_DATASET_LENGTH`].
    #[error(
        "storage commitment dataset of {0} bytes is larger than the {MAX_DATASET_LENGTH} \
         accepted: send at most {MAX_REFERENCES} instances per request"
    )]
    TooLarge(usize),
    /// More references than [`MAX_REFERENCES`].
    #[error(
        "storage commitment dataset references more than {MAX_REFERENCES} instances: \
         split the request into several transactions"
    )]
    TooManyReferences,
    /// Sequences nested deeper than [`MAX_DEPTH`].
    #[error("storage commitment dataset nests sequences deeper than {MAX_DEPTH}")]
    TooDeep,
    /// A required attribute is absent.
    #[error("storage commitment dataset lacks {0}")]
    Missing(&'static str),
    /// A UID is not 1-64 characters of digits and single dots.
    #[error("{what} is not a valid UID ({len} characters; digits and dots, at most 64)")]
    BadUid {
        /// Which attribute.
        what: &'static str,
        /// Its length, to tell an empty from an overlong one (the value itself is not
        /// repeated: it comes from the network).
        len: usize,
    },
    /// An element is malformed (a delimiter where none belongs, a bad Failure Reason).
    #[error("storage commitment dataset is malformed at byte {at}: {what}")]
    Malformed {
        /// Offset of the element.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The transfer syntax of the presentation context is not one this codec reads.
    #[error(
        "storage commitment over transfer syntax {0} is not supported: propose Implicit or \
         Explicit VR Little Endian"
    )]
    Syntax(String),
}

/// How a dataset is encoded: the presentation context's transfer syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Implicit VR Little Endian.
    Implicit,
    /// Explicit VR Little Endian.
    Explicit,
}

impl Encoding {
    /// The encoding of transfer syntax `uid`.
    ///
    /// # Errors
    /// [`CommitmentError::Syntax`] for big endian, deflate, or an unknown syntax.
    pub fn of(uid: &str) -> Result<Encoding, CommitmentError> {
        match uid.trim_end_matches(['\0', ' ']) {
            "1.2.840.10008.1.2" => Ok(Encoding::Implicit),
            "1.2.840.10008.1.2.1" => Ok(Encoding::Explicit),
            other => Err(CommitmentError::Syntax(other.chars().take(64).collect())),
        }
    }
}

/// One instance, by SOP class and instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reference {
    /// Referenced SOP Class UID (0008,1150).
    pub sop_class_uid: String,
    /// Referenced SOP Instance UID (0008,1155).
    pub sop_instance_uid: String,
}

/// An instance the SCP does not commit to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The instance.
    pub reference: Reference,
    /// Failure Reason (0008,1197), one of [`reason`].
    pub reason: u16,
}

/// The Storage Commitment Request (N-ACTION, Action Type ID 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Transaction UID (0008,1195): matches the report to the request.
    pub transaction_uid: String,
    /// Referenced SOP Sequence (0008,1199).
    pub references: Vec<Reference>,
}

/// The Storage Commitment Result (N-EVENT-REPORT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The request's Transaction UID.
    pub transaction_uid: String,
    /// Referenced SOP Sequence (0008,1199): committed.
    pub committed: Vec<Reference>,
    /// Failed SOP Sequence (0008,1198).
    pub failed: Vec<Failure>,
}

impl Report {
    /// The Event Type ID this report is sent with.
    pub fn event_type(&self) -> u16 {
        if self.failed.is_empty() {
            EVENT_SUCCESS
        } else {
            EVENT_FAILURES
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} committed, {} failed",
            self.committed.len(),
            self.failed.len()
        )
    }
}

/// A new Transaction UID: `2.25.` and a random 128-bit number (PS3.5 §B.2).
///
/// # Errors
/// The system's random source failing.
pub fn new_transaction_uid() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(format!("2.25.{}", u128::from_be_bytes(bytes)))
}

/// Checks a UID: 1-64 characters, digits and dots, no empty component. Leading zeros in
/// a component are tolerated (they are invalid, but modalities send them and the spool
/// stores such instances as received).
///
/// # Errors
/// [`CommitmentError::BadUid`] naming `what`.
pub fn check_uid(what: &'static str, uid: &str) -> Result<(), CommitmentError> {
    let ok = !uid.is_empty()
        && uid.len() <= MAX_UID_LENGTH
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && uid.split('.').all(|part| !part.is_empty());
    if ok {
        Ok(())
    } else {
        Err(CommitmentError::BadUid {
            what,
            len: uid.len(),
        })
    }
}

/// Encodes a Storage Commitment Request.
pub fn encode_request(request: &Request, encoding: Encoding) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + request.references.len() * 160);
    put_uid(
        &mut out,
        encoding,
        TRANSACTION_UID,
        &request.transaction_uid,
    );
    put_sequence(
        &mut out,
        encoding,
        REFERENCED_SOP_SEQUENCE,
        request.references.iter().map(|r| (r, None)),
    );
    out
}

/// Encodes a Storage Commitment Result.
pub fn encode_report(report: &Report, encoding: Encoding) -> Vec<u8> {
    let count = report.committed.len() + report.failed.len();
    let mut out = Vec::with_capacity(128 + count * 170);
    put_uid(&mut out, encoding, TRANSACTION_UID, &report.transaction_uid);
    if !report.failed.is_empty() {
        put_sequence(
            &mut out,
            encoding,
            FAILED_SOP_SEQUENCE,
            report.failed.iter().map(|f| (&f.reference, Some(f.reason))),
        );
    }
    if !report.committed.is_empty() {
        put_sequence(
            &mut out,
            encoding,
            REFERENCED_SOP_SEQUENCE,
            report.committed.iter().map(|r| (r, None)),
        );
    }
    out
}

/// Decodes a Storage Commitment Request.
///
/// # Errors
/// [`CommitmentError`] when the dataset is malformed, over a bound, lacks the Transaction
/// UID or the Referenced SOP Sequence, or holds an invalid UID.
pub fn decode_request(bytes: &[u8], encoding: Encoding) -> Result<Request, CommitmentError> {
    let top = decode(bytes, encoding)?;
    let transaction_uid = top
        .transaction_uid
        .ok_or(CommitmentError::Missing("Transaction UID (0008,1195)"))?;
    check_uid("Transaction UID (0008,1195)", &transaction_uid)?;
    let references = top.referenced.ok_or(CommitmentError::Missing(
        "Referenced SOP Sequence (0008,1199)",
    ))?;
    Ok(Request {
        transaction_uid,
        references: references
            .into_iter()
            .map(RawItem::reference)
            .collect::<Result<_, _>>()?,
    })
}

/// Decodes a Storage Commitment Result.
///
/// # Errors
/// [`CommitmentError`] when the dataset is malformed, over a bound, lacks the Transaction
/// UID, holds an invalid UID, or a failed item lacks its Failure Reason.
pub fn decode_report(bytes: &[u8], encoding: Encoding) -> Result<Report, CommitmentError> {
    let top = decode(bytes, encoding)?;
    let transaction_uid = top
        .transaction_uid
        .ok_or(CommitmentError::Missing("Transaction UID (0008,1195)"))?;
    check_uid("Transaction UID (0008,1195)", &transaction_uid)?;
    let committed = top
        .referenced
        .unwrap_or_default()
        .into_iter()
        .map(RawItem::reference)
        .collect::<Result<_, _>>()?;
    let failed = top
        .failed
        .unwrap_or_default()
        .into_iter()
        .map(|item| {
            let reason = item.reason.ok_or(CommitmentError::Missing(
                "Failure Reason (0008,1197) in a Failed SOP Sequence item",
            ))?;
            Ok(Failure {
                reference: item.reference()?,
                reason,
            })
        })
        .collect::<Result<_, CommitmentError>>()?;
    Ok(Report {
        transaction_uid,
        committed,
        failed,
    })
}

/// The attributes of one sequence item that matter.
#[derive(Debug, Default)]
struct RawItem {
    class: Option<String>,
    instance: Option<String>,
    reason: Option<u16>,
}

impl RawItem {
    fn reference(self) -> Result<Reference, CommitmentError> {
        let sop_class_uid = self.class.ok_or(CommitmentError::Missing(
            "Referenced SOP Class UID (0008,1150)",
        ))?;
        let sop_instance_uid = self.instance.ok_or(CommitmentError::Missing(
            "Referenced SOP Instance UID (0008,1155)",
        ))?;
        check_uid("Referenced SOP Class UID (0008,1150)", &sop_class_uid)?;
        check_uid("Referenced SOP Instance UID (0008,1155)", &sop_instance_uid)?;
        Ok(Reference {
            sop_class_uid,
            sop_instance_uid,
        })
    }
}

/// The top level of a request or report.
#[derive(Debug, Default)]
struct Top {
    transaction_uid: Option<String>,
    referenced: Option<Vec<RawItem>>,
    failed: Option<Vec<RawItem>>,
}

/// One element header: tag, whether it is a sequence, value length, header size.
struct Header {
    tag: u32,
    sequence: bool,
    length: u32,
    size: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    encoding: Encoding,
    references: usize,
}

fn decode(bytes: &[u8], encoding: Encoding) -> Result<Top, CommitmentError> {
    if bytes.len() > MAX_DATASET_LENGTH {
        return Err(CommitmentError::TooLarge(bytes.len()));
    }
    let mut reader = Reader {
        bytes,
        at: 0,
        encoding,
        references: 0,
    };
    let mut top = Top::default();
    while reader.at < bytes.len() {
        let start = reader.at;
        let header = reader.header()?;
        match header.tag {
            TRANSACTION_UID => top.transaction_uid = Some(reader.text(&header)?),
            REFERENCED_SOP_SEQUENCE | FAILED_SOP_SEQUENCE => {
                if !header.sequence && encoding == Encoding::Explicit {
                    return Err(CommitmentError::Malformed {
                        at: start,
                        what: "a sequence attribute without VR SQ",
                    });
                }
                let items = reader.sequence(&header, 1)?;
                let slot = if header.tag == FAILED_SOP_SEQUENCE {
                    &mut top.failed
                } else {
                    &mut top.referenced
                };
                slot.get_or_insert_with(Vec::new).extend(items);
            }
            ITEM | ITEM_END | SEQUENCE_END => {
                return Err(CommitmentError::Malformed {
                    at: start,
                    what: "a delimiter outside a sequence",
                });
            }
            _ => reader.skip(&header, 1)?,
        }
    }
    Ok(top)
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CommitmentError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(CommitmentError::Truncated(self.at))?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(CommitmentError::Truncated(self.at))?;
        self.at = end;
        Ok(slice)
    }

    fn header(&mut self) -> Result<Header, CommitmentError> {
        let start = self.at;
        let head: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| CommitmentError::Truncated(start))?;
        let group = u16::from_le_bytes([head[0], head[1]]);
        let element = u16::from_le_bytes([head[2], head[3]]);
        let tag = (u32::from(group) << 16) | u32::from(element);
        if group == 0xFFFE || self.encoding == Encoding::Implicit {
            let length = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let sequence = matches!(tag, REFERENCED_SOP_SEQUENCE | FAILED_SOP_SEQUENCE)
                || (group != 0xFFFE && length == UNDEFINED);
            return Ok(Header {
                tag,
                sequence,
                length,
                size: 8,
            });
        }
        let vr = [head[4], head[5]];
        if matches!(
            &vr,
            b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"UC" | b"UN" | b"UR" | b"UT"
        ) {
            let long = self.take(4)?;
            let length = u32::from_le_bytes([long[0], long[1], long[2], long[3]]);
            let sequence = &vr == b"SQ" || (&vr == b"UN" && length == UNDEFINED);
            if length == UNDEFINED && !sequence {
                return Err(CommitmentError::Malformed {
                    at: start,
                    what: "an undefined length on a value that is not a sequence",
                });
            }
            Ok(Header {
                tag,
                sequence,
                length,
                size: 12,
            })
        } else {
            Ok(Header {
                tag,
                sequence: false,
                length: u32::from(u16::from_le_bytes([head[6], head[7]])),
                size: 8,
            })
        }
    }

    fn value(&mut self, header: &Header) -> Result<&[u8], CommitmentError> {
        if header.length == UNDEFINED {
            return Err(CommitmentError::Malformed {
                at: self.at - header.size,
                what: "an undefined length on a value that is not a sequence",
            });
        }
        self.take(header.length as usize)
    }

    fn text(&mut self, header: &Header) -> Result<String, CommitmentError> {
        let value = self.value(header)?;
        if value.len() > MAX_UID_LENGTH + 1 {
            return Err(CommitmentError::BadUid {
                what: uid_name(header.tag),
                len: value.len(),
            });
        }
        Ok(String::from_utf8_lossy(value)
            .trim_end_matches(['\0', ' '])
            .to_owned())
    }

    /// The items of a sequence whose header was just read.
    fn sequence(&mut self, header: &Header, depth: usize) -> Result<Vec<RawItem>, CommitmentError> {
        if depth > MAX_DEPTH {
            return Err(CommitmentError::TooDeep);
        }
        let end = self.end_of(header)?;
        let mut items = Vec::new();
        loop {
            if end.is_some_and(|end| self.at >= end) {
                break;
            }
            let start = self.at;
            let item = self.header()?;
            match item.tag {
                SEQUENCE_END if end.is_none() => break,
                ITEM => {
                    self.references += 1;
                    if self.references > MAX_REFERENCES {
                        return Err(CommitmentError::TooManyReferences);
                    }
                    items.push(self.item(&item, depth)?);
                }
                _ => {
                    return Err(CommitmentError::Malformed {
                        at: start,
                        what: "a sequence holds something other than items",
                    });
                }
            }
        }
        if end.is_some_and(|end| self.at != end) {
            return Err(CommitmentError::Malformed {
                at: self.at,
                what: "an item runs past the end of its sequence",
            });
        }
        Ok(items)
    }

    fn item(&mut self, header: &Header, depth: usize) -> Result<RawItem, CommitmentError> {
        let end = self.end_of(header)?;
        let mut item = RawItem::default();
        loop {
            if end.is_some_and(|end| self.at >= end) {
                break;
            }
            let start = self.at;
            let element = self.header()?;
            match element.tag {
                ITEM_END if end.is_none() => break,
                ITEM | ITEM_END | SEQUENCE_END => {
                    return Err(CommitmentError::Malformed {
                        at: start,
                        what: "a delimiter out of place in an item",
                    });
                }
                REFERENCED_SOP_CLASS_UID => item.class = Some(self.text(&element)?),
                REFERENCED_SOP_INSTANCE_UID => item.instance = Some(self.text(&element)?),
                FAILURE_REASON => {
                    let value = self.value(&element)?;
                    let [a, b] = value else {
                        return Err(CommitmentError::Malformed {
                            at: start,
                            what: "Failure Reason (0008,1197) is not one US value",
                        });
                    };
                    item.reason = Some(u16::from_le_bytes([*a, *b]));
                }
                _ => self.skip(&element, depth + 1)?,
            }
        }
        if end.is_some_and(|end| self.at != end) {
            return Err(CommitmentError::Malformed {
                at: self.at,
                what: "an element runs past the end of its item",
            });
        }
        Ok(item)
    }

    /// Skips an element the codec does not use (a nested sequence is walked, bounded).
    fn skip(&mut self, header: &Header, depth: usize) -> Result<(), CommitmentError> {
        if header.sequence {
            if depth > MAX_DEPTH {
                return Err(CommitmentError::TooDeep);
            }
            self.sequence(header, depth).map(drop)
        } else {
            self.value(header).map(drop)
        }
    }

    /// Where a defined-length sequence or item ends; `None` when its length is undefined.
    fn end_of(&self, header: &Header) -> Result<Option<usize>, CommitmentError> {
        if header.length == UNDEFINED {
            return Ok(None);
        }
        let end = self
            .at
            .checked_add(header.length as usize)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(CommitmentError::Truncated(self.at))?;
        Ok(Some(end))
    }
}

fn uid_name(tag: u32) -> &'static str {
    match tag {
        TRANSACTION_UID => "Transaction UID (0008,1195)",
        REFERENCED_SOP_CLASS_UID => "Referenced SOP Class UID (0008,1150)",
        _ => "Referenced SOP Instance UID (0008,1155)",
    }
}

fn put_header(out: &mut Vec<u8>, encoding: Encoding, tag: u32, vr: &[u8; 2], length: u32) {
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    match encoding {
        Encoding::Implicit => out.extend_from_slice(&length.to_le_bytes()),
        Encoding::Explicit if vr == b"SQ" => {
            out.extend_from_slice(vr);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&length.to_le_bytes());
        }
        Encoding::Explicit => {
            out.extend_from_slice(vr);
            out.extend_from_slice(&(length as u16).to_le_bytes());
        }
    }
}

fn put_uid(out: &mut Vec<u8>, encoding: Encoding, tag: u32, uid: &str) {
    let mut value: Vec<u8> = uid.bytes().take(MAX_UID_LENGTH).collect();
    if value.len() % 2 == 1 {
        value.push(0);
    }
    put_header(out, encoding, tag, b"UI", value.len() as u32);
    out.extend_from_slice(&value);
}

/// Writes a sequence of undefined length whose items have undefined length (no length
/// to compute ahead, and every reader handles delimiters).
fn put_sequence<'a>(
    out: &mut Vec<u8>,
    encoding: Encoding,
    tag: u32,
    items: impl Iterator<Item = (&'a Reference, Option<u16>)>,
) {
    put_header(out, encoding, tag, b"SQ", UNDEFINED);
    for (reference, failure) in items {
        put_delimiter(out, ITEM, UNDEFINED);
        put_uid(
            out,
            encoding,
            REFERENCED_SOP_CLASS_UID,
            &reference.sop_class_uid,
        );
        put_uid(
            out,
            encoding,
            REFERENCED_SOP_INSTANCE_UID,
            &reference.sop_instance_uid,
        );
        if let Some(code) = failure {
            put_header(out, encoding, FAILURE_REASON, b"US", 2);
            out.extend_from_slice(&code.to_le_bytes());
        }
        put_delimiter(out, ITEM_END, 0);
    }
    put_delimiter(out, SEQUENCE_END, 0);
}

fn put_delimiter(out: &mut Vec<u8>, tag: u32, length: u32) {
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
}

/// A DIMSE message as it arrived: its command set and, when the command says one
/// follows, its dataset (both bounded).
#[derive(Debug)]
pub struct Message {
    /// The presentation context it came on.
    pub context_id: u8,
    /// The command set.
    pub command: Vec<u8>,
    /// The dataset, if any.
    pub dataset: Option<Vec<u8>>,
}

/// What the peer sent next on an association.
#[derive(Debug)]
pub enum Received {
    /// A whole message.
    Message(Message),
    /// The peer asked to release (answered).
    Released,
    /// The peer aborted.
    Aborted,
}

/// Why a message exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The connection failed or timed out.
    #[error("{0}")]
    Network(String),
    /// The peer broke the protocol (a fragment out of place, a message over a bound).
    #[error("{0}")]
    Protocol(String),
}

/// Receives the next message on `association` (answering a release request), with the
/// command set bounded by [`super::dimse::MAX_COMMAND_LENGTH`] and the dataset by
/// [`MAX_DATASET_LENGTH`].
///
/// # Errors
/// [`ExchangeError`] when the connection fails or the peer breaks the protocol.
pub async fn receive_message<A: Messages>(association: &mut A) -> Result<Received, ExchangeError> {
    use dicom_ul::Pdu;
    use dicom_ul::pdu::PDataValueType;
    let mut command = Vec::new();
    let mut dataset: Option<Vec<u8>> = None;
    let mut context = None;
    loop {
        let pdu = association
            .receive_pdu()
            .await
            .map_err(|e| ExchangeError::Network(e.to_string()))?;
        let data = match pdu {
            Pdu::PData { data } => data,
            Pdu::ReleaseRQ => {
                let _ = association.send_pdu(&Pdu::ReleaseRP).await;
                return Ok(Received::Released);
            }
            Pdu::AbortRQ { .. } => return Ok(Received::Aborted),
            other => {
                return Err(ExchangeError::Protocol(format!(
                    "unexpected {}",
                    other.short_description()
                )));
            }
        };
        for value in data {
            if *context.get_or_insert(value.presentation_context_id)
                != value.presentation_context_id
            {
                return Err(ExchangeError::Protocol(
                    "a message's fragments came on two presentation contexts".into(),
                ));
            }
            match (value.value_type, dataset.as_mut()) {
                (PDataValueType::Command, None) => {
                    if command.len() + value.data.len() > super::dimse::MAX_COMMAND_LENGTH {
                        return Err(ExchangeError::Protocol(
                            "command set larger than 64 KiB".into(),
                        ));
                    }
                    command.extend_from_slice(&value.data);
                    if value.is_last {
                        let follows = super::dimse::has_data_set(&command)
                            .map_err(|e| ExchangeError::Protocol(e.to_string()))?;
                        if !follows {
                            return Ok(Received::Message(Message {
                                context_id: value.presentation_context_id,
                                command,
                                dataset: None,
                            }));
                        }
                        dataset = Some(Vec::new());
                    }
                }
                (PDataValueType::Data, Some(bytes)) => {
                    if bytes.len() + value.data.len() > MAX_DATASET_LENGTH {
                        return Err(ExchangeError::Protocol(format!(
                            "a storage commitment dataset larger than {MAX_DATASET_LENGTH} bytes"
                        )));
                    }
                    bytes.extend_from_slice(&value.data);
                    if value.is_last {
                        return Ok(Received::Message(Message {
                            context_id: value.presentation_context_id,
                            command,
                            dataset,
                        }));
                    }
                }
                _ => {
                    return Err(ExchangeError::Protocol(
                        "a command or dataset fragment out of place".into(),
                    ));
                }
            }
        }
    }
}

/// Sends a command set and, if given, its dataset, cut into P-DATA PDUs the peer accepts
/// (its maximum PDU length; a dataset here is at most [`MAX_DATASET_LENGTH`]).
///
/// # Errors
/// [`ExchangeError::Network`] when the connection fails.
pub async fn send_message<A: Messages>(
    association: &mut A,
    context_id: u8,
    command: Vec<u8>,
    dataset: Option<&[u8]>,
) -> Result<(), ExchangeError> {
    use dicom_ul::pdu::{PDataValue, PDataValueType};
    let network = |e: &dyn fmt::Display| ExchangeError::Network(e.to_string());
    association
        .send_pdu(&super::dimse::command_pdu(context_id, command))
        .await
        .map_err(|e| network(&e))?;
    let Some(dataset) = dataset else {
        return Ok(());
    };
    // A PDV item adds 6 bytes (length, context, control header) to its fragment.
    let fragment = match association.peer_max_pdu_length() {
        0 => MAX_FRAGMENT,
        max => (max as usize).saturating_sub(6).clamp(1, MAX_FRAGMENT),
    };
    let mut offset: usize = 0;
    loop {
        let end = offset.saturating_add(fragment).min(dataset.len());
        let is_last = end == dataset.len();
        let pdu = dicom_ul::Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Data,
                is_last,
                data: dataset[offset..end].to_vec(),
            }],
        };
        association.send_pdu(&pdu).await.map_err(|e| network(&e))?;
        if is_last {
            return Ok(());
        }
        offset = end;
    }
}

/// Largest dataset fragment sent in one PDU when the peer sets no limit.
const MAX_FRAGMENT: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(n: usize) -> Reference {
        Reference {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
            sop_instance_uid: format!("1.2.3.{n}"),
        }
    }

    fn request(n: usize) -> Request {
        Request {
            transaction_uid: "2.25.12345".into(),
            references: (0..n).map(reference).collect(),
        }
    }

    #[test]
    fn a_request_and_a_report_round_trip_in_both_encodings() {
        for encoding in [Encoding::Implicit, Encoding::Explicit] {
            let rq = request(3);
            assert_eq!(
                decode_request(&encode_request(&rq, encoding), encoding),
                Ok(rq)
            );
            let report = Report {
                transaction_uid: "2.25.9".into(),
                committed: vec![reference(1)],
                failed: vec![Failure {
                    reference: reference(2),
                    reason: reason::NO_SUCH_OBJECT_INSTANCE,
                }],
            };
            assert_eq!(report.event_type(), EVENT_FAILURES);
            let bytes = encode_report(&report, encoding);
            assert_eq!(decode_report(&bytes, encoding), Ok(report));
        }
    }

    /// A dataset as other encoders write it: defined lengths for the sequence and items,
    /// an unknown attribute skipped, a nested sequence in an item skipped.
    #[test]
    fn defined_lengths_and_unknown_attributes_are_read() {
        let mut item = Vec::new();
        put_uid(
            &mut item,
            Encoding::Explicit,
            REFERENCED_SOP_CLASS_UID,
            "1.2",
        );
        put_uid(
            &mut item,
            Encoding::Explicit,
            REFERENCED_SOP_INSTANCE_UID,
            "1.2.3",
        );
        put_header(&mut item, Encoding::Explicit, 0x0040_A170, b"SQ", 0);
        let mut seq = Vec::new();
        put_delimiter(&mut seq, ITEM, item.len() as u32);
        seq.extend_from_slice(&item);
        let mut bytes = Vec::new();
        put_header(&mut bytes, Encoding::Explicit, 0x0008_0054, b"AE", 4);
        bytes.extend_from_slice(b"PACS");
        put_uid(&mut bytes, Encoding::Explicit, TRANSACTION_UID, "1.2.9");
        put_header(
            &mut bytes,
            Encoding::Explicit,
            REFERENCED_SOP_SEQUENCE,
            b"SQ",
            seq.len() as u32,
        );
        bytes.extend_from_slice(&seq);
        let rq = decode_request(&bytes, Encoding::Explicit).expect("decodes");
        assert_eq!(rq.transaction_uid, "1.2.9");
        assert_eq!(rq.references.len(), 1);
        assert_eq!(rq.references[0].sop_instance_uid, "1.2.3");
    }

    /// Fails on a codec without the bound: one reference too many is refused, with the
    /// limit in the message, and the limit itself is accepted.
    #[test]
    fn more_than_max_references_is_refused() {
        let at_limit = encode_request(&request(MAX_REFERENCES), Encoding::Implicit);
        assert_eq!(
            decode_request(&at_limit, Encoding::Implicit).map(|r| r.references.len()),
            Ok(MAX_REFERENCES)
        );
        let over = encode_request(&request(MAX_REFERENCES + 1), Encoding::Implicit);
        let error = decode_request(&over, Encoding::Implicit).expect_err("refused");
        assert_eq!(error, CommitmentError::TooManyReferences);
        assert!(error.to_string().contains("100000"), "{error}");
        assert!(matches!(
            decode_request(&vec![0; MAX_DATASET_LENGTH + 1], Encoding::Implicit),
            Err(CommitmentError::TooLarge(_))
        ));
    }

    #[test]
    fn bad_uids_missing_attributes_and_deep_nesting_are_errors() {
        for bad in ["", "1..2", "1.2.", "1.2.a", &"1".repeat(65)] {
            let mut rq = request(1);
            rq.references[0].sop_instance_uid = bad.to_string();
            let mut bytes = Vec::new();
            put_uid(&mut bytes, Encoding::Implicit, TRANSACTION_UID, "1.2");
            put_header(
                &mut bytes,
                Encoding::Implicit,
                REFERENCED_SOP_SEQUENCE,
                b"SQ",
                UNDEFINED,
            );
            put_delimiter(&mut bytes, ITEM, UNDEFINED);
            put_uid(
                &mut bytes,
                Encoding::Implicit,
                REFERENCED_SOP_CLASS_UID,
                "1.2",
            );
            put_header(
                &mut bytes,
                Encoding::Implicit,
                REFERENCED_SOP_INSTANCE_UID,
                b"UI",
                bad.len() as u32,
            );
            bytes.extend_from_slice(bad.as_bytes());
            put_delimiter(&mut bytes, ITEM_END, 0);
            put_delimiter(&mut bytes, SEQUENCE_END, 0);
            assert!(
                matches!(
                    decode_request(&bytes, Encoding::Implicit),
                    Err(CommitmentError::BadUid { .. })
                ),
                "{bad:?}"
            );
        }
        let mut no_sequence = Vec::new();
        put_uid(&mut no_sequence, Encoding::Implicit, TRANSACTION_UID, "1.2");
        assert_eq!(
            decode_request(&no_sequence, Encoding::Implicit),
            Err(CommitmentError::Missing(
                "Referenced SOP Sequence (0008,1199)"
            ))
        );
        // Sequences nested in items, each in the previous one's item, beyond MAX_DEPTH.
        let mut deep = Vec::new();
        put_uid(&mut deep, Encoding::Implicit, TRANSACTION_UID, "1.2");
        put_header(
            &mut deep,
            Encoding::Implicit,
            REFERENCED_SOP_SEQUENCE,
            b"SQ",
            UNDEFINED,
        );
        for _ in 0..MAX_DEPTH + 1 {
            put_delimiter(&mut deep, ITEM, UNDEFINED);
            put_header(&mut deep, Encoding::Implicit, 0x0040_A170, b"SQ", UNDEFINED);
        }
        assert_eq!(
            decode_request(&deep, Encoding::Implicit),
            Err(CommitmentError::TooDeep)
        );
        let full = encode_request(&request(2), Encoding::Explicit);
        for cut in [3, 9, 20, full.len() - 1] {
            assert!(
                decode_request(&full[..cut], Encoding::Explicit).is_err(),
                "{cut}"
            );
        }
        assert!(Encoding::of("1.2.840.10008.1.2.2").is_err());
    }

    #[test]
    fn transaction_uids_are_valid_and_distinct() {
        let a = new_transaction_uid().expect("random");
        let b = new_transaction_uid().expect("random");
        assert_ne!(a, b);
        check_uid("t", &a).expect("valid");
        assert!(a.len() <= MAX_UID_LENGTH);
    }
}
