//! The repository over real HTTP on loopback, on both storage backends: local files and
//! S3 (moto's server mode, started here on 127.0.0.1), with our client, curl, and the
//! real `cloudpdi repository serve` killed in the middle of transfers.
#![allow(clippy::unwrap_used)]

mod common;

use common::moto::Moto;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudpdi::repository::api::{MAX_EXTENSIONS, NewDocument, Receipt, State, parts_digest};
use cloudpdi::repository::client::{Client, ClientError, ClientOptions, DownloadCheck};
use cloudpdi::repository::config::{
    AuditConfig, Backend, FacilityConfig, RepositoryConfig, ServerConfig, StorageConfig,
};
use cloudpdi::token::{RepositoryRef, Token};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SECRET: [u8; 16] = *b"\x5a\x17\xc3\x88\x01\xfe\x42\x9d\x6b\x20\xaa\x13\x77\xe4\x0c\x31";
const MIB: u64 = 1 << 20;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(expires_in: u64) -> Token {
    let expires = u32::try_from(unix_now() + expires_in).unwrap();
    let url = RepositoryRef::Url("http://127.0.0.1".into());
    Token::with_secret(url, "00000000000000000000", expires, SECRET).unwrap()
}

fn fast_options() -> ClientOptions {
    ClientOptions {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        max_attempts: 12,
        ..ClientOptions::default()
    }
}

fn random_file(path: &Path, len: u64) -> [u8; 32] {
    let mut data = vec![0u8; usize::try_from(len).unwrap()];
    getrandom::fill(&mut data).unwrap();
    std::fs::write(path, &data).unwrap();
    Sha256::digest(&data).into()
}

fn sha256_file(path: &Path) -> [u8; 32] {
    Sha256::digest(std::fs::read(path).unwrap()).into()
}

/// The SHA-256 of each `part_size` block of `data`.
fn part_hashes(data: &[u8], part_size: u64) -> Vec<[u8; 32]> {
    data.chunks(usize::try_from(part_size).unwrap())
        .map(|part| Sha256::digest(part).into())
        .collect()
}

/// The parts digest of a file as the repository reports it (hex), for 1 MiB parts.
fn parts_sha256_file(path: &Path) -> String {
    hex::encode(parts_digest(&part_hashes(
        &std::fs::read(path).unwrap(),
        MIB,
    )))
}

/// A repository served in this process on 127.0.0.1:0.
struct Repo {
    url: String,
    key_a: String,
    key_b: String,
    dir: tempfile::TempDir,
    storage: StorageConfig,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cloudpdi::repository::server::ServerError>>,
    _moto: Option<Moto>,
}

fn facility(hash: String) -> FacilityConfig {
    FacilityConfig {
        api_key_sha256: hash,
        client_cert_sha256: String::new(),
        ..FacilityConfig::default()
    }
}

fn config(dir: &Path, storage: StorageConfig) -> (RepositoryConfig, String, String) {
    let (key_a, hash_a) = cloudpdi::repository::auth::new_api_key().unwrap();
    let (key_b, hash_b) = cloudpdi::repository::auth::new_api_key().unwrap();
    let config = RepositoryConfig {
        server: ServerConfig {
            part_size_mb: 1,
            max_document_mb: 64,
            sweep_interval: 1,
            failed_proofs_per_window: 50,
            ..ServerConfig::default()
        },
        storage,
        audit: AuditConfig {
            path: dir.join("audit.jsonl"),
        },
        facility: [
            ("HOSP_A".to_owned(), facility(hash_a)),
            ("HOSP_B".to_owned(), facility(hash_b)),
        ]
        .into(),
        ..RepositoryConfig::default()
    };
    (config, key_a.to_string(), key_b.to_string())
}

impl Repo {
    async fn start(backend: Backend) -> Repo {
        Repo::start_with(backend, |_| {}).await
    }

