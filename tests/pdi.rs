//! PDI file sets (`cloudpdi pdi build|verify`, `cloudpdi::pdi`) checked by real tools:
//! dicom3tools `dciodvfy`, DCMTK `dcmdump` and `dcmmkdir`, pydicom's `FileSet`, Info-ZIP
//! `unzip`, and Orthanc importing our ZIP over its REST API.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cloudpdi::pdi::{self, AiAction, AiPolicy, BuildOptions, FileSet};
use common::*;

fn cloudpdi(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args(args))
}

fn build(inputs: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["pdi".into(), "build".into()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    args.extend(["--out".into(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args(&args));
    assert!(out.status.success(), "pdi build failed: {}", text(&out));
    out
}

fn verify(path: &Path) -> Output {
    cloudpdi(&["pdi", "verify", &path.display().to_string()])
}

fn assert_broken(path: &Path, expected: &str) {
    let out = verify(path);
    assert!(!out.status.success(), "verify accepted a broken set");
    assert!(
        text(&out).contains(expected),
        "expected {expected:?} in: {}",
        text(&out)
    );
}

/// SOP Instance UIDs of every DICOM file of a list of files and folders.
fn uids_of(paths: &[PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for path in paths {
        if path.is_dir() {
            out.extend(uids_of(&files_in(path)));
        } else {
            out.insert(sop_instance_uid(path));
        }
    }
    out
}

/// dciodvfy's error lines for a DICOMDIR (warnings are returned separately).
fn dciodvfy(dicomdir: &Path) -> (Vec<String>, Vec<String>) {
    let out = run(Command::new(require("/usr/bin/dciodvfy")).arg(dicomdir));
    let all = text(&out);
    let errors = all
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_owned)
        .collect();
    let warnings = all
        .lines()
        .filter(|l| l.starts_with("Warning"))
        .map(str::to_owned)
        .collect();
    (errors, warnings)
}

/// pydicom's FileSet view of a set: (SOP Instance UIDs, patient names).
fn pydicom_fileset(set: &Path) -> (BTreeSet<String>, Vec<String>) {
    let out = run(Command::new("python3")
        .arg(root().join("tests/peers/pdi_fileset.py"))
        .arg(set));
    assert!(out.status.success(), "pydicom FileSet: {}", text(&out));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uids = found["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sop_instance_uid"].as_str().unwrap().to_owned())
        .collect();
    let names = found["patient_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    (uids, names)
}

#[test]
fn generated_ct_set_is_valid_for_dciodvfy_dcmdump_pydicom_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    let utf8 = dir.path().join("utf8");
    gen_ct(&ct, 30, &["--charset", "iso2022"]);
    gen_ct(
        &utf8,
        3,
        &["--charset", "utf8", "--patient-id", "PID2", "--seed", "2"],
    );
    let set = dir.path().join("set");
    build(&[&ct, &utf8], &set, &["--facility", "Kyoto Univ Hospital"]);

    let (errors, warnings) = dciodvfy(&set.join("DICOMDIR"));
    assert!(errors.is_empty(), "dciodvfy errors: {errors:#?}");
    assert!(warnings.is_empty(), "dciodvfy warnings: {warnings:#?}");
    let dump = run(Command::new(require("/usr/bin/dcmdump")).arg(set.join("DICOMDIR")));
    assert!(dump.status.success(), "dcmdump: {}", text(&dump));
    assert!(text(&dump).contains("DICOM\\PA000001\\ST000001\\SE000001\\IM000030"));

    let (uids, names) = pydicom_fileset(&set);
    assert_eq!(uids, uids_of(&[ct.clone(), utf8.clone()]));
    assert!(!names.is_empty());
    for name in names {
        assert!(name.contains("山田^太郎"), "Japanese name decoded: {name}");
    }
    for file in walk(&set.join("DICOM")) {
        let id: Vec<String> = file
            .strip_prefix(&set)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let refs: Vec<&str> = id.iter().map(String::as_str).collect();
        assert!(pdi::layout::is_valid_file_id(&refs), "{id:?}");
    }

    let out = verify(&set);
    assert!(out.status.success(), "{}", text(&out));
    let summary = text(&out);
    for line in [
        "patients: 2",
        "studies: 2",
        "series: 2",
        "instances: 33",
        "modalities: CT",
    ] {
        assert!(summary.contains(line), "{line} in {summary}");
    }
    let readme = fs::read_to_string(set.join("README.TXT")).unwrap();
    assert!(readme.contains("Kyoto Univ Hospital"), "{readme}");
    assert!(readme.is_ascii() && readme.contains("\r\n"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The pydicom corpus: many transfer syntaxes, SR, segmentation, waveforms, and names in
/// ten character sets. The only dciodvfy errors left are the illegal UID root "999.999"
/// that one corpus file carries in its own UIDs (copied, never changed; docs/pdi.md).
#[test]
fn pydicom_corpus_set_is_valid_and_keeps_every_character_set() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_files();
    let zip = dir.path().join("corpus.zip");
    let inputs: Vec<&Path> = corpus.iter().map(PathBuf::as_path).collect();
    build(&inputs, &zip, &[]);
    let unzip = run(Command::new(require("/usr/bin/unzip"))
        .arg("-q")
        .arg(&zip)
        .arg("-d")
        .arg(dir.path().join("set")));
    assert!(unzip.status.success(), "unzip: {}", text(&unzip));
    let set = dir.path().join("set");

    let (errors, _) = dciodvfy(&set.join("DICOMDIR"));
    let unexplained: Vec<&String> = errors
        .iter()
        .filter(|e| !e.contains("Illegal root for UID - \"999.999."))
        .collect();
    assert!(unexplained.is_empty(), "dciodvfy errors: {unexplained:#?}");
    let dump = run(Command::new(require("/usr/bin/dcmdump")).arg(set.join("DICOMDIR")));
    assert!(dump.status.success(), "dcmdump: {}", text(&dump));

    let (uids, names) = pydicom_fileset(&set);
    assert_eq!(uids, uids_of(&corpus));
    for expected in [
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        "Hong^Gildong=洪^吉洞=홍^길동",
        "Buc^Jérôme",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let out = verify(&zip);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("instances: {}", corpus.len())));
}

#[test]
fn library_zip_streams_into_any_writer_and_reads_back_through_the_dicomdir() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    gen_ct(&ct, 4, &[]);
    let letter = dir.path().join("紹介状 letter.pdf");
    fs::write(&letter, b"%PDF-1.4 referral").unwrap();
    let options = BuildOptions {
        facility: "Osaka Clinic".into(),
        attachments: vec![letter],
        ..BuildOptions::default()
    };
    let mut bytes = Vec::new();
    let report = pdi::build_zip(std::slice::from_ref(&ct), &options, &mut bytes).unwrap();
    assert_eq!((report.instances, report.attachments), (4, 1));
    assert_eq!(report.bytes as usize, bytes.len() - central_size(&bytes));
    let zip = dir.path().join("set.zip");
    fs::write(&zip, &bytes).unwrap();
    let test = run(Command::new(require("/usr/bin/unzip")).arg("-tq").arg(&zip));
    assert!(test.status.success(), "unzip -t: {}", text(&test));

    let out = dir.path().join("out");
    pdi::extract_zip(&zip, &out).unwrap();
    assert!(out.join("ATTACH/____letter.pdf").is_file());
    let set = FileSet::open(&out).unwrap();
    assert_eq!(set.instances().len(), 4);
    assert!(set.problems().is_empty());
    let manifest = set.manifest().unwrap().unwrap();
    assert_eq!(manifest.facility, "Osaka Clinic");
    for instance in set.instances() {
        assert_eq!(sop_instance_uid(&instance.path), instance.sop_instance_uid);
        assert_eq!(instance.record_type, "IMAGE");
        assert_eq!(instance.modality, "CT");
    }
    let summary = pdi::verify(&zip).unwrap();
    assert_eq!((summary.instances, summary.patients), (4, 1));
    assert!(summary.manifest);
}

/// Bytes of the central directory and end records of a ZIP we wrote (the report counts
/// the bytes written before them).
fn central_size(zip: &[u8]) -> usize {
    let end = zip.len() - 22;
    let size = u32::from_le_bytes(zip[end + 12..end + 16].try_into().unwrap());
    size as usize + 22
}

fn small_set(dir: &Path, slices: usize) -> PathBuf {
    let ct = dir.join("ct");
    gen_ct(&ct, slices, &[]);
    let set = dir.join("set");
    build(&[&ct], &set, &[]);
    set
}

#[test]
fn fail_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), 3);
    fs::remove_file(set.join("DICOM/PA000001/ST000001/SE000001/IM000002")).unwrap();
    assert_broken(
        &set,
        "references DICOM/PA000001/ST000001/SE000001/IM000002, which does not exist",
    );
}

