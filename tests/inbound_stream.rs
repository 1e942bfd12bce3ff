//! The receiving side as one stream (issue 15 item 2), against the real daemon, a real
//! standalone repository and a real PACS peer that counts every C-STORE
//! (`tests/peers/counting_pacs.py`): containers are made with the `cloudpdi` commands a
//! sender runs (`pdi build`, `encrypt`, `repository upload`), their PDI rewritten by the
//! test where a case needs it (manifest last, a file that does not match the manifest).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use cloudpdi::pdi::manifest;
use cloudpdi::pdi::zip::{Limits, StreamEntry, ZipError, ZipWriter, read_stream};
use common::*;

/// Runs `cloudpdi` with arguments; panics with its output unless it succeeds.
fn cloudpdi(args: &[&str]) -> String {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cloudpdi {args:?}: {text}");
    text
}

/// The entries of a ZIP, in order, with their data.
fn entries(zip: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(zip).unwrap();
    let mut found = Vec::new();
    read_stream(
        &bytes[..],
        Limits::default(),
        |e: &StreamEntry, data: &mut dyn Read| {
            let mut held = Vec::new();
            data.read_to_end(&mut held).map_err(ZipError::from_io)?;
            found.push((e.name.clone(), held));
            Ok::<(), ZipError>(())
        },
    )
    .unwrap();
    found
}

/// Writes `entries` as a ZIP at `zip`, as the builder writes one.
fn write_zip(zip: &Path, entries: &[(String, Vec<u8>)]) {
    let mut writer = ZipWriter::new(Vec::new(), 0);
    for (name, data) in entries {
        writer.add_bytes(name, data).unwrap();
    }
    std::fs::write(zip, writer.finish().unwrap()).unwrap();
}

/// The same entries with the manifest moved last, as senders before issue 15 wrote them.
fn manifest_last(mut entries: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let at = entries
        .iter()
        .position(|(name, _)| name == manifest::PATH)
        .unwrap();
    let manifest = entries.remove(at);
    entries.push(manifest);
    entries
}

/// Builds the PDI of `study`, lets `rewrite` change its entries, seals it (with zstd
/// when `zstd`) and uploads it to `repository`; returns the token file.
fn publish(
    repository: &Repository,
    work: &Path,
    study: &Path,
    zstd: bool,
    rewrite: impl FnOnce(Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)>,
) -> PathBuf {
    publish_limited(repository, &repository.url, work, study, zstd, rewrite, 50)
}

/// As [`publish`], for a document that may be downloaded `max_downloads` times, with a
/// token naming the repository at `token_url` (the repository itself, or a link to it).
fn publish_limited(
    repository: &Repository,
    token_url: &str,
    work: &Path,
    study: &Path,
    zstd: bool,
    rewrite: impl FnOnce(Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)>,
    max_downloads: u32,
) -> PathBuf {
    let max_downloads = max_downloads.to_string();
    std::fs::create_dir_all(work).unwrap();
    let zip = work.join("pdi.zip");
    cloudpdi(&[
        "pdi",
        "build",
        "--out",
        zip.to_str().unwrap(),
        study.to_str().unwrap(),
    ]);
    let built = entries(&zip);
    assert_eq!(built[0].0, manifest::PATH, "the manifest comes first");
    std::fs::remove_file(&zip).unwrap();
    write_zip(&zip, &rewrite(built));
    let draft = work.join("draft.token");
    cloudpdi(&[
        "token",
        "new",
        "--repository",
        token_url,
        "--document-id",
        "00000000000000000000",
        "--out",
        draft.to_str().unwrap(),
    ]);
    let container = work.join("container");
    let token_arg = format!("@{}", draft.display());
    let mut encrypt = vec!["encrypt", "--token", &token_arg];
    if zstd {
        encrypt.push("--zstd");
    }
    encrypt.extend([zip.to_str().unwrap(), container.to_str().unwrap()]);
    cloudpdi(&encrypt);
    let token = work.join("issued.token");
    cloudpdi(&[
        "repository",
        "upload",
        "--url",
        &repository.url,
        "--api-key-file",
        repository.key_file.to_str().unwrap(),
        "--token",
        &token_arg,
        "--max-downloads",
        &max_downloads,
        "--token-out",
        token.to_str().unwrap(),
        container.to_str().unwrap(),
    ]);
    token
}

/// The counting PACS peer on a free port, writing into `dir/pacs` and `dir/pacs.log`.
struct Pacs {
    child: Child,
    port: u16,
    folder: PathBuf,
}

