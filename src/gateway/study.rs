//! What a study's files say about it, for the slip, the file names and `cloudpdi status`
//! of both pipelines (a batch's instances outbound, the received PDI inbound): the
//! patient's name (decoded with the Specific Character Set; Japanese names as the
//! ideographic form with its phonetic reading), Patient ID, Accession Number, study
//! dates, modalities and descriptions, read from the instances' headers.
//!
//! Best effort and bounded: a file that cannot be read adds nothing (the slip is still
//! made, with fewer details), every text is made printable and cut at
//! [`slip::MAX_FIELD_CHARS`](crate::token::slip::MAX_FIELD_CHARS), and at most
//! [`MAX_DISTINCT`] different values of a field are kept. Nothing here is logged: these
//! are patient data.

use std::path::PathBuf;

use dicom_encoding::text::{SpecificCharacterSet, TextCodec};

use crate::gateway::reception::batch::{StudySummary, clip};
use crate::pdi::element::{Element, text_of};
use crate::pdi::{self, instance, tags};
use crate::token::slip::printable;

/// Most different values of one field (dates, modalities, descriptions) kept for a
/// batch: a batch by patient may hold several studies, and a slip line has room for few.
pub const MAX_DISTINCT: usize = 4;

/// Longest part of a token or slip file name taken from the data (date, Patient ID,
/// Accession Number), in characters of `[A-Za-z0-9-]`.
pub const MAX_NAME_PART: usize = 16;

/// The study details of a batch, as printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StudyDetails {
    /// The patient's name as a clerk reads it, e.g. `山田 太郎 (やまだ たろう)`.
    pub patient_name: Option<String>,
    /// The first Patient ID found.
    pub patient_id: String,
    /// The first Accession Number found.
    pub accession: String,
    /// Study dates as `YYYYMMDD`, in the order found.
    pub study_dates: Vec<String>,
    /// Modalities, in the order found.
    pub modalities: Vec<String>,
    /// Study descriptions, in the order found.
    pub descriptions: Vec<String>,
}

impl StudyDetails {
    /// Reads the headers of `inputs` (files or folders, as [`pdi::expand`] takes them).
    pub fn gather(inputs: &[PathBuf]) -> StudyDetails {
        let mut details = StudyDetails::default();
        let Ok(files) = pdi::expand(inputs) else {
            return details;
        };
        for file in files {
            if let Ok(header) = instance::read(&file) {
                details.add(&header.elements);
            }
        }
        details
    }

    /// Adds one instance's top-level elements (public for the fuzz target: the text
    /// decoders read bytes from another hospital's files).
    pub fn add(&mut self, elements: &[Element]) {
        if self.patient_name.is_none() {
            self.patient_name = patient_name(elements).filter(|n| !n.is_empty());
        }
        let first = |field: &mut String, tag| {
            if field.is_empty() {
                *field = printable(&text_of(elements, tag));
            }
        };
        first(&mut self.patient_id, tags::PATIENT_ID);
        first(&mut self.accession, tags::ACCESSION_NUMBER);
        let date = text_of(elements, tags::STUDY_DATE);
        let date = if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) {
            date
        } else {
            String::new()
        };
        distinct(&mut self.study_dates, date);
        distinct(&mut self.modalities, text_of(elements, tags::MODALITY));
        let description = elements
            .iter()
            .find(|e| e.tag == tags::STUDY_DESCRIPTION)
            .and_then(Element::bytes)
            .map(|bytes| decode(bytes, &charsets(elements)))
            .unwrap_or_default();
        distinct(&mut self.descriptions, description);
    }

    /// What a job record keeps for `cloudpdi status` (the form reception keeps for a
    /// batch): first Patient ID, Accession Number and study date, the modalities.
    pub fn summary(&self) -> StudySummary {
        StudySummary {
            patient_id: clip(&self.patient_id),
            accession: clip(&self.accession),
            study_date: self.study_dates.first().cloned().unwrap_or_default(),
            modality: clip(&self.modalities.join("/")),
            study_uid: String::new(),
        }
    }

    /// Study dates as printed: `2026-11-20`, several separated by commas.
    pub fn study_date(&self) -> Option<String> {
        let dates: Vec<String> = self
            .study_dates
            .iter()
            .filter_map(|d| Some(format!("{}-{}-{}", d.get(..4)?, d.get(4..6)?, d.get(6..)?)))
            .collect();
        joined(&dates, ", ")
    }

    /// Modalities as printed: `CT, PT`.
    pub fn modality(&self) -> Option<String> {
        joined(&self.modalities, ", ")
    }

    /// Study descriptions as printed, several separated by ` / `.
    pub fn description(&self) -> Option<String> {
        joined(&self.descriptions, " / ")
    }

    /// The name of a job's token and slip files without extension, so that a clerk finds
    /// them: study date, Patient ID, Accession Number and the job's ID, e.g.
    /// `20261120_P12345_A998877_B000001`. Parts taken from the data keep only
    /// `[A-Za-z0-9-]` (so nothing can leave the token folder or hide a `_`) and at most
    /// [`MAX_NAME_PART`] characters; empty parts are left out; the job's ID (unique) is
    /// always last, so two jobs never share a name.
    pub fn file_stem(&self, job_id: &str) -> String {
        let part = |text: &str| -> String {
            text.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(MAX_NAME_PART)
                .collect()
        };
        let date = self.study_dates.first().map_or("", String::as_str);
        let mut parts: Vec<String> = [date, &self.patient_id, &self.accession]
            .into_iter()
            .map(part)
            .filter(|p| !p.is_empty())
            .collect();
        // The job ID is ours and unique: kept whole (only its safe characters), so two
        // names never collide.
        parts.push(
            job_id
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect(),
        );
        parts.join("_")
    }
}

