//! The receiving side and the client against hostile input (issue 12): a repository that
//! answers with endless bodies, redirects or enormous sizes, containers and ZIPs that
//! expand without bound, links planted at temp names, token files that never end.
//! Hostile servers are a few lines of Python's http.server; memory is capped with
//! `ulimit -v` around the real binary where an unbounded read would exhaust it.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::text;

use cloudpdi::container::{Compression, ContainerError, Options};
use cloudpdi::repository::client::{Client, ClientError, ClientOptions};
use cloudpdi::token::{RepositoryRef, Token};

/// A hostile repository: `python3 -c SERVER MODE ARG` prints its port, then answers every
/// request as MODE says, appending each request line and proof header to ARG's log when
/// asked.
const SERVER: &str = r#"
import sys, http.server, socketserver
mode, arg = sys.argv[1], sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self): self.answer()
    def do_POST(self): self.answer()
    def answer(self):
        if mode == "log":
            with open(arg, "a") as f:
                f.write("%s %s\n" % (self.path, self.headers.get("x-download-proof", "")))
            body = b'{"error":"not_found","message":"nothing here"}'
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode == "endless":
            self.send_response(404)
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"\x1b[31mA\n" * 8192
            try:
                while True:
                    self.wfile.write(chunk)
            except Exception:
                pass
        elif mode == "endless200":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"[" * 65536
            try:
                while True:
                    self.wfile.write(chunk)
            except Exception:
                pass
        elif mode == "redirect":
            self.send_response(307)
            self.send_header("Location", arg + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "huge":
            self.send_response(200)
            self.send_header("Content-Length", arg)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(b"\0" * (1 << 20))
            except Exception:
                pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// A hostile server, stopped when dropped.
struct Hostile {
    child: Child,
    url: String,
}

impl Hostile {
    fn start(mode: &str, arg: &str) -> Hostile {
        let mut child = Command::new("python3")
            .args(["-c", SERVER, mode, arg])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is installed");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the server printed its port");
        Hostile {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const DOCUMENT: &str = "0123456789abcdef0123";

fn url() -> RepositoryRef {
    RepositoryRef::Url("https://repo.example.jp".into())
}

/// A token for `repository`, written to `dir/token` (mode 0600); returns `@path`.
fn token_file(dir: &Path, repository: &str) -> String {
    let token = Token::issue(RepositoryRef::Url(repository.into()), DOCUMENT, u32::MAX).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, token.to_text()).unwrap();
    format!("@{}", path.display())
}

/// Runs the binary under `ulimit -v` (KiB) and a time limit, with `args`.
fn cloudpdi_capped(memory_kib: u64, seconds: u64, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v {memory_kib}; exec timeout {seconds} \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .output()
        .unwrap();
    (output, started.elapsed())
}

/// A configuration with these [inbound] keys (and the one route a configuration needs).
fn config(dir: &Path, inbound: &str) -> PathBuf {
    let path = dir.join("cloudpdi.toml");
    let text = format!("[inbound]\n{inbound}\n[route.ct]\nae_title = \"CLOUDPDI\"\n");
    std::fs::write(&path, text).unwrap();
    path
}

/// Item 3: an error answer with an endless body is read only as far as a short excerpt,
/// which is shown escaped; memory stays small (was: read whole until memory ran out).
#[test]
fn an_endless_error_body_is_cut_short_and_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Hostile::start("endless", "");
    let token = token_file(dir.path(), &server.url);
    let out = dir.path().join("study");
    let (result, took) = cloudpdi_capped(
        1 << 20,
        60,
        &["receive", "--out", out.to_str().unwrap(), &token],
    );
    let shown = text(&result);
    assert!(!result.status.success(), "{shown}");
    assert!(
        shown.contains("404") && shown.contains("\\u{1b}[31mA\\n"),
        "the refusal shows an escaped excerpt: {shown}"
    );
    assert!(
        !shown.contains('\u{1b}'),
        "no raw control characters: {shown}"
    );
    assert!(shown.len() < 4096, "only an excerpt: {} bytes", shown.len());
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(!dir.path().join("study.cloudpdi-download").exists());
}

/// Item 12: a redirect is not followed, so the download proof never reaches the other
/// origin; the error names it (was: followed, proof sent along).
#[test]
fn a_redirect_is_refused_and_the_proof_stays_home() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("elsewhere.log");
    let elsewhere = Hostile::start("log", log.to_str().unwrap());
    let server = Hostile::start("redirect", &elsewhere.url);
    let token = token_file(dir.path(), &server.url);
    let out = dir.path().join("study");
    let (result, _) = cloudpdi_capped(
        4 << 20,
        60,
        &["receive", "--out", out.to_str().unwrap(), &token],
    );
    let shown = text(&result);
    assert!(!result.status.success(), "{shown}");
    assert!(
        shown.contains("redirects are not followed") && shown.contains(&elsewhere.url),
        "{shown}"
    );
    assert!(
        !log.exists(),
        "the other origin got a request: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `cloudpdi receive --out` from a repository announcing a document of `size` bytes,
/// with these [inbound] keys: it must be refused at once, before anything is written,
/// leaving nothing behind; returns what it printed.
fn receive_announced(size: u64, inbound: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let server = Hostile::start("huge", &size.to_string());
    let token = token_file(dir.path(), &server.url);
    let conf = config(dir.path(), inbound);
    let out = dir.path().join("study");
    let (result, took) = cloudpdi_capped(
        4 << 20,
        60,
        &[
            "receive",
            "--config",
            conf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            &token,
        ],
    );
    let shown = text(&result);
    assert!(!result.status.success(), "{shown}");
    assert!(took < Duration::from_secs(10), "refused at once: {took:?}");
    assert!(!dir.path().join("study.cloudpdi-download").exists());
    assert!(!out.exists());
    shown
}

/// Item 5: an announced size above `inbound.max_document_mb` is refused before anything
/// is written, and nothing is left (was: written, `<out>.cloudpdi-download` left).
#[test]
fn a_document_above_max_document_mb_is_refused_before_writing() {
    let shown = receive_announced(3 << 30, "max_document_mb = 1");
    assert!(
        shown.contains("3221225472") && shown.contains("inbound.max_document_mb"),
        "says the size and the key: {shown}"
    );
}

/// Item 5: a size the disk cannot hold (with its reserve) is refused before writing.
#[test]
fn a_document_larger_than_the_free_disk_is_refused_before_writing() {
    let shown = receive_announced(1 << 51, "max_document_mb = 4000000000");
    assert!(shown.contains("No space left for the download"), "{shown}");
}

/// A sealed container of `len` zero bytes (zstd: a few KiB for hundreds of MiB).
fn zero_container(token: &Token, len: u64, compression: Compression) -> Vec<u8> {
    let options = Options {
        compression,
        ..Options::default()
    };
    cloudpdi::container::encrypt(
        &token.container_key(),
        &options,
        std::io::repeat(0).take(len),
        Vec::new(),
    )
    .unwrap()
}

/// Item 5: a small zstd container that expands without bound is stopped while it is
/// being decompressed, and nothing is kept (was: 135 KB became 4 GiB).
#[test]
fn a_decompression_bomb_is_stopped_while_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::issue(url(), DOCUMENT, u32::MAX).unwrap();
    let sealed = zero_container(&token, 300 << 20, Compression::Zstd);
    assert!(sealed.len() < 1 << 20, "{} bytes", sealed.len());
    let (input, output) = (dir.path().join("bomb.cpdi"), dir.path().join("bomb.zip"));
    std::fs::write(&input, &sealed).unwrap();
    let err =
        cloudpdi::container::decrypt_file(&token.container_key(), &input, &output).unwrap_err();
    assert!(
        matches!(err, ContainerError::Expansion { ratio: 1000, .. }),
        "{err}"
    );
    assert!(!output.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        left.len(),
        1,
        "only the input is left (no temp file): {left:?}"
    );
}

/// Item 5: the opened size is bounded by `inbound.max_document_mb` too.
#[test]
fn an_opened_container_above_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::issue(url(), DOCUMENT, u32::MAX).unwrap();
    let (input, output) = (dir.path().join("big.cpdi"), dir.path().join("big.zip"));
    std::fs::write(&input, zero_container(&token, 3 << 20, Compression::None)).unwrap();
    let limits = cloudpdi::container::DecryptLimits {
        max_output: 2 << 20,
        ..cloudpdi::container::DecryptLimits::default()
    };
    let err =
        cloudpdi::container::decrypt_file_limited(&token.container_key(), &input, &output, limits)
            .unwrap_err();
    assert!(err.to_string().contains("inbound.max_document_mb"), "{err}");
    assert!(!output.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        left.len(),
        1,
        "only the input is left (no temp file): {left:?}"
    );
}

