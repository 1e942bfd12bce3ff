//! Facilities and the standalone repository (the "hub") of the sealed-delivery tests
//! (tests/delivery.rs, tests/delivery_sender.rs): each facility gets a real key pair and
//! API key from the `cloudpdi` binary, and the hub is a real `cloudpdi repository serve`
//! on loopback, so the tests exercise the same commands an operator runs.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudpdi::facility::FacilityKey;
use cloudpdi::repository::client::{Client, ClientOptions};

use super::{free_port, run};

/// One facility: its key pair (from `cloudpdi facility keygen`) and its API key at the
/// repository (from `cloudpdi repository new-key`), made by the binary itself so the
/// tests cover the operator's setup commands too.
pub struct Facility {
    /// Its facility code (e.g. `HOSPA`), as in `[facility] code` and the directory.
    pub code: &'static str,
    /// Its private key file, for `facility.key_file`.
    pub key_file: PathBuf,
    /// Its public key in text form, for the repository's directory.
    pub public_key: String,
    /// Its public key's fingerprint, for other facilities' pins.
    pub fingerprint: String,
    /// The file holding its API key, for `repository.api_key_file`.
    pub api_key_file: PathBuf,
    /// The `api_key_sha256 = "..."` line for the repository's configuration.
    pub api_key_line: String,
}

impl Facility {
    /// Makes the key pair and API key of facility `code` in `dir`, asserting that
    /// keygen prints the public key and its fingerprint (what the operator hands on).
    pub fn new(dir: &Path, code: &'static str) -> Facility {
        fs::create_dir_all(dir).unwrap();
        let key_file = dir.join(format!("{code}.key"));
        let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
            .args(["facility", "keygen", "--out"])
            .arg(&key_file));
        assert!(out.status.success(), "keygen: {out:?}");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        let public = FacilityKey::load(&key_file).unwrap().public();
        let (public_key, fingerprint) = (public.to_text(), public.fingerprint().to_string());
        assert!(
            printed.contains(&public_key) && printed.contains(&fingerprint),
            "keygen prints the public key and its fingerprint: {printed}"
        );
        let (key, api_key_line) = super::new_api_key();
        let api_key_file = dir.join(format!("{code}.api-key"));
        fs::write(&api_key_file, key).unwrap();
        Facility {
            code,
            key_file,
            public_key,
            fingerprint,
            api_key_file,
            api_key_line,
        }
    }

    /// A repository client at `url` with this facility's API key, for tests that post or
    /// read messages as this facility directly.
    pub fn client(&self, url: &str) -> Client {
        let key = fs::read_to_string(&self.api_key_file).unwrap();
        Client::new(url, Some(key), ClientOptions::default()).unwrap()
    }

    /// Its private key, for tests that seal or open tokens themselves.
    pub fn key(&self) -> FacilityKey {
        FacilityKey::load(&self.key_file).unwrap()
    }

    /// Its pin as another daemon writes it: (code, fingerprint), for [`Self::daemon_config`].
    pub fn pin(&self) -> (&str, &str) {
        (self.code, &self.fingerprint)
    }

    /// The configuration lines of a daemon of this facility (they land in the harness's
    /// `[repository]` table, which it writes last): the repository at `url`, the facility
    /// with `key_file` (its own, or another to test a wrong one), and `pins` (code,
    /// fingerprint) of the facilities it trusts.
    pub fn daemon_config(&self, url: &str, key_file: &Path, pins: &[(&str, &str)]) -> String {
        let mut text = format!(
            "url = \"{url}\"\napi_key_file = \"{}\"\n\
             [facility]\ncode = \"{}\"\nname = \"Hospital {}\"\nkey_file = \"{}\"\n",
            self.api_key_file.display(),
            self.code,
            self.code,
            key_file.display()
        );
        for (code, fingerprint) in pins {
            text += &format!("[facilities.{code}]\nfingerprint = \"{fingerprint}\"\n");
        }
        text
    }
}

/// The standalone repository (`cloudpdi repository serve`), its directory of facilities
/// given at each (re)start so a test can swap a registered public key; stopped when
/// dropped.
pub struct Hub {
    child: Option<Child>,
    port: u16,
    /// Its base URL.
    pub url: String,
    /// Its folder (configuration, storage, audit trail, log), for tests that scan it.
    pub dir: PathBuf,
}

impl Hub {
    /// Starts it in `dir` on a free loopback port with each facility's API key, each
    /// registered with the public key given (`None`: API key only, not in the
    /// directory), and waits until it answers.
    pub fn start(dir: &Path, directory: &[(&Facility, Option<&str>)]) -> Hub {
        fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut hub = Hub {
            child: None,
            port,
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
        };
        hub.spawn(directory);
        hub
    }

    fn spawn(&mut self, directory: &[(&Facility, Option<&str>)]) {
        let mut config = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n[storage]\npath = \"{}\"\n\
             [audit]\npath = \"{}\"\n",
            self.port,
            self.dir.join("store").display(),
            self.audit_path().display()
        );
        for (facility, public_key) in directory {
            config += &format!("[facility.{}]\n{}\n", facility.code, facility.api_key_line);
            if let Some(key) = public_key {
                config += &format!(
                    "name = \"Hospital {}\"\npublic_key = \"{key}\"\n",
                    facility.code
                );
            }
        }
        let path = self.dir.join("repository.toml");
        fs::write(&path, config).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
                .args(["repository", "serve", "--config"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the repository did not start: {}",
                fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts it (same port, storage and audit trail) with another directory, as an
    /// operator re-registering a key would.
    pub fn restart(&mut self, directory: &[(&Facility, Option<&str>)]) {
        self.stop();
        self.spawn(directory);
    }

    /// Stops the process (its storage and audit trail stay).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its audit trail's file.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// The audit events (one JSON object a line) that mention `message_id`, for tests
    /// that check what the repository recorded of a message.
    pub fn audit_of(&self, message_id: &str) -> Vec<String> {
        fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(message_id))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `future` to its end from a synchronous test (the repository client is async).
pub fn block<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}
