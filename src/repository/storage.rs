//! Where documents live: an `object_store` (a local folder, or an S3-compatible bucket).
//!
//! Every fact about a document is an object written once and never updated in place, so
//! that several servers can share one bucket without coordination:
//!
//! ```text
//! documents/{id}/meta.json          created: facility, size (none if streamed), expiry, proof hash
//! documents/{id}/parts/{n:08}       ciphertext part n (idempotent overwrite)
//! documents/{id}/hashes/{n:08}      SHA-256 of part n (64 hex digits), a space and the
//!                                   part object's identity as stored, written after the part
//! documents/{id}/complete.json      the checked hash (whole SHA-256, or size + parts digest)
//! documents/{id}/revoked.json       the sender revoked it
//! documents/{id}/extended/{t:011}   the sender extended the expiry to t (the latest counts)
//! documents/{id}/settled/{t:011}    what became of expiry t, decided once (create-if-absent):
//!                                   expired by the sweep, or extended to a later time
//! documents/{id}/expired.json       the sweep deleted its content
//! documents/{id}/downloads/{n:08}   download slot n, created only if absent
//! documents/{id}/resumes/{n:08}-{k:03}  resume k of download n, created only if absent
//! documents/{id}/receipts/{n:08}   the receipt of download n, created only if absent
//! index/expiry/{t:011}-{id}         when the sweep deletes the content
//! index/purge/{t:011}-{id}          when the sweep deletes the rest
//! mailboxes/{recipient}/{id}/sealed     a message's sealed bytes (opaque to the repository)
//! mailboxes/{recipient}/{id}/meta.json  its sender, recipient, size, time; written last,
//!                                       deleted first: a message is there when this is
//! ```
//!
//! An extension is an object of its own (its time in its name, so the listing that reads
//! a snapshot finds it without another read), written after the index entries of the new
//! expiry: [`Snapshot::meta`] carries the latest expiry, and the sweep leaves a document
//! alone when an index entry of an expiry it no longer has comes due.
//!
//! The sweep deleting a document's content at its expiry and a sender extending that same
//! expiry may run at once, on two servers. Each first settles the expiry
//! ([`Storage::settle`]): `settled/{t}` is created if absent (the conditional write the
//! download slots use), and whoever created it decides, the other reads it and complies.
//! The sweep deletes the content only under a settlement `expired`; an extension is
//! written only under its own settlement `extended` (or, for an extension of the same
//! expiry settled first, after writing that one out). So a sender is never told of a new
//! expiry whose content the sweep then deletes, and nothing is left for a crash to hold:
//! a settlement whose work was cut short is carried out by the next sweep that reads it.
//!
//! The download limit is enforced with create-if-absent slots (`If-None-Match: *` on S3,
//! a hard link on local files), so two servers cannot both hand out the last download.
//! A download interrupted part-way may be resumed (a range not starting at byte 0) a
//! limited number of times within a limited window after its slot was taken; the resume
//! records are create-if-absent as well, so that limit holds across servers too.
//! On the local backend each object is synced to disk before the call returns.
//!
//! A part arriving ([`PartUpload`]) is hashed as it comes. On the local backend it is
//! written to a temp file beside its name (`documents/{id}/parts/.XXXXXX.tmp`, created
//! exclusively, mode 0600), synced and renamed over the part when the whole body is there,
//! so it is never held in memory; a body cut short, too long or stalled removes the temp
//! file, and one left by a crash is deleted with the document's parts or at its purge.
//! On S3 a part is gathered in memory (at most the part size, 8 MiB by default, per
//! upload slot) and written with one PUT: `object_store`'s streaming put is a multipart
//! upload (three requests or more per part, each piece but the last at least 5 MiB and
//! buffered too), which would cost requests without saving memory at this part size.
//!
//! A hash record binds the hash to the part object it was computed from: the identity the
//! store gave the part when it was written (the S3 ETag of the PUT; on local files the
//! temp file's inode, modification time and size, which its rename keeps). A completion
//! trusts a record only while the part still has that identity
//! ([`Storage::checked_part_hash`]); a part with no record (stored by a server older than
//! the records), an unreadable record, or a part replaced after its record was written (two
//! PUTs of one part racing) is read and hashed again, and its record rewritten.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutMode, PutPayload,
};
use serde::{Deserialize, Serialize};

use crate::repository::api::{ReceiptRecord, hex32};
use crate::repository::config::{Backend, StorageConfig};

/// Read size when streaming a part from the local backend.
const LOCAL_READ_CHUNK: usize = 256 * 1024;

