//! Building a file set: scan the instances (header + SHA-256 + CRC-32, on all cores) into
//! a catalog on disk, apply the AI support-image policy, lay out File IDs, write the
//! DICOMDIR, README.TXT, INDEX.HTM and the manifest, then stream every file into a ZIP
//! or a folder.
//!
//! Memory holds a few headers and a copy buffer per worker, the keys of each patient,
//! study and series, and a few dozen bytes per instance (its place in the tree, its
//! catalog offset, a digest of its UID to drop duplicates, its ZIP directory entry):
//! never file contents, and not the instances' headers or records, which are read back
//! from the catalog when each is written.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::catalog::{Catalog, CatalogWriter, Entry};
use super::instance::Instance;
use super::layout::{self, ATTACHMENT_FOLDER, Layout, Position};
use super::manifest::{self, DicomIds, Excluded, ManifestFile};
use super::mark::{self, Marked};
use super::policy::{AiAction, AiPolicy, LABEL};
use super::readme::{self, Contents, LabelledLine};
use super::scan::{self, FileHash, KnownHash, hash_file};
use super::zip::ZipWriter;
use super::{PdiError, records, tags};

/// How to build a file set.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Issuing facility, shown in README.TXT, INDEX.HTM and the manifest.
    pub facility: String,
    /// Non-DICOM files to carry (referral letter, FHIR document, lab results), placed in
    /// `ATTACH/`.
    pub attachments: Vec<PathBuf>,
    /// What happens to AI support images.
    pub policy: AiPolicy,
    /// File-set ID (0004,1130): at most 16 characters of A-Z, 0-9, `_` and space.
    pub file_set_id: String,
    /// Write `INDEX.HTM` as well.
    pub index_htm: bool,
    /// Creation time (Unix seconds); `None` for now. Fixed in tests for repeatable output.
    pub created: Option<u64>,
    /// Where the build keeps its temporary files (the catalog of instances, the DICOMDIR
    /// and manifest before they are added, marked copies); `None` for the system's
    /// temporary folder. The daemon uses the job's folder, on the data disk.
    pub scratch: Option<PathBuf>,
    /// Hashes of inputs computed when they were written (the reception hashes each
    /// instance while it spools it): an input that is still the file hashed (same inode,
    /// modification time and size) is read once, into the ZIP, instead of twice; any
    /// other is hashed again.
    pub known: HashMap<PathBuf, KnownHash>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            facility: String::new(),
            attachments: Vec::new(),
            policy: AiPolicy::default(),
            file_set_id: "CLOUDPDI".into(),
            index_htm: true,
            created: None,
            scratch: None,
            known: HashMap::new(),
        }
    }
}

/// What a build did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildReport {
    /// Instances in the set (labelled ones included).
    pub instances: usize,
    /// Instances labelled as AI support images.
    pub labelled: usize,
    /// Instances left out by the AI policy.
    pub excluded: usize,
    /// Inputs that were the same SOP Instance as an earlier one (kept once).
    pub duplicates: usize,
    /// Patients, studies and series in the DICOMDIR.
    pub patients: usize,
    /// Studies.
    pub studies: usize,
    /// Series.
    pub series: usize,
    /// Attachments carried.
    pub attachments: usize,
    /// Bytes written (the ZIP's size, or the folder's files).
    pub bytes: u64,
    /// Input files that are not DICOM Part 10 (and DICOMDIRs), skipped.
    pub skipped: Vec<PathBuf>,
    /// What the DICOMDIR could not fill (e.g. a type 1 key the instance lacks).
    pub warnings: Vec<String>,
}

/// Where the built files go.
trait Sink {
    fn file(&mut self, name: &str, source: &Path, size: u64, crc: u32) -> Result<(), PdiError>;
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), PdiError>;
}

struct ZipSink<W: Write>(ZipWriter<W>);

impl<W: Write> Sink for ZipSink<W> {
    fn file(&mut self, name: &str, source: &Path, size: u64, crc: u32) -> Result<(), PdiError> {
        let mut file = File::open(source).map_err(|e| PdiError::io(source, e))?;
        Ok(self.0.add(name, size, crc, &mut file)?)
    }
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), PdiError> {
        Ok(self.0.add_bytes(name, bytes)?)
    }
}

struct DirSink {
    root: PathBuf,
    bytes: u64,
}

/// Mode of the files of a file set built into a folder: as `File::create` gives them (the
/// umask decides), for the person who asked for the folder.
const DIR_FILE_MODE: u32 = 0o666;

impl DirSink {
    /// Writes the new file `name` durably ([`crate::durable::create_new`]).
    fn create(
        &self,
        name: &str,
        fill: impl FnOnce(&mut File) -> io::Result<u64>,
    ) -> Result<u64, PdiError> {
        let target = self.root.join(name);
        crate::durable::create_new(&target, DIR_FILE_MODE, fill)
            .map_err(|e| PdiError::io(&target, e))
    }
}

