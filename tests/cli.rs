//! The `cloudpdi` command line as an operator types it: the real binary, the real
//! repository service, real files; plus the harness's own guard (`common::isolated`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Repository, free_port, gen_ct, run, text};

fn cloudpdi_in(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .current_dir(dir)
        .env_remove("CLOUDPDI_CONFIG")
        .args(args))
}

fn cloudpdi(args: &[&str]) -> Output {
    cloudpdi_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

#[test]
fn decrypt_offers_no_compression_flag_and_encrypt_does() {
    let decrypt = text(&cloudpdi(&["decrypt", "--help"]));
    assert!(!decrypt.contains("--zstd"), "{decrypt}");
    let encrypt = text(&cloudpdi(&["encrypt", "--help"]));
    assert!(encrypt.contains("--zstd"), "{encrypt}");
}

/// An error names its subject and says its cause once.
#[test]
fn a_missing_file_set_is_named_once() {
    let out = cloudpdi(&["pdi", "verify", "/nonexistent/set.zip"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/set.zip"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn building_or_importing_nothing_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("letter.txt"), "not DICOM").unwrap();
    for out_name in ["set", "set.zip"] {
        let out_path = dir.path().join(out_name);
        let out = cloudpdi(&[
            "pdi",
            "build",
            empty.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("no DICOM instance"), "{}", text(&out));
        assert!(!out_path.exists(), "a failed build leaves nothing");
    }
    let out = cloudpdi(&[
        "import",
        "--pacs",
        &format!("127.0.0.1:{}", free_port()),
        "--called",
        "PACS",
        empty.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no DICOM file"), "{}", text(&out));
}

/// `--ai-rule` takes the `gggg,eeee` form its own error message asks for.
#[test]
fn an_ai_rule_takes_a_private_tag_with_a_comma() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 2, &[]);
    let build = |name: &str, rule: &str| {
        cloudpdi(&[
            "pdi",
            "build",
            study.to_str().unwrap(),
            "--out",
            dir.path().join(name).to_str().unwrap(),
            "--ai-action",
            "exclude",
            "--ai-rule",
            rule,
        ])
    };
    let out = build("a", "private_tag=0029,1001,private_creator=ACME AI RESULT");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 instances"), "{}", text(&out));
    let out = build("b", "private_tag=0028,1001");
    assert!(!out.status.success());
    assert!(text(&out).contains("odd (private) group"), "{}", text(&out));
}

/// `--config` defaults to `CLOUDPDI_CONFIG`, else `conf/cloudpdi.toml` where it exists;
/// neither variable is taken for a configuration key.
#[test]
fn the_configuration_is_found_by_variable_or_in_conf() {
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &Path, admin: u16| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            format!(
                "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[route.ct]\nae_title = \"CLOUDPDI\"\n"
            ),
        )
        .unwrap();
    };
    let (local_port, env_port) = (free_port(), free_port());
    write(&dir.path().join("conf/cloudpdi.toml"), local_port);
    let other = dir.path().join("elsewhere.toml");
    write(&other, env_port);

    let out = cloudpdi_in(dir.path(), &["status"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("127.0.0.1:{local_port}")),
        "conf/cloudpdi.toml not read: {}",
        text(&out)
    );
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .current_dir(dir.path())
        .env("CLOUDPDI_CONFIG", &other)
        .env("CLOUDPDI_REPO_CONFIG", "/nonexistent/repository.toml")
        .env("CLOUDPDI_REPOSITORY_API_KEY", "not-a-key")
        .arg("status"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("127.0.0.1:{env_port}")),
        "CLOUDPDI_CONFIG not read: {}",
        text(&out)
    );
}

/// The flags' defaults are the configuration's: a token lives 14 days, a document may
/// be downloaded 5 times. A document's state can be shown, and it can be revoked.
#[test]
fn upload_then_show_and_revoke_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let repository = Repository::start(dir.path());

    let out = cloudpdi(&[
        "token",
        "new",
        "--repository",
        &repository.url,
        "--document-id",
        "00000000000000000000",
        "--out",
        &path("made.txt"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let inspect = text(&cloudpdi(&[
        "token",
        "inspect",
        &format!("@{}", path("made.txt")),
    ]));
    assert!(
        inspect.contains("14 days 0 hours left") || inspect.contains("13 days 23 hours left"),
        "{inspect}"
    );

    std::fs::write(path("study.zip"), vec![7u8; 100_000]).unwrap();
    let token = format!("@{}", path("made.txt"));
    let out = cloudpdi(&[
        "encrypt",
        "--token",
        &token,
        &path("study.zip"),
        &path("study.cpdi"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cloudpdi(&[
        "repository",
        "upload",
        "--url",
        &repository.url,
        "--api-key-file",
        &path("key"),
        "--token",
        &token,
        "--token-out",
        &path("issued.txt"),
        &path("study.cpdi"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let issued = cloudpdi::token::cli::read_token(&format!("@{}", path("issued.txt"))).unwrap();

    let document = |command: &str| {
        cloudpdi(&[
            "repository",
            command,
            "--url",
            &repository.url,
            "--api-key-file",
            &path("key"),
            &issued.document_id,
        ])
    };
    let out = document("status");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("state:     complete"), "{}", text(&out));
    assert!(text(&out).contains("downloads: 0 of 5"), "{}", text(&out));

    let out = document("revoke");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("state:     revoked"), "{}", text(&out));
    let out = cloudpdi(&[
        "repository",
        "download",
        "--token",
        &format!("@{}", path("issued.txt")),
        &path("fetched.cpdi"),
    ]);
    assert!(!out.status.success(), "a revoked document still downloads");
    assert!(text(&out).contains("revoked"), "{}", text(&out));
}

/// `common::isolated` fails when its inner run ran no test (a renamed test).
#[test]
#[should_panic(expected = "did not run exactly that test")]
fn isolated_fails_when_the_named_test_does_not_exist() {
    common::isolated("a_test_that_was_renamed_since");
}

#[test]
fn isolated_runs_the_named_test_inside() {
    if !common::isolated("isolated_runs_the_named_test_inside") {
        return;
    }
    assert!(std::env::var_os("INSIDE_TEST_NETNS").is_some());
}

/// A reader that closes the pipe before the output comes (`| grep -q`, `| head`) ends the
/// printing, not the command: no panic, and the work is done.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("facility.key");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .env_remove("CLOUDPDI_CONFIG")
        .args(["facility", "keygen", "--out"])
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{out:?}");
    assert!(key.exists(), "the key was not written");
}
