//! The DICOMDIR reader (`pdi::dicomdir::read`) that opens a received file set: the input
//! is written as a DICOMDIR file and read; the records it returns must form a tree of
//! valid indices. The read runs on a thread with the stack of a tokio blocking thread,
//! as in the daemon's Unpack step.
#![no_main]

mod blocking;
mod scratch;

use std::path::PathBuf;
use std::sync::LazyLock;

use cloudpdi::pdi::dicomdir;
use libfuzzer_sys::fuzz_target;

static PATH: LazyLock<PathBuf> = LazyLock::new(|| scratch::scratch("dicomdir").join("DICOMDIR"));

fuzz_target!(|data: &[u8]| {
    std::fs::write(&*PATH, data).expect("scratch file");
    let Ok(read) = blocking::on_blocking_thread(|| dicomdir::read(&PATH)) else {
        return;
    };
    let count = read.records.len();
    assert!(read.roots.iter().all(|&i| i < count));
    let mut parents = vec![0usize; count];
    for record in &read.records {
        for &child in &record.children {
            assert!(child < count, "child index in range");
            parents[child] += 1;
        }
    }
    assert!(
        parents.iter().all(|&p| p <= 1),
        "every record has at most one parent"
    );
});
