//! The 48-byte container header (`container::Header::decode`), the first thing the
//! receiving side reads from a downloaded document. A header that decodes encodes back
//! to the same bytes (it is authenticated as AAD: there is only one spelling).
#![no_main]

use cloudpdi::container::Header;
use cloudpdi::container::header::HEADER_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..HEADER_LEN) else {
        return;
    };
    let bytes: &[u8; HEADER_LEN] = bytes.try_into().expect("HEADER_LEN bytes");
    if let Ok(header) = Header::decode(bytes) {
        assert_eq!(&header.encode(), bytes);
        assert!(header.chunk_size() >= 1 << 16 && header.chunk_size() <= 1 << 24);
    }
});
