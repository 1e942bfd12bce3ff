//! Reception (issue: gateway daemon part 1): real DCMTK and pynetdicom peers send to the
//! real `cloudpdi serve` on loopback; the spool and its index are checked afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const CALLING: &str = "PACS";

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Every file of `originals` is in the index under route `ct`, with the same dataset, the
/// transfer syntax it was sent in and the calling AE title in its meta header.
fn assert_all_spooled(daemon: &Daemon, originals: &[(PathBuf, String)]) {
    let index = daemon.index();
    for (original, sent_ts) in originals {
        let uid = sop_instance_uid(original);
        let record = index
            .instance("ct", &uid)
            .unwrap()
            .unwrap_or_else(|| panic!("{} ({uid}) not in the index", original.display()));
        let stored = daemon.spooled(&record);
        assert_same_dataset(original, &stored);
        let (ts, source_ae) = meta_of(&stored);
        assert_eq!(&ts, sent_ts, "{}", original.display());
        assert_eq!(source_ae, CALLING);
        assert_eq!(record.transfer_syntax, *sent_ts);
    }
}

#[test]
fn echoscu_is_answered() {
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), CT_ROUTE);
    let out = run(Command::new(require("/usr/bin/echoscu")).args([
        "-aec",
        "CLOUDPDI",
        "127.0.0.1",
        &daemon.dicom.port().to_string(),
    ]));
    assert!(out.status.success(), "{out:?}\n{}", daemon.log());
    assert!(daemon.log().contains("association accepted"));
}

#[test]
fn storescu_ct_study_of_210_slices_lands_unchanged_and_batches() {
    let dir = tempdir();
    let study = dir.path().join("study");
    let study_uid = gen_ct(&study, 210, &["--charset", "iso2022"]);
    let mut daemon = Daemon::start(dir.path(), CT_ROUTE);
    let files = files_in(&study);
    let out = storescu(&daemon, CALLING, &[], &files);
    assert!(out.status.success(), "{out:?}\n{}", daemon.log());

    let batch = daemon.wait_stable_batch(210, Duration::from_secs(30));
    assert_eq!(batch["key"], study_uid.as_str());
    assert_eq!(batch["route"], "ct");
    // Both lines follow what the test saw: the stable state is committed before the
    // index's flush and its log line, and the association's summary follows its release.
    daemon.wait_logged("batch stable, ready for packing", Duration::from_secs(10));
    daemon.wait_logged("instances=210", Duration::from_secs(10));
    assert!(daemon.stop().success());

    let explicit_le = "1.2.840.10008.1.2.1".to_owned();
    let originals: Vec<_> = files
        .into_iter()
        .map(|f| (f, explicit_le.clone()))
        .collect();
    assert_all_spooled(&daemon, &originals);
    let index = daemon.index();
    let ready = index.ready().unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(index.members(ready[0]).unwrap().len(), 210);
}

