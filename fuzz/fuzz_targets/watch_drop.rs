//! A file dropped into the watch folder (`watch::parse_drop`): token text over one or
//! more lines and an optional `patient-id:` line. The file is read as UTF-8 text, as the
//! watch does; the Patient ID it yields is trimmed and not empty.
#![no_main]

use cloudpdi::gateway::inbound::watch::parse_drop;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(drop) = parse_drop(text) {
        if let Some(id) = drop.patient_id {
            assert!(!id.is_empty() && id.trim() == id);
        }
    }
});
