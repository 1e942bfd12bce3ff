//! Reading a file set through its DICOMDIR, and verifying that it is whole: every record
//! points at an existing file with the same UIDs, every DICOM file is referenced, and the
//! manifest's sizes and SHA-256 match.
//!
//! Sets written by other tools are accepted as they come: lower-case or ISO 9660 names
//! (`im000001.;1`), missing optional keys, extra folders. What cannot be used is listed in
//! [`FileSet::problems`] or, for `verify`, reported as an error naming the file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::dicomdir::{self, Dicomdir};
use super::instance;
use super::manifest::{self, Manifest};
use super::scan::hash_file;
use super::zip::{self, Limits};
use super::{PdiError, tags};

/// Most files walked in one set (a DVD holds a few tens of thousands).
const MAX_FILES: usize = 1_000_000;

/// One instance listed by the DICOMDIR.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceEntry {
    /// The file on disk.
    pub path: PathBuf,
    /// Its File ID as written in the DICOMDIR, `/`-separated.
    pub file_id: String,
    /// Directory Record Type, e.g. `IMAGE`, `SR DOCUMENT`.
    pub record_type: String,
    /// Referenced SOP Class UID in File.
    pub sop_class_uid: String,
    /// Referenced SOP Instance UID in File.
    pub sop_instance_uid: String,
    /// Referenced Transfer Syntax UID in File (may be empty in other tools' sets).
    pub transfer_syntax_uid: String,
    /// Patient ID of the PATIENT record above it.
    pub patient_id: String,
    /// Study Instance UID of the STUDY record above it.
    pub study_instance_uid: String,
    /// Series Instance UID of the SERIES record above it.
    pub series_instance_uid: String,
    /// Modality of the SERIES record above it.
    pub modality: String,
}

/// A file set opened through its DICOMDIR.
#[derive(Debug, Clone)]
pub struct FileSet {
    root: PathBuf,
    dicomdir_path: PathBuf,
    dicomdir: Dicomdir,
    instances: Vec<InstanceEntry>,
    missing: Vec<(String, String)>,
    problems: Vec<String>,
}

/// Counts and facts of a verified set.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// File-set ID.
    pub file_set_id: String,
    /// PATIENT records.
    pub patients: usize,
    /// STUDY records.
    pub studies: usize,
    /// SERIES records.
    pub series: usize,
    /// Instances referenced (and found, with matching UIDs).
    pub instances: usize,
    /// Modalities of the series, sorted.
    pub modalities: Vec<String>,
    /// Bytes of all files of the set.
    pub bytes: u64,
    /// Files of the set.
    pub files: usize,
    /// Whether a cloudpdi manifest was present and matched.
    pub manifest: bool,
    /// Instances the manifest labels as AI support images.
    pub ai_labelled: usize,
    /// Instances the manifest lists as left out by the AI policy.
    pub ai_excluded: usize,
    /// What the reader noticed but could work around.
    pub problems: Vec<String>,
}

/// Case-insensitive lookups of names in folders: each folder is read once into a map
/// from its folded names, so resolving every File ID of a set is linear in its files.
#[derive(Default)]
struct Names(HashMap<PathBuf, HashMap<String, std::ffi::OsString>>);

/// A name as File IDs are compared: upper case, without an ISO 9660 version suffix
/// (`;1`) or trailing dots.
fn folded(name: &str) -> String {
    let name = name.split(';').next().unwrap_or(name);
    name.trim_end_matches('.').to_ascii_uppercase()
}

impl Names {
    /// The entry of `dir` matching `component`: exact, else ignoring case and an ISO 9660
    /// version suffix (`;1`) and trailing dot (of several such names, the first in
    /// byte order).
    fn find(&mut self, dir: &Path, component: &str) -> Option<PathBuf> {
        let exact = dir.join(component);
        if fs::symlink_metadata(&exact).is_ok_and(|m| !m.file_type().is_symlink()) {
            return Some(exact);
        }
        let names = self
            .0
            .entry(dir.to_owned())
            .or_insert_with(|| Self::index(dir));
        names
            .get(&folded(component))
            .map(|n| dir.join(n))
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_symlink()))
    }

    /// One read of `dir`: folded name -> name (an unreadable folder has none).
    fn index(dir: &Path) -> HashMap<String, std::ffi::OsString> {
        let mut names: Vec<std::ffi::OsString> = fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut index = HashMap::with_capacity(names.len());
        for name in names {
            index.entry(folded(&name.to_string_lossy())).or_insert(name);
        }
        index
    }
}

