//! `cloudpdi receive` and `cloudpdi send` hand their work to the running daemon and say
//! what will happen: a token is queued or refused with the reason (no daemon, a daemon
//! that does not import, a repository not allowed, a token already taken), and a send
//! made by the command is listed by `cloudpdi status`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Daemon, Repository, free_port, gen_ct, run};

/// Runs `cloudpdi ARGS`; (exit success, stdout + stderr).
fn cloudpdi(args: &[&str]) -> (bool, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .env_remove("CLOUDPDI_CONFIG")
        .args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A token for document `document` in `repository` (a URL, or `community:CODE`), written
/// to `dir/name.token`.
fn token(dir: &Path, name: &str, repository: &str, document: &str) -> String {
    let path = dir.join(format!("{name}.token"));
    let (flag, repository) = match repository.strip_prefix("community:") {
        Some(code) => ("--community", code),
        None => ("--repository", repository),
    };
    let (ok, out) = cloudpdi(&[
        "token",
        "new",
        flag,
        repository,
        "--document-id",
        document,
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    format!("@{}", path.display())
}

fn receive(daemon: &Daemon, token: &str) -> (bool, String) {
    cloudpdi(&[
        "receive",
        "--config",
        daemon.config.to_str().unwrap(),
        token,
    ])
}

const RECEIVER: &str = "[route.ct]\nae_title = \"CLOUDPDI\"\n\
     [repositories]\nPDI = \"http://127.0.0.1:9/pdi\"\nELSE = \"https://elsewhere.example\"\n\
     [inbound]\npacs_ae_title = \"ORTHANC\"\nattempts = 1\nmax_backoff = 3600\n\
     allowed_repositories = [\"http://127.0.0.1:9/pdi\"]\n";

#[test]
fn receive_says_why_nothing_would_be_imported() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = token(
        dir.path(),
        "allowed",
        "http://127.0.0.1:9/pdi",
        "0123456789abcdef0123",
    );
    let foreign = token(
        dir.path(),
        "foreign",
        "https://elsewhere.example",
        "0123456789abcdef0123",
    );

    // No daemon on the configured admin address.
    let lonely = dir.path().join("lonely.toml");
    let text = common::config_text(
        free_port(),
        free_port(),
        &dir.path().join("d"),
        common::CT_ROUTE,
    );
    std::fs::write(&lonely, text).unwrap();
    let (ok, out) = cloudpdi(&["receive", "--config", lonely.to_str().unwrap(), &allowed]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("no cloudpdi daemon answers at 127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("--out"), "the alternative is named: {out}");

    // A daemon that does not import (no inbound.pacs).
    let sender = Daemon::start(&dir.path().join("sender"), RECEIVER);
    let (ok, out) = receive(&sender, &allowed);
    assert!(!ok, "{out}");
    assert!(
        out.contains("does not import tokens: inbound.pacs is empty"),
        "{out}"
    );
    drop(sender);

    // A daemon that imports (into a PACS that is not there: the job waits).
    let pacs = format!("{RECEIVER}pacs = \"127.0.0.1:{}\"\n", free_port());
    let receiver = Daemon::start(&dir.path().join("receiver"), &pacs);
    let (ok, out) = receive(&receiver, &foreign);
    assert!(!ok, "{out}");
    assert!(out.contains("https://elsewhere.example"), "{out}");
    assert!(out.contains("inbound.allowed_repositories"), "{out}");

    // A community code is resolved through [repositories], and the URL it names must be
    // allowed; an unknown code names the key to add.
    let by_code = |name: &str, code: &str| {
        let file = token(
            dir.path(),
            name,
            &format!("community:{code}"),
            "0123456789abcdef0123",
        );
        receive(&receiver, &file)
    };
    let (ok, out) = by_code("else", "ELSE");
    assert!(!ok, "{out}");
    assert!(out.contains("https://elsewhere.example"), "{out}");
    assert!(out.contains("inbound.allowed_repositories"), "{out}");
    let (ok, out) = by_code("unknown", "NOPE");
    assert!(!ok, "{out}");
    assert!(
        out.contains("community NOPE, which is not in [repositories]")
            && out.contains("add NOPE = \"URL\""),
        "{out}"
    );
    let (ok, out) = by_code("pdi", "PDI");
    assert!(ok, "{out}");
    assert!(out.contains("queued for import as job R"), "{out}");
    let job = out
        .split("job ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .trim_end_matches(['.', ',', ':'])
        .to_owned();

    // The same document named by its URL (as a slip might) is the same job: the token
    // given twice, in either form, is imported once.
    let (ok, again) = receive(&receiver, &allowed);
    assert!(!ok, "{again}");
    assert!(again.contains("already being imported"), "{again}");
    assert!(
        again.contains(&job),
        "the job of the community token: {again}"
    );
    let (ok, again) = by_code("pdi-again", "PDI");
    assert!(!ok, "{again}");
    assert!(again.contains("already being imported"), "{again}");

    // A local Patient ID that cannot be written into DICOM is refused before a job.
    let (ok, out) = cloudpdi(&[
        "receive",
        "--config",
        receiver.config.to_str().unwrap(),
        "--patient-id",
        &"P\\1".repeat(30),
        &foreign.replace("foreign", "allowed"),
    ]);
    assert!(!ok && out.contains("local Patient ID"), "{out}");

    let secret = std::fs::read_to_string(dir.path().join("allowed.token")).unwrap();
    let log = receiver.log();
    assert!(
        !log.contains(secret.trim()),
        "the token never reaches the log"
    );
    assert!(!out.contains(secret.trim()) && !again.contains(secret.trim()));
    // Nor any part of it: no two consecutive groups of its text.
    let groups: Vec<&str> = secret.trim().split('-').collect();
    for pair in groups.windows(2).skip(1) {
        let piece = pair.join("-");
        for text in [&log, &out, &again] {
            assert!(!text.contains(&piece), "{piece} of the token appears");
        }
    }
}

/// A send by `cloudpdi send` is listed by `cloudpdi status`: recorded by the running
/// daemon, or in the index when no daemon runs; two sends in one second stay apart.
#[test]
fn a_send_by_the_command_is_listed_by_status() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    std::fs::create_dir_all(&study).unwrap();
    gen_ct(&study, 3, &[]);
    // A standalone repository: the send without a daemon needs one.
    let repository = Repository::start(&dir.path().join("repository"));
    let routes = format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nrepository_url = \"{}\"\n\
         repository_api_key_file = \"{}\"\n[outbound]\nenabled = true\n\
         [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n",
        repository.url,
        repository.key_file.display()
    );
    let mut site = Daemon::start(&dir.path().join("site"), &routes);
    let config = site.config.to_str().unwrap().to_owned();
    let send = || {
        cloudpdi(&[
            "send",
            "--config",
            &config,
            "--route",
            "ct",
            study.to_str().unwrap(),
        ])
    };
    let (ok, out) = send();
    assert!(ok, "{out}");
    assert!(out.contains("recorded as job S"), "{out}");
    let (ok, out) = send();
    assert!(ok, "{out}");
    assert!(out.contains("recorded as job S"), "{out}");
    site.stop();
    let (ok, out) = send();
    assert!(ok, "{out}");
    assert!(out.contains("no daemon is running"), "{out}");
    site.spawn();
    let status = site.status();
    let sent: Vec<_> = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["id"].as_str().unwrap().starts_with('S'))
        .collect();
    assert_eq!(sent.len(), 3, "every send is listed: {status}");
    for job in sent {
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["direction"], "outbound", "{job}");
        assert_eq!(job["study"]["modality"], "CT", "the study is named: {job}");
    }
    // The clerks' group may read the token folder, nothing else of the data folder.
    let mode = |path: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(site.dir.join(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("data/tokens/ct"), 0o750);
    for private in ["data/spool", "data/index", "data/jobs", "data/repository"] {
        assert_eq!(mode(private), 0o700, "{private}");
    }
    // The admin endpoint takes only what `cloudpdi send` records, bounded.
    let post = |body: &str| {
        let out = run(Command::new(common::require("/usr/bin/curl"))
            .args(["-s", "-w", "\n%{http_code}", "-H", "x-cloudpdi-admin: 1"])
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("http://{}/jobs/sent", site.admin)));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut forged = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"].as_str().unwrap().starts_with('S'))
        .unwrap()
        .clone();
    forged["id"] = "S-forged".into();
    let answer = post(&forged.to_string());
    assert!(
        answer.ends_with("422"),
        "a summary is not a record: {answer}"
    );
    let record = |route: &str, token_file: &str| {
        serde_json::json!({
            "id": "S20261129-000000-1", "batch": null, "route": route, "step": "done",
            "progress": {"created_at": 1, "updated_at": 1, "attempts": 0,
                         "last_error": null, "retry_at": 0},
            "instances": 3, "excluded": 0, "container_bytes": 1, "expires_at": 2_000_000_000u32,
            "document_id": "0123456789abcdef0123", "token_file": token_file,
            "slip_file": null, "spool_removed": false
        })
        .to_string()
    };
    let answer = post(&record("nope", "/tmp/x.token"));
    assert!(
        answer.contains("route \"nope\" is not configured") && answer.ends_with("422"),
        "{answer}"
    );
    let answer = post(&record("ct", "/etc/passwd"));
    assert!(
        answer.contains("not in the token folder") && answer.ends_with("422"),
        "{answer}"
    );
    let answer = post(&"x".repeat(64 * 1024));
    assert!(answer.ends_with("413"), "bounded: {answer}");
    for path in ["/jobs/sent", "/tokens"] {
        let out = run(Command::new(common::require("/usr/bin/curl"))
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--data-binary",
                "x",
            ])
            .arg(format!("http://{}{path}", site.admin)));
        assert_eq!(out.stdout, b"403", "{path} without the admin header");
    }
    let tokens = common::files_in(&site.dir.join("data/tokens/ct"));
    let token_files = tokens
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "token"));
    assert_eq!(
        token_files.count(),
        3,
        "one token file per send: {tokens:?}"
    );
    for file in &tokens {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o640,
            "token files and slips are read by the group: {file:?}"
        );
    }
}
