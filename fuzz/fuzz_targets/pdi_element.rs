//! The PDI element parser (`pdi::element::Parser`), which reads received instances and
//! DICOMDIRs on the receiving side and every instance when a PDI is packed. Whatever it
//! reads must be writable as Explicit VR Little Endian (the DICOMDIR writer copies keys
//! this way) and read back to the same top-level elements.
//!
//! Runs on a thread with the stack of a tokio blocking thread, as in the daemon.
//!
//! Input: one byte choosing the dataset encoding, then the dataset bytes.
#![no_main]

mod blocking;

use cloudpdi::pdi::element::{Parser, Syntax, to_little_endian, write};
use libfuzzer_sys::fuzz_target;

const SYNTAXES: [Syntax; 3] = [
    Syntax::ImplicitLittle,
    Syntax::ExplicitLittle,
    Syntax::ExplicitBig,
];

fuzz_target!(|data: &[u8]| blocking::on_blocking_thread(|| check(data)));

fn check(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let syntax = SYNTAXES[usize::from(selector) % SYNTAXES.len()];
    let mut parser = Parser::new(bytes, 0, bytes.len() as u64);
    let Ok(elements) = parser.dataset(syntax, None, &|_| false) else {
        return;
    };
    assert!(parser.position() <= bytes.len() as u64);
    for element in &elements {
        let _ = element.text();
    }
    let mut out = Vec::new();
    for element in &elements {
        write(&mut out, &to_little_endian(element, syntax));
    }
    let again = Parser::new(out.as_slice(), 0, out.len() as u64)
        .dataset(Syntax::ExplicitLittle, None, &|_| false)
        .expect("what the writer wrote reads back");
    let tags =
        |list: &[cloudpdi::pdi::element::Element]| list.iter().map(|e| e.tag).collect::<Vec<_>>();
    assert_eq!(tags(&again), tags(&elements));
}