/// Item 13: a link planted at `<out>.part` is not followed, even with a wrong token, and
/// the decrypted file is the owner's alone (was: the link's target truncated; 0644).
#[test]
fn decrypt_does_not_follow_a_planted_link_and_writes_0600() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::issue(url(), DOCUMENT, u32::MAX).unwrap();
    let other = Token::issue(url(), DOCUMENT, u32::MAX).unwrap();
    let input = dir.path().join("study.cpdi");
    std::fs::write(&input, zero_container(&token, 100_000, Compression::None)).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let output = dir.path().join("study.zip");
    std::os::unix::fs::symlink(&victim, dir.path().join("study.part")).unwrap();
    for (name, t) in [("wrong", &other), ("right", &token)] {
        let path = dir.path().join(name);
        std::fs::write(&path, t.to_text()).unwrap();
    }
    let wrong = format!("@{}", dir.path().join("wrong").display());
    let right = format!("@{}", dir.path().join("right").display());
    let (input_s, output_s) = (input.to_str().unwrap(), output.to_str().unwrap());
    let (refused, _) = cloudpdi_capped(
        4 << 20,
        60,
        &["decrypt", "--token", &wrong, input_s, output_s],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::os::unix::fs::symlink(&victim, dir.path().join("study.part")).unwrap_or(());
    let (opened, _) = cloudpdi_capped(
        4 << 20,
        60,
        &["decrypt", "--token", &right, input_s, output_s],
    );
    assert!(opened.status.success(), "{}", text(&opened));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let mode = std::fs::metadata(&output).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read(&output).unwrap().len(), 100_000);
}

