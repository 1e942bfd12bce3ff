//! The spool: received instances as DICOM Part 10 files, durable before acknowledgement.
//!
//! An instance is buffered while its P-DATA arrives (spilling to a temp file when large),
//! parsed up to the pixel data to check it and to learn its study and patient, written to
//! a temp file in `spool/tmp/`, made durable as `spool/<route>/<xx>/<hash>.dcm` by
//! [`crate::durable`] (fsync, rename, folder fsync), and recorded in the [`BatchIndex`]
//! (flushed). Only then may the SCP answer
//! Success. The dataset bytes are kept exactly as received; the file meta header names the
//! negotiated transfer syntax and the calling AE title.
//!
//! File names are a hash of route and SOP Instance UID, never a value from the peer, so a
//! hostile UID cannot name a path, and a resend lands on the same file.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{FileMetaTableBuilder, OpenFileOptions};
use sha2::{Digest, Sha256};

use crate::clock::now_ms;
use crate::config::BatchBy;
use crate::dicom::depth::{self, DatasetError};
use crate::durable::{self, Pending};
use crate::gateway::reception::batch::{BatchId, BatchState, InstanceRecord, Recorded, clip};
use crate::gateway::reception::route::Route;
use crate::gateway::store::{BatchIndex, IndexError};
use crate::pdi::{FileHash, KnownHash, RunningHash};

/// Received bytes kept in memory before they spill to the temp file; a typical CT or MR
/// slice never touches the disk before it is complete and checked.
pub const SPILL_AT: usize = 4 * 1024 * 1024;

/// Receive buffers kept for the next instances once theirs is stored: an association's
/// next slice reuses the memory (already paged in) instead of growing a new buffer from
/// 64 KiB, with a page fault per page, while the sender waits.
const BUFFERS_KEPT: usize = 4;
/// Largest receive buffer kept: what a typical slice needs, not what a spilled one grew.
const BUFFER_KEPT_MAX: usize = 2 * 1024 * 1024;

/// Implementation Class UID written in the meta header of spooled files.
pub const IMPLEMENTATION_CLASS_UID: &str = "1.2.826.0.1.3680043.10.1436.1";
/// Implementation Version Name written in the meta header of spooled files.
pub const IMPLEMENTATION_VERSION_NAME: &str = "CLOUDPDI_010";

/// Mode of spooled files: patient data, readable by the daemon's user only.
const SPOOL_FILE_MODE: u32 = 0o600;

/// Why an instance could not be stored; each maps to a C-STORE status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk is full, or below the configured reserve.
    #[error("out of disk space in the spool: {0}")]
    OutOfSpace(String),
    /// The dataset could not be parsed.
    #[error("dataset cannot be parsed: {0}")]
    Unparsable(String),
    /// The dataset exceeds a bound of the pre-check (nesting, header size) or is malformed
    /// in a way it sees; no recursive parser has read it.
    #[error(transparent)]
    Refused(#[from] DatasetError),
    /// The dataset is not the instance the command announced.
    #[error("dataset does not match the command: {0}")]
    Mismatch(String),
    /// Any other I/O failure of the spool folder.
    #[error("spool I/O error: {0}")]
    Io(io::Error),
    /// The index could not record the instance.
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<io::Error> for StoreError {
    fn from(err: io::Error) -> Self {
        if is_out_of_space(&err) {
            StoreError::OutOfSpace(err.to_string())
        } else {
            StoreError::Io(err)
        }
    }
}

impl StoreError {
    /// Whether the instance was refused for a reason of this gateway (disk full, I/O,
    /// the index), which the sender will resend once answered with a failure status, as
    /// opposed to a dataset that is wrong and would be refused again.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            StoreError::OutOfSpace(_) | StoreError::Io(_) | StoreError::Index(_)
        )
    }
}

