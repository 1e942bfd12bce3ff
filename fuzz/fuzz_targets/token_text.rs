//! Token text as typed, scanned or dropped (`token::text::decode_symbols`,
//! `Token::from_text`). A token that parses prints back to text (and to the QR code's
//! text) that parses to the same token.
#![no_main]

use cloudpdi::token::Token;
use cloudpdi::token::text::decode_symbols;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = decode_symbols(text);
    let Ok(token) = Token::from_text(text) else {
        return;
    };
    let again = Token::from_text(&token.to_text()).expect("printed token parses");
    assert!(again == token, "printed token parses to the same token");
    let scanned = Token::from_text(&token.to_qr_text()).expect("QR text parses");
    assert!(scanned == token, "QR text parses to the same token");
});