/// Bytes of an arriving part gathered before one write to its temp file (local backend).
const LOCAL_WRITE_CHUNK: usize = 256 * 1024;

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The store could not be reached or refused the operation.
    #[error("document storage is unavailable: {0}")]
    Backend(#[from] object_store::Error),
    /// The configured store cannot be opened.
    #[error("cannot open document storage: {0}")]
    Open(String),
    /// An object has content this server cannot read.
    #[error("stored object {0} is unreadable; it was not written by this repository")]
    Corrupt(String),
    /// A local file could not be written (disk full, permissions).
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An object was deleted between two reads of it.
    #[error(
        "stored object {0} was deleted while it was being read (the document was purged \
         meanwhile); try again"
    )]
    Vanished(String),
    /// A local file could not be synced.
    #[error("cannot sync {path} to disk: {source}")]
    Sync {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// What a document was created with; written once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentMeta {
    /// Document ID.
    pub id: String,
    /// Facility that created it.
    pub facility: String,
    /// Declared ciphertext size; `None` for a streamed document, whose size its
    /// [`CompleteRecord`] fixes.
    #[serde(default)]
    pub size: Option<u64>,
    /// Part size.
    pub part_size: u64,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Downloads allowed.
    pub max_downloads: u32,
    /// SHA-256 of the download proof (a hash of a hash of the secret's derived key).
    #[serde(with = "hex32")]
    pub proof_sha256: [u8; 32],
}

impl DocumentMeta {
    /// Number of parts (0 while a streamed document's size is unknown).
    pub fn parts(&self) -> u32 {
        self.size.map_or(0, |size| parts_of(size, self.part_size))
    }

    /// Exact length of part `n`, or `None` when there is no such part (or the size is
    /// not known yet).
    pub fn part_len(&self, n: u32) -> Option<u64> {
        let size = self.size?;
        let start = u64::from(n).checked_mul(self.part_size)?;
        (start < size).then(|| (size - start).min(self.part_size))
    }
}

/// Number of parts of `part_size` bytes (the last one shorter) holding `size` bytes.
pub fn parts_of(size: u64, part_size: u64) -> u32 {
    u32::try_from(size.div_ceil(part_size.max(1))).unwrap_or(u32::MAX)
}

/// Record of the server's hash check: which form the sender completed with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRecord {
    /// SHA-256 of the whole ciphertext ([`crate::repository::api::Complete::Whole`]).
    #[serde(
        default,
        with = "hex32::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub sha256: Option<[u8; 32]>,
    /// [`crate::repository::api::parts_digest`] of the parts
    /// ([`crate::repository::api::Complete::Parts`]).
    #[serde(
        default,
        with = "hex32::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub parts_sha256: Option<[u8; 32]>,
    /// The size the completion fixed (a streamed document has no other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// When, Unix seconds.
    pub completed_at: u64,
}

/// What the repository knows of a mailbox message besides its sealed bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Message ID.
    pub id: String,
    /// The facility that posted it (authenticated).
    pub sender: String,
    /// The facility whose mailbox holds it.
    pub recipient: String,
    /// Size of the sealed bytes.
    pub size: u64,
    /// When it was posted, Unix seconds.
    pub posted_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TimeRecord {
    at: u64,
}

/// What became of one expiry of a document ([`Storage::settle`]): decided once, by the
/// sweep or by an extension, whichever settled it first, so that the two cannot both act
/// on it (module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Settlement {
    /// The sweep deletes the content: the document ended at this expiry.
    Expired {
        /// When the sweep settled it, Unix seconds.
        at: u64,
    },
    /// A sender extended it.
    Extended {
        /// The new expiry, Unix seconds.
        to: u64,
        /// When the extension settled it, Unix seconds (its record's time).
        at: u64,
    },
}

/// Everything known about a document, read with one listing.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Creation record, with the latest expiry the sender extended it to (if it did).
    pub meta: DocumentMeta,
    /// Parts held: number -> size.
    pub parts: BTreeMap<u32, u64>,
    /// Parts whose SHA-256 is recorded.
    pub hashes: std::collections::BTreeSet<u32>,
    /// Download slots taken.
    pub downloads: u32,
    /// Resumes recorded against the latest download slot.
    pub resumes_of_latest: u32,
    /// Whether the hash was checked.
    pub complete: bool,
    /// Whether the sender revoked it.
    pub revoked: bool,
    /// Whether the sweep deleted its content.
    pub expired: bool,
    /// Expiry extensions recorded (`extended/*`), bounded by
    /// [`MAX_EXTENSIONS`](crate::repository::api::MAX_EXTENSIONS).
    pub extensions: u32,
    receipts: Vec<Path>,
}

/// The document store.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    local_root: Option<PathBuf>,
}

/// Which time index a sweep reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// Content deletion at expiry.
    Expiry,
    /// Final deletion after the tombstone period.
    Purge,
}

fn doc_path(id: &str, rest: &str) -> Path {
    Path::from(format!("documents/{id}/{rest}"))
}