    /// A repository on `backend` whose configuration `tweak` adjusts.
    async fn start_with(backend: Backend, tweak: impl FnOnce(&mut RepositoryConfig)) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let (moto, storage) = match backend {
            Backend::Local => (
                None,
                StorageConfig {
                    path: dir.path().join("store"),
                    ..StorageConfig::default()
                },
            ),
            Backend::S3 => {
                let moto = Moto::start("pdi");
                let storage = moto.storage("pdi");
                (Some(moto), storage)
            }
        };
        Repo::serve(dir, storage, moto, tweak).await
    }

    /// A second server on the same storage (as behind a load balancer), with its own
    /// facility keys and audit trail.
    async fn beside(&self) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        Repo::serve(dir, self.storage.clone(), None, |_| {}).await
    }

    async fn serve(
        dir: tempfile::TempDir,
        storage: StorageConfig,
        moto: Option<Moto>,
        tweak: impl FnOnce(&mut RepositoryConfig),
    ) -> Repo {
        let (mut config, key_a, key_b) = config(dir.path(), storage.clone());
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let task = tokio::spawn(cloudpdi::repository::server::run(
            config,
            listener,
            async move { shutdown.cancelled().await },
        ));
        Repo {
            url,
            key_a,
            key_b,
            dir,
            storage,
            stop,
            task,
            _moto: moto,
        }
    }

    fn client(&self, key: Option<&str>) -> Client {
        Client::new(&self.url, key.map(str::to_owned), fast_options()).unwrap()
    }

    /// Every stored object (path or key, bytes), plus the audit trail.
    fn stored(&self) -> Vec<(String, Vec<u8>)> {
        let mut objects = match &self._moto {
            Some(moto) => moto.objects("pdi"),
            None => common::contents_under(&self.dir.path().join("store")),
        };
        let audit = self.dir.path().join("audit.jsonl");
        objects.push(("audit".into(), std::fs::read(audit).unwrap_or_default()));
        objects
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn new_document(size: u64, token: &Token, max_downloads: u32) -> NewDocument {
    NewDocument {
        size: Some(size),
        expires_at: u64::from(token.expires_at),
        max_downloads,
        proof_hash: token.download_proof().hash(),
    }
}

/// Upload, status, download (whole, twice), receipt, download limit, revoke.
async fn life_cycle(backend: Backend) {
    let repo = Repo::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    let size = 2 * MIB + 12_345;
    let sha = random_file(&source, size);
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let created = sender.create(&new_document(size, &token, 2)).await.unwrap();
    assert_eq!(created.parts, 3);
    let id = created.document_id;

    let before = sender.status(&id).await.unwrap();
    assert_eq!(before.state, State::Uploading);
    assert!(before.parts_held.is_empty());
    let progress = Mutex::new(Vec::new());
    let done = sender
        .upload_file(&id, &source, |n| progress.lock().unwrap().push(n))
        .await
        .unwrap();
    assert_eq!(done.state, State::Complete);
    // Completed with the per-part hashes: no whole-file hash.
    assert_eq!(done.sha256, None);
    assert_eq!(done.parts_sha256, Some(parts_sha256_file(&source)));
    assert_eq!(sha256_file(&source), sha);
    assert_eq!(progress.lock().unwrap().last(), Some(&size));
    // Idempotent: a second upload of a complete document changes nothing.
    let again = sender.upload_file(&id, &source, |_| {}).await.unwrap();
    assert_eq!(again.state, State::Complete);

    let receiver = repo.client(None);
    let proof = token.download_proof();
    for round in 0..2 {
        let out = work.path().join(format!("download{round}"));
        let got = receiver
            .download_to(&id, &proof, &out, |_| {})
            .await
            .unwrap();
        assert_eq!(got.size, size);
        // The token carries no issuer: the repository names the document's creator.
        assert_eq!(got.facility.as_deref(), Some("HOSP_A"), "round {round}");
        assert_eq!(sha256_file(&out), sha, "round {round}");
    }
    let third = receiver
        .download_to(&id, &proof, &work.path().join("third"), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(third, ClientError::NotAvailable), "{third}");
    assert!(third.is_permanent());
    assert!(!work.path().join("third").exists());

    let receipt = Receipt {
        instances_imported: 42,
        instances_refused: 1,
        note: "imported into PACS-2".into(),
        facility: Some("HOSP_B".into()),
    };
    // A receipt names the receiving facility by its code, or is refused.
    let named_badly = Receipt {
        facility: Some("../B".into()),
        ..receipt.clone()
    };
    let refused = receiver
        .receipt(&id, &proof, &named_badly)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { status: 400, .. }),
        "{refused}"
    );
    receiver.receipt(&id, &proof, &receipt).await.unwrap();
    let status = sender.status(&id).await.unwrap();
    assert_eq!(status.downloads, 2);
    assert_eq!(status.receipts.len(), 1);
    assert_eq!(status.receipts[0].receipt, receipt);

    let revoked = sender.revoke(&id).await.unwrap();
    assert_eq!(revoked.state, State::Revoked);
    assert!(revoked.parts_held.is_empty());
    let after = receiver
        .download_to(&id, &proof, &work.path().join("after"), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(after, ClientError::NotAvailable), "{after}");
    let audit = repo.audit();
    for action in [
        "create",
        "upload_part",
        "complete",
        "download",
        "receipt",
        "revoke",
    ] {
        assert!(
            audit.contains(&format!("\"action\":\"{action}\"")),
            "{action} missing from the audit trail"
        );
    }
    assert!(audit.contains("\"from\":\"127.0.0.1:"));
    assert_no_secret(&repo, &token);
    repo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn life_cycle_on_local_files() {
    life_cycle(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn life_cycle_on_s3() {
    life_cycle(Backend::S3).await;
}

/// A stored part altered after completion: `download_to` checks the repository's SHA-256
/// and refuses the bytes; with `DownloadCheck::ByCaller` (the daemon, whose container AEAD
/// authenticates every chunk as it streams) the check is the caller's, and the bytes are
/// handed over as they came, unhashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_hash_is_checked_unless_the_caller_authenticates() {
    let repo = Repo::start(Backend::Local).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    let size = 2 * MIB + 12_345;
    random_file(&source, size);
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let id = sender
        .create(&new_document(size, &token, 4))
        .await
        .unwrap()
        .document_id;
    sender.upload_file(&id, &source, |_| {}).await.unwrap();
    let part = usize::try_from(MIB).unwrap();
    let mut altered = std::fs::read(&source).unwrap()[part..2 * part].to_vec();
    altered[10] ^= 0xff;
    overwrite_part(&repo, &id, 1, &altered);

    let receiver = repo.client(None);
    let proof = token.download_proof();
    let refused = receiver
        .download_to(&id, &proof, &work.path().join("checked"), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(refused, ClientError::Integrity(_)), "{refused}");
    let out = work.path().join("by-caller");
    let got = receiver
        .download_to_named(
            &id,
            &proof,
            &out,
            DownloadCheck::ByCaller,
            |_, _| {},
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(got.size, size);
    assert_eq!(std::fs::read(&out).unwrap()[part..2 * part], altered[..]);
    repo.stop().await;
}

/// Replaces the stored bytes of part `n` of `id` behind the repository's back.
fn overwrite_part(repo: &Repo, id: &str, n: u32, bytes: &[u8]) {
    put_object(repo, &format!("documents/{id}/parts/{n:08}"), bytes);
}

/// Writes object `key` behind the repository's back.
fn put_object(repo: &Repo, key: &str, bytes: &[u8]) {
    match &repo._moto {
        Some(moto) => moto.put("pdi", key, bytes),
        None => std::fs::write(repo.dir.path().join("store").join(key), bytes).unwrap(),
    }
}

/// Deletes object `key` behind the repository's back.
fn delete_object(repo: &Repo, key: &str) {
    match &repo._moto {
        Some(moto) => moto.delete("pdi", key),
        None => std::fs::remove_file(repo.dir.path().join("store").join(key)).unwrap(),
    }
}

/// Reads object `key` behind the repository's back.
fn read_object(repo: &Repo, key: &str) -> Vec<u8> {
    match &repo._moto {
        Some(moto) => moto
            .objects("pdi")
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, bytes)| bytes)
            .unwrap_or_else(|| panic!("{key} not in moto")),
        None => std::fs::read(repo.dir.path().join("store").join(key)).unwrap(),
    }
}