impl FileSet {
    /// Opens the set whose root folder is `root` (it holds the DICOMDIR, in any case).
    ///
    /// # Errors
    /// [`PdiError::Broken`] when there is no DICOMDIR, [`PdiError::Dicomdir`] when it is
    /// damaged or its offsets are wrong.
    pub fn open(root: &Path) -> Result<FileSet, PdiError> {
        let mut names = Names::default();
        let dicomdir_path = names.find(root, "DICOMDIR").ok_or_else(|| {
            PdiError::Broken(format!("{} has no DICOMDIR at its top", root.display()))
        })?;
        let dicomdir = dicomdir::read(&dicomdir_path)?;
        let mut set = FileSet {
            root: root.to_owned(),
            dicomdir_path,
            problems: dicomdir.problems.clone(),
            dicomdir,
            instances: Vec::new(),
            missing: Vec::new(),
        };
        let roots = set.dicomdir.roots.clone();
        for index in roots {
            set.walk(index, &Context::default(), &mut names);
        }
        Ok(set)
    }

    fn walk(&mut self, index: usize, parent: &Context, names: &mut Names) {
        let record = self.dicomdir.records[index].clone();
        let mut here = parent.clone();
        match record.kind.as_str() {
            "PATIENT" => here.patient_id = record.text(tags::PATIENT_ID),
            "STUDY" => here.study_uid = record.text(tags::STUDY_INSTANCE_UID),
            "SERIES" => {
                here.series_uid = record.text(tags::SERIES_INSTANCE_UID);
                here.modality = record.text(tags::MODALITY);
            }
            _ => {}
        }
        let file_id = record.text(tags::REFERENCED_FILE_ID);
        if !file_id.is_empty() {
            let components: Vec<&str> = file_id.split('\\').map(str::trim).collect();
            let shown = components.join("/");
            let uid = record.text(tags::REFERENCED_SOP_INSTANCE);
            match self.resolve(&components, names) {
                Ok(_) if uid.is_empty() => self.problems.push(format!(
                    "{} record for {shown} has no Referenced SOP Instance UID; not used",
                    record.kind
                )),
                Ok(path) => self.instances.push(InstanceEntry {
                    path,
                    file_id: shown,
                    record_type: record.kind.clone(),
                    sop_class_uid: record.text(tags::REFERENCED_SOP_CLASS),
                    sop_instance_uid: uid,
                    transfer_syntax_uid: record.text(tags::REFERENCED_TRANSFER_SYNTAX),
                    patient_id: here.patient_id.clone(),
                    study_instance_uid: here.study_uid.clone(),
                    series_instance_uid: here.series_uid.clone(),
                    modality: here.modality.clone(),
                }),
                Err(why) => self.missing.push((shown, why)),
            }
        }
        for child in record.children {
            self.walk(child, &here, names);
        }
    }

    /// The file a File ID names, inside the root, found ignoring case.
    fn resolve(&self, components: &[&str], names: &mut Names) -> Result<PathBuf, String> {
        let mut path = self.root.clone();
        for component in components {
            if component.is_empty()
                || component.contains(['/', '\0'])
                || *component == ".."
                || *component == "."
            {
                return Err(format!(
                    "the File ID component {component:?} is not allowed"
                ));
            }
            path = names
                .find(&path, component)
                .ok_or_else(|| "which does not exist".to_owned())?;
        }
        if path.is_file() {
            Ok(path)
        } else {
            Err("which is not a file".into())
        }
    }