impl Pacs {
    fn start(dir: &Path, delay_ms: u32) -> Pacs {
        Pacs::start_refusing(dir, delay_ms, None)
    }

    /// As [`Pacs::start`], refusing (0xC000) the instance `refuse` when given.
    fn start_refusing(dir: &Path, delay_ms: u32, refuse: Option<&str>) -> Pacs {
        let folder = dir.join("pacs");
        std::fs::create_dir_all(&folder).unwrap();
        let port = free_port();
        let child = Command::new("python3")
            .arg(root().join("tests/peers/counting_pacs.py"))
            .arg(port.to_string())
            .arg(&folder)
            .arg(delay_ms.to_string())
            .args(refuse)
            .spawn()
            .unwrap();
        wait_for("the PACS to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(())
        });
        Pacs {
            child,
            port,
            folder,
        }
    }

    /// How many C-STOREs the PACS took for each SOP Instance UID.
    fn received(&self) -> BTreeMap<String, usize> {
        let log = std::fs::read_to_string(self.folder.with_extension("log")).unwrap_or_default();
        let mut counts = BTreeMap::new();
        for uid in log.lines() {
            *counts.entry(uid.to_owned()).or_insert(0) += 1;
        }
        counts
    }
}

impl Drop for Pacs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The receiving site, importing into `pacs`, prefixing Patient IDs with the issuer's
/// code (named by the repository's first answer to the download).
fn receiver(dir: &Path, pacs: &Pacs) -> Daemon {
    Daemon::start(
        &dir.join("b"),
        &site_b().replace("127.0.0.1:4242", &format!("127.0.0.1:{}", pacs.port)),
    )
}

/// The receiving site keeping Patient IDs as they are: instances go to the PACS while
/// the container still downloads.
fn receiver_keeping_ids(dir: &Path, pacs: &Pacs) -> Daemon {
    Daemon::start(
        &dir.join("b"),
        &site_b()
            .replace("127.0.0.1:4242", &format!("127.0.0.1:{}", pacs.port))
            .replace("patient_id = \"prefix\"", "patient_id = \"keep\""),
    )
}

/// The one inbound job of `site` once it is in `state`.
fn job_in(site: &Daemon, state: &str, within: Duration) -> serde_json::Value {
    wait_for(&format!("the job to be {state}"), within, || {
        site.inbound_jobs()
            .into_iter()
            .find(|j| j["state"] == state)
    })
}

fn uids(files: &[PathBuf]) -> BTreeSet<String> {
    files.iter().map(|f| sop_instance_uid(f)).collect()
}

#[test]
fn a_study_imports_through_the_stream_once_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 12, &["--patient-id", "STREAM"]);
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(&repository, &dir.path().join("send"), &study, true, |e| e);
    let pacs = Pacs::start(dir.path(), 0);
    let b = receiver(dir.path(), &pacs);
    hand_over(&token, &b);
    let job = job_in(&b, "done", Duration::from_secs(60));
    assert_eq!(job["progress"], "from HOSPA: 12 of 12 stored, 0 set aside");
    let received = pacs.received();
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        uids(&files_in(&study))
    );
    assert!(received.values().all(|&n| n == 1), "{received:?}");
    assert!(
        b.log().contains("from=Download to=Receipt"),
        "one streaming step from download to receipt:\n{}",
        b.log()
    );
}

#[test]
fn an_old_container_with_the_manifest_last_still_imports() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 5, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(
        &repository,
        &dir.path().join("send"),
        &study,
        false,
        manifest_last,
    );
    // The repository first serves bytes it changed after the upload: the old container
    // (opened whole by the next step) is checked against the repository's hash, and
    // downloaded again rather than failed for good.
    flip_near_the_end(&repository, 1000);
    let pacs = Pacs::start(dir.path(), 0);
    let b = receiver(dir.path(), &pacs);
    hand_over(&token, &b);
    let failed = wait_for("a failed attempt", Duration::from_secs(60), || {
        b.inbound_jobs()
            .into_iter()
            .find_map(|j| j["last_error"].as_str().map(str::to_owned))
    });
    assert!(
        failed.contains("do not have the repository's SHA-256") && failed.contains("will retry"),
        "{failed}"
    );
    flip_near_the_end(&repository, 1000);
    let job = job_in(&b, "done", Duration::from_secs(60));
    assert_eq!(job["progress"], "from HOSPA: 5 of 5 stored, 0 set aside");
    let received = pacs.received();
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        uids(&files_in(&study))
    );
    assert!(received.values().all(|&n| n == 1), "{received:?}");
}

