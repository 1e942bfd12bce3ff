//! Issue 18, items 1 and 9: whole studies only, and a status that answers an admin.
//!
//! - Instances refused for a local reason (the spool below its free-space reserve) hold
//!   their batch as possibly incomplete until the PACS resends them, or an admin releases
//!   it with `cloudpdi release`.
//! - A batch open when the daemon stopped (SIGTERM or kill -9) gets a full quiet period
//!   after the restart.
//! - `cloudpdi status` shows patient, accession, study date, modality, the token file,
//!   downloads and the receipt site B posted.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The batches of `cloudpdi status --json`.
fn batches(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon.status()["batches"].as_array().unwrap().clone()
}

/// The batch whose study summary names `patient`.
fn batch_of(daemon: &Daemon, patient: &str) -> Option<serde_json::Value> {
    batches(daemon)
        .into_iter()
        .find(|b| b["study"]["patient_id"] == patient)
}

/// `cloudpdi ARGS --admin <daemon>`: success and stdout + stderr.
fn cloudpdi(daemon: &Daemon, args: &[&str]) -> (bool, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .args(["--admin", &daemon.admin.to_string()]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Fills the file system of `dir` until `left` bytes above `reserve` stay free.
fn fill(dir: &Path, reserve: u64, left: u64) -> PathBuf {
    let stat = rustix::fs::statvfs(dir).unwrap();
    let free = stat.f_bavail * stat.f_frsize;
    let size = free
        .checked_sub(reserve + left)
        .expect("room for the ballast");
    let ballast = dir.join("ballast");
    std::fs::write(&ballast, vec![0xA5u8; usize::try_from(size).unwrap()]).unwrap();
    ballast
}

/// Reserve of the test: `spool.min_free_mb = 16`.
const RESERVE: u64 = 16 << 20;

#[test]
fn refused_instances_hold_the_batch_until_resent_or_released() {
    if !isolated("refused_instances_hold_the_batch_until_resent_or_released") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("a");
    let data = site.join("data");
    mount_tmpfs(&data, "size=64m");
    let mut daemon = Daemon::start(&site, CT_ROUTE);
    // The harness writes no reserve: set it and restart.
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        text.replacen("min_free_mb = 0", "min_free_mb = 16", 1),
    )
    .unwrap();
    daemon.stop();
    daemon.spawn();

    // Room for a few of the 20 slices (about 0.5 MB each) above the reserve.
    let first = dir.path().join("first");
    gen_ct(&first, 20, &["--patient-id", "PFULL1"]);
    let files = files_in(&first);
    let ballast = fill(&data, RESERVE, 4 << 20);
    // --no-halt: go on after a failure status, as a PACS sending a study does.
    storescu(&daemon, "MODALITY", &["--no-halt"], &files);
    let held = wait_for("the batch of PFULL1", Duration::from_secs(10), || {
        batch_of(&daemon, "PFULL1")
    });
    let stored = held["instances"].as_u64().unwrap();
    assert!(
        0 < stored && stored < 20,
        "some stored, some refused: {held:#}"
    );
    assert_eq!(held["refused"].as_u64().unwrap(), 20 - stored, "{held:#}");
    assert!(
        held["refusal"]
            .as_str()
            .unwrap()
            .contains("spool.min_free_mb"),
        "{held:#}"
    );
    // Quiet for longer than stable_after (2 s): still held, never stable by itself.
    std::thread::sleep(Duration::from_secs(4));
    let held = batch_of(&daemon, "PFULL1").unwrap();
    assert_eq!(
        (&held["state"], &held["display_state"]),
        (&"open".into(), &"held".into()),
        "{held:#}"
    );
    let (ok, text) = cloudpdi(&daemon, &["status"]);
    assert!(ok, "{text}");
    let id = held["id"].as_u64().unwrap();
    let batch = format!("B{id:06}");
    assert!(
        text.contains(&format!("{batch:<9} ct       held"))
            && text.contains(&format!(
                "possibly incomplete: {} instance(s) refused",
                20 - stored
            ))
            && text.contains(&format!("cloudpdi release {batch}")),
        "{text}"
    );
    // Monitoring sees it: health degraded with the batch and the fix, a held gauge.
    let (code, health) = daemon.admin_get("/healthz");
    assert_eq!(code, 503, "{health}");
    assert!(
        health.contains(&format!(
            "batch {batch} (route ct) is held as possibly incomplete"
        )) && health.contains(&format!("cloudpdi release {batch}")),
        "{health}"
    );
    let (_, metrics) = daemon.admin_get("/metrics");
    assert!(
        metrics.contains("cloudpdi_batches{state=\"held\"} 1"),
        "{metrics}"
    );

    // Space freed, the PACS resends the study: stable after a clean quiet period, whole.
    std::fs::remove_file(&ballast).unwrap();
    let out = storescu(&daemon, "MODALITY", &[], &files);
    assert!(out.status.success(), "{out:?}");
    let whole = daemon.wait_stable_batch(20, Duration::from_secs(15));
    assert_eq!(whole["id"].as_u64().unwrap(), id, "the same batch, whole");

    // A second study refused in part, and the PACS will not resend: an admin releases it.
    let second = dir.path().join("second");
    gen_ct(&second, 20, &["--patient-id", "PFULL2"]);
    let ballast = fill(&data, RESERVE, 4 << 20);
    storescu(&daemon, "MODALITY", &["--no-halt"], &files_in(&second));
    let held = wait_for("the batch of PFULL2", Duration::from_secs(10), || {
        batch_of(&daemon, "PFULL2")
    });
    std::fs::remove_file(&ballast).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        batch_of(&daemon, "PFULL2").unwrap()["display_state"],
        "held"
    );
    let batch = format!("B{:06}", held["id"].as_u64().unwrap());
    let (ok, text) = cloudpdi(&daemon, &["release", &batch]);
    assert!(
        ok && text.contains(&format!("batch {batch} released")),
        "{text}"
    );
    let released = batch_of(&daemon, "PFULL2").unwrap();
    assert_eq!(released["state"], "stable", "{released:#}");
    assert_eq!(released["instances"], held["instances"]);
    let (ok, text) = cloudpdi(&daemon, &["release", &batch]);
    assert!(!ok && text.contains("is stable, not held"), "{text}");
    let (ok, text) = cloudpdi(&daemon, &["release", "B999999"]);
    assert!(!ok && text.contains("no batch B999999"), "{text}");
}

