//! The sending side of sealed delivery, after review: the daemon refuses to start when
//! the shared repository does not know its facility code with its key; the delivery
//! command runs even when a recipient's key holds the sealed delivery; `cloudpdi retry`
//! of a done job seals only that job's own token; and documents of the embedded
//! repository from before it named this facility by its code stay this daemon's. Real
//! processes on loopback: `cloudpdi repository serve`, `cloudpdi serve`, DCMTK storescu.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloudpdi::facility::FacilityKey;
use common::sites::{Facility, Hub, block};
use common::*;

/// Runs `cloudpdi serve` on `extra` configuration and expects it to exit by itself within
/// 30 s (a refused start); returns its exit status's success and its output.
fn refused_start(dir: &Path, extra: &str) -> String {
    fs::create_dir_all(dir).unwrap();
    let config = dir.join("cloudpdi.toml");
    fs::write(
        &config,
        config_text(free_port(), free_port(), &dir.join("data"), extra),
    )
    .unwrap();
    let log = dir.join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(dir.join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cloudpdi serve started although it should have refused:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a refused start exits non-zero");
    fs::read_to_string(&log).unwrap_or_default()
        + &fs::read_to_string(dir.join("serve.err")).unwrap()
}

/// The outbound job of `site` in `status --json`'s jobs, once `test` holds for it.
fn wait_outbound(
    site: &Daemon,
    what: &str,
    test: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
) -> (serde_json::Value, serde_json::Value) {
    wait_for(what, Duration::from_secs(60), || {
        let status = site.status();
        let job = status["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["direction"] == "outbound")?
            .clone();
        let details = status["outbound"]
            .as_array()?
            .iter()
            .find(|d| d["id"] == job["id"])?
            .clone();
        test(&job, &details).then_some((job, details))
    })
}

fn send_ct(work: &Path, site: &Daemon, name: &str, patient: &str) {
    let dir = work.join(name);
    gen_ct(&dir, 2, &["--patient-id", patient, "--matrix", "64"]);
    let out = storescu(site, "MODALITY", &[], &files_in(&dir));
    assert!(out.status.success(), "{out:?}");
}

fn retry(site: &Daemon, job: &str) -> std::process::Output {
    run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["retry", job, "--config"])
        .arg(&site.config))
}

#[test]
fn a_daemon_whose_code_is_not_registered_with_its_key_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let keys = work.join("keys");
    let (fa, fb, fc) = (
        Facility::new(&keys, "HOSPA"),
        Facility::new(&keys, "HOSPB"),
        Facility::new(&keys, "HOSPC"),
    );
    // HOSPC has an API key but no public key in the directory.
    let hub = Hub::start(
        &work.join("hub"),
        &[
            (&fa, Some(fa.public_key.as_str())),
            (&fb, Some(fb.public_key.as_str())),
            (&fc, None),
        ],
    );
    let route = "[route.ct]\nae_title = \"CLOUDPDI\"\ndeliver_to = [\"HOSPB\"]\n\
                 [outbound]\nenabled = true\n";
    let pins = [("HOSPB", fb.fingerprint.as_str())];
    let c_fingerprint = FacilityKey::load(&fc.key_file)
        .unwrap()
        .public()
        .fingerprint()
        .to_string();

    // A code the directory does not know.
    let text = refused_start(
        &work.join("unregistered"),
        &(fc.daemon_config(&hub.url, &fc.key_file, &pins) + route),
    );
    assert!(
        text.contains("facility HOSPC (facility.code) is not registered in the directory"),
        "{text}"
    );
    assert!(
        text.contains(&c_fingerprint),
        "our fingerprint for the operator: {text}"
    );

    // A known code with another key than ours (a wrong facility.key_file).
    let text = refused_start(
        &work.join("other-key"),
        &(fa.daemon_config(&hub.url, &fc.key_file, &pins) + route),
    );
    assert!(
        text.contains("has another public key for facility HOSPA than facility.key_file"),
        "{text}"
    );
    assert!(text.contains(&c_fingerprint), "{text}");

    // A repository that does not answer is only warned about.
    let down = format!("http://127.0.0.1:{}", free_port());
    let mut site = Daemon::start(
        &work.join("down"),
        &(fa.daemon_config(&down, &fa.key_file, &pins) + route),
    );
    wait_for("the warning", Duration::from_secs(20), || {
        site.log()
            .contains("cannot check this facility's registration")
            .then_some(())
    });
    assert!(site.stop().success());

    // A repository that accepts the connection and never answers holds the start for the
    // check's 5 s; a stop in that time is caught and ends in a clean shutdown.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let mut site = Daemon::start(
        &work.join("silent"),
        &(fa.daemon_config(&silent_url, &fa.key_file, &pins) + route),
    );
    assert!(
        !site
            .log()
            .contains("cannot check this facility's registration"),
        "the stop must arrive during the check: {}",
        site.log()
    );
    let status = site.stop();
    assert!(
        status.success(),
        "a stop during the start: {status}\n{}",
        site.log()
    );
    drop(silent);

    // Registered with its own key: it starts.
    let mut site = Daemon::start(
        &work.join("good"),
        &(fa.daemon_config(&hub.url, &fa.key_file, &pins) + route),
    );
    wait_for("the registration checked", Duration::from_secs(20), || {
        site.log()
            .contains("this facility's key is registered")
            .then_some(())
    });
    assert!(site.stop().success());
}

