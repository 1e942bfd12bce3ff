//! The DICOMDIR (Basic Directory IOD, PS3.3 F, PS3.10): directory records, their keys,
//! the writer that lays records out with exact byte offsets, and a reader that follows
//! those offsets in any file set (ours, DCMTK `dcmmkdir`, disc burners).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dicom_dictionary_std::uids::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, MEDIA_STORAGE_DIRECTORY_STORAGE,
};

use super::element::{self, Element, ElementError, Item, Parser, Syntax, Value, text_element};
use super::tags;

/// Our implementation class UID (a UUID-derived UID), written in every DICOMDIR meta header.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.278873342212745929459238669860149585228";
/// Our implementation version name.
pub const IMPLEMENTATION_VERSION: &str = "CLOUDPDI_01";
/// Largest DICOMDIR the reader accepts (a full DVD's is a few MiB).
const MAX_DICOMDIR: u64 = 256 << 20;
/// Deepest record hierarchy followed (the standard's is 4 levels; private ones add some).
const MAX_DEPTH: usize = 16;

/// Why a DICOMDIR cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum DicomdirError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The DICOMDIR.
        path: PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
    /// The file is not a DICOMDIR.
    #[error("{path} is not a DICOMDIR: {why}")]
    NotDicomdir {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        why: String,
    },
    /// The element stream is damaged.
    #[error("{path} is damaged: {source}")]
    Malformed {
        /// The DICOMDIR.
        path: PathBuf,
        /// What the parser found.
        source: ElementError,
    },
    /// A record offset does not point at a directory record.
    #[error(
        "DICOMDIR offset {offset} ({what}) does not point at a directory record: the DICOMDIR \
         is damaged or was written with wrong offsets"
    )]
    BadOffset {
        /// The offset found.
        offset: u64,
        /// Which offset it is.
        what: String,
    },
}

/// How a record needs a key (PS3.3 F.5 types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Type 1: must have a value (a stand-in is written when the instance has none).
    Value,
    /// Type 2: present, possibly empty.
    Present,
    /// Type 1C/3: copied only when the instance has a value.
    IfAny,
}

/// One key of a directory record: where it comes from in the instance.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Tag in the instance and in the record.
    pub tag: u32,
    /// VR in the record (the instance may be implicit VR).
    pub vr: [u8; 2],
    /// How the record needs it.
    pub need: Need,
}

const fn key(tag: u32, vr: &[u8; 2], need: Need) -> Key {
    Key { tag, vr: *vr, need }
}

const V: Need = Need::Value;
const P: Need = Need::Present;
const C: Need = Need::IfAny;

/// Keys of the PATIENT record (Patient ID is type 1, the name type 2). Optional keys are
/// left out: dciodvfy flags every one as a "Standard Extended" attribute.
pub const PATIENT_KEYS: &[Key] = &[
    key(tags::PATIENT_NAME, b"PN", P),
    key(tags::PATIENT_ID, b"LO", V),
];

/// Keys of the STUDY record.
pub const STUDY_KEYS: &[Key] = &[
    key(tags::STUDY_DATE, b"DA", V),
    key(tags::STUDY_TIME, b"TM", V),
    key(tags::ACCESSION_NUMBER, b"SH", P),
    key(tags::STUDY_DESCRIPTION, b"LO", P),
    key(tags::STUDY_INSTANCE_UID, b"UI", V),
    key(tags::STUDY_ID, b"SH", V),
];

/// Keys of the SERIES record.
pub const SERIES_KEYS: &[Key] = &[
    key(tags::MODALITY, b"CS", V),
    key(tags::SERIES_INSTANCE_UID, b"UI", V),
    key(tags::SERIES_NUMBER, b"IS", V),
];