fn is_out_of_space(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// What the command set and the association tell about an instance before its data.
#[derive(Debug, Clone)]
pub struct InstanceHeader {
    /// Affected SOP Class UID from the command.
    pub sop_class_uid: String,
    /// Affected SOP Instance UID from the command.
    pub sop_instance_uid: String,
    /// The presentation context's transfer syntax (how the data set is encoded).
    pub transfer_syntax: String,
    /// The calling AE title, written as Source Application Entity Title.
    pub calling_ae: String,
}

/// An instance being received: meta header plus dataset bytes, in memory until it spills.
pub struct Incoming {
    header: InstanceHeader,
    buffer: Vec<u8>,
    /// The temp file once the bytes spilled (removed if dropped before the commit).
    spilled: Option<Pending>,
    size: u64,
    /// Where the dataset starts: preamble, `DICM` and the meta information come first.
    dataset_offset: u64,
    tmp_dir: PathBuf,
    min_free_bytes: u64,
    /// The hash of the bytes written to the temp file so far.
    written: RunningHash,
}

impl Incoming {
    /// Appends received dataset bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
        self.size += data.len() as u64;
    }

    /// Whether enough is buffered that [`Incoming::spill`] should run (off the runtime).
    pub fn should_spill(&self) -> bool {
        self.buffer.len() >= SPILL_AT
    }

    /// Writes the buffered bytes to the temp file (blocking).
    ///
    /// # Errors
    /// [`StoreError::OutOfSpace`] or [`StoreError::Io`].
    pub fn spill(&mut self) -> Result<(), StoreError> {
        let mut pending = self.take_temp_file()?;
        let written = pending.file().write_all(&self.buffer);
        self.spilled = Some(pending);
        written?;
        self.written.update(&self.buffer);
        self.buffer.clear();
        Ok(())
    }

    /// Takes the temp file (created at the first write) for the next write, once the disk
    /// has room: a single huge instance must not eat the reserve either.
    fn take_temp_file(&mut self) -> Result<Pending, StoreError> {
        ensure_free(&self.tmp_dir, self.min_free_bytes)?;
        match self.spilled.take() {
            Some(pending) => Ok(pending),
            None => Ok(Pending::in_dir(&self.tmp_dir, SPOOL_FILE_MODE)?),
        }
    }

    /// Size of the Part 10 file so far (meta header included).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The command's view of the instance.
    pub fn header(&self) -> &InstanceHeader {
        &self.header
    }
}

/// The outcome of a successful store.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The batch holding the instance.
    pub batch: BatchId,
    /// What the index did (new, replaced in an open batch).
    pub recorded: Option<Recorded>,
    /// The Study Instance UID read from the dataset.
    pub study_uid: String,
    /// File size in bytes.
    pub size: u64,
}

/// The durable instance store of one data folder.
pub struct Spool {
    dir: PathBuf,
    tmp_dir: PathBuf,
    index: BatchIndex,
    min_free_bytes: u64,
    /// Receive buffers for the next instances ([`BUFFERS_KEPT`]).
    buffers: Mutex<Vec<Vec<u8>>>,
    hashers: Hashers,
}

/// Attributes read from the dataset that decide where it goes.
struct Identity {
    sop_class_uid: String,
    sop_instance_uid: String,
    study_uid: String,
    series_uid: String,
    patient_id: String,
    accession: String,
    study_date: String,
    modality: String,
}

impl Spool {
    /// Opens the spool in `dir` with its index in `index_dir`, removing temp files that a
    /// crash left behind (they were never acknowledged).
    ///
    /// # Errors
    /// [`StoreError`] when the folders cannot be created or the index cannot be opened.
    pub fn open(dir: &Path, index_dir: &Path, min_free_mb: u64) -> Result<Spool, StoreError> {
        let tmp_dir = dir.join("tmp");
        fs::create_dir_all(&tmp_dir)?;
        for entry in fs::read_dir(&tmp_dir)? {
            fs::remove_file(entry?.path())?;
        }
        let index = BatchIndex::open(index_dir)?;
        Ok(Spool {
            dir: dir.to_owned(),
            tmp_dir,
            index,
            min_free_bytes: min_free_mb.saturating_mul(1024 * 1024),
            buffers: Mutex::new(Vec::new()),
            hashers: Hashers::start(),
        })
    }

    /// Creates a route's 256 fan-out folders ahead of time (durably), so that no instance
    /// pays for a folder creation while a sender waits for its response.
    ///
    /// # Errors
    /// [`StoreError`] when the folders cannot be created.
    pub fn prepare_route(&self, route: &str) -> Result<(), StoreError> {
        for fan in 0..=255u8 {
            durable::create_dir_all(&self.dir.join(route).join(format!("{fan:02x}")))?;
        }
        Ok(())
    }