/// Both orders of the manifest verify as a file set (`pdi verify` extracts through the
/// central directory).
#[test]
fn sets_with_the_manifest_first_or_last_both_verify() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 3, &[]);
    let first = dir.path().join("first.zip");
    cloudpdi(&[
        "pdi",
        "build",
        "--out",
        first.to_str().unwrap(),
        study.to_str().unwrap(),
    ]);
    let built = entries(&first);
    assert_eq!(built[0].0, manifest::PATH);
    let last = dir.path().join("last.zip");
    write_zip(&last, &manifest_last(built));
    assert_eq!(entries(&last).last().unwrap().0, manifest::PATH);
    for zip in [&first, &last] {
        let out = cloudpdi(&["pdi", "verify", zip.to_str().unwrap()]);
        assert!(out.contains("instances: 3"), "{out}");
    }
}

/// A file whose bytes are not those the manifest lists is never sent, although the
/// container around it authenticates (the sender's own mistake or malice): the job
/// fails with the reason; what came before it was genuine and is in the PACS once.
#[test]
fn a_file_that_does_not_match_the_manifest_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 6, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let mut altered = String::new();
    let token = publish(
        &repository,
        &dir.path().join("send"),
        &study,
        false,
        |mut e| {
            let (name, data) = e
                .iter_mut()
                .rev()
                .find(|(name, _)| name.starts_with("DICOM/"))
                .unwrap();
            let last = data.len() - 1;
            data[last] ^= 0xFF;
            altered = name.clone();
            e
        },
    );
    let pacs = Pacs::start(dir.path(), 0);
    let b = receiver(dir.path(), &pacs);
    hand_over(&token, &b);
    let job = job_in(&b, "failed", Duration::from_secs(60));
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.contains(&altered) && error.contains("does not match the manifest"),
        "{error}"
    );
    let received = pacs.received();
    assert_eq!(
        received.len(),
        5,
        "the five genuine instances: {received:?}"
    );
    assert!(received.values().all(|&n| n == 1), "{received:?}");
    assert!(
        uids(&files_in(&study)).is_superset(&received.keys().cloned().collect()),
        "only instances of the study"
    );
}

/// The stored parts of the only document in `repository`, in order.
fn stored_parts(repository: &Repository) -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = files_under(&repository.dir.join("store/documents"))
        .into_iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("parts")))
        .collect();
    parts.sort();
    parts
}

/// Flips one byte of the stored document, `back` bytes before its end.
fn flip_near_the_end(repository: &Repository, back: u64) {
    let parts = stored_parts(repository);
    let sizes: Vec<u64> = parts
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    let mut at = sizes.iter().sum::<u64>() - back;
    for (part, size) in parts.iter().zip(sizes) {
        if at < size {
            let mut bytes = std::fs::read(part).unwrap();
            bytes[usize::try_from(at).unwrap()] ^= 0x01;
            std::fs::write(part, bytes).unwrap();
            return;
        }
        at -= size;
    }
}

/// A container damaged near its end (a byte altered on the repository's disk): the
/// instances whose bytes authenticated before the damage reach the PACS, the job retries
/// with the reason, and once the document is whole again the retry sends only the rest.
#[test]
fn a_container_damaged_late_imports_only_what_authenticated_and_never_twice() {
    damaged_late(receiver_keeping_ids);
}

/// The same with Patient IDs prefixed by the issuer's code: the lanes do not wait for the
/// download's end (which the damage makes fail) to learn the issuer.
#[test]
fn with_prefixed_patient_ids_the_lanes_start_before_the_download_ends() {
    damaged_late(receiver);
}

