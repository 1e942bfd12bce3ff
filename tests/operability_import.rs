//! Operability of the inbound import and of the admin endpoint (issue 18, items 2, 5 and
//! 9): a PACS refusal is one named cause with its fix, a permanent one holds the job until
//! `cloudpdi retry`, an unreachable PACS logs one line per attempt, and `/healthz` and
//! `/metrics` see what stops a pipeline.
//!
//! One daemon plays both sites: its outbound pipeline issues a token into its own token
//! folder, and the test drops that token into its own watch folder.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Our AE title as the PACS must know it.
const CALLING: &str = "CLOUDPDI_B";

/// One site that sends (route `ct`, embedded repository) and imports into `pacs`.
fn site(pacs: &str, inbound: &str) -> String {
    format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\nretention_hours = 0\n\
         [outbound]\nenabled = true\n\
         [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n\
         [inbound]\npacs = \"{pacs}\"\npacs_ae_title = \"ORTHANC\"\n\
         calling_ae_title = \"{CALLING}\"\npoll_interval = 1\n{inbound}\n"
    )
}

/// Sends a generated study of `slices` instances to the site and drops the token it
/// issues into its own watch folder; returns the study's files.
fn send_and_hand_over(site: &Daemon, dir: &Path, slices: usize) -> Vec<PathBuf> {
    let study = dir.join("study");
    gen_ct(&study, slices, &["--patient-id", "P1"]);
    let files = files_in(&study);
    send_to_self(site, &files);
    files
}

/// The site's only inbound job, once it satisfies `ready`.
fn inbound_job(
    site: &Daemon,
    what: &str,
    within: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(what, within, || {
        site.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["direction"] == "inbound" && ready(j))
            .cloned()
    })
}