/// Adds `value` (made printable) to `list` unless empty, already there, or the list is
/// full.
fn distinct(list: &mut Vec<String>, value: String) {
    let value = printable(&value);
    if !value.is_empty() && list.len() < MAX_DISTINCT && !list.contains(&value) {
        list.push(value);
    }
}

/// The values joined, made printable (cut to the slip's field length); `None` if none.
fn joined(values: &[String], separator: &str) -> Option<String> {
    let text = printable(&values.join(separator));
    (!text.is_empty()).then_some(text)
}

/// The Specific Character Set's values (the first may be empty: the default repertoire).
fn charsets(elements: &[Element]) -> Vec<String> {
    text_of(elements, tags::SPECIFIC_CHARACTER_SET)
        .split('\\')
        .map(|s| s.trim().to_owned())
        .collect()
}

/// The Patient's Name as a clerk reads it: the ideographic form with the phonetic one in
/// brackets (`山田 太郎 (やまだ たろう)`), else the alphabetic one (with the phonetic one
/// if any); components separated by spaces.
fn patient_name(elements: &[Element]) -> Option<String> {
    let bytes = elements
        .iter()
        .find(|e| e.tag == tags::PATIENT_NAME)
        .and_then(Element::bytes)?;
    let text = decode(bytes, &charsets(elements));
    let mut groups = text.splitn(3, '=').map(|group| {
        group
            .split('^')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let alphabetic = groups.next().unwrap_or_default();
    let ideographic = groups.next().unwrap_or_default();
    let phonetic = groups.next().unwrap_or_default();
    let main = if ideographic.is_empty() {
        alphabetic
    } else {
        ideographic
    };
    let name = match (main.is_empty(), phonetic.is_empty()) {
        (_, true) => main,
        (true, false) => phonetic,
        (false, false) => format!("{main} ({phonetic})"),
    };
    Some(printable(&name))
}

/// Text bytes decoded with the Specific Character Set: UTF-8 for `ISO_IR 192`; the ISO
/// 2022 Japanese repertoires (`ISO 2022 IR 87` kanji and kana after `ESC $ B`, `ISO 2022
/// IR 13` half-width katakana in the upper half) segment by segment; otherwise the
/// first named set, else the default repertoire. Undecodable bytes never fail: they
/// print as replacement characters.
fn decode(bytes: &[u8], charsets: &[String]) -> String {
    let bytes = trim_padding(bytes);
    let named = |code: &str| charsets.iter().any(|c| c == code);
    if named("ISO_IR 192") {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    if named("ISO 2022 IR 87") || named("ISO 2022 IR 13") || named("ISO 2022 IR 159") {
        return decode_iso2022_japanese(bytes);
    }
    let codec = charsets
        .iter()
        .find(|c| !c.is_empty())
        .and_then(|c| SpecificCharacterSet::from_code(c))
        .unwrap_or_default();
    codec
        .decode(bytes)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned())
}

fn trim_padding(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

const ESC: u8 = 0x1b;

/// What the bytes after an ISO 2022 escape sequence are.
#[derive(Clone, Copy)]
enum Segment {
    /// One byte a character: ASCII or JIS X 0201 roman, katakana in the upper half.
    Single,
    /// JIS X 0208, two bytes a character.
    Kanji,
    /// Another two-byte set (JIS X 0212, which we cannot decode).
    Unknown,
}

/// ISO 2022 text of the Japanese repertoires: segments after `ESC $ B` / `ESC $ @` are
/// JIS X 0208 (decoded as ISO-2022-JP); after other two-byte designations (JIS X 0212)
/// replacement characters; otherwise single bytes: ASCII (JIS X 0201 roman), and in the
/// upper half JIS X 0201 katakana (half-width).
fn decode_iso2022_japanese(bytes: &[u8]) -> String {
    let jis = SpecificCharacterSet::from_code("ISO 2022 IR 87").unwrap_or_default();
    let mut out = String::new();
    let mut rest = bytes;
    let mut mode = Segment::Single;
    loop {
        let end = rest.iter().position(|&b| b == ESC).unwrap_or(rest.len());
        let (segment, tail) = rest.split_at(end);
        match mode {
            Segment::Kanji => {
                let mut framed = vec![ESC, b'$', b'B'];
                framed.extend_from_slice(segment);
                framed.extend_from_slice(&[ESC, b'(', b'B']);
                match jis.decode(&framed) {
                    // The decoder writes an undecodable byte as `\ddd`.
                    Ok(text) if !text.contains('\\') => out.push_str(&text),
                    _ => out.extend(segment.chunks(2).map(|_| '\u{FFFD}')),
                }
            }
            Segment::Unknown => out.extend(segment.chunks(2).map(|_| '\u{FFFD}')),
            Segment::Single => out.extend(segment.iter().map(|&b| match b {
                0x00..=0x7f => char::from(b),
                0xa1..=0xdf => char::from_u32(0xff61 + u32::from(b - 0xa1)).unwrap_or('\u{FFFD}'),
                _ => '\u{FFFD}',
            })),
        }
        if tail.is_empty() {
            return out;
        }
        // An escape sequence: ESC, intermediate bytes (0x20-0x2F), a final byte.
        let length = tail
            .iter()
            .skip(1)
            .position(|b| !(0x20..=0x2f).contains(b))
            .map_or(tail.len(), |i| i + 2);
        mode = match &tail[..length] {
            [ESC, b'$', b'B'] | [ESC, b'$', b'@'] => Segment::Kanji,
            [ESC, b'$', ..] => Segment::Unknown,
            [ESC, b'(', ..] => Segment::Single,
            // A G1 designation (`ESC ) I`: katakana in the upper half) keeps G0 as it is.
            _ => mode,
        };
        rest = &tail[length..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdi::element::Value;

    fn element(tag: u32, bytes: &[u8]) -> Element {
        Element {
            tag,
            vr: *b"LO",
            offset: 0,
            value: Value::Bytes(bytes.to_vec()),
        }
    }

    fn study(charset: &str, name: &[u8]) -> StudyDetails {
        let mut details = StudyDetails::default();
        details.add(&[
            element(tags::SPECIFIC_CHARACTER_SET, charset.as_bytes()),
            element(tags::PATIENT_NAME, name),
            element(tags::PATIENT_ID, b"P12345/../x "),
            element(tags::ACCESSION_NUMBER, b"A998877"),
            element(tags::STUDY_DATE, b"20261120"),
            element(tags::MODALITY, b"CT"),
            element(tags::STUDY_DESCRIPTION, b"CT CHEST"),
        ]);
        details
    }

    #[test]
    fn japanese_names_read_as_ideographic_with_phonetic() {
        // pydicom's encoding of "Yamada^Tarou=山田^太郎=やまだ^たろう" in ISO 2022 IR 87.
        let iso2022 =
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";
        let name = study("\\ISO 2022 IR 87", iso2022).patient_name;
        assert_eq!(name.as_deref(), Some("山田 太郎 (やまだ たろう)"));
        let utf8 = "Yamada^Tarou=山田^太郎=やまだ^たろう".as_bytes();
        let name = study("ISO_IR 192", utf8).patient_name;
        assert_eq!(name.as_deref(), Some("山田 太郎 (やまだ たろう)"));
        // Half-width katakana (ISO 2022 IR 13) in the upper half: ﾔﾏﾀﾞ^ﾀﾛｳ.
        let kana = b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3";
        let name = study("ISO 2022 IR 13\\ISO 2022 IR 87", kana).patient_name;
        assert_eq!(name.as_deref(), Some("ﾔﾏﾀﾞ ﾀﾛｳ"));
        let latin = study("ISO_IR 100", b"M\xfcller^Anna ").patient_name;
        assert_eq!(latin.as_deref(), Some("Müller Anna"));
    }

    #[test]
    fn hostile_bytes_decode_to_bounded_printable_text() {
        let mut hostile = b"\x1b$B\xff\xfe\x1b(B\r\n<script>\x1b$".to_vec();
        hostile.extend(std::iter::repeat_n(b'A', 500));
        let name = study("\\ISO 2022 IR 87", &hostile)
            .patient_name
            .expect("a name");
        assert!(name.chars().count() <= crate::token::slip::MAX_FIELD_CHARS);
        assert!(!name.chars().any(char::is_control), "{name:?}");
    }

    #[test]
    fn file_names_hold_date_patient_accession_and_the_job() {
        let details = study("", b"X");
        assert_eq!(
            details.file_stem("B000001"),
            "20261120_P12345x_A998877_B000001"
        );
        assert_eq!(StudyDetails::default().file_stem("B000002"), "B000002");
        let mut long = details.clone();
        long.patient_id = "_".repeat(10) + &"9".repeat(100);
        let stem = long.file_stem("B000003");
        assert_eq!(stem, format!("20261120_{}_A998877_B000003", "9".repeat(16)));
    }

    #[test]
    fn distinct_values_are_bounded() {
        let mut details = study("", b"X");
        for modality in ["PT", "CT", "SR", "PR", "KO", "SEG"] {
            details.add(&[element(tags::MODALITY, modality.as_bytes())]);
        }
        assert_eq!(details.modality().as_deref(), Some("CT, PT, SR, PR"));
        assert_eq!(details.study_date().as_deref(), Some("2026-11-20"));
        assert_eq!(details.description().as_deref(), Some("CT CHEST"));
    }
}
