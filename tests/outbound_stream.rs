//! The outbound stream against the real daemon and a real `cloudpdi repository serve`:
//! a study streams into the repository (no PDI ZIP ever written) and its token opens it;
//! kill -9 in the middle of the stream, or after the container was finished but before
//! every part was uploaded, and a restart completes the job (the second case sending only
//! the parts the repository did not acknowledge).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::{Pid, Signal, kill_process};

const MIB: u64 = 1 << 20;

fn cloudpdi(args: &[&str]) -> (bool, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Site A with route `ct` to `repository`, uncompressed (the sizes are then known), and
/// `outbound` settings appended.
fn site_a(dir: &Path, repository: &Repository, outbound: &str) -> Daemon {
    site_a_at(dir, &repository.url, repository, outbound)
}

/// As [`site_a`], the route's repository reached at `url` (a peer in front of it) with
/// `repository`'s API key.
fn site_a_at(dir: &Path, url: &str, repository: &Repository, outbound: &str) -> Daemon {
    let route = format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\ncompress = false\n\
         repository_url = \"{url}\"\nrepository_api_key_file = \"{}\"\n\
         [outbound]\nenabled = true\n{outbound}\n[facility]\ncode = \"HOSPA\"\n",
        repository.key_file.display()
    );
    Daemon::start(&dir.join("a"), &route)
}

/// Opens the token with `cloudpdi receive --out` (download, decrypt, verify against the
/// manifest) and checks that all the originals came out.
fn assert_token_opens(token: &Path, originals: &[PathBuf], work: &Path) {
    let out_dir = work.join("received");
    let (ok, out) = cloudpdi(&[
        "receive",
        &format!("@{}", token.display()),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // `receive` checked every file against the manifest (size and SHA-256).
    assert!(
        out.contains(&format!("{} instances", originals.len())),
        "{out}"
    );
    assert!(out_dir.join("DICOMDIR").is_file());
}

/// Parts the repository stored (its audit trail: `upload_part` answered `ok`).
fn parts_stored(repository: &Repository) -> usize {
    std::fs::read_to_string(repository.dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"action\":\"upload_part\"") && l.contains("\"outcome\":\"ok\""))
        .count()
}

/// Documents the repository created.
fn documents_created(repository: &Repository) -> usize {
    std::fs::read_to_string(repository.dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"action\":\"create\"") && l.contains("\"outcome\":\"ok\""))
        .count()
}

/// The part numbers the repository holds on disk (every document).
fn parts_held(repository: &Repository) -> std::collections::BTreeSet<u32> {
    files_under(&repository.dir.join("store/documents"))
        .into_iter()
        .filter(|f| f.parent().is_some_and(|p| p.ends_with("parts")))
        .filter_map(|f| f.file_name()?.to_str()?.parse().ok())
        .collect()
}

/// Stops the repository (SIGSTOP) as soon as an outbound job of `a` starts its stream
/// (`container.partial` appears), polling every millisecond; returns the job's folder.
fn stop_when_streaming(jobs: &Path, repository: &Repository, a: &Daemon) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let partial = files_under(jobs)
            .into_iter()
            .find(|f| f.ends_with("container.partial"));
        if let Some(partial) = partial {
            signal(repository.pid(), Signal::STOP);
            return partial.parent().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no stream started:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `signal` to `pid` at once: spawning `kill` takes milliseconds, in which a small
/// upload on a loaded machine may finish before the repository stops.
fn signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    kill_process(pid, signal).unwrap_or_else(|e| panic!("{signal:?} to {pid:?}: {e}"));
}

#[test]
fn a_study_streams_into_the_repository_and_its_token_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start_tuned(&dir.path().join("repository"), "part_size_mb = 1");
    let a = site_a(dir.path(), &repository, "");
    let study = dir.path().join("study");
    gen_ct(&study, 20, &[]);
    let originals = files_in(&study);
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");
    // No PDI ZIP is ever written: the job folder is watched until the token is there.
    let jobs = a.dir.join("data/jobs/out");
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        let files = files_under(&jobs);
        assert!(
            !files.iter().any(|f| f.ends_with("pdi.zip")),
            "a pdi.zip was written: {files:?}"
        );
        if let Some(token) = tokens(&a).into_iter().next() {
            break token;
        }
        assert!(Instant::now() < deadline, "no token:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        parts_stored(&repository) > 5,
        "the container went in 1 MiB parts"
    );
    assert_token_opens(&token, &originals, dir.path());
}

#[test]
fn kill_9_in_the_middle_of_the_stream_then_a_restart_completes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start_tuned(&dir.path().join("repository"), "part_size_mb = 1");
    let mut a = site_a(dir.path(), &repository, "parts_in_flight = 2");
    let study = dir.path().join("study");
    gen_ct(&study, 30, &[]);
    let originals = files_in(&study);
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");
    // The repository stops answering once the stream started: the stream stalls with a
    // few parts in flight, and the daemon is killed there.
    let folder = stop_when_streaming(&a.dir.join("data/jobs/out"), &repository, &a);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !folder.join("container").exists(),
        "the stream stalls before its end"
    );
    a.kill9();
    signal(repository.pid(), Signal::CONT);
    a.spawn();
    let token = wait_for(
        "the token after the restart",
        Duration::from_secs(90),
        || tokens(&a).into_iter().next(),
    );
    // The stream ran again into the same document.
    assert_eq!(documents_created(&repository), 1);
    assert_token_opens(&token, &originals, dir.path());
}

