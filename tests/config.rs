//! Configuration an admin can get right alone: the real `cloudpdi serve` (and `cloudpdi
//! repository serve`) given a wrong file or variable must say which key, with which
//! value, set where (the file or the variable), and what form it takes; the shipped
//! example files must start the daemon; listening and data-folder problems must point
//! the right way.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{CT_ROUTE, Daemon, free_port, require};

/// How long a daemon may take to refuse its configuration or to start.
const START: Duration = Duration::from_secs(20);

/// `cloudpdi <args>` with no `CLOUDPDI_*` variable from the test's own environment, plus
/// `env`.
fn cloudpdi(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloudpdi"));
    command.args(args).arg("--config").arg(config);
    for (name, _) in std::env::vars() {
        if name.starts_with("CLOUDPDI_") {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command`, which must fail within [`START`]; returns what it printed.
fn refused(mut command: Command) -> String {
    let mut child = command.spawn().expect("start cloudpdi");
    let deadline = Instant::now() + START;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "cloudpdi accepted what it should refuse:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "exit status {}", out.status);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A gateway configuration in `dir`: loopback ports, data under `dir/data`, the keys
/// `repository` in `[repository]`, then `extra`.
fn gateway_file(dir: &Path, repository: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create the folder");
    let path = dir.join("cloudpdi.toml");
    let text = format!(
        "[spool]\ndata_dir = \"{}\"\nmin_free_mb = 0\n\
         [admin]\nlisten = \"127.0.0.1:{}\"\n\
         [repository]\nembedded_listen = \"127.0.0.1:{}\"\n{repository}\n{extra}\n",
        dir.join("data").display(),
        free_port(),
        free_port()
    );
    std::fs::write(&path, text).expect("write the configuration");
    path
}

/// `cloudpdi serve` with `extra` in its file and `env`: must fail; what it printed.
fn serve_refuses(extra: &str, env: &[(&str, &str)]) -> (PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let path = gateway_file(&dir, "", extra);
    let stderr = refused(cloudpdi(&["serve"], &path, env));
    (path, stderr)
}

fn assert_says(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} not in:\n{text}");
    }
}

#[test]
fn a_misspelt_key_is_named_with_the_closest_one() {
    let (path, err) = serve_refuses(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_afte = 5\n",
        &[],
    );
    assert_says(
        &err,
        &[
            "route.ct.stable_afte = 5",
            &format!("in {}", path.display()),
            "did you mean stable_after?",
            "batch_by",
        ],
    );
}

#[test]
fn a_value_of_the_wrong_type_says_the_form_expected() {
    let (path, err) = serve_refuses(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = \"5s\"\n",
        &[],
    );
    assert_says(
        &err,
        &[
            "route.ct.stable_after = \"5s\"",
            &format!("in {}", path.display()),
            "whole seconds",
        ],
    );
    assert!(!err.contains("untagged"), "{err}");
}

#[test]
fn a_bad_choice_lists_the_allowed_values() {
    let (path, err) = serve_refuses(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nbatch_by = \"series\"\n",
        &[],
    );
    assert_says(
        &err,
        &[
            "route.ct.batch_by = \"series\"",
            &format!("in {}", path.display()),
            "study, patient",
        ],
    );
}

#[test]
fn a_variable_is_blamed_for_what_it_sets() {
    let (path, err) = serve_refuses(CT_ROUTE, &[("CLOUDPDI_DICOM__LISTN", "0.0.0.0:104")]);
    assert_says(
        &err,
        &[
            "dicom.listn = \"0.0.0.0:104\"",
            "from the environment variable CLOUDPDI_DICOM__LISTN",
            "did you mean listen?",
        ],
    );
    assert!(!err.contains(&path.display().to_string()), "{err}");
    let (_, err) = serve_refuses(CT_ROUTE, &[("CLOUDPDI_ROUTE__CT__STABLE_AFTER", "5s")]);
    assert_says(
        &err,
        &[
            "route.ct.stable_after = \"5s\"",
            "from the environment variable CLOUDPDI_ROUTE__CT__STABLE_AFTER",
            "whole seconds",
        ],
    );
}

#[test]
fn a_variable_cannot_create_a_route() {
    let (path, err) = serve_refuses(CT_ROUTE, &[("CLOUDPDI_ROUTE__MR__STABLE_AFTER", "60")]);
    assert_says(
        &err,
        &[
            "CLOUDPDI_ROUTE__MR__STABLE_AFTER",
            &format!(
                "{} defines no route \"mr\" (it defines: ct)",
                path.display()
            ),
            "[route.mr]",
        ],
    );
}

/// Values that used to fail only when first used (or never) are refused at start, with
/// the key, the value, the file and the form.
#[test]
fn formats_are_checked_at_start() {
    let huge = u64::MAX / (1 << 20);
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("[dicom]\nlisten = \"11112\"\n{CT_ROUTE}"),
            vec![
                "dicom.listen = \"11112\"".into(),
                "write host:port, e.g. 0.0.0.0:11112".into(),
            ],
        ),
        (
            "[inbound]\npacs = \"orthanc\"\n".into(),
            vec!["inbound.pacs = \"orthanc\"".into(), "host:port".into()],
        ),
        (
            "[inbound]\nallowed_repositories = [\"pdi.example.jp\"]\n".into(),
            vec![
                "inbound.allowed_repositories = \"pdi.example.jp\"".into(),
                "with its scheme".into(),
            ],
        ),
        (
            format!("{CT_ROUTE}deliver_command = [\"no-such-printer-command\", \"-d\"]\n"),
            vec![
                "route.ct.deliver_command".into(),
                "not found in PATH".into(),
            ],
        ),
    ];
    for (extra, parts) in cases {
        let (path, err) = serve_refuses(&extra, &[]);
        let mut parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let file = format!("in {}", path.display());
        parts.push(&file);
        assert_says(&err, &parts);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = gateway_file(dir.path(), "url = \"pdi.example.jp\"", "");
    let err = refused(cloudpdi(&["serve"], &path, &[]));
    assert_says(
        &err,
        &[
            "repository.url = \"pdi.example.jp\"",
            &format!("in {}", path.display()),
            "with its scheme",
        ],
    );
    // min_free_mb is in the harness's [spool]: set it from the environment.
    let (_, err) = serve_refuses(
        CT_ROUTE,
        &[("CLOUDPDI_SPOOL__MIN_FREE_MB", &huge.to_string())],
    );
    assert_says(
        &err,
        &[
            &format!("spool.min_free_mb = {huge}"),
            "from the environment variable CLOUDPDI_SPOOL__MIN_FREE_MB",
            "MiB in all",
        ],
    );
}

/// A site with routes sends, and must say where to: no repository, or a shared one
/// without the API key file, is refused at start rather than failing every job.
#[test]
fn a_sending_site_without_a_repository_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = gateway_file(dir.path(), "url = \"\"", CT_ROUTE);
    let err = refused(cloudpdi(&["serve"], &path, &[]));
    assert_says(&err, &["route.ct sends studies", "repository.url is empty"]);
    let path = gateway_file(dir.path(), "url = \"https://pdi.example.jp\"", CT_ROUTE);
    let err = refused(cloudpdi(&["serve"], &path, &[]));
    assert_says(&err, &["repository.api_key_file is empty", "new-key"]);
}

#[test]
fn the_repository_configuration_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("repository.toml");
    std::fs::write(&path, "[server]\nmax_document_mb = \"big\"\n").expect("write");
    let err = refused(cloudpdi(&["repository", "serve"], &path, &[]));
    assert_says(
        &err,
        &[
            "server.max_document_mb = \"big\"",
            &format!("in {}", path.display()),
            "whole MiB",
        ],
    );
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\n").expect("write");
    let err = refused(cloudpdi(
        &["repository", "serve"],
        &path,
        &[(
            "CLOUDPDI_REPO_FACILITY__HOSPA__API_KEY_SHA256",
            &"a".repeat(64),
        )],
    ));
    assert_says(
        &err,
        &[
            "CLOUDPDI_REPO_FACILITY__HOSPA__API_KEY_SHA256",
            "defines no facility \"hospa\"",
        ],
    );
    // A value that parses but cannot be used names its variable too.
    let err = refused(cloudpdi(
        &["repository", "serve"],
        &path,
        &[("CLOUDPDI_REPO_SERVER__PART_SIZE_MB", "0")],
    ));
    assert_says(
        &err,
        &[
            "server.part_size_mb must be between 1 and 256",
            "from the environment variable CLOUDPDI_REPO_SERVER__PART_SIZE_MB",
        ],
    );
}

/// Starts `cloudpdi serve --config <shipped>` with loopback ports and a private data
/// folder from the environment; returns the child and its admin address once it answers.
fn start_shipped(file: &str, data: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let admin = format!("127.0.0.1:{}", free_port());
    let dicom = format!("127.0.0.1:{}", free_port());
    let embedded = format!("127.0.0.1:{}", free_port());
    let data_dir = data.display().to_string();
    let mut all = vec![
        ("CLOUDPDI_DICOM__LISTEN", dicom.as_str()),
        ("CLOUDPDI_ADMIN__LISTEN", admin.as_str()),
        ("CLOUDPDI_REPOSITORY__EMBEDDED_LISTEN", embedded.as_str()),
        ("CLOUDPDI_SPOOL__DATA_DIR", data_dir.as_str()),
    ];
    all.extend_from_slice(env);
    let path = common::root().join("conf").join(file);
    let mut child = cloudpdi(&["serve"], &path, &all)
        .spawn()
        .expect("start cloudpdi serve");
    let deadline = Instant::now() + START;
    while std::net::TcpStream::connect(&admin).is_err() {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            panic!(
                "conf/{file}: cloudpdi serve exited with {status}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "conf/{file}: daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, admin)
}

/// Each shipped file starts the daemon as it is (only ports and the data folder moved):
/// the receiving site without routes or repository, with one INFO line saying outbound
/// is off; none logs an ERROR.
#[test]
fn the_shipped_configurations_start_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("api-key");
    std::fs::write(&key, "cpdi_0000\n").expect("write a key");
    let key = key.display().to_string();
    for (file, env) in [
        ("cloudpdi.toml", vec![]),
        ("receiver.toml", vec![]),
        (
            "sender.toml",
            vec![("CLOUDPDI_REPOSITORY__API_KEY_FILE", key.as_str())],
        ),
    ] {
        let data = dir.path().join(file);
        let (child, admin) = start_shipped(file, &data, &env);
        let status = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
            .args(["status", "--admin", &admin])
            .output()
            .expect("cloudpdi status");
        common::run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let out = child.wait_with_output().expect("output");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "conf/{file}: {}\n{log}", out.status);
        assert!(status.status.success(), "conf/{file}: {status:?}");
        assert!(!log.contains("ERROR"), "conf/{file}:\n{log}");
        assert!(log.contains("cloudpdi serve ready"), "conf/{file}:\n{log}");
        let off = log
            .lines()
            .filter(|l| l.contains("outbound is off"))
            .count();
        let expected_off = usize::from(file == "receiver.toml");
        assert_eq!(off, expected_off, "conf/{file}:\n{log}");
    }
}

#[test]
fn a_second_daemon_on_the_same_data_folder_names_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Daemon::start(dir.path(), CT_ROUTE);
    let data = first.dir.join("data");
    let second = gateway_file(&dir.path().join("second"), "", CT_ROUTE);
    let text = std::fs::read_to_string(&second).expect("read");
    let text = text.replace(
        &dir.path().join("second").join("data").display().to_string(),
        &data.display().to_string(),
    );
    std::fs::write(&second, text).expect("write");
    let err = refused(cloudpdi(&["serve"], &second, &[]));
    assert_says(
        &err,
        &[
            &format!(
                "another cloudpdi daemon is using {} (pid {})",
                data.display(),
                first.pid()
            ),
            "spool.data_dir",
        ],
    );
    assert!(
        !err.contains("WouldBlock") && !err.contains("check the disk"),
        "{err}"
    );
}

#[test]
fn each_listening_problem_has_its_own_hint() {
    // 192.0.2.1 (TEST-NET-1) is never an address of this machine.
    let (_, err) = serve_refuses(
        &format!(
            "[dicom]\nlisten = \"192.0.2.1:{}\"\n{CT_ROUTE}",
            free_port()
        ),
        &[],
    );
    assert_says(
        &err,
        &[
            "dicom.listen",
            "192.0.2.1 is not an address of this machine",
            "0.0.0.0",
        ],
    );
    assert!(!err.contains("another program"), "{err}");

    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let (_, err) = serve_refuses(
        &format!("[dicom]\nlisten = \"127.0.0.1:{port}\"\n{CT_ROUTE}"),
        &[],
    );
    assert_says(&err, &["dicom.listen", "another program"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let repository = dir.path().join("repository.toml");
    std::fs::write(
        &repository,
        format!(
            "[server]\nlisten = \"192.0.2.1:8480\"\n[storage]\npath = \"{}\"\n\
             [audit]\npath = \"{}\"\n",
            dir.path().join("store").display(),
            dir.path().join("audit.jsonl").display()
        ),
    )
    .expect("write");
    let err = refused(cloudpdi(&["repository", "serve"], &repository, &[]));
    assert_says(&err, &["server.listen", "not an address of this machine"]);
}

/// Without CAP_NET_BIND_SERVICE (dropped here with setpriv, as a unit without the
/// capability lines runs it), port 104 is refused with the way to grant it.
#[test]
fn a_privileged_port_without_the_capability_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = gateway_file(
        dir.path(),
        "",
        &format!("[dicom]\nlisten = \"127.0.0.1:104\"\n{CT_ROUTE}"),
    );
    let mut command = Command::new(require("/usr/bin/setpriv"));
    command
        .args([
            "--inh-caps=-net_bind_service",
            "--bounding-set=-net_bind_service",
            env!("CARGO_BIN_EXE_cloudpdi"),
            "serve",
            "--config",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let err = refused(command);
    assert_says(
        &err,
        &["dicom.listen", "CAP_NET_BIND_SERVICE", "systemd unit"],
    );
    assert!(!err.contains("another program"), "{err}");
}

/// What depends on the daemon's machine (its disk, its programs) is checked by `serve`
/// only: a clerk's `cloudpdi status` on another machine reads the same file.
#[test]
fn commands_other_than_serve_do_not_check_the_daemons_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("{CT_ROUTE}deliver_command = [\"no-such-printer-command\"]\n");
    let path = gateway_file(dir.path(), "", &extra);
    let served = refused(cloudpdi(&["serve"], &path, &[]));
    assert_says(&served, &["route.ct.deliver_command"]);
    let status = refused(cloudpdi(&["status"], &path, &[]));
    assert_says(&status, &["no answer from the cloudpdi daemon"]);
    assert!(!status.contains("deliver_command"), "{status}");
}

/// A value under a key that sounds like a secret is never repeated, even misspelt.
#[test]
fn a_misplaced_api_key_is_not_shown() {
    let secret = "cpk_0123456789abcdef0123456789abcdef";
    let (_, err) = serve_refuses(CT_ROUTE, &[("CLOUDPDI_REPOSITORY__API_KEY", secret)]);
    assert_says(&err, &["repository.api_key", "(value not shown)"]);
    assert!(!err.contains(secret), "{err}");
}

/// A value that parses but cannot be used (an AE title too long) is named with where it
/// came from, like a value that does not parse.
#[test]
fn an_unusable_value_names_its_variable() {
    let (_, err) = serve_refuses(
        CT_ROUTE,
        &[("CLOUDPDI_ROUTE__CT__AE_TITLE", "WAY_TOO_LONG_AE_TITLE")],
    );
    assert_says(
        &err,
        &[
            "route.ct.ae_title = \"WAY_TOO_LONG_AE_TITLE\"",
            "from the environment variable CLOUDPDI_ROUTE__CT__AE_TITLE",
            "1-16 printable ASCII characters",
        ],
    );
    let (path, err) = serve_refuses(&format!("{CT_ROUTE}slip = \"docx\"\n"), &[]);
    assert_says(
        &err,
        &[
            "route.ct.slip = \"docx\"",
            &format!("in {}", path.display()),
            "html, svg, png or pdf",
        ],
    );
}

/// The storage commitment keys (issue 14): a wait outside 1 s .. one day, and a report on
/// a new association with nowhere to send it, are refused at start naming the key.
#[test]
fn storage_commitment_keys_are_checked_at_start() {
    for timeout in [0, 86_401] {
        let (path, err) = serve_refuses(
            &format!(
                "[inbound]\npacs = \"127.0.0.1:4242\"\nstorage_commitment = true\n\
                 commitment_timeout = {timeout}\n"
            ),
            &[],
        );
        assert_says(
            &err,
            &[
                &format!("inbound.commitment_timeout = {timeout}"),
                &format!("in {}", path.display()),
                "must be 1 to 86400 seconds",
            ],
        );
    }
    let (path, err) = serve_refuses(
        &format!("{CT_ROUTE}[dicom.commitment.MODALITY]\nreport = \"new-association\"\n"),
        &[],
    );
    assert_says(
        &err,
        &[
            "dicom.commitment.MODALITY.address = \"\"",
            &format!("in {}", path.display()),
            "report = \"new-association\" needs the requester's address, host:port",
        ],
    );
}
