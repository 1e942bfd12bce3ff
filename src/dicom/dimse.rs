//! DIMSE command sets: the small Implicit VR Little Endian datasets of group 0000 that
//! carry C-STORE and C-ECHO requests and their responses (PS3.7 §9, §E).
//!
//! Command sets are tiny and flat (no sequences), so they are decoded and encoded here
//! directly, with every length checked, rather than through a general dataset parser.

use std::fmt;

/// Largest command set we accept; real ones are a few hundred bytes.
pub const MAX_COMMAND_LENGTH: usize = 64 * 1024;

/// Command Field values (PS3.7 §E.1).
pub mod field {
    /// C-STORE-RQ.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// N-EVENT-REPORT-RQ (the Storage Commitment result).
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    /// N-EVENT-REPORT-RSP.
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
    /// N-ACTION-RQ (the Storage Commitment request).
    pub const N_ACTION_RQ: u16 = 0x0130;
    /// N-ACTION-RSP.
    pub const N_ACTION_RSP: u16 = 0x8130;

    /// The response field answering request field `request`: C-ECHO, N-ACTION and
    /// N-EVENT-REPORT by their own, anything else as a C-STORE.
    pub fn response_to(request: u16) -> u16 {
        match request {
            C_ECHO_RQ => C_ECHO_RSP,
            N_ACTION_RQ => N_ACTION_RSP,
            N_EVENT_REPORT_RQ => N_EVENT_REPORT_RSP,
            _ => C_STORE_RSP,
        }
    }
}

/// Status codes we answer with (PS3.7 Annex C, PS3.4 §B.2.3).
pub mod status {
    /// The instance is stored durably.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (disk full or below the configured reserve).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: the dataset does not match the SOP class or instance of the command.
    pub const DATA_SET_DOES_NOT_MATCH: u16 = 0xA900;
    /// Error: cannot understand (the dataset could not be parsed).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: processing failure (an unexpected local error).
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// Failure: invalid argument value (a malformed N-ACTION or N-EVENT-REPORT dataset).
    pub const INVALID_ARGUMENT_VALUE: u16 = 0x0115;
    /// Failure: no such SOP instance (an N-ACTION or N-EVENT-REPORT not on the
    /// well-known Storage Commitment instance, or a report no request waits for).
    pub const NO_SUCH_SOP_INSTANCE: u16 = 0x0112;
    /// Failure: no such action type (an N-ACTION other than a commitment request).
    pub const NO_SUCH_ACTION: u16 = 0x0123;
    /// Failure: no such event type (an N-EVENT-REPORT other than a commitment result).
    pub const NO_SUCH_EVENT_TYPE: u16 = 0x0113;
    /// Failure: resource limitation (a request beyond the gateway's bounds).
    pub const RESOURCE_LIMITATION: u16 = 0x0213;
}

const NO_DATA_SET: u16 = 0x0101;

/// Why a command set could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// The bytes end inside an element.
    #[error("command set is truncated at byte {0}")]
    Truncated(usize),
    /// A required element is absent.
    #[error("command set lacks {0}")]
    Missing(&'static str),
    /// The command set is larger than [`MAX_COMMAND_LENGTH`].
    #[error("command set is larger than {MAX_COMMAND_LENGTH} bytes")]
    TooLarge,
}

/// The fields of a request command that the SCP acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Command Field (0000,0100).
    pub field: u16,
    /// Message ID (0000,0110), echoed in the response.
    pub message_id: u16,
    /// Affected SOP Class UID (0000,0002), without padding.
    pub sop_class_uid: String,
    /// Affected SOP Instance UID (0000,1000), without padding; empty for C-ECHO.
    pub sop_instance_uid: String,
    /// Whether a dataset follows (Command Data Set Type != 0x0101).
    pub has_data_set: bool,
    /// Action Type ID (0000,1008) of an N-ACTION or Event Type ID (0000,1002) of an
    /// N-EVENT-REPORT; `None` for other commands.
    pub type_id: Option<u16>,
}

/// Every element of a command set that either side acts on, as found.
#[derive(Debug, Default)]
struct Fields {
    field: Option<u16>,
    message_id: Option<u16>,
    responding_to: Option<u16>,
    data_set_type: Option<u16>,
    status: Option<u16>,
    sop_class_uid: String,
    sop_instance_uid: String,
    error_comment: String,
    type_id: Option<u16>,
}

