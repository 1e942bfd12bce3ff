//! The repository API's JSON bodies (`repository::api`), as the server reads them from
//! any client (`NewDocument`, `Receipt`, `Complete`, `Extend`) and the client reads them from a
//! possibly hostile repository (`Created`, `DocumentStatus`, `ErrorBody`, and for sealed
//! delivery the mailbox list `Vec<MessageInfo>`, `FacilityEntry`, `Posted`), and the hex
//! of proofs and checksums (`api::hex32::parse`). What parses serializes to JSON that
//! parses to the same value.
//!
//! Input: one byte choosing the type, then the JSON text.
#![no_main]

use cloudpdi::repository::api::{
    Complete, Created, DocumentStatus, ErrorBody, Extend, FacilityEntry, MessageInfo,
    NewDocument, Posted, Receipt, hex32,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses `json` as `T`; what parses must survive serializing and parsing again.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(json: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(json) {
        let text = serde_json::to_vec(&value).expect("serializes");
        let again: T = serde_json::from_slice(&text).expect("reads back");
        assert_eq!(again, value);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    match selector % 11 {
        0 => round_trip::<NewDocument>(json),
        1 => round_trip::<Receipt>(json),
        2 => round_trip::<Complete>(json),
        3 => round_trip::<Created>(json),
        4 => round_trip::<DocumentStatus>(json),
        5 => round_trip::<ErrorBody>(json),
        6 => round_trip::<Extend>(json),
        7 => round_trip::<Vec<MessageInfo>>(json),
        8 => round_trip::<FacilityEntry>(json),
        9 => round_trip::<Posted>(json),
        _ => {
            if let Some(bytes) = std::str::from_utf8(json).ok().and_then(hex32::parse) {
                assert_eq!(hex32::parse(&hex_lower(&bytes)), Some(bytes));
            }
        }
    }
});

fn hex_lower(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
