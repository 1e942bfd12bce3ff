//! The repository client's `Content-Range` parsing (`repository::client::
//! parse_content_range`), any bytes a (hostile) repository answers with.
#![no_main]

use cloudpdi::repository::client::parse_content_range;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((start, total)) = parse_content_range(value) {
        assert!(value.contains(&total.to_string()));
        assert!(value.contains(&start.to_string()));
    }
});
