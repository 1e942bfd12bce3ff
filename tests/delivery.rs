//! Sealed delivery, hospital to hospital with nobody carrying a slip: a standalone
//! `cloudpdi repository serve` knows facilities HOSPA, HOSPB and HOSPC (API keys, and
//! public keys made by `cloudpdi facility keygen`); daemon A routes a CT with
//! `deliver_to = ["HOSPB"]`, daemon B reads its mailbox (`accept_from = ["HOSPA"]`) and
//! imports into Orthanc. Real processes on loopback, in the test's own network namespace
//! (Orthanc cannot bind loopback only).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudpdi::facility::{FacilityKey, PublicKey};
use common::sites::{Facility, Hub, block};
use common::*;

/// Waits until `count` inbound jobs of `site` are done; returns them all.
fn wait_imports(site: &Daemon, count: usize, what: &str) -> Vec<serde_json::Value> {
    wait_for(what, Duration::from_secs(90), || {
        let jobs = site.inbound_jobs();
        let done = jobs.iter().filter(|j| j["state"] == "done").count();
        assert!(done <= count, "more imports than tokens: {jobs:#?}");
        (done == count).then_some(jobs)
    })
}

/// The deliveries of the outbound job of `site` whose study has Patient ID `patient`.
fn deliveries(site: &Daemon, patient: &str) -> Option<(String, serde_json::Value)> {
    let status = site.status();
    let job = status["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["direction"] == "outbound" && j["study"]["patient_id"] == patient)?
        .clone();
    let id = job["id"].as_str()?.to_owned();
    let details = status["outbound"]
        .as_array()?
        .iter()
        .find(|d| d["id"] == id.as_str())?
        .clone();
    Some((id, details))
}

/// The ID of the message posted to HOSPB for the study of `patient`, once posted.
fn posted_message(site: &Daemon, patient: &str) -> String {
    wait_for("the sealed token posted", Duration::from_secs(60), || {
        let (_, details) = deliveries(site, patient)?;
        details["deliveries"][0]["message_id"]
            .as_str()
            .map(str::to_owned)
    })
}

/// `cloudpdi status` as text, as an admin reads it.
fn status_text(site: &Daemon) -> String {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
        "status",
        "--admin",
        &site.admin.to_string(),
    ]));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CT study of `slices` instances for patient `patient`, sent to A.
fn send_study(work: &Path, a: &Daemon, name: &str, slices: usize, patient: &str) -> Vec<PathBuf> {
    let dir = work.join(name);
    gen_ct(&dir, slices, &["--patient-id", patient, "--matrix", "128"]);
    let files = files_in(&dir);
    let out = storescu(a, "MODALITY", &[], &files);
    assert!(out.status.success(), "{out:?}");
    files
}

/// Instances Orthanc holds.
fn in_orthanc(orthanc: &Orthanc) -> usize {
    orthanc.get("/instances").as_array().unwrap().len()
}

/// Files under the watch folder of `site` (and its `rejected/`).
fn watch_folder_files(site: &Daemon) -> Vec<PathBuf> {
    let inbox = site.dir.join("data/inbox");
    let mut found = files_under(&inbox);
    found.sort();
    found
}