    /// The batch index.
    pub fn index(&self) -> &BatchIndex {
        &self.index
    }

    /// Bytes free for the daemon on the spool's file system (what `/metrics` reports
    /// beside the reserve `spool.min_free_mb`).
    ///
    /// # Errors
    /// When the file system cannot be queried.
    pub fn free_bytes(&self) -> io::Result<u64> {
        free_bytes(&self.dir)
    }

    /// The floor `spool.min_free_mb` in bytes (0: none): below it instances are refused,
    /// and `/healthz` says the spool is degraded.
    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_bytes
    }

    /// Absolute path of a spooled file from its index record.
    pub fn path_of(&self, record: &InstanceRecord) -> PathBuf {
        self.dir.join(&record.file)
    }

    /// The spooled files of a batch, for packing.
    ///
    /// # Errors
    /// [`IndexError`] when the index cannot be read.
    pub fn batch_files(&self, id: BatchId) -> Result<Vec<PathBuf>, IndexError> {
        Ok(self
            .index
            .member_records(id)?
            .iter()
            .map(|(_, record)| self.path_of(record))
            .collect())
    }

    /// Removes a sent batch's files and then its index entries (repeatable: a file
    /// already gone is fine). Returns how many files were removed.
    ///
    /// # Errors
    /// [`StoreError`] when a file or the index cannot be changed.
    pub fn remove_batch(&self, id: BatchId) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (_, record) in self.index.member_records(id)? {
            if record.batch != id {
                continue;
            }
            match fs::remove_file(self.path_of(&record)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.index.forget_members(id)?;
        Ok(removed)
    }

    /// Starts receiving an instance: the meta header is prepared from the command.
    ///
    /// # Errors
    /// [`StoreError::Mismatch`] when the command's UIDs cannot form a meta header.
    pub fn incoming(&self, header: InstanceHeader) -> Result<Incoming, StoreError> {
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(header.sop_class_uid.as_str())
            .media_storage_sop_instance_uid(header.sop_instance_uid.as_str())
            .transfer_syntax(header.transfer_syntax.as_str())
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
            .source_application_entity_title(header.calling_ae.as_str())
            .build()
            .map_err(|e| StoreError::Mismatch(e.to_string()))?;
        let mut buffer = self
            .buffers
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_else(|| Vec::with_capacity(64 * 1024));
        buffer.extend_from_slice(&[0; 128]);
        buffer.extend_from_slice(b"DICM");
        meta.write(&mut buffer)
            .map_err(|e| StoreError::Mismatch(e.to_string()))?;
        Ok(Incoming {
            size: buffer.len() as u64,
            dataset_offset: buffer.len() as u64,
            header,
            buffer,
            spilled: None,
            tmp_dir: self.tmp_dir.clone(),
            min_free_bytes: self.min_free_bytes,
            written: RunningHash::default(),
        })
    }

    /// Checks and durably stores a completely received instance (blocking: run it off
    /// the async runtime). On error nothing of the instance remains on disk.
    ///
    /// # Errors
    /// [`StoreError`]; its variant decides the C-STORE status.
    pub fn commit(&self, mut incoming: Incoming, route: &Route) -> Result<Stored, StoreError> {
        let identity = match self.identify_incoming(&mut incoming) {
            Ok(identity) => identity,
            Err(e) => {
                if e.is_local() {
                    self.refused(route, None, &e);
                }
                return Err(e);
            }
        };
        let group_key = match route.batch_by {
            BatchBy::Study => identity.study_uid.clone(),
            BatchBy::Patient => identity.patient_id.clone(),
        };
        let uid = incoming.header.sop_instance_uid.clone();
        self.store_identified(incoming, route, identity, &group_key)
            .inspect_err(|e| {
                if e.is_local() {
                    self.refused(route, Some((&group_key, &uid)), e);
                }
            })
    }

    /// Records on its batch that an instance was refused for a local reason (see
    /// [`StoreError::is_local`]), so the batch is held as possibly incomplete until the
    /// sender resends; `instance` is its grouping key (study or patient) and SOP Instance
    /// UID when it could be read. A
    /// failure to record is logged: the daemon cannot do more while its index fails.
    pub fn refused(&self, route: &Route, instance: Option<(&str, &str)>, error: &StoreError) {
        match self
            .index
            .record_refusal(route, instance, now_ms(), &error.to_string())
        {
            Ok(held) if held.is_empty() => {}
            Ok(held) => {
                let held: Vec<String> = held.iter().map(ToString::to_string).collect();
                tracing::info!(
                    route = %route.name,
                    batches = %held.join(","),
                    "batch held as possibly incomplete until the sender resends the refused \
                     instance (or `cloudpdi release`)"
                );
            }
            Err(e) => tracing::error!(
                route = %route.name,
                "cannot record an instance refusal on its batch: {e}; the batch may be \
                 packed without the refused instance: check `cloudpdi status` before it is sent"
            ),
        }
    }

    /// Checks the received dataset and reads what decides where it goes.
    fn identify_incoming(&self, incoming: &mut Incoming) -> Result<Identity, StoreError> {
        let syntax = incoming.header.transfer_syntax.clone();
        let offset = incoming.dataset_offset;
        // The meta information as the file set builder counts it (after preamble and DICM).
        let meta_len = offset.saturating_sub(132);
        let identity = match incoming.spilled.is_some() {
            false => {
                let start = usize::try_from(offset).expect("the meta header is in memory");
                depth::check_bytes(&incoming.buffer[start..], &syntax, meta_len)?;
                identify(incoming.buffer.as_slice())?
            }
            true => {
                incoming.spill()?;
                let path = incoming.spilled.as_ref().expect("spilled above").path();
                depth::check_file(path, offset, &syntax, meta_len)?;
                identify(BufReader::new(File::open(path)?))?
            }
        };
        check_matches(incoming.header(), &identity)?;
        Ok(identity)
    }

    /// Stores an identified instance durably and records it in its batch.
    fn store_identified(
        &self,
        mut incoming: Incoming,
        route: &Route,
        identity: Identity,
        group_key: &str,
    ) -> Result<Stored, StoreError> {
        ensure_free(&self.dir, self.min_free_bytes)?;
        let previous = self
            .index
            .instance(&route.name, &identity.sop_instance_uid)?;
        if let Some(previous) = previous {
            let sealed = self
                .index
                .batch(previous.batch)?
                .is_none_or(|b| b.state != BatchState::Open);
            if sealed {
                // Already on its way in a stable batch: acknowledge, keep the first copy.
                return Ok(Stored {
                    batch: previous.batch,
                    recorded: None,
                    study_uid: identity.study_uid,
                    size: previous.size,
                });
            }
        }
        let relative = relative_path(&route.name, &identity.sop_instance_uid);
        let hash = self.persist(&mut incoming, &relative)?;
        self.keep_buffer(std::mem::take(&mut incoming.buffer));
        let record = InstanceRecord {
            batch: BatchId(0),
            file: relative,
            size: incoming.size(),
            sop_class_uid: identity.sop_class_uid,
            study_uid: identity.study_uid.clone(),
            series_uid: identity.series_uid,
            transfer_syntax: incoming.header().transfer_syntax.clone(),
            calling_ae: incoming.header().calling_ae.clone(),
            received_at: now_ms(),
            patient_id: clip(&identity.patient_id),
            accession: identity.accession,
            study_date: identity.study_date,
            modality: identity.modality,
            hash,
        };
        let recorded = self
            .index
            .record(route, group_key, &identity.sop_instance_uid, record)?;
        self.index.flush()?;
        let batch = match recorded {
            Recorded::Added { batch, .. } | Recorded::Replaced(batch) => batch,
        };
        Ok(Stored {
            batch,
            recorded: Some(recorded),
            study_uid: identity.study_uid,
            size: incoming.size(),
        })
    }

    /// Makes the file durable in its place (fsync, rename, folder fsync) and returns its
    /// hash, so that packing the batch reads the file once, not twice. What is still in
    /// memory (all of a typical instance) is hashed on another thread while the disk
    /// syncs ([`Hashers`]); the chunks of a large instance were hashed as they
    /// spilled. The buffer is left in `incoming` for [`Spool::keep_buffer`]. On error the
    /// temp file is removed.
    fn persist(
        &self,
        incoming: &mut Incoming,
        relative: &str,
    ) -> Result<Option<KnownHash>, StoreError> {
        let mut pending = incoming.take_temp_file()?;
        let target = self.dir.join(relative);
        let rest = Arc::new(std::mem::take(&mut incoming.buffer));
        let hashed = self
            .hashers
            .hash(rest.clone(), std::mem::take(&mut incoming.written));
        // The file's identity after its last write: neither the fsync nor the rename
        // changes its inode or modification time.
        let written = pending
            .file()
            .write_all(&rest)
            .and_then(|()| pending.file().metadata())
            .and_then(|meta| {
                durable::create_dir_all(target.parent().expect("spool paths have a folder"))?;
                pending.commit(&target)?;
                Ok(meta)
            });
        // Without a thread to spare (a system limit), the file is hashed when its batch
        // is packed, as one recorded by an older version.
        let hash = hashed.recv().ok();
        incoming.buffer = Arc::try_unwrap(rest).unwrap_or_default();
        let meta = written?;
        Ok(hash.map(|hash| KnownHash::new(hash, &meta)))
    }

    /// Keeps a stored instance's receive buffer for the next one ([`BUFFERS_KEPT`] at
    /// most, none larger than [`BUFFER_KEPT_MAX`]).
    fn keep_buffer(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() > BUFFER_KEPT_MAX {
            return;
        }
        buffer.clear();
        if let Ok(mut kept) = self.buffers.lock()
            && kept.len() < BUFFERS_KEPT
        {
            kept.push(buffer);
        }
    }
}

