//! The streaming step of the outbound pipeline: PDI build -> zstd (optional) -> seal ->
//! parts uploaded as they are produced, overlapping, without writing the PDI ZIP or the
//! container before the upload starts.
//!
//! One blocking producer thread builds the ZIP into the compressor and the encryptor,
//! whose output a part cutter writes to `container.partial` (no fsync per part); at the
//! end of each part of the repository's part size it flushes the file and hands the
//! uploader only the part's place (number, offset, length) over a bounded channel. The
//! uploader PUTs up to `outbound.parts_in_flight` parts at once (counting the one queued),
//! each streamed from the file and hashed as it is sent (parts are never held in memory:
//! the daemon's memory does not grow with the part size), and appends the number of every
//! part the repository acknowledged to `acked`. At the end of the stream the file is synced and renamed to `container`, and
//! the document is completed with the part hashes.
//!
//! Resume after a crash: with `container` present (the stream had finished), only the
//! parts not both held by the repository and listed in `acked` are sent again, from the
//! file. With only `container.partial`, the stream runs again from the start into the
//! same document with a fresh salt (a fresh payload key: never two plaintexts under one
//! nonce); parts are overwritten, and those beyond the new end are deleted by the
//! repository at completion.
//!
//! The route's repository is checked before either: a document at a repository the route
//! no longer names, or gone from it (404, 410), is replaced by a new streamed document. A
//! repository older than streamed documents (it refuses a create without a size) gets the
//! container sealed whole first, then a sized document and the finished container's upload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::clock::now_ms;
use crate::container::{self, Compression, ParallelEncryptor};
use crate::durable;
use crate::gateway::jobs::{StepError, blocking};
use crate::gateway::store::JobStore;
use crate::pdi::{self, BuildOptions, BuildReport, KnownHash};
use crate::repository::api::{NewDocument, State};
use crate::repository::client::{Client, ClientError};

use super::OutboundJob;
use super::sender::{Sender, Workdir};

/// What one stream sends: the instances and attachments, and whether to compress.
pub struct StreamInput {
    /// The instances (files or folders).
    pub files: Vec<PathBuf>,
    /// Extra files put into the PDI (`cloudpdi send --attach`).
    pub attachments: Vec<PathBuf>,
    /// Whether the container is zstd-compressed (the route's `compress`, unless the
    /// instances are mostly compressed already: [`worth_compressing`]).
    pub compress: bool,
    /// The instances' hashes computed at reception ([`BuildOptions::known`]).
    pub known: HashMap<PathBuf, KnownHash>,
}

/// Transfer syntaxes whose pixel data is already compressed: JPEG, JPEG-LS, JPEG 2000,
/// HTJ2K, MPEG and HEVC video (all `1.2.840.10008.1.2.4.*`), RLE, and deflated.
pub fn is_compressed_syntax(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.1.2.4.")
        || uid == "1.2.840.10008.1.2.5"
        || uid == "1.2.840.10008.1.2.1.99"
}

/// Whether zstd is worth running over instances of these (transfer syntax, bytes): not
/// when at least half of the bytes are in a compressed transfer syntax (zstd would spend
/// the stream's time for a few percent).
pub fn worth_compressing<'a>(instances: impl IntoIterator<Item = (&'a str, u64)>) -> bool {
    let (mut compressed, mut total) = (0u64, 0u64);
    for (syntax, size) in instances {
        total = total.saturating_add(size);
        if is_compressed_syntax(syntax) {
            compressed = compressed.saturating_add(size);
        }
    }
    compressed.saturating_mul(2) < total || total == 0
}

/// Largest part size accepted from a repository: a Cloud-PDI repository's
/// `server.part_size_mb` is at most 256; a larger answer is refused before the stream
/// starts.
const MAX_PART_SIZE: usize = 256 << 20;

/// Bytes of `container.partial` buffered before a write to disk.
const FILE_BUFFER: usize = 1 << 20;

