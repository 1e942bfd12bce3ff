//! The catalog of a build: what the file set needs of each scanned instance (where it is,
//! its size and hashes, its UIDs and the header elements its records are made from),
//! written to a temporary file as the scan goes and read back one entry at a time.
//!
//! A study of thousands of instances then needs memory for a few numbers per instance,
//! not for thousands of headers: the DICOMDIR, the manifest and the archive are each
//! written by walking the catalog.
//!
//! An entry is `u32` length-prefixed fields in little-endian order: source path, size,
//! SHA-256, CRC-32, flags, five UIDs, then the kept header elements encoded as Explicit VR
//! Little Endian (big-endian values already converted, so they are read back as such).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::PdiError;
use super::element::{self, Parser, Syntax};
use super::instance::Instance;

/// Largest entry read back: a header is bounded by the instance reader's budget.
const MAX_ENTRY: u64 = 80 << 20;
const LABELLED: u8 = 1;
const DEFLATED: u8 = 2;

/// One instance as the file set needs it after the scan.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The instance's kept header; `header.path` is the file copied into the set (the
    /// original, or its marked copy).
    pub header: Instance,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
    /// CRC-32 of the file (for the ZIP entry).
    pub crc: u32,
    /// Listed as an AI support image.
    pub labelled: bool,
}

/// Appends entries to the catalog file during the scan.
pub struct CatalogWriter {
    out: BufWriter<File>,
    path: PathBuf,
    offsets: Vec<u64>,
    end: u64,
}

impl CatalogWriter {
    /// Creates the catalog at `path` (a new file in the build's scratch folder).
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create(path: &Path) -> io::Result<CatalogWriter> {
        Ok(CatalogWriter {
            out: BufWriter::with_capacity(64 * 1024, File::create_new(path)?),
            path: path.to_owned(),
            offsets: Vec::new(),
            end: 0,
        })
    }

    /// Appends `entry`; its number is the count of entries before it.
    ///
    /// # Errors
    /// When the catalog cannot be written.
    pub fn push(&mut self, entry: &Entry) -> io::Result<u32> {
        let bytes = encode(entry);
        let number = u32::try_from(self.offsets.len())
            .map_err(|_| io::Error::other("more than 4 billion instances in one file set"))?;
        self.out.write_all(&bytes)?;
        self.offsets.push(self.end);
        self.end += bytes.len() as u64;
        Ok(number)
    }

    /// Ends writing; the entries can now be read back.
    ///
    /// # Errors
    /// When the buffered entries cannot be written.
    pub fn finish(self) -> io::Result<Catalog> {
        let file = self
            .out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        Ok(Catalog {
            file,
            path: self.path,
            offsets: self.offsets,
            end: self.end,
        })
    }
}

/// The written catalog, read back by entry number.
pub struct Catalog {
    file: File,
    path: PathBuf,
    offsets: Vec<u64>,
    end: u64,
}

impl Catalog {
    /// Entries in the catalog.
    pub fn count(&self) -> usize {
        self.offsets.len()
    }

    /// Entry `number`.
    ///
    /// # Errors
    /// [`PdiError::Io`] when the file cannot be read or is damaged (it is our own
    /// temporary file, so this means the scratch disk failed).
    pub fn get(&self, number: u32) -> Result<Entry, PdiError> {
        let at = number as usize;
        let (Some(&start), end) = (
            self.offsets.get(at),
            self.offsets.get(at + 1).copied().unwrap_or(self.end),
        ) else {
            return Err(self.damaged("entry number out of range"));
        };
        let len = end - start;
        if len > MAX_ENTRY {
            return Err(self.damaged("entry too large"));
        }
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| self.damaged("size"))?];
        self.file
            .read_exact_at(&mut bytes, start)
            .map_err(|e| PdiError::io(&self.path, e))?;
        decode(&bytes).ok_or_else(|| self.damaged("entry unreadable"))
    }

    fn damaged(&self, why: &str) -> PdiError {
        let why = format!(
            "the build's catalog is damaged ({why}); check the scratch disk and build again"
        );
        PdiError::io(&self.path, io::Error::new(io::ErrorKind::InvalidData, why))
    }
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

fn encode(entry: &Entry) -> Vec<u8> {
    let h = &entry.header;
    let mut elements = Vec::new();
    for e in &h.elements {
        element::write(&mut elements, &element::to_little_endian(e, h.syntax));
    }
    let mut out = Vec::with_capacity(elements.len() + 512);
    put(&mut out, h.path.as_os_str().as_bytes());
    out.extend_from_slice(&entry.size.to_le_bytes());
    out.extend_from_slice(&entry.sha256);
    out.extend_from_slice(&entry.crc.to_le_bytes());
    let flags = if entry.labelled { LABELLED } else { 0 } | if h.deflated { DEFLATED } else { 0 };
    out.push(flags);
    for uid in [
        &h.transfer_syntax,
        &h.sop_class_uid,
        &h.sop_instance_uid,
        &h.study_uid,
        &h.series_uid,
    ] {
        put(&mut out, uid.as_bytes());
    }
    put(&mut out, &elements);
    out
}

