//! The repository's directory of facilities and its mailboxes of sealed tokens, on the
//! real `cloudpdi repository serve` (a child process on loopback, its log captured), on
//! both storage backends: local files and S3 (moto's server mode on 127.0.0.1).
#![allow(clippy::unwrap_used)]

mod common;

use common::moto::Moto;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudpdi::facility::{FacilityKey, SealError, open, seal};
use cloudpdi::repository::api::{self, MAX_MAILBOX_MESSAGES};
use cloudpdi::repository::client::{Client, ClientError, ClientOptions};
use cloudpdi::repository::config::Backend;

/// A token's text, as sealed deliveries carry it; the repository must never hold it.
const TOKEN: &str = "HT2-05NGF-W3G0N-60RKW-4CSMW-6MV3P-EE1SX-C5H6E-6S354-CRD62-GX3MB";

fn fast_options() -> ClientOptions {
    ClientOptions {
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        max_attempts: 3,
        ..ClientOptions::default()
    }
}

/// A facility known to the repository: its code, API key, and key pair (`None`: no
/// public key registered).
struct Site {
    code: &'static str,
    api_key: String,
    key: Option<FacilityKey>,
}

/// A `cloudpdi repository serve` process with facilities A, B, C (keys registered) and
/// D (no key), stopped when dropped.
struct Repo {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    sites: Vec<Site>,
    moto: Option<Moto>,
}