impl Sender {
    /// Builds, seals and uploads the job's PDI in one stream, or resumes it (module
    /// documentation); records instances, exclusions and the container size in `job`
    /// (stored in `store` before the container is renamed into place).
    pub(super) async fn stream(
        &self,
        dir: &Workdir,
        job: &mut OutboundJob,
        input: StreamInput,
        store: Option<&JobStore>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), StepError> {
        let link = self.link(&job.route)?;
        let client = link.client.clone();
        let _ = std::fs::remove_file(dir.0.join("pdi.zip"));
        if job.repository.as_deref() != Some(link.url.as_str()) {
            // Created at a repository the route no longer uses: a new document at the
            // route's repository takes a new stream (checked before the resume below).
            job.document_id = None;
        }
        if dir.container().exists() && job.document_id.is_some() {
            let id = job.document_id.clone().unwrap_or_default();
            let path = dir.container();
            job.container_bytes = std::fs::metadata(&path)
                .map_err(|e| StepError::file("read", &path, &e))?
                .len();
            let result = match read_acked(&dir.acked()) {
                Some(acked) => client.resume_upload(&id, &path, &acked, progress).await,
                // A container sealed before streaming (a job recorded at `seal` or
                // `upload`): its sized document holds only parts of this file.
                None => client.upload_file(&id, &path, progress).await,
            };
            match result {
                Err(e) if vanished(&e) => {
                    // Swept, revoked or expired at the repository: a new document takes a
                    // new stream.
                    job.document_id = None;
                }
                other => return other.map(drop).map_err(StepError::from),
            }
        }
        let streamed = self.streamed_document(dir, job, &client, store).await?;
        let partial = dir.partial();
        for stale in [&partial, &dir.container(), &dir.acked()] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StepError::file("remove", stale, &e)),
            }
        }
        durable::create_dir_all(&dir.0).map_err(|e| StepError::file("create", &dir.0, &e))?;
        let Some(part_size) = streamed else {
            return self
                .sealed_then_uploaded(dir, job, input, store, progress)
                .await;
        };
        let id = job.document_id.clone().unwrap_or_default();
        let acked = open_acked(&dir.acked())?;
        // Read by the uploads at explicit offsets, through this handle: it stays valid when
        // the finished file is renamed while the last parts are still being sent.
        let file = create_partial(&partial)?;
        let reader = std::sync::Arc::new(
            file.try_clone()
                .map_err(|e| StepError::file("open", &partial, &e))?,
        );
        let in_flight = self.config.outbound.parts_in_flight.max(1);
        // One part waits in the channel, the others upload: `in_flight` parts in all.
        let (parts, received) = mpsc::channel::<Cut>(1);
        let producer = self.producer(job, input, dir, file, part_size, parts)?;
        let produced = async {
            let (report, bytes) = blocking(producer).await?;
            job.instances = report.instances as u64;
            job.excluded = report.excluded as u64;
            job.container_bytes = bytes;
            if let Some(store) = store {
                store.put(job)?;
            }
            std::fs::rename(&partial, dir.container())
                .and_then(|()| durable::sync_dir(&dir.0))
                .map_err(|e| StepError::file("rename", &partial, &e))?;
            Ok::<u64, StepError>(bytes)
        };
        let uploaded = upload_parts(
            &client,
            &id,
            (&reader, &partial),
            received,
            in_flight.saturating_sub(1).max(1),
            acked,
            progress,
        );
        let (produced, uploaded) = tokio::join!(produced, uploaded);
        // The producer's error is the cause when it stopped first; else the upload's.
        let (size, hashes) = match (produced, uploaded) {
            (Ok(size), Ok(hashes)) => (size, hashes),
            (Err(e), Ok(_)) => return Err(e),
            (_, Err(e)) => return Err(e.into()),
        };
        let hashes: Vec<[u8; 32]> = hashes.into_values().collect();
        if u64::try_from(hashes.len()).ok() != Some(size.div_ceil(part_size as u64)) {
            return Err(StepError::transient(format!(
                "the stream produced {size} bytes but {} parts were uploaded; the parts are \
                 checked again on the next attempt",
                hashes.len()
            )));
        }
        client
            .complete_parts(&id, size, &hashes)
            .await
            .map(drop)
            .map_err(StepError::from)
    }

    /// For a repository older than streamed documents (it refuses a create without a
    /// size): the stream seals the container into `container.partial` without uploading,
    /// then a sized document is created (kept in the job record before the container is
    /// renamed into place, so a restart resumes its upload) and the finished container
    /// uploaded, as before streaming. Slower (the upload waits for the whole container),
    /// but studies get through until the repository is upgraded.
    async fn sealed_then_uploaded(
        &self,
        dir: &Workdir,
        job: &mut OutboundJob,
        input: StreamInput,
        store: Option<&JobStore>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), StepError> {
        let link = self.link(&job.route)?;
        warn!(
            job = %job.id,
            "the repository at {} does not accept streamed documents (it is older than this \
             gateway): the container is sealed first, then uploaded; upgrade the repository \
             to stream (docs/repository.md, \"Upgrades\")",
            link.url
        );
        let partial = dir.partial();
        let file = create_partial(&partial)?;
        // Nothing is uploaded while the container is sealed: the cut parts are dropped.
        let (parts, mut received) = mpsc::channel::<Cut>(1);
        let producer = self.producer(job, input, dir, file, MAX_PART_SIZE, parts)?;
        let drained = async { while received.recv().await.is_some() {} };
        let (produced, ()) = tokio::join!(blocking(producer), drained);
        let (report, bytes) = produced?;
        job.instances = report.instances as u64;
        job.excluded = report.excluded as u64;
        job.container_bytes = bytes;
        let route = self.route_options(&job.route)?;
        let request = NewDocument {
            size: Some(bytes),
            expires_at: u64::from(job.expires_at),
            max_downloads: route.max_downloads,
            proof_hash: Self::secret(dir)?.download_proof().hash(),
        };
        let created = link.client.create(&request).await?;
        job.document_id = Some(created.document_id.clone());
        job.repository = Some(link.url.clone());
        if let Some(store) = store {
            store.put(job)?;
        }
        let container = dir.container();
        std::fs::rename(&partial, &container)
            .and_then(|()| durable::sync_dir(&dir.0))
            .map_err(|e| StepError::file("rename", &partial, &e))?;
        link.client
            .upload_file(&created.document_id, &container, progress)
            .await
            .map(drop)
            .map_err(StepError::from)
    }

    /// The job's streamed document (created once, without a size, and kept in the job
    /// record at once); returns its part size, or `None` when the repository is older
    /// than streamed documents (it refuses a create without a size:
    /// [`Sender::sealed_then_uploaded`]).
    async fn streamed_document(
        &self,
        dir: &Workdir,
        job: &mut OutboundJob,
        client: &Client,
        store: Option<&JobStore>,
    ) -> Result<Option<usize>, StepError> {
        let route = self.route_options(&job.route)?;
        let link = self.link(&job.route)?;
        if let Some(id) = &job.document_id {
            // A sized document (of a job recorded before streaming), one that cannot take
            // parts any more, or one already swept (404/410) is left to expire; a new one
            // takes the stream.
            match client.status(id).await {
                Ok(status) if status.state == State::Uploading && status.size == 0 => {
                    return part_size(status.part_size).map(Some);
                }
                Ok(_) => {}
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let secret = Self::secret(dir)?;
        let expires = now_ms() / 1000 + u64::from(route.expires_in_days) * 86_400;
        job.expires_at = u32::try_from(expires)
            .map_err(|_| StepError::permanent("expiry beyond the year 2106"))?;
        let request = NewDocument {
            size: None,
            expires_at: u64::from(job.expires_at),
            max_downloads: route.max_downloads,
            proof_hash: secret.download_proof().hash(),
        };
        let created = match client.create(&request).await {
            Ok(created) => created,
            Err(ClientError::Refused {
                status: 400,
                code,
                message,
            }) if code == "invalid_request" && message.contains("missing field `size`") => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        job.document_id = Some(created.document_id);
        job.repository = Some(link.url.clone());
        if let Some(store) = store {
            store.put(job)?;
        }
        part_size(created.part_size).map(Some)
    }

    /// The blocking work of one stream: build -> compress -> seal -> cut into parts.
    /// Returns the build report and the container's size.
    fn producer(
        &self,
        job: &OutboundJob,
        input: StreamInput,
        dir: &Workdir,
        file: std::fs::File,
        part_size: usize,
        parts: mpsc::Sender<Cut>,
    ) -> Result<impl FnOnce() -> Result<(BuildReport, u64), StepError> + use<>, StepError> {
        let options = BuildOptions {
            facility: self.config.facility.name.clone(),
            attachments: input.attachments,
            policy: self.route_options(&job.route)?.ai_support.clone(),
            // On the data disk with the job, not in a tmpfs /tmp; removed by the build,
            // or with the job's folder after a crash.
            scratch: Some(dir.0.clone()),
            known: input.known,
            ..BuildOptions::default()
        };
        let key = Self::secret(dir)?.container_key();
        let container_options = container::Options {
            compression: if input.compress {
                Compression::Zstd
            } else {
                Compression::None
            },
            zstd_level: self.config.outbound.zstd_level,
            ..container::Options::default()
        };
        // 0 (one per core) is capped like a number given: each worker costs memory.
        let zstd_threads = container::parallel::threads(self.config.outbound.zstd_threads as usize)
            .min(crate::config::MAX_ZSTD_THREADS as usize);
        let partial = dir.partial();
        let files = input.files;
        Ok(move || {
            let cutter = PartCutter::new(file, part_size, parts);
            let file_error = |e: std::io::Error| StepError::file("write", &partial, &e);
            let mut sealer = ParallelEncryptor::new(&key, &container_options, 1, cutter)?;
            let report = match container_options.compression {
                Compression::None => build(&files, &options, &mut sealer, &partial)?,
                Compression::Zstd => {
                    let level = container_options.zstd_level;
                    let mut zstd = zstd::stream::write::Encoder::new(&mut sealer, level)
                        .map_err(file_error)?;
                    if zstd_threads > 1 {
                        zstd.multithread(u32::try_from(zstd_threads).unwrap_or(u32::MAX))
                            .map_err(file_error)?;
                    }
                    let report = build(&files, &options, &mut zstd, &partial)?;
                    zstd.finish().map_err(file_error)?;
                    report
                }
            };
            let bytes = sealer.finish()?.finish().map_err(file_error)?;
            Ok((report, bytes))
        })
    }
}

/// Builds the PDI ZIP into `out`; refuses a set left empty by the AI-image policy before
/// the stream ends (so nothing is completed).
fn build(
    files: &[PathBuf],
    options: &BuildOptions,
    out: impl Write,
    partial: &Path,
) -> Result<BuildReport, StepError> {
    let report = pdi::build_zip(files, options, out).map_err(|e| match e {
        // Reading an instance or writing the stream failed (disk full, upload stopped):
        // name the file being written, as every local file error of a step does.
        pdi::PdiError::Zip(pdi::zip::ZipError::Io(e)) => StepError::file("build", partial, &e),
        other => other.into(),
    })?;
    if report.instances == 0 {
        return Err(StepError::permanent(
            "no instance left to send after the AI-image policy",
        ));
    }
    Ok(report)
}

/// The repository's part size as a buffer length (at least 1 byte).
fn part_size(size: u64) -> Result<usize, StepError> {
    usize::try_from(size)
        .ok()
        .filter(|&n| n > 0 && n <= MAX_PART_SIZE)
        .ok_or_else(|| {
            StepError::permanent(format!(
                "the repository's part size ({size} bytes) is not between 1 byte and {} \
                 bytes; check the repository URL (a Cloud-PDI repository uses 1 to 256 MiB)",
                MAX_PART_SIZE
            ))
        })
}

/// Whether a repository answer says the document is gone (404, or 410 for a swept,
/// revoked or expired one): a new document is created rather than failing the job.
fn vanished(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::NotAvailable
            | ClientError::Refused {
                status: 404 | 410,
                ..
            }
    )
}

/// Creates `container.partial` (exclusively, mode 0600), readable for the uploads.
fn create_partial(path: &Path) -> Result<std::fs::File, StepError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StepError::file("create", path, &e))
}

