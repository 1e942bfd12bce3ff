//! Hostile peers against the listeners (issue 12, items 6, 7, 8, 9 and 15): one host
//! trying to take every DICOM or HTTP slot, a guesser behind the same proxy as honest
//! receivers, a flood of unauthenticated requests against the audit trail, a DNS
//! rebinding page against the admin endpoint, and a receiver inventing receipts. Each
//! test attacks the real server (the `cloudpdi serve` binary or the repository server on
//! 127.0.0.1:0) from raw sockets, DCMTK, pynetdicom or curl, and checks that honest
//! clients are still served promptly.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloudpdi::repository::api::NewDocument;
use cloudpdi::repository::client::{Client, ClientOptions};
use cloudpdi::repository::config::{
    AuditConfig, FacilityConfig, RepositoryConfig, ServerConfig, StorageConfig,
};
use cloudpdi::token::{RepositoryRef, Token};
use common::{Daemon, require, root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const SECRET: [u8; 16] = *b"\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x01";

/// A-ASSOCIATE-RJ: rejected-transient, service provider (presentation), local limit exceeded.
const LOCAL_LIMIT_EXCEEDED: [u8; 10] = [0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02];

/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all ours on
/// Linux), so that one test can be several hosts.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

fn echoscu(daemon: &Daemon, calling: &str, called: &str) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = Command::new(require("/usr/bin/echoscu"))
        .args(["-aet", calling, "-aec", called, "-to", "20", "-ta", "20"])
        .args(["127.0.0.1", &daemon.dicom.port().to_string()])
        .output()
        .unwrap();
    (out, started.elapsed())
}