const IMAGE_KEYS: &[Key] = &[key(tags::INSTANCE_NUMBER, b"IS", V)];
const SR_KEYS: &[Key] = &[
    key(tags::CONTENT_DATE, b"DA", V),
    key(tags::CONTENT_TIME, b"TM", V),
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::VERIFICATION_DATETIME, b"DT", C),
    key(tags::CONCEPT_NAME_CODE_SEQUENCE, b"SQ", V),
    key(tags::COMPLETION_FLAG, b"CS", V),
    key(tags::VERIFICATION_FLAG, b"CS", V),
];
const KEY_OBJECT_KEYS: &[Key] = &[
    key(tags::CONTENT_DATE, b"DA", V),
    key(tags::CONTENT_TIME, b"TM", V),
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::CONCEPT_NAME_CODE_SEQUENCE, b"SQ", V),
];
const PRESENTATION_KEYS: &[Key] = &[
    key(tags::REFERENCED_SERIES_SEQUENCE, b"SQ", V),
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::CONTENT_LABEL, b"CS", V),
    key(tags::CONTENT_DESCRIPTION, b"LO", P),
    key(tags::PRESENTATION_CREATION_DATE, b"DA", V),
    key(tags::PRESENTATION_CREATION_TIME, b"TM", V),
    key(tags::CONTENT_CREATOR_NAME, b"PN", P),
];
const ENCAP_DOC_KEYS: &[Key] = &[
    key(tags::CONTENT_DATE, b"DA", P),
    key(tags::CONTENT_TIME, b"TM", P),
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::CONCEPT_NAME_CODE_SEQUENCE, b"SQ", P),
    key(tags::HL7_INSTANCE_IDENTIFIER, b"ST", C),
    key(tags::DOCUMENT_TITLE, b"ST", P),
    key(tags::MIME_TYPE, b"LO", V),
];
const CONTENT_KEYS: &[Key] = &[
    key(tags::CONTENT_DATE, b"DA", V),
    key(tags::CONTENT_TIME, b"TM", V),
    key(tags::INSTANCE_NUMBER, b"IS", V),
];
const CONTENT_ID_KEYS: &[Key] = &[
    key(tags::CONTENT_DATE, b"DA", V),
    key(tags::CONTENT_TIME, b"TM", V),
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::CONTENT_LABEL, b"CS", V),
    key(tags::CONTENT_DESCRIPTION, b"LO", P),
    key(tags::CONTENT_CREATOR_NAME, b"PN", P),
];
const RT_DOSE_KEYS: &[Key] = &[
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::DOSE_SUMMATION_TYPE, b"CS", V),
];
const RT_STRUCTURE_KEYS: &[Key] = &[
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::STRUCTURE_SET_LABEL, b"SH", V),
    key(tags::STRUCTURE_SET_DATE, b"DA", P),
    key(tags::STRUCTURE_SET_TIME, b"TM", P),
];
const RT_PLAN_KEYS: &[Key] = &[
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::RT_PLAN_LABEL, b"SH", V),
    key(tags::RT_PLAN_DATE, b"DA", P),
    key(tags::RT_PLAN_TIME, b"TM", P),
];
const RT_TREAT_KEYS: &[Key] = &[
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::TREATMENT_DATE, b"DA", P),
    key(tags::TREATMENT_TIME, b"TM", P),
];
const SPECTROSCOPY_KEYS: &[Key] = &[
    key(tags::IMAGE_TYPE, b"CS", V),
    key(tags::CONTENT_DATE, b"DA", V),
    key(tags::CONTENT_TIME, b"TM", V),
    key(tags::INSTANCE_NUMBER, b"IS", V),
    key(tags::NUMBER_OF_FRAMES, b"IS", V),
    key(tags::ROWS, b"US", V),
    key(tags::COLUMNS, b"US", V),
];

/// The keys of every record type.
const ALL_KEYS: &[&[Key]] = &[
    PATIENT_KEYS,
    STUDY_KEYS,
    SERIES_KEYS,
    IMAGE_KEYS,
    SR_KEYS,
    KEY_OBJECT_KEYS,
    PRESENTATION_KEYS,
    ENCAP_DOC_KEYS,
    CONTENT_KEYS,
    CONTENT_ID_KEYS,
    RT_DOSE_KEYS,
    RT_STRUCTURE_KEYS,
    RT_PLAN_KEYS,
    RT_TREAT_KEYS,
    SPECTROSCOPY_KEYS,
];

/// Whether some directory record copies `tag` from an instance.
pub fn is_record_key(tag: u32) -> bool {
    ALL_KEYS
        .iter()
        .any(|keys| keys.iter().any(|k| k.tag == tag))
}

