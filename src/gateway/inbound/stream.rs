//! The receiving side as one stream: the container is read while it downloads, opened
//! chunk by chunk (only authenticated bytes go further), decompressed, and its PDI read
//! front to back ([`crate::pdi::zip::read_stream`]). The manifest comes first in the
//! archive: every file after it is written into the job's `pdi/` folder while its
//! SHA-256 is computed, checked against its manifest entry, and a DICOM instance that
//! matches is handed to the C-STORE lanes at once ([`crate::dicom::scu::store_stream`]),
//! which were negotiated from the manifest's (SOP class, transfer syntax) pairs.
//!
//! Nothing unauthenticated reaches the PACS: a byte is read from the container only
//! once its chunk authenticated, and an instance is sent only once all its bytes matched
//! the manifest's SHA-256. A container that fails later stops the stream; what was
//! stored is genuine and recorded, so the retry does not send it again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::container::{Compression, ContainerError, ContainerKey, DecryptLimits, Decryptor};
use crate::dicom::scu::Instance;
use crate::gateway::jobs::{Cause, StepError};
use crate::pdi::manifest::{self, Manifest, ManifestFile};
use crate::pdi::zip::{self, StreamEntry, ZipError};
use crate::pdi::{FileSet, PdiError};

/// Longest wait of the container reader for more downloaded bytes before it looks at
/// the file again (the download also wakes it whenever it received more).
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// Largest zstd window the receiver decodes (2^23 = 8 MiB, the window of zstd levels up
/// to 19): a container asking for more would make its reader hold more memory than the
/// daemon's bound.
pub const MAX_ZSTD_WINDOW_LOG: u32 = 23;

/// Verified instances waiting for the C-STORE lanes: the reader stops extracting when
/// the PACS is this far behind, so neither memory nor the folder races ahead unbounded.
pub(super) const INSTANCE_QUEUE: usize = 64;

/// Bytes of verified instances kept in memory for the C-STORE lanes, which then send
/// them from there instead of reading their files back (a CPU pass over the study less
/// on a receiver that shares its cores with the PACS). The files are written all the
/// same: a retry, a transcoding or a storage commitment reads them.
const HELD_BYTES: u64 = 8 << 20;

/// Largest instance kept in memory: a larger one (a multi-frame, a video) is sent from
/// its file, so a few of them cannot take the whole of [`HELD_BYTES`].
const HELD_INSTANCE_MAX: u64 = 4 << 20;

/// Longest wait of the reader for room in [`HELD_BYTES`] before it hands an instance
/// over by its file alone: lanes stuck on a slow PACS never stop the extraction.
const HELD_WAIT: Duration = Duration::from_millis(200);