#[test]
fn fail_wrong_offset_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), 3);
    let path = set.join("DICOMDIR");
    let mut bytes = fs::read(&path).unwrap();
    // (0004,1200) UL: the first record's offset, moved by two bytes.
    let at = bytes
        .windows(6)
        .position(|w| w == [0x04, 0x00, 0x00, 0x12, b'U', b'L'])
        .unwrap()
        + 8;
    let first = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    bytes[at..at + 4].copy_from_slice(&(first + 2).to_le_bytes());
    fs::write(&path, bytes).unwrap();
    assert_broken(&set, "does not point at a directory record");
}

#[test]
fn fail_manifest_hash_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), 3);
    let path = set.join("DICOM/PA000001/ST000001/SE000001/IM000003");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    fs::write(&path, bytes).unwrap();
    assert_broken(
        &set,
        "DICOM/PA000001/ST000001/SE000001/IM000003: its SHA-256 does not match",
    );
}

#[test]
fn fail_unreferenced_dicom_file_and_wrong_uid_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), 3);
    let one = set.join("DICOM/PA000001/ST000001/SE000001/IM000001");
    fs::create_dir(set.join("EXTRA")).unwrap();
    fs::copy(&one, set.join("EXTRA/IM1")).unwrap();
    assert_broken(
        &set,
        "EXTRA/IM1 is a DICOM file that the DICOMDIR does not reference",
    );
    fs::remove_dir_all(set.join("EXTRA")).unwrap();
    fs::copy(set.join("DICOM/PA000001/ST000001/SE000001/IM000002"), &one).unwrap();
    assert_broken(&set, "the DICOMDIR record says SOP Instance UID");
}

