//! DICOM Upper Layer PDUs as the SCP reads them from any LAN peer before a calling AE is
//! known (`dicom_ul::read_pdu`, the reader behind cloudpdi's server association), with
//! the default `dicom.max_pdu_length` in strict mode (as the SCP) and lenient mode (as
//! the SCU). A PDU that reads back must be writable again.
#![no_main]

use dicom_ul::{read_pdu, write_pdu};
use libfuzzer_sys::fuzz_target;

/// `dicom.max_pdu_length`'s default (src/config.rs).
const MAX_PDU_LENGTH: u32 = 131_072;

fuzz_target!(|data: &[u8]| {
    for strict in [true, false] {
        if let Ok(Some(pdu)) = read_pdu(data, MAX_PDU_LENGTH, strict) {
            let mut out = Vec::new();
            let _ = write_pdu(&mut out, &pdu);
        }
    }
});
