//! Marking an AI support image in its own data: a copy of the instance whose Series
//! Description starts with the label, for viewers that show nothing of README.TXT.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::element::{self, Syntax};
use super::instance::{self, Instance, InstanceError};
use super::scan::{FileHash, hash_file, needed_after_scan};
use super::{PdiError, tags};

/// The prefix written into a marked Series Description (LO: at most 64 characters).
const SERIES_MARK: &str = "[AI support, not a diagnosis] ";

/// What marking an instance gave.
pub enum Marked {
    /// The Series Description already starts with the label: the original travels.
    Already,
    /// The marked copy, to travel instead of the original.
    Copied {
        /// Its pruned header (its path is the copy).
        header: Box<Instance>,
        /// Its hashes.
        hash: FileHash,
    },
    /// The file cannot be edited in place (deflated, with group lengths, or a non-ASCII
    /// description): the label is given in README.TXT, INDEX.HTM and the manifest only.
    NotEditable,
}

/// Rewrites a labelled instance with its Series Description prefixed by the label, into
/// the folder `scratch`.
///
/// # Errors
/// When the instance cannot be read again or the copy cannot be written.
pub fn mark(source: &Path, scratch: &Path) -> Result<Marked, PdiError> {
    // The scan kept only the record keys; editing needs every element's offset.
    let h = &instance::read(source)?;
    if h.deflated || h.element(0x0008_0000).is_some() {
        return Ok(Marked::NotEditable);
    }
    let old = h.text(tags::SERIES_DESCRIPTION);
    if !old.is_ascii() {
        return Ok(Marked::NotEditable);
    }
    if old.starts_with(SERIES_MARK.trim_end()) {
        return Ok(Marked::Already);
    }
    let new: String = format!("{SERIES_MARK}{old}").chars().take(64).collect();
    let value = element::padded(new.as_bytes(), *b"LO");
    let mut encoded = Vec::new();
    let big = h.syntax == Syntax::ExplicitBig;
    let (g, e) = (0x0008u16, 0x103Eu16);
    let u16b = |v: u16| {
        if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    encoded.extend_from_slice(&u16b(g));
    encoded.extend_from_slice(&u16b(e));
    if h.syntax == Syntax::ImplicitLittle {
        encoded.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        encoded.extend_from_slice(b"LO");
        encoded.extend_from_slice(&u16b(value.len() as u16));
    }
    encoded.extend_from_slice(&value);
    // The byte range to replace: the old element, or an empty range where it belongs.
    let (start, end) = match h
        .elements
        .iter()
        .position(|el| el.tag >= tags::SERIES_DESCRIPTION)
    {
        Some(i) if h.elements[i].tag == tags::SERIES_DESCRIPTION => {
            let end = h
                .elements
                .get(i + 1)
                .map_or_else(|| stop_offset(source, h), |n| Ok(n.offset))?;
            (h.elements[i].offset, end)
        }
        Some(i) => (h.elements[i].offset, h.elements[i].offset),
        None => {
            let at = stop_offset(source, h)?;
            (at, at)
        }
    };
    // Named by a digest: a UID from the data never becomes a path.
    let digest = Sha256::digest(h.sop_instance_uid.as_bytes());
    let target = scratch.join(format!("marked-{}.dcm", hex::encode(&digest[..16])));
    let mut input = File::open(source).map_err(|e| PdiError::io(source, e))?;
    let mut out = io::BufWriter::new(File::create(&target).map_err(|e| PdiError::io(&target, e))?);
    let io_err = |e| PdiError::io(&target, e);
    io::copy(&mut (&mut input).take(start), &mut out).map_err(io_err)?;
    out.write_all(&encoded).map_err(io_err)?;
    input.seek(io::SeekFrom::Start(end)).map_err(io_err)?;
    io::copy(&mut input, &mut out).map_err(io_err)?;
    out.flush().map_err(io_err)?;
    drop(out);
    let mut header = instance::read(&target)?;
    header.retain(needed_after_scan);
    let hash = hash_file(&target).map_err(io_err)?;
    Ok(Marked::Copied {
        header: Box::new(header),
        hash,
    })
}

/// Offset of the first element after the header the reader stopped at (pixel data or
/// the end of the file).
fn stop_offset(path: &Path, header: &Instance) -> Result<u64, PdiError> {
    let Some(last) = header.elements.last() else {
        return Err(PdiError::Invalid(format!(
            "{}: no dataset elements to mark",
            path.display()
        )));
    };
    // Re-read the last element to learn where it ends.
    let mut file = File::open(path).map_err(|e| PdiError::io(path, e))?;
    file.seek(io::SeekFrom::Start(last.offset))
        .map_err(|e| PdiError::io(path, e))?;
    let mut parser = element::Parser::new(BufReader::new(file), last.offset, 64 << 20);
    parser.element(header.syntax).map_err(|source| {
        PdiError::Instance(InstanceError::Malformed {
            path: path.to_owned(),
            source,
        })
    })?;
    Ok(parser.position())
}