/// A buffer to hash after what the running hash took, and where the result goes.
type HashJob = (Arc<Vec<u8>>, RunningHash, mpsc::SyncSender<FileHash>);

/// Threads that hash the in-memory rest of instances while their files sync, started
/// once with the spool: a thread started per instance cost more than hashing a slice.
/// They never wait for a commit, so a commit waiting for its hash always gets it.
struct Hashers {
    jobs: mpsc::Sender<HashJob>,
}

impl Hashers {
    /// One thread per core, at most 8.
    fn start() -> Hashers {
        let (jobs, queue) = mpsc::channel::<HashJob>();
        let queue = Arc::new(Mutex::new(queue));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
        for n in 0..threads {
            let queue = queue.clone();
            // Threads that cannot start leave the others; with none, the queue is dropped
            // and every hash is left to packing ([`Hashers::hash`]).
            let _ = std::thread::Builder::new()
                .name(format!("spool-hash-{n}"))
                .spawn(move || {
                    loop {
                        let next = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok((bytes, mut hash, done)) = next else {
                            return;
                        };
                        hash.update(&bytes);
                        // Dropped before the result is sent: the caller gets its buffer back.
                        drop(bytes);
                        let _ = done.send(hash.finish());
                    }
                });
        }
        Hashers { jobs }
    }

