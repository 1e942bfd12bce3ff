//! DIMSE command sets as the SCP receives them (request) and the SCU receives them
//! (response): `Command::decode`, `Response::decode`. What decodes must survive our own
//! encoders: the SCP's answer to a decoded request decodes as that answer, and a C-STORE
//! request re-encoded from its fields decodes to the same fields.
#![no_main]

use cloudpdi::dicom::dimse::{Command, Response, field, status, store_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Response::decode(data);
    let Ok(command) = Command::decode(data) else {
        return;
    };
    let _ = command.to_string();
    // The SCP puts data-derived text into Error Comments: use the input's bytes too.
    let comment = String::from_utf8_lossy(&data[..data.len().min(100)]);
    let answer = command.response(status::CANNOT_UNDERSTAND, Some(&comment));
    let response = Response::decode(&answer).expect("the SCP's own answer decodes");
    assert_eq!(response.responding_to, command.message_id);
    assert_eq!(response.status, status::CANNOT_UNDERSTAND);
    assert_eq!(response.field, field::response_to(command.field));
    assert!(response.error_comment.len() <= 64, "Error Comment is LO");

    let request = store_request(
        command.message_id,
        &command.sop_class_uid,
        &command.sop_instance_uid,
    );
    let again = Command::decode(&request).expect("our own C-STORE-RQ decodes");
    assert_eq!(again.message_id, command.message_id);
    assert_eq!(again.sop_class_uid, command.sop_class_uid);
    assert_eq!(again.sop_instance_uid, command.sop_instance_uid);
    assert!(again.has_data_set);
});
