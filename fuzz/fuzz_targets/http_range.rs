//! The repository server's `Range` header parsing (`repository::server::
//! parse_range_value`), any bytes a client sends.
#![no_main]

use cloudpdi::repository::server::parse_range_value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((start, end)) = parse_range_value(value) {
        assert!(value.contains(&start.to_string()));
        if let Some(end) = end {
            assert!(value.contains(&end.to_string()));
        }
    }
});