/// Room for instance bytes in memory ([`HELD_BYTES`]), shared by the reader that fills
/// it and the lanes that empty it.
#[derive(Debug, Default)]
struct Held {
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes of [`Held`] taken for one instance, given back when dropped (when the lanes are
/// done with the instance, or it is dropped unsent).
struct Reservation {
    held: Arc<Held>,
    bytes: u64,
}

impl Held {
    /// Takes `bytes` of room, waiting at most [`HELD_WAIT`] for lanes to free it.
    fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let deadline = std::time::Instant::now() + HELD_WAIT;
        let mut used = self.used.lock().ok()?;
        while used.saturating_add(bytes) > HELD_BYTES {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            used = self.freed.wait_timeout(used, left).ok()?.0;
        }
        *used += bytes;
        Some(Reservation {
            held: self.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut used) = self.held.used.lock() {
            *used = used.saturating_sub(self.bytes);
        }
        self.held.freed.notify_one();
    }
}

/// What the download tells the reader following its file.
#[derive(Debug, Default)]
pub(super) struct Growing {
    state: Mutex<Option<bool>>,
    /// The container's whole size once the repository's answer named it (0 before).
    size: AtomicU64,
    changed: Condvar,
}

impl Growing {
    /// A file still being downloaded, or one already whole (`complete`).
    pub(super) fn new(complete: bool) -> Growing {
        Growing {
            state: Mutex::new(complete.then_some(true)),
            size: AtomicU64::new(0),
            changed: Condvar::new(),
        }
    }

    /// The repository named the container's whole size.
    pub(super) fn sized(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Bytes of the container not in `file` yet: what the download, running alongside the
    /// extraction, will still write. Waits for the repository's answer when it has not
    /// named the size yet (a resumed download); none once the download ended (whole, or
    /// stopped: the reader fails then anyway).
    fn to_come(&self, file: &Path) -> u64 {
        loop {
            if self.ended().is_some() {
                return 0;
            }
            let size = self.size.load(Ordering::Relaxed);
            if size > 0 {
                let have = std::fs::metadata(file).map_or(0, |m| m.len());
                return size.saturating_sub(have);
            }
            self.wait();
        }
    }

    /// More bytes arrived.
    pub(super) fn grew(&self) {
        self.changed.notify_all();
    }

    /// The download ended: every byte is in the file (`true`), or it stopped.
    pub(super) fn end(&self, complete: bool) {
        if let Ok(mut state) = self.state.lock() {
            *state = Some(complete);
        }
        self.changed.notify_all();
    }

    /// The download will say nothing more (the step was dropped, e.g. at shutdown): a
    /// reader still waiting for bytes stops with an error instead of waiting for ever. A
    /// download that already ended keeps its word.
    fn abandon(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.get_or_insert(false);
        }
        self.changed.notify_all();
    }

    fn ended(&self) -> Option<bool> {
        self.state.lock().map_or(Some(false), |s| *s)
    }

    fn wait(&self) {
        if let Ok(state) = self.state.lock() {
            if state.is_none() {
                let _ = self.changed.wait_timeout(state, FOLLOW_POLL);
            }
        }
    }
}

/// Abandons its [`Growing`] when dropped: created before the download and the reader
/// start, so that a cancelled receiving step (the daemon stopping drops it) lets the
/// reader thread end, and the runtime, which waits for that thread, can shut down.
pub(super) struct EndOnDrop(pub(super) Arc<Growing>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Reads a file that a download is still appending to: at its end, waits for more until
/// the download says it is whole (then the end is the end) or stopped (an error).
struct Follow {
    file: File,
    growing: Arc<Growing>,
    /// Bytes read so far (for the expansion bound of a compressed container).
    read: Arc<AtomicU64>,
}

impl Read for Follow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let ended = self.growing.ended();
            let n = self.file.read(buf)?;
            if n > 0 || buf.is_empty() {
                self.read.fetch_add(n as u64, Ordering::Relaxed);
                return Ok(n);
            }
            match ended {
                Some(true) => return Ok(0),
                Some(false) => {
                    return Err(io::Error::other(
                        "the download stopped before the end of the container",
                    ));
                }
                None => self.growing.wait(),
            }
        }
    }
}

/// Refuses plaintext beyond the receiver's bounds while it streams: the whole
/// (`inbound.max_document_mb`) and, for a compressed container, the expansion per
/// container byte read so far ([`DecryptLimits`]).
struct Bounded<R> {
    inner: R,
    written: u64,
    limits: DecryptLimits,
    compressed: bool,
    container: Arc<AtomicU64>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.written = self.written.saturating_add(n as u64);
        if self.written > self.limits.max_output {
            return Err(ContainerError::OutputTooLarge {
                limit: self.limits.max_output,
            }
            .into());
        }
        if self.compressed {
            let limit = self
                .container
                .load(Ordering::Relaxed)
                .saturating_mul(self.limits.max_ratio)
                .max(self.limits.ratio_floor);
            if self.written > limit {
                return Err(ContainerError::Expansion {
                    ratio: self.limits.max_ratio,
                    limit,
                }
                .into());
            }
        }
        Ok(n)
    }
}