/// `cloudpdi retry` against the site: (success, stdout + stderr).
fn retry(site: &Daemon, id: &str) -> (bool, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
        "retry",
        "--admin",
        &site.admin.to_string(),
        id,
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Rewrites the Orthanc configuration under `dir` so that it serves only the modalities
/// listed (`DicomModalities`): every `DicomAlwaysAllow*` off, so an unknown calling AE
/// title gets an A-ASSOCIATE-RJ.
fn orthanc_modalities(dir: &Path, modalities: serde_json::Value) {
    let config = dir.join("orthanc/orthanc.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    for key in [
        "DicomAlwaysAllowEcho",
        "DicomAlwaysAllowStore",
        "DicomAlwaysAllowFind",
        "DicomAlwaysAllowFindWorklist",
        "DicomAlwaysAllowGet",
        "DicomAlwaysAllowMove",
        "DicomCheckModalityHost",
    ] {
        json[key] = false.into();
    }
    json["DicomModalities"] = modalities;
    std::fs::write(&config, json.to_string()).unwrap();
}

/// Log lines that name `needle`.
fn log_lines(site: &Daemon, needle: &str) -> Vec<String> {
    site.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_pacs_refusing_our_ae_title_holds_the_job_with_the_cause_until_cloudpdi_retry() {
    if !isolated("a_pacs_refusing_our_ae_title_holds_the_job_with_the_cause_until_cloudpdi_retry") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut orthanc = Orthanc::start(dir.path());
    orthanc.stop();
    orthanc_modalities(dir.path(), serde_json::json!({}));
    orthanc.spawn();
    // A back-off of at most 1 s: a job that kept retrying would show several attempts
    // within the few seconds the test watches it.
    let site = Daemon::start(
        &dir.path().join("site"),
        &site("127.0.0.1:4242", "max_backoff = 1\nattempts = 3\n"),
    );
    let files = send_and_hand_over(&site, dir.path(), 10);

    let job = inbound_job(&site, "the held import", Duration::from_secs(60), |j| {
        j["held"] == true
    });
    let id = job["id"].as_str().unwrap().to_owned();
    let error = job["last_error"].as_str().unwrap();
    for part in [
        "the PACS at 127.0.0.1:4242 refused our AE title CLOUDPDI_B (calling AE title not \
         recognized, permanent)",
        "register CLOUDPDI_B as a modality in the PACS",
        &format!("then run `cloudpdi retry {id}`"),
        "10 of 10 instances not sent",
    ] {
        assert!(error.contains(part), "{part:?} missing from {error}");
    }
    assert!(
        !error.contains("unreachable or out of resources"),
        "{error}"
    );
    assert_eq!(job["state"], "import");

    // No retry for ever: the job stays at one attempt, logged on one line.
    std::thread::sleep(Duration::from_secs(5));
    let job = inbound_job(&site, "the job", Duration::from_secs(5), |_| true);
    assert_eq!(job["attempts"], 1, "{job:#}");
    assert_eq!(job["held"], true);
    let lines = log_lines(&site, "127.0.0.1:4242");
    assert_eq!(lines.len(), 1, "one line for the one attempt: {lines:#?}");
    assert!(lines[0].contains("inbound job held"), "{}", lines[0]);

    // Health and metrics see it.
    let (code, body) = site.admin_get("/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with(&format!("degraded: inbound job {id} is held: the PACS at")),
        "{body}"
    );
    let (code, metrics) = site.admin_get("/metrics");
    assert_eq!(code, 200);
    for line in [
        "cloudpdi_jobs_held{pipeline=\"inbound\"} 1\n",
        "cloudpdi_jobs{pipeline=\"inbound\",state=\"import\"} 1\n",
        "cloudpdi_jobs{pipeline=\"outbound\",state=\"done\"} 1\n",
        "cloudpdi_job_failures_total{pipeline=\"inbound\",step=\"import\",cause=\"pacs_rejected\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // `cloudpdi import` names the same cause, at once (a permanent refusal is not retried).
    let started = Instant::now();
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["import", "--pacs", "127.0.0.1:4242", "--called", "ORTHANC"])
        .args(["--calling", CALLING])
        .arg(dir.path().join("study")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("10 of 10 instances were not sent: the PACS at 127.0.0.1:4242 refused our AE title CLOUDPDI_B (calling AE title not recognized, permanent): register CLOUDPDI_B"),
        "{stderr}"
    );
    assert!(!stderr.contains("PACS unavailable after"), "{stderr}");
    // Retried, the back-offs alone (0.5 + 1 + 2 + 4 s) would take 7.5 s.
    assert!(started.elapsed() < Duration::from_secs(7));

    // Retry before the fix: held again, after one more attempt.
    let (ok, out) = retry(&site, &id);
    assert!(
        ok && out.contains(&format!("job {id} runs again from step import")),
        "{out}"
    );
    inbound_job(&site, "held again", Duration::from_secs(30), |j| {
        j["held"] == true && j["attempts"] == 1 && j["updated_at"] != job["updated_at"]
    });

    // Unknown IDs name both pipelines.
    let (ok, out) = retry(&site, "R000000000000");
    assert!(!ok);
    assert!(
        out.contains("no outbound job R000000000000 and no inbound job R000000000000"),
        "{out}"
    );

    // The fix: Orthanc knows our AE title; `cloudpdi retry` and the study arrives whole.
    orthanc.stop();
    orthanc_modalities(
        dir.path(),
        serde_json::json!({ "cloudpdi": [CALLING, "127.0.0.1", 11112] }),
    );
    orthanc.spawn();
    let (ok, out) = retry(&site, &id);
    assert!(ok, "{out}");
    inbound_job(
        &site,
        "the import after the fix",
        Duration::from_secs(60),
        |j| j["state"] == "done",
    );
    assert_eq!(orthanc.get("/statistics")["CountInstances"], files.len());
    assert_eq!(site.admin_get("/healthz"), (200, "ok\n".to_owned()));
    let (ok, out) = retry(&site, &id);
    assert!(!ok && out.contains("is done, not failed"), "{out}");
}

#[test]
fn an_unreachable_pacs_logs_one_line_per_attempt_and_keeps_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let pacs = format!("127.0.0.1:{}", free_port());
    let site = Daemon::start(
        &dir.path().join("site"),
        &site(&pacs, "max_backoff = 1\nattempts = 3\nassociations = 4\n"),
    );
    send_and_hand_over(&site, dir.path(), 12);
    let job = inbound_job(&site, "three attempts", Duration::from_secs(60), |j| {
        j["attempts"].as_u64().is_some_and(|a| a >= 3)
    });
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("the PACS at {pacs} cannot be reached"))
            && error.contains("12 of 12 instances not sent")
            && error.ends_with("(will retry)"),
        "{error}"
    );
    assert!(
        job.get("held").is_none(),
        "a transient cause is not held: {job:#}"
    );
    // Read the log after the status: it may hold one more attempt, never one per file.
    let attempts = job["attempts"].as_u64().unwrap() as usize;
    let lines = log_lines(&site, &pacs);
    assert!(
        (attempts..=attempts + 1).contains(&lines.len()),
        "{attempts} attempts, one line each: {lines:#?}"
    );
    assert!(
        lines.iter().all(|l| l.contains("inbound step failed")),
        "{lines:#?}"
    );

    let (code, body) = site.admin_get("/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!(
            "inbound job {} failed",
            job["id"].as_str().unwrap()
        )),
        "{body}"
    );
    let (_, metrics) = site.admin_get("/metrics");
    assert!(
        metrics.contains("cloudpdi_jobs_retry_queue{pipeline=\"inbound\"} 1\n")
            && metrics.contains("cloudpdi_job_failures_total{pipeline=\"inbound\",step=\"import\",cause=\"pacs_unreachable\"}"),
        "{metrics}"
    );
}

