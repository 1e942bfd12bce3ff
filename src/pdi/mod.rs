//! IHE PDI file sets: what travels between hospitals is what would have been on the disc.
//!
//! - [`build_zip`] / [`build_dir`]: DICOM Part 10 instances -> `DICOMDIR` (PATIENT ->
//!   STUDY -> SERIES -> IMAGE or the record type of the object), `DICOM/` with File IDs,
//!   `README.TXT`, `INDEX.HTM`, attachments in `ATTACH/`, and `CLOUDPDI/MANIFEST.JSON`
//!   (size, SHA-256 and UIDs of every file); as a streamed ZIP of stored entries or a
//!   folder. Files are read twice (hash, copy) and never held in memory.
//!   A build goes scan (headers, hashes, on all cores) -> catalog (each instance's record,
//!   on disk) -> layout (tree, File IDs) -> records (the DICOMDIR, one record at a time)
//!   -> manifest -> ZIP or folder, so memory does not grow with the study.
//! - [`FileSet`]: reads any set through its DICOMDIR (ours, DCMTK's, disc burners').
//! - [`verify`]: proves a set (folder or ZIP) whole; [`extract_zip`] unpacks a ZIP safely.
//! - [`policy`]: the AI support-image policy (include, exclude, label).
//!
//! Format details and the validation done with real tools: `docs/pdi.md`.

mod build;
mod catalog;
pub mod cli;
pub mod dicomdir;
pub mod element;
mod fileset;
pub mod instance;
pub mod layout;
pub mod manifest;
mod mark;
pub mod policy;
pub mod readme;
mod records;
mod scan;
pub mod tags;
pub mod zip;

use std::path::{Path, PathBuf};

pub use build::{BuildOptions, BuildReport, build_dir, build_zip};
pub use fileset::{FileSet, InstanceEntry, Summary, verify, verify_dir, verify_extracted};
pub use policy::{AiAction, AiPolicy, AiRule};
pub use scan::{FileHash, KnownHash, RunningHash, expand, hash_file};

/// Why a file set cannot be built, read or trusted. Messages name the file and the fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PdiError {
    /// A file or folder cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
    /// An input instance is unusable.
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    /// The DICOMDIR is damaged.
    #[error(transparent)]
    Dicomdir(#[from] dicomdir::DicomdirError),
    /// A ZIP cannot be written or was refused.
    #[error(transparent)]
    Zip(#[from] zip::ZipError),
    /// The AI support-image policy is invalid.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// The output folder already holds files.
    #[error("{0} is not empty: build into a new folder")]
    OutputNotEmpty(PathBuf),
    /// An input changed between hashing and copying.
    #[error("{0} changed while the file set was written; build again")]
    Changed(PathBuf),
    /// The inputs hold no DICOM instance, so there is nothing to hand over.
    #[error(
        "no DICOM instance in the {inputs} input(s) given ({skipped} file(s) skipped as not \
         DICOM): nothing to put in a file set; give the files or folders of the study"
    )]
    NoInstances {
        /// Files or folders given.
        inputs: usize,
        /// Files found that are not DICOM.
        skipped: usize,
    },
    /// An option is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The file set is not whole or not consistent.
    #[error("broken file set: {0}")]
    Broken(String),
}

impl PdiError {
    fn io(path: &Path, source: std::io::Error) -> PdiError {
        PdiError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Extracts a file-set ZIP into `dest` (which must not exist): names that would leave
/// `dest`, symbolic links, encrypted entries, declared sizes or CRCs that do not match the
/// data, and archives beyond [`zip::Limits::default`] are refused, and on any error `dest`
/// is removed again.
///
/// # Errors
/// [`PdiError::Zip`] naming the entry and the fault.
pub fn extract_zip(zip: &Path, dest: &Path) -> Result<(), PdiError> {
    zip::extract(zip, dest, zip::Limits::default())?;
    Ok(())
}