#[test]
fn a_finished_container_resumes_with_only_the_parts_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start_tuned(&dir.path().join("repository"), "part_size_mb = 1");
    // With 16 parts in flight the whole container (about 13 MiB, 14 parts) is produced
    // while the repository is stopped.
    let mut a = site_a(dir.path(), &repository, "parts_in_flight = 16");
    let study = dir.path().join("study");
    gen_ct(&study, 26, &[]);
    let originals = files_in(&study);
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");
    // The repository is stopped as soon as the stream starts (watched closely: the
    // upload takes a few tens of milliseconds); the whole container is still produced.
    let jobs = a.dir.join("data/jobs/out");
    let folder = stop_when_streaming(&jobs, &repository, &a);
    let acked = folder.join("acked");
    let container = folder.join("container");
    wait_for("the finished container", Duration::from_secs(30), || {
        container.exists().then_some(())
    });
    a.kill9();
    let size = std::fs::metadata(&container).unwrap().len();
    let total = usize::try_from(size.div_ceil(MIB)).unwrap();
    signal(repository.pid(), Signal::CONT);
    // Requests the repository held while stopped finish now (their answers are lost).
    std::thread::sleep(Duration::from_secs(1));
    // The acknowledgement list as a crash leaves it: here every part the repository holds
    // but the first (whatever the timing let through before the stop).
    let held = parts_held(&repository);
    let listed: Vec<u32> = held.iter().copied().skip(1).collect();
    let text: String = listed.iter().map(|n| format!("{n}\n")).collect();
    std::fs::write(&acked, text).unwrap();
    let before = parts_stored(&repository);
    a.spawn();
    let token = wait_for(
        "the token after the restart",
        Duration::from_secs(90),
        || tokens(&a).into_iter().next(),
    );
    let resent = parts_stored(&repository) - before;
    assert_eq!(
        resent,
        total - listed.len(),
        "only the parts not both held and acknowledged are sent again ({} held of {total})",
        held.len()
    );
    assert_eq!(documents_created(&repository), 1);
    assert_token_opens(&token, &originals, dir.path());
}

/// Rewrites the DICOM files of `dir` in RLE Lossless (pydicom's own encoder).
fn rle_compress(dir: &Path) {
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, pathlib, pydicom\n\
         from pydicom.uid import RLELossless\n\
         for f in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n\
         \x20   ds = pydicom.dcmread(f)\n\
         \x20   ds.compress(RLELossless)\n\
         \x20   ds.save_as(f)\n",
        )
        .arg(dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The compression byte of the container header of every stored document, by document.
fn stored_compression(repository: &Repository) -> std::collections::BTreeMap<String, u8> {
    let documents = repository.dir.join("store/documents");
    std::fs::read_dir(&documents)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|doc| {
            let first = std::fs::read(doc.join("parts/00000000")).ok()?;
            let id = doc.file_name()?.to_string_lossy().into_owned();
            Some((id, first[10]))
        })
        .collect()
}

#[test]
fn instances_mostly_in_a_compressed_syntax_are_not_compressed_again() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start(&dir.path().join("repository"));
    // The route compresses (the default): only the RLE study goes uncompressed.
    let route = format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 1\n\
         repository_url = \"{}\"\nrepository_api_key_file = \"{}\"\n\
         [outbound]\nenabled = true\n[facility]\ncode = \"HOSPA\"\n",
        repository.url,
        repository.key_file.display()
    );
    let a = Daemon::start(&dir.path().join("a"), &route);
    let rle = dir.path().join("rle");
    gen_ct(&rle, 3, &["--study-uid", "1.2.392.200036.9116.2.6.1.99.1"]);
    rle_compress(&rle);
    let out = storescu(&a, "MODALITY", &["-xr"], &files_in(&rle));
    assert!(out.status.success(), "{out:?}");
    let token = wait_for("the RLE study's token", Duration::from_secs(60), || {
        tokens(&a).into_iter().next()
    });
    let first = stored_compression(&repository);
    assert_eq!(
        first.values().collect::<Vec<_>>(),
        [&0],
        "the RLE study's container is not compressed"
    );
    assert_token_opens(&token, &files_in(&rle), &dir.path().join("rle-out"));

    let plain = dir.path().join("plain");
    gen_ct(
        &plain,
        3,
        &["--study-uid", "1.2.392.200036.9116.2.6.1.99.2"],
    );
    let out = storescu(&a, "MODALITY", &[], &files_in(&plain));
    assert!(out.status.success(), "{out:?}");
    wait_for("the second token", Duration::from_secs(60), || {
        (tokens(&a).len() == 2).then_some(())
    });
    let both = stored_compression(&repository);
    let second: Vec<u8> = both
        .iter()
        .filter(|(id, _)| !first.contains_key(*id))
        .map(|(_, &c)| c)
        .collect();
    assert_eq!(
        second,
        [1],
        "the uncompressed study's container is zstd-compressed"
    );
}

