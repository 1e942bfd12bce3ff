//! Building a file set: scan the instances (header + SHA-256 + CRC-32, in parallel),
//! apply the AI support-image policy, lay out File IDs, write the DICOMDIR, README.TXT,
//! INDEX.HTM and the manifest, then stream every file into a ZIP or a folder.
//!
//! Memory holds one header and a copy buffer per worker plus a few hundred bytes per
//! instance, never file contents: a 2000-slice study needs no more than a 50-slice one.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::dicomdir::{self, Record};
use super::element::{self, Syntax};
use super::instance::{self, Instance, InstanceError};
use super::layout::{self, ATTACHMENT_FOLDER, DICOM_FOLDER};
use super::manifest::{self, DicomIds, Excluded, Manifest, ManifestFile};
use super::policy::{AiAction, AiPolicy, LABEL};
use super::readme::{self, Contents, LabelledLine, StudyLine};
use super::zip::ZipWriter;
use super::{PdiError, tags};

const HASH_BUFFER: usize = 256 * 1024;
/// The prefix written into a marked Series Description (LO: at most 64 characters).
const SERIES_MARK: &str = "[AI support, not a diagnosis] ";

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

/// One instance after scanning.
struct Scanned {
    header: Instance,
    source: PathBuf,
    size: u64,
    sha256: String,
    crc: u32,
    /// What the AI-image policy does with it, decided on the whole header.
    ai: Option<AiAction>,
    labelled: bool,
}

/// Files and folders (walked, sorted) into files; DICOMDIR files are left out.
fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, PdiError> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| PdiError::io(input, e))?;
        if meta.is_dir() {
            let mut children: Vec<PathBuf> = fs::read_dir(input)
                .map_err(|e| PdiError::io(input, e))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(|e| PdiError::io(input, e))?;
            children.sort();
            out.extend(expand(&children)?);
        } else if !input
            .file_name()
            .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
        {
            out.push(input.clone());
        }
    }
    Ok(out)
}

/// SHA-256, CRC-32 and size of a file in one read.
pub(crate) fn hash_file(path: &Path) -> io::Result<(u64, String, u32)> {
    let mut file = File::open(path)?;
    let mut sha = Sha256::new();
    let mut crc = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; HASH_BUFFER];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        sha.update(&buffer[..n]);
        crc.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(sha.finalize()), crc.finalize()))
}

/// The scan of one input: `Ok(None)` when it is not DICOM.
type ScanResult = Result<Option<Scanned>, PdiError>;

/// Reads every header and hashes every file, on all cores.
fn scan(files: &[PathBuf], policy: &AiPolicy) -> Vec<ScanResult> {
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .min(files.len().max(1));
    let mut results: Vec<Option<ScanResult>> = (0..files.len()).map(|_| None).collect();
    let chunks: Vec<Vec<(usize, ScanResult)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = files.get(i) else {
                            return mine;
                        };
                        mine.push((i, scan_one(path, policy)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a scan worker does not panic"))
            .collect()
    });
    for (i, result) in chunks.into_iter().flatten() {
        results[i] = Some(result);
    }
    results
        .into_iter()
        .map(|r| r.expect("every file was scanned"))
        .collect()
}

/// Reads and hashes one input, decides what the AI-image policy does with it, then keeps
/// only the header elements the file set needs.
fn scan_one(path: &Path, policy: &AiPolicy) -> ScanResult {
    let mut header = match instance::read(path) {
        Ok(header) => header,
        Err(InstanceError::NotDicom(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (size, sha256, crc) = hash_file(path).map_err(|e| PdiError::io(path, e))?;
    let ai = policy.decide(&header);
    header.retain(needed_after_scan);
    Ok(Some(Scanned {
        header,
        source: path.to_owned(),
        size,
        sha256,
        crc,
        ai,
        labelled: false,
    }))
}

/// Where the built files go.
trait Sink {
    fn file(&mut self, name: &str, source: &Path, size: u64, crc: u32) -> Result<(), PdiError>;
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), PdiError>;
}

struct ZipSink<W: Write>(ZipWriter<W>);

impl<W: Write> Sink for ZipSink<W> {
    fn file(&mut self, name: &str, source: &Path, size: u64, crc: u32) -> Result<(), PdiError> {
        let file = File::open(source).map_err(|e| PdiError::io(source, e))?;
        let mut reader = BufReader::with_capacity(HASH_BUFFER, file);
        Ok(self.0.add(name, size, crc, &mut reader)?)
    }
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), PdiError> {
        Ok(self.0.add_bytes(name, bytes)?)
    }
}

struct DirSink {
    root: PathBuf,
    bytes: u64,
}

impl DirSink {
    fn target(&self, name: &str) -> Result<PathBuf, PdiError> {
        let target = self.root.join(name);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| PdiError::io(parent, e))?;
        }
        Ok(target)
    }
}

