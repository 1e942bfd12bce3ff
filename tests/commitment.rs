//! Storage Commitment Push Model (issue 14, items 2 and 3): a pynetdicom requester asks
//! the real `cloudpdi serve` to commit what it sent, with the report on the same
//! association and on a new one; instances the gateway does not hold, or holds under
//! another SOP class, are failed with the standard's reasons, and a request covering a
//! whole batch closes it at once. On import, Orthanc is the local PACS's storage
//! commitment SCP: an import is done only once Orthanc reported every instance
//! committed, and an instance Orthanc answered Success for but did not keep is listed,
//! sent again and committed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";

#[derive(Debug, serde::Deserialize)]
struct Outcome {
    action_status: i64,
    #[serde(default)]
    event: u16,
    #[serde(default)]
    transaction_matches: bool,
    #[serde(default)]
    committed: Vec<String>,
    #[serde(default)]
    failed: Vec<(String, u16)>,
    /// The SCU / SCP roles the gateway proposed on a new association for its report.
    #[serde(default)]
    proposed_roles: Option<(bool, bool)>,
}

fn request(daemon: &Daemon, calling: &str, mode: &str, listen: u16, refs: &[String]) -> Outcome {
    request_padded(daemon, calling, mode, listen, refs, 0)
}

/// As [`request`], the request carrying `pad` more bytes (a private element).
fn request_padded(
    daemon: &Daemon,
    calling: &str,
    mode: &str,
    listen: u16,
    refs: &[String],
    pad: usize,
) -> Outcome {
    let out = run(Command::new("python3")
        .env("COMMIT_PAD_BYTES", pad.to_string())
        .arg(root().join("tests/peers/commit.py"))
        .args([
            "127.0.0.1",
            &daemon.dicom.port().to_string(),
            "CLOUDPDI",
            calling,
            mode,
            &listen.to_string(),
        ])
        .args(refs));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "commit.py failed: {stdout}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("commit.py said {stdout:?} ({e})\nlog:\n{}", daemon.log()))
}

fn study(dir: &Path) -> Vec<PathBuf> {
    gen_ct(dir, 3, &[]);
    files_in(dir)
}

/// The report on the same association fails the instance the gateway never received
/// (0x0112) and the one named with another SOP class (0x0119), commits the rest, and
/// leaves the batch open (not all of it was committed); the report on a new association
/// (configured for the caller) commits the whole batch, which closes at once although
/// its route waits 600 s for stability.
#[test]
fn pynetdicom_requester_gets_reports_on_both_associations() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let routes = format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 600\n\
         [dicom.commitment.NEWASSOC]\nreport = \"new-association\"\n\
         address = \"127.0.0.1:{listen}\"\n"
    );
    let daemon = Daemon::start(&dir.path().join("gw"), &routes);
    let files = study(&dir.path().join("study"));
    let stored = pynetdicom_store(&daemon, "MODALITY", &files);
    assert!(stored.iter().all(|s| s.status == 0), "{stored:?}");
    let uids: Vec<String> = files.iter().map(|f| sop_instance_uid(f)).collect();

    let mut refs: Vec<String> = uids[1..].iter().map(|u| format!("{CT}:{u}")).collect();
    refs.push(format!("{SECONDARY_CAPTURE}:{}", uids[0]));
    refs.push(format!("{CT}:1.2.826.0.1.3680043.99.1"));
    let same = request(&daemon, "MODALITY", "same", listen, &refs);
    assert_eq!((same.action_status, same.event), (0, 2), "{same:?}");
    assert!(same.transaction_matches);
    let mut committed = same.committed.clone();
    committed.sort();
    let mut expected = uids[1..].to_vec();
    expected.sort();
    assert_eq!(committed, expected);
    assert!(same.failed.contains(&(uids[0].clone(), 0x0119)), "{same:?}");
    assert!(
        same.failed
            .contains(&("1.2.826.0.1.3680043.99.1".to_owned(), 0x0112)),
        "{same:?}"
    );
    let batches = daemon.status()["batches"].as_array().unwrap().clone();
    assert!(batches.iter().all(|b| b["state"] == "open"), "{batches:?}");

    let refs: Vec<String> = uids.iter().map(|u| format!("{CT}:{u}")).collect();
    let new = request(&daemon, "NEWASSOC", "new", listen, &refs);
    assert_eq!((new.action_status, new.event), (0, 1), "{new:?}");
    assert!(new.transaction_matches && new.failed.is_empty(), "{new:?}");
    assert_eq!(
        new.proposed_roles,
        Some((false, true)),
        "PS3.4 J.3.3: the report's association proposes SCU=0 / SCP=1: {new:?}"
    );
    assert_eq!(new.committed.len(), 3);
    daemon.wait_stable_batch(3, Duration::from_secs(5));
    let log = daemon.log();
    assert!(
        log.lines().any(
            |l| l.contains("batch stable, ready for packing batch=B000001")
                && l.contains("reason=\"closed by storage commitment\"")
        ),
        "{log}"
    );
    let (_, metrics) = daemon.admin_get("/metrics");
    assert!(
        metrics.contains("cloudpdi_batches_stable_total 1\n"),
        "{metrics}"
    );
    assert!(
        log.contains("storage commitment report answered by the requester"),
        "the same-association report was not answered:\n{log}"
    );
    daemon.wait_logged("report sent on a new association", Duration::from_secs(5));
}