impl Sink for DirSink {
    fn file(&mut self, name: &str, source: &Path, size: u64, _crc: u32) -> Result<(), PdiError> {
        let mut input = File::open(source).map_err(|e| PdiError::io(source, e))?;
        let copied = self.create(name, |file| io::copy(&mut input, file))?;
        if copied != size {
            return Err(PdiError::Changed(source.to_owned()));
        }
        self.bytes += size;
        Ok(())
    }
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), PdiError> {
        self.create(name, |file| {
            file.write_all(bytes).map(|()| bytes.len() as u64)
        })?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

/// Builds a file set from `instances` (files or folders) and streams it as a ZIP of
/// stored entries into `out` (ZIP64 when needed). `out` is never seeked.
///
/// # Errors
/// [`PdiError`]: an unreadable input, a damaged DICOM header, an instance without its
/// UIDs, an invalid policy, or an output error.
pub fn build_zip<W: Write>(
    instances: &[PathBuf],
    options: &BuildOptions,
    out: W,
) -> Result<BuildReport, PdiError> {
    let created = options.created.unwrap_or_else(crate::clock::now_seconds);
    let mut sink = ZipSink(ZipWriter::new(out, created));
    let mut report = build(instances, options, created, &mut sink)?;
    report.bytes = sink.0.written();
    sink.0.finish()?;
    Ok(report)
}

/// Builds a file set into the folder `dir`, which must not exist or be empty. Every file
/// is written durably ([`crate::durable`]).
///
/// # Errors
/// As [`build_zip`], and [`PdiError::OutputNotEmpty`].
pub fn build_dir(
    instances: &[PathBuf],
    options: &BuildOptions,
    dir: &Path,
) -> Result<BuildReport, PdiError> {
    if dir.exists() {
        let mut entries = fs::read_dir(dir).map_err(|e| PdiError::io(dir, e))?;
        if entries.next().is_some() {
            return Err(PdiError::OutputNotEmpty(dir.to_owned()));
        }
    }
    fs::create_dir_all(dir).map_err(|e| PdiError::io(dir, e))?;
    let created = options.created.unwrap_or_else(crate::clock::now_seconds);
    let mut sink = DirSink {
        root: dir.to_owned(),
        bytes: 0,
    };
    let mut report = build(instances, options, created, &mut sink)?;
    report.bytes = sink.bytes;
    Ok(report)
}

/// The build's temporary folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: Option<&Path>) -> Result<Scratch, PdiError> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_owned);
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| PdiError::io(&parent, io::Error::other(e)))?;
        let dir = parent.join(format!("cloudpdi-pdi-{}", hex::encode(random)));
        fs::create_dir(&dir).map_err(|e| PdiError::io(&dir, e))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What the scan leaves: the catalog, the layout, and what the policy did.
struct Collected {
    catalog: Catalog,
    layout: Layout,
    excluded: Vec<Excluded>,
    /// Labelled instances (catalog number) with their Series Description.
    labelled: Vec<(u32, String)>,
}

/// The parts of a built set, ready to be written out in order.
struct Pieces<'a> {
    catalog: &'a Catalog,
    /// Where each catalog entry goes in the tree.
    positions: &'a [Position],
    /// The DICOMDIR in the scratch folder.
    dicomdir: (&'a Path, FileHash),
    readme: &'a [u8],
    index: Option<&'a [u8]>,
    attachments: &'a [Attachment],
}

