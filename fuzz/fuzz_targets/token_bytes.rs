//! The token's binary envelope (`Token::from_bytes`), what the text and the QR code
//! carry. A token that decodes encodes to bytes that decode to the same token.
#![no_main]

use cloudpdi::token::Token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = Token::from_bytes(data) else {
        return;
    };
    let again = Token::from_bytes(&token.to_bytes()).expect("encoded token decodes");
    assert!(again == token, "encoded token decodes to the same token");
});