    /// Hashes `bytes` after what `hash` took; the result arrives on the receiver, which
    /// reports an error instead when no hashing thread is left.
    fn hash(&self, bytes: Arc<Vec<u8>>, hash: RunningHash) -> mpsc::Receiver<FileHash> {
        let (done, result) = mpsc::sync_channel(1);
        // Refused only when no thread is left: `done` is dropped with the job then.
        let _ = self.jobs.send((bytes, hash, done));
        result
    }
}

/// Bytes free for unprivileged writers on the file system of `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Refuses to write when the spool's file system has less than `min_free_bytes` free.
fn ensure_free(dir: &Path, min_free_bytes: u64) -> Result<(), StoreError> {
    if min_free_bytes == 0 {
        return Ok(());
    }
    let free = free_bytes(dir)?;
    if free < min_free_bytes {
        return Err(StoreError::OutOfSpace(format!(
            "{} MiB free, below the reserve spool.min_free_mb = {}",
            free / (1024 * 1024),
            min_free_bytes / (1024 * 1024)
        )));
    }
    Ok(())
}

/// `<route>/<first two hex digits>/<32 hex digits>.dcm`, from a hash of the route and UID.
fn relative_path(route: &str, sop_instance_uid: &str) -> String {
    let digest = Sha256::new()
        .chain_update(route.as_bytes())
        .chain_update([0])
        .chain_update(sop_instance_uid.as_bytes())
        .finalize();
    let hex = hex::encode(&digest[..16]);
    format!("{route}/{}/{hex}.dcm", &hex[..2])
}

