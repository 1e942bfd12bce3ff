//! What the file set needs to know about one DICOM Part 10 instance, read from its header
//! only: the file is read up to its pixel data, never further.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::element::{self, Element, ElementError, Parser, Syntax, text_of};
use super::tags;

/// Header bytes read at most from one instance (sequences before the pixel data included);
/// the SCP refuses at reception what would exceed it.
pub use crate::dicom::depth::HEADER_BUDGET;

/// Why a file is not a usable DICOM instance.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Not a DICOM Part 10 file (no `DICM` prefix after the preamble).
    #[error("{0}: not a DICOM Part 10 file")]
    NotDicom(PathBuf),
    /// A DICOM file whose header cannot be read.
    #[error("{path}: {source}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        source: ElementError,
    },
    /// A DICOM file without an identifier the file set needs.
    #[error("{path}: no {what} (required to place it in a DICOMDIR)")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The missing attribute.
        what: &'static str,
    },
}

/// The header of one instance: its meta information and top-level dataset elements up to
/// the pixel data, as raw bytes.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Where the file is.
    pub path: PathBuf,
    /// Transfer Syntax UID from the meta header.
    pub transfer_syntax: String,
    /// SOP Class UID (dataset, else Media Storage SOP Class UID).
    pub sop_class_uid: String,
    /// SOP Instance UID (dataset, else Media Storage SOP Instance UID).
    pub sop_instance_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// Top-level dataset elements before the pixel data.
    pub elements: Vec<Element>,
    /// How the dataset is encoded (deflate already undone).
    pub syntax: Syntax,
    /// Whether the dataset is deflated (its bytes cannot be edited in place).
    pub deflated: bool,
}

impl Instance {
    /// Keeps only the elements whose tag `keep` accepts. Once an instance is scanned its
    /// record keys are all a file set needs of its header, and a study of thousands of
    /// instances should not hold every header whole until the DICOMDIR is written.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.elements.retain(|e| keep(e.tag));
        self.elements.shrink_to_fit();
    }

    /// Text of a top-level element (trimmed), empty when absent.
    pub fn text(&self, tag: u32) -> String {
        text_of(&self.elements, tag)
    }

    /// A top-level element.
    pub fn element(&self, tag: u32) -> Option<&Element> {
        element::find(&self.elements, tag)
    }
}

/// Quick check: does the file start like a DICOM Part 10 file?
pub fn is_part10(path: &Path) -> bool {
    let mut head = [0u8; 132];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head[128..] == b"DICM")
}

/// Reads the header of a Part 10 file, stopping before the pixel data.
///
/// # Errors
/// [`InstanceError::NotDicom`] for other files, [`InstanceError::Malformed`] for a damaged
/// header, [`InstanceError::Missing`] when a UID the file set needs is absent.
pub fn read(path: &Path) -> Result<Instance, InstanceError> {
    let malformed = |source: ElementError| InstanceError::Malformed {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|e| malformed(e.into()))?;
    let mut reader = BufReader::with_capacity(16 * 1024, file);
    let mut head = [0u8; 132];
    if reader.read_exact(&mut head).is_err() || &head[128..] != b"DICM" {
        return Err(InstanceError::NotDicom(path.to_owned()));
    }
    let mut parser = Parser::new(reader, 132, HEADER_BUDGET);
    let meta = parser
        .dataset(Syntax::ExplicitLittle, None, &|tag| tag >> 16 != 0x0002)
        .map_err(malformed)?;
    let transfer_syntax = text_of(&meta, tags::TRANSFER_SYNTAX_UID);
    if transfer_syntax.is_empty() {
        return Err(InstanceError::Missing {
            path: path.to_owned(),
            what: "Transfer Syntax UID in the file meta information",
        });
    }
    // Group 7FE0 (pixel data of every kind, offset tables) and what follows are not header.
    let stop = |tag: u32| tag >= crate::dicom::depth::HEADER_END;
    let deflated = crate::dicom::depth::Encoding::of(&transfer_syntax).is_some_and(|e| e.deflated);
    let elements = if deflated {
        let position = parser.position();
        let rest = parser.into_rest();
        let mut inflated = Parser::new(
            flate2::read::DeflateDecoder::new(rest),
            position,
            HEADER_BUDGET,
        );
        inflated.dataset(Syntax::ExplicitLittle, None, &stop)
    } else {
        parser.dataset(Syntax::of(&transfer_syntax), None, &stop)
    }
    .map_err(malformed)?;
    let pick = |tag: u32, meta_tag: u32| {
        let own = text_of(&elements, tag);
        if own.is_empty() {
            text_of(&meta, meta_tag)
        } else {
            own
        }
    };
    let instance = Instance {
        path: path.to_owned(),
        sop_class_uid: pick(tags::SOP_CLASS_UID, tags::MEDIA_STORAGE_SOP_CLASS_UID),
        sop_instance_uid: pick(tags::SOP_INSTANCE_UID, tags::MEDIA_STORAGE_SOP_INSTANCE_UID),
        study_uid: text_of(&elements, tags::STUDY_INSTANCE_UID),
        series_uid: text_of(&elements, tags::SERIES_INSTANCE_UID),
        syntax: if deflated {
            Syntax::ExplicitLittle
        } else {
            Syntax::of(&transfer_syntax)
        },
        transfer_syntax,
        elements,
        deflated,
    };
    for (value, what) in [
        (&instance.sop_class_uid, "SOP Class UID"),
        (&instance.sop_instance_uid, "SOP Instance UID"),
        (&instance.study_uid, "Study Instance UID"),
        (&instance.series_uid, "Series Instance UID"),
    ] {
        if value.is_empty() {
            return Err(InstanceError::Missing {
                path: path.to_owned(),
                what,
            });
        }
    }
    Ok(instance)
}
