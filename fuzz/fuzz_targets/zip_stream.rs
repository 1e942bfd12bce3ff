//! The front-to-back ZIP reader (`pdi::zip::read_stream`) that the receiver runs on a
//! PDI while its container is still downloading: any bytes, small limits. Every entry
//! handed over has a checked name and at most its declared size of data; the counts it
//! reports stay within the limits and match what was handed over; an archive the writer
//! made is read back exactly.
#![no_main]

use std::io::Read;

use cloudpdi::pdi::zip::{Limits, StreamEntry, ZipError, ZipWriter, check_name, read_stream};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_entries: 64,
    max_total_bytes: 1 << 20,
};

/// Reads `bytes`, checking every entry; returns the entries with their data.
fn read(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ZipError> {
    let mut seen = Vec::new();
    let mut total = 0u64;
    let counts = read_stream(bytes, LIMITS, |entry: &StreamEntry, data: &mut dyn Read| {
        assert!(check_name(entry.name.trim_end_matches('/')).is_ok(), "{}", entry.name);
        let mut held = Vec::new();
        let read = data
            .take(LIMITS.max_total_bytes + 1)
            .read_to_end(&mut held);
        assert!(held.len() as u64 <= entry.size, "more than declared");
        if read.is_ok() {
            assert_eq!(held.len() as u64, entry.size, "less than declared, no error");
        }
        read.map_err(|e| ZipError::Io(std::io::Error::other(e.to_string())))?;
        total += entry.size;
        seen.push((entry.name.clone(), held));
        Ok::<(), ZipError>(())
    })?;
    assert!(counts.files <= LIMITS.max_entries);
    assert!(counts.bytes <= LIMITS.max_total_bytes);
    assert_eq!(counts.bytes, total);
    Ok(seen)
}

fuzz_target!(|data: &[u8]| {
    let _ = read(data);
    // The input cut into entries, written and read back exactly.
    let entries: Vec<(String, &[u8])> = data
        .chunks(97)
        .take(16)
        .enumerate()
        .map(|(i, chunk)| (format!("DICOM/I{i}"), chunk))
        .collect();
    let mut zip = ZipWriter::new(Vec::new(), 0);
    for (name, bytes) in &entries {
        zip.add_bytes(name, bytes).expect("write");
    }
    let archive = zip.finish().expect("finish");
    let back = read(&archive).expect("our own archive reads back");
    let expected: Vec<(String, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.clone(), b.to_vec()))
        .collect();
    assert_eq!(back, expected);
});