#[test]
fn a_ct_study_reaches_the_pacs_of_the_facility_it_is_sealed_to() {
    if !isolated("a_ct_study_reaches_the_pacs_of_the_facility_it_is_sealed_to") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let keys = work.join("keys");
    let (fa, fb, fc) = (
        Facility::new(&keys, "HOSPA"),
        Facility::new(&keys, "HOSPB"),
        Facility::new(&keys, "HOSPC"),
    );
    let honest = [
        (&fa, Some(fa.public_key.as_str())),
        (&fb, Some(fb.public_key.as_str())),
        (&fc, Some(fc.public_key.as_str())),
    ];
    let mut hub = Hub::start(&work.join("hub"), &honest);
    let orthanc = Orthanc::start(work);
    let site_b = fb.daemon_config(&hub.url, &fb.key_file, &[fa.pin()])
        + "[inbound]\npacs = \"127.0.0.1:4242\"\npacs_ae_title = \"ORTHANC\"\n\
           accept_from = [\"HOSPA\"]\nmailbox_poll_interval = 1\nattempts = 2\n";
    let mut b = Daemon::start(&work.join("b"), &site_b);
    let site_a = fa.daemon_config(&hub.url, &fa.key_file, &[fb.pin()])
        + "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\ndeliver_to = [\"HOSPB\"]\n\
           [outbound]\nenabled = true\n";
    let a = Daemon::start(&work.join("a"), &site_a);

    // 1. A CT into A arrives in B's Orthanc; nobody touched a token file at B.
    let first = send_study(work, &a, "first", 4, "PAT1");
    let jobs = wait_imports(&b, 1, "the sealed delivery imported at B");
    assert_eq!(in_orthanc(&orthanc), first.len(), "{}", b.log());
    let progress = jobs[0]["progress"].as_str().unwrap();
    assert!(
        progress.contains("from HOSPA (sealed delivery)"),
        "{progress}"
    );
    assert!(
        watch_folder_files(&b).is_empty(),
        "no token file at B: {:?}",
        watch_folder_files(&b)
    );
    assert!(status_text(&b).contains("from HOSPA (sealed delivery)"));
    // A's status: delivered to B, then imported by B (B's receipt names HOSPB).
    let imported = wait_for(
        "A's status to show B's import",
        Duration::from_secs(60),
        || {
            let text = status_text(&a);
            text.contains("imported by HOSPB").then_some(text)
        },
    );
    assert!(imported.contains("delivered to HOSPB"), "{imported}");
    let (_, details) = deliveries(&a, "PAT1").unwrap();
    let receipts = details["document"]["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 1, "{details:#}");
    assert_eq!(receipts[0]["facility"], "HOSPB");
    assert_eq!(receipts[0]["instances_imported"], first.len() as u64);
    let mailbox_b = fb.client(&hub.url);
    // The message is deleted once its job is queued, alongside the import.
    wait_for("B's mailbox emptied", Duration::from_secs(10), || {
        block(mailbox_b.messages())
            .unwrap()
            .is_empty()
            .then_some(())
    });

    // 2. A sender not in accept_from (HOSPC, a registered facility with a good key) is
    // refused, listed by B's status, and its message deleted. HOSPC is neither accepted
    // nor pinned at B: its refusal shares the record of all such senders, named in the
    // reason (a hostile repository cannot grow B's database with invented senders).
    let token = fs::read_to_string(tokens(&a).first().unwrap()).unwrap();
    let b_public = PublicKey::parse(&fb.public_key).unwrap();
    let from_c = cloudpdi::facility::seal(
        &fc.key(),
        "HOSPC",
        &b_public,
        "HOSPB",
        token.trim().as_bytes(),
    )
    .unwrap();
    let posted = block(fc.client(&hub.url).post_message("HOSPB", &from_c)).unwrap();
    let refused = wait_for("B to refuse HOSPC", Duration::from_secs(30), || {
        let status = b.status();
        let list = status["refused_senders"].as_array()?.clone();
        list.iter()
            .find(|r| r["sender"] == "(other facilities)")
            .cloned()
    });
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("facility HOSPC is not in inbound.accept_from"),
        "{refused:#}"
    );
    assert!(status_text(&b).contains("refused sealed tokens from (other facilities)"));
    wait_for("HOSPC's message deleted", Duration::from_secs(10), || {
        block(mailbox_b.messages())
            .unwrap()
            .is_empty()
            .then_some(())
    });
    assert_eq!(b.inbound_jobs().len(), 1, "nothing imported from HOSPC");
    assert!(
        b.log().matches(&posted.message_id).count() >= 1,
        "the refusal is logged"
    );

    // 3. kill -9 of B between fetch and job creation loses nothing and imports once. The
    // window is made certain, not raced: B's inbound job folder (`jobs/in`) is a file, so
    // queueing the fetched token fails (as a full disk would) and the message stays; B is
    // killed in that state, the obstacle removed, B restarted.
    b.stop();
    let jobs_in = b.dir.join("data/jobs/in");
    let _ = fs::remove_dir_all(&jobs_in);
    fs::write(&jobs_in, b"not a folder").unwrap();
    b.spawn();
    let second = send_study(work, &a, "second", 3, "PAT2");
    let message = posted_message(&a, "PAT2");
    wait_for(
        "B to fetch and fail to queue",
        Duration::from_secs(60),
        || b.log().contains("sealed token not taken yet").then_some(()),
    );
    b.kill9();
    let waiting = block(mailbox_b.messages()).unwrap();
    assert_eq!(waiting.len(), 1, "the message survives the crash");
    assert_eq!(waiting[0].message_id, message);
    assert_eq!(waiting[0].sender, "HOSPA");
    // Facility C can neither read nor delete it, and what it holds does not open with C's
    // key (HPKE to B's key).
    let c = fc.client(&hub.url);
    assert!(
        block(c.messages()).unwrap().is_empty(),
        "C sees only its own mailbox"
    );
    assert!(
        block(c.message(&message)).is_err(),
        "C cannot fetch B's message"
    );
    let _ = block(c.delete_message(&message));
    assert_eq!(
        block(mailbox_b.messages()).unwrap().len(),
        1,
        "C deleted nothing"
    );
    let sealed = block(mailbox_b.message(&message)).unwrap();
    let a_public = PublicKey::parse(&fa.public_key).unwrap();
    assert!(cloudpdi::facility::open(&fc.key(), "HOSPB", &a_public, "HOSPA", &sealed).is_err());
    assert!(cloudpdi::facility::open(&fb.key(), "HOSPB", &a_public, "HOSPA", &sealed).is_ok());
    fs::remove_file(&jobs_in).unwrap();
    b.spawn();
    let jobs = wait_imports(&b, 2, "the delivery imported after the crash");
    assert_eq!(jobs.len(), 2, "imported once: {jobs:#?}");
    assert_eq!(in_orthanc(&orthanc), first.len() + second.len());
    wait_for("B's mailbox emptied", Duration::from_secs(10), || {
        block(mailbox_b.messages())
            .unwrap()
            .is_empty()
            .then_some(())
    });

    // The same with a real race: B stopped, the token posted, B started and killed -9 as
    // soon as the repository's audit trail shows the fetch, wherever B was then.
    b.stop();
    let third = send_study(work, &a, "third", 2, "PAT3");
    let message = posted_message(&a, "PAT3");
    b.spawn();
    wait_for(
        "B's fetch in the audit trail",
        Duration::from_secs(30),
        || {
            let events = hub.audit_of(&message);
            events.iter().any(|e| e.contains("fetch")).then_some(())
        },
    );
    b.kill9();
    println!(
        "killed B after the fetch; audit of the message then: {:?}",
        hub.audit_of(&message)
    );
    b.spawn();
    let jobs = wait_imports(&b, 3, "the raced delivery imported after the crash");
    assert_eq!(jobs.len(), 3, "imported once: {jobs:#?}");
    assert_eq!(
        in_orthanc(&orthanc),
        first.len() + second.len() + third.len()
    );

    // 4. A key changed at the repository without a new pin: HOSPB's entry now carries
    // HOSPC's key. A's delivery is held with the pin error; nothing reaches B's mailbox.
    hub.restart(&[
        (&fa, Some(fa.public_key.as_str())),
        (&fb, Some(fc.public_key.as_str())),
        (&fc, Some(fc.public_key.as_str())),
    ]);
    send_study(work, &a, "fourth", 2, "PAT4");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (job, details) = loop {
        let status = a.status();
        let held = deliveries(&a, "PAT4").and_then(|(id, details)| {
            let job = status["jobs"]
                .as_array()?
                .iter()
                .find(|j| j["id"] == id.as_str())?
                .clone();
            job["held"]
                .as_bool()
                .unwrap_or(false)
                .then_some((job, details))
        });
        if let Some(found) = held {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "A's delivery is not held: {status:#}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let error = job["last_error"].as_str().unwrap();
    for part in [
        fc.fingerprint.as_str(),
        fb.fingerprint.as_str(),
        "facilities.HOSPB.fingerprint",
        "cloudpdi retry",
    ] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    assert!(
        details["deliveries"][0]["posted_at"].is_null(),
        "{details:#}"
    );
    let text = status_text(&a);
    assert!(text.contains("not delivered to HOSPB"), "{text}");
    assert!(block(mailbox_b.messages()).unwrap().is_empty());
    // The operator puts HOSPB's own key back; `cloudpdi retry` sends the held delivery.
    hub.restart(&honest);
    let job_id = job["id"].as_str().unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
        "retry",
        "--admin",
        &a.admin.to_string(),
        job_id,
    ]));
    assert!(out.status.success(), "retry: {out:?}");
    let jobs = wait_imports(&b, 4, "the held delivery imported after the retry");
    assert_eq!(jobs.len(), 4, "{jobs:#?}");

    // 5. The sender's key changed at the repository without a new pin at B: B refuses
    // A's sealed token, names both fingerprints, and keeps it waiting in the mailbox
    // (recorded once, not at every poll). Once the key is put back, B imports it by
    // itself; `cloudpdi retry` of A's done job then seals the issued token again, and B
    // takes it without importing twice.
    hub.restart(&[
        (&fa, Some(fc.public_key.as_str())),
        (&fb, Some(fb.public_key.as_str())),
        (&fc, Some(fc.public_key.as_str())),
    ]);
    send_study(work, &a, "fifth", 2, "PAT5");
    let message = posted_message(&a, "PAT5");
    let refused = wait_for(
        "B to refuse A's changed key",
        Duration::from_secs(30),
        || {
            let status = b.status();
            status["refused_senders"]
                .as_array()?
                .iter()
                .find(|r| r["sender"] == "HOSPA" && r["last_message"] == message.as_str())
                .cloned()
        },
    );
    let reason = refused["reason"].as_str().unwrap();
    for part in [
        fc.fingerprint.as_str(),
        fa.fingerprint.as_str(),
        "facilities.HOSPA.fingerprint",
        "waits in the mailbox",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason}");
    }
    // Several polls (1 s apart) later, the message still waits, recorded once.
    std::thread::sleep(Duration::from_secs(4));
    let waiting = block(mailbox_b.messages()).unwrap();
    assert_eq!(waiting.len(), 1, "the message waits: {waiting:?}");
    assert_eq!(waiting[0].message_id, message);
    let records = b.status()["refused_senders"].clone();
    let record = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["sender"] == "HOSPA")
        .unwrap();
    assert_eq!(record["messages"], 1, "recorded once: {records:#}");
    assert_eq!(
        b.inbound_jobs().len(),
        4,
        "nothing imported from the changed key"
    );
    hub.restart(&honest);
    let jobs = wait_imports(&b, 5, "the waiting delivery imported once the key is back");
    assert_eq!(jobs.len(), 5, "{jobs:#?}");
    let job5 = wait_for("A's job done", Duration::from_secs(30), || {
        let (id, _) = deliveries(&a, "PAT5")?;
        let status = a.status();
        let done = status["jobs"]
            .as_array()?
            .iter()
            .any(|j| j["id"] == id.as_str() && j["state"] == "done");
        done.then_some(id)
    });
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
        "retry",
        "--admin",
        &a.admin.to_string(),
        &job5,
    ]));
    assert!(out.status.success(), "retry of a done delivery: {out:?}");
    let again = wait_for("the delivery sealed again", Duration::from_secs(30), || {
        let (_, details) = deliveries(&a, "PAT5")?;
        let id = details["deliveries"][0]["message_id"].as_str()?.to_owned();
        (id != message).then_some(id)
    });
    wait_for(
        "the delivery sealed again taken",
        Duration::from_secs(30),
        || {
            (b.log().contains(&again) && block(mailbox_b.messages()).unwrap().is_empty())
                .then_some(())
        },
    );
    assert_eq!(b.inbound_jobs().len(), 5, "imported once");

    // 6. The repository (storage, audit trail, log) and both daemons' logs hold no token
    // text (as printed or without hyphens) and no download proof of the four tokens.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for file in tokens(&a) {
        let text = fs::read_to_string(&file).unwrap().trim().to_owned();
        let token = cloudpdi::token::Token::from_text(&text).unwrap();
        secrets.push(text.replace('-', "").into_bytes());
        secrets.push(text.into_bytes());
        let proof = token.download_proof();
        secrets.push(hex::encode(proof.bytes()).into_bytes());
        secrets.push(proof.bytes().to_vec());
    }
    assert_eq!(secrets.len(), 20, "five tokens issued");
    let mut scanned = files_under(&hub.dir);
    scanned.extend([a.dir.join("daemon.log"), b.dir.join("daemon.log")]);
    for file in &scanned {
        let bytes = fs::read(file).unwrap();
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{} holds a token or proof",
                file.display()
            );
        }
    }
    assert!(
        scanned.iter().any(|f| f.starts_with(hub.dir.join("store"))),
        "the repository's storage was scanned: {scanned:?}"
    );

    // 7. B rotates its key while a token sealed to its old key waits in its mailbox: with
    // the old key in facility.previous_key_files, the token still opens and is imported.
    b.stop();
    send_study(work, &a, "sixth", 2, "PAT6");
    posted_message(&a, "PAT6");
    let new_key = keys.join("HOSPB-2027.key");
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["facility", "keygen", "--out"])
        .arg(&new_key));
    assert!(out.status.success(), "keygen: {out:?}");
    let new_public = FacilityKey::load(&new_key).unwrap().public().to_text();
    hub.restart(&[
        (&fa, Some(fa.public_key.as_str())),
        (&fb, Some(new_public.as_str())),
        (&fc, Some(fc.public_key.as_str())),
    ]);
    let old_line = format!("key_file = \"{}\"\n", fb.key_file.display());
    let config = fs::read_to_string(&b.config).unwrap();
    assert!(config.contains(&old_line), "{config}");
    let rotated = config.replace(
        &old_line,
        &format!(
            "key_file = \"{}\"\nprevious_key_files = [\"{}\"]\n",
            new_key.display(),
            fb.key_file.display()
        ),
    );
    fs::write(&b.config, rotated).unwrap();
    b.spawn();
    let jobs = wait_imports(&b, 6, "the token sealed to B's old key imported");
    assert_eq!(jobs.len(), 6, "{jobs:#?}");
    wait_for("B's mailbox emptied", Duration::from_secs(10), || {
        block(mailbox_b.messages())
            .unwrap()
            .is_empty()
            .then_some(())
    });

    // 8. A message from HOSPA sealed for another facility code than B's does not open: it
    // waits in the mailbox, and the refusal names what an admin can check.
    let new_public = PublicKey::parse(&new_public).unwrap();
    let misnamed =
        cloudpdi::facility::seal(&fa.key(), "HOSPA", &new_public, "HOSPX", b"HT2-0000").unwrap();
    let posted = block(fa.client(&hub.url).post_message("HOSPB", &misnamed)).unwrap();
    let refused = wait_for(
        "B to refuse the misnamed message",
        Duration::from_secs(30),
        || {
            b.status()["refused_senders"]
                .as_array()?
                .iter()
                .find(|r| r["sender"] == "HOSPA" && r["last_message"] == posted.message_id.as_str())
                .cloned()
        },
    );
    let reason = refused["reason"].as_str().unwrap();
    for part in [
        "does not open",
        "facility.previous_key_files",
        "facility.code must equal the [facility.CODE] name",
        "waits in the mailbox",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let waiting = block(mailbox_b.messages()).unwrap();
    assert_eq!(waiting.len(), 1, "the message waits: {waiting:?}");
    assert_eq!(waiting[0].message_id, posted.message_id);
}

