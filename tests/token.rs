//! `cloudpdi token new|inspect` and `cloudpdi encrypt|decrypt` as an operator uses them.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn cloudpdi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn new_token(dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name);
    let out = cloudpdi(&[
        "token",
        "new",
        "--repository",
        "https://repo.example.jp/v1",
        "--document-id",
        "D7K2M9Q4X1Z8",
        "--facility",
        "KYOTO-UH",
        "--summary",
        "CT chest",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    format!("@{}", path.display())
}

#[test]
fn a_new_token_is_private_inspectable_and_keeps_its_secret_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let file = dir.path().join("t.txt");
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    let token_text = std::fs::read_to_string(&file).unwrap();
    assert!(token_text.starts_with("HT1-"));

    let shown = cloudpdi(&["token", "inspect", &token]);
    let shown_text = text(&shown);
    assert!(shown.status.success(), "{shown_text}");
    assert!(shown_text.contains("D7K2M9Q4X1Z8") && shown_text.contains("valid until"));
    assert!(shown_text.contains("29 days") || shown_text.contains("30 days"), "{shown_text}");
    assert!(!shown_text.contains("secret:"), "{shown_text}");
    let secret = cloudpdi(&["token", "inspect", &token, "--show-secret"]);
    assert!(text(&secret).contains("secret:"));

    // A typo in the fourth group is named, and the token text never echoed.
    let mut chars: Vec<char> = token_text.trim().chars().collect();
    let at = "HT1-".len() + 3 * 6 + 1;
    chars[at] = if chars[at] == 'Z' { 'Y' } else { 'Z' };
    let typo: String = chars.into_iter().collect();
    let bad = cloudpdi(&["token", "inspect", &typo]);
    let bad_text = text(&bad);
    assert!(!bad.status.success());
    assert!(bad_text.contains("group 4 looks mistyped"), "{bad_text}");
    assert!(!bad_text.contains(&typo[4..20]), "error echoes the token: {bad_text}");
}

#[test]
fn encrypt_and_decrypt_with_the_token_and_refuse_the_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let other = new_token(dir.path(), "other.txt");
    let plain = dir.path().join("study.zip");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&plain, &data).unwrap();
    let sealed = dir.path().join("study.cpdi");
    for zstd in [false, true] {
        let _ = std::fs::remove_file(&sealed);
        let mut args = vec!["encrypt", "--token", &token];
        if zstd {
            args.push("--zstd");
        }
        let (p, s) = (plain.to_str().unwrap(), sealed.to_str().unwrap());
        args.extend([p, s]);
        let out = cloudpdi(&args);
        assert!(out.status.success(), "{}", text(&out));
        let opened = dir.path().join(format!("opened-{zstd}.zip"));
        let out = cloudpdi(&["decrypt", "--token", &token, s, opened.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(std::fs::read(&opened).unwrap(), data);
    }
    let refused = dir.path().join("refused.zip");
    let out = cloudpdi(&[
        "decrypt",
        "--token",
        &other,
        sealed.to_str().unwrap(),
        refused.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("damaged or the token is wrong (chunk 0"),
        "{}",
        text(&out)
    );
    assert!(!refused.exists());
}