/// Writes a ZIP with Python's zipfile: `entries` are (name, data).
fn python_zip(path: &Path, entries: &[(&str, &str)]) {
    let script = format!(
        "import zipfile\nwith zipfile.ZipFile({:?}, 'w') as z:\n{}",
        path.display().to_string(),
        entries
            .iter()
            .map(|(n, d)| format!("    z.writestr({n:?}, {d:?})\n"))
            .collect::<String>()
    );
    let out = run(Command::new("python3").args(["-c", &script]));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn fail_zip_entry_climbing_out_writes_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("evil.zip");
    python_zip(
        &zip,
        &[
            ("DICOMDIR", "x"),
            ("../escaped.txt", "owned"),
            ("ok.txt", "y"),
        ],
    );
    let target = dir.path().join("inner").join("target");
    fs::create_dir(dir.path().join("inner")).unwrap();
    let err = pdi::extract_zip(&zip, &target).unwrap_err().to_string();
    assert!(
        err.contains("\"../escaped.txt\"") && err.contains(".."),
        "{err}"
    );
    assert!(!dir.path().join("inner/escaped.txt").exists());
    assert!(!dir.path().join("escaped.txt").exists());
    assert!(!target.exists(), "a refused archive leaves nothing behind");
    assert_broken(&zip, "unsafe entry name \"../escaped.txt\"");

    python_zip(&zip, &[("/etc/absolute.txt", "x")]);
    assert_broken(&zip, "the name is absolute");
}