    /// The instances the DICOMDIR lists whose files exist, in DICOMDIR order.
    pub fn instances(&self) -> &[InstanceEntry] {
        &self.instances
    }

    /// What the reader could not use (unlinked records, records without a UID, ...).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// File IDs the DICOMDIR references that are not there, with why.
    pub fn missing(&self) -> &[(String, String)] {
        &self.missing
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The set's manifest, if it has one (our sets always do).
    ///
    /// # Errors
    /// [`PdiError::Broken`] when it is there but unreadable or not a cloudpdi manifest.
    pub fn manifest(&self) -> Result<Option<Manifest>, PdiError> {
        let mut names = Names::default();
        let Some(folder) = names.find(&self.root, "CLOUDPDI") else {
            return Ok(None);
        };
        let Some(path) = names.find(&folder, "MANIFEST.JSON") else {
            return Ok(None);
        };
        let file = File::open(&path).map_err(|e| PdiError::io(&path, e))?;
        let mut text = Vec::new();
        file.take(manifest::MAX_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| PdiError::io(&path, e))?;
        Self::parse_manifest(&text).map(Some)
    }

    /// Reads a manifest's text, checked as [`FileSet::manifest`] checks it: also for the
    /// receiver that meets the manifest first in an archive still arriving.
    ///
    /// # Errors
    /// [`PdiError::Broken`] when it is too large or not a cloudpdi manifest.
    pub fn parse_manifest(text: &[u8]) -> Result<Manifest, PdiError> {
        if text.len() as u64 > manifest::MAX_BYTES {
            return Err(PdiError::Broken(format!(
                "{} is larger than any manifest",
                manifest::PATH
            )));
        }
        let manifest: Manifest = serde_json::from_slice(text).map_err(|e| {
            PdiError::Broken(format!("{} is not a valid manifest: {e}", manifest::PATH))
        })?;
        if manifest.format != manifest::FORMAT || manifest.version != 1 {
            return Err(PdiError::Broken(format!(
                "{} has format {:?} version {}, expected {:?} version 1",
                manifest::PATH,
                manifest.format,
                manifest.version,
                manifest::FORMAT
            )));
        }
        Ok(manifest)
    }
}

#[derive(Debug, Clone, Default)]
struct Context {
    patient_id: String,
    study_uid: String,
    series_uid: String,
    modality: String,
}

/// Verifies a file set given as a folder or a ZIP file (extracted safely into a temporary
/// folder that is removed afterwards).
///
/// # Errors
/// [`PdiError::Broken`] (or a ZIP, DICOMDIR or instance error) with a message naming the
/// file and what is wrong.
pub fn verify(path: &Path) -> Result<Summary, PdiError> {
    if path.is_dir() {
        return verify_dir(path);
    }
    let scratch =
        std::env::temp_dir().join(format!("cloudpdi-verify-{}", &dicomdir::new_uid()[5..21]));
    let result = zip::extract(path, &scratch, Limits::default())
        .map_err(PdiError::from)
        .and_then(|_| verify_dir(&scratch));
    let _ = fs::remove_dir_all(&scratch);
    result
}

/// Verifies a file set in a folder.
///
/// # Errors
/// As [`verify`].
pub fn verify_dir(root: &Path) -> Result<Summary, PdiError> {
    verify_extracted(root, &HashSet::new())
}

/// Verifies a file set that this process has just extracted, hashing each file against
/// the manifest as it wrote it (the inbound stream): the same checks as [`verify_dir`],
/// but the files in `matched` are not read a second time for their SHA-256 (their size on
/// disk is still compared). At the receiver that second pass was the whole study hashed
/// again at the end of the import. A matched file altered on disk since (in the
/// receiver's private folder, mode 0600) is then caught by its size only.
///
/// # Errors
/// As [`verify`].
pub fn verify_extracted(root: &Path, matched: &HashSet<PathBuf>) -> Result<Summary, PdiError> {
    let set = FileSet::open(root)?;
    if let Some((file_id, why)) = set.missing.first() {
        return Err(PdiError::Broken(format!(
            "the DICOMDIR references {file_id}, {why} ({} referenced files missing)",
            set.missing.len()
        )));
    }
    let mut referenced = HashSet::new();
    for entry in &set.instances {
        check_instance(entry)?;
        referenced.insert(entry.path.clone());
    }
    let files = all_files(root)?;
    for file in &files {
        if *file != set.dicomdir_path && !referenced.contains(file) && instance::is_part10(file) {
            return Err(PdiError::Broken(format!(
                "{} is a DICOM file that the DICOMDIR does not reference",
                relative(root, file)
            )));
        }
    }
    let mut summary = Summary {
        file_set_id: set.dicomdir.file_set_id.clone(),
        instances: set.instances.len(),
        files: files.len(),
        problems: set.problems.clone(),
        ..Summary::default()
    };
    let mut modalities = BTreeSet::new();
    for record in &set.dicomdir.records {
        match record.kind.as_str() {
            "PATIENT" => summary.patients += 1,
            "STUDY" => summary.studies += 1,
            "SERIES" => {
                summary.series += 1;
                modalities.insert(record.text(tags::MODALITY));
            }
            _ => {}
        }
    }
    summary.modalities = modalities.into_iter().filter(|m| !m.is_empty()).collect();
    for file in &files {
        summary.bytes += fs::metadata(file).map_err(|e| PdiError::io(file, e))?.len();
    }
    if let Some(manifest) = set.manifest()? {
        check_manifest(&set, &manifest, &files, matched)?;
        summary.manifest = true;
        summary.ai_labelled = manifest
            .files
            .iter()
            .filter(|f| f.ai_support.is_some())
            .count();
        summary.ai_excluded = manifest.excluded.len();
    }
    Ok(summary)
}

fn relative(root: &Path, file: &Path) -> String {
    file.strip_prefix(root)
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned()
}

/// The instance file must carry the UIDs its record names.
fn check_instance(entry: &InstanceEntry) -> Result<(), PdiError> {
    let header = instance::read(&entry.path).map_err(|e| {
        PdiError::Broken(format!(
            "the DICOMDIR references {}, which cannot be read as DICOM: {e}",
            entry.file_id
        ))
    })?;
    let mismatch = |what: &str, record: &str, file: &str| {
        Err(PdiError::Broken(format!(
            "{}: the DICOMDIR record says {what} {record}, the file holds {file}",
            entry.file_id
        )))
    };
    if header.sop_instance_uid != entry.sop_instance_uid {
        return mismatch(
            "SOP Instance UID",
            &entry.sop_instance_uid,
            &header.sop_instance_uid,
        );
    }
    if !entry.sop_class_uid.is_empty() && header.sop_class_uid != entry.sop_class_uid {
        return mismatch("SOP Class UID", &entry.sop_class_uid, &header.sop_class_uid);
    }
    if !entry.transfer_syntax_uid.is_empty() && header.transfer_syntax != entry.transfer_syntax_uid
    {
        return mismatch(
            "Transfer Syntax UID",
            &entry.transfer_syntax_uid,
            &header.transfer_syntax,
        );
    }
    if !entry.study_instance_uid.is_empty() && header.study_uid != entry.study_instance_uid {
        return mismatch(
            "Study Instance UID",
            &entry.study_instance_uid,
            &header.study_uid,
        );
    }
    if !entry.series_instance_uid.is_empty() && header.series_uid != entry.series_instance_uid {
        return mismatch(
            "Series Instance UID",
            &entry.series_instance_uid,
            &header.series_uid,
        );
    }
    Ok(())
}

/// Every regular file under `root` (symbolic links are refused: a set is plain files),
/// at most [`MAX_FILES`].
fn all_files(root: &Path) -> Result<Vec<PathBuf>, PdiError> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_owned();
            PdiError::io(&path, e.into())
        })?;
        if entry.path_is_symlink() {
            return Err(PdiError::Broken(format!(
                "{} is a symbolic link; a file set holds plain files only",
                relative(root, entry.path())
            )));
        } else if !entry.file_type().is_dir() {
            out.push(entry.into_path());
        }
        if out.len() > MAX_FILES {
            return Err(PdiError::Broken(format!(
                "more than {MAX_FILES} files: not a file set this tool accepts"
            )));
        }
    }
    out.sort();
    Ok(out)
}

