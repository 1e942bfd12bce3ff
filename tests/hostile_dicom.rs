//! Hostile DICOM input (issue 12, items 1, 2, 4 and the crash-loop rule): datasets that
//! nest sequences thousands of levels deep, oversized elements before the pixel data, and
//! a job whose step the process keeps dying in. Real peers (pynetdicom, the real daemon and
//! CLI); the hostile bytes are generated here.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const CANNOT_UNDERSTAND: i64 = 0xC000;

/// One element in little endian, explicit (`vr` written) or implicit VR.
fn element(out: &mut Vec<u8>, explicit: bool, tag: u32, vr: &[u8; 2], value: &[u8]) {
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(if vr == b"UI" || vr == b"OB" { 0 } else { b' ' });
    }
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&((tag & 0xFFFF) as u16).to_le_bytes());
    let long = matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT");
    if !explicit {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else if long {
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&value);
}

/// The identifying elements of a Secondary Capture instance, then a private creator.
fn identity(explicit: bool, uid: &str, series: bool) -> Vec<u8> {
    let mut out = Vec::new();
    element(
        &mut out,
        explicit,
        0x0008_0016,
        b"UI",
        SECONDARY_CAPTURE.as_bytes(),
    );
    element(&mut out, explicit, 0x0008_0018, b"UI", uid.as_bytes());
    element(&mut out, explicit, 0x0010_0020, b"LO", b"HOSTILE");
    element(
        &mut out,
        explicit,
        0x0020_000D,
        b"UI",
        b"1.2.826.0.1.3680043.10.1436.99.1",
    );
    if series {
        element(
            &mut out,
            explicit,
            0x0020_000E,
            b"UI",
            b"1.2.826.0.1.3680043.10.1436.99.2",
        );
    }
    element(&mut out, explicit, 0x0009_0010, b"LO", b"CLOUDPDI TEST");
    out
}

