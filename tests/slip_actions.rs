//! Revoking and extending an issued token from the sending side, as an admin does it:
//! the real `cloudpdi serve`, a real `cloudpdi repository serve`, tokens issued by
//! `cloudpdi send`, and the `cloudpdi revoke` / `cloudpdi extend` commands.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cloudpdi::gateway::jobs::Progress;
use cloudpdi::gateway::outbound::{OutStep, OutboundJob, PrintedStudy};
use cloudpdi::repository::api::{NewDocument, State};
use cloudpdi::repository::client::{Client, ClientError, ClientOptions};
use cloudpdi::token::Token;
use common::{Daemon, Repository, end_of_day, free_port, gen_ct, run, wait_for};

const ZONE: &str = "Asia/Tokyo";

fn cloudpdi(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .env_remove("CLOUDPDI_CONFIG")
        .args(args))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn block<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

fn read_token(path: &Path) -> Token {
    Token::from_text(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

/// A site with route `ct` (AE SENDS) on a real repository, its slips without the
/// patient's name, and route `dead` (AE CLOUDPDI) on a repository that is not there, slips
/// in HTML, times in Tokyo.
struct Site {
    _dir: tempfile::TempDir,
    repository: Repository,
    daemon: Daemon,
    study: PathBuf,
    config: String,
}

impl Site {
    fn start() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let study = dir.path().join("study");
        std::fs::create_dir_all(&study).unwrap();
        gen_ct(&study, 2, &[]);
        let repository = Repository::start(&dir.path().join("repository"));
        let routes = format!(
            "[route.ct]\nae_title = \"SENDS\"\nrepository_url = \"{url}\"\n\
             repository_api_key_file = \"{key}\"\nslip_patient_name = false\n\
             [route.dead]\nae_title = \"CLOUDPDI\"\nstable_after = 1\n\
             repository_url = \"http://127.0.0.1:{dead}\"\n\
             repository_api_key_file = \"{key}\"\n\
             [outbound]\nenabled = true\n\
             [facility]\ncode = \"HOSPA\"\nname = \"Hospital A\"\ntime_zone = \"{ZONE}\"\n",
            url = repository.url,
            key = repository.key_file.display(),
            dead = free_port()
        );
        let daemon = Daemon::start(&dir.path().join("site"), &routes);
        let config = daemon.config.to_str().unwrap().to_owned();
        Site {
            _dir: dir,
            repository,
            daemon,
            study,
            config,
        }
    }

    /// `cloudpdi send` of the study on route `ct`: (job ID, token file, slip).
    fn send(&self) -> (String, PathBuf, PathBuf) {
        common::send_study(Path::new(&self.config), "ct", &self.study)
    }

    /// A command against this site: (whether it exited 0, what it said); any other exit
    /// code than 0 or 1 fails the test.
    fn command(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec![args[0], "--config", &self.config];
        all.extend(&args[1..]);
        let out = cloudpdi(&all);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0 | 1)),
            "{args:?} exited {code:?}: {}",
            text(&out)
        );
        (code == Some(0), text(&out))
    }

    /// Hands `job` to the daemon as `cloudpdi send` does (`POST /jobs/sent`).
    fn record(&self, job: &OutboundJob) {
        let work = tempfile::tempdir().unwrap();
        let record = work.path().join("record.json");
        std::fs::write(&record, serde_json::to_vec(job).unwrap()).unwrap();
        let out = run(Command::new(common::require("/usr/bin/curl"))
            .args(["-s", "-w", "\n%{http_code}", "-X", "POST"])
            .args([
                "-H",
                "x-cloudpdi-admin: 1",
                "-H",
                "content-type: application/json",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", record.display()))
            .arg(format!("http://{}/jobs/sent", self.daemon.admin)));
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(answer.trim_end().ends_with("201"), "{answer}");
    }

    fn client(&self) -> Client {
        let key = std::fs::read_to_string(&self.repository.key_file).unwrap();
        Client::new(
            &self.repository.url,
            Some(key.trim().to_owned()),
            ClientOptions::default(),
        )
        .unwrap()
    }

    /// The details `cloudpdi status --json` gives of outbound job `id`.
    fn details(&self, id: &str) -> serde_json::Value {
        let status = self.daemon.status();
        status["outbound"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("job {id} not in {status}"))
    }

    /// Downloads and opens the document with the token in `token_file`, as a receiver.
    fn receive(&self, token_file: &Path, out: &Path) -> (bool, String) {
        let token = format!("@{}", token_file.display());
        let out = cloudpdi(
            &["receive", "--config", &self.config, "--out"]
                .into_iter()
                .chain([out.to_str().unwrap(), token.as_str()])
                .collect::<Vec<_>>(),
        );
        (out.status.success(), text(&out))
    }
}

/// A revoked token downloads nothing; status shows it revoked; it cannot be extended;
/// revoking again changes nothing.
#[test]
fn a_revoked_token_is_refused() {
    let site = Site::start();
    let (job, token_file, _) = site.send();
    let token = read_token(&token_file);
    let (ok, said) = site.command(&["revoke", &job]);
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("job {job}: the token is revoked")),
        "{said}"
    );

    let work = tempfile::tempdir().unwrap();
    let refused = block(site.client().download_to(
        &token.document_id,
        &token.download_proof(),
        &work.path().join("partial"),
        |_| {},
    ))
    .unwrap_err();
    assert!(matches!(refused, ClientError::NotAvailable), "{refused}");
    let (ok, said_receive) = site.receive(&token_file, &work.path().join("pdi"));
    assert!(!ok, "{said_receive}");
    let document = block(site.client().status(&token.document_id)).unwrap();
    assert_eq!(document.state, State::Revoked);

    assert!(site.details(&job)["revoked_at"].as_u64().is_some());
    let (ok, table) = site.command(&["status"]);
    assert!(ok, "{table}");
    assert!(
        table.contains("revoked ") && table.contains("the repository refuses every download"),
        "{table}"
    );
    let (ok, said_extend) = site.command(&["extend", &job, "--days", "5"]);
    assert!(!ok, "{said_extend}");
    assert!(said_extend.contains("was revoked"), "{said_extend}");
    let (ok, again) = site.command(&["revoke", &job]);
    assert!(ok, "revoking again changes nothing: {again}");
    let (ok, retried) = site.command(&["retry", &job]);
    assert!(!ok, "{retried}");
    assert!(
        retried.contains(&format!("the token of outbound job {job} was revoked")),
        "{retried}"
    );

    // The admin endpoint: the header required, the extend body bounded.
    let admin = |extra: &[&str], body: &str| {
        let out = run(Command::new(common::require("/usr/bin/curl"))
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args(extra)
            .args(["--data-binary", body])
            .arg(format!("http://{}/jobs/{job}/extend", site.daemon.admin)));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let header = [
        "-H",
        "x-cloudpdi-admin: 1",
        "-H",
        "content-type: application/json",
    ];
    assert_eq!(admin(&[], "{\"expires_at\": 1}"), "403");
    let padded = format!("{{\"expires_at\": 1{}}}", " ".repeat(300));
    assert_eq!(admin(&header, &padded), "413");
    assert_eq!(admin(&header, "{\"expires_at\": \"soon\"}"), "400");

    let text_of_token = token.to_text();
    for shown in [&said, &table, &said_extend, &again, &site.daemon.log()] {
        assert!(!shown.contains(text_of_token.as_str()), "token text shown");
    }
}