impl Sink for DirSink {
    fn file(&mut self, name: &str, source: &Path, size: u64, _crc: u32) -> Result<(), PdiError> {
        let target = self.target(name)?;
        let copied = fs::copy(source, &target).map_err(|e| PdiError::io(&target, e))?;
        if copied != size {
            return Err(PdiError::Changed(source.to_owned()));
        }
        File::open(&target)
            .and_then(|f| f.sync_all())
            .map_err(|e| PdiError::io(&target, e))?;
        self.bytes += size;
        Ok(())
    }
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), PdiError> {
        let target = self.target(name)?;
        let mut file = File::create_new(&target).map_err(|e| PdiError::io(&target, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| PdiError::io(&target, e))?;
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
    let created = options.created.unwrap_or_else(now);
    let mut sink = ZipSink(ZipWriter::new(out, created));
    let mut report = build(instances, options, created, &mut sink)?;
    report.bytes = sink.0.written();
    sink.0.finish()?;
    Ok(report)
}

/// Builds a file set into the folder `dir`, which must not exist or be empty. Every file
/// is fsynced.
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
    let created = options.created.unwrap_or_else(now);
    let mut sink = DirSink {
        root: dir.to_owned(),
        bytes: 0,
    };
    let mut report = build(instances, options, created, &mut sink)?;
    report.bytes = sink.bytes;
    Ok(report)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A temporary folder removed on drop (for rewritten, marked instances).
struct Scratch(Option<PathBuf>);

impl Scratch {
    fn dir(&mut self) -> Result<&Path, PdiError> {
        if self.0.is_none() {
            let dir =
                std::env::temp_dir().join(format!("cloudpdi-pdi-{}", &dicomdir::new_uid()[5..21]));
            fs::create_dir(&dir).map_err(|e| PdiError::io(&dir, e))?;
            self.0 = Some(dir);
        }
        Ok(self.0.as_deref().expect("just created"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn build(
    inputs: &[PathBuf],
    options: &BuildOptions,
    created: u64,
    sink: &mut dyn Sink,
) -> Result<BuildReport, PdiError> {
    options.policy.validate()?;
    check_file_set_id(&options.file_set_id)?;
    let files = expand(inputs)?;
    let mut report = BuildReport::default();
    let mut scanned = Vec::new();
    let mut seen = HashSet::new();
    let mut excluded = Vec::new();
    for (path, result) in files.iter().zip(scan(&files, &options.policy)) {
        let Some(mut item) = result? else {
            report.skipped.push(path.clone());
            continue;
        };
        if !seen.insert(item.header.sop_instance_uid.clone()) {
            report.duplicates += 1;
            continue;
        }
        match item.ai {
            Some(AiAction::Exclude) => {
                excluded.push(Excluded {
                    sop_instance_uid: item.header.sop_instance_uid.clone(),
                    reason: "AI support image, left out by the sender's policy".into(),
                });
                continue;
            }
            Some(AiAction::Label) => item.labelled = true,
            Some(AiAction::Include) | None => {}
        }
        scanned.push(item);
    }
    let mut scratch = Scratch(None);
    if options.policy.mark_series_description {
        for item in scanned.iter_mut().filter(|i| i.labelled) {
            match mark(item, scratch.dir()?)? {
                Some(()) => {}
                None => report.warnings.push(format!(
                    "{}: Series Description not marked (deflated or with group lengths); \
                     labelled in README.TXT, INDEX.HTM and the manifest only",
                    item.source.display()
                )),
            }
        }
    }
    report.excluded = excluded.len();
    report.instances = scanned.len();
    report.labelled = scanned.iter().filter(|i| i.labelled).count();

    let placements: Vec<layout::Placement> = scanned.iter().map(placement).collect();
    let tree = layout::group(&placements);
    let (records, file_ids, studies) = records(&tree, &scanned, &mut report);
    let dicomdir = dicomdir::write(&options.file_set_id, &records);

    let mut taken = Vec::new();
    let attachments: Vec<(String, PathBuf)> = options
        .attachments
        .iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                format!(
                    "{ATTACHMENT_FOLDER}/{}",
                    layout::attachment_name(&name, &mut taken)
                ),
                path.clone(),
            )
        })
        .collect();
    report.attachments = attachments.len();
    let created_text = manifest::rfc3339(created);
    let contents = Contents {
        facility: options.facility.clone(),
        created: created_text.clone(),
        patients: report.patients,
        studies,
        labelled: scanned
            .iter()
            .zip(&file_ids)
            .filter(|(i, _)| i.labelled)
            .map(|(i, id)| LabelledLine {
                path: id.clone(),
                series_description: i.header.text(tags::SERIES_DESCRIPTION),
            })
            .collect(),
        excluded: excluded.len(),
        attachments: attachments.iter().map(|(n, _)| n.clone()).collect(),
    };
    let readme_txt = readme::readme(&contents);
    let index_htm = options.index_htm.then(|| readme::index(&contents));

    let mut entries = vec![
        small("DICOMDIR", &dicomdir),
        small("README.TXT", &readme_txt),
    ];
    if let Some(index) = &index_htm {
        entries.push(small("INDEX.HTM", index));
    }
    for (item, id) in scanned.iter().zip(&file_ids) {
        entries.push(ManifestFile {
            path: id.clone(),
            size: item.size,
            sha256: item.sha256.clone(),
            dicom: Some(DicomIds {
                sop_class_uid: item.header.sop_class_uid.clone(),
                sop_instance_uid: item.header.sop_instance_uid.clone(),
                study_instance_uid: item.header.study_uid.clone(),
                series_instance_uid: item.header.series_uid.clone(),
                transfer_syntax_uid: item.header.transfer_syntax.clone(),
            }),
            ai_support: item.labelled.then(|| LABEL.to_owned()),
        });
    }
    let mut attachment_hashes = Vec::new();
    for (name, path) in &attachments {
        let (size, sha256, crc) = hash_file(path).map_err(|e| PdiError::io(path, e))?;
        attachment_hashes.push((size, crc));
        entries.push(ManifestFile {
            path: name.clone(),
            size,
            sha256,
            dicom: None,
            ai_support: None,
        });
    }
    let manifest = Manifest {
        format: manifest::FORMAT.into(),
        version: 1,
        file_set_id: options.file_set_id.clone(),
        facility: options.facility.clone(),
        created: created_text,
        files: entries,
        excluded,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest).expect("a manifest always serializes");

    sink.bytes("DICOMDIR", &dicomdir)?;
    sink.bytes("README.TXT", &readme_txt)?;
    if let Some(index) = &index_htm {
        sink.bytes("INDEX.HTM", index)?;
    }
    for (item, id) in scanned.iter().zip(&file_ids) {
        sink.file(id, &item.source, item.size, item.crc)?;
    }
    for ((name, path), (size, crc)) in attachments.iter().zip(&attachment_hashes) {
        sink.file(name, path, *size, *crc)?;
    }
    sink.bytes(manifest::PATH, &manifest_json)?;
    Ok(report)
}

fn small(path: &str, bytes: &[u8]) -> ManifestFile {
    ManifestFile {
        path: path.into(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
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

fn placement(item: &Scanned) -> layout::Placement {
    let h = &item.header;
    layout::Placement {
        patient_id: h.text(tags::PATIENT_ID),
        study_uid: h.study_uid.clone(),
        series_uid: h.series_uid.clone(),
        study_when: format!("{}{}", h.text(tags::STUDY_DATE), h.text(tags::STUDY_TIME)),
        series_number: number(h, tags::SERIES_NUMBER),
        instance_number: number(h, tags::INSTANCE_NUMBER),
    }
}

/// A verified SR's record needs Verification DateTime (type 1C); documents keep it in
/// Verifying Observer Sequence, so the latest one is taken from there.
fn add_verification_datetime(elements: &mut Vec<element::Element>, instance: &Instance) {
    let verified = instance.text(tags::VERIFICATION_FLAG) == "VERIFIED";
    if !verified
        || elements
            .iter()
            .any(|e| e.tag == tags::VERIFICATION_DATETIME)
    {
        return;
    }
    let Some(element::Value::Items(observers)) = instance
        .element(tags::VERIFYING_OBSERVER_SEQUENCE)
        .map(|e| &e.value)
    else {
        return;
    };
    let latest = observers
        .iter()
        .map(|item| element::text_of(&item.elements, tags::VERIFICATION_DATETIME))
        .max();
    if let Some(latest) = latest.filter(|v| !v.is_empty()) {
        elements.push(element::text_element(
            tags::VERIFICATION_DATETIME,
            b"DT",
            latest.as_bytes(),
        ));
    }
}

/// Where a missing date key is taken from, in order: Series, Acquisition, Content and
/// Study Date.
const DATE_STAND_INS: [u32; 4] = [
    0x0008_0021,
    0x0008_0022,
    tags::CONTENT_DATE,
    tags::STUDY_DATE,
];
/// The same for a missing time key.
const TIME_STAND_INS: [u32; 4] = [
    0x0008_0031,
    0x0008_0032,
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
fn needed_after_scan(tag: u32) -> bool {
    dicomdir::is_record_key(tag)
        || KEPT_BESIDES_KEYS.contains(&tag)
        || DATE_STAND_INS.contains(&tag)
        || TIME_STAND_INS.contains(&tag)
}

/// A value for a type 1 key the instance lacks: a date or time from the instance's other
/// dates (series, acquisition, content, study), else a neutral constant.
fn stand_in(instance: &Instance, tag: u32) -> Option<String> {
    let first_of = |candidates: &[u32]| {
        candidates
            .iter()
            .map(|&t| instance.text(t))
            .find(|v| !v.is_empty())
    };
    match tag {
        tags::STUDY_DATE | tags::CONTENT_DATE | tags::PRESENTATION_CREATION_DATE => {
            Some(first_of(&DATE_STAND_INS).unwrap_or_else(|| "19000101".into()))
        }
        tags::STUDY_TIME | tags::CONTENT_TIME | tags::PRESENTATION_CREATION_TIME => {
            Some(first_of(&TIME_STAND_INS).unwrap_or_else(|| "000000".into()))
        }
        tags::PATIENT_ID => Some("UNKNOWN".into()),
        tags::MODALITY => Some("OT".into()),
        tags::COMPLETION_FLAG => Some("PARTIAL".into()),
        tags::VERIFICATION_FLAG => Some("UNVERIFIED".into()),
        tags::CONTENT_LABEL => Some("UNLABELLED".into()),
        _ => None,
    }
}

/// DICOMDIR records, the File ID path of each scanned instance, and study lines.
fn records(
    tree: &layout::Tree,
    scanned: &[Scanned],
    report: &mut BuildReport,
) -> (Vec<Record>, Vec<String>, Vec<StudyLine>) {
    let mut file_ids = vec![String::new(); scanned.len()];
    let mut lines = Vec::new();
    let mut warn = |level: &str, item: &Scanned, missing: Vec<&str>| {
        if !missing.is_empty() {
            report.warnings.push(format!(
                "{}: no {} for its {level} record (a stand-in value was written)",
                item.source.display(),
                missing.join(", ")
            ));
        }
    };
    let mut patients = Vec::new();
    let (mut study_count, mut series_count) = (0, 0);
    for (p, patient) in tree.patients.iter().enumerate() {
        let first = &scanned[patient.first];
        let (elements, missing) = dicomdir::keys_from(
            &first.header.elements,
            first.header.syntax,
            dicomdir::PATIENT_KEYS,
            &|_| Some("UNKNOWN".into()),
        );
        warn("PATIENT", first, missing);
        let mut patient_record = Record {
            kind: "PATIENT",
            elements,
            children: Vec::new(),
        };
        for (s, study) in patient.members.iter().enumerate() {
            study_count += 1;
            let first = &scanned[study.first];
            let (elements, missing) = dicomdir::keys_from(
                &first.header.elements,
                first.header.syntax,
                dicomdir::STUDY_KEYS,
                &|tag| match tag {
                    tags::STUDY_ID => Some((s + 1).to_string()),
                    _ => stand_in(&first.header, tag),
                },
            );
            warn("STUDY", first, missing);
            let mut study_record = Record {
                kind: "STUDY",
                elements,
                children: Vec::new(),
            };
            let mut line = StudyLine {
                date: first.header.text(tags::STUDY_DATE),
                description: first.header.text(tags::STUDY_DESCRIPTION),
                modalities: Vec::new(),
                series: study.members.len(),
                instances: 0,
            };
            for (e, series) in study.members.iter().enumerate() {
                series_count += 1;
                let first = &scanned[series.first];
                let (elements, missing) = dicomdir::keys_from(
                    &first.header.elements,
                    first.header.syntax,
                    dicomdir::SERIES_KEYS,
                    &|tag| match tag {
                        tags::SERIES_NUMBER => Some((e + 1).to_string()),
                        _ => stand_in(&first.header, tag),
                    },
                );
                warn("SERIES", first, missing);
                let modality = first.header.text(tags::MODALITY);
                if !line.modalities.contains(&modality) {
                    line.modalities.push(modality);
                }
                let mut series_record = Record {
                    kind: "SERIES",
                    elements,
                    children: Vec::new(),
                };
                for (n, &i) in series.members.iter().enumerate() {
                    line.instances += 1;
                    let item = &scanned[i];
                    let components = [
                        DICOM_FOLDER.to_owned(),
                        layout::component("PA", p),
                        layout::component("ST", s),
                        layout::component("SE", e),
                        layout::component("IM", n),
                    ];
                    file_ids[i] = components.join("/");
                    let (kind, keys) = dicomdir::leaf_kind(&item.header.sop_class_uid);
                    let (mut elements, missing) = dicomdir::keys_from(
                        &item.header.elements,
                        item.header.syntax,
                        keys,
                        &|tag| match tag {
                            tags::INSTANCE_NUMBER => Some((n + 1).to_string()),
                            _ => stand_in(&item.header, tag),
                        },
                    );
                    warn(kind, item, missing);
                    if kind == "SR DOCUMENT" {
                        add_verification_datetime(&mut elements, &item.header);
                    }
                    elements.extend([
                        element::text_element(
                            tags::REFERENCED_FILE_ID,
                            b"CS",
                            components.join("\\").as_bytes(),
                        ),
                        element::text_element(
                            tags::REFERENCED_SOP_CLASS,
                            b"UI",
                            item.header.sop_class_uid.as_bytes(),
                        ),
                        element::text_element(
                            tags::REFERENCED_SOP_INSTANCE,
                            b"UI",
                            item.header.sop_instance_uid.as_bytes(),
                        ),
                        element::text_element(
                            tags::REFERENCED_TRANSFER_SYNTAX,
                            b"UI",
                            item.header.transfer_syntax.as_bytes(),
                        ),
                    ]);
                    series_record.children.push(Record {
                        kind,
                        elements,
                        children: Vec::new(),
                    });
                }
                study_record.children.push(series_record);
            }
            lines.push(line);
            patient_record.children.push(study_record);
        }
        patients.push(patient_record);
    }
    report.patients = patients.len();
    report.studies = study_count;
    report.series = series_count;
    (patients, file_ids, lines)
}

/// Rewrites a labelled instance with its Series Description prefixed by the label, into
/// `scratch`; the item then points at the copy. `None` when the file cannot be edited in
/// place (deflated, group lengths, non-ASCII description).
fn mark(item: &mut Scanned, scratch: &Path) -> Result<Option<()>, PdiError> {
    // The scan kept only the record keys; editing needs every element's offset.
    let h = &instance::read(&item.source)?;
    if h.deflated || h.element(0x0008_0000).is_some() {
        return Ok(None);
    }
    let old = h.text(tags::SERIES_DESCRIPTION);
    if !old.is_ascii() {
        return Ok(None);
    }
    if old.starts_with(SERIES_MARK.trim_end()) {
        return Ok(Some(()));
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
                .map_or_else(|| stop_offset(&item.source, h), |n| Ok(n.offset))?;
            (h.elements[i].offset, end)
        }
        Some(i) => (h.elements[i].offset, h.elements[i].offset),
        None => {
            let at = stop_offset(&item.source, h)?;
            (at, at)
        }
    };
    let target = scratch.join(format!("{}.dcm", h.sop_instance_uid));
    let mut source = File::open(&item.source).map_err(|e| PdiError::io(&item.source, e))?;
    let mut out = io::BufWriter::new(File::create(&target).map_err(|e| PdiError::io(&target, e))?);
    let io_err = |e| PdiError::io(&target, e);
    io::copy(&mut (&mut source).take(start), &mut out).map_err(io_err)?;
    out.write_all(&encoded).map_err(io_err)?;
    std::io::Seek::seek(&mut source, io::SeekFrom::Start(end)).map_err(io_err)?;
    io::copy(&mut source, &mut out).map_err(io_err)?;
    out.flush().map_err(io_err)?;
    drop(out);
    let mut header = instance::read(&target)?;
    header.retain(needed_after_scan);
    let (size, sha256, crc) = hash_file(&target).map_err(io_err)?;
    *item = Scanned {
        header,
        source: target,
        size,
        sha256,
        crc,
        ai: item.ai,
        labelled: true,
    };
    Ok(Some(()))
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
    std::io::Seek::seek(&mut file, io::SeekFrom::Start(last.offset))
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