/// Item 16: `@FILE` reads at most 64 KiB (was: `@/dev/zero` read until memory ran out).
#[test]
fn a_token_file_that_never_ends_is_refused() {
    let (result, took) = cloudpdi_capped(1 << 20, 60, &["token", "inspect", "@/dev/zero"]);
    let shown = text(&result);
    assert!(!result.status.success(), "{shown}");
    assert!(
        shown.contains("larger than 65536 bytes"),
        "says the bound: {shown}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// Item 14: a ZIP64 locator whose offset is near 2^64 is refused, not wrapped around
/// (was: `end64 + 56` overflowed).
#[test]
fn a_zip64_offset_near_the_top_does_not_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let mut zip = Vec::new();
    // ZIP64 end of central directory locator, pointing at u64::MAX - 20.
    zip.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    zip.extend_from_slice(&0u32.to_le_bytes());
    zip.extend_from_slice(&(u64::MAX - 20).to_le_bytes());
    zip.extend_from_slice(&1u32.to_le_bytes());
    // End of central directory with ZIP64 markers.
    zip.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    zip.extend_from_slice(&[0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    zip.extend_from_slice(&[0xFF; 8]);
    zip.extend_from_slice(&[0, 0]);
    let path = dir.path().join("wrap.zip");
    std::fs::write(&path, &zip).unwrap();
    let dest = dir.path().join("out");
    let err = cloudpdi::pdi::zip::extract(&path, &dest, cloudpdi::pdi::zip::Limits::default())
        .unwrap_err();
    assert!(err.to_string().contains("ZIP64 end record"), "{err}");
    assert!(!dest.exists());
}

/// Item 12: the proof or API key never goes over plain http to another host unless the
/// configuration allows it (was: sent).
#[test]
fn plain_http_to_another_host_needs_the_setting() {
    let err = Client::new("http://192.0.2.7:8080", None, ClientOptions::default()).unwrap_err();
    assert!(
        matches!(&err, ClientError::Setup(m) if m.contains("inbound.allow_plain_http")),
        "{err}"
    );
    for allowed in ["http://127.0.0.1:1", "http://[::1]:1", "http://localhost:1"] {
        Client::new(allowed, None, ClientOptions::default()).unwrap();
    }
    let options = ClientOptions {
        allow_plain_http: true,
        ..ClientOptions::default()
    };
    Client::new("http://192.0.2.7:8080", None, options).unwrap();
}

/// Item 3: a JSON answer that never ends is refused at its bound (was: read whole until
/// memory ran out).
#[test]
fn an_endless_json_answer_is_refused_at_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let server = Hostile::start("endless200", "");
    let token = token_file(dir.path(), &server.url);
    let key = dir.path().join("key");
    std::fs::write(&key, "a-key").unwrap();
    let file = dir.path().join("container");
    std::fs::write(&file, b"bytes").unwrap();
    let (result, took) = cloudpdi_capped(
        1 << 20,
        60,
        &[
            "repository",
            "upload",
            "--url",
            &server.url,
            "--api-key-file",
            key.to_str().unwrap(),
            "--token",
            &token,
            "--token-out",
            dir.path().join("issued").to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    let shown = text(&result);
    assert!(!result.status.success(), "{shown}");
    assert!(
        shown.contains("answer is larger than 4194304 bytes"),
        "{shown}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// Item 5: a ZIP that declares more than the bound is refused before anything is written,
/// and what is extracted is private (0700 folders, 0600 files).
#[test]
fn zip_extraction_is_bounded_and_private() {
    use cloudpdi::pdi::zip::{Limits, ZipWriter, extract};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("set.zip");
    let mut writer = ZipWriter::new(std::fs::File::create(&path).unwrap(), 0);
    writer.add_bytes("DICOM/A", &vec![0u8; 2 << 20]).unwrap();
    writer.finish().unwrap().flush().unwrap();
    let small = Limits {
        max_total_bytes: 1 << 20,
        ..Limits::default()
    };
    let dest = dir.path().join("small");
    let err = extract(&path, &dest, small).unwrap_err();
    assert!(err.to_string().contains("inbound.max_document_mb"), "{err}");
    assert!(!dest.exists());
    let dest = dir.path().join("fits");
    extract(&path, &dest, Limits::default()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dest), 0o700);
    assert_eq!(mode(&dest.join("DICOM")), 0o700);
    assert_eq!(mode(&dest.join("DICOM/A")), 0o600);
}