/// DCMTK storescu option that proposes exactly one transfer syntax (DESIGN §9).
fn storescu_option(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.1" => "-xe",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        "1.2.840.10008.1.2.4.100" => "-xm",
        "1.2.840.10008.1.2.4.101" => "-xh",
        "1.2.840.10008.1.2.4.102" => "-xn",
        "1.2.840.10008.1.2.4.103" => "-xl",
        "1.2.840.10008.1.2.4.107" => "-x4",
        "1.2.840.10008.1.2.4.108" => "-x5",
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
struct CorpusItem {
    path: PathBuf,
    transfer_syntax: String,
    charset: String,
}

#[test]
fn storescu_pydicom_corpus_lands_unchanged_in_every_transfer_syntax() {
    let out = run(Command::new("python3").arg(root().join("tests/peers/corpus.py")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let corpus: Vec<CorpusItem> = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_ts: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for item in &corpus {
        by_ts
            .entry(item.transfer_syntax.clone())
            .or_default()
            .push(item.path.clone());
    }
    let charsets: BTreeSet<&str> = corpus.iter().map(|i| i.charset.as_str()).collect();
    assert!(
        charsets.iter().any(|c| c.contains("ISO 2022 IR 87")),
        "the corpus must hold Japanese (ISO 2022 IR 87) files: {charsets:?}"
    );
    assert!(
        by_ts.len() >= 8,
        "too few transfer syntaxes: {:?}",
        by_ts.keys()
    );

    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), CT_ROUTE);
    let mut originals = Vec::new();
    for (ts, files) in &by_ts {
        let option = storescu_option(ts)
            .unwrap_or_else(|| panic!("no storescu option for transfer syntax {ts}"));
        let out = storescu(&daemon, CALLING, &[option, "-R"], files);
        assert!(
            out.status.success(),
            "storescu {option} failed for {ts}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
        originals.extend(files.iter().map(|f| (f.clone(), ts.clone())));
    }
    assert!(daemon.stop().success());
    assert_all_spooled(&daemon, &originals);
}

#[test]
fn eight_associations_at_once_all_stored() {
    let dir = tempdir();
    let study = dir.path().join("study");
    gen_ct(&study, 200, &["--charset", "utf8"]);
    let mut daemon = Daemon::start(dir.path(), CT_ROUTE);
    let files = files_in(&study);
    let children: Vec<_> = files
        .chunks(25)
        .map(|chunk| {
            Command::new(require("/usr/bin/storescu"))
                .args(["-aet", CALLING, "-aec", "CLOUDPDI", "127.0.0.1"])
                .arg(daemon.dicom.port().to_string())
                .args(chunk)
                .spawn()
                .unwrap()
        })
        .collect();
    assert_eq!(children.len(), 8);
    for mut child in children {
        assert!(child.wait().unwrap().success(), "{}", daemon.log());
    }
    daemon.wait_stable_batch(200, Duration::from_secs(30));
    let metrics = ureq_metrics(&daemon);
    assert!(
        metrics.contains("cloudpdi_associations_accepted_total 8"),
        "{metrics}"
    );
    assert!(metrics.contains("cloudpdi_instances_total{outcome=\"stored\"} 200"));
    let free = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cloudpdi_spool_free_bytes "))
        .and_then(|v| v.parse::<i64>().ok());
    assert!(free.is_some_and(|f| f > 0), "{metrics}");
    assert!(
        metrics.contains("# TYPE cloudpdi_batches gauge\n"),
        "{metrics}"
    );
    assert!(daemon.stop().success());
    let index = daemon.index();
    let batch = index.ready().unwrap()[0];
    assert_eq!(index.members(batch).unwrap().len(), 200);
}

fn ureq_metrics(daemon: &Daemon) -> String {
    let out = run(Command::new(require("/usr/bin/curl"))
        .args(["-sf", &format!("http://{}/metrics", daemon.admin)]));
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn unknown_called_ae_and_disallowed_caller_are_rejected_with_reasons() {
    let dir = tempdir();
    let routes = "[route.ct]\nae_title = \"CLOUDPDI\"\nallowed_callers = [\"PACS\"]\n";
    let daemon = Daemon::start(dir.path(), routes);
    let echo = |called: &str, calling: &str| {
        run(Command::new(require("/usr/bin/echoscu")).args([
            "-aec",
            called,
            "-aet",
            calling,
            "127.0.0.1",
            &daemon.dicom.port().to_string(),
        ]))
    };
    let unknown = echo("NOBODY", "PACS");
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("Called AE Title Not Recognized"),
        "{unknown:?}"
    );
    let stranger = echo("CLOUDPDI", "STRANGER");
    assert!(!stranger.status.success());
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("Calling AE Title Not Recognized"),
        "{stranger:?}"
    );
    assert!(echo("CLOUDPDI", "PACS").status.success());
    let log = daemon.log();
    assert!(
        log.contains("association rejected: called AE title not recognized")
            && log.contains("called=\"NOBODY\""),
        "{log}"
    );
    assert!(
        log.contains("association rejected: calling AE title not allowed on this route")
            && log.contains("calling=\"STRANGER\""),
        "{log}"
    );
}

/// A Part 10 file with a valid meta header but a dataset that ends inside an element.
fn unparsable_file(dir: &Path) -> PathBuf {
    unparsable_file_with_uid(dir, "1.2.826.0.1.3680043.10.1436.99.1")
}

/// [`unparsable_file`] whose meta header (and so the C-STORE request) carries `uid`.
fn unparsable_file_with_uid(dir: &Path, uid: &str) -> PathBuf {
    let meta = dicom_object::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
        .media_storage_sop_instance_uid(uid)
        .transfer_syntax("1.2.840.10008.1.2.1")
        .build()
        .unwrap();
    let mut bytes = vec![0u8; 128];
    bytes.extend_from_slice(b"DICM");
    meta.write(&mut bytes).unwrap();
    // (0008,0016) UI claiming 0xFFF0 bytes, followed by only a few.
    bytes.extend_from_slice(&[0x08, 0x00, 0x16, 0x00, b'U', b'I', 0xF0, 0xFF]);
    bytes.extend_from_slice(b"1.2.840.10008.5.1.4.1.1.7\0");
    let path = dir.join("garbage.dcm");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn unparsable_dataset_gets_a_failure_status_and_the_association_goes_on() {
    let dir = tempdir();
    let study = dir.path().join("study");
    gen_ct(&study, 2, &[]);
    let garbage = unparsable_file(dir.path());
    let mut daemon = Daemon::start(dir.path(), CT_ROUTE);
    let mut files = vec![garbage];
    files.extend(files_in(&study));
    let results = pynetdicom_store(&daemon, CALLING, &files);
    assert_eq!(results.len(), 3);
    assert!(
        (0xC000..=0xCFFF).contains(&results[0].status),
        "garbage got status {:#x}",
        results[0].status
    );
    assert!(
        results[0].comment.contains("cannot be parsed"),
        "{results:?}"
    );
    assert_eq!(results[1].status, 0, "{results:?}");
    assert_eq!(results[2].status, 0, "{results:?}");
    assert!(daemon.log().contains("instance refused"));
    assert!(daemon.stop().success());
    let index = daemon.index();
    assert!(
        index
            .instance("ct", "1.2.826.0.1.3680043.10.1436.99.1")
            .unwrap()
            .is_none()
    );
    let spooled = walk(&dir.path().join("data/spool"));
    assert_eq!(
        spooled.len(),
        2,
        "only the good instances are on disk: {spooled:?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn full_disk_answers_out_of_resources_and_leaves_no_partial_file() {
    require("/usr/bin/unshare");
    let dir = tempdir();
    let study = dir.path().join("study");
    gen_ct(&study, 12, &[]);
    let spool = dir.path().join("data/spool");
    std::fs::create_dir_all(&spool).unwrap();
    // A 3 MiB tmpfs holds about five 0.5 MB slices; the index lives outside it.
    let mount = format!("mount -t tmpfs -o size=3m tmpfs {} &&", spool.display());
    let mut daemon = Daemon::start_wrapped(
        dir.path(),
        CT_ROUTE,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &mount,
        ],
    );
    let results = pynetdicom_store(&daemon, CALLING, &files_in(&study));
    let ok = results.iter().filter(|r| r.status == 0).count();
    let full: Vec<_> = results.iter().filter(|r| r.status == 0xA700).collect();
    assert!(ok >= 2, "some instances fit: {results:?}\n{}", daemon.log());
    assert!(
        !full.is_empty(),
        "the rest is refused with 0xA700: {results:?}"
    );
    assert_eq!(ok + full.len(), results.len(), "{results:?}");
    assert!(full[0].comment.contains("out of disk space"), "{full:?}");
    // Look inside the daemon's mount namespace before it goes away.
    let inside = run(Command::new("nsenter")
        .args(["-t", &daemon.pid().to_string(), "-m", "find"])
        .arg(&spool)
        .args(["-type", "f"]));
    let listed = String::from_utf8_lossy(&inside.stdout).to_string();
    assert_eq!(
        listed.lines().count(),
        ok,
        "no partial file remains:\n{listed}"
    );
    let temp = |line: &str| line.rsplit('/').next().is_some_and(|n| n.ends_with(".tmp"));
    assert!(!listed.lines().any(temp), "{listed}");
    assert!(daemon.stop().success());
    let index = daemon.index();
    let batch = index.batches().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].instances as usize, ok);
}

