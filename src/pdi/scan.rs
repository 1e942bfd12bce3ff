//! The first step of a build: find the input files, read each header and hash each file
//! on all cores, and hand the results over one at a time in input order.
//!
//! At most [`WINDOW`] files are scanned ahead of the one being handed over, so memory
//! holds a few headers whatever the number of inputs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};

use sha2::{Digest, Sha256};

use super::dicomdir;
use super::instance::{self, Instance, InstanceError};
use super::policy::{AiAction, AiPolicy};
use super::{PdiError, tags};

const HASH_BUFFER: usize = 256 * 1024;
/// Files scanned ahead of the one handed over.
const WINDOW: usize = 32;

/// Size, SHA-256 and CRC-32 of a file, from one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileHash {
    /// Bytes.
    pub size: u64,
    /// SHA-256 (hex in a record: a JSON array of 32 numbers would triple its size).
    #[serde(with = "crate::repository::api::hex32")]
    pub sha256: [u8; 32],
    /// CRC-32 (what a ZIP entry declares).
    pub crc: u32,
}

/// A [`FileHash`] recorded when its file was written, with what tells that very file apart
/// (inode and modification time): a file replaced since, even by one of the same size, is
/// hashed again rather than described by a hash that is no longer its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnownHash {
    /// The hash of the file as written.
    pub hash: FileHash,
    /// Its inode number.
    pub inode: u64,
    /// Its modification time (seconds and nanoseconds since the epoch).
    pub modified: (i64, i64),
}

impl KnownHash {
    /// The hash of the file `meta` describes (read after the last write).
    pub fn new(hash: FileHash, meta: &std::fs::Metadata) -> KnownHash {
        use std::os::unix::fs::MetadataExt;
        KnownHash {
            hash,
            inode: meta.ino(),
            modified: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    /// Whether the file `meta` describes is still the one hashed.
    pub fn holds_for(&self, meta: &std::fs::Metadata) -> bool {
        meta.len() == self.hash.size && KnownHash::new(self.hash, meta) == *self
    }
}

/// A [`FileHash`] computed over bytes as they go by, so that a file hashed while it is
/// written (the reception's spool) is not read again to be packed.
#[derive(Default)]
pub struct RunningHash {
    sha: Sha256,
    crc: crc32fast::Hasher,
    size: u64,
}

impl RunningHash {
    /// Takes the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.crc.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// The hash of every byte taken.
    pub fn finish(self) -> FileHash {
        FileHash {
            size: self.size,
            sha256: self.sha.finalize().into(),
            crc: self.crc.finalize(),
        }
    }
}

/// One DICOM input after scanning.
pub struct Scanned {
    /// The header, pruned to what the file set reads later ([`needed_after_scan`]).
    pub header: Instance,
    /// The file's hashes.
    pub hash: FileHash,
    /// What the AI support-image policy does with it, decided on the whole header.
    pub ai: Option<AiAction>,
}

/// Files and folders (walked in name order) into files; DICOMDIR files are left out. A
/// symbolic link named as an input is followed; one inside an input folder is refused,
/// so a walk never leaves the folders it was given (nor loops).
///
/// # Errors
/// [`PdiError::Io`] for an input that cannot be read, [`PdiError::Invalid`] for a link
/// inside an input folder.
pub fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, PdiError> {
    let is_dicomdir = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
    };
    let mut out = Vec::new();
    for input in inputs {
        for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(input).to_owned();
                PdiError::io(&path, e.into())
            })?;
            if entry.path_is_symlink() && entry.depth() > 0 {
                return Err(PdiError::Invalid(format!(
                    "{} is a symbolic link inside an input folder; links there are not \
                     followed: name the file or folder it points to as an input instead",
                    entry.path().display()
                )));
            }
            // A named link is followed: its kind is its target's.
            let folder = entry.file_type().is_dir() || (entry.depth() == 0 && input.is_dir());
            if !folder && !is_dicomdir(entry.path()) {
                out.push(entry.into_path());
            }
        }
    }
    Ok(out)
}