#[test]
fn a_held_recipient_does_not_hold_the_slip_and_a_retry_seals_only_the_jobs_own_token() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let keys = work.join("keys");
    let (fa, fb, fc, fd) = (
        Facility::new(&keys, "HOSPA"),
        Facility::new(&keys, "HOSPB"),
        Facility::new(&keys, "HOSPC"),
        Facility::new(&keys, "HOSPD"),
    );
    // The directory gives HOSPC another key (HOSPD's) than the one HOSPC read to A.
    let hub = Hub::start(
        &work.join("hub"),
        &[
            (&fa, Some(fa.public_key.as_str())),
            (&fb, Some(fb.public_key.as_str())),
            (&fc, Some(fd.public_key.as_str())),
        ],
    );
    let pins = [
        ("HOSPB", fb.fingerprint.as_str()),
        ("HOSPC", fc.fingerprint.as_str()),
    ];

    // 1. Site A2 delivers to HOSPC, whose key is held: its delivery command still runs.
    let delivered = work.join("delivered");
    fs::create_dir_all(&delivered).unwrap();
    let held_route = format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\ndeliver_to = [\"HOSPC\"]\n\
         deliver_command = [\"/bin/cp\", \"-t\", \"{}\"]\n[outbound]\nenabled = true\n",
        delivered.display()
    );
    let a2 = Daemon::start(
        &work.join("a2"),
        &(fa.daemon_config(&hub.url, &fa.key_file, &pins) + &held_route),
    );
    send_ct(work, &a2, "held", "PAT2");
    let (held, _) = wait_outbound(&a2, "the delivery held on HOSPC's key", |job, details| {
        job["held"] == true
            && details["deliveries"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("but facilities.HOSPC.fingerprint pins"))
    });
    assert_eq!(held["state"], "post", "{held:#}");
    assert_eq!(
        files_in(&delivered).len(),
        1,
        "the delivery command ran with the slip before the held post:\n{}",
        a2.log()
    );
    let other_token = tokens(&a2).first().unwrap().clone();

    // 2. Site A delivers to HOSPB; the job is done.
    let a = Daemon::start(
        &work.join("a"),
        &(fa.daemon_config(&hub.url, &fa.key_file, &pins)
            + "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\ndeliver_to = [\"HOSPB\"]\n\
               [outbound]\nenabled = true\n"),
    );
    send_ct(work, &a, "first", "PAT1");
    let (job, _) = wait_outbound(&a, "the sealed token posted", |job, details| {
        job["state"] == "done" && details["deliveries"][0]["message_id"].is_string()
    });
    let id = job["id"].as_str().unwrap().to_owned();
    let mailbox_b = fb.client(&hub.url);
    assert_eq!(block(mailbox_b.messages()).unwrap().len(), 1);

    // 3. Its token file replaced by another job's token: a retry refuses to seal it.
    let own_token = tokens(&a).first().unwrap().clone();
    let own_text = fs::read(&own_token).unwrap();
    fs::copy(&other_token, &own_token).unwrap();
    let out = retry(&a, &id);
    assert!(out.status.success(), "{out:?}");
    let (failed, _) = wait_outbound(&a, "the retry refused", |job, _| job["state"] == "failed");
    let error = failed["last_error"].as_str().unwrap();
    assert!(
        error.contains("holds another job's token") && error.contains("nothing was sent"),
        "{error}"
    );
    assert_eq!(
        block(mailbox_b.messages()).unwrap().len(),
        1,
        "nothing sealed to HOSPB"
    );

    // 4. Not a regular file: refused too, without waiting on it.
    fs::remove_file(&own_token).unwrap();
    let out = run(Command::new("mkfifo").arg(&own_token));
    assert!(out.status.success(), "{out:?}");
    assert!(retry(&a, &id).status.success());
    wait_outbound(&a, "the FIFO refused", |job, _| {
        job["state"] == "failed"
            && job["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("not a regular file"))
    });

    // 5. The job's own token put back: the retry seals it to HOSPB again.
    fs::remove_file(&own_token).unwrap();
    fs::write(&own_token, own_text).unwrap();
    assert!(retry(&a, &id).status.success());
    wait_outbound(&a, "the token sealed again", |job, _| {
        job["state"] == "done"
    });
    assert_eq!(block(mailbox_b.messages()).unwrap().len(), 2, "{}", a.log());
}

#[test]
fn documents_the_embedded_repository_recorded_as_embedded_stay_this_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    // A facility code the repository cannot name: its documents are recorded as created
    // by `embedded`, as every document was before the embedded repository took the code.
    let route = "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\n\
                 [outbound]\nenabled = true\n[facility]\nname = \"Hospital A\"\n";
    let mut site = Daemon::start(&work.join("a"), &format!("{route}code = \"OLD SITE\"\n"));
    send_ct(work, &site, "study", "PAT1");
    let (_, details) = wait_outbound(&site, "the document's status", |job, details| {
        job["state"] == "done" && details["document"].is_object()
    });
    assert_eq!(details["document"]["downloads"], 0, "{details:#}");
    assert!(site.stop().success());

    // The facility now has a code: the document is still its own.
    let config = fs::read_to_string(&site.config)
        .unwrap()
        .replace("code = \"OLD SITE\"", "code = \"HOSPA\"");
    fs::write(&site.config, config).unwrap();
    site.spawn();
    let (_, details) = wait_outbound(&site, "the document's status after the upgrade", |_, d| {
        d["document"].is_object() || d["document_error"].is_string()
    });
    assert!(
        details["document"].is_object(),
        "the document stays this daemon's: {details:#}"
    );
    assert!(site.stop().success());
}