#[test]
fn kill_9_mid_transfer_keeps_every_acknowledged_instance() {
    let dir = tempdir();
    let study = dir.path().join("study");
    gen_ct(&study, 200, &[]);
    let files = files_in(&study);
    let routes = "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 4\n";
    let mut daemon = Daemon::start(dir.path(), routes);

    let mut sender = Command::new("python3")
        .arg(root().join("tests/peers/store.py"))
        .args([
            "127.0.0.1",
            &daemon.dicom.port().to_string(),
            "CLOUDPDI",
            CALLING,
        ])
        .args(&files)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = sender.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Kill once a good part of the study has been acknowledged.
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 40 {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("sender stalled:\n{}", daemon.log()));
        let result: StoreResult = serde_json::from_str(&line).unwrap();
        assert_eq!(result.status, 0, "{result:?}");
        acknowledged.push(result.file);
    }
    daemon.kill9();
    let _ = sender.wait();
    for line in lines_rx.iter() {
        if let Ok(result) = serde_json::from_str::<StoreResult>(&line) {
            if result.status == 0 {
                acknowledged.push(result.file);
            }
        }
    }
    assert!(
        !acknowledged.is_empty() && acknowledged.len() < files.len(),
        "the kill must land mid-transfer: {} acknowledged",
        acknowledged.len()
    );

    // Every acknowledged instance is in the index and its file parses.
    {
        let index = daemon.index();
        for file in &acknowledged {
            let uid = sop_instance_uid(Path::new(file));
            let record = index
                .instance("ct", &uid)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged {file} lost after kill -9"));
            assert_same_dataset(Path::new(file), &daemon.spooled(&record));
        }
    }

    // Restart, resend the whole study (as a PACS retry would): one batch of 200.
    daemon.spawn();
    let out = storescu(&daemon, CALLING, &[], &files);
    assert!(out.status.success(), "{out:?}");
    let batch = daemon.wait_stable_batch(200, Duration::from_secs(30));
    assert_eq!(batch["instances"], 200);
    let status = daemon.status();
    assert_eq!(status["batches"].as_array().unwrap().len(), 1, "{status:#}");
}