/// A private sequence (0009,1001) nested `levels` deep, every sequence and item of
/// undefined length: 36 bytes per level in explicit VR.
fn nested(explicit: bool, levels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(levels * 36);
    for _ in 0..levels {
        out.extend_from_slice(&[0x09, 0x00, 0x01, 0x10]);
        if explicit {
            out.extend_from_slice(b"SQ\0\0");
        }
        out.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for _ in 0..levels {
        out.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    out
}

/// Preamble, `DICM` and the meta information of an instance.
fn meta(sop_class: &str, uid: &str, ts: &str) -> Vec<u8> {
    let mut group = Vec::new();
    element(&mut group, true, 0x0002_0001, b"OB", &[0, 1]);
    element(&mut group, true, 0x0002_0002, b"UI", sop_class.as_bytes());
    element(&mut group, true, 0x0002_0003, b"UI", uid.as_bytes());
    element(&mut group, true, 0x0002_0010, b"UI", ts.as_bytes());
    element(
        &mut group,
        true,
        0x0002_0012,
        b"UI",
        b"1.2.826.0.1.3680043.10.1436.99",
    );
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    element(
        &mut out,
        true,
        0x0002_0000,
        b"UL",
        &(group.len() as u32).to_le_bytes(),
    );
    out.extend_from_slice(&group);
    out
}

/// A Secondary Capture Part 10 file in `ts` whose dataset holds a private sequence nested
/// `levels` deep (none for 0) and a small pixel data element.
fn instance(dir: &Path, name: &str, ts: &str, levels: usize) -> PathBuf {
    let uid = format!("1.2.826.0.1.3680043.10.1436.99.3.{levels}.{}", ts.len());
    let explicit = ts != IMPLICIT_LE;
    let mut dataset = identity(explicit, &uid, true);
    if levels > 0 {
        dataset.extend_from_slice(&nested(explicit, levels));
    }
    element(&mut dataset, explicit, 0x7FE0_0010, b"OB", &[0; 16]);
    let mut bytes = meta(SECONDARY_CAPTURE, &uid, ts);
    if ts == DEFLATED {
        let mut deflater =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        deflater.write_all(&dataset).unwrap();
        bytes.extend_from_slice(&deflater.finish().unwrap());
    } else {
        bytes.extend_from_slice(&dataset);
    }
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn start(dir: &Path) -> Daemon {
    Daemon::start(dir, CT_ROUTE)
}

#[test]
fn datasets_nesting_sequences_too_deep_are_refused_and_the_daemon_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    let mut files = Vec::new();
    for ts in [EXPLICIT_LE, IMPLICIT_LE, DEFLATED] {
        // The 54 KB dataset (1,500 levels) killed the daemon; 33 is one too many.
        for levels in [1500, 33] {
            let name = format!("deep-{levels}-{}.dcm", ts.len());
            files.push((instance(dir.path(), &name, ts, levels), false));
        }
        let name = format!("ok-32-{}.dcm", ts.len());
        files.push((instance(dir.path(), &name, ts, 32), true));
    }
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let results = pynetdicom_store(&daemon, "MODALITY", &paths);
    assert_eq!(results.len(), files.len(), "{results:?}\n{}", daemon.log());
    for ((path, accepted), result) in files.iter().zip(&results) {
        if *accepted {
            assert_eq!(
                result.status,
                0,
                "{}: {result:?}\n{}",
                path.display(),
                daemon.log()
            );
        } else {
            assert_eq!(
                result.status,
                CANNOT_UNDERSTAND,
                "{}: {result:?}\n{}",
                path.display(),
                daemon.log()
            );
            assert!(
                result
                    .comment
                    .contains("nests sequences deeper than 32 levels"),
                "{result:?}"
            );
        }
    }
    let log = daemon.log();
    assert!(
        log.contains("dataset nests sequences deeper than 32 levels; refused"),
        "{log}"
    );
    // Still serving: a new association stores a good instance.
    let good = instance(dir.path(), "good.dcm", EXPLICIT_LE, 0);
    let results = pynetdicom_store(&daemon, "MODALITY", &[good]);
    assert_eq!(results[0].status, 0, "{results:?}\n{}", daemon.log());
}

/// The high-water mark of a process's resident memory, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn an_oversized_element_before_the_pixel_data_is_refused_without_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    // 100 MiB of a private OB element, written as a sparse file: nothing of it in memory.
    let uid = "1.2.826.0.1.3680043.10.1436.99.4";
    let big: u32 = 100 << 20;
    let mut head = meta(SECONDARY_CAPTURE, uid, EXPLICIT_LE);
    head.extend_from_slice(&identity(true, uid, true));
    head.extend_from_slice(&[0x09, 0x00, 0x02, 0x10, b'O', b'B', 0, 0]);
    head.extend_from_slice(&big.to_le_bytes());
    let path = dir.path().join("big.dcm");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&head).unwrap();
    file.set_len(head.len() as u64 + u64::from(big)).unwrap();
    file.seek(SeekFrom::End(0)).unwrap();
    let mut pixels = Vec::new();
    element(&mut pixels, true, 0x7FE0_0010, b"OB", &[0; 16]);
    file.write_all(&pixels).unwrap();
    drop(file);
    // What the file set builder cannot place: no Series Instance UID.
    let no_series_uid = "1.2.826.0.1.3680043.10.1436.99.5";
    let mut bytes = meta(SECONDARY_CAPTURE, no_series_uid, EXPLICIT_LE);
    bytes.extend_from_slice(&identity(true, no_series_uid, false));
    let no_series = dir.path().join("no-series.dcm");
    std::fs::write(&no_series, bytes).unwrap();

    let results = pynetdicom_store(&daemon, "MODALITY", &[path, no_series]);
    assert_eq!(
        results[0].status,
        CANNOT_UNDERSTAND,
        "{results:?}\n{}",
        daemon.log()
    );
    assert!(
        results[0]
            .comment
            .contains("before the pixel data take more than 64 MiB"),
        "{results:?}"
    );
    assert_eq!(results[1].status, CANNOT_UNDERSTAND, "{results:?}");
    assert!(
        results[1].comment.contains("Series Instance UID"),
        "{results:?}"
    );
    let log = daemon.log();
    assert!(
        log.contains("refused: a file set cannot carry such a header"),
        "{log}"
    );
    // The element went to the spill file, never whole into memory.
    let peak = peak_rss_kib(daemon.pid());
    assert!(peak < 60 * 1024, "peak RSS {peak} KiB");
    let good = instance(dir.path(), "good.dcm", EXPLICIT_LE, 0);
    let results = pynetdicom_store(&daemon, "MODALITY", &[good]);
    assert_eq!(results[0].status, 0, "{results:?}\n{}", daemon.log());
}