/// zstd data that cannot be decoded although it authenticated (the sender compressed
/// with a window beyond [`MAX_ZSTD_WINDOW_LOG`], or wrote no zstd at all): final, said
/// as such rather than as a failed read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the container's compressed content cannot be decoded here ({0}); this receiver \
     decodes zstd windows up to 8 MiB (levels up to 19, no long mode): ask the sender to \
     send the study again with outbound.zstd_level at most 19"
)]
struct Undecodable(String);

/// The zstd decoder, its own failures told apart from those of the container below it.
struct Zstd<R>(R);

impl<R: Read> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.get_ref()
                .is_some_and(|inner| inner.is::<ContainerError>())
            {
                e
            } else {
                io::Error::new(io::ErrorKind::InvalidData, Undecodable(e.to_string()))
            }
        })
    }
}

/// What the stream learned from the manifest, for the C-STORE lanes.
#[derive(Debug, Clone)]
pub(super) struct Negotiation {
    /// The (SOP class, transfer syntax) pairs of the instances.
    pub pairs: BTreeSet<(String, String)>,
    /// DICOM instances the manifest lists.
    pub instances: u64,
}

/// How the stream ended when it did not fail.
#[derive(Debug)]
pub(super) enum Streamed {
    /// Every file written and checked; the set passed [`crate::pdi::verify_extracted`].
    Whole {
        /// What the set holds.
        summary: crate::pdi::Summary,
    },
    /// The archive does not start with the manifest (a container from an older sender):
    /// nothing was sent; the job goes the way of extract-then-verify-then-import.
    ManifestLast,
}

/// Why the stream stopped early: an old archive (not an error), or a failure.
enum Stop {
    ManifestLast,
    Failed(StepError),
}

impl From<ZipError> for Stop {
    fn from(e: ZipError) -> Self {
        Stop::Failed(unwrap_container(PdiError::from(e)))
    }
}

impl From<PdiError> for Stop {
    fn from(e: PdiError) -> Self {
        Stop::Failed(unwrap_container(e))
    }
}

impl From<StepError> for Stop {
    fn from(e: StepError) -> Self {
        Stop::Failed(e)
    }
}

/// A container error that surfaced through the ZIP reader (an authentication failure,
/// a bound) is reported as the container's, not as a damaged archive.
fn unwrap_container(e: PdiError) -> StepError {
    if let PdiError::Zip(ZipError::Io(io)) = &e {
        if let Some(container) = io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<ContainerError>())
        {
            return StepError::from(container.clone());
        }
        if let Some(undecodable) = io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<Undecodable>())
        {
            return StepError::permanent(undecodable).with_cause(Cause::InvalidContainer);
        }
    }
    StepError::from(e)
}

/// The inputs of [`read`].
pub(super) struct Source {
    /// The container file being downloaded (or already whole).
    pub container: PathBuf,
    /// What the download says about it.
    pub growing: Arc<Growing>,
    /// The token's container key.
    pub key: ContainerKey,
    /// The receiver's bounds.
    pub limits: DecryptLimits,
    /// Where the PDI is written (must not exist).
    pub pdi: PathBuf,
    /// SOP Instance UIDs an earlier attempt stored: checked, not sent again.
    pub stored: HashSet<String>,
}

