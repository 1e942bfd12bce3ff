//! The slips the daemon (and `cloudpdi send`) issue, read as a clerk and a patient read
//! them: the patient's name (Japanese, decoded from ISO 2022 IR 87), study date, modality,
//! description and the facility's contact in the PDF's text (`pdftotext`) and the HTML;
//! the name left out where the route says so; the QR code (decoded by `zbarimg` from the
//! PDF rasterized by `pdftoppm`) holding the token and nothing else, a short one (the
//! embedded repository is a community in `[repositories]`); the expiry in
//! `facility.time_zone` with the hour while the daemon runs with `TZ=UTC`; token and slip
//! files named by study date, Patient ID, Accession Number and job. And `cloudpdi token
//! inspect`: local time, non-zero exit for an expired token.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudpdi::token::Token;
use common::*;

/// The daemon's facility and routes: `ct` prints PDF slips, `web` HTML slips, `noname`
/// HTML slips without the patient's name; times in Tokyo.
const SITE: &str = "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\nslip = \"pdf\"\n\
     [route.web]\nae_title = \"WEB\"\nstable_after = 1\nslip = \"html\"\n\
     [route.noname]\nae_title = \"NONAME\"\nstable_after = 1\nslip = \"html\"\n\
     slip_patient_name = false\n\
     [outbound]\nenabled = true\n\
     [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\n\
     contact = \"075-000-0000 (放射線科受付)\"\ntime_zone = \"Asia/Tokyo\"\n\
     [repositories]\nLOCAL = \"embedded\"\n";

const NAME: &str = "山田 太郎 (やまだ たろう)";
const CONTACT: &str = "075-000-0000 (放射線科受付)";