impl Repo {
    fn start(backend: Backend) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let mut sites = Vec::new();
        let mut facilities = String::new();
        for code in ["A", "B", "C", "D"] {
            let (api_key, hash) = cloudpdi::repository::auth::new_api_key().unwrap();
            let key = (code != "D").then(|| FacilityKey::generate().unwrap());
            facilities.push_str(&format!(
                "[facility.{code}]\napi_key_sha256 = \"{hash}\"\nname = \"{code} Hospital\"\n"
            ));
            if let Some(key) = &key {
                facilities.push_str(&format!("public_key = \"{}\"\n", key.public().to_text()));
            }
            sites.push(Site {
                code,
                api_key: api_key.to_string(),
                key,
            });
        }
        let (moto, storage) = match backend {
            Backend::Local => (
                None,
                format!("path = \"{}\"\n", dir.path().join("store").display()),
            ),
            Backend::S3 => {
                let moto = Moto::start("pdi");
                let storage = format!(
                    "backend = \"s3\"\nbucket = \"pdi\"\nendpoint = \"{}\"\nallow_http = true\n",
                    moto.endpoint
                );
                (Some(moto), storage)
            }
        };
        let port = common::free_port();
        let config = dir.path().join("repository.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\n{storage}\
                 [audit]\npath = \"{}\"\n[log]\nlevel = \"debug\"\n{facilities}",
                dir.path().join("audit.jsonl").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("log");
        let child = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
            .args(["repository", "serve", "--config"])
            .arg(&config)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let repo = Repo {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            sites,
            moto,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the repository did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        repo
    }

    fn site(&self, code: &str) -> &Site {
        self.sites.iter().find(|s| s.code == code).unwrap()
    }

    fn key(&self, code: &str) -> &FacilityKey {
        self.site(code).key.as_ref().unwrap()
    }

    fn client(&self, code: &str) -> Client {
        Client::new(
            &self.url,
            Some(self.site(code).api_key.clone()),
            fast_options(),
        )
        .unwrap()
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Every stored object, the audit trail and the logs: (name, bytes).
    fn everything(&self) -> Vec<(String, Vec<u8>)> {
        let mut all = match &self.moto {
            Some(moto) => moto.objects("pdi"),
            None => common::contents_under(&self.store()),
        };
        for name in ["audit.jsonl", "log", "stdout"] {
            all.push((
                name.into(),
                std::fs::read(self.dir.path().join(name)).unwrap_or_default(),
            ));
        }
        all
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stable code of a refusal, or a panic naming what came instead.
fn refused_code<T: std::fmt::Debug>(result: Result<T, ClientError>, status: u16) -> String {
    match result {
        Err(ClientError::Refused {
            status: got, code, ..
        }) if got == status => code,
        other => panic!("expected a {status} refusal, got {other:?}"),
    }
}

/// Directory, post, list, fetch, delete; C can neither see nor remove B's messages nor
/// post as A; nothing stored, logged or audited holds the token.
async fn mailboxes(backend: Backend) {
    let repo = Repo::start(backend);
    let (a, b, c) = (repo.client("A"), repo.client("B"), repo.client("C"));

    // The directory: the registered key, found by any facility.
    let entry = a.facility("B").await.unwrap();
    assert_eq!(entry.code, "B");
    assert_eq!(entry.name, "B Hospital");
    let b_public = cloudpdi::facility::PublicKey::parse(&entry.public_key).unwrap();
    assert_eq!(b_public, repo.key("B").public());
    assert_eq!(b_public.fingerprint(), repo.key("B").public().fingerprint());
    assert_eq!(refused_code(a.facility("D").await, 404), "unknown_facility");
    assert_eq!(refused_code(a.facility("Z").await, 404), "unknown_facility");

    // A seals a token to B and posts it; a repeated post is the same message.
    let sealed = seal(repo.key("A"), "A", &b_public, "B", TOKEN.as_bytes()).unwrap();
    let posted = a.post_message("B", &sealed).await.unwrap();
    assert!(api::is_message_id(&posted.message_id), "{posted:?}");
    assert_eq!(a.post_message("B", &sealed).await.unwrap(), posted);
    assert_eq!(
        refused_code(a.post_message("D", &sealed).await, 404),
        "unknown_facility"
    );

    // B sees it, with A as the sender the repository authenticated, and opens it.
    let waiting = b.messages().await.unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0].message_id, posted.message_id);
    assert_eq!(waiting[0].sender, "A");
    assert_eq!(waiting[0].size, sealed.len() as u64);
    let fetched = b.message(&posted.message_id).await.unwrap();
    assert_eq!(fetched, sealed);
    let opened = open(repo.key("B"), "B", &repo.key("A").public(), "A", &fetched).unwrap();
    assert_eq!(opened.as_slice(), TOKEN.as_bytes());

    // C only ever sees its own mailbox: B's message is not there for it.
    assert!(c.messages().await.unwrap().is_empty());
    assert_eq!(
        refused_code(c.message(&posted.message_id).await, 404),
        "not_found"
    );
    c.delete_message(&posted.message_id).await.unwrap();
    assert_eq!(
        b.messages().await.unwrap().len(),
        1,
        "C deleted B's message"
    );
    // A token sealed for B does not open with C's key.
    assert_eq!(
        open(repo.key("C"), "B", &repo.key("A").public(), "A", &fetched),
        Err(SealError::Open)
    );
    // C cannot post as A: the repository records C as the sender, and the message does
    // not open as from A.
    let replayed = c.post_message("B", &sealed).await.unwrap();
    assert_ne!(replayed, posted);
    let waiting = b.messages().await.unwrap();
    let from_c = waiting
        .iter()
        .find(|m| m.message_id == replayed.message_id)
        .unwrap();
    assert_eq!(from_c.sender, "C");
    let bytes = b.message(&replayed.message_id).await.unwrap();
    assert_eq!(
        open(repo.key("B"), "B", &repo.key("C").public(), "C", &bytes),
        Err(SealError::Open)
    );

    // The storage, logs and audit trail hold no token text, secret or API key; the audit
    // trail names sender, recipient, size and ID.
    let secrets: Vec<(String, Vec<u8>)> = vec![
        ("token text".into(), TOKEN.as_bytes().to_vec()),
        (
            "token symbols".into(),
            TOKEN[4..].replace('-', "").into_bytes(),
        ),
        ("token group".into(), b"W3G0N-60RKW".to_vec()),
        ("token hex".into(), hex::encode(TOKEN).into_bytes()),
    ]
    .into_iter()
    .chain(repo.sites.iter().map(|s| {
        (
            format!("API key {}", s.code),
            s.api_key.clone().into_bytes(),
        )
    }))
    .collect();
    let everything = repo.everything();
    assert!(
        everything
            .iter()
            .any(|(_, bytes)| bytes.windows(sealed.len()).any(|w| w == sealed)),
        "the sealed bytes are stored"
    );
    for (name, bytes) in &everything {
        for (what, secret) in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{what} found in {name}"
            );
        }
    }
    let audit = repo.audit();
    let line = |action: &str, audit: &str| {
        audit
            .lines()
            .find(|l| {
                l.contains(&format!("\"action\":\"{action}\""))
                    && l.contains("\"ok\"")
                    && l.contains("from A to B")
            })
            .unwrap_or_else(|| panic!("no {action} line from A to B in {audit}"))
            .to_owned()
    };
    let post = line("post_message", &audit);
    assert!(
        post.contains(&format!(
            "message {} from A to B, {} bytes",
            posted.message_id,
            sealed.len()
        )),
        "{post}"
    );
    line("fetch_message", &audit);
    assert!(audit.contains("\"kind\":\"facility\",\"name\":\"C\""));