/// Stops `repository` as soon as it acknowledged a part of the only job of `a` (watched
/// closely: an upload takes a few tens of milliseconds); returns the job folder.
fn stop_after_first_ack(a: &Daemon, repository: &Repository) -> PathBuf {
    let jobs = a.dir.join("data/jobs/out");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = files_under(&jobs)
            .into_iter()
            .find(|f| f.ends_with("acked") && std::fs::read(f).is_ok_and(|t| t.contains(&b'\n')));
        if let Some(acked) = first {
            signal(repository.pid(), Signal::STOP);
            return acked.parent().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no part acknowledged:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The document of a job vanished from the repository while the daemon was down (swept,
/// or the storage restored from a backup): the restarted job creates a new streamed
/// document and the token opens it (before, the 404 failed the job for good).
#[test]
fn a_vanished_document_is_replaced_by_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start_tuned(&dir.path().join("repository"), "part_size_mb = 1");
    let mut a = site_a(dir.path(), &repository, "parts_in_flight = 2");
    let study = dir.path().join("study");
    gen_ct(&study, 20, &[]);
    let originals = files_in(&study);
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");
    stop_after_first_ack(&a, &repository);
    a.kill9();
    signal(repository.pid(), Signal::CONT);
    // Requests cut by the kill end first.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_dir_all(repository.dir.join("store/documents")).unwrap();
    a.spawn();
    let token = wait_for(
        "the token after the restart",
        Duration::from_secs(90),
        || tokens(&a).into_iter().next(),
    );
    assert_eq!(documents_created(&repository), 2, "a new document");
    assert_token_opens(&token, &originals, dir.path());
}

/// The route moved to another repository after the container was finished: the restarted
/// job does not resume into the old document ID at the new repository (a 404 there failed
/// the job for good) but streams into a new document there.
#[test]
fn a_route_moved_to_another_repository_gets_a_new_document_there() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start_tuned(&dir.path().join("repository"), "part_size_mb = 1");
    let second = Repository::start_tuned(&dir.path().join("second"), "part_size_mb = 1");
    let mut a = site_a(dir.path(), &repository, "parts_in_flight = 16");
    let study = dir.path().join("study");
    gen_ct(&study, 26, &[]);
    let originals = files_in(&study);
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");
    // The first repository stops once it acknowledged a part, so the container is
    // finished with the document incomplete.
    let folder = stop_after_first_ack(&a, &repository);
    wait_for("the finished container", Duration::from_secs(30), || {
        folder.join("container").exists().then_some(())
    });
    a.kill9();
    let config = std::fs::read_to_string(&a.config).unwrap();
    let moved = config.replace(&repository.url, &second.url).replace(
        &repository.key_file.display().to_string(),
        &second.key_file.display().to_string(),
    );
    assert_ne!(config, moved);
    std::fs::write(&a.config, moved).unwrap();
    a.spawn();
    let token = wait_for(
        "the token after the restart",
        Duration::from_secs(90),
        || tokens(&a).into_iter().next(),
    );
    assert_eq!(
        documents_created(&second),
        1,
        "a new document at the new repository"
    );
    assert_token_opens(&token, &originals, dir.path());
    signal(repository.pid(), Signal::CONT);
}

/// A repository older than streamed documents refuses a create without a size (as
/// releases before streaming did; tests/peers/old_repository.py answers so in front of
/// the real server): the gateway seals the container whole, creates a sized document,
/// uploads it, says so once in its log, and the token opens the study.
#[test]
fn a_repository_older_than_streamed_documents_still_gets_the_study() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start_tuned(&dir.path().join("repository"), "part_size_mb = 1");
    let port = free_port();
    let old = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/old_repository.py"
        ))
        .args([&port.to_string(), &repository.url])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let old = KillOnDrop(old);
    wait_for("the old repository's port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let a = site_a_at(
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        &repository,
        "",
    );
    let study = dir.path().join("study");
    gen_ct(&study, 20, &[]);
    let originals = files_in(&study);
    let out = storescu(&a, "MODALITY", &[], &originals);
    assert!(out.status.success(), "{out:?}");
    let token = wait_for("a token", Duration::from_secs(90), || {
        tokens(&a).into_iter().next()
    });
    let log = a.log();
    assert_eq!(
        log.matches("does not accept streamed documents").count(),
        1,
        "{log}"
    );
    // One document, created with its size: the streamed create never reached the server.
    let audit = std::fs::read_to_string(repository.dir.join("audit.jsonl")).unwrap();
    let creates: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"action\":\"create\"") && l.contains("\"outcome\":\"ok\""))
        .collect();
    assert_eq!(creates.len(), 1, "{audit}");
    assert!(!creates[0].contains("size streamed"), "{}", creates[0]);
    assert!(parts_stored(&repository) > 5, "{audit}");
    assert_token_opens(&token, &originals, dir.path());
    drop(old);
}

/// A child process killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