fn check_manifest(
    set: &FileSet,
    manifest: &Manifest,
    files: &[PathBuf],
    matched: &HashSet<PathBuf>,
) -> Result<(), PdiError> {
    let root = set.root();
    let by_uid: HashMap<&str, &InstanceEntry> = set
        .instances
        .iter()
        .map(|e| (e.sop_instance_uid.as_str(), e))
        .collect();
    let mut listed = HashSet::new();
    for file in &manifest.files {
        let broken = |why: String| PdiError::Broken(format!("manifest entry {}: {why}", file.path));
        let relative = zip::check_name(&file.path).map_err(|why| broken(why.to_owned()))?;
        let path = root.join(&relative);
        if listed.contains(&path) {
            // Two claims for one file: a reader keeping either could take the false one.
            return Err(broken("listed twice".into()));
        }
        let meta = fs::symlink_metadata(&path).map_err(|_| broken("the file is missing".into()))?;
        if !meta.is_file() {
            return Err(broken("not a plain file".into()));
        }
        if meta.len() != file.size {
            return Err(broken(format!(
                "size {} in the manifest, {} on disk",
                file.size,
                meta.len()
            )));
        }
        if !matched.contains(&path) {
            let hash = hash_file(&path).map_err(|e| PdiError::io(&path, e))?;
            if !file.names_digest(&hash.sha256) {
                return Err(broken(manifest::SHA256_MISMATCH.into()));
            }
        }
        if let Some(ids) = &file.dicom {
            let entry = by_uid.get(ids.sop_instance_uid.as_str()).ok_or_else(|| {
                broken(format!(
                    "SOP Instance UID {} is not in the DICOMDIR",
                    ids.sop_instance_uid
                ))
            })?;
            if entry.path != path {
                return Err(broken(format!(
                    "the DICOMDIR places SOP Instance UID {} at {}",
                    ids.sop_instance_uid, entry.file_id
                )));
            }
        }
        listed.insert(path);
    }
    let manifest_path = root.join(manifest::PATH);
    for file in files {
        if *file != manifest_path && !listed.contains(file) {
            return Err(PdiError::Broken(format!(
                "{} is not in the manifest",
                relative(root, file)
            )));
        }
    }
    if let Some(entry) = set.instances.iter().find(|e| !listed.contains(&e.path)) {
        return Err(PdiError::Broken(format!(
            "{} is referenced by the DICOMDIR but not in the manifest",
            entry.file_id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_ignoring_case_version_and_trailing_dot() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["im000001.;1", "Im000002", "IM000003."] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        let mut names = Names::default();
        for (want, found) in [
            ("IM000001", "im000001.;1"),
            ("IM000002", "Im000002"),
            ("im000003", "IM000003."),
        ] {
            assert_eq!(
                names.find(dir.path(), want),
                Some(dir.path().join(found)),
                "{want}"
            );
        }
        assert_eq!(names.find(dir.path(), "IM000004"), None);
    }

    /// Issue 12 item 10: resolving every name of a folder reads the folder once (each
    /// lookup used to scan it again, so 8 times the files took 64 times as long). A file
    /// added after the first lookup is not seen, which shows that no lookup reads again.
    #[test]
    fn resolving_every_name_of_a_folder_reads_it_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in 0..2_000 {
            fs::write(dir.path().join(format!("im{n:06}")), b"").expect("write");
        }
        let mut names = Names::default();
        assert!(names.find(dir.path(), "IM000000").is_some());
        fs::write(dir.path().join("im999999"), b"").expect("write");
        for n in 0..2_000 {
            assert!(
                names.find(dir.path(), &format!("IM{n:06}")).is_some(),
                "{n}"
            );
        }
        assert_eq!(names.find(dir.path(), "IM999999"), None);
    }
}