/// A ZIP (Python's zipfile, as another vendor would write it) holding `set`'s DICOMDIR.
fn zip_dicomdir(set: &Path, zip: &Path) {
    let out = run(Command::new("python3").args([
        "-c",
        "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z: z.write(sys.argv[2], 'DICOMDIR')",
        zip.to_str().unwrap(),
        set.join("DICOMDIR").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{out:?}");
}

/// A DICOMDIR-named file whose dataset nests a private sequence `levels` deep.
fn deep_dicomdir(folder: &Path, levels: usize) {
    std::fs::create_dir_all(folder).unwrap();
    let mut bytes = meta(
        "1.2.840.10008.1.3.10",
        "1.2.826.0.1.3680043.10.1436.99.6",
        EXPLICIT_LE,
    );
    element(&mut bytes, true, 0x0004_1130, b"CS", b"HOSTILE");
    bytes.extend_from_slice(&nested(true, levels));
    std::fs::write(folder.join("DICOMDIR"), bytes).unwrap();
}

#[test]
fn pdi_verify_of_a_dicomdir_nesting_thousands_of_levels_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // 20,000 levels aborted `pdi verify` (5,000 the inbound Unpack step's smaller stack).
    let set = dir.path().join("set");
    deep_dicomdir(&set, 20_000);
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["pdi", "verify"])
        .arg(&set));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text.contains("sequences nest deeper than 32 levels"),
        "{text}"
    );

    // As a ZIP: the same error, and the temporary folder is gone.
    let zip = dir.path().join("set.zip");
    zip_dicomdir(&set, &zip);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["pdi", "verify"])
        .arg(&zip)
        .env("TMPDIR", &tmp));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text.contains("sequences nest deeper than 32 levels"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp folder left behind"
    );
}

fn outbound_job(daemon: &Daemon) -> Option<serde_json::Value> {
    daemon.status()["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["direction"] == "outbound")
        .cloned()
}

fn wait_job(
    daemon: &Daemon,
    what: &str,
    test: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(job) = outbound_job(daemon).filter(|j| test(j)) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_job_the_process_died_in_three_times_is_set_aside_and_not_started_again() {
    let dir = tempfile::tempdir().unwrap();
    // The delivery command holds the job in its Deliver step (as a hanging input would);
    // kill -9 is what a crash looks like to the next start.
    let routes = "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\n\
                  deliver_command = [\"sh\", \"-c\", \"sleep 20\", \"deliver\"]\n\
                  [outbound]\nenabled = true\n\
                  [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n";
    let mut daemon = Daemon::start(&dir.path().join("a"), routes);
    let study = dir.path().join("study");
    gen_ct(&study, 2, &[]);
    let out = storescu(&daemon, "MODALITY", &[], &files_in(&study));
    assert!(out.status.success(), "{out:?}");
    for start in 1..=3u64 {
        let job = wait_job(&daemon, "the job in its deliver step", |j| {
            j["state"] == "deliver" && j["unfinished_starts"] == start
        });
        assert_eq!(job["attempts"], 0, "{job}");
        daemon.kill9();
        daemon.spawn();
    }
    let job = wait_job(&daemon, "the job set aside", |j| j["state"] == "failed");
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.contains("the process died 3 times in a row while this job was in its deliver step"),
        "{error}"
    );
    assert!(
        error.contains("this batch's data crashed the sender"),
        "{error}"
    );
    assert!(
        daemon.log().contains("outbound job set aside"),
        "{}",
        daemon.log()
    );
    // Not started again, by this start or the next.
    std::thread::sleep(Duration::from_secs(2));
    daemon.kill9();
    daemon.spawn();
    std::thread::sleep(Duration::from_secs(2));
    let job = outbound_job(&daemon).unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(
        (&job["unfinished_starts"], &job["attempts"]),
        (&3.into(), &3.into()),
        "{job}"
    );
    // A person can still run it again: the count starts over.
    let id = job["id"].as_str().unwrap().to_owned();
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["retry", &id, "--config"])
        .arg(&daemon.config));
    assert!(out.status.success(), "{out:?}");
    wait_job(&daemon, "the retried job in its deliver step", |j| {
        j["state"] == "deliver" && j["unfinished_starts"] == 1
    });
}