fn damaged_late(receiver: fn(&Path, &Pacs) -> Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 16, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(&repository, &dir.path().join("send"), &study, false, |e| e);
    flip_near_the_end(&repository, 200_000);
    let pacs = Pacs::start(dir.path(), 0);
    let b = receiver(dir.path(), &pacs);
    hand_over(&token, &b);
    let waiting = wait_for(
        "the job to fail an attempt",
        Duration::from_secs(60),
        || {
            b.inbound_jobs()
                .into_iter()
                .find(|j| j["last_error"].as_str().is_some())
        },
    );
    let error = waiting["last_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("will retry") && error.contains("are not sent again"),
        "{error}"
    );
    let before = pacs.received();
    assert!(
        !before.is_empty() && before.len() < 16,
        "the authenticated instances before the damage, not the rest: {before:?}\n{error}"
    );
    flip_near_the_end(&repository, 200_000);
    let job = job_in(&b, "done", Duration::from_secs(90));
    assert_eq!(job["progress"], "from HOSPA: 16 of 16 stored, 0 set aside");
    let after = pacs.received();
    assert_eq!(
        after.keys().cloned().collect::<BTreeSet<_>>(),
        uids(&files_in(&study))
    );
    assert!(
        after.values().all(|&n| n == 1),
        "an instance sent twice: {after:?}"
    );
}

/// `kill -9` of the receiving daemon in the middle of the stream: after the restart the
/// job completes; the PACS holds every instance, and only the instances in flight at the
/// kill (at most one per association) can have been sent twice.
#[test]
fn kill_9_in_the_middle_of_the_stream_then_restart_completes() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 24, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(&repository, &dir.path().join("send"), &study, true, |e| e);
    let pacs = Pacs::start(dir.path(), 150);
    let mut b = receiver(dir.path(), &pacs);
    hand_over(&token, &b);
    wait_for("some instances stored", Duration::from_secs(60), || {
        (pacs.received().len() >= 6).then_some(())
    });
    b.kill9();
    let at_kill = pacs.received().len();
    assert!(at_kill < 24, "killed in the middle ({at_kill} stored)");
    b.spawn();
    let job = job_in(&b, "done", Duration::from_secs(120));
    assert_eq!(job["progress"], "from HOSPA: 24 of 24 stored, 0 set aside");
    let received = pacs.received();
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        uids(&files_in(&study))
    );
    let again = received.values().filter(|&&n| n > 1).count();
    assert!(
        again <= 4,
        "more than the instances in flight sent again: {received:?}"
    );
}

/// SIGTERM while an inbound stream waits for bytes from a repository that stopped
/// answering (SIGSTOP): the reader following the download ends with the step, so the
/// daemon exits at once instead of waiting for ever (systemd's SIGKILL after 90 s).
#[test]
fn sigterm_while_the_repository_stalls_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 4, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(&repository, &dir.path().join("send"), &study, false, |e| e);
    let pacs = Pacs::start(dir.path(), 0);
    let mut b = receiver(dir.path(), &pacs);
    let pid = repository.pid().to_string();
    run(Command::new("kill").args(["-STOP", &pid]));
    hand_over(&token, &b);
    wait_for("the stream to start", Duration::from_secs(30), || {
        files_under(&b.dir)
            .into_iter()
            .any(|f| f.file_name().is_some_and(|n| n == "container.part"))
            .then_some(())
    });
    // The reader thread is following the empty download now.
    std::thread::sleep(Duration::from_millis(500));
    let asked = std::time::Instant::now();
    let status = b.stop();
    let took = asked.elapsed();
    run(Command::new("kill").args(["-CONT", &pid]));
    assert!(status.success(), "the daemon stopped cleanly: {status:?}");
    assert!(
        took < Duration::from_secs(10),
        "the daemon took {took:?} to stop"
    );
}

/// Site B receiving a 6-instance study (downloadable `downloads` times) whose first
/// instance the PACS refuses, with the step after the stream failing until `blocker` (a
/// file where the set-aside folder goes) is removed: the container stays in the job
/// folder for the next attempt.
struct Blocked {
    _repository: Repository,
    pacs: Pacs,
    b: Daemon,
    blocker: PathBuf,
}

/// Removes the blocker and checks the end both tests expect: the job done, the five
/// instances the PACS accepted stored once each, the refused one set aside.
fn unblocked_imports_each_once(b: &Daemon, pacs: &Pacs, blocker: &Path) {
    std::fs::remove_file(blocker).unwrap();
    let job = job_in(b, "done", Duration::from_secs(60));
    assert_eq!(job["progress"], "from HOSPA: 5 of 6 stored, 1 set aside");
    let received = pacs.received();
    assert_eq!(received.len(), 5, "{received:?}");
    assert!(
        received.values().all(|&n| n == 1),
        "an instance sent twice: {received:?}"
    );
}