fn tool(program: &str, args: &[&str]) -> String {
    let out = run(Command::new(require(program)).args(args));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cloudpdi(args: &[&str], tz: &str) -> (bool, String, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .env("TZ", tz));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends a generated 3-slice CT study (Japanese name, `patient_id`) to `ae_title`.
fn send_study(daemon: &Daemon, dir: &Path, ae_title: &str, patient_id: &str) {
    let study = dir.join(patient_id);
    gen_ct(
        &study,
        3,
        &[
            "--charset",
            "iso2022",
            "--patient-id",
            patient_id,
            "--matrix",
            "64",
        ],
    );
    let out = run(Command::new(require("/usr/bin/storescu"))
        .args(["-aet", "MODALITY", "-aec", ae_title, "127.0.0.1"])
        .arg(daemon.dicom.port().to_string())
        .args(files_in(&study)));
    assert!(out.status.success(), "{out:?}");
}

/// Waits for the one token file of `route` and returns it.
fn token_of(daemon: &Daemon, route: &str) -> PathBuf {
    wait_for(
        &format!("the token of route {route}"),
        Duration::from_secs(60),
        || match tokens_of(daemon, route).as_slice() {
            [token] => Some(token.clone()),
            _ => None,
        },
    )
}

/// The slip beside a token file, waiting until the job is past its issue step.
fn slip_of(token: &Path, extension: &str) -> PathBuf {
    let slip = token.with_extension(extension);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !slip.exists() {
        assert!(Instant::now() < deadline, "no slip {}", slip.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    slip
}

/// The expiry as a Tokyo clerk reads it, computed without the time zone database:
/// Japan has kept UTC+9 all year since 1951.
fn tokyo_expiry(token: &Token) -> (String, String) {
    let t = cloudpdi::clock::civil(u64::from(token.expires_at) + 9 * 3600);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[usize::try_from(t.month() - 1).unwrap()];
    (
        format!(
            "{}年{}月{}日 {:02}:{:02}まで",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute()
        ),
        format!(
            "until {} {month} {} {:02}:{:02} (JST)",
            t.day(),
            t.year(),
            t.hour(),
            t.minute()
        ),
    )
}

fn read_token(path: &Path) -> (String, Token) {
    let text = std::fs::read_to_string(path).unwrap().trim().to_owned();
    let token = Token::from_text(&text).unwrap();
    (text, token)
}

/// The stem a clerk finds a study's files by: `<date>_<Patient ID>_<Accession>_B<n>`.
fn assert_named(token: &Path, patient_id: &str) {
    let stem = token.file_stem().unwrap().to_str().unwrap();
    let accession = format!("ACC{}", &patient_id[patient_id.len() - 6..]);
    let prefix = format!("20261124_{patient_id}_{accession}_");
    let job = stem
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{stem} does not start with {prefix}"));
    assert!(
        job.len() == 7 && job.starts_with('B') && job[1..].bytes().all(|b| b.is_ascii_digit()),
        "{stem} does not end with the batch's job ID"
    );
}

#[test]
fn daemon_slips_name_the_patient_study_contact_and_local_expiry() {
    let dir = tempfile::tempdir().unwrap();
    // The daemon's own zone is UTC: the slip must still print Tokyo time.
    let daemon =
        Daemon::start_wrapped(&dir.path().join("a"), SITE, &["sh", "-c", "export TZ=UTC;"]);
    send_study(&daemon, dir.path(), "CLOUDPDI", "PSLIP00001");
    send_study(&daemon, dir.path(), "WEB", "PSLIP00002");
    send_study(&daemon, dir.path(), "NONAME", "PSLIP00003");

    // The PDF slip, as pdftotext reads it.
    let token = token_of(&daemon, "ct");
    assert_named(&token, "PSLIP00001");
    let (token_text, parsed) = read_token(&token);
    let (ja, en) = tokyo_expiry(&parsed);
    let pdf = slip_of(&token, "pdf");
    let text = tool("/usr/bin/pdftotext", &[pdf.to_str().unwrap(), "-"]);
    for needle in [
        NAME,
        "2026-11-24",
        "CT",
        "CT CHEST",
        CONTACT,
        "Hospital A",
        &ja,
        &en,
    ] {
        assert!(text.contains(needle), "PDF slip lacks {needle:?}:\n{text}");
    }
    assert!(!text.contains("(UTC)"), "expiry in UTC:\n{text}");

    // Its QR code holds exactly the token, whose fields hold no patient data.
    let page = dir.path().join("page");
    tool(
        "/usr/bin/pdftoppm",
        &[
            "-r",
            "200",
            "-png",
            "-singlefile",
            pdf.to_str().unwrap(),
            page.to_str().unwrap(),
        ],
    );
    let decoded = tool(
        "/usr/bin/zbarimg",
        &["--raw", "-q", dir.path().join("page.png").to_str().unwrap()],
    );
    assert_eq!(
        decoded.trim_end(),
        format!("HT2-{}", token_text["HT2-".len()..].replace('-', "")),
        "the QR holds the token only, without the hyphens between groups"
    );
    assert_eq!(Token::from_text(decoded.trim_end()).unwrap(), parsed);
    // The daemon's embedded repository is community LOCAL: a short token.
    assert_eq!(
        parsed.repository,
        cloudpdi::token::RepositoryRef::Community("LOCAL".into())
    );
    assert!(
        token_text.split('-').count() - 1 <= 16,
        "more than 16 groups: {} characters",
        token_text.len()
    );
    // The token has no free text: nothing but a reference, an ID, a date and a secret.
    assert!(
        parsed.document_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "patient data in the token: {}",
        parsed.document_id
    );

    // The HTML slip holds the same; with slip_patient_name = false, no name.
    let web = slip_of(&token_of(&daemon, "web"), "html");
    assert_named(&web, "PSLIP00002");
    let html = std::fs::read_to_string(&web).unwrap();
    for needle in [NAME, "2026-11-24", "CT CHEST", CONTACT, "(JST)"] {
        assert!(html.contains(needle), "HTML slip lacks {needle:?}:\n{html}");
    }
    let noname = std::fs::read_to_string(slip_of(&token_of(&daemon, "noname"), "html")).unwrap();
    assert!(noname.contains("CT CHEST") && noname.contains(CONTACT));
    for name in ["山田", "やまだ", "Yamada"] {
        assert!(!noname.contains(name), "{name} printed:\n{noname}");
    }

    // Patient data stays out of the log.
    let log = daemon.log();
    for name in ["山田", "やまだ", "Yamada", "CT CHEST"] {
        assert!(!log.contains(name), "{name} logged:\n{log}");
    }
}

#[test]
fn send_names_its_files_and_fills_its_slip_like_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("a"), SITE);
    let study = dir.path().join("study");
    gen_ct(&study, 2, &["--patient-id", "PSEND00001", "--matrix", "64"]);
    let (ok, out, err) = cloudpdi(
        &[
            "send",
            "--config",
            daemon.config.to_str().unwrap(),
            "--route",
            "web",
            study.to_str().unwrap(),
        ],
        "UTC",
    );
    assert!(ok, "{out}{err}");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap_or_else(|| panic!("no token path in {out}"));
    let stem = Path::new(token).file_stem().unwrap().to_str().unwrap();
    assert!(
        stem.starts_with("20261124_PSEND00001_ACCD00001_S"),
        "{stem}"
    );
    let html = std::fs::read_to_string(Path::new(token).with_extension("html")).unwrap();
    assert!(html.contains(NAME) && html.contains("CT CHEST"), "{html}");
}

#[test]
fn inspect_shows_local_time_and_fails_for_an_expired_token() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, expires_at: u32| {
        let token = Token::with_secret(
            cloudpdi::token::RepositoryRef::Url("https://repo.example.jp/v1".into()),
            "0123456789abcdef0123",
            expires_at,
            [7; 16],
        )
        .unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, token.to_line()).unwrap();
        format!("@{}", path.display())
    };
    // Three days, two hours and ten minutes ahead: still "2 hours" when inspect runs.
    let now = cloudpdi::clock::now_seconds();
    let expiry = now + 3 * 86_400 + 7_800;
    let valid = write("valid.token", u32::try_from(expiry).unwrap());
    let (ok, out, err) = cloudpdi(&["token", "inspect", &valid], "Asia/Tokyo");
    assert!(ok, "{out}{err}");
    let t = cloudpdi::clock::civil(expiry + 9 * 3600);
    let local = format!("{:02}:{:02} (JST)", t.hour(), t.minute());
    assert!(out.contains(&local), "{local} not in:\n{out}");
    assert!(out.contains("3 days 2 hours left"), "{out}");

    let expired = write("expired.token", u32::try_from(now - 60).unwrap());
    let (ok, out, err) = cloudpdi(&["token", "inspect", &expired], "Asia/Tokyo");
    assert!(!ok, "an expired token passed inspect:\n{out}");
    assert!(out.contains("EXPIRED since"), "{out}");
    assert!(!out.contains("left"), "{out}");
    assert!(
        // The token names no issuer any more: the patient asks whoever gave the slip.
        err.contains("this token expired on") && err.contains("ask the issuing facility"),
        "{err}"
    );
}

#[test]
fn an_unknown_time_zone_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloudpdi.toml");
    let extra = format!("{CT_ROUTE}[facility]\ntime_zone = \"Asia/Tokio\"\n");
    let text = config_text(free_port(), free_port(), &dir.path().join("data"), &extra);
    std::fs::write(&config, text).unwrap();
    let (ok, out, err) = cloudpdi(&["serve", "--config", config.to_str().unwrap()], "UTC");
    assert!(!ok, "the daemon started with an unknown zone:\n{out}{err}");
    assert!(
        err.contains("facility.time_zone")
            && err.contains("Asia/Tokio")
            && err.contains("Asia/Tokyo"),
        "{err}"
    );
}