/// One host opens associations and keeps them alive with C-ECHO: it gets at most
/// `max_associations_per_peer`, further connections from it are rejected at once with a
/// transient "local limit exceeded" (logged once), the PACS named in `allowed_callers`
/// still gets in through the reserve while the general slots are full, an unlisted caller
/// waits `association_timeout` and is rejected politely, and the keep-alive associations
/// are aborted after `store_idle_timeout` without a C-STORE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_take_every_dicom_slot() {
    let dir = tempfile::tempdir().unwrap();
    let routes = "[route.ct]\nae_title = \"CLOUDPDI\"\nallowed_callers = [\"PACS\"]\n\
                  stable_after = 2\n[route.open]\nae_title = \"OPEN\"\nstable_after = 2\n";
    let daemon = Daemon::start_tuned(
        dir.path(),
        routes,
        "max_associations = 3\nreserved_associations = 1\nmax_associations_per_peer = 3\n\
         association_timeout = 4\nstore_idle_timeout = 15",
    );
    let mut flood = Command::new("python3")
        .arg(root().join("tests/peers/flood.py"))
        .args(["127.0.0.2", "127.0.0.1", &daemon.dicom.port().to_string()])
        .args(["OPEN", "EVIL", "3", "40"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(flood.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let established = Instant::now();
    assert_eq!(first, "{\"established\": 3}", "{}", daemon.log());

    for attempt in 0..4 {
        let mut extra = connect_from([127, 0, 0, 2], daemon.dicom).await.unwrap();
        let mut answer = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(3), extra.read_exact(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("connection {attempt} over the limit got no answer"))
            .unwrap();
        assert_eq!(answer, LOCAL_LIMIT_EXCEEDED, "connection {attempt}");
    }

    let (pacs, pacs_took) = echoscu(&daemon, "PACS", "CLOUDPDI");
    assert!(pacs.status.success(), "{pacs:?}\n{}", daemon.log());
    assert!(
        pacs_took < Duration::from_secs(3),
        "the PACS waited {pacs_took:?} for the reserved slot"
    );

    let (other, other_took) = echoscu(&daemon, "OTHER", "OPEN");
    let said = String::from_utf8_lossy(&other.stderr).to_lowercase()
        + &String::from_utf8_lossy(&other.stdout).to_lowercase();
    assert!(!other.status.success(), "{said}");
    assert!(said.contains("local limit exceeded"), "{said}");
    assert!(
        other_took >= Duration::from_secs(3),
        "rejected after {other_took:?}, before association_timeout"
    );
    assert!(
        established.elapsed() < Duration::from_secs(14),
        "the checks above must run while the flood holds its slots"
    );

    let second = lines.next().unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_str(&second).unwrap();
    let aborted = report["aborted"].as_array().unwrap();
    assert_eq!(aborted.len(), 3);
    for after in aborted {
        let after = after
            .as_f64()
            .unwrap_or_else(|| panic!("an echo-only association was never aborted: {second}"));
        assert!((13.0..25.0).contains(&after), "aborted after {after} s");
    }
    assert!(flood.wait().unwrap().success());
    let log = daemon.log();
    assert_eq!(
        log.matches("dicom.max_associations_per_peer").count(),
        1,
        "one log line for the refused connections of one peer:\n{log}"
    );
    assert!(log.contains("dicom.store_idle_timeout"), "{log}");
}

/// A repository server on 127.0.0.1:0, in this process.
struct Repo {
    addr: SocketAddr,
    url: String,
    key: String,
    dir: tempfile::TempDir,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cloudpdi::repository::server::ServerError>>,
}

impl Repo {
    async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let (key, hash) = cloudpdi::repository::auth::new_api_key().unwrap();
        let mut server = ServerConfig {
            part_size_mb: 1,
            max_document_mb: 16,
            ..ServerConfig::default()
        };
        tweak(&mut server);
        let config = RepositoryConfig {
            server,
            storage: StorageConfig {
                path: dir.path().join("store"),
                ..StorageConfig::default()
            },
            audit: AuditConfig {
                path: dir.path().join("audit.jsonl"),
            },
            facility: [(
                "HOSP_A".to_owned(),
                FacilityConfig {
                    api_key_sha256: hash,
                    client_cert_sha256: String::new(),
                    ..FacilityConfig::default()
                },
            )]
            .into(),
            ..RepositoryConfig::default()
        };
        config.validate().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let task = tokio::spawn(cloudpdi::repository::server::run(
            config,
            listener,
            async move { shutdown.cancelled().await },
        ));
        Repo {
            addr,
            url: format!("http://{addr}"),
            key: key.to_string(),
            dir,
            stop,
            task,
        }
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }

    /// A complete document of 1000 random bytes: (ID, token).
    async fn uploaded(&self, max_downloads: u32) -> (String, Token) {
        let expires = u32::try_from(unix_now() + 3600).unwrap();
        let url = RepositoryRef::Url("http://127.0.0.1".into());
        let token = Token::with_secret(url, "00000000000000000000", expires, SECRET).unwrap();
        let source = self.dir.path().join("container");
        let mut data = vec![0u8; 1000];
        getrandom::fill(&mut data).unwrap();
        std::fs::write(&source, &data).unwrap();
        let sender =
            Client::new(&self.url, Some(self.key.clone()), ClientOptions::default()).unwrap();
        let id = sender
            .create(&NewDocument {
                size: Some(1000),
                expires_at: u64::from(token.expires_at),
                max_downloads,
                proof_hash: token.download_proof().hash(),
            })
            .await
            .unwrap()
            .document_id;
        sender.upload_file(&id, &source, |_| {}).await.unwrap();
        (id, token)
    }

    async fn stop(self) -> String {
        self.stop.cancel();
        let audit = self.dir.path().join("audit.jsonl");
        self.task.await.unwrap().unwrap();
        std::fs::read_to_string(audit).unwrap()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// curl with `args`: (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new(require("/usr/bin/curl"))
        .args(["-s", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn proof_header(token: &Token) -> String {
    format!(
        "x-download-proof: {}",
        hex::encode(token.download_proof().bytes())
    )
}

/// 600 connections from one host that send half a request and wait: the host gets at
/// most `max_connections_per_address` of the 512 slots, so a request from another host
/// is answered at once (before, it waited for the header timeout, ~30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_requests_from_one_host_do_not_delay_others() {
    let repo = Repo::start(|_| {}).await;
    let mut held = Vec::new();
    for _ in 0..600 {
        let Ok(mut stream) = connect_from([127, 0, 0, 2], repo.addr).await else {
            continue;
        };
        let _ = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await;
        held.push(stream);
    }
    let healthz = format!("{}/healthz", repo.url);
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || curl(&[&healthz]))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(answer, (200, "ok\n".to_owned()));
    assert!(
        took < Duration::from_secs(15),
        "a healthy request waited {took:?} behind one host's half-open requests"
    );
    drop(held);
    repo.stop().await;
}

/// Behind a trusted proxy, a guesser locks out only itself for that document: another
/// client behind the same proxy downloads with the right proof. From a peer that is not
/// a trusted proxy, `X-Forwarded-For` changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guesser_behind_a_proxy_locks_out_only_itself() {
    let repo = Repo::start(|s| {
        s.failed_proofs_per_window = 3;
        s.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let (id, token) = repo.uploaded(5).await;
    let url = format!("{}/v1/documents/{id}/content", repo.url);
    let wrong = format!("x-download-proof: {}", "2".repeat(64));
    let right = proof_header(&token);
    let (attacker, honest) = (
        "X-Forwarded-For: 203.0.113.9",
        "X-Forwarded-For: 10.9.9.9, 198.51.100.7",
    );
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(curl(&["-H", attacker, "-H", &wrong, &url]).0);
        }
        answers.push(curl(&["-H", honest, "-H", &right, &url]).0);
        answers.push(curl(&["-H", attacker, "-H", &right, &url]).0);
        // Not a trusted proxy: the header is ignored, the peer address counts.
        let untrusted = ["--interface", "127.0.0.2"];
        for _ in 0..3 {
            answers.push(curl(&[untrusted[0], untrusted[1], "-H", &wrong, &url]).0);
        }
        let spoofed = "X-Forwarded-For: 192.0.2.1";
        answers.push(
            curl(&[
                untrusted[0],
                untrusted[1],
                "-H",
                spoofed,
                "-H",
                &right,
                &url,
            ])
            .0,
        );
        answers
    })
    .await
    .unwrap();
    assert_eq!(answers, [410, 410, 410, 429, 200, 429, 410, 410, 410, 429]);
    let audit = repo.stop().await;
    assert!(audit.contains("\"client\":\"198.51.100.7\""), "{audit}");
}

/// A flood of unauthenticated requests writes one line per (client, reason) at once and
/// one summary line per window (at the latest when the server stops), not a synced line
/// per request; real accesses keep a line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_summed_up_in_the_audit_trail() {
    let repo = Repo::start(|_| {}).await;
    // reqwest needs the process's rustls provider, which cloudpdi's own clients install.
    cloudpdi::repository::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let create = format!("{}/v1/documents", repo.url);
    for _ in 0..300 {
        let answer = http.post(&create).body("{}").send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 401);
    }
    let refused = |audit: &str| audit.matches("\"outcome\":\"unauthorized\"").count();
    assert_eq!(refused(&repo.audit()), 1, "{}", repo.audit());
    let (id, _token) = repo.uploaded(1).await;
    let audit = repo.stop().await;
    assert_eq!(refused(&audit), 2, "{audit}");
    assert!(
        audit.contains("299 more refused like this from this client"),
        "{audit}"
    );
    for action in ["create", "upload_part", "complete"] {
        assert!(
            audit.contains(&format!("\"action\":\"{action}\",\"document\":\"{id}\"")),
            "{action} missing:\n{audit}"
        );
    }
}