impl Fields {
    fn decode(bytes: &[u8]) -> Result<Fields, CommandError> {
        if bytes.len() > MAX_COMMAND_LENGTH {
            return Err(CommandError::TooLarge);
        }
        let mut fields = Fields::default();
        let mut at = 0;
        while at < bytes.len() {
            let header = bytes.get(at..at + 8).ok_or(CommandError::Truncated(at))?;
            let tag = (le16(&header[0..2]), le16(&header[2..4]));
            let len = le32(&header[4..8]) as usize;
            let value = bytes
                .get(at + 8..at + 8 + len)
                .ok_or(CommandError::Truncated(at))?;
            match tag {
                // Affected (C-STORE, N-EVENT-REPORT) or Requested (N-ACTION) SOP class
                // and instance: a command carries one or the other.
                (0x0000, 0x0002 | 0x0003) => fields.sop_class_uid = uid_text(value),
                (0x0000, 0x1001) => fields.sop_instance_uid = uid_text(value),
                (0x0000, 0x1002 | 0x1008) => fields.type_id = us(value),
                (0x0000, 0x0100) => fields.field = us(value),
                (0x0000, 0x0110) => fields.message_id = us(value),
                (0x0000, 0x0120) => fields.responding_to = us(value),
                (0x0000, 0x0800) => fields.data_set_type = us(value),
                (0x0000, 0x0900) => fields.status = us(value),
                (0x0000, 0x0902) => fields.error_comment = uid_text(value),
                (0x0000, 0x1000) => fields.sop_instance_uid = uid_text(value),
                _ => {}
            }
            at += 8 + len;
        }
        Ok(fields)
    }
}

/// A response from a peer SCP, as the SCU needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Command Field (0000,0100), e.g. [`field::C_STORE_RSP`].
    pub field: u16,
    /// Message ID Being Responded To (0000,0120).
    pub responding_to: u16,
    /// Status (0000,0900).
    pub status: u16,
    /// Error Comment (0000,0902), empty when absent.
    pub error_comment: String,
}

impl Response {
    /// Decodes a complete response command set.
    ///
    /// # Errors
    /// [`CommandError`] when the bytes are truncated, too large or lack a required field.
    pub fn decode(bytes: &[u8]) -> Result<Response, CommandError> {
        let fields = Fields::decode(bytes)?;
        Ok(Response {
            field: fields
                .field
                .ok_or(CommandError::Missing("Command Field (0000,0100)"))?,
            responding_to: fields.responding_to.ok_or(CommandError::Missing(
                "Message ID Being Responded To (0000,0120)",
            ))?,
            status: fields
                .status
                .ok_or(CommandError::Missing("Status (0000,0900)"))?,
            error_comment: fields.error_comment,
        })
    }
}

/// Whether a dataset follows a command set, request or response (Command Data Set
/// Type (0000,0800) other than 0x0101).
///
/// # Errors
/// [`CommandError`] when the bytes are truncated, too large or lack the element.
pub fn has_data_set(bytes: &[u8]) -> Result<bool, CommandError> {
    Ok(Fields::decode(bytes)?
        .data_set_type
        .ok_or(CommandError::Missing("Command Data Set Type (0000,0800)"))?
        != NO_DATA_SET)
}

/// Wraps an encoded command set in the single P-DATA PDU that carries it (command sets
/// are small: one PDV, last fragment).
pub fn command_pdu(context_id: u8, command: Vec<u8>) -> dicom_ul::Pdu {
    dicom_ul::Pdu::PData {
        data: vec![dicom_ul::pdu::PDataValue {
            presentation_context_id: context_id,
            value_type: dicom_ul::pdu::PDataValueType::Command,
            is_last: true,
            data: command,
        }],
    }
}

/// Encodes a C-STORE-RQ (medium priority, a dataset follows).
pub fn store_request(message_id: u16, sop_class_uid: &str, sop_instance_uid: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    put(&mut body, 0x0002, &uid_bytes(sop_class_uid));
    put(&mut body, 0x0100, &field::C_STORE_RQ.to_le_bytes());
    put(&mut body, 0x0110, &message_id.to_le_bytes());
    put(&mut body, 0x0700, &0u16.to_le_bytes());
    put(&mut body, 0x0800, &0u16.to_le_bytes());
    put(&mut body, 0x1000, &uid_bytes(sop_instance_uid));
    with_group_length(body)
}