/// The directory record type of an instance and the keys it carries.
pub fn leaf_kind(sop_class_uid: &str) -> (&'static str, &'static [Key]) {
    let storage = sop_class_uid.strip_prefix("1.2.840.10008.5.1.4.1.1.");
    let Some(class) = storage else {
        return ("IMAGE", IMAGE_KEYS);
    };
    let family = class.split('.').next().unwrap_or("");
    match (family, class) {
        (_, "88.59") => ("KEY OBJECT DOC", KEY_OBJECT_KEYS),
        ("88", _) => ("SR DOCUMENT", SR_KEYS),
        ("11", _) => ("PRESENTATION", PRESENTATION_KEYS),
        ("104", _) => ("ENCAP DOC", ENCAP_DOC_KEYS),
        ("9", _) => ("WAVEFORM", CONTENT_KEYS),
        (_, "66") => ("RAW DATA", CONTENT_KEYS),
        (_, "66.1" | "66.3") => ("REGISTRATION", CONTENT_ID_KEYS),
        (_, "66.2") => ("FIDUCIAL", CONTENT_ID_KEYS),
        (_, "66.5") => ("SURFACE", CONTENT_ID_KEYS),
        (_, "67") => ("VALUE MAP", CONTENT_ID_KEYS),
        ("78", _) => ("MEASUREMENT", CONTENT_ID_KEYS),
        (_, "4.2") => ("SPECTROSCOPY", SPECTROSCOPY_KEYS),
        (_, "481.2") => ("RT DOSE", RT_DOSE_KEYS),
        (_, "481.3") => ("RT STRUCTURE SET", RT_STRUCTURE_KEYS),
        (_, "481.5" | "481.8") => ("RT PLAN", RT_PLAN_KEYS),
        (_, "481.4" | "481.6" | "481.7" | "481.9") => ("RT TREAT RECORD", RT_TREAT_KEYS),
        _ => ("IMAGE", IMAGE_KEYS),
    }
}

/// Builds a record's keys from an instance's top-level elements: values are copied byte
/// for byte (so names keep their character set), with the instance's Specific Character
/// Set when a copied text is not plain ASCII. A type 1 key the instance lacks gets
/// `stand_in(tag)` (or stays empty); the names of such keys are returned for the report.
/// Old ACR-NEMA dates and times (`1997.04.24`, `14:04:38`) are written in DICOM form.
pub fn keys_from(
    source: &[Element],
    syntax: Syntax,
    keys: &[Key],
    stand_in: &dyn Fn(u32) -> Option<String>,
) -> (Vec<Element>, Vec<&'static str>) {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let mut extended = false;
    for k in keys {
        let found = element::find(source, k.tag).map(|e| element::to_little_endian(e, syntax));
        let empty = found.as_ref().is_none_or(|e| match &e.value {
            Value::Bytes(b) => b.iter().all(|b| *b == b' ' || *b == 0),
            Value::Items(items) => items.is_empty(),
            Value::Fragments(_) => false,
        });
        if empty {
            match k.need {
                Need::IfAny => continue,
                Need::Present => {}
                Need::Value => missing.push(key_name(k.tag)),
            }
        }
        let stand_in = if empty && k.need == Need::Value {
            stand_in(k.tag)
        } else {
            None
        };
        let mut copy = match (stand_in, found) {
            (Some(value), _) => text_element(k.tag, &k.vr, value.as_bytes()),
            (None, Some(found)) => found,
            (None, None) => Element {
                tag: k.tag,
                vr: k.vr,
                offset: 0,
                value: if k.vr == *b"SQ" {
                    Value::Items(Vec::new())
                } else {
                    Value::Bytes(Vec::new())
                },
            },
        };
        if copy.vr != *b"SQ" {
            copy.vr = k.vr;
        }
        copy.offset = 0;
        if let Value::Bytes(bytes) = &mut copy.value {
            extended |= bytes.iter().any(|b| *b >= 0x80 || *b == 0x1B);
            match &k.vr {
                b"DA" => bytes.retain(|b| *b != b'.'),
                b"TM" => bytes.retain(|b| *b != b':'),
                _ => {}
            }
        }
        out.push(copy);
    }
    if extended && let Some(charset) = element::find(source, tags::SPECIFIC_CHARACTER_SET) {
        let mut charset = charset.clone();
        charset.vr = *b"CS";
        charset.offset = 0;
        out.push(charset);
    }
    (out, missing)
}