/// Our import AE title as Orthanc knows it.
const CALLING: &str = "CLOUDPDI_B";

/// Orthanc's REST API: `method` on `path` with a JSON body, the answer as JSON.
fn orthanc_rest(method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = run(Command::new(require("/usr/bin/curl"))
        .args(["-sf", "-X", method, "--data-binary"])
        .arg(body.to_string())
        .arg(format!("http://127.0.0.1:8042{path}")));
    assert!(
        out.status.success(),
        "Orthanc {method} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Restarts `orthanc` with `lua` among its scripts.
fn orthanc_with_lua(orthanc: &mut Orthanc, dir: &Path, lua: &str) {
    orthanc.stop();
    let script = dir.join("orthanc/commitment.lua");
    std::fs::write(&script, lua).unwrap();
    let config = dir.join("orthanc/orthanc.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["LuaScripts"] = serde_json::json!([script]);
    std::fs::write(&config, json.to_string()).unwrap();
    orthanc.spawn();
}

/// Import into Orthanc with `inbound.storage_commitment = true`. Orthanc answers Success
/// for the first instance it receives but drops it (a Lua filter, once: a PACS that lost
/// an instance), so its storage commitment report, sent on a new association to the
/// gateway's SCP, fails that instance: the job lists it with the PACS's reason and is not
/// done; its retry sends it again and asks again, and the job is done only after the
/// report that commits every instance.
#[test]
fn import_waits_for_orthancs_commitment_and_sends_again_what_it_did_not_commit() {
    if !isolated("import_waits_for_orthancs_commitment_and_sends_again_what_it_did_not_commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut orthanc = Orthanc::start(dir.path());
    orthanc_with_lua(
        &mut orthanc,
        dir.path(),
        "dropped = false\n\
         function ReceivedInstanceFilter(dicom, origin, info)\n\
           if not dropped then\n\
             dropped = true\n\
             print('commitment test drops ' .. dicom.SOPInstanceUID)\n\
             return false\n\
           end\n\
           return true\n\
         end\n",
    );
    let site = Daemon::start(
        &dir.path().join("site"),
        &format!(
            "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\nretention_hours = 0\n\
             [outbound]\nenabled = true\n\
             [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n\
             [inbound]\npacs = \"127.0.0.1:4242\"\npacs_ae_title = \"ORTHANC\"\n\
             calling_ae_title = \"{CALLING}\"\npoll_interval = 1\nmax_backoff = 2\n\
             storage_commitment = true\ncommitment_timeout = 20\n"
        ),
    );
    // Orthanc sends its reports to the modality that asked, found by AE title.
    orthanc_rest(
        "PUT",
        "/modalities/gateway",
        &serde_json::json!({
            "AET": CALLING, "Host": "127.0.0.1", "Port": site.dicom.port()
        }),
    );

    let study = dir.path().join("study");
    gen_ct(&study, 3, &["--patient-id", "P1"]);
    let files = files_in(&study);
    send_to_self(&site, &files);

    // The first attempt: one instance not committed, listed with Orthanc's reason.
    let failed = wait_for(
        "the uncommitted instance in status",
        Duration::from_secs(30),
        || {
            site.inbound_jobs().into_iter().find(|j| {
                j["notes"].as_array().is_some_and(|n| {
                    n.iter()
                        .any(|n| n.as_str().unwrap().contains("not committed"))
                })
            })
        },
    );
    let orthanc_log = std::fs::read_to_string(dir.path().join("orthanc/orthanc.log")).unwrap();
    let dropped = orthanc_log
        .split("commitment test drops ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("Orthanc did not drop an instance:\n{orthanc_log}"))
        .to_owned();
    let notes: Vec<&str> = failed["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(
        notes,
        [format!(
            "not committed {dropped} (sent again): the PACS did not commit it: 0x0112 no such \
             object instance"
        )],
        "{failed:#}"
    );
    assert_ne!(failed["state"], "done", "{failed:#}");
    assert!(
        failed["progress"]
            .as_str()
            .unwrap()
            .contains("2 committed, 1 not committed"),
        "{failed:#}"
    );
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("the PACS did not commit 1 of 3 instances"),
        "{failed:#}"
    );

    // The retry sends it again; the job is done once Orthanc committed all three.
    let done = wait_for("the committed import", Duration::from_secs(30), || {
        site.inbound_jobs()
            .into_iter()
            .find(|j| j["state"] == "done")
    });
    assert!(
        done["notes"].as_array().is_none_or(Vec::is_empty),
        "{done:#}"
    );
    assert!(
        done["progress"]
            .as_str()
            .unwrap()
            .contains("3 of 3 stored, 0 set aside, 3 committed, 0 not committed"),
        "{done:#}"
    );
    assert_eq!(orthanc.get("/instances").as_array().unwrap().len(), 3);
    let log = site.log();
    let position = |needle: &str| {
        log.rfind(needle)
            .unwrap_or_else(|| panic!("{needle:?} not logged:\n{log}"))
    };
    assert!(
        position("storage commitment report from the PACS")
            < position("the PACS committed every instance")
            && position("the PACS committed every instance") < position("from=Import"),
        "the import step ended before the report:\n{log}"
    );
}

/// Orthanc as the sender: its REST store with `StorageCommitment: true` sends the study,
/// asks the gateway to commit it, and gets the report on a new association
/// (`[dicom.commitment.ORTHANC]`); Orthanc records it as a success, and the batch closed
/// at once although its route waits 600 s for stability.
#[test]
fn orthanc_store_with_storage_commitment_gets_success_and_closes_the_batch() {
    if !isolated("orthanc_store_with_storage_commitment_gets_success_and_closes_the_batch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let orthanc = Orthanc::start(dir.path());
    let daemon = Daemon::start(
        &dir.path().join("gw"),
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 600\n\
         [dicom.commitment.ORTHANC]\nreport = \"new-association\"\n\
         address = \"127.0.0.1:4242\"\n",
    );
    let study = dir.path().join("study");
    gen_ct(&study, 3, &[]);
    for file in files_in(&study) {
        let out = run(Command::new(require("/usr/bin/curl"))
            .args(["-sf", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .arg("http://127.0.0.1:8042/instances"));
        assert!(out.status.success(), "{out:?}");
    }
    orthanc_rest(
        "PUT",
        "/modalities/gateway",
        &serde_json::json!({"AET": "CLOUDPDI", "Host": "127.0.0.1", "Port": daemon.dicom.port()}),
    );
    let studies = orthanc.get("/studies");
    let answer = orthanc_rest(
        "POST",
        "/modalities/gateway/store",
        &serde_json::json!({"Resources": studies, "StorageCommitment": true}),
    );
    assert_eq!(answer["FailedInstancesCount"], 0, "{answer:#}");
    let transaction = answer["StorageCommitmentTransactionUID"]
        .as_str()
        .unwrap_or_else(|| panic!("no storage commitment transaction: {answer:#}"))
        .to_owned();
    let report = wait_for(
        "Orthanc's storage commitment report",
        Duration::from_secs(10),
        || {
            let report = orthanc.get(&format!("/storage-commitment/{transaction}"));
            (report["Status"] != "Pending").then_some(report)
        },
    );
    assert_eq!(report["Status"], "Success", "{report:#}");
    assert_eq!(report["Success"].as_array().unwrap().len(), 3, "{report:#}");
    assert!(
        report["Failures"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    daemon.wait_stable_batch(3, Duration::from_secs(5));
    // Orthanc records the report when it answers; the daemon logs it after the release.
    daemon.wait_logged(
        "storage commitment report sent on a new association (3 committed, 0 failed)",
        Duration::from_secs(5),
    );
}

/// A route whose AE title is also `inbound.calling_ae_title` (the shipped configuration:
/// both CLOUDPDI) still takes the PACS's C-STOREs and storage commitment requests with
/// `inbound.storage_commitment = true`: the association from the PACS to the import AE
/// title is sorted per message, not taken for a report-only association and aborted.
#[test]
fn a_route_on_the_import_ae_title_still_takes_the_pacs_c_stores() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &dir.path().join("gw"),
        &format!(
            "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 600\n\
             [inbound]\npacs = \"127.0.0.1:{}\"\npacs_ae_title = \"MODALITY\"\n\
             calling_ae_title = \"CLOUDPDI\"\nstorage_commitment = true\n",
            free_port()
        ),
    );
    let files = study(&dir.path().join("study"));
    let stored = pynetdicom_store(&daemon, "MODALITY", &files);
    assert!(
        stored.len() == 3 && stored.iter().all(|s| s.status == 0),
        "{stored:?}\n{}",
        daemon.log()
    );
    let refs: Vec<String> = files
        .iter()
        .map(|f| format!("{CT}:{}", sop_instance_uid(f)))
        .collect();
    let same = request(&daemon, "MODALITY", "same", free_port(), &refs);
    assert_eq!((same.action_status, same.event), (0, 1), "{same:?}");
    assert_eq!(same.committed.len(), 3, "{same:?}");
}

/// A request over 24 MiB is read to its end, discarded and answered 0x0213 (resource
/// limitation), as the conformance statement says, rather than aborted.
#[test]
fn a_request_over_the_size_limit_is_answered_resource_limitation() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("gw"), CT_ROUTE);
    let refs = [format!("{CT}:1.2.826.0.1.3680043.99.1")];
    let over = request_padded(
        &daemon,
        "MODALITY",
        "same",
        free_port(),
        &refs,
        25 * 1024 * 1024,
    );
    assert_eq!(over.action_status, 0x0213, "{over:?}\n{}", daemon.log());
    assert!(
        daemon
            .log()
            .contains("storage commitment dataset larger than 25165824 bytes"),
        "{}",
        daemon.log()
    );
}

/// The pynetdicom storage commitment PACS (`tests/peers/commit_pacs.py`) on a free port,
/// logging its C-STOREs to `dir/pacs.log`.
struct CommitPacs {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl CommitPacs {
    fn start(dir: &Path, args: &[&str]) -> CommitPacs {
        let port = free_port();
        let child = Command::new("python3")
            .arg(root().join("tests/peers/commit_pacs.py"))
            .arg(port.to_string())
            .arg(dir.join("pacs"))
            .args(args)
            .stdout(std::fs::File::create(dir.join("pacs.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("pacs.err")).unwrap())
            .spawn()
            .unwrap();
        wait_for("the PACS to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(())
        });
        CommitPacs {
            child,
            port,
            log: dir.join("pacs.log"),
        }
    }

    /// The C-STOREs the PACS took, by SOP Instance UID, in order.
    fn received(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for CommitPacs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A study of 3 CT instances in `dir/study`.
fn ct_study(dir: &Path) -> Vec<PathBuf> {
    let study = dir.join("study");
    gen_ct(&study, 3, &["--patient-id", "P1"]);
    files_in(&study)
}

/// One site sending `files` to itself and importing the token into `pacs` with storage
/// commitment on.
fn import_into(dir: &Path, pacs: &CommitPacs, files: &[PathBuf]) -> Daemon {
    let site = Daemon::start(
        &dir.join("site"),
        &format!(
            "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\nretention_hours = 0\n\
             [outbound]\nenabled = true\n\
             [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n\
             [inbound]\npacs = \"127.0.0.1:{}\"\npacs_ae_title = \"COMMITPACS\"\n\
             calling_ae_title = \"{CALLING}\"\npoll_interval = 1\nmax_backoff = 1\n\
             storage_commitment = true\ncommitment_timeout = 20\n",
            pacs.port
        ),
    );
    send_to_self(&site, files);
    site
}

/// A PACS that reports on the association of the request, 2 s after its N-ACTION-RSP,
/// and keeps failing one instance (0x0112): the report is heard on that association;
/// the instance is sent again and asked again, then, failed in 3 reports in a row, set
/// aside with the reason and not sent again; the job is done with the others committed.
#[test]
fn a_report_on_the_same_association_is_heard_and_an_instance_never_committed_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let files = ct_study(dir.path());
    let lost = sop_instance_uid(&files[0]);
    let pacs = CommitPacs::start(dir.path(), &["same", "2", &lost]);
    let site = import_into(dir.path(), &pacs, &files);
    let done = wait_for("the import done", Duration::from_secs(60), || {
        site.inbound_jobs()
            .into_iter()
            .find(|j| j["state"] == "done")
    });
    assert!(
        done["progress"]
            .as_str()
            .unwrap()
            .contains("2 of 3 stored, 1 set aside, 2 committed, 0 not committed"),
        "{done:#}"
    );
    let notes: Vec<&str> = done["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(notes.len(), 1, "{done:#}");
    assert!(
        notes[0].starts_with(&format!("set aside {lost} in "))
            && notes[0].contains(
                "not committed by the PACS in 3 storage commitment reports in a row (the \
                 last: the PACS did not commit it: 0x0112 no such object instance)"
            ),
        "{done:#}"
    );
    let sent = pacs.received();
    assert_eq!(
        sent.iter().filter(|u| **u == lost).count(),
        3,
        "sent once per round, not after it was set aside: {sent:?}"
    );
    assert_eq!(sent.len(), 5, "{sent:?}");
    // The PACS prints each answer when it reads it; the site may finish the job first.
    let answered = || {
        std::fs::read_to_string(dir.path().join("pacs.out"))
            .unwrap_or_default()
            .matches("report sent on the same association, answered")
            .count()
    };
    wait_for(
        "the PACS to print its third answer",
        Duration::from_secs(10),
        || (answered() >= 3).then_some(()),
    );
    assert_eq!(answered(), 3, "{}", site.log());
    assert!(
        site.log().contains("storage commitment report received"),
        "{}",
        site.log()
    );
}

/// A PACS that does not accept the Storage Commitment SOP class, and one that refuses
/// the N-ACTION: the import is held (not retried for ever) with what to fix and the
/// retry command.
#[test]
fn a_pacs_without_storage_commitment_holds_the_import_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let files = ct_study(dir.path());
    let pacs = CommitPacs::start(dir.path(), &["no-commitment"]);
    let site = import_into(dir.path(), &pacs, &files);
    let deadline = Instant::now() + Duration::from_secs(40);
    let held = loop {
        let jobs = site.inbound_jobs();
        if let Some(job) = jobs.iter().find(|j| j["held"] == true) {
            break job.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the import was not held: {jobs:#?}\n{}",
            site.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let error = held["last_error"].as_str().unwrap();
    assert!(
        error.contains("does not accept the Storage Commitment Push Model SOP class")
            && error.contains("inbound.storage_commitment = false")
            && error.contains("then run `cloudpdi retry R"),
        "{held:#}"
    );
    assert_eq!(held["attempts"], 1, "{held:#}");
}