/// Reads the container as it downloads into `source.pdi`, sending the manifest's
/// negotiation once and every verified instance not stored yet to `instances`
/// (blocking: run it on a blocking thread).
///
/// # Errors
/// [`StepError`]: the container does not authenticate or exceeds a bound, the archive
/// is unsafe, a file does not match the manifest, the set is not whole.
pub(super) fn read(
    source: Source,
    negotiation: tokio::sync::oneshot::Sender<Negotiation>,
    instances: &tokio::sync::mpsc::Sender<Instance>,
) -> Result<Streamed, StepError> {
    let file = File::open(&source.container)
        .map_err(|e| StepError::file("read", &source.container, &e))?;
    let read = Arc::new(AtomicU64::new(0));
    let follow = Follow {
        file,
        growing: source.growing.clone(),
        read: read.clone(),
    };
    let decryptor = Decryptor::new(&source.key, BufReader::with_capacity(1 << 20, follow))?;
    let compressed = decryptor.header().compression == Compression::Zstd;
    let plain: Box<dyn Read> = if compressed {
        let mut decoder = zstd::stream::read::Decoder::new(decryptor)
            .map_err(|e| StepError::from(ContainerError::from(e)))?;
        decoder
            .window_log_max(MAX_ZSTD_WINDOW_LOG)
            .map_err(|e| StepError::from(ContainerError::from(e)))?;
        Box::new(Zstd(decoder))
    } else {
        Box::new(decryptor)
    };
    let bounded = Bounded {
        inner: plain,
        written: 0,
        limits: source.limits,
        compressed,
        container: read,
    };
    private_dir(&source.pdi, false).map_err(|e| StepError::file("create", &source.pdi, &e))?;
    let mut writer = Writer {
        root: &source.pdi,
        download: (&source.growing, &source.container),
        manifest: None,
        matched: HashSet::new(),
        negotiation: Some(negotiation),
        instances,
        stored: &source.stored,
        held: Arc::default(),
    };
    let limits = zip::Limits {
        max_total_bytes: source.limits.max_output,
        ..zip::Limits::default()
    };
    let result = zip::read_stream(
        bounded,
        limits,
        |entry: &StreamEntry, data: &mut dyn Read| writer.entry(entry, data),
    );
    match result {
        Ok(_) => {}
        Err(Stop::ManifestLast) => return Ok(Streamed::ManifestLast),
        Err(Stop::Failed(e)) => return Err(e),
    }
    let Some(listed) = writer.manifest else {
        return Err(PdiError::Broken(format!("the archive holds no {}", manifest::PATH)).into());
    };
    if writer.matched.len() != listed.files.len() {
        let missing = listed
            .files
            .keys()
            .find(|path| !source.pdi.join(path).exists())
            .cloned()
            .unwrap_or_default();
        return Err(PdiError::Broken(format!(
            "the manifest lists {missing}, which the archive does not hold"
        ))
        .into());
    }
    let summary = crate::pdi::verify_extracted(&source.pdi, &writer.matched)?;
    Ok(Streamed::Whole { summary })
}

/// The manifest as the stream keeps it: each file by path.
struct Listed {
    files: HashMap<String, ManifestFile>,
}

/// Writes the entries of the stream and hands verified instances on.
struct Writer<'a> {
    root: &'a Path,
    /// The download writing the container alongside, and the container's file.
    download: (&'a Growing, &'a Path),
    manifest: Option<Listed>,
    /// Files written and matched against the manifest: the final check of the set does
    /// not hash them again.
    matched: HashSet<PathBuf>,
    negotiation: Option<tokio::sync::oneshot::Sender<Negotiation>>,
    instances: &'a tokio::sync::mpsc::Sender<Instance>,
    stored: &'a HashSet<String>,
    /// Room for instances handed over in memory.
    held: Arc<Held>,
}