fn build(
    inputs: &[PathBuf],
    options: &BuildOptions,
    created: u64,
    sink: &mut dyn Sink,
) -> Result<BuildReport, PdiError> {
    options.policy.validate()?;
    check_file_set_id(&options.file_set_id)?;
    let files = scan::expand(inputs)?;
    let scratch = Scratch::new(options.scratch.as_deref())?;
    let mut report = BuildReport::default();
    let Collected {
        catalog,
        layout,
        excluded,
        labelled,
    } = collect(&files, options, &scratch.0, &mut report)?;
    if catalog.count() == 0 && excluded.is_empty() {
        return Err(PdiError::NoInstances {
            inputs: inputs.len(),
            skipped: report.skipped.len(),
        });
    }
    report.excluded = excluded.len();
    report.instances = catalog.count();
    report.labelled = labelled.len();

    let tree = layout.finish();
    let dicomdir = scratch.0.join("DICOMDIR");
    let studies = records::write(
        &dicomdir,
        &options.file_set_id,
        &tree,
        &catalog,
        &mut report,
    )?;
    let positions = layout::positions(&tree, catalog.count());
    drop(tree);
    let dicomdir_hash = hash_file(&dicomdir).map_err(|e| PdiError::io(&dicomdir, e))?;

    let attachments = attachments(&options.attachments)?;
    report.attachments = attachments.len();
    let created = crate::clock::rfc3339(created);
    let contents = Contents {
        facility: options.facility.clone(),
        created: created.clone(),
        patients: report.patients,
        studies,
        labelled: labelled
            .into_iter()
            .map(|(number, series_description)| LabelledLine {
                path: path_of(positions[number as usize]),
                series_description,
            })
            .collect(),
        excluded: excluded.len(),
        attachments: attachments.iter().map(|a| a.name.clone()).collect(),
    };
    let readme = readme::readme(&contents);
    let index = options.index_htm.then(|| readme::index(&contents));
    let pieces = Pieces {
        catalog: &catalog,
        positions: &positions,
        dicomdir: (&dicomdir, dicomdir_hash),
        readme: &readme,
        index: index.as_deref(),
        attachments: &attachments,
    };
    let head = manifest::Head {
        file_set_id: &options.file_set_id,
        facility: &options.facility,
        created: &created,
        excluded: &excluded,
    };
    let manifest = scratch.0.join("MANIFEST.JSON");
    write_manifest(&manifest, &head, &pieces)?;
    write_out(sink, &pieces, &manifest)?;
    Ok(report)
}

/// Writes the manifest of `pieces` into the new file `path`, one entry at a time.
fn write_manifest(
    path: &Path,
    head: &manifest::Head<'_>,
    pieces: &Pieces<'_>,
) -> Result<(), PdiError> {
    let mut leading = vec![
        listed("DICOMDIR", pieces.dicomdir.1),
        listed("README.TXT", hash_bytes(pieces.readme)),
    ];
    if let Some(index) = pieces.index {
        leading.push(listed("INDEX.HTM", hash_bytes(index)));
    }
    let instances = (0u32..).zip(pieces.positions).map(|(number, &position)| {
        let entry = pieces.catalog.get(number).map_err(io::Error::other)?;
        Ok(manifest_entry(&entry, position))
    });
    let attachments = pieces
        .attachments
        .iter()
        .map(|a| Ok(listed(&a.name, a.hash)));
    let file = File::create_new(path).map_err(|e| PdiError::io(path, e))?;
    manifest::write(
        BufWriter::new(file),
        head,
        leading
            .into_iter()
            .map(Ok)
            .chain(instances)
            .chain(attachments),
    )
    .map_err(|e| PdiError::io(path, e))
}

/// Writes the set into `sink` in its order: the manifest (at `manifest`) first, then
/// DICOMDIR, README.TXT, INDEX.HTM, the instances and the attachments. The manifest is
/// complete before anything is written, and first in a ZIP a receiver reading the archive
/// as it arrives can check each instance against it as soon as its bytes are there
/// ([`super::zip::read_stream`]).
fn write_out(sink: &mut dyn Sink, pieces: &Pieces<'_>, manifest: &Path) -> Result<(), PdiError> {
    let hash = hash_file(manifest).map_err(|e| PdiError::io(manifest, e))?;
    sink.file(manifest::PATH, manifest, hash.size, hash.crc)?;
    let (dicomdir, hash) = pieces.dicomdir;
    sink.file("DICOMDIR", dicomdir, hash.size, hash.crc)?;
    sink.bytes("README.TXT", pieces.readme)?;
    if let Some(index) = pieces.index {
        sink.bytes("INDEX.HTM", index)?;
    }
    for (number, &position) in (0u32..).zip(pieces.positions) {
        let entry = pieces.catalog.get(number)?;
        sink.file(
            &path_of(position),
            &entry.header.path,
            entry.size,
            entry.crc,
        )?;
    }
    for a in pieces.attachments {
        sink.file(&a.name, &a.source, a.hash.size, a.hash.crc)?;
    }
    Ok(())
}