/// Where one part of the container is in `container.partial`.
#[derive(Debug, Clone, Copy)]
struct Cut {
    n: u32,
    offset: u64,
    len: u64,
}

/// The end of the sealed stream: every byte to `container.partial`, and the place of each
/// full part (the last one shorter), once its bytes are in the file, to the uploader.
struct PartCutter {
    file: std::io::BufWriter<std::fs::File>,
    part_size: u64,
    /// Bytes of the current part written so far.
    filled: u64,
    next: u32,
    written: u64,
    parts: mpsc::Sender<Cut>,
}

impl PartCutter {
    fn new(file: std::fs::File, part_size: usize, parts: mpsc::Sender<Cut>) -> PartCutter {
        PartCutter {
            file: std::io::BufWriter::with_capacity(FILE_BUFFER, file),
            part_size: part_size as u64,
            filled: 0,
            next: 0,
            written: 0,
            parts,
        }
    }

    /// Writes the part filled so far to the file and hands its place to the uploader
    /// (waiting while enough are in flight).
    fn send(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let cut = Cut {
            n: self.next,
            offset: self.written - self.filled,
            len: self.filled,
        };
        self.next = cut
            .n
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("more parts than a document can have"))?;
        self.filled = 0;
        self.parts
            .blocking_send(cut)
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }

    /// Sends the last part, syncs the file; returns the bytes written.
    fn finish(mut self) -> std::io::Result<u64> {
        if self.filled > 0 {
            self.send()?;
        }
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.written)
    }
}