#[test]
fn fail_zip_whose_declared_sizes_lie() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    gen_ct(&ct, 2, &[]);
    let zip = dir.path().join("set.zip");
    build(&[&ct], &zip, &[]);
    let good = fs::read(&zip).unwrap();
    let central = good.len() - central_size(&good);
    // First central directory entry (the manifest, first since issue 15): uncompressed
    // and compressed size fields.
    let mut lie = good.clone();
    for field in [central + 20, central + 24] {
        let size = u32::from_le_bytes(lie[field..field + 4].try_into().unwrap());
        lie[field..field + 4].copy_from_slice(&(size + 100).to_le_bytes());
    }
    fs::write(&zip, &lie).unwrap();
    assert_broken(&zip, "its data overlaps another entry's");
    // A size far beyond the archive.
    let mut lie = good.clone();
    for field in [central + 20, central + 24] {
        lie[field..field + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    }
    fs::write(&zip, &lie).unwrap();
    assert_broken(&zip, "its declared size runs past the data area");
    // The local header of the first entry declares another size than the central one.
    let mut lie = good.clone();
    lie[22] ^= 1;
    fs::write(&zip, &lie).unwrap();
    assert_broken(
        &zip,
        "ZIP entry \"CLOUDPDI/MANIFEST.JSON\": its local header and the central directory",
    );
    // The CRC of the central directory differs from the local header's.
    let mut lie = good;
    lie[central + 16] ^= 1;
    fs::write(&zip, &lie).unwrap();
    assert_broken(&zip, "declare different sizes or CRC");
}

fn cad_study(dir: &Path) -> (PathBuf, String) {
    let study = dir.join("study");
    let uid = gen_ct(&study, 3, &["--patient-id", "PID9"]);
    let out = run(Command::new("python3")
        .arg(root().join("tests/peers/pdi_cad.py"))
        .arg(study.join("CAD.dcm"))
        .args([&uid, "PID9"]));
    assert!(out.status.success(), "{}", text(&out));
    (
        study,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

fn manifest_of(set: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(set.join("CLOUDPDI/MANIFEST.JSON")).unwrap()).unwrap()
}

#[test]
fn ai_support_image_is_excluded_labelled_or_included_as_the_rule_says() {
    let dir = tempfile::tempdir().unwrap();
    let (study, cad_uid) = cad_study(dir.path());

    // Default rules, exclude.
    let excluded = dir.path().join("excluded");
    build(&[&study], &excluded, &["--ai-action", "exclude"]);
    let manifest = manifest_of(&excluded);
    assert_eq!(
        manifest["excluded"][0]["sop_instance_uid"],
        cad_uid.as_str()
    );
    assert_eq!(FileSet::open(&excluded).unwrap().instances().len(), 3);
    assert!(
        fs::read_to_string(excluded.join("README.TXT"))
            .unwrap()
            .contains("left out")
    );
    assert!(verify(&excluded).status.success());

    // Label (the default action), marked in the Series Description as well.
    let labelled = dir.path().join("labelled");
    build(&[&study], &labelled, &["--ai-mark-series"]);
    let readme = fs::read_to_string(labelled.join("README.TXT")).unwrap();
    let index = fs::read_to_string(labelled.join("INDEX.HTM")).unwrap();
    assert!(
        readme.contains("AI support image, not a diagnosis"),
        "{readme}"
    );
    assert!(
        index.contains("AI support image, not a diagnosis"),
        "{index}"
    );
    let manifest = manifest_of(&labelled);
    let files = manifest["files"].as_array().unwrap();
    let cad: Vec<&serde_json::Value> = files
        .iter()
        .filter(|f| f["ai_support"] == "AI support image, not a diagnosis")
        .collect();
    assert_eq!(cad.len(), 1, "{manifest:#}");
    assert_eq!(cad[0]["dicom"]["sop_instance_uid"], cad_uid.as_str());
    let cad_file = labelled.join(cad[0]["path"].as_str().unwrap());
    assert!(readme.contains(cad[0]["path"].as_str().unwrap()));
    let description = dataset(&cad_file)
        .element(dicom_dictionary_std::tags::SERIES_DESCRIPTION)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        description.trim(),
        "[AI support, not a diagnosis] CAD overlay"
    );
    let (errors, _) = dciodvfy(&labelled.join("DICOMDIR"));
    assert!(errors.is_empty(), "{errors:#?}");
    let out = verify(&labelled);
    assert!(
        text(&out).contains("AI support images: 1 labelled"),
        "{}",
        text(&out)
    );

    // Include: the CAD overlay travels unmarked, byte for byte.
    let included = dir.path().join("included");
    build(&[&study], &included, &["--ai-action", "include"]);
    assert!(
        !fs::read_to_string(included.join("README.TXT"))
            .unwrap()
            .contains("AI support")
    );
    assert_eq!(FileSet::open(&included).unwrap().instances().len(), 4);

    // A site rule on the private tag only (the default rules are replaced).
    let private = dir.path().join("private");
    build(
        &[&study],
        &private,
        &[
            "--ai-action",
            "exclude",
            "--ai-rule",
            "private_tag=00291001,private_creator=ACME AI RESULT,private_value=CTR*",
        ],
    );
    assert_eq!(
        manifest_of(&private)["excluded"].as_array().unwrap().len(),
        1
    );
    // A rule that does not match leaves it in.
    let other = dir.path().join("other");
    build(
        &[&study],
        &other,
        &[
            "--ai-action",
            "exclude",
            "--ai-rule",
            "manufacturer=OTHER VENDOR",
        ],
    );
    assert!(manifest_of(&other).get("excluded").is_none());
}