/// One receipt per download, with bounded counts; later ones get 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receipt_per_download() {
    let repo = Repo::start(|_| {}).await;
    let (id, token) = repo.uploaded(3).await;
    let base = format!("{}/v1/documents/{id}", repo.url);
    let proof = proof_header(&token);
    let answers = tokio::task::spawn_blocking(move || {
        let receipts = format!("{base}/receipts");
        let post = |body: &str| {
            curl(&[
                "-H",
                &proof,
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
                &receipts,
            ])
        };
        let fair = "{\"instances_imported\": 12, \"instances_refused\": 0}";
        let mut answers = vec![post(fair).0];
        answers.push(curl(&["-H", &proof, &format!("{base}/content")]).0);
        answers.push(
            post("{\"instances_imported\": 18446744073709551615, \"instances_refused\": 1}").0,
        );
        answers.push(post("{\"instances_imported\": 1000001}").0);
        answers.push(post(fair).0);
        let (code, body) = post(fair);
        answers.push(code);
        (answers, body)
    })
    .await
    .unwrap();
    let (answers, body) = answers;
    assert_eq!(answers, [410, 200, 400, 400, 201, 409]);
    assert!(body.contains("receipt_exists"), "{body}");
    repo.stop().await;
}

/// The admin endpoint answers only loopback Host names (a DNS-rebinding page names its
/// own), and closes connections that send nothing.
#[test]
fn admin_endpoint_refuses_foreign_hosts_and_idle_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), common::CT_ROUTE);
    let status = format!("http://{}/status", daemon.admin);
    let (code, body) = curl(&["-H", "Host: rebind.example:11180", &status]);
    assert_eq!(code, 421, "{body}");
    assert!(body.contains("localhost"), "{body}");
    let retry = format!("http://{}/jobs/x/retry", daemon.admin);
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Host: rebind.example",
        "-H",
        "x-cloudpdi-admin: 1",
        &retry,
    ]);
    assert_eq!(code, 421);
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        let header = format!("Host: {host}:{}", daemon.admin.port());
        assert_eq!(curl(&["-H", &header, &status]).0, 200, "{host}");
    }
    assert_eq!(curl(&[&status]).0, 200);

    let opened = Instant::now();
    let idle: Vec<_> = (0..10)
        .map(|_| std::net::TcpStream::connect(daemon.admin).unwrap())
        .collect();
    for mut socket in idle {
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        let closed = socket.read_to_end(&mut rest);
        assert!(
            closed.is_ok(),
            "an idle admin connection stayed open: {closed:?}"
        );
    }
    assert!(
        opened.elapsed() < Duration::from_secs(15),
        "idle admin connections were closed after {:?}",
        opened.elapsed()
    );
}
