//! Shared harness for integration tests: the real `cloudpdi serve` as a child process on
//! loopback, real DICOM peers, and generated data.
#![allow(dead_code, clippy::unwrap_used)]

pub mod moto;
pub mod sites;

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Absolute path of a peer program; a missing peer fails the test (never skips it).
pub fn require(program: &str) -> &str {
    assert!(
        Path::new(program).exists(),
        "test peer {program} is missing: run scripts/test.sh, which installs the peers"
    );
    program
}

/// A free TCP port on 127.0.0.1 for a server started later (a child process).
///
/// The port is taken below the kernel's ephemeral range: a port from that range, free
/// when probed, can be taken by any outgoing connection (storescu, curl, the daemon's
/// own) before the server binds it, which failed CI with "Address already in use".
/// Ports handed out in this process are never handed out twice.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = ephemeral_low().clamp(1025, 65535);
    let first = 10_000u32.min(low.saturating_sub(1024));
    let span = low.saturating_sub(first).max(1);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut given = GIVEN.lock().unwrap();
    let given = given.get_or_insert_with(HashSet::new);
    for step in 0..span {
        let port = (first + (seed.wrapping_add(step.wrapping_mul(7919))) % span) as u16;
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.insert(port);
        return port;
    }
    panic!("no free TCP port below the ephemeral range {low}")
}

/// Lowest port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Every file under `dir`, recursively, sorted; none when `dir` does not exist (a store
/// nothing was written to yet).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap().path())
        .flat_map(|path| match path.is_dir() {
            true => files_under(&path),
            false => vec![path],
        })
        .collect();
    out.sort();
    out
}

/// Every file under `dir` with its bytes: what a server stored, for scans for secrets.
pub fn contents_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files_under(dir)
        .into_iter()
        .map(|path| (path.display().to_string(), fs::read(&path).unwrap()))
        .collect()
}