    // B deletes what it imported; a repeated delete is no error.
    b.delete_message(&posted.message_id).await.unwrap();
    b.delete_message(&posted.message_id).await.unwrap();
    assert_eq!(
        refused_code(b.message(&posted.message_id).await, 404),
        "not_found"
    );
    let left = b.messages().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, replayed.message_id);
    line("delete_message", &repo.audit());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_on_local_files() {
    mailboxes(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_on_s3() {
    mailboxes(Backend::S3).await;
}

/// `curl` with the facility's key: (status, error code).
fn curl(repo: &Repo, code: Option<&str>, args: &[&str]) -> (u16, String) {
    let mut command = Command::new(common::require("/usr/bin/curl"));
    command.args(["-s", "-o", "-", "-w", "\n%{http_code}"]);
    if let Some(code) = code {
        command.args([
            "-H",
            &format!("Authorization: Bearer {}", repo.site(code).api_key),
        ]);
    }
    let out = command.args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status.parse().unwrap(), error)
}

/// Bounds: body size, sealed form, codes and IDs checked before any path, credentials,
/// 1000 waiting messages per mailbox, 100 listed per call (oldest first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_bounds() {
    let repo = Repo::start(Backend::Local);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        format!("@{}", path.display())
    };
    let sealed = seal(
        repo.key("A"),
        "A",
        &repo.key("B").public(),
        "B",
        TOKEN.as_bytes(),
    )
    .unwrap();
    let post = |code: Option<&str>, to: &str, body: &str| {
        curl(
            &repo,
            code,
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                body,
                &format!("{}/v1/mailboxes/{to}/messages", repo.url),
            ],
        )
    };
    let mut large = sealed.clone();
    large.resize(api::MAX_MESSAGE_LEN + 1, 0);
    assert_eq!(
        post(Some("A"), "B", &file("large", &large)),
        (413, "too_large".into())
    );
    let mut largest = sealed.clone();
    largest.resize(api::MAX_MESSAGE_LEN, 0);
    assert_eq!(post(Some("A"), "B", &file("largest", &largest)).0, 201);
    assert_eq!(
        post(Some("A"), "B", &file("plain", TOKEN.as_bytes())),
        (400, "not_sealed".into())
    );
    assert_eq!(
        post(Some("A"), "B", &file("sealed", &sealed[..20])),
        (400, "not_sealed".into())
    );
    assert_eq!(
        post(None, "B", &file("anonymous", &sealed)),
        (401, "unauthorized".into())
    );
    for bad in ["..", "%2e%2e", "B%2fA", &"X".repeat(33)] {
        let (status, code) = post(Some("A"), bad, &file("bad", &sealed));
        assert!(
            (status, code.as_str()) == (400, "invalid_facility_code")
                || (status, code.as_str()) == (404, "no_such_endpoint"),
            "{bad}: {status} {code}"
        );
    }
    assert_eq!(
        curl(
            &repo,
            Some("A"),
            &[&format!("{}/v1/facilities/..%2fB", repo.url)]
        ),
        (400, "invalid_facility_code".into())
    );
    for bad in [
        "0123456789ABCDEF0123",
        "0123456789abcdef01234",
        "..%2f..%2fx",
    ] {
        let url = format!("{}/v1/mailbox/messages/{bad}", repo.url);
        assert_eq!(
            curl(&repo, Some("B"), &[&url]),
            (400, "invalid_message_id".into()),
            "{bad}"
        );
        assert_eq!(
            curl(&repo, Some("B"), &["-X", "DELETE", &url]),
            (400, "invalid_message_id".into()),
            "{bad}"
        );
    }
    assert_eq!(
        curl(&repo, None, &[&format!("{}/v1/mailbox/messages", repo.url)]),
        (401, "unauthorized".into())
    );
    // The client refuses what the server would, before sending.
    let a = repo.client("A");
    assert!(matches!(
        a.post_message("B", &large).await,
        Err(ClientError::Mismatch(_))
    ));
    assert!(matches!(
        a.message("../x").await,
        Err(ClientError::Mismatch(_))
    ));

    // Fill B's mailbox to the bound (written as the server writes them, in the past).
    let b = repo.client("B");
    let existing = b.messages().await.unwrap();
    assert_eq!(existing.len(), 1);
    for n in existing.len()..MAX_MAILBOX_MESSAGES {
        let id = format!("{n:020x}");
        let folder = repo.store().join(format!("mailboxes/B/{id}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("sealed"), &sealed).unwrap();
        let meta = serde_json::json!({
            "id": id, "sender": "C", "recipient": "B",
            "size": sealed.len(), "posted_at": 1_000 + n,
        });
        std::fs::write(folder.join("meta.json"), meta.to_string()).unwrap();
    }
    let full = a.post_message("B", &sealed).await;
    match full {
        Err(ClientError::Unavailable { last, .. }) => {
            assert!(last.contains("429"), "{last}");
            assert!(
                last.contains("the mailbox of B holds 1000 messages"),
                "{last}"
            );
        }
        other => panic!("expected the full mailbox to be refused, got {other:?}"),
    }
    assert_eq!(
        post(Some("A"), "B", &file("full", &sealed)),
        (429, "mailbox_full".into())
    );
    // Another mailbox is not affected.
    let to_c = seal(repo.key("A"), "A", &repo.key("C").public(), "C", b"x").unwrap();
    a.post_message("C", &to_c).await.unwrap();

    // A list gives the oldest 100; deleting one makes room.
    let listed = b.messages().await.unwrap();
    assert_eq!(listed.len(), api::MAX_LISTED_MESSAGES);
    assert!(listed.windows(2).all(|w| w[0].posted_at <= w[1].posted_at));
    b.delete_message(&listed[0].message_id).await.unwrap();
    a.post_message("B", &sealed).await.unwrap();
}

/// A public key that is not a key stops the repository at start, naming the key to fix.
#[test]
fn a_bad_public_key_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("repository.toml");
    let (_, hash) = cloudpdi::repository::auth::new_api_key().unwrap();
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n[audit]\npath = \"{}\"\n[facility.B]\n\
             api_key_sha256 = \"{hash}\"\npublic_key = \"x25519:not-a-key\"\n",
            dir.path().join("store").display(),
            dir.path().join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["repository", "serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("facility.B.public_key"), "{text}");
}

/// A hostile repository (a few lines of Python's http.server) that answers the mailbox
/// list with `list` and every message with 64 KiB; prints its port.
const HOSTILE: &str = r#"
import sys, http.server, socketserver
listing = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = listing if self.path == "/v1/mailbox/messages" else b"CPDS\x01" + b"x" * 65536
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
s = socketserver.TCPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// What a hostile repository answers is bounded: a message larger than a sealed token is
/// refused unread, a list longer than 100 or with IDs or senders that could not be ours
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_mailbox_is_refused_at_its_bounds() {
    let entry = |id: &str, sender: &str| {
        format!(r#"{{"message_id":"{id}","sender":"{sender}","size":10,"posted_at":1}}"#)
    };
    let good = "0123456789abcdef0123";
    let too_many = format!(
        "[{}]",
        vec![entry(good, "A"); api::MAX_LISTED_MESSAGES + 1].join(",")
    );
    for (listing, what) in [
        (too_many, "101 entries"),
        (format!("[{}]", entry("../../x", "A")), "a path as ID"),
        (format!("[{}]", entry(good, "A/../B")), "a path as sender"),
    ] {
        let mut server = Command::new(common::require("/usr/bin/python3"))
            .args(["-c", HOSTILE, &listing])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
            &mut port,
        )
        .unwrap();
        let client = Client::new(
            &format!("http://127.0.0.1:{}", port.trim()),
            Some("cpdi_x".into()),
            fast_options(),
        )
        .unwrap();
        let listed = client.messages().await;
        assert!(
            matches!(listed, Err(ClientError::Mismatch(_))),
            "{what}: {listed:?}"
        );
        let fetched = client.message(good).await;
        assert!(
            matches!(
                fetched,
                Err(ClientError::AnswerTooLarge {
                    limit: api::MAX_MESSAGE_LEN
                })
            ),
            "{fetched:?}"
        );
        let _ = server.kill();
        let _ = server.wait();
    }
}