fn blocked_after_the_stream(dir: &Path, downloads: u32) -> Blocked {
    let study = dir.join("study");
    gen_ct(&study, 6, &[]);
    let refused = sop_instance_uid(&files_in(&study)[0]);
    let repository = Repository::start(&dir.join("repo"));
    let token = publish_limited(
        &repository,
        &repository.url,
        &dir.join("send"),
        &study,
        false,
        |e| e,
        downloads,
    );
    let pacs = Pacs::start_refusing(dir, 0, Some(&refused));
    let b = Daemon::start(
        &dir.join("b"),
        &site_b()
            .replace("127.0.0.1:4242", &format!("127.0.0.1:{}", pacs.port))
            .replace("attempts = 2\n", "attempts = 2\nmax_backoff = 1\n"),
    );
    // The daemon made the folder, empty.
    let blocker = b.dir.join("data/set-aside");
    std::fs::remove_dir(&blocker).unwrap();
    std::fs::write(&blocker, b"").unwrap();
    hand_over(&token, &b);
    Blocked {
        _repository: repository,
        pacs,
        b,
        blocker,
    }
}

/// A failure after the stream stored every instance but before the next step was
/// recorded (here: the set-aside folder cannot be created for the instance the PACS
/// refused) restarts the stream from the downloaded container: a document that may be
/// downloaded once still completes, and nothing is sent twice.
#[test]
fn a_failure_after_the_stream_does_not_download_again() {
    let dir = tempfile::tempdir().unwrap();
    let Blocked {
        _repository,
        pacs,
        b,
        blocker,
    } = blocked_after_the_stream(dir.path(), 1);
    let failing = wait_for(
        "the second attempt after the stream",
        Duration::from_secs(60),
        || {
            b.inbound_jobs()
                .into_iter()
                .find(|j| j["attempts"].as_u64().is_some_and(|n| n >= 2))
        },
    );
    let error = failing["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("set-aside"),
        "the stream ran again from the container (no second download): {error}"
    );
    assert_ne!(failing["state"], "failed", "{failing}");
    unblocked_imports_each_once(&b, &pacs, &blocker);
}

/// A container kept in the job folder from an earlier attempt is not synced (the stream
/// reads it at once): when it no longer authenticates (a power cut took writes the disk had
/// not made), it is removed and downloaded again, and the study is imported without
/// sending twice what was stored.
#[test]
fn a_kept_container_that_no_longer_authenticates_is_downloaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let Blocked {
        _repository,
        pacs,
        b,
        blocker,
    } = blocked_after_the_stream(dir.path(), 2);
    let jobs = b.dir.join("data/jobs/in");
    let container = wait_for("the kept container", Duration::from_secs(60), || {
        std::fs::read_dir(&jobs)
            .ok()?
            .flatten()
            .map(|job| job.path().join("container"))
            .find(|c| c.exists())
    });
    let mut bytes = std::fs::read(&container).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(&container, &bytes).unwrap();
    wait_for(
        "the damaged container to be noticed",
        Duration::from_secs(60),
        || {
            b.log()
                .contains("the container kept from an earlier attempt does not authenticate")
                .then_some(())
        },
    );
    unblocked_imports_each_once(&b, &pacs, &blocker);
}

/// A link to `target` passing at most `rate` bytes per second towards the client
/// (tests/peers/slow_link.py): a download that takes its time.
struct SlowLink {
    child: Child,
    url: String,
}