impl Writer<'_> {
    fn entry(&mut self, entry: &StreamEntry, data: &mut dyn Read) -> Result<(), Stop> {
        let relative = zip::check_name(entry.name.trim_end_matches('/')).map_err(|why| {
            ZipError::UnsafeName {
                name: entry.name.clone(),
                why,
            }
        })?;
        let target = self.root.join(&relative);
        if entry.directory {
            private_dir(&target, true).map_err(|e| StepError::file("create", &target, &e))?;
            return Ok(());
        }
        let Some(listed) = &self.manifest else {
            if entry.name != manifest::PATH {
                return Err(Stop::ManifestLast);
            }
            let (bytes, _) = write_file(&target, data, manifest::MAX_BYTES, Some(0))?;
            let manifest = FileSet::parse_manifest(&bytes)?;
            let declared = manifest
                .files
                .iter()
                .fold(0u64, |sum, f| sum.saturating_add(f.size));
            let (growing, container) = self.download;
            super::room_for(self.root, declared, growing.to_come(container))?;
            self.begin(manifest);
            return Ok(());
        };
        let Some(expected) = listed.files.get(&entry.name) else {
            return Err(PdiError::Broken(format!("{} is not in the manifest", entry.name)).into());
        };
        if expected.size != entry.size {
            return Err(mismatch(
                expected,
                format!(
                    "size {} in the manifest, {} in the archive",
                    expected.size, entry.size
                ),
            ));
        }
        let dicom = expected.dicom.as_ref();
        let reservation = dicom
            .filter(|d| !self.stored.contains(&d.sop_instance_uid))
            .filter(|_| entry.size <= HELD_INSTANCE_MAX)
            .and_then(|_| self.held.reserve(entry.size));
        let keep = reservation.as_ref().map(|r| r.bytes);
        let (bytes, digest) = write_file(&target, data, entry.size, keep)?;
        if !expected.names_digest(&digest) {
            return Err(mismatch(expected, manifest::SHA256_MISMATCH.into()));
        }
        self.matched.insert(target.clone());
        if dicom.is_some() {
            // What the memory copy cannot tell (a meta header it cannot parse) the file
            // decides, as it does for an instance handed over without its bytes.
            let instance = match reservation {
                Some(reservation) => {
                    Instance::in_memory(&target, bytes, Box::new(reservation)).ok()
                }
                None => None,
            };
            let instance = match instance {
                Some(instance) => instance,
                None => Instance::probe(&target).map_err(StepError::permanent)?,
            };
            if !self.stored.contains(&instance.sop_instance_uid)
                && self.instances.blocking_send(instance).is_err()
            {
                return Err(StepError::transient(
                    "the C-STORE lanes stopped before the study was read",
                )
                .into());
            }
        }
        Ok(())
    }

    /// Keeps the manifest and tells the lanes what to negotiate.
    fn begin(&mut self, manifest: Manifest) {
        let pairs = manifest
            .files
            .iter()
            .filter_map(|f| f.dicom.as_ref())
            .map(|d| (d.sop_class_uid.clone(), d.transfer_syntax_uid.clone()))
            .collect();
        let instances = manifest.files.iter().filter(|f| f.dicom.is_some()).count() as u64;
        if let Some(negotiation) = self.negotiation.take() {
            // The lanes' side ends only with the job; nothing to tell then.
            let _ = negotiation.send(Negotiation { pairs, instances });
        }
        self.manifest = Some(Listed {
            files: manifest
                .files
                .into_iter()
                .map(|f| (f.path.clone(), f))
                .collect(),
        });
    }
}

fn mismatch(file: &ManifestFile, why: String) -> Stop {
    Stop::Failed(PdiError::Broken(format!("manifest entry {}: {why}", file.path)).into())
}