#[test]
fn sigterm_stops_cleanly_with_exit_zero() {
    let dir = tempdir();
    let study = dir.path().join("study");
    gen_ct(&study, 3, &[]);
    let mut daemon = Daemon::start(dir.path(), CT_ROUTE);
    assert!(
        storescu(&daemon, CALLING, &[], &files_in(&study))
            .status
            .success()
    );
    let status = daemon.stop();
    assert!(status.success(), "exit status {status}");
    let log = daemon.log();
    assert!(
        log.contains("shutting down") && log.contains("index flushed"),
        "{log}"
    );
    assert_eq!(daemon.index().batches().unwrap()[0].instances, 3);
}

#[test]
fn environment_overrides_reach_the_daemon() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let (dicom, admin) = (free_port(), free_port());
    let config = dir.path().join("c.toml");
    std::fs::write(&config, config_text(1, 2, &data, CT_ROUTE)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("CLOUDPDI_DICOM__LISTEN", format!("127.0.0.1:{dicom}"))
        .env("CLOUDPDI_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("CLOUDPDI_ROUTE__CT__AE_TITLE", "OVERRIDDEN")
        .env("CLOUDPDI_LOG__FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let child = out;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", dicom)).is_err() {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let echo = |called: &str| {
        run(Command::new(require("/usr/bin/echoscu")).args([
            "-aec",
            called,
            "127.0.0.1",
            &dicom.to_string(),
        ]))
        .status
        .success()
    };
    assert!(echo("OVERRIDDEN"));
    assert!(!echo("CLOUDPDI"));
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON log lines"))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "cloudpdi serve ready"),
        "{lines:?}"
    );
}

#[test]
fn silent_peer_is_dropped_after_the_association_timeout() {
    use std::io::Read;
    let dir = tempdir();
    let daemon = Daemon::start_tuned(dir.path(), CT_ROUTE, "association_timeout = 1");
    let mut socket = std::net::TcpStream::connect(daemon.dicom).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let read = socket.read(&mut [0u8; 16]);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0)) || (read.is_err() && waited < Duration::from_secs(9)),
        "the daemon must close a silent connection: {read:?}"
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    // The line is written as the connection closes: give it a moment under load.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !daemon
        .log()
        .contains("did not complete association negotiation")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no log line for the silent peer:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn readiness_is_notified_to_systemd_and_health_is_served() {
    let dir = tempdir();
    let socket_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (dicom, admin) = (free_port(), free_port());
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        common::config_text(dicom, admin, &dir.path().join("data"), CT_ROUTE),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let received = notify.recv(&mut buf);
    let message = received
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        .unwrap_or_default();
    let health = run(Command::new(require("/usr/bin/curl"))
        .args(["-sf", &format!("http://127.0.0.1:{admin}/healthz")]));
    let _ = child.kill();
    let _ = child.wait();
    assert!(message.contains("READY=1"), "notify message: {message:?}");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok\n");
}