/// A facility key file others may read stops the daemon at start, naming
/// facility.key_file: a sealed delivery cannot fail later for want of its key.
#[test]
fn a_facility_key_readable_by_others_stops_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (
        Facility::new(dir.path(), "HOSPA"),
        Facility::new(dir.path(), "HOSPB"),
    );
    fs::set_permissions(&fa.key_file, fs::Permissions::from_mode(0o644)).unwrap();
    // No repository runs: the daemon stops on the key file before it would contact one.
    let extra = fa.daemon_config("http://127.0.0.1:9", &fa.key_file, &[fb.pin()])
        + "[route.ct]\nae_title = \"CLOUDPDI\"\ndeliver_to = [\"HOSPB\"]\n";
    let config = dir.path().join("cloudpdi.toml");
    fs::write(
        &config,
        config_text(free_port(), free_port(), &dir.path().join("data"), &extra),
    )
    .unwrap();
    let out = run(Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_cloudpdi"), "serve", "--config"])
        .arg(&config));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon started: {stderr}");
    assert_ne!(
        out.status.code(),
        Some(124),
        "the daemon ran until killed: {stderr}"
    );
    assert!(
        stderr.contains("facility.key_file") && stderr.contains(&fa.key_file.display().to_string()),
        "{stderr}"
    );
}