#[test]
fn policy_from_route_configuration() {
    let toml = "[route.ct]\nae_title = \"CLOUDPDI\"\n\
                [route.ct.ai_support]\naction = \"exclude\"\n\
                [[route.ct.ai_support.rule]]\nsop_class = \"1.2.840.10008.5.1.4.1.1.7\"\n\
                series_description = \"*overlay*\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    fs::write(&path, toml).unwrap();
    let config = cloudpdi::config::Config::load(&path).unwrap();
    let policy: &AiPolicy = &config.routes["ct"].ai_support;
    assert_eq!(policy.action, AiAction::Exclude);
    assert_eq!(policy.rules.len(), 1);
    let (study, _) = cad_study(dir.path());
    let options = BuildOptions {
        policy: policy.clone(),
        ..BuildOptions::default()
    };
    let report = pdi::build_dir(&[study], &options, &dir.path().join("set")).unwrap();
    assert_eq!((report.instances, report.excluded), (3, 1));
}

/// A set made by DCMTK `dcmmkdir`, then treated like a disc burner's: names in lower case
/// and an extra folder with a viewer program. Our reader finds every instance.
#[test]
fn reads_a_dcmmkdir_set_with_lower_case_names_and_extra_folders() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    gen_ct(&ct, 5, &["--charset", "iso2022"]);
    let disc = dir.path().join("disc");
    fs::create_dir_all(disc.join("IMAGES")).unwrap();
    for (i, file) in files_in(&ct).iter().enumerate() {
        fs::copy(file, disc.join(format!("IMAGES/IM{}", i + 1))).unwrap();
    }
    let out = run(Command::new(require("/usr/bin/dcmmkdir"))
        .current_dir(&disc)
        .args(["+r", "IMAGES"]));
    assert!(out.status.success(), "dcmmkdir: {}", text(&out));
    fs::rename(disc.join("IMAGES"), disc.join("images")).unwrap();
    for i in 1..=5 {
        fs::rename(
            disc.join(format!("images/IM{i}")),
            disc.join(format!("images/im{i}")),
        )
        .unwrap();
    }
    fs::rename(disc.join("DICOMDIR"), disc.join("dicomdir")).unwrap();
    fs::create_dir(disc.join("VIEWER")).unwrap();
    fs::write(disc.join("VIEWER/viewer.exe"), b"MZ").unwrap();

    let set = FileSet::open(&disc).unwrap();
    let found: BTreeSet<String> = set
        .instances()
        .iter()
        .map(|i| i.sop_instance_uid.clone())
        .collect();
    assert_eq!(found, uids_of(&[ct]));
    assert!(set.missing().is_empty() && set.manifest().unwrap().is_none());
    let out = verify(&disc);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("instances: 5"), "{}", text(&out));
}