/// Sends the first `part` slices of a new study, stops the daemon with `stop`, waits
/// longer than `stable_after`, starts it again and checks that the batch stays open for
/// most of a full quiet period from the start; returns the rest of the study.
fn interrupted(
    daemon: &mut Daemon,
    dir: &Path,
    patient: &str,
    stop: fn(&mut Daemon),
) -> Vec<PathBuf> {
    let study = dir.join(patient);
    gen_ct(&study, 12, &["--patient-id", patient]);
    let files = files_in(&study);
    let out = storescu(daemon, "MODALITY", &[], &files[..8]);
    assert!(out.status.success(), "{out:?}");
    stop(daemon);
    // Longer than stable_after (4 s) since the last instance.
    std::thread::sleep(Duration::from_secs(5));
    daemon.spawn();
    let started = Instant::now();
    let mut checked = 0;
    loop {
        let batch = batch_of(daemon, patient).unwrap();
        // A reading that ended 3 s or more after the restart may fall after the quiet
        // period on a slow machine: it proves nothing either way.
        if started.elapsed() >= Duration::from_secs(3) {
            break;
        }
        checked += 1;
        assert_eq!(
            batch["state"],
            "open",
            "{:?} after the restart, the interrupted batch must wait a full quiet \
             period: {batch:#}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(checked > 0, "no status read within 3 s of the restart");
    files[8..].to_vec()
}

#[test]
fn an_interrupted_study_gets_a_full_quiet_period_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let route = "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 4\n";
    let mut daemon = Daemon::start(&dir.path().join("a"), route);

    // SIGTERM: the PACS resends the rest in time, and the study travels as one batch.
    let rest = interrupted(&mut daemon, dir.path(), "PTERM", |d| {
        assert!(d.stop().success());
    });
    let out = storescu(&daemon, "MODALITY", &[], &rest);
    assert!(out.status.success(), "{out:?}");
    let whole = daemon.wait_stable_batch(12, Duration::from_secs(15));
    assert_eq!(whole["study"]["patient_id"], "PTERM");

    // kill -9: the same; without a resend the batch becomes stable a quiet period later.
    interrupted(&mut daemon, dir.path(), "PKILL", Daemon::kill9);
    let part = daemon.wait_stable_batch(8, Duration::from_secs(10));
    assert_eq!(part["study"]["patient_id"], "PKILL");
}

/// Site A: sends what arrives on AE CLOUDPDI after 1 quiet second.
fn site_a() -> String {
    "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\n\
     [outbound]\nenabled = true\n\
     [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n"
        .into()
}

#[test]
fn status_names_the_patient_the_token_and_the_receipt() {
    if !isolated("status_names_the_patient_the_token_and_the_receipt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 6, &["--patient-id", "PSTAT01"]);
    let originals = files_in(&study);
    let _orthanc = Orthanc::start(dir.path());
    let a = Daemon::start(&dir.path().join("a"), &site_a());
    let b = Daemon::start(&dir.path().join("b"), &site_b());
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");

    let job = wait_for("site A's token", Duration::from_secs(60), || {
        let status = a.status();
        let details = status["outbound"].as_array()?.first()?.clone();
        details["token_file"].as_str().is_some().then_some(details)
    });
    let status = a.status();
    let study = &status["jobs"][0]["study"];
    assert_eq!(study["patient_id"], "PSTAT01", "{status:#}");
    assert_eq!(study["accession"], "ACCSTAT01", "{status:#}");
    assert_eq!(study["study_date"], "20261124", "{status:#}");
    assert_eq!(study["modality"], "CT", "{status:#}");
    let token = PathBuf::from(job["token_file"].as_str().unwrap());
    assert!(token.is_file(), "{job:#}");
    let batch = batch_of(&a, "PSTAT01").unwrap();
    assert_eq!(batch["study"]["accession"], "ACCSTAT01");

    // Site B imports; its receipt shows on site A's status.
    hand_over(&token, &b);
    let document = wait_for(
        "site B's receipt on site A's status",
        Duration::from_secs(90),
        || {
            let details = a.status()["outbound"].as_array()?.first()?.clone();
            let document = details["document"].clone();
            (document["receipts"].as_array()?.len() == 1).then_some(document)
        },
    );
    assert_eq!(document["downloads"], 1, "{document:#}");
    assert_eq!(
        document["receipts"][0]["instances_imported"],
        originals.len(),
        "{document:#}"
    );
    // A token handed over (not sealed): the receipt does not say where it went.
    assert!(
        document["receipts"][0]["facility"].is_null(),
        "{document:#}"
    );

    let (ok, text) = cloudpdi(&a, &["status"]);
    assert!(ok, "{text}");
    for expected in [
        "PSTAT01",
        "ACCSTAT01",
        "2026-11-24",
        "modality CT",
        &format!("token {}", token.display()),
        "downloads 1 of",
        &format!("{} instance(s) imported, 0 refused", originals.len()),
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert!(
        !text.contains(a.status()["batches"][0]["key"].as_str().unwrap()),
        "the Study UID is shortened in the table:\n{text}"
    );

    // Site B's status says what it received: patient, accession, date, modality.
    let received = b.status()["jobs"][0]["study"].clone();
    assert_eq!(received["accession"], "ACCSTAT01", "{received:#}");
    assert_eq!(received["study_date"], "20261124", "{received:#}");
    assert_eq!(received["modality"], "CT", "{received:#}");
    let (ok, text) = cloudpdi(&b, &["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("accession ACCSTAT01  study date 2026-11-24  modality CT"),
        "{text}"
    );

    // After a restart, monitoring still knows when each pipeline last succeeded.
    for mut site in [a, b] {
        site.stop();
        site.spawn();
        let (_, metrics) = site.admin_get("/metrics");
        let succeeded = metrics.lines().any(|l| {
            l.strip_prefix("cloudpdi_last_success_timestamp_seconds{pipeline=")
                .and_then(|rest| rest.split_once(' '))
                .and_then(|(_, value)| value.parse::<f64>().ok())
                .is_some_and(|at| at > 1.7e9)
        });
        assert!(succeeded, "{metrics}");
    }
}