impl Command {
    /// Decodes a complete request command set.
    ///
    /// # Errors
    /// [`CommandError`] when the bytes are truncated, too large or lack a required field.
    pub fn decode(bytes: &[u8]) -> Result<Command, CommandError> {
        let fields = Fields::decode(bytes)?;
        Ok(Command {
            field: fields
                .field
                .ok_or(CommandError::Missing("Command Field (0000,0100)"))?,
            message_id: fields
                .message_id
                .ok_or(CommandError::Missing("Message ID (0000,0110)"))?,
            sop_class_uid: fields.sop_class_uid,
            sop_instance_uid: fields.sop_instance_uid,
            has_data_set: fields
                .data_set_type
                .ok_or(CommandError::Missing("Command Data Set Type (0000,0800)"))?
                != NO_DATA_SET,
            type_id: fields.type_id,
        })
    }

    /// Encodes the response to this request with `status` and an optional error comment.
    pub fn response(&self, status: u16, comment: Option<&str>) -> Vec<u8> {
        let response_field = field::response_to(self.field);
        let mut body = Vec::with_capacity(256);
        put(&mut body, 0x0002, &uid_bytes(&self.sop_class_uid));
        put(&mut body, 0x0100, &response_field.to_le_bytes());
        put(&mut body, 0x0120, &self.message_id.to_le_bytes());
        put(&mut body, 0x0800, &NO_DATA_SET.to_le_bytes());
        put(&mut body, 0x0900, &status.to_le_bytes());
        if let Some(comment) = comment {
            put(&mut body, 0x0902, &error_comment(comment));
        }
        if !self.sop_instance_uid.is_empty() {
            put(&mut body, 0x1000, &uid_bytes(&self.sop_instance_uid));
        }
        match (self.field, self.type_id) {
            (field::N_EVENT_REPORT_RQ, Some(event)) => put(&mut body, 0x1002, &event.to_le_bytes()),
            (field::N_ACTION_RQ, Some(action)) => put(&mut body, 0x1008, &action.to_le_bytes()),
            _ => {}
        }
        with_group_length(body)
    }
}

/// Encodes an N-ACTION-RQ on `sop_class_uid` / `sop_instance_uid` (the Requested SOP
/// Class and Instance) with Action Type ID `action`; a dataset follows.
pub fn action_request(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    action: u16,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    put(&mut body, 0x0003, &uid_bytes(sop_class_uid));
    put(&mut body, 0x0100, &field::N_ACTION_RQ.to_le_bytes());
    put(&mut body, 0x0110, &message_id.to_le_bytes());
    put(&mut body, 0x0800, &0u16.to_le_bytes());
    put(&mut body, 0x1001, &uid_bytes(sop_instance_uid));
    put(&mut body, 0x1008, &action.to_le_bytes());
    with_group_length(body)
}

/// Encodes an N-EVENT-REPORT-RQ on `sop_class_uid` / `sop_instance_uid` (the Affected
/// SOP Class and Instance) with Event Type ID `event`; a dataset follows.
pub fn event_report_request(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    event: u16,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    put(&mut body, 0x0002, &uid_bytes(sop_class_uid));
    put(&mut body, 0x0100, &field::N_EVENT_REPORT_RQ.to_le_bytes());
    put(&mut body, 0x0110, &message_id.to_le_bytes());
    put(&mut body, 0x0800, &0u16.to_le_bytes());
    put(&mut body, 0x1000, &uid_bytes(sop_instance_uid));
    put(&mut body, 0x1002, &event.to_le_bytes());
    with_group_length(body)
}

/// Prefixes a command body with its Command Group Length (0000,0000).
fn with_group_length(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 12);
    put(
        &mut out,
        0x0000,
        &u32::try_from(body.len())
            .expect("a command set is a few hundred bytes")
            .to_le_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.field {
            field::C_STORE_RQ => "C-STORE-RQ",
            field::C_ECHO_RQ => "C-ECHO-RQ",
            field::N_ACTION_RQ => "N-ACTION-RQ",
            field::N_EVENT_REPORT_RQ => "N-EVENT-REPORT-RQ",
            _ => return write!(f, "command 0x{:04X}", self.field),
        };
        write!(f, "{name} (message {})", self.message_id)
    }
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn us(value: &[u8]) -> Option<u16> {
    (value.len() == 2).then(|| le16(value))
}