/// Group 7FE0 (pixel data in all its forms) and what follows: not read by [`identify`].
const HEADER_END: Tag = Tag(
    (depth::HEADER_END >> 16) as u16,
    (depth::HEADER_END & 0xFFFF) as u16,
);

/// Parses meta header and dataset up to the pixel data: enough to prove the dataset is
/// readable and to learn where it belongs, without holding pixel data twice. Run only
/// after [`depth::check`]: dicom-object's parser recurses once per sequence level.
fn identify(source: impl Read) -> Result<Identity, StoreError> {
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(HEADER_END)
        .from_reader(source)
        .map_err(|e| StoreError::Unparsable(e.to_string()))?;
    let text = |tag, name: &str| -> Result<String, StoreError> {
        let value = object
            .element(tag)
            .map_err(|_| StoreError::Unparsable(format!("{name} is missing")))?
            .to_str()
            .map_err(|e| StoreError::Unparsable(format!("{name} is unreadable: {e}")))?;
        Ok(value.trim_end_matches(['\0', ' ']).to_owned())
    };
    // The file set places every instance by study and series (pdi::instance::read needs
    // both): what is acknowledged must be packable, so reception needs them too.
    let placed = |tag, name: &str| -> Result<String, StoreError> {
        let value = text(tag, name)?;
        if value.is_empty() {
            return Err(StoreError::Unparsable(format!("{name} is empty")));
        }
        Ok(value)
    };
    Ok(Identity {
        sop_class_uid: text(tags::SOP_CLASS_UID, "SOP Class UID (0008,0016)")?,
        sop_instance_uid: text(tags::SOP_INSTANCE_UID, "SOP Instance UID (0008,0018)")?,
        study_uid: placed(tags::STUDY_INSTANCE_UID, "Study Instance UID (0020,000D)")?,
        series_uid: placed(tags::SERIES_INSTANCE_UID, "Series Instance UID (0020,000E)")?,
        patient_id: text(tags::PATIENT_ID, "Patient ID (0010,0020)").unwrap_or_default(),
        accession: clip(&text(tags::ACCESSION_NUMBER, "Accession").unwrap_or_default()),
        study_date: clip(&text(tags::STUDY_DATE, "Study Date").unwrap_or_default()),
        modality: clip(&text(tags::MODALITY, "Modality").unwrap_or_default()),
    })
}

