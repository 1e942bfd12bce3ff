//! The ZIP reader and extractor (`pdi::zip::extract`) that unpacks a received PDI: the
//! input is written as a ZIP file and extracted into a folder with small limits. On
//! error the folder must be gone; on success it must hold only plain files and folders
//! within the limits.
#![no_main]

mod scratch;

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use cloudpdi::pdi::zip::{Limits, extract};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_entries: 64,
    max_total_bytes: 1 << 20,
};

static DIR: LazyLock<PathBuf> = LazyLock::new(|| scratch::scratch("zip"));

/// Bytes of the plain files under `dir`; panics on anything but files and folders.
fn plain_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("extracted folder") {
        let path = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        if meta.is_dir() {
            total += plain_bytes(&path);
        } else {
            assert!(meta.is_file(), "{} is not a plain file", path.display());
            total += meta.len();
        }
    }
    total
}

fuzz_target!(|data: &[u8]| {
    let zip = DIR.join("in.zip");
    let dest = DIR.join("out");
    std::fs::write(&zip, data).expect("scratch file");
    match extract(&zip, &dest, LIMITS) {
        Ok(extracted) => {
            assert!(extracted.files <= LIMITS.max_entries);
            assert!(extracted.bytes <= LIMITS.max_total_bytes);
            assert_eq!(plain_bytes(&dest), extracted.bytes);
            std::fs::remove_dir_all(&dest).expect("clean up");
        }
        Err(_) => assert!(!dest.exists(), "a refused archive leaves nothing behind"),
    }
});