/// A streamed document (created without a size): parts of 1 to part_size bytes, an odd
/// last part, a leftover part beyond the end deleted at completion; a wrong digest deletes
/// the parts; the completion trusts a part's recorded hash only while the part is the
/// object it was computed from (a part replaced after its hash was recorded is read and
/// hashed again: corrupted, the completion refuses it; rewritten with the same bytes, it
/// completes); the first completion form still works on a sized document.
async fn streamed_documents(backend: Backend) {
    let repo = Repo::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let mut streamed = new_document(1, &token, 3);
    streamed.size = None;
    let created = sender.create(&streamed).await.unwrap();
    assert_eq!((created.parts, created.part_size), (0, MIB));
    let id = created.document_id;
    let size = 2 * MIB + 12_345;
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    getrandom::fill(&mut data).unwrap();
    let parts: Vec<bytes::Bytes> = data
        .chunks(usize::try_from(MIB).unwrap())
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let hashes = part_hashes(&data, MIB);
    put_all_into(&sender, &id, &parts).await;
    // A leftover of an abandoned attempt beyond the new end.
    sender
        .put_part_bytes(&id, 3, parts[0].clone())
        .await
        .unwrap();
    let uploading = sender.status(&id).await.unwrap();
    assert_eq!(uploading.size, 0);
    assert_eq!(uploading.parts_held, vec![0, 1, 2, 3]);

    // A part larger than the part size is refused.
    let big = bytes::Bytes::from(vec![7u8; usize::try_from(MIB + 1).unwrap()]);
    let refused = sender.put_part_bytes(&id, 4, big).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { status: 413, code, .. } if code == "too_large"),
        "{refused}"
    );
    // Nor can a streamed document go past the repository's limit (64 MiB here).
    let beyond = sender
        .put_part_bytes(&id, 64, parts[2].clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&beyond, ClientError::Refused { status: 400, code, .. } if code == "invalid_part"),
        "{beyond}"
    );

    // A wrong digest: refused, every part deleted.
    let mut wrong = hashes.clone();
    wrong[1][0] ^= 1;
    let mismatch = sender.complete_parts(&id, size, &wrong).await.unwrap_err();
    assert!(matches!(mismatch, ClientError::Integrity(_)), "{mismatch}");
    assert!(sender.status(&id).await.unwrap().parts_held.is_empty());

    put_all_into(&sender, &id, &parts).await;
    sender
        .put_part_bytes(&id, 3, parts[0].clone())
        .await
        .unwrap();
    // The content of part 1 changes after its hash was recorded (a racing overwrite): its
    // identity no longer matches the record, so the completion hashes it again and
    // refuses the digest (updated deliberately: this completion used to succeed, leaving
    // the receiver's check to catch it, when the token was already issued).
    let mut corrupted = parts[1].to_vec();
    corrupted[100] ^= 0xff;
    overwrite_part(&repo, &id, 1, &corrupted);
    let caught = sender.complete_parts(&id, size, &hashes).await.unwrap_err();
    assert!(matches!(caught, ClientError::Integrity(_)), "{caught}");
    assert!(sender.status(&id).await.unwrap().parts_held.is_empty());

    // Replaced with the same bytes after its record: hashed again, it completes.
    put_all_into(&sender, &id, &parts).await;
    sender
        .put_part_bytes(&id, 3, parts[0].clone())
        .await
        .unwrap();
    overwrite_part(&repo, &id, 1, &parts[1]);
    let done = sender.complete_parts(&id, size, &hashes).await.unwrap();
    assert_eq!(done.state, State::Complete);
    assert_eq!(done.size, size);
    assert_eq!(done.parts_held, vec![0, 1, 2], "leftover part 3 deleted");
    assert_eq!(done.parts_sha256, Some(hex::encode(parts_digest(&hashes))));
    // Idempotent.
    let again = sender.complete_parts(&id, size, &hashes).await.unwrap();
    assert_eq!(again.state, State::Complete);

    let receiver = repo.client(None);
    let proof = token.download_proof();
    let out = work.path().join("download");
    let got = receiver
        .download_to(&id, &proof, &out, |_| {})
        .await
        .unwrap();
    assert_eq!(got.size, size);
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // The first form: a sized document completed with the whole SHA-256, read back.
    let sized = sender
        .create(&new_document(size, &token, 1))
        .await
        .unwrap()
        .document_id;
    put_all_into(&sender, &sized, &parts).await;
    let a = format!("Authorization: Bearer {}", repo.key_a);
    let complete = format!("{}/v1/documents/{sized}/complete", repo.url);
    let whole = format!("{{\"sha256\":\"{}\"}}", hex::encode(Sha256::digest(&data)));
    let json = "Content-Type: application/json";
    let (status, body) = curl(&["-H", &a, "-H", json, "--data-binary", &whole, &complete]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sha256"], hex::encode(Sha256::digest(&data)));
    let out = work.path().join("whole");
    receiver
        .download_to(&sized, &proof, &out, |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // The first form cannot complete a streamed document (its size is unknown).
    let open = sender.create(&streamed).await.unwrap().document_id;
    put_all_into(&sender, &open, &parts).await;
    let complete = format!("{}/v1/documents/{open}/complete", repo.url);
    assert_refused(
        curl(&["-H", &a, "-H", json, "--data-binary", &whole, &complete]),
        400,
        "invalid_request",
    );
    repo.stop().await;
}

/// Parts stored by a repository older than the identity in the hash records (no record, a
/// record of the hash alone) or with an unreadable record: the completion reads and hashes
/// those parts (only those) and rewrites their records, so `upload_file` completes with
/// the parts form (before, it was refused with 409 for ever).
async fn legacy_parts(backend: Backend) {
    let repo = Repo::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    let size = 3 * MIB + 77;
    random_file(&source, size);
    let data = std::fs::read(&source).unwrap();
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let id = sender
        .create(&new_document(size, &token, 1))
        .await
        .unwrap()
        .document_id;
    let parts: Vec<bytes::Bytes> = data
        .chunks(usize::try_from(MIB).unwrap())
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    put_all_into(&sender, &id, &parts).await;
    let hashes = part_hashes(&data, MIB);
    let record = |n: u32| format!("documents/{id}/hashes/{n:08}");
    delete_object(&repo, &record(0));
    put_object(&repo, &record(1), hex::encode(hashes[1]).as_bytes());
    put_object(&repo, &record(2), b"not a hash");
    let current = read_object(&repo, &record(3));

    let done = sender.upload_file(&id, &source, |_| {}).await.unwrap();
    assert_eq!(done.state, State::Complete);
    assert_eq!(done.sha256, None, "completed with the parts form");
    assert_eq!(done.parts_sha256, Some(parts_sha256_file(&source)));
    for n in 0..3 {
        let rewritten = String::from_utf8(read_object(&repo, &record(n))).unwrap();
        let (hash, identity) = rewritten.split_once(' ').expect("hash and identity");
        assert_eq!(hash, hex::encode(hashes[n as usize]));
        assert!(!identity.is_empty());
    }
    assert_eq!(
        read_object(&repo, &record(3)),
        current,
        "a valid record is kept"
    );
    let out = work.path().join("download");
    repo.client(None)
        .download_to(&id, &token.download_proof(), &out, |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // A record naming the part's current identity is trusted (the part is not read): one
    // with another hash makes the digest differ.
    let trusted = sender
        .create(&new_document(size, &token, 1))
        .await
        .unwrap()
        .document_id;
    put_all_into(&sender, &trusted, &parts).await;
    let key = format!("documents/{trusted}/hashes/00000000");
    let record = String::from_utf8(read_object(&repo, &key)).unwrap();
    let (_, identity) = record.split_once(' ').expect("hash and identity");
    put_object(
        &repo,
        &key,
        format!("{} {identity}", "0".repeat(64)).as_bytes(),
    );
    let refused = sender
        .complete_parts(&trusted, size, &hashes)
        .await
        .unwrap_err();
    assert!(matches!(refused, ClientError::Integrity(_)), "{refused}");
    repo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_parts_on_local_files() {
    legacy_parts(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_parts_on_s3() {
    legacy_parts(Backend::S3).await;
}

async fn put_all_into(sender: &Client, id: &str, parts: &[bytes::Bytes]) {
    for (n, part) in parts.iter().enumerate() {
        let n = u32::try_from(n).unwrap();
        sender.put_part_bytes(id, n, part.clone()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_documents_on_local_files() {
    streamed_documents(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_documents_on_s3() {
    streamed_documents(Backend::S3).await;
}

/// On local files a part goes to disk as it arrives (a temp file beside the part grows
/// while the body is still coming: the part is never held whole in memory); a body cut
/// short leaves no part, no hash and no temp file, and the part can then be sent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_cut_short_leaves_nothing_on_local_files() {
    use tokio::io::AsyncWriteExt;
    let repo = Repo::start(Backend::Local).await;
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let mut streamed = new_document(1, &token, 1);
    streamed.size = None;
    let id = sender.create(&streamed).await.unwrap().document_id;
    let folder = repo.dir.path().join(format!("store/documents/{id}"));
    let temps = || -> Vec<(PathBuf, u64)> {
        common::files_under(&folder)
            .into_iter()
            .filter(|f| f.file_name().unwrap().to_string_lossy().ends_with(".tmp"))
            .map(|f| {
                let len = std::fs::metadata(&f).map_or(0, |m| m.len());
                (f, len)
            })
            .collect()
    };
    let mut connection = tokio::net::TcpStream::connect(repo.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "PUT /v1/documents/{id}/parts/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {}\r\nContent-Length: {MIB}\r\n\r\n",
        repo.key_a
    );
    connection.write_all(head.as_bytes()).await.unwrap();
    connection.write_all(&vec![7u8; 600 << 10]).await.unwrap();
    connection.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !temps().iter().any(|(_, len)| *len >= 256 << 10) {
        assert!(
            Instant::now() < deadline,
            "no temp file holds the first 256 KiB of the body: {:?} under {}",
            temps(),
            folder.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(connection);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !temps().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the temp file stayed: {:?}",
            temps()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = common::files_under(&folder.join("parts"))
        .into_iter()
        .chain(common::files_under(&folder.join("hashes")))
        .collect::<Vec<_>>();
    assert!(left.is_empty(), "a part cut short left {left:?}");
    assert!(sender.status(&id).await.unwrap().parts_held.is_empty());
    let part = bytes::Bytes::from(vec![9u8; 1000]);
    sender.put_part_bytes(&id, 0, part.clone()).await.unwrap();
    let hashes = [Sha256::digest(&part).into()];
    let status = sender.complete_parts(&id, 1000, &hashes).await.unwrap();
    assert_eq!((status.state, status.size), (State::Complete, 1000));
    repo.stop().await;
}

/// Nothing stored by the repository (objects, metadata, audit) holds the token's secret,
/// the keys derived from it, or a facility's API key, raw or in hex.
fn assert_no_secret(repo: &Repo, token: &Token) {
    let proof = token.download_proof();
    let mut container_key = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(None, &SECRET)
        .expand(b"cloudpdi token v1 container key", &mut container_key)
        .unwrap();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("secret", SECRET.to_vec()),
        ("secret hex", hex::encode(SECRET).into_bytes()),
        ("proof", proof.bytes().to_vec()),
        ("proof hex", hex::encode(proof.bytes()).into_bytes()),
        ("container key", container_key.to_vec()),
        ("container key hex", hex::encode(container_key).into_bytes()),
        ("token text", token.to_text().as_bytes().to_vec()),
        ("API key A", repo.key_a.clone().into_bytes()),
        ("API key B", repo.key_b.clone().into_bytes()),
    ];
    let stored = repo.stored();
    assert!(stored.len() > 3, "nothing stored?");
    for (name, bytes) in &stored {
        for (what, secret) in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{what} found in {name}"
            );
        }
    }
}

/// Creates a document of `source`'s size for `token` and uploads `source` into it.
async fn upload_for(sender: &Client, token: &Token, source: &Path, max_downloads: u32) -> String {
    let size = std::fs::metadata(source).unwrap().len();
    let id = sender
        .create(&new_document(size, token, max_downloads))
        .await
        .unwrap()
        .document_id;
    sender.upload_file(&id, source, |_| {}).await.unwrap();
    id
}

/// Waits until the sweep has expired document `id` and deleted its parts (and `also`
/// holds), failing after `deadline`.
async fn until_swept(sender: &Client, id: &str, deadline: Instant, also: impl Fn() -> bool) {
    loop {
        let status = sender.status(id).await.unwrap();
        if status.state == State::Expired && status.parts_held.is_empty() && also() {
            return;
        }
        assert!(Instant::now() < deadline, "not swept: {status:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A short expiry: downloadable before, 410 after, content deleted by the sweep.
async fn expiry(backend: Backend) {
    let repo = Repo::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    let sha = random_file(&source, 1000);
    let token = token(6);
    let sender = repo.client(Some(&repo.key_a));
    let id = upload_for(&sender, &token, &source, 5).await;
    let receiver = repo.client(None);
    let proof = token.download_proof();
    let out = work.path().join("before");
    receiver
        .download_to(&id, &proof, &out, |_| {})
        .await
        .unwrap();
    assert_eq!(sha256_file(&out), sha);
    until_swept(
        &sender,
        &id,
        Instant::now() + Duration::from_secs(15),
        || true,
    )
    .await;
    let gone = receiver
        .download_to(&id, &proof, &work.path().join("after"), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(gone, ClientError::NotAvailable), "{gone}");
    let parts: Vec<_> = repo
        .stored()
        .into_iter()
        .filter(|(name, _)| name.contains("/parts/"))
        .collect();
    assert!(parts.is_empty(), "content left after expiry");
    assert!(repo.audit().contains("\"action\":\"expire\""));
    repo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_on_local_files() {
    expiry(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_on_s3() {
    expiry(Backend::S3).await;
}

/// The code and message of a refused call, or a panic naming what came instead.
fn refused(
    result: Result<cloudpdi::repository::api::DocumentStatus, ClientError>,
) -> (u16, String, String) {
    match result {
        Err(ClientError::Refused {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Extending the expiry: a later one within `max_expiry_days` is kept (status, downloads
/// and the sweep go by it, and the sweep deletes the content at the new expiry); one not
/// later, one beyond the limit (named), one beyond `MAX_EXTENSIONS` extensions, a revoked
/// or an expired document are refused; another facility's document is not found.
async fn extend(backend: Backend) {
    let repo = Repo::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    let sha = random_file(&source, 1000);
    let token = token(6);
    let sender = repo.client(Some(&repo.key_a));
    let id = upload_for(&sender, &token, &source, 5).await;
    // A second document left to expire, to be refused once it has.
    let lapsing = upload_for(&sender, &token, &source, 5).await;
    // A third one extended by a few seconds only: swept at its new expiry.
    let brief = upload_for(&sender, &token, &source, 5).await;

    let old = u64::from(token.expires_at);
    let later = old + 3600;
    let extended = sender.extend(&id, later).await.unwrap();
    assert_eq!(extended.expires_at, later);
    assert_eq!(extended.state, State::Complete);
    assert_eq!(sender.status(&id).await.unwrap().expires_at, later);
    let soon = old + 6;
    assert_eq!(sender.extend(&brief, soon).await.unwrap().expires_at, soon);

    // Past the old expiry, with sweeps every second: still there, still downloadable.
    let deadline = Instant::now() + Duration::from_secs(20);
    until_swept(&sender, &lapsing, deadline, || unix_now() > old + 1).await;
    let status = sender.status(&brief).await.unwrap();
    if unix_now() < soon - 1 {
        assert_eq!(status.state, State::Complete, "swept early: {status:?}");
        assert!(!status.parts_held.is_empty(), "swept early: {status:?}");
    }
    // ... and the one extended by seconds is swept at its new expiry, not kept for ever.
    loop {
        let status = sender.status(&brief).await.unwrap();
        if status.state == State::Expired && status.parts_held.is_empty() {
            assert!(unix_now() >= soon, "swept before its new expiry");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not swept at the new expiry: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = sender.status(&id).await.unwrap();
    assert_eq!(status.state, State::Complete, "{status:?}");
    assert!(
        !status.parts_held.is_empty(),
        "content swept at the old expiry"
    );
    let out = work.path().join("after-old-expiry");
    repo.client(None)
        .download_to(&id, &token.download_proof(), &out, |_| {})
        .await
        .unwrap();
    assert_eq!(sha256_file(&out), sha);

    for not_later in [later, later - 10, old] {
        let (status, code, message) = refused(sender.extend(&id, not_later).await);
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_expiry"),
            "{message}"
        );
        assert!(message.contains("can only be extended"), "{message}");
    }
    // At most MAX_EXTENSIONS extensions per document (one done above).
    for step in 1..u64::from(MAX_EXTENSIONS) {
        sender.extend(&id, later + step).await.unwrap();
    }
    let (status, code, message) =
        refused(sender.extend(&id, later + u64::from(MAX_EXTENSIONS)).await);
    assert_eq!(
        (status, code.as_str()),
        (409, "too_many_extensions"),
        "{message}"
    );
    assert!(
        message.contains(&format!("({MAX_EXTENSIONS})"))
            && message.contains("send the study again"),
        "{message}"
    );
    let later = later + u64::from(MAX_EXTENSIONS) - 1;
    assert_eq!(sender.status(&id).await.unwrap().expires_at, later);
    let beyond = unix_now() + 181 * 86_400;
    let (status, code, message) = refused(sender.extend(&id, beyond).await);
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_expiry"),
        "{message}"
    );
    assert!(
        message.contains("180 days") && message.contains("server.max_expiry_days"),
        "{message}"
    );
    let other = repo.client(Some(&repo.key_b));
    let (status, code, _) = refused(other.extend(&id, later + 60).await);
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code, message) = refused(sender.extend(&lapsing, later).await);
    assert_eq!((status, code.as_str()), (410, "gone"), "{message}");
    assert!(message.contains("expired"), "{message}");
    sender.revoke(&id).await.unwrap();
    let (status, code, message) = refused(sender.extend(&id, later + 60).await);
    assert_eq!((status, code.as_str()), (410, "gone"), "{message}");
    assert!(message.contains("revoked"), "{message}");
    assert_eq!(sender.status(&id).await.unwrap().expires_at, later);

    let audit = repo.audit();
    let extends: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"action\":\"extend\""))
        .collect();
    assert!(
        extends
            .iter()
            .any(|l| l.contains("\"outcome\":\"ok\"") && l.contains(&format!("was {old}"))),
        "{audit}"
    );
    assert!(
        extends.iter().any(|l| l.contains("\"outcome\":\"gone\"")),
        "{audit}"
    );
    let metrics = Command::new(common::require("/usr/bin/curl"))
        .args(["-s", &format!("{}/metrics", repo.url)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(&format!(
            "\ncloudpdi_repository_extended_total {}\n",
            MAX_EXTENSIONS + 1
        )),
        "{metrics}"
    );
    assert_no_secret(&repo, &token);
    repo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_on_local_files() {
    extend(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_on_s3() {
    extend(Backend::S3).await;
}

/// curl's answer: (status, JSON body).
fn curl(args: &[&str]) -> (u16, serde_json::Value) {
    let out = Command::new(common::require("/usr/bin/curl"))
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    (code.parse().unwrap(), json)
}

fn assert_refused(answer: (u16, serde_json::Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"], code, "{}", answer.1);
    assert!(
        answer.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        answer.1
    );
}

/// Every kind of wrong request is refused with a JSON error, and none stores anything.
async fn refusals(backend: Backend) {
    let repo = Repo::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    random_file(&source, 3000);
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let id = sender
        .create(&new_document(3000, &token, 1))
        .await
        .unwrap()
        .document_id;
    sender.upload_file(&id, &source, |_| {}).await.unwrap();
    let stored_before = repo.stored();
    let content = format!("{}/v1/documents/{id}/content", repo.url);
    let proof_header = |p: &str| format!("x-download-proof: {p}");
    let wrong = hex::encode([7u8; 32]);
    let bearer = |k: &str| format!("Authorization: Bearer {k}");

    assert_refused(
        curl(&["-H", &proof_header(&wrong), &content]),
        410,
        "not_available",
    );
    assert_refused(curl(&[&content]), 401, "proof_required");
    assert_refused(
        curl(&["-H", &proof_header("zz"), &content]),
        400,
        "invalid_proof",
    );
    let unknown = format!(
        "{}/v1/documents/{}/content",
        repo.url,
        "0".repeat(cloudpdi::repository::DOCUMENT_ID_LEN)
    );
    let right = hex::encode(token.download_proof().bytes());
    assert_refused(
        curl(&["-H", &proof_header(&right), &unknown]),
        410,
        "not_available",
    );
    for trick in [
        "..%2f..%2fstore",
        "%2e%2e",
        "..",
        &format!("{id}%2f..%2f{id}"),
        &format!("{id}%00"),
    ] {
        let url = format!("{}/v1/documents/{trick}/content", repo.url);
        let answer = curl(&["--path-as-is", "-H", &proof_header(&right), &url]);
        assert!(
            [400, 404].contains(&answer.0) && answer.1["error"].is_string(),
            "{trick}: {answer:?}"
        );
    }
    let status_url = format!("{}/v1/documents/{id}", repo.url);
    assert_refused(curl(&[&status_url]), 401, "unauthorized");
    assert_refused(
        curl(&["-H", &bearer("cpdi_forged"), &status_url]),
        401,
        "unauthorized",
    );
    assert_refused(
        curl(&["-H", &bearer(&repo.key_b), &status_url]),
        404,
        "not_found",
    );
    assert_refused(
        curl(&["-X", "DELETE", "-H", &bearer(&repo.key_b), &status_url]),
        404,
        "not_found",
    );
    let create_url = format!("{}/v1/documents", repo.url);
    let huge = serde_json::json!({
        "size": 1u64 << 60,
        "expires_at": token.expires_at,
        "max_downloads": 1,
        "proof_hash": hex::encode(token.download_proof().hash()),
    })
    .to_string();
    let json = "Content-Type: application/json";
    let a = bearer(&repo.key_a);
    assert_refused(
        curl(&["-H", &a, "-H", json, "--data-binary", &huge, &create_url]),
        413,
        "too_large",
    );
    let past = huge
        .replace(&(1u64 << 60).to_string(), "10")
        .replace(&token.expires_at.to_string(), "1000");
    assert_refused(
        curl(&["-H", &a, "-H", json, "--data-binary", &past, &create_url]),
        400,
        "invalid_expiry",
    );
    let big_json = format!("{{\"pad\":\"{}\"}}", "x".repeat(20_000));
    assert_refused(
        curl(&[
            "-H",
            &a,
            "-H",
            json,
            "--data-binary",
            &big_json,
            &create_url,
        ]),
        413,
        "too_large",
    );

    // A second document, still uploading: parts that do not fit are refused.
    let open = sender
        .create(&new_document(1000, &token, 1))
        .await
        .unwrap()
        .document_id;
    let stored_before = [stored_before, repo.stored()].concat();
    let part = |n: &str| format!("{}/v1/documents/{open}/parts/{n}", repo.url);
    let body_1001 = work.path().join("1001");
    std::fs::write(&body_1001, vec![1u8; 1001]).unwrap();
    let upload = format!("@{}", body_1001.display());
    assert_refused(
        curl(&["-X", "PUT", "-H", &a, "--data-binary", &upload, &part("0")]),
        413,
        "too_large",
    );
    assert_refused(
        curl(&[
            "-X",
            "PUT",
            "-H",
            &a,
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &upload,
            &part("0"),
        ]),
        411,
        "length_required",
    );
    assert_refused(
        curl(&["-X", "PUT", "-H", &a, "--data-binary", &upload, &part("1")]),
        400,
        "invalid_part",
    );
    assert_refused(
        curl(&[
            "-X",
            "PUT",
            "-H",
            &bearer(&repo.key_b),
            "--data-binary",
            &upload,
            &part("0"),
        ]),
        404,
        "not_found",
    );
    let complete = format!("{}/v1/documents/{open}/complete", repo.url);
    let zero_hash = format!("{{\"sha256\":\"{}\"}}", "0".repeat(64));
    assert_refused(
        curl(&["-H", &a, "-H", json, "--data-binary", &zero_hash, &complete]),
        409,
        "incomplete",
    );
    let open_content = format!("{}/v1/documents/{open}/content", repo.url);
    assert_refused(
        curl(&["-H", &proof_header(&right), &open_content]),
        410,
        "not_available",
    );
    let after: Vec<_> = repo
        .stored()
        .into_iter()
        .filter(|(name, _)| name != "audit")
        .collect();
    let before: Vec<_> = stored_before
        .into_iter()
        .filter(|(name, _)| name != "audit")
        .collect();
    for object in &after {
        assert!(before.contains(object), "{} was stored", object.0);
    }
    assert!(repo.audit().contains("\"outcome\":\"not_available\""));
    assert_no_secret(&repo, &token);
    repo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_on_local_files() {
    refusals(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_on_s3() {
    refusals(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_proofs_are_rate_limited() {
    let repo = Repo::start_with(Backend::Local, |c| c.server.failed_proofs_per_window = 3).await;
    let url = format!(
        "{}/v1/documents/{}/content",
        repo.url,
        "1".repeat(cloudpdi::repository::DOCUMENT_ID_LEN)
    );
    let header = format!("x-download-proof: {}", "2".repeat(64));
    for _ in 0..3 {
        assert_refused(curl(&["-H", &header, &url]), 410, "not_available");
    }
    assert_refused(curl(&["-H", &header, &url]), 429, "rate_limited");
    let metrics = Command::new("/usr/bin/curl")
        .args(["-s", &format!("{}/metrics", repo.url)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("cloudpdi_repository_rate_limited_total 1\n"),
        "{metrics}"
    );
    repo.stop().await;
}

/// Refusals are audited and counted where authentication happens, once each: a
/// facility's refusal is a line naming it, refusals without credentials are aggregated
/// (the first per client and reason is a line), and `/metrics` names every counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_audited_and_counted_once() {
    let repo = Repo::start(Backend::Local).await;
    let token = token(3600);
    let id = repo
        .client(Some(&repo.key_a))
        .create(&new_document(10, &token, 1))
        .await
        .unwrap()
        .document_id;
    let status_url = format!("{}/v1/documents/{id}", repo.url);
    let bearer_b = format!("Authorization: Bearer {}", repo.key_b);
    let content = format!("{status_url}/content");
    let wrong = format!("x-download-proof: {}", hex::encode([7u8; 32]));
    assert_refused(curl(&[&status_url]), 401, "unauthorized");
    assert_refused(curl(&["-H", &bearer_b, &status_url]), 404, "not_found");
    for _ in 0..2 {
        assert_refused(curl(&["-H", &wrong, &content]), 410, "not_available");
    }
    let audit = repo.audit();
    let lines = |outcome: &str| {
        audit
            .lines()
            .filter(|l| l.contains(&format!("\"outcome\":\"{outcome}\"")))
            .collect::<Vec<_>>()
    };
    let unauthorized = lines("unauthorized");
    assert_eq!(unauthorized.len(), 1, "{audit}");
    assert!(
        unauthorized[0].contains("\"kind\":\"anonymous\""),
        "{audit}"
    );
    assert!(unauthorized[0].contains("\"action\":\"status\""), "{audit}");
    let not_found = lines("not_found");
    assert_eq!(not_found.len(), 1, "{audit}");
    assert!(
        not_found[0].contains("\"kind\":\"facility\",\"name\":\"HOSP_B\""),
        "{audit}"
    );
    let not_available = lines("not_available");
    assert_eq!(not_available.len(), 1, "the second is aggregated: {audit}");
    assert!(
        not_available[0].contains("\"kind\":\"receiver\""),
        "{audit}"
    );
    assert!(not_available[0].contains(&id), "{audit}");

    let metrics = Command::new(common::require("/usr/bin/curl"))
        .args(["-s", &format!("{}/metrics", repo.url)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for (name, value) in [
        ("documents_created", 1),
        ("parts_stored", 0),
        ("uploaded_bytes", 0),
        ("documents_completed", 0),
        ("hash_mismatches", 0),
        ("downloads", 0),
        ("downloaded_bytes", 0),
        ("receipts", 0),
        ("revoked", 0),
        ("expired", 0),
        ("purged", 0),
        ("proof_failures", 2),
        ("rate_limited", 0),
        ("unauthorized", 1),
    ] {
        let name = format!("cloudpdi_repository_{name}_total");
        assert!(
            metrics.contains(&format!("# TYPE {name} counter\n")),
            "{name}: {metrics}"
        );
        assert!(
            metrics.contains(&format!("\n{name} {value}\n")),
            "{name}: {metrics}"
        );
    }
    repo.stop().await;
}

/// A document of `size` random bytes, uploaded by facility A: (ID, token, bytes).
async fn uploaded(repo: &Repo, size: u64, max_downloads: u32) -> (String, Token, Vec<u8>) {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("container");
    random_file(&source, size);
    let token = token(3600);
    let sender = repo.client(Some(&repo.key_a));
    let id = sender
        .create(&new_document(size, &token, max_downloads))
        .await
        .unwrap()
        .document_id;
    sender.upload_file(&id, &source, |_| {}).await.unwrap();
    (id, token, std::fs::read(&source).unwrap())
}

/// A download with curl, optionally of a range: (HTTP status, headers, body).
fn fetch(url: &str, token: &Token, range: Option<&str>) -> (u16, String, Vec<u8>) {
    let work = tempfile::tempdir().unwrap();
    let (body, headers) = (work.path().join("body"), work.path().join("headers"));
    let proof = format!(
        "x-download-proof: {}",
        hex::encode(token.download_proof().bytes())
    );
    let mut command = Command::new(common::require("/usr/bin/curl"));
    command.args(["-s", "-w", "%{http_code}", "-H", &proof, "-o"]);
    command.arg(&body).arg("-D").arg(&headers);
    if let Some(range) = range {
        command.args(["-r", range]);
    }
    let out = command.arg(url).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    (
        status,
        std::fs::read_to_string(headers).unwrap_or_default(),
        std::fs::read(body).unwrap_or_default(),
    )
}

/// Resuming a download (a range not starting at byte 0) is allowed a limited number of
/// times within a window after the download began; any other range request counts as a
/// new download, served from byte 0; once the downloads are used up nothing is served,
/// whatever the range. A range outside the document answers 416 and uses no download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_downloads_are_bounded() {
    let repo = Repo::start_with(Backend::Local, |c| {
        c.server.max_resumes_per_download = 2;
        c.server.download_resume_window = 600;
    })
    .await;
    let (id, token, data) = uploaded(&repo, 3000, 2).await;
    let url = format!("{}/v1/documents/{id}/content", repo.url);
    let sender = repo.client(Some(&repo.key_a));
    let downloads = || async { sender.status(&id).await.unwrap().downloads };

    let (status, headers, _) = fetch(&url, &token, Some("5000-"));
    assert_eq!(status, 416);
    assert!(
        headers
            .to_lowercase()
            .contains("content-range: bytes */3000"),
        "{headers}"
    );
    assert_eq!(downloads().await, 0, "a 416 must not use a download");

    // No download has begun: a range is a new download, from byte 0.
    let (status, _, body) = fetch(&url, &token, Some("1000-"));
    assert_eq!((status, body.as_slice()), (200, data.as_slice()));
    assert_eq!(downloads().await, 1);
    for range in ["1000-", "2000-2099"] {
        let (status, headers, body) = fetch(&url, &token, Some(range));
        assert_eq!(status, 206, "{range}");
        let (start, end) = range.split_once('-').unwrap();
        let start: usize = start.parse().unwrap();
        let end = end.parse::<usize>().map_or(data.len(), |e| e + 1);
        assert_eq!(body, data[start..end], "{range}");
        let content_range = format!("content-range: bytes {start}-{}/3000", end - 1);
        assert!(headers.to_lowercase().contains(&content_range), "{headers}");
    }
    assert_eq!(downloads().await, 1, "resumes are not new downloads");
    // Resumes used up: the next range starts the second (last) download.
    let (status, _, body) = fetch(&url, &token, Some("1000-"));
    assert_eq!((status, body.as_slice()), (200, data.as_slice()));
    assert_eq!(downloads().await, 2);
    let (status, _, body) = fetch(&url, &token, Some("500-"));
    assert_eq!((status, body.as_slice()), (206, &data[500..]));
    // The second download began more than the window ago (its slot record says so):
    // no resume, and no download is left, so nothing more, by any range.
    let slot = repo
        .dir
        .path()
        .join(format!("store/documents/{id}/downloads/00000001"));
    let began: serde_json::Value = serde_json::from_slice(&std::fs::read(&slot).unwrap()).unwrap();
    let long_ago = began["at"].as_u64().unwrap() - 601;
    std::fs::write(&slot, format!("{{\"at\":{long_ago}}}")).unwrap();
    for range in [Some("500-"), Some("1-"), None] {
        let (status, _, body) = fetch(&url, &token, range);
        assert_eq!(status, 410, "{range:?}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(downloads().await, 2);
    assert!(repo.audit().contains("resumed"));
    repo.stop().await;
}

/// Two servers on one storage (behind a load balancer) and many receivers racing for a
/// document's only download: exactly one gets it.
async fn servers_race_for_the_last_download(backend: Backend) {
    let first = Repo::start(backend).await;
    let second = first.beside().await;
    let (id, token, data) = uploaded(&first, 3000, 1).await;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let server = if i % 2 == 0 { &first } else { &second };
            let url = format!("{}/v1/documents/{id}/content", server.url);
            let token = token.clone();
            std::thread::spawn(move || fetch(&url, &token, None))
        })
        .collect();
    let answers: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let served: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    assert_eq!(
        served.len(),
        1,
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert_eq!(served[0].2, data);
    assert!(answers.iter().all(|a| a.0 == 200 || a.0 == 410));
    let status = first.client(Some(&first.key_a)).status(&id).await.unwrap();
    assert_eq!(status.downloads, 1);
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_race_for_the_last_download_on_local_files() {
    servers_race_for_the_last_download(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_race_for_the_last_download_on_s3() {
    servers_race_for_the_last_download(Backend::S3).await;
}

/// A client that never finishes its headers is cut off after `header_timeout`; while it
/// holds the only connection slot, the next client waits, and is served once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_cut_off() {
    use std::io::{Read, Write};
    let repo = Repo::start_with(Backend::Local, |c| {
        c.server.header_timeout = 1;
        c.server.max_connections = 1;
    })
    .await;
    let healthz = format!("{}/healthz", repo.url);
    let opened = Instant::now();
    let mut silent = std::net::TcpStream::connect(repo.url.trim_start_matches("http://")).unwrap();
    silent
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let waiting = {
        let healthz = healthz.clone();
        std::thread::spawn(move || {
            let out = Command::new("/usr/bin/curl")
                .args(["-s", "--max-time", "10", &healthz])
                .output()
                .unwrap();
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                Instant::now(),
            )
        })
    };
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (closed, cut_after) = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        let closed = silent.read_to_end(&mut rest).map(drop);
        (closed, opened.elapsed())
    })
    .await
    .unwrap();
    assert!(
        closed.is_ok(),
        "the server did not close the connection: {closed:?}"
    );
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(5),
        "cut off after {cut_after:?}"
    );
    let (answer, served_at) = waiting.join().unwrap();
    assert_eq!(answer, "ok\n");
    assert!(
        served_at.duration_since(opened) >= Duration::from_millis(900),
        "the second client was served while the only slot was taken"
    );
    repo.stop().await;
}

/// The real binary, restarted on the same port and storage.
struct Process {
    config: PathBuf,
    child: Option<Child>,
}

impl Process {
    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
            .args(["repository", "serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("/usr/bin/curl")
            .args(["-s", &format!("{url}/healthz")])
            .output()
            .unwrap();
        if out.stdout == b"ok\n" {
            return;
        }
        assert!(Instant::now() < deadline, "repository did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kill -9` of the server in the middle of an upload and of a download: the client
/// resumes against the restarted server and the bytes are identical.
async fn server_killed_mid_transfer(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (key_a, hash_a) = cloudpdi::repository::auth::new_api_key().unwrap();
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("repository.toml");
    let moto = (backend == Backend::S3).then(|| Moto::start("pdi"));
    let storage = match &moto {
        Some(moto) => format!(
            "backend = \"s3\"\nbucket = \"pdi\"\nendpoint = \"{}\"\nallow_http = true\n\
             access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
            moto.endpoint
        ),
        None => format!("path = \"{}\"\n", dir.path().join("store").display()),
    };
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npart_size_mb = 1\n\
             [storage]\n{storage}[audit]\npath = \"{}\"\n\
             [facility.HOSP_A]\napi_key_sha256 = \"{hash_a}\"\n",
            dir.path().join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let server = Mutex::new(Process {
        config,
        child: None,
    });
    server.lock().unwrap().spawn();
    wait_healthy(&url);

    let source = dir.path().join("container");
    let size = 24 * MIB + 7;
    let sha = random_file(&source, size);
    let token = token(3600);
    let sender = Client::new(&url, Some(key_a.to_string()), fast_options()).unwrap();
    let id = sender
        .create(&new_document(size, &token, 2))
        .await
        .unwrap()
        .document_id;

    // Kill and restart once a fifth of the bytes went through.
    let restart_at = |threshold: u64| {
        let server = &server;
        let done = Mutex::new(false);
        move |n: u64| {
            let mut done = done.lock().unwrap();
            if n >= threshold && n < size && !*done {
                *done = true;
                let mut server = server.lock().unwrap();
                server.kill9();
                server.spawn();
            }
        }
    };
    let uploaded = sender
        .upload_file(&id, &source, restart_at(size / 5))
        .await
        .unwrap();
    assert_eq!(uploaded.state, State::Complete);
    assert_eq!(uploaded.parts_sha256, Some(parts_sha256_file(&source)));
    assert_eq!(sha256_file(&source), sha);

    let out = dir.path().join("download.partial");
    let receiver = Client::new(&url, None, fast_options()).unwrap();
    let proof = token.download_proof();
    let got = receiver
        .download_to(&id, &proof, &out, restart_at(size / 5))
        .await
        .unwrap();
    assert_eq!(got.size, size);
    assert_eq!(sha256_file(&out), sha, "downloaded bytes differ");
    // The resumed download counted once.
    assert_eq!(sender.status(&id).await.unwrap().downloads, 1);
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let ranged = audit
        .lines()
        .filter(|l| l.contains("\"action\":\"download\"") && !l.contains("bytes 0-"))
        .count();
    assert!(
        ranged >= 1,
        "the download did not resume with a range:\n{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_transfer_on_local_files() {
    server_killed_mid_transfer(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_transfer_on_s3() {
    server_killed_mid_transfer(Backend::S3).await;
}

/// The gateway's embedded mode: a whole repository in-process under a data folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_repository_serves_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    let (api_key, hash) = cloudpdi::repository::auth::new_api_key().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let embedded = cloudpdi::repository::server::start_embedded(
        dir.path(),
        listener,
        &hash,
        "HOSPA",
        async move {
            shutdown.cancelled().await;
        },
    )
    .await
    .unwrap();
    let source = dir.path().join("container");
    let sha = random_file(&source, 5000);
    let token = token(600);
    let client = Client::new(
        &embedded.base_url,
        Some(api_key.to_string()),
        fast_options(),
    )
    .unwrap();
    let id = client
        .create(&new_document(5000, &token, 1))
        .await
        .unwrap()
        .document_id;
    client.upload_file(&id, &source, |_| {}).await.unwrap();
    let out = dir.path().join("out");
    let got = client
        .download_to(&id, &token.download_proof(), &out, |_| {})
        .await
        .unwrap();
    assert_eq!(sha256_file(&out), sha);
    assert_eq!(got.facility.as_deref(), Some("HOSPA"), "the gateway's code");
    assert!(dir.path().join("repository/audit.jsonl").exists());
    stop.cancel();
    embedded.task.await.unwrap().unwrap();
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with openssl.
fn make_certificates(dir: &Path) {
    let openssl = common::require("/usr/bin/openssl");
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .env("OPENSSL", openssl)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "$OPENSSL req -x509 {ec} -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca\n\
         printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext\n\
         $OPENSSL req {ec} -keyout server.key -out server.csr -subj /CN=127.0.0.1\n\
         $OPENSSL x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
           -out server.crt -days 2 -extfile server.ext\n\
         printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n\
         $OPENSSL req {ec} -keyout client.key -out client.csr -subj /CN=HOSP_A\n\
         $OPENSSL x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
           -out client.crt -days 2 -extfile client.ext\n\
         $OPENSSL x509 -in client.crt -outform DER -out client.der"
    ));
}

/// TLS with rustls: a facility authenticated by its client certificate, another by key,
/// and curl as a TLS peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let (mut config, _, key_b) = config(
        d,
        StorageConfig {
            path: d.join("store"),
            ..StorageConfig::default()
        },
    );
    config.tls.cert = Some(d.join("server.crt"));
    config.tls.key = Some(d.join("server.key"));
    config.tls.client_ca = Some(d.join("ca.crt"));
    let fingerprint = hex::encode(Sha256::digest(std::fs::read(d.join("client.der")).unwrap()));
    config.facility.insert(
        "HOSP_A".into(),
        FacilityConfig {
            api_key_sha256: String::new(),
            client_cert_sha256: fingerprint,
            ..FacilityConfig::default()
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    let task = tokio::spawn(cloudpdi::repository::server::run(
        config,
        listener,
        async move { shutdown.cancelled().await },
    ));

    let ca = std::fs::read(d.join("ca.crt")).unwrap();
    let identity = [
        std::fs::read(d.join("client.key")).unwrap(),
        std::fs::read(d.join("client.crt")).unwrap(),
    ]
    .concat();
    let with_cert = Client::new(
        &url,
        None,
        ClientOptions {
            ca_certificate_pem: Some(ca.clone()),
            identity_pem: Some(identity.into()),
            ..fast_options()
        },
    )
    .unwrap();
    let source = d.join("container");
    let sha = random_file(&source, 70_000);
    let token = token(600);
    let id = with_cert
        .create(&new_document(70_000, &token, 1))
        .await
        .unwrap()
        .document_id;
    let done = with_cert.upload_file(&id, &source, |_| {}).await.unwrap();
    assert_eq!(done.parts_sha256, Some(parts_sha256_file(&source)));
    assert_eq!(sha256_file(&source), sha);
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"kind\":\"facility\",\"name\":\"HOSP_A\""));

    let other = Client::new(
        &url,
        Some(key_b),
        ClientOptions {
            ca_certificate_pem: Some(ca.clone()),
            ..fast_options()
        },
    )
    .unwrap();
    let err = other.status(&id).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status: 404, .. }),
        "{err}"
    );
    let anonymous = Client::new(
        &url,
        None,
        ClientOptions {
            ca_certificate_pem: Some(ca),
            ..fast_options()
        },
    )
    .unwrap();
    let err = anonymous.status(&id).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status: 401, .. }),
        "{err}"
    );
    let out = d.join("out");
    anonymous
        .download_to(&id, &token.download_proof(), &out, |_| {})
        .await
        .unwrap();
    assert_eq!(sha256_file(&out), sha);

    let cacert = d.join("ca.crt").display().to_string();
    let health = Command::new("/usr/bin/curl")
        .args(["-s", "--cacert", &cacert, &format!("{url}/healthz")])
        .output()
        .unwrap();
    assert_eq!(health.stdout, b"ok\n");
    let plain = Command::new("/usr/bin/curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(url.replace("https://", "http://") + "/healthz")
        .output()
        .unwrap();
    assert_eq!(plain.stdout, b"000", "plain HTTP must not be answered");
    stop.cancel();
    task.await.unwrap().unwrap();
}