impl Write for PartCutter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = usize::try_from(self.part_size - self.filled).unwrap_or(usize::MAX);
        let take = room.min(data.len());
        self.file.write_all(&data[..take])?;
        self.filled += take as u64;
        self.written += take as u64;
        if self.filled == self.part_size {
            self.send()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Uploads the parts as they come, `at_once` at a time, each streamed from `file` (named
/// `path` in errors) and hashed as it is sent; appends each acknowledged part's number to
/// `acked`. Returns the hashes by part number.
async fn upload_parts(
    client: &Client,
    id: &str,
    (file, path): (&std::sync::Arc<std::fs::File>, &Path),
    received: mpsc::Receiver<Cut>,
    at_once: usize,
    mut acked: std::fs::File,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BTreeMap<u32, [u8; 32]>, ClientError> {
    let incoming = futures_util::stream::unfold(received, |mut received| async move {
        received.recv().await.map(|cut| (cut, received))
    });
    let uploads = incoming
        .map(|cut| async move {
            let hash = client
                .put_part_at(id, file, path, cut.n, cut.offset, cut.len)
                .await?;
            Ok::<_, ClientError>((cut.n, cut.len, hash))
        })
        .buffer_unordered(at_once);
    let mut uploads = std::pin::pin!(uploads);
    let mut hashes = BTreeMap::new();
    let mut done = 0;
    while let Some((n, len, hash)) = uploads.try_next().await? {
        hashes.insert(n, hash);
        // Not synced: a line lost in a crash only means that part is sent again.
        let _ = writeln!(acked, "{n}");
        done += len;
        progress(done);
    }
    Ok(hashes)
}

/// Opens a fresh `acked` list (exclusively, mode 0600).
fn open_acked(path: &Path) -> Result<std::fs::File, StepError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StepError::file("create", path, &e))
}

/// The parts listed in `acked` (complete lines only), or `None` when there is no list.
fn read_acked(path: &Path) -> Option<BTreeSet<u32>> {
    let text = std::fs::read(path).ok()?;
    let end = text.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let complete = &text[..end];
    Some(
        complete
            .split(|&b| b == b'\n')
            .filter_map(|line| std::str::from_utf8(line).ok()?.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mostly_compressed_instances_are_not_compressed_again() {
        let jpeg = "1.2.840.10008.1.2.4.50";
        let explicit = "1.2.840.10008.1.2.1";
        assert!(worth_compressing([(explicit, 100), (jpeg, 99)]));
        assert!(!worth_compressing([(explicit, 100), (jpeg, 100)]));
        assert!(!worth_compressing([("1.2.840.10008.1.2.5", 10)]));
        assert!(!worth_compressing([("1.2.840.10008.1.2.1.99", 10)]));
        assert!(!worth_compressing([("1.2.840.10008.1.2.4.201", 10)]));
        assert!(worth_compressing([("1.2.840.10008.1.2", 10)]));
        assert!(worth_compressing(std::iter::empty()));
    }

    #[test]
    fn acked_lists_keep_complete_lines_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("acked");
        assert_eq!(read_acked(&path), None);
        std::fs::write(&path, b"0\n2\nx\n1").expect("write");
        assert_eq!(read_acked(&path), Some([0, 2].into()));
    }
}