/// Orthanc imports our ZIP through its REST API (POST /instances with the archive) and
/// then holds exactly the instances of the set.
#[test]
fn orthanc_imports_our_zip_with_exactly_its_instances() {
    require("/usr/sbin/Orthanc");
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    gen_ct(&ct, 20, &["--charset", "iso2022"]);
    let (study, cad_uid) = cad_study(dir.path());
    let zip = dir.path().join("set.zip");
    build(&[&ct, &study], &zip, &["--ai-action", "exclude"]);
    let config = orthanc_config(dir.path());
    let out = in_netns(&format!(
        "/usr/sbin/Orthanc '{}' >'{}.log' 2>&1 & peer=$!
         for i in $(seq 300); do curl -sf http://127.0.0.1:8042/system >/dev/null && break; sleep 0.1; done
         curl -sf -X POST --data-binary @'{}' http://127.0.0.1:8042/instances >/dev/null
         for i in $(curl -sf http://127.0.0.1:8042/instances | python3 -c 'import json,sys; print(\" \".join(json.load(sys.stdin)))'); do
           curl -sf http://127.0.0.1:8042/instances/$i/simplified-tags | python3 -c 'import json,sys; print(\"UID\", json.load(sys.stdin)[\"SOPInstanceUID\"])'
         done",
        config.display(),
        config.display(),
        zip.display()
    ));
    assert!(out.status.success(), "{}", text(&out));
    let stored: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("UID "))
        .map(str::to_owned)
        .collect();
    let mut expected = uids_of(&[ct, study]);
    assert!(expected.remove(&cad_uid), "the CAD overlay was an input");
    assert_eq!(stored, expected, "{}", text(&out));
}

/// A file written with holes where the data is zeros: a ZIP64-sized entry of zeros costs
/// no disk space and little time.
struct Sparse {
    file: fs::File,
    zeros: Vec<u8>,
}

impl std::io::Write for Sparse {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() <= self.zeros.len() && buf == &self.zeros[..buf.len()] {
            use std::io::Seek;
            self.file
                .seek(std::io::SeekFrom::Current(buf.len() as i64))?;
            Ok(buf.len())
        } else {
            self.file.write(buf)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[test]
fn zip64_archives_are_read_by_info_zip_python_and_our_extractor() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    // An entry of 4 GiB + 10 bytes (ZIP64 sizes), and one after it at an offset past
    // 4 GiB (ZIP64 offset; the central directory starts there too).
    let big = dir.path().join("big.zip");
    let size = (4u64 << 30) + 10;
    let chunk = vec![0u8; 1 << 20];
    let mut crc = crc32fast::Hasher::new();
    for _ in 0..size / chunk.len() as u64 {
        crc.update(&chunk);
    }
    crc.update(&chunk[..(size % chunk.len() as u64) as usize]);
    let sparse = Sparse {
        file: fs::File::create(&big).unwrap(),
        zeros: vec![0u8; 1 << 20],
    };
    let mut zip = pdi::zip::ZipWriter::new(sparse, 1_795_000_000);
    zip.add(
        "DICOM/BIG",
        size,
        crc.finalize(),
        &mut std::io::repeat(0).take(size),
    )
    .unwrap();
    zip.add_bytes("README.TXT", b"after the big one").unwrap();
    zip.finish().unwrap();
    let test = run(Command::new(require("/usr/bin/unzip")).arg("-tq").arg(&big));
    assert!(test.status.success(), "unzip -t: {}", text(&test));
    let python = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile\n\
         z = zipfile.ZipFile(sys.argv[1])\n\
         assert z.testzip() is None\n\
         for i in z.infolist(): print(i.filename, i.file_size, i.header_offset)\n",
        )
        .arg(&big));
    assert!(python.status.success(), "python zipfile: {}", text(&python));
    let listed = String::from_utf8_lossy(&python.stdout).into_owned();
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert_eq!(lines[0], format!("DICOM/BIG {size} 0"));
    let after: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(&after[..2], ["README.TXT", "17"]);
    assert!(after[2].parse::<u64>().unwrap() > size, "{listed}");

    // More entries than the 16-bit count of the classic end record holds.
    let many = dir.path().join("many.zip");
    let count = 65_540u64;
    let mut zip = pdi::zip::ZipWriter::new(
        std::io::BufWriter::new(fs::File::create(&many).unwrap()),
        1_795_000_000,
    );
    for i in 0..count {
        zip.add_bytes(
            &format!("F{}/{i}", i % 100),
            format!("entry {i}").as_bytes(),
        )
        .unwrap();
    }
    zip.finish().unwrap();
    let test = run(Command::new(require("/usr/bin/unzip"))
        .arg("-tq")
        .arg(&many));
    assert!(test.status.success(), "unzip -t: {}", text(&test));
    let out = dir.path().join("many");
    let extracted = pdi::zip::extract(&many, &out, pdi::zip::Limits::default()).unwrap();
    assert_eq!(extracted.files, count);
    assert_eq!(
        fs::read_to_string(out.join("F39/65539")).unwrap(),
        "entry 65539"
    );
}