/// SHA-256, CRC-32 and size of a file in one read. The buffer is allocated per file on
/// purpose: one reused buffer made reading from the page cache measurably slower in
/// bench/pdi (twice the system time).
///
/// # Errors
/// When the file cannot be read.
pub fn hash_file(path: &Path) -> io::Result<FileHash> {
    let mut file = File::open(path)?;
    let mut hash = RunningHash::default();
    let mut buffer = vec![0u8; HASH_BUFFER];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
    }
    Ok(hash.finish())
}

/// The scan of one input: `Ok(None)` when it is not DICOM.
pub type ScanResult = Result<Option<Scanned>, PdiError>;

/// Scans `files` on all cores and calls `each` with every file and its result, in the
/// order of `files`. A file in `known` that is still the file hashed there
/// ([`KnownHash::holds_for`]) is not read past its header: its hash is taken from `known`.
/// The first error `each` returns stops the scan and is returned.
///
/// # Errors
/// What `each` returns.
pub fn scan(
    files: &[PathBuf],
    policy: &AiPolicy,
    known: &HashMap<PathBuf, KnownHash>,
    each: &mut dyn FnMut(&Path, ScanResult) -> Result<(), PdiError>,
) -> Result<(), PdiError> {
    let workers = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .min(files.len().max(1));
    let (job_tx, job_rx) = mpsc::channel::<usize>();
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, ScanResult)>();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            s.spawn(move || {
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(i) = job else { return };
                    if done_tx
                        .send((i, scan_guarded(&files[i], policy, known.get(&files[i]))))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let mut hand_over = || -> Result<(), PdiError> {
            let mut queued = 0;
            let mut early: HashMap<usize, ScanResult> = HashMap::new();
            for (next, path) in files.iter().enumerate() {
                while queued < files.len() && queued < next + WINDOW {
                    job_tx.send(queued).map_err(|_| stopped())?;
                    queued += 1;
                }
                let result = loop {
                    if let Some(result) = early.remove(&next) {
                        break result;
                    }
                    let (i, result) = done_rx.recv().map_err(|_| stopped())?;
                    early.insert(i, result);
                };
                each(path, result)?;
            }
            Ok(())
        };
        let outcome = hand_over();
        // Workers stop when the queue closes (at the end, or early on an error).
        drop(job_tx);
        outcome
    })
}

fn stopped() -> PdiError {
    PdiError::Invalid("a scan worker stopped unexpectedly; build again".into())
}

/// [`scan_one`], with a panic turned into an error for that file: the hand-over waits for
/// every file in order and would otherwise wait forever.
fn scan_guarded(path: &Path, policy: &AiPolicy, known: Option<&KnownHash>) -> ScanResult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scan_one(path, policy, known)
    }))
    .unwrap_or_else(|_| {
        Err(PdiError::Invalid(format!(
            "{}: reading this file failed unexpectedly; report it with the file",
            path.display()
        )))
    })
}