/// Reads fields off the front of an entry.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    fn field(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.array()?);
        self.bytes(usize::try_from(len).ok()?)
    }
    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.field()?.to_vec()).ok()
    }
}

fn decode(bytes: &[u8]) -> Option<Entry> {
    let mut f = Fields(bytes);
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(f.field()?));
    let size = u64::from_le_bytes(f.array()?);
    let sha256 = f.array()?;
    let crc = u32::from_le_bytes(f.array()?);
    let [flags] = f.array()?;
    let (transfer_syntax, sop_class_uid, sop_instance_uid, study_uid, series_uid) =
        (f.text()?, f.text()?, f.text()?, f.text()?, f.text()?);
    let encoded = f.field()?;
    let elements = Parser::new(encoded, 0, encoded.len() as u64)
        .dataset(Syntax::ExplicitLittle, None, &|_| false)
        .ok()?;
    Some(Entry {
        header: Instance {
            path,
            transfer_syntax,
            sop_class_uid,
            sop_instance_uid,
            study_uid,
            series_uid,
            elements,
            syntax: Syntax::ExplicitLittle,
            deflated: flags & DEFLATED != 0,
        },
        size,
        sha256,
        crc,
        labelled: flags & LABELLED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdi::element::{Element, Item, Value, text_element};

    fn entry(syntax: Syntax) -> Entry {
        let observer = Element {
            tag: 0x0040_A073,
            vr: *b"SQ",
            offset: 0,
            value: Value::Items(vec![Item {
                offset: 0,
                elements: vec![text_element(0x0040_A030, b"DT", b"20261125101500")],
            }]),
        };
        let number = if syntax == Syntax::ExplicitBig {
            7u16.to_be_bytes()
        } else {
            7u16.to_le_bytes()
        };
        Entry {
            header: Instance {
                path: PathBuf::from("/spool/a/山田.dcm"),
                transfer_syntax: "1.2.840.10008.1.2.2".into(),
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.22".into(),
                sop_instance_uid: "1.2.3.4".into(),
                study_uid: "1.2.3".into(),
                series_uid: "1.2.3.5".into(),
                elements: vec![
                    text_element(0x0010_0010, b"PN", "Yamada^Tarou=山田^太郎".as_bytes()),
                    text_element(0x0028_0010, b"US", &number),
                    observer,
                ],
                syntax,
                deflated: true,
            },
            size: 1234,
            sha256: [7; 32],
            crc: 0xDEAD_BEEF,
            labelled: true,
        }
    }

    #[test]
    fn entries_read_back_as_written_with_big_endian_values_converted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut writer = CatalogWriter::create(&dir.path().join("catalog")).expect("create");
        assert_eq!(
            writer.push(&entry(Syntax::ExplicitLittle)).expect("push"),
            0
        );
        assert_eq!(writer.push(&entry(Syntax::ExplicitBig)).expect("push"), 1);
        let catalog = writer.finish().expect("finish");
        assert_eq!(catalog.count(), 2);
        for n in [1, 0] {
            let back = catalog.get(n).expect("entry");
            let h = &back.header;
            assert_eq!(h.path, PathBuf::from("/spool/a/山田.dcm"));
            assert_eq!(
                (back.size, back.sha256, back.crc),
                (1234, [7; 32], 0xDEAD_BEEF)
            );
            assert!(back.labelled && h.deflated);
            assert_eq!(h.series_uid, "1.2.3.5");
            assert_eq!(h.text(0x0010_0010), "Yamada^Tarou=山田^太郎");
            assert_eq!(
                h.element(0x0028_0010).and_then(Element::bytes),
                Some(&7u16.to_le_bytes()[..])
            );
            let Some(Value::Items(items)) = h.element(0x0040_A073).map(|e| &e.value) else {
                panic!("the sequence is kept");
            };
            assert_eq!(
                element::text_of(&items[0].elements, 0x0040_A030),
                "20261125101500"
            );
        }
        assert!(catalog.get(2).is_err());
    }

    #[test]
    fn a_damaged_catalog_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("catalog");
        let mut writer = CatalogWriter::create(&path).expect("create");
        writer.push(&entry(Syntax::ExplicitLittle)).expect("push");
        let catalog = writer.finish().expect("finish");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.write_all_at(&[0xFF; 4], 0))
            .expect("overwrite the path length");
        let error = catalog.get(0).expect_err("damaged");
        assert!(error.to_string().contains("build again"), "{error}");
    }
}
