//! The DICOMDIR of a build: one record per patient, study and series of the layout, taken
//! from the first instance of each, and one per instance, written one at a time from the
//! catalog; stand-in values for required keys an instance lacks.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use super::build::BuildReport;
use super::catalog::{Catalog, Entry};
use super::dicomdir::{self, Key, Writer};
use super::element::{self, Element};
use super::instance::Instance;
use super::layout::{self, Tree};
use super::readme::StudyLine;
use super::scan::{DATE_STAND_INS, TIME_STAND_INS};
use super::{PdiError, tags};

/// Writes the DICOMDIR of `tree` into the new file `path`; returns the study lines for
/// README.TXT and counts patients, studies and series (and notes stand-ins) in `report`.
///
/// # Errors
/// When the catalog cannot be read or the file written.
pub fn write(
    path: &Path,
    file_set_id: &str,
    tree: &Tree,
    catalog: &Catalog,
    report: &mut BuildReport,
) -> Result<Vec<StudyLine>, PdiError> {
    let io = |e| PdiError::io(path, e);
    let file = File::create_new(path).map_err(io)?;
    let mut writer = Writer::new(BufWriter::new(file), file_set_id).map_err(io)?;
    let mut lines = Vec::new();
    for (p, patient) in (0u32..).zip(&tree.patients) {
        let first = catalog.get(patient.first)?;
        let keys = record_keys(report, &first, "PATIENT", dicomdir::PATIENT_KEYS, &|_| {
            Some("UNKNOWN".into())
        });
        writer.record(0, "PATIENT", keys).map_err(io)?;
        for (s, study) in (0u32..).zip(&patient.members) {
            let first = catalog.get(study.first)?;
            let keys = record_keys(
                report,
                &first,
                "STUDY",
                dicomdir::STUDY_KEYS,
                &|tag| match tag {
                    tags::STUDY_ID => Some((s + 1).to_string()),
                    _ => stand_in(&first.header, tag),
                },
            );
            writer.record(1, "STUDY", keys).map_err(io)?;
            let mut line = StudyLine {
                date: first.header.text(tags::STUDY_DATE),
                description: first.header.text(tags::STUDY_DESCRIPTION),
                modalities: Vec::new(),
                series: study.members.len(),
                instances: 0,
            };
            for (e, series) in (0u32..).zip(&study.members) {
                let first = catalog.get(series.first)?;
                let keys =
                    record_keys(
                        report,
                        &first,
                        "SERIES",
                        dicomdir::SERIES_KEYS,
                        &|tag| match tag {
                            tags::SERIES_NUMBER => Some((e + 1).to_string()),
                            _ => stand_in(&first.header, tag),
                        },
                    );
                writer.record(2, "SERIES", keys).map_err(io)?;
                let modality = first.header.text(tags::MODALITY);
                if !line.modalities.contains(&modality) {
                    line.modalities.push(modality);
                }
                for (n, &i) in (0u32..).zip(&series.members) {
                    line.instances += 1;
                    let item = catalog.get(i)?;
                    let (kind, keys) = leaf(report, &item, [p, s, e, n]);
                    writer.record(3, kind, keys).map_err(io)?;
                }
            }
            lines.push(line);
        }
    }
    writer.finish().map_err(io)?;
    report.patients = tree.patients.len();
    report.studies = lines.len();
    report.series = tree
        .patients
        .iter()
        .flat_map(|p| &p.members)
        .map(|s| s.members.len())
        .sum();
    Ok(lines)
}

/// The keys of a record taken from `item`, noting in `report` which required ones were
/// missing (a stand-in value was written for them).
fn record_keys(
    report: &mut BuildReport,
    item: &Entry,
    level: &str,
    keys: &[Key],
    stand_in: &dyn Fn(u32) -> Option<String>,
) -> Vec<Element> {
    let h = &item.header;
    let (elements, missing) = dicomdir::keys_from(&h.elements, h.syntax, keys, stand_in);
    if !missing.is_empty() {
        report.warnings.push(format!(
            "{}: no {} for its {level} record (a stand-in value was written)",
            h.path.display(),
            missing.join(", ")
        ));
    }
    elements
}

/// The record of one instance at `position`: its kind, keys and references.
fn leaf(
    report: &mut BuildReport,
    item: &Entry,
    position: layout::Position,
) -> (&'static str, Vec<Element>) {
    let h = &item.header;
    let (kind, key_list) = dicomdir::leaf_kind(&h.sop_class_uid);
    let mut elements = record_keys(report, item, kind, key_list, &|tag| match tag {
        tags::INSTANCE_NUMBER => Some((position[3] + 1).to_string()),
        _ => stand_in(h, tag),
    });
    if kind == "SR DOCUMENT" {
        add_verification_datetime(&mut elements, h);
    }
    elements.extend([
        element::text_element(
            tags::REFERENCED_FILE_ID,
            b"CS",
            layout::file_id(position).join("\\").as_bytes(),
        ),
        element::text_element(
            tags::REFERENCED_SOP_CLASS,
            b"UI",
            h.sop_class_uid.as_bytes(),
        ),
        element::text_element(
            tags::REFERENCED_SOP_INSTANCE,
            b"UI",
            h.sop_instance_uid.as_bytes(),
        ),
        element::text_element(
            tags::REFERENCED_TRANSFER_SYNTAX,
            b"UI",
            h.transfer_syntax.as_bytes(),
        ),
    ]);
    (kind, elements)
}

/// A verified SR's record needs Verification DateTime (type 1C); documents keep it in
/// Verifying Observer Sequence, so the latest one is taken from there.
fn add_verification_datetime(elements: &mut Vec<Element>, instance: &Instance) {
    let verified = instance.text(tags::VERIFICATION_FLAG) == "VERIFIED";
    if !verified
        || elements
            .iter()
            .any(|e| e.tag == tags::VERIFICATION_DATETIME)
    {
        return;
    }
    let Some(element::Value::Items(observers)) = instance
        .element(tags::VERIFYING_OBSERVER_SEQUENCE)
        .map(|e| &e.value)
    else {
        return;
    };
    let latest = observers
        .iter()
        .map(|item| element::text_of(&item.elements, tags::VERIFICATION_DATETIME))
        .max();
    if let Some(latest) = latest.filter(|v| !v.is_empty()) {
        elements.push(element::text_element(
            tags::VERIFICATION_DATETIME,
            b"DT",
            latest.as_bytes(),
        ));
    }
}

/// A value for a type 1 key the instance lacks: a date or time from the instance's other
/// dates (series, acquisition, content, study), else a neutral constant.
fn stand_in(instance: &Instance, tag: u32) -> Option<String> {
    let first_of = |candidates: &[u32]| {
        candidates
            .iter()
            .map(|&t| instance.text(t))
            .find(|v| !v.is_empty())
    };
    match tag {
        tags::STUDY_DATE | tags::CONTENT_DATE | tags::PRESENTATION_CREATION_DATE => {
            Some(first_of(&DATE_STAND_INS).unwrap_or_else(|| "19000101".into()))
        }
        tags::STUDY_TIME | tags::CONTENT_TIME | tags::PRESENTATION_CREATION_TIME => {
            Some(first_of(&TIME_STAND_INS).unwrap_or_else(|| "000000".into()))
        }
        tags::PATIENT_ID => Some("UNKNOWN".into()),
        tags::MODALITY => Some("OT".into()),
        tags::COMPLETION_FLAG => Some("PARTIAL".into()),
        tags::VERIFICATION_FLAG => Some("UNVERIFIED".into()),
        tags::CONTENT_LABEL => Some("UNLABELLED".into()),
        _ => None,
    }
}