/// Reads and hashes one input (unless its hash is `known` and it is still that file),
/// decides what the AI-image policy does with it, then keeps only the header elements the
/// file set needs.
fn scan_one(path: &Path, policy: &AiPolicy, known: Option<&KnownHash>) -> ScanResult {
    let mut header = match instance::read(path) {
        Ok(header) => header,
        Err(InstanceError::NotDicom(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let unchanged = |known: &KnownHash| std::fs::metadata(path).is_ok_and(|m| known.holds_for(&m));
    let hash = match known {
        Some(known) if unchanged(known) => known.hash,
        _ => hash_file(path).map_err(|e| PdiError::io(path, e))?,
    };
    let ai = policy.decide(&header);
    header.retain(needed_after_scan);
    Ok(Some(Scanned { header, hash, ai }))
}

/// Where a missing date key is taken from, in order: Series, Acquisition, Content and
/// Study Date.
pub const DATE_STAND_INS: [u32; 4] = [
    tags::SERIES_DATE,
    tags::ACQUISITION_DATE,
    tags::CONTENT_DATE,
    tags::STUDY_DATE,
];
/// The same for a missing time key.
pub const TIME_STAND_INS: [u32; 4] = [
    tags::SERIES_TIME,
    tags::ACQUISITION_TIME,
    tags::CONTENT_TIME,
    tags::STUDY_TIME,
];

/// What a file set still reads of a scanned instance's header besides the record keys:
/// the character set, the stand-ins for missing dates and times, an SR's verification,
/// what orders the tree and what README.TXT shows.
const KEPT_BESIDES_KEYS: [u32; 10] = [
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_ID,
    tags::STUDY_DESCRIPTION,
    tags::SERIES_NUMBER,
    tags::SERIES_DESCRIPTION,
    tags::MODALITY,
    tags::INSTANCE_NUMBER,
    tags::VERIFICATION_FLAG,
    tags::VERIFYING_OBSERVER_SEQUENCE,
    tags::VERIFICATION_DATETIME,
];

/// Whether the build reads `tag` of an instance after scanning it.
pub fn needed_after_scan(tag: u32) -> bool {
    dicomdir::is_record_key(tag)
        || KEPT_BESIDES_KEYS.contains(&tag)
        || DATE_STAND_INS.contains(&tag)
        || TIME_STAND_INS.contains(&tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, count: usize) -> Vec<PathBuf> {
        (0..count)
            .map(|i| {
                let path = dir.join(format!("f{i:03}.txt"));
                std::fs::write(&path, vec![b'x'; i * 1000]).expect("write");
                path
            })
            .collect()
    }

    #[test]
    fn folders_are_walked_in_name_order_and_links_inside_them_are_not_followed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("study");
        std::fs::create_dir_all(input.join("b")).expect("folders");
        for name in ["b/2.dcm", "a.dcm", "DICOMDIR", "c.dcm"] {
            std::fs::write(input.join(name), b"x").expect("write");
        }
        let expanded = expand(std::slice::from_ref(&input)).expect("walks");
        let names: Vec<_> = expanded
            .iter()
            .map(|p| p.strip_prefix(&input).expect("inside"))
            .collect();
        assert_eq!(
            names,
            [Path::new("a.dcm"), Path::new("b/2.dcm"), Path::new("c.dcm")]
        );

        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("folder");
        std::fs::write(outside.join("secret.dcm"), b"x").expect("write");
        std::os::unix::fs::symlink(&outside, input.join("b/out")).expect("link");
        let err = expand(std::slice::from_ref(&input)).expect_err("a link inside is refused");
        assert!(
            err.to_string().contains("b/out is a symbolic link"),
            "{err}"
        );
        // A link named as an input is followed: the person chose it.
        let named = expand(&[input.join("b/out")]).expect("walks the named link");
        assert_eq!(named, [input.join("b/out/secret.dcm")]);
    }

    #[test]
    fn results_come_in_input_order_and_an_error_stops_the_scan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = files(dir.path(), 3 * WINDOW + 5);
        let mut seen = Vec::new();
        scan(
            &files,
            &AiPolicy::default(),
            &HashMap::new(),
            &mut |path, result| {
                assert!(matches!(result, Ok(None)), "not DICOM: skipped");
                seen.push(path.to_owned());
                Ok(())
            },
        )
        .expect("scans");
        assert_eq!(seen, files);

        let mut calls = 0;
        let error = scan(
            &files,
            &AiPolicy::default(),
            &HashMap::new(),
            &mut |_, _| {
                calls += 1;
                if calls == 10 {
                    return Err(PdiError::Invalid("stop here".into()));
                }
                Ok(())
            },
        )
        .expect_err("stops");
        assert_eq!((calls, error.to_string()), (10, "stop here".to_owned()));
    }
}