/// The repository root (for scripts/ and tests/peers/).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Generates a CT study of `slices` files into `dir`; returns its Study Instance UID.
pub fn gen_ct(dir: &Path, slices: usize, extra: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(root().join("scripts/gen_ct.py"))
        .arg(dir)
        .args(["--slices", &slices.to_string()])
        .args(extra)
        .output()
        .expect("run python3 scripts/gen_ct.py");
    assert!(
        out.status.success(),
        "gen_ct.py failed (pydicom and numpy installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sorted DICOM files of a folder.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs a command to completion and returns its output.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// A running `cloudpdi serve`.
pub struct Daemon {
    child: Option<Child>,
    pub dicom: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    wrapper: Vec<String>,
}

/// The configuration the tests run with: loopback ports, the given data folder, one route
/// `ct` on AE title CLOUDPDI, plus `extra` TOML appended.
pub fn config_text(dicom: u16, admin: u16, data: &Path, extra: &str) -> String {
    format!(
        "[dicom]\nlisten = \"127.0.0.1:{dicom}\"\nidle_timeout = 20\n\
         [spool]\ndata_dir = \"{}\"\nmin_free_mb = 0\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [log]\nlevel = \"info\"\n\
         [repository]\nembedded_listen = \"127.0.0.1:{}\"\n\
         {extra}\n",
        data.display(),
        free_port()
    )
}

/// Default route used by most tests.
pub const CT_ROUTE: &str = "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 2\n";

impl Daemon {
    /// Starts the daemon in `dir` (data under `dir/data`) with `routes` TOML.
    pub fn start(dir: &Path, routes: &str) -> Daemon {
        Daemon::start_wrapped(dir, routes, &[])
    }

    /// Starts the daemon with extra `[dicom]` settings (e.g. `max_associations = 1`).
    pub fn start_tuned(dir: &Path, routes: &str, dicom_settings: &str) -> Daemon {
        Daemon::launch(dir, routes, dicom_settings, &[])
    }

    /// Starts the daemon through a wrapper command (e.g. `unshare ... sh -c`), whose last
    /// argument receives the daemon's command line.
    pub fn start_wrapped(dir: &Path, routes: &str, wrapper: &[&str]) -> Daemon {
        Daemon::launch(dir, routes, "", wrapper)
    }

    fn launch(dir: &Path, routes: &str, dicom_settings: &str, wrapper: &[&str]) -> Daemon {
        fs::create_dir_all(dir).unwrap();
        let data = dir.join("data");
        let config = dir.join("cloudpdi.toml");
        let (dicom, admin) = (free_port(), free_port());
        // `dicom_settings` may replace the harness's idle timeout (TOML forbids repeats).
        let settings = if dicom_settings.contains("idle_timeout") {
            format!("{dicom_settings}\n")
        } else {
            format!("idle_timeout = 20\n{dicom_settings}\n")
        };
        // Reception tests look at stable batches: the outbound pipeline holds them unless
        // the test configures it.
        let routes = if routes.contains("[outbound]") {
            routes.to_owned()
        } else {
            format!("{routes}\n[outbound]\nenabled = false\n")
        };
        let text =
            config_text(dicom, admin, &data, &routes).replacen("idle_timeout = 20\n", &settings, 1);
        fs::write(&config, text).unwrap();
        let mut daemon = Daemon {
            child: None,
            dicom: SocketAddr::from(([127, 0, 0, 1], dicom)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            dir: dir.to_owned(),
            config,
            log: dir.join("daemon.log"),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        daemon.spawn();
        daemon
    }

    /// (Re)starts the process on the same configuration and waits until it answers.
    pub fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let binary = env!("CARGO_BIN_EXE_cloudpdi");
        let mut command = if self.wrapper.is_empty() {
            let mut c = Command::new(binary);
            c.args(["serve", "--config"]).arg(&self.config);
            c
        } else {
            let (last, first) = self.wrapper.split_last().unwrap();
            let mut c = Command::new(&first[0]);
            c.args(&first[1..]).arg(format!(
                "{last} exec {binary} serve --config {}",
                self.config.display()
            ));
            c
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env("NO_COLOR", "1")
            .spawn()
            .expect("start cloudpdi serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // The DICOM port is bound before the admin port, so one probe suffices (and a
        // probe of the DICOM port would log a failed negotiation).
        while TcpStream::connect(self.admin).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cloudpdi serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The inbound jobs of `cloudpdi status`.
    pub fn inbound_jobs(&self) -> Vec<serde_json::Value> {
        self.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["direction"] == "inbound")
            .cloned()
            .collect()
    }

    /// GET on the admin endpoint: (HTTP status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let out = run(Command::new(require("/usr/bin/curl"))
            .args(["-s", "-w", "\n%{http_code}"])
            .arg(format!("http://{}{path}", self.admin)));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_owned())
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the daemon's log holds `needle`, for a line logged after the peer
    /// already saw the outcome (e.g. after the association's release); returns the log.
    pub fn wait_logged(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "{needle:?} not logged:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `cloudpdi status --json` against this daemon.
    pub fn status(&self) -> serde_json::Value {
        let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args([
            "status",
            "--json",
            "--admin",
            &self.admin.to_string(),
        ]));
        assert!(
            out.status.success(),
            "cloudpdi status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until some batch is stable with `instances` instances; returns the batch.
    pub fn wait_stable_batch(&self, instances: u64, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status();
            let batches = status["batches"].as_array().unwrap().clone();
            if let Some(b) = batches
                .iter()
                .find(|b| b["state"] == "stable" && b["instances"] == instances)
            {
                return b.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no stable batch of {instances} instances; status: {status:#}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The spool's index, opened after the daemon stopped (sled allows one process).
    pub fn index(&self) -> cloudpdi::gateway::store::BatchIndex {
        assert!(
            self.child.is_none(),
            "stop the daemon before opening its index"
        );
        cloudpdi::gateway::store::BatchIndex::open(&self.dir.join("data/index")).unwrap()
    }

    /// Path of the spooled file for an index record.
    pub fn spooled(&self, record: &cloudpdi::gateway::reception::batch::InstanceRecord) -> PathBuf {
        self.dir.join("data/spool").join(&record.file)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// DCMTK's storescu (not pynetdicom's script of the same name) to the daemon.
pub fn storescu(daemon: &Daemon, calling: &str, args: &[&str], files: &[PathBuf]) -> Output {
    run(Command::new(require("/usr/bin/storescu"))
        .args(["-aet", calling, "-aec", "CLOUDPDI"])
        .args(args)
        .arg("127.0.0.1")
        .arg(daemon.dicom.port().to_string())
        .args(files))
}

/// One line of tests/peers/store.py output.
#[derive(Debug, serde::Deserialize)]
pub struct StoreResult {
    pub file: String,
    pub status: i64,
    pub comment: String,
}

/// Sends files with pynetdicom over one association; returns each file's status.
pub fn pynetdicom_store(daemon: &Daemon, calling: &str, files: &[PathBuf]) -> Vec<StoreResult> {
    let out = run(Command::new("python3")
        .arg(root().join("tests/peers/store.py"))
        .args([
            "127.0.0.1",
            &daemon.dicom.port().to_string(),
            "CLOUDPDI",
            calling,
        ])
        .args(files));
    assert!(
        out.status.success(),
        "store.py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The dataset of a Part 10 file without its meta group, for element-wise comparison.
pub fn dataset(path: &Path) -> dicom_object::InMemDicomObject {
    dicom_object::open_file(path)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        .into_inner()
}

/// The SOP Instance UID of a Part 10 file.
pub fn sop_instance_uid(path: &Path) -> String {
    dataset(path)
        .element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_owned()
}

/// Asserts two files hold the same dataset element by element. Encoding details that
/// senders legitimately change are ignored: group lengths, defined vs undefined sequence
/// lengths, trailing padding of text (DESIGN §9: storescu re-encodes what it sends).
pub fn assert_same_dataset(original: &Path, stored: &Path) {
    let (a, b) = (dataset(original), dataset(stored));
    if let Err(why) = same_object(&a, &b) {
        panic!(
            "{} and {} differ: {why}",
            original.display(),
            stored.display()
        );
    }
}

type Object = dicom_object::InMemDicomObject;
type Element = dicom_object::mem::InMemElement;

fn same_object(a: &Object, b: &Object) -> Result<(), String> {
    let elements = |o: &Object| {
        o.iter()
            // Group lengths and Data Set Trailing Padding carry no data; senders drop them.
            .filter(|e| {
                e.header().tag.element() != 0x0000
                    && e.header().tag != dicom_core::Tag(0xFFFC, 0xFFFC)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let (ea, eb) = (elements(a), elements(b));
    if ea.len() != eb.len() {
        let tags = |v: &[Element]| v.iter().map(|e| e.header().tag).collect::<Vec<_>>();
        let (ta, tb) = (tags(&ea), tags(&eb));
        let only_a: Vec<_> = ta.iter().filter(|t| !tb.contains(t)).collect();
        let only_b: Vec<_> = tb.iter().filter(|t| !ta.contains(t)).collect();
        return Err(format!(
            "elements only in the first: {only_a:?}, only in the second: {only_b:?}"
        ));
    }
    ea.iter().zip(&eb).try_for_each(|(x, y)| same_element(x, y))
}

fn same_element(x: &Element, y: &Element) -> Result<(), String> {
    use dicom_core::value::Value;
    let tag = x.header().tag;
    if tag != y.header().tag {
        return Err(format!("{tag} vs {}", y.header().tag));
    }
    if x.value() == y.value() {
        return Ok(());
    }
    let same = match (x.value(), y.value()) {
        (Value::Primitive(a), Value::Primitive(b)) => {
            a.to_str().trim_end_matches([' ', '\0']) == b.to_str().trim_end_matches([' ', '\0'])
        }
        (Value::Sequence(a), Value::Sequence(b)) => {
            if a.items().len() != b.items().len() {
                return Err(format!("{tag}: item counts differ"));
            }
            for (i, (p, q)) in a.items().iter().zip(b.items()).enumerate() {
                same_object(p, q).map_err(|why| format!("{tag} item {i}: {why}"))?;
            }
            true
        }
        (Value::PixelSequence(a), Value::PixelSequence(b)) => {
            a.fragments() == b.fragments() && a.offset_table() == b.offset_table()
        }
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(format!("{tag}: {:?} vs {:?}", x.value(), y.value()))
    }
}

/// Meta header fields of a stored file: (transfer syntax, source AE title).
pub fn meta_of(path: &Path) -> (String, String) {
    let object = dicom_object::open_file(path).unwrap();
    let meta = object.meta();
    (
        meta.transfer_syntax().trim_end_matches('\0').to_owned(),
        meta.source_application_entity_title()
            .unwrap_or("")
            .trim()
            .to_owned(),
    )
}

/// Runs a bash script in a new network namespace with only `lo` up (needs root). The
/// script starts its peer in the background as `$peer`, which is stopped at the end.
pub fn in_netns(script: &str) -> Output {
    run(Command::new(require("/usr/bin/unshare"))
        .args(["--net", "bash", "-euc"])
        .arg(format!(
            "ip link set lo up\ntrap 'kill $peer 2>/dev/null; wait $peer 2>/dev/null' EXIT\n{script}"
        )))
}

/// Writes an Orthanc configuration (HTTP 8042, DICOM 4242, AE ORTHANC) under `dir`.
pub fn orthanc_config(dir: &Path) -> PathBuf {
    let storage = dir.join("orthanc");
    std::fs::create_dir_all(&storage).unwrap();
    let config = storage.join("orthanc.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "Name": "cloudpdi-test",
            "StorageDirectory": storage.join("db"),
            "IndexDirectory": storage.join("db"),
            "HttpPort": 8042,
            "DicomPort": 4242,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomCheckCalledAet": true,
            "DicomAlwaysAllowStore": true,
            "Plugins": []
        })
        .to_string(),
    )
    .unwrap();
    config
}

/// Runs the calling test again inside private network and mount namespaces (needs root):
/// the only interface is `lo`, for peers that cannot bind loopback only (Orthanc), and
/// mounts (a small tmpfs for a full disk) stay private. Returns true
/// in the copy that runs inside, which does the work; false in the outer one, after it
/// asserted that the inner run passed.
pub fn isolated(test: &str) -> bool {
    if std::env::var_os("INSIDE_TEST_NETNS").is_some() {
        return true;
    }
    let out = Command::new(require("/usr/bin/unshare"))
        .args([
            "--net",
            "--mount",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("INSIDE_TEST_NETNS", "1")
        .stdout(Stdio::piped())
        .output()
        .expect("run the test in a network namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "{test} failed inside its network namespace:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        tests_run(&stdout),
        Some(1),
        "the inner run of {test} did not run exactly that test (renamed, or not given by \
         its full path?): pass isolated() the test's name as `cargo test -- --list` shows it"
    );
    false
}

/// How many tests a libtest run ran, from its summary line (`test result: ok. 1 passed;
/// 0 failed; 0 ignored; ...`): passed plus failed. `None` without a summary line.
pub fn tests_run(stdout: &str) -> Option<u64> {
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("test result:"))?;
    let count = |word: &str| -> Option<u64> {
        let before = summary.split(&format!(" {word}")).next()?;
        before.rsplit([' ', '.']).next()?.trim().parse().ok()
    };
    Some(count("passed")? + count("failed")?)
}

/// Orthanc, the durable PACS peer, on 127.0.0.1:8042 (REST) and :4242 (DICOM, AE
/// ORTHANC); only inside [`isolated`].
pub struct Orthanc {
    child: Option<Child>,
    config: PathBuf,
}

impl Orthanc {
    /// Starts Orthanc with its database under `dir` and waits until REST answers.
    pub fn start(dir: &Path) -> Orthanc {
        let config = orthanc_config(dir);
        let mut orthanc = Orthanc {
            child: None,
            config,
        };
        orthanc.spawn();
        orthanc
    }

    /// (Re)starts the process on the same database.
    pub fn spawn(&mut self) {
        let log = fs::File::create(self.config.with_extension("log")).unwrap();
        let child = Command::new(require("/usr/sbin/Orthanc"))
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_get("/system").is_none() {
            assert!(Instant::now() < deadline, "Orthanc did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the process (its database stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn try_get(&self, path: &str) -> Option<Vec<u8>> {
        let out = Command::new(require("/usr/bin/curl"))
            .args(["-sf", &format!("http://127.0.0.1:8042{path}")])
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    /// GET a REST path as JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let body = self
            .try_get(path)
            .unwrap_or_else(|| panic!("Orthanc GET {path} failed"));
        serde_json::from_slice(&body).unwrap()
    }

    /// Every instance Orthanc holds, downloaded as Part 10 files into `dir`.
    pub fn download_all(&self, dir: &Path) -> Vec<PathBuf> {
        fs::create_dir_all(dir).unwrap();
        let ids = self.get("/instances");
        ids.as_array()
            .unwrap()
            .iter()
            .map(|id| {
                let id = id.as_str().unwrap();
                let path = dir.join(id);
                let body = self
                    .try_get(&format!("/instances/{id}/file"))
                    .expect("instance file");
                fs::write(&path, body).unwrap();
                path
            })
            .collect()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pydicom corpus (tests/peers/corpus.py): varied transfer syntaxes, SOP classes and
/// character sets, one file per SOP Instance UID.
pub fn corpus_files() -> Vec<PathBuf> {
    let out = run(Command::new("python3").arg(root().join("tests/peers/corpus.py")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let corpus: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    corpus
        .iter()
        .map(|item| PathBuf::from(item["path"].as_str().unwrap()))
        .collect()
}

/// A standalone `cloudpdi repository serve` that knows facility HOSPA (its API key in
/// `key_file`), stopped when dropped.
pub struct Repository {
    child: Child,
    /// Its base URL.
    pub url: String,
    /// Its folder (configuration, storage, audit trail, log).
    pub dir: PathBuf,
    /// HOSPA's API key.
    pub key_file: PathBuf,
}

/// A facility API key from `cloudpdi repository new-key`: (the key, for the facility's
/// key file; the `api_key_sha256 = "..."` line, for the repository's configuration).
pub fn new_api_key() -> (String, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi")).args(["repository", "new-key"]));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = out
        .lines()
        .find_map(|l| {
            l.split_once("shown once): ")
                .map(|(_, k)| k.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("new-key prints a key: {out}"));
    let hash_line = out
        .lines()
        .find(|l| l.starts_with("api_key_sha256"))
        .unwrap_or_else(|| panic!("new-key prints the hash line: {out}"))
        .to_owned();
    (key, hash_line)
}

impl Repository {
    /// Starts one in `dir` on a free loopback port and waits until it answers.
    pub fn start(dir: &Path) -> Repository {
        Repository::start_tuned(dir, "")
    }

    /// As [`Repository::start`], with extra `[server]` settings (e.g. `part_size_mb = 1`).
    pub fn start_tuned(dir: &Path, server_settings: &str) -> Repository {
        Repository::start_binary(
            Path::new(env!("CARGO_BIN_EXE_cloudpdi")),
            dir,
            server_settings,
        )
    }

    /// As [`Repository::start_tuned`], served by `binary` (an older release, for
    /// upgrade tests).
    pub fn start_binary(binary: &Path, dir: &Path, server_settings: &str) -> Repository {
        fs::create_dir_all(dir).unwrap();
        let (key, hash_line) = new_api_key();
        let key_file = dir.join("key");
        fs::write(&key_file, key).unwrap();
        let port = free_port();
        let config = dir.join("repository.toml");
        fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n{server_settings}\n\
                 [storage]\npath = \"{}\"\n\
                 [audit]\npath = \"{}\"\n[facility.HOSPA]\n{hash_line}\n",
                dir.join("store").display(),
                dir.join("audit.jsonl").display()
            ),
        )
        .unwrap();
        let log = dir.join("log");
        let child = Command::new(binary)
            .args(["repository", "serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let repository = Repository {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
            key_file,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the repository did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        repository
    }
}

impl Repository {
    /// The process ID (to stop and continue it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Repository {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` every 200 ms until it finds something, failing the test after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a command printed, stdout then stderr: what a person at the terminal reads,
/// for assertions on messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Drops a copy of a token file into `site`'s watch folder, as staff do with a token
/// they were handed.
pub fn hand_over(token: &Path, site: &Daemon) {
    let inbox = site.dir.join("data/inbox");
    fs::create_dir_all(&inbox).unwrap();
    fs::copy(token, inbox.join(token.file_name().unwrap())).unwrap();
}

/// Sends `files` from calling AE `MODALITY` to the site's route `ct`, waits for the token
/// the site issues and hands it over to the site's own watch folder: one site that sends
/// and imports, the shortest way to exercise the import path.
pub fn send_to_self(site: &Daemon, files: &[PathBuf]) -> PathBuf {
    let out = storescu(site, "MODALITY", &[], files);
    assert!(out.status.success(), "{out:?}");
    let token = wait_for("a token", Duration::from_secs(60), || {
        tokens(site).into_iter().next()
    });
    hand_over(&token, site);
    token
}

/// `cloudpdi send` of the study in `study` on `route` of the daemon configured at `config`
/// (the job recorded in the running daemon): (job ID, token file, slip).
pub fn send_study(config: &Path, route: &str, study: &Path) -> (String, PathBuf, PathBuf) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .env_remove("CLOUDPDI_CONFIG")
        .args(["send", "--config"])
        .arg(config)
        .args(["--route", route])
        .arg(study));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let line = |prefix: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {said}"))
            .trim()
            .to_owned()
    };
    let job = line("recorded as job ");
    let job = job.split(':').next().unwrap().to_owned();
    (
        job,
        PathBuf::from(line("token: ")),
        PathBuf::from(line("slip:  ")),
    )
}

/// The token files a site issued so far on route `ct`, in name order.
pub fn tokens(site: &Daemon) -> Vec<PathBuf> {
    tokens_of(site, "ct")
}

/// The token files a site issued so far on `route`, in name order.
pub fn tokens_of(site: &Daemon, route: &str) -> Vec<PathBuf> {
    let dir = site.dir.join("data/tokens").join(route);
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "token"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Mounts a tmpfs with `options` (e.g. `size=64m`) on `dir` (created if missing): a small
/// disk to fill, inside the test's mount namespace (`isolated`).
pub fn mount_tmpfs(dir: &Path, options: &str) {
    fs::create_dir_all(dir).unwrap();
    let out = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir));
    assert!(out.status.success(), "mount: {out:?}");
}

/// The receiving site of the two-site tests: imports tokens into Orthanc (port 4242),
/// prefixing Patient IDs with the sender's code.
pub fn site_b() -> String {
    "[route.ct]\nae_title = \"CLOUDPDI\"\n\
     [facility]\ncode = \"HOSPB\"\nname = \"Hospital B\"\n\
     [inbound]\npacs = \"127.0.0.1:4242\"\npacs_ae_title = \"ORTHANC\"\n\
     patient_id = \"prefix\"\nissuer = \"HOSPB\"\npoll_interval = 1\nattempts = 2\n"
        .into()
}

impl Orthanc {
    /// Starts Orthanc as [`Orthanc::start`] does, with `settings` (a JSON object, e.g.
    /// `{"AcceptedTransferSyntaxes": [...]}`) added to its configuration.
    pub fn start_with(dir: &Path, settings: serde_json::Value) -> Orthanc {
        let config = orthanc_config(dir);
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
        for (key, value) in settings.as_object().expect("a JSON object") {
            json[key] = value.clone();
        }
        fs::write(&config, json.to_string()).unwrap();
        let mut orthanc = Orthanc {
            child: None,
            config,
        };
        orthanc.spawn();
        orthanc
    }
}

/// The last second of `date` (`YYYY-MM-DD`) in `zone`: the expiry `cloudpdi extend --until`
/// and the reception page's date field ask for.
pub fn end_of_day(zone: &jiff::tz::TimeZone, date: &str) -> i64 {
    zone.to_timestamp(
        jiff::civil::Date::strptime("%Y-%m-%d", date)
            .unwrap()
            .at(23, 59, 59, 0),
    )
    .unwrap()
    .as_second()
}
