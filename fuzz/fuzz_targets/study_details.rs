//! What a study's files say for the slip, the file names and the status
//! (`gateway::study::StudyDetails`): the patient's name decoded with the Specific
//! Character Set (ISO 2022 Japanese escapes included), Patient ID, accession, dates,
//! modalities and descriptions, all from another hospital's bytes. Whatever they hold,
//! every field is printable and bounded, and a file name stays inside its folder.
//!
//! Input: the dataset bytes (Explicit VR Little Endian), parsed as the daemon parses an
//! instance's header.
#![no_main]

mod blocking;

use cloudpdi::gateway::study::StudyDetails;
use cloudpdi::pdi::element::{Parser, Syntax};
use cloudpdi::token::slip::MAX_FIELD_CHARS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| blocking::on_blocking_thread(|| check(data)));

fn check(data: &[u8]) {
    let mut parser = Parser::new(data, 0, data.len() as u64);
    let Ok(elements) = parser.dataset(Syntax::ExplicitLittle, None, &|_| false) else {
        return;
    };
    let mut details = StudyDetails::default();
    details.add(&elements);
    details.add(&elements);
    let printed = [
        details.patient_name.clone(),
        Some(details.patient_id.clone()),
        Some(details.accession.clone()),
        details.study_date(),
        details.modality(),
        details.description(),
    ];
    for field in printed.into_iter().flatten() {
        assert!(!field.chars().any(char::is_control), "{field:?}");
    }
    for single in [&details.patient_id, &details.accession] {
        assert!(single.chars().count() <= MAX_FIELD_CHARS, "{single:?}");
    }
    if let Some(name) = &details.patient_name {
        assert!(name.chars().count() <= MAX_FIELD_CHARS, "{name:?}");
    }
    let stem = details.file_stem("B000001");
    assert!(stem.ends_with("B000001"), "{stem}");
    assert!(
        stem.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{stem}"
    );
    let summary = details.summary();
    assert!(summary.patient_id.chars().count() <= 64);
}