/// Starts tests/peers/hold.py and waits until its association is established.
fn hold_association(daemon: &Daemon, seconds: f64) -> std::process::Child {
    use std::io::BufRead;
    let mut holder = Command::new("python3")
        .arg(root().join("tests/peers/hold.py"))
        .args(["127.0.0.1", &daemon.dicom.port().to_string(), "CLOUDPDI"])
        .arg(seconds.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"established\": true"), "{first}");
    holder
}

#[test]
fn association_limit_makes_further_peers_wait() {
    let dir = tempdir();
    let daemon = Daemon::start_tuned(dir.path(), CT_ROUTE, "max_associations = 1");
    let holder = hold_association(&daemon, 3.0);
    let started = std::time::Instant::now();
    let echo = run(Command::new(require("/usr/bin/echoscu")).args([
        "-aec",
        "CLOUDPDI",
        "127.0.0.1",
        &daemon.dicom.port().to_string(),
    ]));
    let waited = started.elapsed();
    let held = holder.wait_with_output().unwrap();
    assert!(echo.status.success(), "{echo:?}");
    assert!(
        waited >= Duration::from_millis(2500),
        "the second peer was served after {waited:?}, before the first released"
    );
    assert!(String::from_utf8_lossy(&held.stdout).contains("\"echo_after_wait\": 0"));
}

#[test]
fn idle_association_is_aborted_after_the_idle_timeout() {
    let dir = tempdir();
    let daemon = Daemon::start_tuned(dir.path(), CT_ROUTE, "idle_timeout = 1");
    let holder = hold_association(&daemon, 3.0);
    let held = holder.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&held.stdout);
    assert!(report.contains("\"aborted\": true"), "{report}");
    // The daemon logs how the association ended after it closed the connection.
    wait_for(
        "the idle association's end logged",
        Duration::from_secs(5),
        || {
            let log = daemon.log();
            (log.contains("connection lost") || log.contains("aborted")).then_some(())
        },
    );
}

#[test]
fn patient_route_batches_all_studies_of_a_patient_together() {
    let dir = tempdir();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let study_a = gen_ct(&first, 3, &["--patient-id", "P-1", "--seed", "1"]);
    let study_b = gen_ct(&second, 2, &["--patient-id", "P-1", "--seed", "2"]);
    assert_ne!(study_a, study_b);
    let other = dir.path().join("other");
    gen_ct(&other, 1, &["--patient-id", "P-2", "--seed", "3"]);
    let routes = "[route.ct]\nae_title = \"CLOUDPDI\"\nbatch_by = \"patient\"\nstable_after = 1\n";
    let mut daemon = Daemon::start(dir.path(), routes);
    for folder in [&first, &second, &other] {
        assert!(
            storescu(&daemon, CALLING, &[], &files_in(folder))
                .status
                .success()
        );
    }
    let batch = daemon.wait_stable_batch(5, Duration::from_secs(20));
    assert_eq!(batch["key"], "P-1");
    assert_eq!(batch["batch_by"], "patient");
    daemon.wait_stable_batch(1, Duration::from_secs(20));
    assert!(daemon.stop().success());
    let index = daemon.index();
    let batches = index.batches().unwrap();
    assert_eq!(batches.len(), 2, "{batches:?}");
    let p1 = batches.iter().find(|b| b.key == "P-1").unwrap();
    let studies: BTreeSet<String> = index
        .members(p1.id)
        .unwrap()
        .iter()
        .map(|uid| index.instance("ct", uid).unwrap().unwrap().study_uid)
        .collect();
    assert_eq!(studies, BTreeSet::from([study_a, study_b]));
}

#[test]
fn a_uid_with_control_characters_cannot_forge_a_log_line() {
    let dir = tempdir();
    let hostile = unparsable_file_with_uid(
        dir.path(),
        "1.2.3\n2026-01-01T00:00:00Z ERROR FORGED-LINE \u{1b}[31mred",
    );
    let daemon = Daemon::start(dir.path(), CT_ROUTE);
    let results = pynetdicom_store(&daemon, CALLING, &[hostile]);
    assert!(
        (0xA000..=0xCFFF).contains(&results[0].status),
        "{results:?}"
    );
    let log = daemon.log();
    assert!(
        log.contains("1.2.3\\n2026-01-01T00:00:00Z ERROR FORGED-LINE \\x1b[31mred"),
        "the UID should be in the log, escaped:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01")) && !log.contains('\u{1b}'),
        "{log}"
    );
}