impl SlowLink {
    fn start(target: &Repository, rate: u64) -> SlowLink {
        let port = free_port();
        let target_port = target.url.rsplit(':').next().unwrap().trim_end_matches('/');
        let child = Command::new("python3")
            .arg(root().join("tests/peers/slow_link.py"))
            .args([port.to_string(), target_port.to_owned(), rate.to_string()])
            .spawn()
            .unwrap();
        wait_for("the link to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(())
        });
        SlowLink {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The extraction runs alongside the download, so the room it needs is the PDI's and the
/// rest of the container's together: a disk that holds either but not both refuses the
/// study before any file of it reaches the PACS, saying so, and takes it once there is
/// room.
#[test]
fn a_disk_too_small_for_the_pdi_and_the_rest_of_the_container_refuses_before_extracting() {
    if !isolated(
        "a_disk_too_small_for_the_pdi_and_the_rest_of_the_container_refuses_before_extracting",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 16, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let link = SlowLink::start(&repository, 2 << 20);
    let send = dir.path().join("send");
    let token = publish_limited(&repository, &link.url, &send, &study, false, |e| e, 50);
    let container = std::fs::metadata(send.join("container")).unwrap().len();
    let pacs = Pacs::start(dir.path(), 0);
    // Uncompressed, the PDI is about as large as the container: room for one, not both.
    let jobs = dir.path().join("b/data/jobs");
    mount_tmpfs(&jobs, &format!("size={}k", container * 3 / 2 / 1024));
    let b = receiver_keeping_ids(dir.path(), &pacs);
    hand_over(&token, &b);
    // The first attempt's refusal, from the log (a later attempt, with the container
    // downloaded, names the PDI's bytes only).
    wait_for("the study to be refused", Duration::from_secs(60), || {
        b.log()
            .lines()
            .any(|line| {
                line.contains("No space left to extract the PDI")
                    && line.contains("for the rest of the container, still downloading")
            })
            .then_some(())
    });
    assert!(
        pacs.received().is_empty(),
        "instances were sent before the disk filled: {:?}",
        pacs.received()
    );
    mount_tmpfs(&jobs, "remount,size=256m");
    job_in(&b, "done", Duration::from_secs(120));
    assert_eq!(
        pacs.received().keys().cloned().collect::<BTreeSet<_>>(),
        uids(&files_in(&study))
    );
}

/// The SOP Instance UIDs of the instances of an extracted set (the files of its DICOM
/// folder).
fn extracted_uids(set: &Path) -> BTreeSet<String> {
    let instances = files_under(&set.join("DICOM"));
    assert!(!instances.is_empty(), "no instance in {}", set.display());
    instances.iter().map(|f| sop_instance_uid(f)).collect()
}

/// `cloudpdi receive --out` reads the container as it downloads, as the daemon does: the
/// set appears in the folder whole and verified, and a container from an older sender
/// (manifest last) still opens. A folder that exists is refused before anything is
/// downloaded.
#[test]
fn receive_out_gives_whole_sets_opens_old_containers_and_refuses_an_existing_folder() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 16, &[]);
    let originals = uids(&files_in(&study));
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(&repository, &dir.path().join("send"), &study, true, |e| e);
    let token = format!("@{}", token.display());
    let out = dir.path().join("out");
    let said = cloudpdi(&["receive", "--out", out.to_str().unwrap(), &token]);
    assert!(said.contains("16 instances"), "{said}");
    assert_eq!(extracted_uids(&out), originals);
    assert!(!dir.path().join("out.cloudpdi-download").exists());

    let refused = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
        "receive",
        "--out",
        out.to_str().unwrap(),
        &token,
    ]));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("exists: name a folder that does not exist yet"),
        "{said}"
    );
    assert_eq!(
        extracted_uids(&out),
        originals,
        "the folder is left as it was"
    );

    let old = publish(
        &repository,
        &dir.path().join("send-old"),
        &study,
        false,
        manifest_last,
    );
    let from_old = dir.path().join("from-old");
    let said = cloudpdi(&[
        "receive",
        "--out",
        from_old.to_str().unwrap(),
        &format!("@{}", old.display()),
    ]);
    assert!(said.contains("16 instances"), "{said}");
    assert_eq!(extracted_uids(&from_old), originals);
}

/// The reader writes files as their bytes authenticate: a container damaged near its end
/// must still leave no folder (the set is renamed into place only once whole), only the
/// download to resume; once the document is whole again, the set arrives.
#[test]
fn receive_out_of_a_container_damaged_late_leaves_no_folder() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 16, &[]);
    let repository = Repository::start(&dir.path().join("repo"));
    let token = publish(&repository, &dir.path().join("send"), &study, false, |e| e);
    let token = format!("@{}", token.display());
    flip_near_the_end(&repository, 200_000);
    let out = dir.path().join("out");
    let failed = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
        "receive",
        "--out",
        out.to_str().unwrap(),
        &token,
    ]));
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{said}");
    assert!(!out.exists(), "a set from a damaged container: {said}");
    // The repository changed the bytes after the upload: its hash says so, and the
    // damaged download is not kept (the next run downloads again).
    assert!(
        said.contains("do not have the repository's SHA-256"),
        "{said}"
    );
    let beside = files_under(&dir.path().join("out.cloudpdi-download"));
    assert!(
        beside.iter().all(|f| f.ends_with("container.part")),
        "only a download to resume is kept: {beside:?}"
    );
    flip_near_the_end(&repository, 200_000);
    let said = cloudpdi(&["receive", "--out", out.to_str().unwrap(), &token]);
    assert!(said.contains("16 instances"), "{said}");
    assert_eq!(extracted_uids(&out), uids(&files_in(&study)));
}