fn key_name(tag: u32) -> &'static str {
    match tag {
        tags::PATIENT_ID => "Patient ID",
        tags::STUDY_DATE => "Study Date",
        tags::STUDY_TIME => "Study Time",
        tags::STUDY_ID => "Study ID",
        tags::STUDY_INSTANCE_UID => "Study Instance UID",
        tags::MODALITY => "Modality",
        tags::SERIES_INSTANCE_UID => "Series Instance UID",
        tags::SERIES_NUMBER => "Series Number",
        tags::INSTANCE_NUMBER => "Instance Number",
        tags::CONTENT_DATE => "Content Date",
        tags::CONTENT_TIME => "Content Time",
        tags::CONCEPT_NAME_CODE_SEQUENCE => "Concept Name Code Sequence",
        tags::COMPLETION_FLAG => "Completion Flag",
        tags::VERIFICATION_FLAG => "Verification Flag",
        tags::CONTENT_LABEL => "Content Label",
        tags::MIME_TYPE => "MIME Type of Encapsulated Document",
        tags::REFERENCED_SERIES_SEQUENCE => "Referenced Series Sequence",
        _ => "a required key",
    }
}

/// A fresh UID under the UUID root 2.25 (PS3.5 B.2), for the DICOMDIR's own instance.
pub fn new_uid() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

fn ul(tag: u32, value: u32) -> Element {
    text_element(tag, b"UL", &value.to_le_bytes())
}

fn us(tag: u32, value: u16) -> Element {
    text_element(tag, b"US", &value.to_le_bytes())
}

/// Where the value of Offset of the Next Directory Record (0004,1400) is in an encoded
/// record: after the item header (8 bytes) and the element header (8 bytes), since it is
/// always the record's first element.
const NEXT_AT: usize = 16;
/// Where the value of Offset of Referenced Lower-Level Directory Entity (0004,1420) is:
/// after the next-record element (12 bytes) and Record In-use Flag (10 bytes).
const LOWER_AT: usize = 38;

/// A record encoded but not yet written: its offsets wait for the record after it.
struct Held {
    depth: usize,
    offset: u64,
    bytes: Vec<u8>,
}

/// Writes a DICOMDIR one record at a time, in file order (each record followed by its
/// lower-level records), so that a file set of any size is written without holding its
/// records in memory.
///
/// Each record is held until the next one arrives, which tells whether it has lower-level
/// records or a next sibling right after it. Only a record with lower-level records must
/// wait longer for its next sibling; those offsets (one per patient, study and series) are
/// written by [`Writer::finish`], which seeks back, as it does for the header's first and
/// last record offsets.
pub struct Writer<W: Write + Seek> {
    out: W,
    uid: String,
    file_set_id: String,
    sequence_start: u64,
    /// Offset of the next record (bytes written plus the held record).
    at: u64,
    held: Option<Held>,
    /// Per depth: where the next-record offset of a record with lower-level records is,
    /// until its next sibling arrives.
    open: Vec<Option<u64>>,
    /// Offsets learnt after their record was written: (position, value).
    patches: Vec<(u64, u32)>,
    roots: Option<(u64, u64)>,
}

impl<W: Write + Seek> Writer<W> {
    /// Starts a DICOMDIR with File-set ID `file_set_id` at the start of `out`.
    ///
    /// # Errors
    /// When `out` cannot be written.
    pub fn new(mut out: W, file_set_id: &str) -> io::Result<Writer<W>> {
        let uid = new_uid();
        let head = header(&uid, file_set_id, 0, 0, 0);
        out.write_all(&head)?;
        Ok(Writer {
            out,
            uid,
            file_set_id: file_set_id.to_owned(),
            sequence_start: head.len() as u64,
            at: head.len() as u64,
            held: None,
            open: Vec::new(),
            patches: Vec::new(),
            roots: None,
        })
    }

    /// Adds the record after the previous one: at `depth` 0 a root (PATIENT) record, one
    /// deeper than the previous record a lower-level record of it, otherwise a next
    /// sibling of the previous record at that depth. `elements` are its keys (any order).
    ///
    /// # Errors
    /// When a depth skips a level, when the DICOMDIR would exceed 4 GiB (offsets are 32
    /// bits), or when `out` cannot be written.
    pub fn record(&mut self, depth: usize, kind: &str, elements: Vec<Element>) -> io::Result<()> {
        let offset = self.at;
        let offset32 = u32::try_from(offset)
            .map_err(|_| io::Error::other("a DICOMDIR cannot exceed 4 GiB: split the file set"))?;
        let deepest = self.held.as_ref().map_or(0, |h| h.depth + 1);
        if depth > deepest {
            return Err(io::Error::other(format!(
                "DICOMDIR record at depth {depth} after one at depth {}",
                deepest.saturating_sub(1)
            )));
        }
        if let Some(mut held) = self.held.take() {
            if depth == held.depth + 1 {
                put_u32(&mut held.bytes, LOWER_AT, offset32);
                self.open.resize(held.depth + 1, None);
                self.open[held.depth] = Some(held.offset + NEXT_AT as u64);
            } else if depth == held.depth {
                put_u32(&mut held.bytes, NEXT_AT, offset32);
            }
            self.out.write_all(&held.bytes)?;
        }
        self.open.truncate(depth + 1);
        if let Some(pending) = self.open.get_mut(depth).and_then(Option::take) {
            self.patches.push((pending, offset32));
        }
        self.roots = match (depth, self.roots) {
            (0, None) => Some((offset, offset)),
            (0, Some((first, _))) => Some((first, offset)),
            (_, roots) => roots,
        };
        let bytes = encode_record(kind, elements);
        self.at += bytes.len() as u64;
        self.held = Some(Held {
            depth,
            offset,
            bytes,
        });
        Ok(())
    }