#[test]
fn a_spool_below_its_floor_makes_health_degraded_with_the_reason() {
    if !isolated("a_spool_below_its_floor_makes_health_degraded_with_the_reason") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("site/data");
    std::fs::create_dir_all(&data).unwrap();
    let out = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&data));
    assert!(out.status.success(), "mount: {out:?}");
    let mut site = Daemon::start(&dir.path().join("site"), CT_ROUTE);
    assert_eq!(site.admin_get("/healthz"), (200, "ok\n".to_owned()));
    assert!(site.stop().success());
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        config.replacen("min_free_mb = 0", "min_free_mb = 8", 1),
    )
    .unwrap();
    // Leave less than 8 MiB free.
    let fill = data.join("fill");
    std::fs::write(&fill, vec![1u8; 26 << 20]).unwrap();
    site.spawn();

    let (code, body) = site.admin_get("/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("degraded: the spool has ")
            && body.contains("MiB free, below spool.min_free_mb = 8: instances are refused"),
        "{body}"
    );
    let (_, metrics) = site.admin_get("/metrics");
    assert!(
        metrics.contains("cloudpdi_spool_min_free_bytes 8388608\n"),
        "{metrics}"
    );
    let free: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cloudpdi_spool_free_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(free < 8 << 20, "{free}");

    std::fs::remove_file(&fill).unwrap();
    assert_eq!(site.admin_get("/healthz"), (200, "ok\n".to_owned()));
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second = String::from_utf8(run(Command::new("getconf").arg("CLK_TCK")).stdout)
        .unwrap()
        .trim()
        .parse::<f64>()
        .unwrap();
    ticks / per_second
}

/// The watch folder wakes on inotify: the scan's own reads of the folder and of the files
/// in it must not wake it again (a scan loop that burns a core). A file that is not a
/// token is read, then rejected, on the way.
#[test]
fn an_idle_daemon_watching_its_folder_uses_almost_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let site = Daemon::start(dir.path(), &site("127.0.0.1:9", ""));
    let inbox = site.dir.join("data/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut unfinished = std::fs::File::create(inbox.join("being-written.txt")).unwrap();
    std::io::Write::write_all(&mut unfinished, b"HT2-").unwrap();
    let before = cpu_seconds(site.pid());
    std::thread::sleep(Duration::from_secs(4));
    let used = cpu_seconds(site.pid()) - before;
    assert!(
        used < 0.5,
        "the idle daemon used {used:.2} CPU seconds in 4 s:\n{}",
        site.log()
    );
    drop(unfinished);
}