/// Writes `data` (at most `max` bytes) into the new file `path` (mode 0600), hashing it;
/// returns the bytes when asked to `keep` them (the manifest, an instance handed over in
/// memory; with the capacity to reserve for them), else nothing, and the SHA-256.
fn write_file(
    path: &Path,
    data: &mut dyn Read,
    max: u64,
    keep: Option<u64>,
) -> Result<(Vec<u8>, [u8; 32]), Stop> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        private_dir(parent, true).map_err(|e| StepError::file("create", parent, &e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StepError::file("create", path, &e))?;
    let too_large = || -> Stop {
        PdiError::Broken(format!(
            "{} holds more than {max} bytes, more than it may",
            path.display()
        ))
        .into()
    };
    let mut hasher = Sha256::new();
    if let Some(capacity) = keep {
        // Read straight into the bytes kept, then hashed and written from there: no copy
        // through a read buffer (a pass over the study less on a receiver that shares its
        // cores with the PACS).
        let mut kept = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        (&mut *data)
            .take(max.saturating_add(1))
            .read_to_end(&mut kept)
            .map_err(|e| Stop::from(ZipError::from_io(e)))?;
        if kept.len() as u64 > max {
            return Err(too_large());
        }
        hasher.update(&kept);
        file.write_all(&kept)
            .map_err(|e| StepError::file("write", path, &e))?;
        return Ok((kept, hasher.finalize().into()));
    }
    let mut out = io::BufWriter::with_capacity(1 << 18, file);
    let mut buffer = vec![0u8; 1 << 18];
    let mut total = 0u64;
    loop {
        let n = data
            .read(&mut buffer)
            .map_err(|e| Stop::from(ZipError::from_io(e)))?;
        if n == 0 {
            break;
        }
        total = total.saturating_add(n as u64);
        if total > max {
            return Err(too_large());
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n])
            .map_err(|e| StepError::file("write", path, &e))?;
    }
    out.flush()
        .map_err(|e| StepError::file("write", path, &e))?;
    Ok((Vec::new(), hasher.finalize().into()))
}