/// Scans `files` into the catalog in `scratch`: duplicates dropped, the AI policy applied
/// (labelled instances marked when asked), each instance placed in the layout.
fn collect(
    files: &[PathBuf],
    options: &BuildOptions,
    scratch: &Path,
    report: &mut BuildReport,
) -> Result<Collected, PdiError> {
    let catalog_path = scratch.join("catalog");
    let io = |e| PdiError::io(&catalog_path, e);
    let mut catalog = CatalogWriter::create(&catalog_path).map_err(io)?;
    let mut layout = Layout::default();
    let mut seen: HashSet<[u8; 16]> = HashSet::new();
    let mut excluded = Vec::new();
    let mut labelled = Vec::new();
    scan::scan(
        files,
        &options.policy,
        &options.known,
        &mut |path, result| {
            let Some(item) = result? else {
                report.skipped.push(path.to_owned());
                return Ok(());
            };
            let uid = Sha256::digest(item.header.sop_instance_uid.as_bytes());
            if !seen.insert(uid[..16].try_into().expect("16 of 32 bytes")) {
                report.duplicates += 1;
                return Ok(());
            }
            let mut entry = Entry {
                header: item.header,
                size: item.hash.size,
                sha256: item.hash.sha256,
                crc: item.hash.crc,
                labelled: false,
            };
            match item.ai {
                Some(AiAction::Exclude) => {
                    excluded.push(Excluded {
                        sop_instance_uid: entry.header.sop_instance_uid,
                        reason: "AI support image, left out by the sender's policy".into(),
                    });
                    return Ok(());
                }
                Some(AiAction::Label) => {
                    entry.labelled = true;
                    if options.policy.mark_series_description {
                        mark_copy(&mut entry, scratch, report)?;
                    }
                }
                Some(AiAction::Include) | None => {}
            }
            let number = catalog.push(&entry).map_err(io)?;
            if entry.labelled {
                labelled.push((number, entry.header.text(tags::SERIES_DESCRIPTION)));
            }
            layout.add(&placement(&entry.header));
            Ok(())
        },
    )?;
    Ok(Collected {
        catalog: catalog.finish().map_err(io)?,
        layout,
        excluded,
        labelled,
    })
}

/// Lets a labelled instance travel as its marked copy (or says why it cannot).
fn mark_copy(entry: &mut Entry, scratch: &Path, report: &mut BuildReport) -> Result<(), PdiError> {
    match mark::mark(&entry.header.path, scratch)? {
        Marked::Already => {}
        Marked::Copied { header, hash } => {
            entry.header = *header;
            entry.size = hash.size;
            entry.sha256 = hash.sha256;
            entry.crc = hash.crc;
        }
        Marked::NotEditable => report.warnings.push(format!(
            "{}: Series Description not marked (deflated or with group lengths); \
             labelled in README.TXT, INDEX.HTM and the manifest only",
            entry.header.path.display()
        )),
    }
    Ok(())
}

/// A non-DICOM file carried in [`ATTACHMENT_FOLDER`].
struct Attachment {
    name: String,
    source: PathBuf,
    hash: FileHash,
}

fn attachments(paths: &[PathBuf]) -> Result<Vec<Attachment>, PdiError> {
    let mut taken = Vec::new();
    paths
        .iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Attachment {
                name: format!(
                    "{ATTACHMENT_FOLDER}/{}",
                    layout::attachment_name(&name, &mut taken)
                ),
                source: path.clone(),
                hash: hash_file(path).map_err(|e| PdiError::io(path, e))?,
            })
        })
        .collect()
}

/// The `/`-separated path of the instance at `position`.
fn path_of(position: Position) -> String {
    layout::file_id(position).join("/")
}

fn manifest_entry(entry: &Entry, position: Position) -> ManifestFile {
    let h = &entry.header;
    ManifestFile {
        path: path_of(position),
        size: entry.size,
        sha256: hex::encode(entry.sha256),
        dicom: Some(DicomIds {
            sop_class_uid: h.sop_class_uid.clone(),
            sop_instance_uid: h.sop_instance_uid.clone(),
            study_instance_uid: h.study_uid.clone(),
            series_instance_uid: h.series_uid.clone(),
            transfer_syntax_uid: h.transfer_syntax.clone(),
        }),
        ai_support: entry.labelled.then(|| LABEL.to_owned()),
    }
}

fn hash_bytes(bytes: &[u8]) -> FileHash {
    FileHash {
        size: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
        crc: crc32fast::hash(bytes),
    }
}

/// A manifest entry for a file that is not a DICOM instance.
fn listed(path: &str, hash: FileHash) -> ManifestFile {
    ManifestFile {
        path: path.into(),
        size: hash.size,
        sha256: hex::encode(hash.sha256),
        dicom: None,
        ai_support: None,
    }
}

fn check_file_set_id(id: &str) -> Result<(), PdiError> {
    if id.len() <= 16
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b' ')
    {
        Ok(())
    } else {
        Err(PdiError::Invalid(format!(
            "File-set ID {id:?} must be at most 16 characters of A-Z, 0-9, _ and space"
        )))
    }
}

fn number(instance: &Instance, tag: u32) -> i64 {
    instance.text(tag).trim().parse().unwrap_or(i64::MAX)
}

fn placement(h: &Instance) -> layout::Placement {
    layout::Placement {
        patient_id: h.text(tags::PATIENT_ID),
        study_uid: h.study_uid.clone(),
        series_uid: h.series_uid.clone(),
        study_when: format!("{}{}", h.text(tags::STUDY_DATE), h.text(tags::STUDY_TIME)),
        series_number: number(h, tags::SERIES_NUMBER),
        instance_number: number(h, tags::INSTANCE_NUMBER),
    }
}