    /// Writes the last record and the offsets learnt late, and gives back the output.
    ///
    /// # Errors
    /// When `out` cannot be written or is larger than a DICOMDIR can be.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(held) = self.held.take() {
            self.out.write_all(&held.bytes)?;
        }
        for (position, value) in std::mem::take(&mut self.patches) {
            self.out.seek(SeekFrom::Start(position))?;
            self.out.write_all(&value.to_le_bytes())?;
        }
        let too_large = || io::Error::other("a DICOMDIR cannot exceed 4 GiB: split the file set");
        let (first, last) = self.roots.unwrap_or((0, 0));
        let head = header(
            &self.uid,
            &self.file_set_id,
            u32::try_from(first).map_err(|_| too_large())?,
            u32::try_from(last).map_err(|_| too_large())?,
            u32::try_from(self.at - self.sequence_start).map_err(|_| too_large())?,
        );
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&head)?;
        self.out.seek(SeekFrom::Start(self.at))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// A directory record item with zero offsets, in use, its keys sorted by tag.
fn encode_record(kind: &str, mut keys: Vec<Element>) -> Vec<u8> {
    keys.sort_by_key(|e| e.tag);
    let mut elements = vec![
        ul(tags::NEXT_RECORD, 0),
        us(tags::IN_USE, 0xFFFF),
        ul(tags::LOWER_LEVEL, 0),
        text_element(tags::RECORD_TYPE, b"CS", kind.as_bytes()),
    ];
    elements.extend(keys);
    let mut item = Vec::new();
    element::write_item(&mut item, &elements);
    item
}

/// Preamble, meta information and the dataset up to the first item of the record
/// sequence, whose byte length is `sequence_len`.
fn header(uid: &str, file_set_id: &str, first: u32, last: u32, sequence_len: u32) -> Vec<u8> {
    let mut meta = Vec::new();
    for e in [
        text_element(tags::FILE_META_INFORMATION_VERSION, b"OB", &[0, 1]),
        text_element(
            tags::MEDIA_STORAGE_SOP_CLASS_UID,
            b"UI",
            MEDIA_STORAGE_DIRECTORY_STORAGE.as_bytes(),
        ),
        text_element(tags::MEDIA_STORAGE_SOP_INSTANCE_UID, b"UI", uid.as_bytes()),
        text_element(
            tags::TRANSFER_SYNTAX_UID,
            b"UI",
            EXPLICIT_VR_LITTLE_ENDIAN.as_bytes(),
        ),
        text_element(
            tags::IMPLEMENTATION_CLASS_UID,
            b"UI",
            IMPLEMENTATION_CLASS_UID.as_bytes(),
        ),
        text_element(
            tags::IMPLEMENTATION_VERSION_NAME,
            b"SH",
            IMPLEMENTATION_VERSION.as_bytes(),
        ),
    ] {
        element::write(&mut meta, &e);
    }
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    element::write(
        &mut out,
        &ul(tags::FILE_META_INFORMATION_GROUP_LENGTH, meta.len() as u32),
    );
    out.extend_from_slice(&meta);
    for e in [
        text_element(tags::FILE_SET_ID, b"CS", file_set_id.as_bytes()),
        ul(tags::FIRST_RECORD, first),
        ul(tags::LAST_RECORD, last),
        us(tags::CONSISTENCY_FLAG, 0),
    ] {
        element::write(&mut out, &e);
    }
    out.extend_from_slice(&0x0004u16.to_le_bytes());
    out.extend_from_slice(&0x1220u16.to_le_bytes());
    out.extend_from_slice(b"SQ\0\0");
    out.extend_from_slice(&sequence_len.to_le_bytes());
    out
}