fn check_matches(header: &InstanceHeader, identity: &Identity) -> Result<(), StoreError> {
    if identity.sop_instance_uid != header.sop_instance_uid {
        return Err(StoreError::Mismatch(format!(
            "SOP Instance UID in the dataset ({}) differs from the command's ({})",
            identity.sop_instance_uid, header.sop_instance_uid
        )));
    }
    if identity.sop_class_uid != header.sop_class_uid {
        return Err(StoreError::Mismatch(format!(
            "SOP Class UID in the dataset ({}) differs from the command's ({})",
            identity.sop_class_uid, header.sop_class_uid
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_space_reserve_refuses_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let huge_reserve = u64::MAX >> 20;
        let spool = Spool::open(
            &dir.path().join("spool"),
            &dir.path().join("index"),
            huge_reserve,
        )
        .expect("open");
        let mut incoming = spool
            .incoming(InstanceHeader {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
                sop_instance_uid: "1.2.3".into(),
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                calling_ae: "PACS".into(),
            })
            .expect("meta header");
        incoming.push(&[0; 16]);
        let err = incoming.spill().expect_err("reserve");
        assert!(
            err.to_string()
                .contains("below the reserve spool.min_free_mb"),
            "{err}"
        );
        let tmp_files = fs::read_dir(dir.path().join("spool/tmp"))
            .expect("tmp")
            .count();
        assert_eq!(tmp_files, 0);
    }

    /// An instance's dataset in explicit VR little endian, with `pixels` bytes of pixel
    /// data.
    fn dataset(uid: &str, pixels: usize) -> Vec<u8> {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_encoding::TransferSyntaxIndex;
        let mut object = dicom_object::InMemDicomObject::new_empty();
        for (tag, value) in [
            (tags::SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.7"),
            (tags::SOP_INSTANCE_UID, uid),
            (tags::STUDY_INSTANCE_UID, "1.2.3.4"),
            (tags::SERIES_INSTANCE_UID, "1.2.3.4.5"),
            (tags::PATIENT_ID, "P1"),
        ] {
            object.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value)));
        }
        object.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![7u8; pixels]),
        ));
        let syntax = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get("1.2.840.10008.1.2.1")
            .expect("explicit VR little endian");
        let mut bytes = Vec::new();
        object
            .write_dataset_with_ts(&mut bytes, syntax)
            .expect("dataset");
        bytes
    }

    /// Receives and commits one instance of `pixels` bytes of pixel data, then checks
    /// that the spooled file holds exactly its bytes and that the recorded hash is the
    /// file's.
    fn store_checked(spool: &Spool, route: &Route, (uid, pixels, sender): (&str, usize, &str)) {
        let mut incoming = spool
            .incoming(InstanceHeader {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
                sop_instance_uid: uid.into(),
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                calling_ae: sender.into(),
            })
            .expect("meta header");
        let offset = usize::try_from(incoming.dataset_offset).expect("small");
        let data = dataset(uid, pixels);
        for chunk in data.chunks(16 * 1024 - 6) {
            incoming.push(chunk);
            if incoming.should_spill() {
                incoming.spill().expect("spill");
            }
        }
        spool.commit(incoming, route).expect("commit");
        let record = spool
            .index()
            .instance("ct", uid)
            .expect("read")
            .expect("recorded");
        let path = spool.path_of(&record);
        let bytes = fs::read(&path).expect("spooled file");
        assert_eq!(
            &bytes[128..132],
            b"DICM",
            "{uid}: a reused buffer starts empty"
        );
        assert_eq!(bytes.len(), offset + data.len(), "{uid}");
        assert!(bytes.ends_with(&data), "{uid}: the dataset as received");
        let known = record.hash.expect("hashed while spooled");
        let file = crate::pdi::hash_file(&path).expect("read back");
        assert_eq!(
            known.hash, file,
            "{uid} from {sender}: the hash is the file's"
        );
        assert_eq!(file.size, record.size);
        assert!(
            known.holds_for(&fs::metadata(&path).expect("metadata")),
            "{uid} from {sender}: the record names the file in place"
        );
    }

    #[test]
    fn the_spooled_file_is_hashed_as_it_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool =
            Spool::open(&dir.path().join("spool"), &dir.path().join("index"), 0).expect("open");
        let mut config = std::collections::BTreeMap::new();
        config.insert("ct".to_owned(), crate::config::RouteConfig::default());
        let routes = crate::gateway::reception::route::Routes::new(&config);
        let route = routes.by_name("ct").expect("route");
        spool.prepare_route("ct").expect("route folder");
        // In memory until the end, spilled to the temp file on the way (SPILL_AT), and the
        // first again from another sender of the same name length (a resend into the open
        // batch: the same size, other bytes, a new file); then a smaller one, into the
        // buffer the larger one left.
        for instance in [
            ("1.2.3.4.5.1", 64 * 1024, "PACS"),
            ("1.2.3.4.5.2", SPILL_AT + 99, "PACS"),
            ("1.2.3.4.5.1", 64 * 1024, "MODA"),
            ("1.2.3.4.5.3", 1000, "MODA"),
        ] {
            store_checked(&spool, route, instance);
        }
        assert_eq!(
            spool.buffers.lock().expect("lock").len(),
            1,
            "a stored instance's buffer is kept for the next"
        );
    }

    #[test]
    fn paths_are_hashed_and_stable() {
        let a = relative_path("ct", "1.2.3");
        assert_eq!(a, relative_path("ct", "1.2.3"));
        assert_ne!(a, relative_path("mr", "1.2.3"));
        assert!(a.starts_with("ct/") && a.ends_with(".dcm") && a.len() == 3 + 3 + 32 + 4);
        let hostile = relative_path("ct", "../../etc/passwd");
        assert!(!hostile.contains(".."), "{hostile}");
    }
}