fn uid_text(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

fn uid_bytes(uid: &str) -> Vec<u8> {
    let mut bytes = uid.as_bytes().to_vec();
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    bytes
}

/// Error Comment is LO: at most 64 characters, padded with a space to even length.
fn error_comment(comment: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = comment
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '\\')
        .take(64)
        .map(|c| c as u8)
        .collect();
    if bytes.len() % 2 == 1 {
        bytes.push(b' ');
    }
    bytes
}

fn put(out: &mut Vec<u8>, element: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(value.len())
            .expect("command values are short")
            .to_le_bytes(),
    );
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_rq() -> Vec<u8> {
        store_request(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    }

    #[test]
    fn decodes_a_store_request_and_answers_it() {
        let command = Command::decode(&store_rq()).expect("valid command");
        assert_eq!(command.field, field::C_STORE_RQ);
        assert_eq!(command.message_id, 7);
        assert_eq!(command.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(command.sop_instance_uid, "1.2.3.4");
        assert!(command.has_data_set);

        let rsp = command.response(status::CANNOT_UNDERSTAND, Some("bad"));
        assert_eq!(
            Response::decode(&rsp),
            Ok(Response {
                field: field::C_STORE_RSP,
                responding_to: 7,
                status: status::CANNOT_UNDERSTAND,
                error_comment: "bad".into(),
            })
        );
        let decoded_len = le32(&rsp[8..12]) as usize;
        assert_eq!(decoded_len, rsp.len() - 12, "group length covers the rest");
        let rsp_values: Vec<(u16, Vec<u8>)> = {
            let mut at = 0;
            let mut out = Vec::new();
            while at < rsp.len() {
                let len = le32(&rsp[at + 4..at + 8]) as usize;
                out.push((
                    le16(&rsp[at + 2..at + 4]),
                    rsp[at + 8..at + 8 + len].to_vec(),
                ));
                at += 8 + len;
            }
            out
        };
        assert!(rsp_values.contains(&(0x0100, field::C_STORE_RSP.to_le_bytes().to_vec())));
        assert!(rsp_values.contains(&(0x0120, 7u16.to_le_bytes().to_vec())));
        assert!(rsp_values.contains(&(0x0900, 0xC000u16.to_le_bytes().to_vec())));
        assert!(rsp_values.contains(&(0x0902, b"bad ".to_vec())));
    }

    #[test]
    fn n_action_and_n_event_report_decode_and_are_answered_in_kind() {
        let action = Command::decode(&action_request(
            3,
            "1.2.840.10008.1.20.1",
            "1.2.840.10008.1.20.1.1",
            1,
        ))
        .expect("valid");
        assert_eq!(
            (
                action.field,
                action.sop_class_uid.as_str(),
                action.sop_instance_uid.as_str()
            ),
            (
                field::N_ACTION_RQ,
                "1.2.840.10008.1.20.1",
                "1.2.840.10008.1.20.1.1"
            )
        );
        assert_eq!((action.type_id, action.has_data_set), (Some(1), true));
        let rsp = Response::decode(&action.response(status::SUCCESS, None)).expect("valid");
        assert_eq!((rsp.field, rsp.responding_to), (field::N_ACTION_RSP, 3));
        let event = Command::decode(&event_report_request(
            4,
            "1.2.840.10008.1.20.1",
            "1.2.840.10008.1.20.1.1",
            2,
        ))
        .expect("valid");
        assert_eq!(
            (event.field, event.type_id),
            (field::N_EVENT_REPORT_RQ, Some(2))
        );
        let rsp = Response::decode(&event.response(status::SUCCESS, None)).expect("valid");
        assert_eq!(
            (rsp.field, rsp.responding_to),
            (field::N_EVENT_REPORT_RSP, 4)
        );
    }

    #[test]
    fn truncated_and_incomplete_commands_are_errors() {
        let full = store_rq();
        for cut in [3, 9, 13, full.len() - 1] {
            assert!(matches!(
                Command::decode(&full[..cut]),
                Err(CommandError::Truncated(_))
            ));
        }
        let mut no_field = Vec::new();
        put(&mut no_field, 0x0110, &1u16.to_le_bytes());
        assert_eq!(
            Command::decode(&no_field),
            Err(CommandError::Missing("Command Field (0000,0100)"))
        );
        assert_eq!(
            Command::decode(&vec![0; MAX_COMMAND_LENGTH + 1]),
            Err(CommandError::TooLarge)
        );
    }
}