/// A directory record as read, with its place in the hierarchy.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    /// Offset of the record's item in the DICOMDIR.
    pub offset: u64,
    /// Directory Record Type (upper case, trimmed).
    pub kind: String,
    /// The record's elements.
    pub elements: Vec<Element>,
    /// Indices of the lower-level records in [`Dicomdir::records`].
    pub children: Vec<usize>,
}

impl ReadRecord {
    /// Text of a key, empty when absent.
    pub fn text(&self, tag: u32) -> String {
        element::text_of(&self.elements, tag)
    }
}

/// A DICOMDIR as read: records in the order of the hierarchy walk.
#[derive(Debug, Clone)]
pub struct Dicomdir {
    /// File-set ID.
    pub file_set_id: String,
    /// Every active record reached from the root.
    pub records: Vec<ReadRecord>,
    /// Indices of the root (top-level) records.
    pub roots: Vec<usize>,
    /// What the reader noticed but could work around (e.g. unlinked records).
    pub problems: Vec<String>,
}

/// Reads a DICOMDIR and walks its records by their offsets.
///
/// # Errors
/// [`DicomdirError`] when the file is not a DICOMDIR, is damaged, or an offset does not
/// point at a record.
pub fn read(path: &Path) -> Result<Dicomdir, DicomdirError> {
    let io = |source| DicomdirError::Io {
        path: path.to_owned(),
        source,
    };
    let not = |why: &str| DicomdirError::NotDicomdir {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let malformed = |source| DicomdirError::Malformed {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_DICOMDIR {
        return Err(not(
            "larger than any DICOMDIR this reader accepts (256 MiB)",
        ));
    }
    let mut reader = BufReader::new(file);
    let mut head = [0u8; 132];
    reader.read_exact(&mut head).map_err(|_| not("too short"))?;
    if &head[128..] != b"DICM" {
        return Err(not("no DICM prefix"));
    }
    let mut parser = Parser::new(reader, 132, size);
    let meta = parser
        .dataset(Syntax::ExplicitLittle, None, &|tag| tag >> 16 != 0x0002)
        .map_err(malformed)?;
    let syntax = match element::text_of(&meta, tags::TRANSFER_SYNTAX_UID).as_str() {
        EXPLICIT_VR_LITTLE_ENDIAN | "" => Syntax::ExplicitLittle,
        IMPLICIT_VR_LITTLE_ENDIAN => Syntax::ImplicitLittle,
        other => {
            return Err(not(&format!(
                "transfer syntax {other} (a DICOMDIR is Explicit VR Little Endian)"
            )));
        }
    };
    let dataset = parser
        .dataset(syntax, None, &|_| false)
        .map_err(malformed)?;
    let Some(Value::Items(items)) =
        element::find(&dataset, tags::DIRECTORY_RECORD_SEQUENCE).map(|e| &e.value)
    else {
        return Err(not("no Directory Record Sequence"));
    };
    let first = offset_value(&dataset, tags::FIRST_RECORD);
    let last = offset_value(&dataset, tags::LAST_RECORD);
    let mut walk = Walk {
        items,
        by_offset: items
            .iter()
            .enumerate()
            .map(|(i, item)| (item.offset, i))
            .collect(),
        visited: HashSet::new(),
        records: Vec::new(),
        last_root_offset: None,
    };
    let roots = if items.is_empty() {
        Vec::new()
    } else {
        walk.chain(first, "first record of the root directory", 0)?
    };
    if last != 0 && walk.last_root_offset.is_some_and(|l| l != last) {
        return Err(DicomdirError::BadOffset {
            offset: last,
            what: "last record of the root directory".into(),
        });
    }
    let mut problems = Vec::new();
    let unlinked = items.len() - walk.visited.len();
    if unlinked > 0 {
        problems.push(format!(
            "{unlinked} directory records are not linked from the root and were ignored"
        ));
    }
    Ok(Dicomdir {
        file_set_id: element::text_of(&dataset, tags::FILE_SET_ID),
        records: walk.records,
        roots,
        problems,
    })
}

fn offset_value(elements: &[Element], tag: u32) -> u64 {
    element::find(elements, tag)
        .and_then(Element::bytes)
        .and_then(|b| b.get(..4))
        .map_or(0, |b| {
            u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        })
}

struct Walk<'a> {
    items: &'a [Item],
    by_offset: HashMap<u64, usize>,
    visited: HashSet<usize>,
    records: Vec<ReadRecord>,
    last_root_offset: Option<u64>,
}

impl Walk<'_> {
    /// Follows a chain of "next record" offsets from `first`; returns the indices of the
    /// active records in `self.records`.
    fn chain(&mut self, first: u64, what: &str, depth: usize) -> Result<Vec<usize>, DicomdirError> {
        if depth > MAX_DEPTH {
            return Err(DicomdirError::BadOffset {
                offset: first,
                what: format!("{what}: records nest deeper than {MAX_DEPTH} levels"),
            });
        }
        let mut out = Vec::new();
        let mut offset = first;
        let mut what = what.to_owned();
        let mut last_offset = None;
        while offset != 0 {
            let bad = || DicomdirError::BadOffset {
                offset,
                what: what.clone(),
            };
            let index = *self.by_offset.get(&offset).ok_or_else(bad)?;
            if !self.visited.insert(index) {
                return Err(DicomdirError::BadOffset {
                    offset,
                    what: format!("{what}, which loops back to a record already read"),
                });
            }
            last_offset = Some(offset);
            let item = &self.items[index];
            let next = offset_value(&item.elements, tags::NEXT_RECORD);
            let lower = offset_value(&item.elements, tags::LOWER_LEVEL);
            let in_use = element::find(&item.elements, tags::IN_USE)
                .and_then(Element::bytes)
                .is_none_or(|b| b != [0, 0]);
            if in_use {
                let kind = element::text_of(&item.elements, tags::RECORD_TYPE).to_ascii_uppercase();
                let mine = self.records.len();
                self.records.push(ReadRecord {
                    offset,
                    kind: kind.clone(),
                    elements: item.elements.clone(),
                    children: Vec::new(),
                });
                if lower != 0 {
                    let children = self.chain(
                        lower,
                        &format!("lower-level record of the {kind} record at {offset}"),
                        depth + 1,
                    )?;
                    self.records[mine].children = children;
                }
                out.push(mine);
            }
            what = format!("next record after the record at {offset}");
            offset = next;
        }
        if depth == 0 {
            self.last_root_offset = last_offset;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(value: &str) -> Vec<Element> {
        vec![text_element(tags::PATIENT_ID, b"LO", value.as_bytes())]
    }

    /// Two patients, the first with two studies (one with two series), and records read
    /// back through their offsets in the order and nesting they were written.
    #[test]
    fn records_written_one_at_a_time_read_back_as_a_tree() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("DICOMDIR");
        let file = File::create(&path).expect("create");
        let mut writer = Writer::new(io::BufWriter::new(file), "TREE").expect("start");
        let layout: [(usize, &str, &str); 10] = [
            (0, "PATIENT", "P1"),
            (1, "STUDY", "P1S1"),
            (2, "SERIES", "P1S1E1"),
            (3, "IMAGE", "P1S1E1I1"),
            (3, "IMAGE", "P1S1E1I2"),
            (2, "SERIES", "P1S1E2"),
            (3, "IMAGE", "P1S1E2I1"),
            (1, "STUDY", "P1S2"),
            (0, "PATIENT", "P2"),
            (1, "STUDY", "P2S1"),
        ];
        for (depth, kind, name) in layout {
            writer.record(depth, kind, id(name)).expect("record");
        }
        assert!(writer.record(3, "IMAGE", id("skips a level")).is_err());
        writer.finish().expect("finish");

        let read = read(&path).expect("reads");
        assert!(read.problems.is_empty(), "{:?}", read.problems);
        assert_eq!(read.file_set_id, "TREE");
        fn walk(d: &Dicomdir, at: &[usize], depth: usize, out: &mut Vec<(usize, String, String)>) {
            for &i in at {
                let r = &d.records[i];
                out.push((depth, r.kind.clone(), r.text(tags::PATIENT_ID)));
                walk(d, &r.children, depth + 1, out);
            }
        }
        let mut walked = Vec::new();
        walk(&read, &read.roots, 0, &mut walked);
        let expected: Vec<(usize, String, String)> = layout
            .iter()
            .map(|(d, k, n)| (*d, (*k).to_owned(), (*n).to_owned()))
            .collect();
        assert_eq!(walked, expected);
    }
}