/// A SOP Instance UID is data: one written as a path must not place the marked copy of
/// an AI support image outside the build's scratch folder.
#[test]
fn a_marked_copy_stays_in_the_scratch_folder_whatever_its_uid() {
    let dir = tempfile::tempdir().unwrap();
    let (study, _) = cad_study(dir.path());
    let cad = study.join("CAD.dcm");
    let rewrite = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, pydicom\n\
             ds = pydicom.dcmread(sys.argv[1])\n\
             ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = '../../escape'\n\
             ds.save_as(sys.argv[1])\n",
        )
        .arg(&cad));
    assert!(rewrite.status.success(), "{}", text(&rewrite));
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let set = dir.path().join("set");
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .env("TMPDIR", &tmp)
        .args(["pdi", "build"])
        .arg(&study)
        .arg("--out")
        .arg(&set)
        .arg("--ai-mark-series"));
    assert!(out.status.success(), "pdi build: {}", text(&out));
    assert!(!dir.path().join("escape.dcm").exists(), "the copy escaped");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "scratch left behind"
    );
    let manifest = manifest_of(&set);
    let marked: Vec<&serde_json::Value> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["dicom"]["sop_instance_uid"] == "../../escape")
        .collect();
    assert_eq!(marked.len(), 1, "{manifest}");
    assert_eq!(marked[0]["ai_support"], "AI support image, not a diagnosis");
    let copy = set.join(marked[0]["path"].as_str().unwrap());
    let dump = run(Command::new(require("/usr/bin/dcmdump"))
        .args(["+P", "0008,103e"])
        .arg(&copy));
    assert!(
        text(&dump).contains("[AI support, not a diagnosis]"),
        "{}",
        text(&dump)
    );
}