/// Runs `cloudpdi` and asserts that it succeeded.
fn cloudpdi_ok(args: &[&std::ffi::OsStr]) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args(args));
    assert!(out.status.success(), "cloudpdi {args:?}: {out:?}");
}

#[test]
fn a_token_whose_dicomdir_nests_5000_levels_fails_its_unpack_step_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let routes = "[route.ct]\nae_title = \"CLOUDPDI\"\n\
                  [facility]\ncode = \"HOSPB\"\nname = \"Hospital B\"\n\
                  [inbound]\npacs = \"127.0.0.1:9\"\npacs_ae_title = \"PACS\"\n\
                  issuer = \"HOSPB\"\npoll_interval = 1\n";
    let daemon = Daemon::start(&dir.path().join("b"), routes);
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    let repository = config
        .lines()
        .find_map(|l| l.strip_prefix("embedded_listen = \""))
        .map(|a| format!("http://{}", a.trim_end_matches('"')))
        .unwrap();
    // The hostile PDI: a DICOMDIR nesting 5,000 levels (aborted the Unpack step's thread).
    let set = dir.path().join("set");
    deep_dicomdir(&set, 5000);
    let zip = dir.path().join("pdi.zip");
    zip_dicomdir(&set, &zip);
    let (token, issued, container) = (
        dir.path().join("draft.token"),
        dir.path().join("issued.token"),
        dir.path().join("container"),
    );
    let at = |p: &Path| format!("@{}", p.display());
    cloudpdi_ok(&[
        "token".as_ref(),
        "new".as_ref(),
        "--repository".as_ref(),
        repository.as_ref(),
        "--document-id".as_ref(),
        "00000000000000000000".as_ref(),
        "--out".as_ref(),
        token.as_os_str(),
    ]);
    cloudpdi_ok(&[
        "encrypt".as_ref(),
        "--token".as_ref(),
        at(&token).as_ref(),
        zip.as_os_str(),
        container.as_os_str(),
    ]);
    let key = daemon.dir.join("data/repository/api-key");
    cloudpdi_ok(&[
        "repository".as_ref(),
        "upload".as_ref(),
        "--url".as_ref(),
        repository.as_ref(),
        "--api-key-file".as_ref(),
        key.as_os_str(),
        "--token".as_ref(),
        at(&token).as_ref(),
        "--token-out".as_ref(),
        issued.as_os_str(),
        container.as_os_str(),
    ]);
    let inbox = daemon.dir.join("data/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::copy(&issued, inbox.join("deep.token")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let jobs = daemon.status()["jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(job) = jobs.into_iter().find(|j| j["state"] == "failed") {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "no failed job:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.contains("sequences nest deeper than 32 levels"),
        "{error}"
    );
    assert_eq!(job["unfinished_starts"], 0, "{job}");
    assert!(
        daemon.log().contains("inbound job failed"),
        "{}",
        daemon.log()
    );
}