/// An object of message `id` in `recipient`'s mailbox; both were validated by the caller
/// (a facility code and a message ID), so nothing else reaches a path.
fn message_path(recipient: &str, id: &str, rest: &str) -> Path {
    Path::from(format!("mailboxes/{recipient}/{id}/{rest}"))
}

fn index_path(index: Index, at: u64, id: &str) -> Path {
    let name = match index {
        Index::Expiry => "expiry",
        Index::Purge => "purge",
    };
    Path::from(format!("index/{name}/{at:011}-{id}"))
}

impl Storage {
    /// Opens the configured backend (creating the local folder).
    ///
    /// # Errors
    /// [`StorageError::Open`] naming what is wrong.
    pub fn open(config: &StorageConfig) -> Result<Storage, StorageError> {
        match config.backend {
            Backend::Local => {
                std::fs::create_dir_all(&config.path)
                    .map_err(|e| StorageError::Open(format!("{}: {e}", config.path.display())))?;
                let root = std::fs::canonicalize(&config.path)
                    .map_err(|e| StorageError::Open(format!("{}: {e}", config.path.display())))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&root)
                    .map_err(|e| StorageError::Open(e.to_string()))?;
                Ok(Storage {
                    store: Arc::new(store),
                    local_root: Some(root),
                })
            }
            Backend::S3 => {
                crate::repository::tls::install_crypto_provider();
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&config.bucket)
                    .with_region(&config.region)
                    .with_allow_http(config.allow_http);
                if !config.endpoint.is_empty() {
                    builder = builder.with_endpoint(&config.endpoint);
                }
                if !config.access_key_id.is_empty() {
                    builder = builder
                        .with_access_key_id(&config.access_key_id)
                        .with_secret_access_key(&config.secret_access_key);
                }
                let store = builder
                    .build()
                    .map_err(|e| StorageError::Open(e.to_string()))?;
                let store: Arc<dyn ObjectStore> = if config.prefix.is_empty() {
                    Arc::new(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(
                        store,
                        config.prefix.as_str(),
                    ))
                };
                Ok(Storage {
                    store,
                    local_root: None,
                })
            }
        }
    }

    async fn put(&self, path: &Path, bytes: Bytes, mode: PutMode) -> Result<(), StorageError> {
        self.put_tagged(path, bytes, mode).await.map(drop)
    }

    /// Writes an object; returns the identity (ETag) the store gave it, if any.
    async fn put_tagged(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Option<String>, StorageError> {
        let written = self
            .store
            .put_opts(path, PutPayload::from_bytes(bytes), mode.into())
            .await?;
        self.sync_local(path).await?;
        Ok(written.e_tag)
    }

    /// On the local backend, syncs the file and every folder up to the root, so an
    /// acknowledged object survives a power cut.
    async fn sync_local(&self, path: &Path) -> Result<(), StorageError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let root = root.clone();
        let file = root.join(path.as_ref());
        tokio::task::spawn_blocking(move || {
            let sync = |p: &std::path::Path| {
                std::fs::File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| StorageError::Sync {
                        path: p.to_owned(),
                        source,
                    })
            };
            sync(&file)?;
            let mut dir = file.parent();
            while let Some(d) = dir {
                sync(d)?;
                if d == root {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::Open(e.to_string()))?
    }

    async fn put_json<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).expect("storage records always serialize");
        self.put(path, bytes.into(), mode).await
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, StorageError> {
        match self.store.get(path).await {
            Ok(result) => {
                let bytes = result.bytes().await?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|_| StorageError::Corrupt(path.to_string()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records a new document and its two index entries.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn create(&self, meta: &DocumentMeta, purge_at: u64) -> Result<(), StorageError> {
        self.put_json(&doc_path(&meta.id, "meta.json"), meta, PutMode::Create)
            .await?;
        let empty = || Bytes::from_static(b"");
        self.put(
            &index_path(Index::Expiry, meta.expires_at, &meta.id),
            empty(),
            PutMode::Overwrite,
        )
        .await?;
        self.put(
            &index_path(Index::Purge, purge_at, &meta.id),
            empty(),
            PutMode::Overwrite,
        )
        .await
    }

    /// Everything about document `id`, or `None` when it does not exist.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn snapshot(&self, id: &str) -> Result<Option<Snapshot>, StorageError> {
        let Some(meta) = self
            .get_json::<DocumentMeta>(&doc_path(id, "meta.json"))
            .await?
        else {
            return Ok(None);
        };
        let mut snapshot = Snapshot {
            meta,
            parts: BTreeMap::new(),
            hashes: std::collections::BTreeSet::new(),
            downloads: 0,
            resumes_of_latest: 0,
            complete: false,
            revoked: false,
            expired: false,
            extensions: 0,
            receipts: Vec::new(),
        };
        let prefix = Path::from(format!("documents/{id}"));
        let mut resumed_slots = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(object) = listing.try_next().await? {
            let parts: Vec<_> = object.location.parts().collect();
            let names: Vec<&str> = parts.iter().map(|p| p.as_ref()).collect();
            match names.as_slice() {
                [_, _, "parts", n] => {
                    if let Ok(n) = n.parse::<u32>() {
                        snapshot.parts.insert(n, object.size);
                    }
                }
                [_, _, "hashes", n] => {
                    if let Ok(n) = n.parse::<u32>() {
                        snapshot.hashes.insert(n);
                    }
                }
                [_, _, "downloads", _] => snapshot.downloads += 1,
                [_, _, "resumes", name] => {
                    if let Some(slot) = name.split_once('-').and_then(|(n, _)| n.parse().ok()) {
                        resumed_slots.push(slot);
                    }
                }
                [_, _, "receipts", _] => snapshot.receipts.push(object.location.clone()),
                [_, _, "complete.json"] => snapshot.complete = true,
                [_, _, "revoked.json"] => snapshot.revoked = true,
                [_, _, "extended", at] => {
                    if let Ok(at) = at.parse::<u64>() {
                        snapshot.meta.expires_at = snapshot.meta.expires_at.max(at);
                        snapshot.extensions = snapshot.extensions.saturating_add(1);
                    }
                }
                [_, _, "expired.json"] => snapshot.expired = true,
                _ => {}
            }
        }
        snapshot.receipts.sort();
        let latest = snapshot.downloads.checked_sub(1);
        snapshot.resumes_of_latest = resumed_slots
            .iter()
            .filter(|&&slot| Some(slot) == latest)
            .count()
            .try_into()
            .unwrap_or(u32::MAX);
        Ok(Some(snapshot))
    }

    /// Part `n` of document `id`, about to arrive: its bytes go to
    /// [`PartUpload::write`], and [`PartUpload::finish`] stores it (replacing an earlier
    /// copy), then its SHA-256, computed as the bytes came, with the part's identity: a
    /// completion checks the hashes, not the content, while the part keeps that identity
    /// (module documentation).
    ///
    /// # Errors
    /// [`StorageError`] when the temp file cannot be created.
    pub async fn part_upload(&self, id: &str, n: u32) -> Result<PartUpload, StorageError> {
        let sink = match &self.local_root {
            None => PartSink::Memory(bytes::BytesMut::new()),
            Some(root) => {
                let path = root.join(doc_path(id, &format!("parts/{n:08}")).as_ref());
                let beside = path.clone();
                let temp = tokio::task::spawn_blocking(move || {
                    crate::durable::Pending::beside(&beside, 0o600)
                })
                .await
                .map_err(|e| StorageError::Open(e.to_string()))?
                .map_err(|source| StorageError::Write {
                    path: path.clone(),
                    source,
                })?;
                PartSink::Local {
                    temp: Some(temp),
                    buffer: Vec::with_capacity(LOCAL_WRITE_CHUNK),
                    path,
                }
            }
        };
        Ok(PartUpload {
            storage: self.clone(),
            id: id.to_owned(),
            n,
            hasher: sha2::Sha256::default(),
            sink,
        })
    }

    /// The SHA-256 of part `n` as stored now, for a completion: its hash record when the
    /// record names the part's current identity (one small read and one metadata read),
    /// else the part read and hashed, and the record rewritten (a legacy part with no
    /// record, an unreadable record, or a part overwritten after its record). `None` when
    /// the part is missing.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn checked_part_hash(
        &self,
        id: &str,
        n: u32,
    ) -> Result<Option<[u8; 32]>, StorageError> {
        if let Some((hash, Some(recorded))) = self.hash_record(id, n).await? {
            if self.part_identity(id, n).await?.as_deref() == Some(recorded.as_str()) {
                return Ok(Some(hash));
            }
        }
        self.rehash_part(id, n).await
    }

    /// The hash record of part `n`: hash and recorded identity (none in a record of an
    /// older server). `None` when there is none or it cannot be read as a record.
    async fn hash_record(
        &self,
        id: &str,
        n: u32,
    ) -> Result<Option<([u8; 32], Option<String>)>, StorageError> {
        let path = doc_path(id, &format!("hashes/{n:08}"));
        let bytes = match self.store.get(&path).await {
            Ok(result) => result.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Ok(None);
        };
        let (hex, identity) = match text.split_once(' ') {
            Some((hex, identity)) => (hex, Some(identity.to_owned())),
            None => (text, None),
        };
        Ok(hex32::parse(hex).map(|hash| (hash, identity)))
    }

    /// Writes the hash record of part `n`.
    async fn put_hash_record(
        &self,
        id: &str,
        n: u32,
        hash: [u8; 32],
        identity: Option<&str>,
    ) -> Result<(), StorageError> {
        let mut record = hex::encode(hash);
        if let Some(identity) = identity {
            record.push(' ');
            record.push_str(identity);
        }
        self.put(
            &doc_path(id, &format!("hashes/{n:08}")),
            Bytes::from(record),
            PutMode::Overwrite,
        )
        .await
    }

    /// The identity part `n` has now (metadata only), `None` when it is missing or the
    /// store gives none.
    async fn part_identity(&self, id: &str, n: u32) -> Result<Option<String>, StorageError> {
        let path = doc_path(id, &format!("parts/{n:08}"));
        match &self.local_root {
            Some(root) => {
                let file = root.join(path.as_ref());
                match tokio::fs::metadata(&file).await {
                    Ok(metadata) => Ok(Some(local_identity(&metadata))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StorageError::Write { path: file, source }),
                }
            }
            None => match self.store.head(&path).await {
                Ok(meta) => Ok(meta.e_tag),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Reads part `n`, hashes it, and records the hash with the identity of the object
    /// read. `None` when the part is missing.
    async fn rehash_part(&self, id: &str, n: u32) -> Result<Option<[u8; 32]>, StorageError> {
        let path = doc_path(id, &format!("parts/{n:08}"));
        let result = match self.store.get(&path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let range = result.range.clone();
        let (identity, mut stream) = match result.payload {
            GetResultPayload::File(file, _) => {
                let identity = file.metadata().ok().map(|m| local_identity(&m));
                (identity, local_stream(file, range))
            }
            GetResultPayload::Stream(stream) => (
                result.meta.e_tag.clone(),
                stream.map_err(StorageError::from).boxed(),
            ),
        };
        let mut hasher = sha2::Sha256::default();
        while let Some(chunk) = stream.try_next().await? {
            sha2::Digest::update(&mut hasher, &chunk);
        }
        let hash: [u8; 32] = sha2::Digest::finalize(hasher).into();
        self.put_hash_record(id, n, hash, identity.as_deref())
            .await?;
        Ok(Some(hash))
    }

    /// Deletes part `n` and its hash (a leftover beyond the end of a completed document).
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn delete_part(&self, id: &str, n: u32) -> Result<(), StorageError> {
        for kind in ["parts", "hashes"] {
            match self
                .store
                .delete(&doc_path(id, &format!("{kind}/{n:08}")))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Streams `range` (within the part) of part `n`.
    ///
    /// # Errors
    /// [`StorageError`] when the part is missing or the store fails.
    pub async fn part_stream(
        &self,
        id: &str,
        n: u32,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, StorageError>>, StorageError> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&doc_path(id, &format!("parts/{n:08}")), options)
            .await?;
        let range = result.range.clone();
        Ok(match result.payload {
            GetResultPayload::File(file, _) => local_stream(file, range),
            GetResultPayload::Stream(stream) => stream.map_err(StorageError::from).boxed(),
        })
    }

    /// The complete record, when the hash was checked.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn complete_record(&self, id: &str) -> Result<Option<CompleteRecord>, StorageError> {
        self.get_json(&doc_path(id, "complete.json")).await
    }

    /// Marks the document complete (idempotent).
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn put_complete(
        &self,
        id: &str,
        record: &CompleteRecord,
    ) -> Result<(), StorageError> {
        self.put_json(&doc_path(id, "complete.json"), record, PutMode::Overwrite)
            .await
    }

    /// Settles expiry `expires_at` of document `id` as `settlement` unless it is settled
    /// already (create-if-absent, so across servers one settlement holds); returns the
    /// settlement that holds: this one, or the one found.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails, the settlement found cannot be read, or it
    /// was deleted before it could be (a purge).
    pub async fn settle(
        &self,
        id: &str,
        expires_at: u64,
        settlement: Settlement,
    ) -> Result<Settlement, StorageError> {
        let path = doc_path(id, &format!("settled/{expires_at:011}"));
        let record = serde_json::to_vec(&settlement).expect("settlements serialize");
        if self.create_once(&path, &record).await? {
            return Ok(settlement);
        }
        self.get_json(&path)
            .await?
            .ok_or_else(|| StorageError::Vanished(path.to_string()))
    }

    /// Extends document `id` to `expires_at` under a settlement of its expiry
    /// ([`Storage::settle`]): the index entries of the new expiry and purge first, then the
    /// record a snapshot reads (create-if-absent: extending twice to the same time is one
    /// record). A call cut short leaves index entries the sweep passes over, never an
    /// extension without its entries; the settlement lets the sweep write it out. `true`
    /// when this call wrote the record, `false` when it was there.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn extend(
        &self,
        id: &str,
        expires_at: u64,
        purge_at: u64,
        at: u64,
    ) -> Result<bool, StorageError> {
        let empty = || Bytes::from_static(b"");
        self.put(
            &index_path(Index::Expiry, expires_at, id),
            empty(),
            PutMode::Overwrite,
        )
        .await?;
        self.put(
            &index_path(Index::Purge, purge_at, id),
            empty(),
            PutMode::Overwrite,
        )
        .await?;
        let record = serde_json::to_vec(&TimeRecord { at }).expect("time records serialize");
        self.create_once(
            &doc_path(id, &format!("extended/{expires_at:011}")),
            &record,
        )
        .await
    }

    /// Marks the document revoked and deletes its content.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn revoke(&self, id: &str, at: u64) -> Result<(), StorageError> {
        self.end(id, "revoked.json", at).await
    }

    /// Marks the document expired and deletes its content.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn expire(&self, id: &str, at: u64) -> Result<(), StorageError> {
        self.end(id, "expired.json", at).await
    }

    /// Writes the record that ends a document (`revoked.json`, `expired.json`) with its
    /// time, then deletes the content.
    async fn end(&self, id: &str, record: &str, at: u64) -> Result<(), StorageError> {
        self.put_json(
            &doc_path(id, record),
            &TimeRecord { at },
            PutMode::Overwrite,
        )
        .await?;
        self.delete_parts(id).await
    }

    /// Deletes every object of the document.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn purge(&self, id: &str) -> Result<(), StorageError> {
        self.delete_prefix(&format!("documents/{id}")).await
    }

    /// Deletes every part and its hash (after a failed hash check, a revoke, the expiry).
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn delete_parts(&self, id: &str) -> Result<(), StorageError> {
        self.delete_prefix(&format!("documents/{id}/parts")).await?;
        self.delete_prefix(&format!("documents/{id}/hashes")).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        let prefix = Path::from(prefix);
        let locations = self
            .store
            .list(Some(&prefix))
            .map_ok(|object| object.location)
            .boxed();
        self.store
            .delete_stream(locations)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Takes a download slot; `false` when all `max` are taken.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn claim_download(&self, snapshot: &Snapshot, at: u64) -> Result<bool, StorageError> {
        let id = &snapshot.meta.id;
        let record = serde_json::to_vec(&TimeRecord { at }).expect("time records serialize");
        for n in snapshot.downloads..snapshot.meta.max_downloads {
            if self
                .create_once(&doc_path(id, &format!("downloads/{n:08}")), &record)
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records a resume of the latest download slot, when that slot was taken at most
    /// `window` seconds before `at` and has had fewer than `max_resumes` resumes; `false`
    /// otherwise (the caller then serves a new download from byte 0).
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn claim_resume(
        &self,
        snapshot: &Snapshot,
        at: u64,
        window: u64,
        max_resumes: u32,
    ) -> Result<bool, StorageError> {
        let Some(slot) = snapshot.downloads.checked_sub(1) else {
            return Ok(false);
        };
        let id = &snapshot.meta.id;
        let taken: Option<TimeRecord> = self
            .get_json(&doc_path(id, &format!("downloads/{slot:08}")))
            .await?;
        if taken.is_none_or(|t| at > t.at.saturating_add(window)) {
            return Ok(false);
        }
        let record = serde_json::to_vec(&TimeRecord { at }).expect("time records serialize");
        for k in snapshot.resumes_of_latest..max_resumes {
            let path = doc_path(id, &format!("resumes/{slot:08}-{k:03}"));
            if self.create_once(&path, &record).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes `bytes` at `path` only if nothing is there; `false` when something was.
    async fn create_once(&self, path: &Path, bytes: &[u8]) -> Result<bool, StorageError> {
        let payload = PutPayload::from(bytes.to_vec());
        match self
            .store
            .put_opts(path, payload, PutMode::Create.into())
            .await
        {
            Ok(_) => {
                self.sync_local(path).await?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a receipt in the first receipt slot not yet taken, one slot per download
    /// taken (create-if-absent, so two servers cannot both fill the last one); `false`
    /// when every download already has its receipt.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn add_receipt(
        &self,
        snapshot: &Snapshot,
        record: &ReceiptRecord,
    ) -> Result<bool, StorageError> {
        let id = &snapshot.meta.id;
        let bytes = serde_json::to_vec(record).expect("receipts serialize");
        let first = u32::try_from(snapshot.receipts.len()).unwrap_or(u32::MAX);
        for n in first..snapshot.downloads {
            if self
                .create_once(&doc_path(id, &format!("receipts/{n:08}")), &bytes)
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The receipts listed in `snapshot`, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn receipts(&self, snapshot: &Snapshot) -> Result<Vec<ReceiptRecord>, StorageError> {
        let mut receipts = Vec::with_capacity(snapshot.receipts.len());
        for path in &snapshot.receipts {
            if let Some(record) = self.get_json(path).await? {
                receipts.push(record);
            }
        }
        Ok(receipts)
    }

    /// Documents whose `index` time is at or before `now`: (index object, document ID).
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn due(&self, index: Index, now: u64) -> Result<Vec<(Path, String)>, StorageError> {
        let prefix = Path::from(match index {
            Index::Expiry => "index/expiry",
            Index::Purge => "index/purge",
        });
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(objects
            .into_iter()
            .filter_map(|object| {
                let name = object.location.filename()?.to_owned();
                let (at, id) = name.split_once('-')?;
                let at: u64 = at.parse().ok()?;
                (at <= now && crate::repository::is_document_id(id))
                    .then(|| (object.location, id.to_owned()))
            })
            .collect())
    }

    /// Deletes an index entry once its work is done.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn delete_index(&self, entry: &Path) -> Result<(), StorageError> {
        match self.store.delete(entry).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a message: its sealed bytes, then its record (create-if-absent); `false`
    /// when a message with this ID (the same bytes from the same sender) was already
    /// there, which is left as it is.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn post_message(
        &self,
        meta: &MessageMeta,
        sealed: Bytes,
    ) -> Result<bool, StorageError> {
        let record = message_path(&meta.recipient, &meta.id, "meta.json");
        if self.get_json::<MessageMeta>(&record).await?.is_some() {
            return Ok(false);
        }
        self.put(
            &message_path(&meta.recipient, &meta.id, "sealed"),
            sealed,
            PutMode::Overwrite,
        )
        .await?;
        let bytes = serde_json::to_vec(meta).expect("message records serialize");
        self.create_once(&record, &bytes).await
    }

    /// The IDs of the messages in `recipient`'s mailbox with the time each was stored,
    /// oldest first; a message whose record is missing (a post or a delete cut short)
    /// is not there.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn mailbox(&self, recipient: &str) -> Result<Vec<String>, StorageError> {
        let prefix = Path::from(format!("mailboxes/{recipient}"));
        let mut found = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(object) = listing.try_next().await? {
            let parts: Vec<_> = object.location.parts().collect();
            let names: Vec<&str> = parts.iter().map(|p| p.as_ref()).collect();
            if let [_, _, id, "meta.json"] = names.as_slice() {
                if crate::repository::api::is_message_id(id) {
                    found.push((object.last_modified, (*id).to_owned()));
                }
            }
        }
        found.sort();
        Ok(found.into_iter().map(|(_, id)| id).collect())
    }

    /// The record of message `id` in `recipient`'s mailbox, or `None`.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn message_meta(
        &self,
        recipient: &str,
        id: &str,
    ) -> Result<Option<MessageMeta>, StorageError> {
        self.get_json(&message_path(recipient, id, "meta.json"))
            .await
    }

    /// Message `id` of `recipient`'s mailbox: its record and sealed bytes (at most
    /// `limit` of them), or `None` when it is not there.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails or the bytes are larger than `limit`.
    pub async fn message(
        &self,
        recipient: &str,
        id: &str,
        limit: usize,
    ) -> Result<Option<(MessageMeta, Bytes)>, StorageError> {
        let Some(meta) = self.message_meta(recipient, id).await? else {
            return Ok(None);
        };
        let path = message_path(recipient, id, "sealed");
        let result = match self.store.get(&path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if result.meta.size > limit as u64 {
            return Err(StorageError::Corrupt(path.to_string()));
        }
        Ok(Some((meta, result.bytes().await?)))
    }

    /// Deletes message `id` from `recipient`'s mailbox: its record first, so that a
    /// delete cut short leaves no listed message. Deleting an absent message does nothing.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails.
    pub async fn delete_message(&self, recipient: &str, id: &str) -> Result<(), StorageError> {
        for rest in ["meta.json", "sealed"] {
            match self.store.delete(&message_path(recipient, id, rest)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(root) = &self.local_root {
            // The local backend leaves the message's folder behind; an empty one goes.
            let _ = std::fs::remove_dir(root.join(format!("mailboxes/{recipient}/{id}")));
        }
        Ok(())
    }

    /// Whether the store answers (for `/healthz`).
    ///
    /// # Errors
    /// [`StorageError`] when it does not.
    pub async fn ready(&self) -> Result<(), StorageError> {
        let prefix = Path::from("index");
        let mut listing = self.store.list(Some(&prefix));
        listing.try_next().await?;
        Ok(())
    }
}

/// A part arriving ([`Storage::part_upload`]; the module documentation says where its
/// bytes wait). Dropped before [`PartUpload::finish`] (a body cut short, too long or
/// stalled), it leaves no new part and no hash: an earlier copy of the part stays as it
/// was.
pub struct PartUpload {
    storage: Storage,
    id: String,
    n: u32,
    hasher: sha2::Sha256,
    sink: PartSink,
}

enum PartSink {
    /// The temp file (with the hasher, while a write holds neither), the bytes not yet
    /// written, and the part's final name.
    Local {
        temp: Option<crate::durable::Pending>,
        buffer: Vec<u8>,
        path: PathBuf,
    },
    /// The S3 backend: the part, gathered for one PUT.
    Memory(bytes::BytesMut),
}

impl PartUpload {
    /// Takes the next bytes of the part.
    ///
    /// # Errors
    /// [`StorageError::Write`] when the temp file cannot be written.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        match &mut self.sink {
            PartSink::Memory(buffer) => {
                sha2::Digest::update(&mut self.hasher, chunk);
                buffer.extend_from_slice(chunk);
                Ok(())
            }
            PartSink::Local { buffer, .. } => {
                buffer.extend_from_slice(chunk);
                if buffer.len() >= LOCAL_WRITE_CHUNK {
                    self.flush().await?;
                }
                Ok(())
            }
        }
    }

    /// Writes (and hashes) the bytes gathered to the temp file, off the async threads.
    async fn flush(&mut self) -> Result<(), StorageError> {
        let PartSink::Local { temp, buffer, path } = &mut self.sink else {
            return Ok(());
        };
        if buffer.is_empty() {
            return Ok(());
        }
        let mut pending = temp.take().ok_or_else(|| StorageError::Write {
            path: path.clone(),
            source: std::io::Error::other("an earlier write failed"),
        })?;
        let mut hasher = std::mem::take(&mut self.hasher);
        let mut data = std::mem::take(buffer);
        let (pending, hasher, data) = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            pending.file().write_all(&data)?;
            sha2::Digest::update(&mut hasher, &data);
            data.clear();
            Ok::<_, std::io::Error>((pending, hasher, data))
        })
        .await
        .map_err(|e| StorageError::Open(e.to_string()))?
        .map_err(|source| StorageError::Write {
            path: path.clone(),
            source,
        })?;
        *temp = Some(pending);
        *buffer = data;
        self.hasher = hasher;
        Ok(())
    }

    /// Stores the part (on the local backend: temp file synced, renamed over the part,
    /// folder synced), then its hash record.
    ///
    /// # Errors
    /// [`StorageError`] when the store fails; the part may then be missing or stale, and
    /// its hash record old: a completion refuses it until it is sent again.
    pub async fn finish(mut self) -> Result<(), StorageError> {
        self.flush().await?;
        let part = doc_path(&self.id, &format!("parts/{:08}", self.n));
        let identity = match self.sink {
            PartSink::Memory(buffer) => {
                self.storage
                    .put_tagged(&part, buffer.freeze(), PutMode::Overwrite)
                    .await?
            }
            PartSink::Local { temp, path, .. } => {
                let pending = temp.ok_or_else(|| StorageError::Write {
                    path: path.clone(),
                    source: std::io::Error::other("an earlier write failed"),
                })?;
                let named = path.clone();
                // The identity is taken from the temp file itself: a rename keeps it, and
                // a racing upload renamed over the part in between cannot lend its own.
                let identity = tokio::task::spawn_blocking(move || {
                    let mut pending = pending;
                    let identity = local_identity(&pending.file().metadata()?);
                    pending.commit(&named)?;
                    Ok::<_, std::io::Error>(identity)
                })
                .await
                .map_err(|e| StorageError::Open(e.to_string()))?
                .map_err(|source| StorageError::Sync { path, source })?;
                Some(identity)
            }
        };
        let hash = sha2::Digest::finalize(self.hasher).into();
        self.storage
            .put_hash_record(&self.id, self.n, hash, identity.as_deref())
            .await
    }
}

/// The identity of a part on the local backend: inode, modification time (ns) and size,
/// which change when the part is replaced (a new temp file renamed over it).
fn local_identity(metadata: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{:x}-{:x}.{:x}-{:x}",
        metadata.ino(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.size()
    )
}

/// Streams a local file's `range` in large reads (object_store's own stream reads 8 KiB
/// at a time, a blocking task each).
fn local_stream(
    file: std::fs::File,
    range: Range<u64>,
) -> BoxStream<'static, Result<Bytes, StorageError>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let open = async move {
        let mut file = tokio::fs::File::from_std(file);
        file.seek(std::io::SeekFrom::Start(range.start)).await?;
        Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(
            file.take(range.end - range.start),
            LOCAL_READ_CHUNK,
        ))
    };
    futures_util::stream::once(open)
        .try_flatten()
        .map_err(|e| {
            StorageError::Backend(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            })
        })
        .boxed()
}