/// INDEX.HTM is optional: left out, it is neither in the set nor in its manifest, and the
/// set still verifies.
#[test]
fn index_htm_can_be_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    gen_ct(&ct, 2, &[]);
    let with = dir.path().join("with");
    build(&[&ct], &with, &[]);
    assert!(with.join("INDEX.HTM").is_file());
    let without = dir.path().join("without");
    build(&[&ct], &without, &["--no-index-htm"]);
    assert!(!without.join("INDEX.HTM").exists());
    assert!(without.join("README.TXT").is_file());
    let listed: Vec<String> = manifest_of(&without)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(!listed.iter().any(|p| p == "INDEX.HTM"), "{listed:?}");
    let out = verify(&without);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn hashes_known_from_the_spool_are_used_while_the_file_is_the_one_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    gen_ct(&ct, 3, &[]);
    let files = files_in(&ct);
    let known = |path: &Path| {
        pdi::KnownHash::new(pdi::hash_file(path).unwrap(), &fs::metadata(path).unwrap())
    };
    // The first with a SHA-256 that is not its own but its identity: taken as recorded,
    // which shows the file was not read to be hashed.
    let mut first = known(&files[0]);
    first.hash.sha256[0] ^= 0xff;
    // The second replaced since, as a resend replaces a spooled file (a new file renamed
    // over it): the same size, other bytes. Hashed again.
    let second = known(&files[1]);
    let mut bytes = fs::read(&files[1]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let replacement = dir.path().join("replacement");
    fs::write(&replacement, &bytes).unwrap();
    fs::rename(&replacement, &files[1]).unwrap();
    let options = BuildOptions {
        known: [(files[0].clone(), first), (files[1].clone(), second)].into(),
        ..BuildOptions::default()
    };
    let mut zip_bytes = Vec::new();
    pdi::build_zip(&files, &options, &mut zip_bytes).unwrap();
    let zip = dir.path().join("set.zip");
    fs::write(&zip, &zip_bytes).unwrap();
    let out = dir.path().join("out");
    pdi::extract_zip(&zip, &out).unwrap();
    let manifest = FileSet::open(&out).unwrap().manifest().unwrap().unwrap();
    let listed: Vec<String> = manifest.files.iter().map(|f| f.sha256.clone()).collect();
    let replaced = pdi::hash_file(&files[1]).unwrap();
    assert_ne!(replaced.sha256, second.hash.sha256);
    let third = pdi::hash_file(&files[2]).unwrap();
    for (what, sha) in [
        ("the first's recorded", first.hash.sha256),
        ("the second's new", replaced.sha256),
        ("the third's", third.sha256),
    ] {
        let sha = hex::encode(sha);
        assert!(listed.contains(&sha), "{what} SHA-256 {sha} in {listed:?}");
    }
    // A receiver checks the instance against the manifest: the first is refused.
    let err = pdi::verify(&zip).expect_err("the first instance is refused");
    assert!(err.to_string().contains("SHA-256"), "{err}");
}

/// The inbound stream hashes every file against the manifest as it writes it; its final
/// check of the set takes those as matched and does not read them again, but still
/// hashes any file it did not match, refuses a file listed twice, and still checks sizes
/// and the DICOMDIR.
#[test]
fn files_matched_while_extracted_are_not_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    let out = small_set(dir.path(), 3);
    let set = FileSet::open(&out).unwrap();
    let instances: Vec<PathBuf> = set.instances().iter().map(|e| e.path.clone()).collect();
    assert_eq!(instances.len(), 3);
    // The first instance damaged after it was matched (the same size, one byte of its
    // pixel data other): only a check that hashes it again sees it.
    let mut bytes = fs::read(&instances[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&instances[0], &bytes).unwrap();
    let matched: HashSet<PathBuf> = instances.iter().cloned().collect();
    let summary = pdi::verify_extracted(&out, &matched).expect("matched files are taken");
    assert_eq!(summary.instances, 3);
    let err = pdi::verify_dir(&out).expect_err("a full check hashes the damaged file");
    assert!(err.to_string().contains("SHA-256"), "{err}");
    let others: HashSet<PathBuf> = instances[1..].iter().cloned().collect();
    let err = pdi::verify_extracted(&out, &others).expect_err("an unmatched file is hashed");
    assert!(err.to_string().contains("SHA-256"), "{err}");
    // A manifest that lists a matched file twice, the second time with another SHA-256:
    // neither claim is taken for the file.
    let manifest_path = out.join(pdi::manifest::PATH);
    let original = fs::read(&manifest_path).unwrap();
    let mut manifest = manifest_of(&out);
    let files = manifest["files"].as_array_mut().unwrap();
    let second = files
        .iter()
        .find(|f| out.join(f["path"].as_str().unwrap()) == instances[1])
        .unwrap();
    let mut twin = second.clone();
    twin["sha256"] = serde_json::json!("00".repeat(32));
    files.push(twin);
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = pdi::verify_extracted(&out, &matched).expect_err("a file listed twice is refused");
    assert!(err.to_string().contains("listed twice"), "{err}");
    fs::write(&manifest_path, &original).unwrap();
    // A matched file cut short is still refused by its size.
    let second = fs::read(&instances[1]).unwrap();
    fs::write(&instances[1], &second[..second.len() / 2]).unwrap();
    let err = pdi::verify_extracted(&out, &matched).expect_err("the size is checked");
    assert!(err.to_string().contains("on disk"), "{err}");
}