/// Creates a folder readable by its owner only (an extracted set holds patient data).
fn private_dir(path: &Path, recursive: bool) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(0o700)
        .create(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{Encryptor, Options};
    use crate::pdi::zip::ZipWriter;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn a_file_is_written_hashed_and_bounded_whether_kept_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let digest: [u8; 32] = Sha256::digest(&data).into();
        for (name, keep) in [("kept", Some(data.len() as u64)), ("streamed", None)] {
            let path = dir.path().join(name);
            let Ok((bytes, hash)) =
                write_file(&path, &mut data.as_slice(), data.len() as u64, keep)
            else {
                panic!("{name}: not written");
            };
            assert_eq!(hash, digest, "{name}");
            assert_eq!(std::fs::read(&path).expect("written"), data, "{name}");
            assert_eq!(
                bytes.is_empty(),
                keep.is_none(),
                "{name}: kept only when asked"
            );
            if keep.is_some() {
                assert_eq!(bytes, data, "{name}");
            }
            let over = dir.path().join(format!("{name}.over"));
            let refused = write_file(&over, &mut data.as_slice(), data.len() as u64 - 1, keep);
            match refused {
                Err(Stop::Failed(e)) => assert!(e.to_string().contains("more than"), "{name}: {e}"),
                _ => panic!("{name}: a file longer than its bound is refused"),
            }
        }
    }

    /// A PDI whose manifest lists one file `DICOM/A` holding `data`.
    fn pdi(data: &[u8]) -> Vec<u8> {
        let manifest = serde_json::json!({
            "format": manifest::FORMAT,
            "version": 1,
            "file_set_id": "X",
            "facility": "",
            "created": "2026-01-01T00:00:00Z",
            "files": [{
                "path": "DICOM/A",
                "size": data.len(),
                "sha256": hex::encode(Sha256::digest(data)),
            }],
        });
        let mut zip = ZipWriter::new(Vec::new(), 0);
        zip.add_bytes(manifest::PATH, manifest.to_string().as_bytes())
            .expect("add");
        zip.add_bytes("DICOM/A", data).expect("add");
        zip.finish().expect("finish")
    }

    /// Seals `payload` (already zstd data) as a zstd container into `path`.
    fn seal_zstd(path: &Path, payload: &[u8]) {
        let options = Options {
            compression: Compression::Zstd,
            ..Options::default()
        };
        let key = ContainerKey::from_bytes(KEY);
        let mut sealer = Encryptor::new(&key, &options, Vec::new()).expect("sealer");
        sealer.write_all(payload).expect("seal");
        std::fs::write(path, sealer.finish().expect("finish")).expect("write");
    }

    /// Streams the whole container at `container`; the error's text, if any.
    fn stream(dir: &Path, container: &Path, limits: DecryptLimits) -> Result<(), String> {
        let (negotiated, _negotiation) = tokio::sync::oneshot::channel();
        let (instances, _feed) = tokio::sync::mpsc::channel(4);
        let source = Source {
            container: container.to_owned(),
            growing: Arc::new(Growing::new(true)),
            key: ContainerKey::from_bytes(KEY),
            limits,
            pdi: dir.join("pdi"),
            stored: HashSet::new(),
        };
        read(source, negotiated, &instances)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// The room for instances in memory is bounded: a reservation beyond it waits for
    /// one to be given back (woken at once), and gives up after [`HELD_WAIT`] so the
    /// instance goes by its file.
    #[test]
    fn instance_bytes_in_memory_are_bounded_and_given_back() {
        let held = Arc::new(Held::default());
        let quarter = HELD_BYTES / 4;
        let mut taken: Vec<Reservation> = (0..4)
            .map(|_| held.reserve(quarter).expect("room"))
            .collect();
        let started = std::time::Instant::now();
        assert!(held.reserve(1).is_none(), "full");
        assert!(started.elapsed() >= HELD_WAIT, "{:?}", started.elapsed());

        let waiter = {
            let held = held.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                (held.reserve(quarter).is_some(), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(taken.pop());
        let (got, waited) = waiter.join().expect("waiter");
        assert!(got, "room given back is taken");
        assert!(waited < HELD_WAIT, "woken by the release: {waited:?}");
        assert_eq!(
            *held.used.lock().expect("lock"),
            3 * quarter,
            "the waiter's let go"
        );
        drop(taken);
        assert_eq!(*held.used.lock().expect("lock"), 0, "all given back");
    }

    /// A zstd frame asking for a 16 MiB window is refused, for good, with the reason.
    #[test]
    fn a_zstd_window_beyond_8_mib_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = vec![0u8; 9 << 20];
        let mut x = 1u32;
        for byte in &mut data {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("encoder");
        encoder.window_log(24).expect("window");
        encoder.write_all(&pdi(&data)).expect("compress");
        let container = dir.path().join("container");
        seal_zstd(&container, &encoder.finish().expect("finish"));
        let error = stream(dir.path(), &container, DecryptLimits::default()).expect_err("refused");
        assert!(error.contains("zstd windows up to 8 MiB"), "{error}");
        assert!(!error.contains("will retry"), "final: {error}");
    }

    /// A container whose zstd content expands beyond the ratio is refused while it
    /// streams, for good.
    #[test]
    fn a_decompression_bomb_is_refused_while_streaming() {
        let dir = tempfile::tempdir().expect("tempdir");
        let container = dir.path().join("container");
        let zeros = vec![0u8; 8 << 20];
        seal_zstd(
            &container,
            &zstd::encode_all(&pdi(&zeros)[..], 19).expect("zstd"),
        );
        let limits = DecryptLimits {
            max_ratio: 10,
            ratio_floor: 1 << 20,
            ..DecryptLimits::default()
        };
        let error = stream(dir.path(), &container, limits).expect_err("refused");
        assert!(error.contains("expands to more than 10 times"), "{error}");
        assert!(!error.contains("will retry"), "final: {error}");
        // Within the default bounds the same container streams to its end (where the
        // set is found to have no DICOMDIR).
        std::fs::remove_dir_all(dir.path().join("pdi")).expect("clean");
        let error = stream(dir.path(), &container, DecryptLimits::default()).expect_err("no set");
        assert!(error.contains("DICOMDIR"), "{error}");
        assert_eq!(
            std::fs::metadata(dir.path().join("pdi/DICOM/A"))
                .expect("file")
                .len(),
            8 << 20
        );
    }
}
