//! Storage Commitment datasets as the SCP receives them (N-ACTION: `decode_request`) and
//! the SCU receives them (N-EVENT-REPORT: `decode_report`), in both encodings. What
//! decodes must survive our own encoder: re-encoded, it decodes to the same value.
#![no_main]

use cloudpdi::dicom::commitment::{
    Encoding, decode_report, decode_request, encode_report, encode_request,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for encoding in [Encoding::Implicit, Encoding::Explicit] {
        if let Ok(request) = decode_request(data, encoding) {
            let again = decode_request(&encode_request(&request, encoding), encoding)
                .expect("our own request decodes");
            assert_eq!(again, request);
        }
        if let Ok(report) = decode_report(data, encoding) {
            let again = decode_report(&encode_report(&report, encoding), encoding)
                .expect("our own report decodes");
            assert_eq!(again, report);
        }
    }
});