/// Extending re-issues the token file and the slip with the same secret and document and
/// the new expiry; the repository keeps the document until then; a shorter expiry, one
/// beyond the repository's limit, an unknown job and one without a token yet are
/// refused with exit code 1; a repeat after the repository was extended but the files
/// were not (a crash in between) finishes the job, and so does a later `--days` after a
/// run that wrote the token file but not the record; a token file that is not the job's
/// is refused before the repository is asked; a repository already later than asked
/// gives its expiry to token and slip.
#[test]
fn an_extended_token_is_reissued() {
    let site = Site::start();
    let (job, token_file, slip_file) = site.send();
    let before = read_token(&token_file);
    let zone = cloudpdi::clock::time_zone(ZONE).unwrap();
    let old_date = cloudpdi::clock::until_ja(u64::from(before.expires_at), &zone);
    let slip_before = std::fs::read_to_string(&slip_file).unwrap();
    assert!(slip_before.contains(&old_date), "{slip_before}");
    let inode = std::fs::metadata(&token_file).unwrap().ino();

    let (ok, said) = site.command(&["extend", &job, "--days", "30"]);
    assert!(ok, "{said}");
    let after = read_token(&token_file);
    let now = cloudpdi::clock::now_seconds();
    let asked = u64::from(after.expires_at);
    assert!(asked.abs_diff(now + 30 * 86_400) < 120, "{asked} vs {now}");
    assert!(after.expires_at > before.expires_at);
    assert_eq!(after.document_id, before.document_id);
    assert_eq!(after.repository, before.repository);
    assert_eq!(
        after.download_proof().bytes(),
        before.download_proof().bytes(),
        "the same secret"
    );
    let new_date = cloudpdi::clock::until_ja(asked, &zone);
    assert!(
        said.contains(&cloudpdi::clock::local_text(asked, &zone))
            && said.contains(slip_file.to_str().unwrap()),
        "{said}"
    );
    // Replaced by a new file renamed over the old one, with the same mode; no temp left.
    let meta = std::fs::metadata(&token_file).unwrap();
    assert_ne!(
        meta.ino(),
        inode,
        "the token file is replaced, not rewritten in place"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(
        std::fs::metadata(&slip_file).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let folder: Vec<_> = std::fs::read_dir(token_file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(folder.len(), 2, "token and slip only: {folder:?}");
    let slip = std::fs::read_to_string(&slip_file).unwrap();
    assert!(slip.contains(&new_date), "the new expiry printed: {slip}");
    assert!(!slip.contains(&old_date), "the old expiry gone: {slip}");
    assert!(slip.contains("Hospital A"), "{slip}");

    let document = block(site.client().status(&after.document_id)).unwrap();
    assert_eq!(document.expires_at, asked);
    assert_eq!(site.details(&job)["expires_at"].as_u64(), Some(asked));
    let work = tempfile::tempdir().unwrap();
    let (ok, received) = site.receive(&token_file, &work.path().join("pdi"));
    assert!(ok, "the new token downloads and opens: {received}");
    assert!(work.path().join("pdi/DICOMDIR").exists(), "{received}");

    // Not later, beyond the repository's limit (180 days): refused, nothing changed.
    let (ok, shorter) = site.command(&["extend", &job, "--days", "2"]);
    assert!(!ok, "{shorter}");
    assert!(shorter.contains("can only be extended"), "{shorter}");
    let (ok, beyond) = site.command(&["extend", &job, "--days", "400"]);
    assert!(!ok, "{beyond}");
    assert!(
        beyond.contains("180 days") && beyond.contains("server.max_expiry_days"),
        "{beyond}"
    );
    assert_eq!(read_token(&token_file).expires_at, after.expires_at);

    // The repository extended, the files not yet (a crash in between): the same command
    // again writes the files.
    let until = cloudpdi::clock::date(now + 60 * 86_400);
    let end_of_day = end_of_day(&zone, &until);
    let end_of_day = u64::try_from(end_of_day).unwrap();
    block(site.client().extend(&after.document_id, end_of_day)).unwrap();
    let (ok, finished) = site.command(&["extend", &job, "--until", &until]);
    assert!(ok, "{finished}");
    assert_eq!(u64::from(read_token(&token_file).expires_at), end_of_day);
    let slip = std::fs::read_to_string(&slip_file).unwrap();
    assert!(slip.contains(&cloudpdi::clock::until_ja(end_of_day, &zone)));
    let (ok, repeated) = site.command(&["extend", &job, "--until", &until]);
    assert!(ok, "the same call again changes nothing: {repeated}");

    // A run with --days that extended the repository and wrote the token file, then
    // stopped before the slip and the record: a later --days (another second, another
    // expiry) accepts the file and finishes the job.
    let document_at = |site: &Site| block(site.client().status(&after.document_id)).unwrap();
    let halfway = end_of_day + 3600;
    block(site.client().extend(&after.document_id, halfway)).unwrap();
    let mut written = read_token(&token_file);
    written.expires_at = u32::try_from(halfway).unwrap();
    std::fs::write(&token_file, written.to_line().as_bytes()).unwrap();
    let (ok, resumed) = site.command(&["extend", &job, "--days", "62"]);
    assert!(
        ok,
        "a token file between the job's and the repository's expiry: {resumed}"
    );
    let resumed_at = document_at(&site).expires_at;
    assert!(resumed_at > halfway);
    assert_eq!(u64::from(read_token(&token_file).expires_at), resumed_at);
    assert_eq!(site.details(&job)["expires_at"].as_u64(), Some(resumed_at));
    assert!(
        std::fs::read_to_string(&slip_file)
            .unwrap()
            .contains(&cloudpdi::clock::until_ja(resumed_at, &zone))
    );

    // A token file that is not this job's is refused before the repository is asked.
    let good = std::fs::read(&token_file).unwrap();
    let mut other = read_token(&token_file);
    other.document_id = other.document_id.chars().rev().collect();
    std::fs::write(&token_file, other.to_line().as_bytes()).unwrap();
    let (ok, foreign) = site.command(&["extend", &job, "--days", "64"]);
    assert!(!ok, "{foreign}");
    assert!(foreign.contains("holds another token"), "{foreign}");
    assert_eq!(
        document_at(&site).expires_at,
        resumed_at,
        "the repository was extended for a token file that is not the job's"
    );
    std::fs::write(&token_file, &good).unwrap();

    // The repository already later than asked (an earlier run asked more): token and
    // slip get the repository's expiry, not the earlier one asked.
    let furthest = now + 70 * 86_400;
    block(site.client().extend(&after.document_id, furthest)).unwrap();
    let (ok, shorter_than_held) = site.command(&["extend", &job, "--days", "66"]);
    assert!(ok, "{shorter_than_held}");
    assert_eq!(u64::from(read_token(&token_file).expires_at), furthest);
    assert_eq!(site.details(&job)["expires_at"].as_u64(), Some(furthest));
    assert!(
        shorter_than_held.contains(&cloudpdi::clock::local_text(furthest, &zone)),
        "{shorter_than_held}"
    );

    let text_of_token = after.to_text();
    for shown in [
        &said,
        &finished,
        &repeated,
        &shorter,
        &beyond,
        &resumed,
        &foreign,
        &shorter_than_held,
        &site.daemon.log(),
    ] {
        assert!(!shown.contains(text_of_token.as_str()), "token text shown");
    }

    // An unknown job, and a job without a token yet (its repository is not there).
    for action in [
        &["revoke", "S20000101-000000-1"][..],
        &["extend", "S20000101-000000-1", "--days", "3"],
    ] {
        let (ok, said) = site.command(action);
        assert!(!ok, "{said}");
        assert!(
            said.contains("no outbound job S20000101-000000-1"),
            "{said}"
        );
    }
    let out = common::storescu(
        &site.daemon,
        "MODALITY",
        &[],
        &common::files_in(&site.study),
    );
    assert!(out.status.success(), "{out:?}");
    let waiting = wait_for("a job on the dead route", Duration::from_secs(30), || {
        site.daemon.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"].as_str().is_some_and(|id| id.starts_with('B')))
            .map(|j| j["id"].as_str().unwrap().to_owned())
    });
    for action in [
        &["revoke", waiting.as_str()][..],
        &["extend", waiting.as_str(), "--days", "3"],
    ] {
        let (ok, said) = site.command(action);
        assert!(!ok, "{said}");
        assert!(
            said.contains(&format!("job {waiting} has no token yet")),
            "{said}"
        );
    }
    let (ok, said) = site.command(&["extend", &job, "--until", "31.12.2026"]);
    assert!(!ok, "{said}");
    assert!(said.contains("YYYY-MM-DD"), "{said}");
}

/// A revoke while the repository does not answer (stopped): the command says so within
/// its own timeout, not that the daemon is down, and that the action may still finish;
/// it does once the repository answers again.
#[test]
fn a_revoke_the_repository_does_not_answer_says_so() {
    let site = Site::start();
    let (job, token_file, _) = site.send();
    let token = read_token(&token_file);
    let pid = site.repository.pid().to_string();
    let signal = |name: &str| {
        let out = run(Command::new("kill").args([name, pid.as_str()]));
        assert!(out.status.success(), "kill {name}: {}", text(&out));
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let (ok, said) = site.command(&["revoke", &job]);
    let waited = started.elapsed();
    signal("-CONT");
    assert!(!ok, "{said}");
    assert!(
        said.contains("the repository did not answer")
            && said.contains("may still finish")
            && said.contains("cloudpdi status"),
        "{said}"
    );
    assert!(!said.contains("is `cloudpdi serve` running"), "{said}");
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    wait_for("the revoke to finish", Duration::from_secs(60), || {
        site.details(&job)["revoked_at"].as_u64()
    });
    let document = block(site.client().status(&token.document_id)).unwrap();
    assert_eq!(document.state, State::Revoked);
}

/// An extended token downloads after the expiry it had before. A job whose token lapses
/// in seconds (the sent study's container in a new document, its record handed to the
/// daemon as `cloudpdi send` does) is extended; after its old expiry the re-issued token
/// file still downloads and opens, while the old token is refused as expired.
#[test]
fn an_extended_token_downloads_after_its_old_expiry() {
    let site = Site::start();
    let (_, token_file, slip_file) = site.send();
    let sent = read_token(&token_file);
    let work = tempfile::tempdir().unwrap();
    let container = work.path().join("container");
    let client = site.client();
    block(client.download_to(
        &sent.document_id,
        &sent.download_proof(),
        &container,
        |_| {},
    ))
    .unwrap();
    let size = std::fs::metadata(&container).unwrap().len();
    let lapses = u32::try_from(cloudpdi::clock::now_seconds() + 12).unwrap();
    let document_id = block(async {
        let created = client
            .create(&NewDocument {
                size: Some(size),
                expires_at: u64::from(lapses),
                max_downloads: 5,
                proof_hash: sent.download_proof().hash(),
            })
            .await?;
        client
            .upload_file(&created.document_id, &container, |_| {})
            .await?;
        Ok::<_, ClientError>(created.document_id)
    })
    .unwrap();
    // The same secret, in the new document, lapsing in seconds.
    let mut old = read_token(&token_file);
    old.document_id.clone_from(&document_id);
    old.expires_at = lapses;
    let folder = token_file.parent().unwrap();
    let lapsing_token = folder.join("lapsing.token");
    let lapsing_slip = folder.join(format!(
        "lapsing.{}",
        slip_file.extension().unwrap().to_str().unwrap()
    ));
    std::fs::write(&lapsing_token, old.to_line().as_bytes()).unwrap();
    std::fs::copy(&slip_file, &lapsing_slip).unwrap();
    let old_token_file = work.path().join("old.token");
    std::fs::write(&old_token_file, old.to_line().as_bytes()).unwrap();

    let id = "S20261130-000000-1";
    let job = OutboundJob {
        id: id.into(),
        batch: None,
        route: "ct".into(),
        step: OutStep::Done,
        progress: Progress::new(),
        instances: 2,
        excluded: 0,
        container_bytes: size,
        expires_at: lapses,
        document_id: Some(document_id),
        token_file: Some(lapsing_token.clone()),
        slip_file: Some(lapsing_slip),
        spool_removed: false,
        failed_at: None,
        repository: Some(site.repository.url.trim_end_matches('/').to_owned()),
        study: None,
        deliveries: Vec::new(),
        revoked_at: None,
        printed: None,
    };
    site.record(&job);

    let (ok, said) = site.command(&["extend", id, "--days", "1"]);
    assert!(ok, "{said}");
    let extended = read_token(&lapsing_token);
    assert!(extended.expires_at > lapses + 86_000, "{said}");
    while cloudpdi::clock::now_seconds() <= u64::from(lapses) + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, received) = site.receive(&lapsing_token, &work.path().join("pdi"));
    assert!(
        ok,
        "the re-issued token downloads after the old expiry: {received}"
    );
    assert!(work.path().join("pdi/DICOMDIR").exists(), "{received}");
    let (ok, refused) = site.receive(&old_token_file, &work.path().join("old-pdi"));
    assert!(!ok, "the old token lapsed: {refused}");
    assert!(refused.contains("expired"), "{refused}");
}

/// The record of a job done, sent on route `ct`, for document `document_id` of
/// `repository`, with its token and slip files (in the route's token folder).
fn done_job(
    id: &str,
    document_id: &str,
    repository: &str,
    expires_at: u32,
    (token_file, slip_file): (PathBuf, PathBuf),
) -> OutboundJob {
    OutboundJob {
        id: id.into(),
        batch: None,
        route: "ct".into(),
        step: OutStep::Done,
        progress: Progress::new(),
        instances: 2,
        excluded: 0,
        container_bytes: 0,
        expires_at,
        document_id: Some(document_id.into()),
        token_file: Some(token_file),
        slip_file: Some(slip_file),
        spool_removed: false,
        failed_at: None,
        repository: Some(repository.trim_end_matches('/').to_owned()),
        study: None,
        deliveries: Vec::new(),
        revoked_at: None,
        printed: None,
    }
}

/// Revoke and extend act on the job's own repository: when the route now sends to
/// another, both are refused, naming the two, and nothing changes. A re-issued slip
/// follows the route's `slip_patient_name` now, not the one at issue.
#[test]
fn actions_follow_the_job_s_repository_and_the_route_now() {
    let site = Site::start();
    let (_, token_file, slip_file) = site.send();
    let sent = read_token(&token_file);
    let folder = token_file.parent().unwrap();
    let copies = |stem: &str| {
        let copy = (
            folder.join(format!("{stem}.token")),
            folder.join(format!("{stem}.html")),
        );
        std::fs::copy(&token_file, &copy.0).unwrap();
        std::fs::copy(&slip_file, &copy.1).unwrap();
        copy
    };

    let elsewhere = format!("http://127.0.0.1:{}", free_port());
    let moved = "S20261130-000000-2";
    site.record(&done_job(
        moved,
        &sent.document_id,
        &elsewhere,
        sent.expires_at,
        copies("moved"),
    ));
    for action in [&["revoke", moved][..], &["extend", moved, "--days", "20"]] {
        let (ok, said) = site.command(action);
        assert!(!ok, "{said}");
        assert!(
            said.contains(&elsewhere)
                && said.contains(site.repository.url.trim_end_matches('/'))
                && said.contains("nothing was changed"),
            "{said}"
        );
    }
    let document = block(site.client().status(&sent.document_id)).unwrap();
    assert_eq!(
        document.state,
        State::Complete,
        "revoked at the route's repository"
    );
    assert_eq!(document.expires_at, u64::from(sent.expires_at));

    let named = "S20261130-000000-3";
    let files = copies("named");
    let mut job = done_job(
        named,
        &sent.document_id,
        &site.repository.url,
        sent.expires_at,
        files.clone(),
    );
    job.printed = Some(PrintedStudy {
        patient_name: Some("YAMADA^TARO".into()),
        content: "2 DICOM instances".into(),
        ..PrintedStudy::default()
    });
    site.record(&job);
    let (ok, said) = site.command(&["extend", named, "--days", "20"]);
    assert!(ok, "{said}");
    let slip = std::fs::read_to_string(&files.1).unwrap();
    assert!(slip.contains("2 DICOM instances"), "{slip}");
    assert!(
        !slip.contains("YAMADA"),
        "the name printed although slip_patient_name is off now: {slip}"
    );
}
