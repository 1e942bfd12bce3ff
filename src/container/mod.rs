//! The encrypted container: what the repository stores and never can read.
//!
//! A container is a 48-byte [`header`] followed by the plaintext (the PDI ZIP, optionally
//! zstd-compressed first) cut into chunks of 2^n bytes, each sealed by [`stream`]
//! (AES-256-GCM, STREAM construction) under a per-file key derived from the
//! [`ContainerKey`] and the header's random salt. Memory use is one chunk, whatever the
//! size of the study. See docs/container.md for the byte layout.
//!
//! Decryption hands out only authenticated chunks, and reports a container that ends
//! before its last-flagged chunk as truncated; [`decrypt_file`] writes a temp file and
//! renames it only after the last chunk authenticated, so nothing is committed from a
//! container that fails.

pub mod cli;
pub mod header;
pub mod keys;
pub mod parallel;
pub mod stream;

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

pub use header::{Compression, Header};
pub use keys::ContainerKey;
pub use parallel::{ParallelDecryptor, ParallelEncryptor, decrypt_parallel, encrypt_parallel};
use stream::{Stream, TAG_LEN};

/// Default chunk size: 1 MiB (2^20), large enough for AES-GCM's full speed.
pub const DEFAULT_CHUNK_LOG2: u8 = 20;

/// Bounds of what opening one container may write, so that a small hostile container
/// cannot fill the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecryptLimits {
    /// Most plaintext bytes written (after decompression); `inbound.max_document_mb`.
    pub max_output: u64,
    /// Most bytes a zstd-compressed container may expand to per byte of container.
    pub max_ratio: u64,
    /// Plaintext always allowed whatever the ratio (small sets of blank images compress
    /// extremely well).
    pub ratio_floor: u64,
}

/// Default of [`DecryptLimits::max_ratio`]: real studies compress 1.5 to 10 times; a
/// decompression bomb, thousands of times.
pub const MAX_EXPANSION_RATIO: u64 = 1000;
/// Default of [`DecryptLimits::ratio_floor`]: 256 MiB.
pub const EXPANSION_FLOOR: u64 = 256 << 20;

impl Default for DecryptLimits {
    /// 20 GiB (the default of `inbound.max_document_mb`), ratio 1000 above 256 MiB.
    fn default() -> Self {
        DecryptLimits {
            max_output: 20 << 30,
            max_ratio: MAX_EXPANSION_RATIO,
            ratio_floor: EXPANSION_FLOOR,
        }
    }
}

/// A writer that refuses to write past its bound, counting while it streams.
struct Bounded<W> {
    inner: W,
    written: u64,
    limit: u64,
    error: ContainerError,
}

impl<W: Write> Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let after = self.written.checked_add(buf.len() as u64);
        if after.is_none_or(|after| after > self.limit) {
            return Err(self.error.clone().into());
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Why a container cannot be written or read. The messages are meant for the person
/// holding the token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContainerError {
    /// The input does not start with the container magic.
    #[error("this is not a cloudpdi container (wrong magic bytes)")]
    NotAContainer,
    /// A header field this version does not know.
    #[error("unsupported container: {0}; a newer cloudpdi may read it")]
    Unsupported(String),
    /// A chunk failed authentication.
    #[error("container is damaged or the token is wrong (chunk {chunk} failed authentication)")]
    Damaged {
        /// Zero-based chunk index.
        chunk: u64,
    },
    /// The input ended before the last chunk.
    #[error("container is truncated after chunk {chunks}: the download is incomplete")]
    Truncated {
        /// Chunks that authenticated before the end.
        chunks: u64,
    },
    /// More than 2^64 chunks.
    #[error("container too large")]
    TooLarge,
    /// The plaintext is larger than the receiver accepts.
    #[error(
        "the container holds more than {limit} bytes once opened, the most this receiver \
         accepts (inbound.max_document_mb); nothing was kept; raise inbound.max_document_mb \
         if the study is expected to be this large"
    )]
    OutputTooLarge {
        /// The bound (bytes).
        limit: u64,
    },
    /// The compressed plaintext expands far more than any study does: a decompression bomb.
    #[error(
        "the container's compressed content expands to more than {ratio} times its size \
         ({limit} bytes), far beyond any study: refused as a decompression bomb; nothing \
         was kept; ask the sender to send the study again"
    )]
    Expansion {
        /// The bound on output bytes per container byte.
        ratio: u64,
        /// The bound it gave for this container (bytes).
        limit: u64,
    },
    /// Reading or writing failed (message of the I/O error).
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<io::Error> for ContainerError {
    fn from(err: io::Error) -> Self {
        match err
            .get_ref()
            .and_then(|e| e.downcast_ref::<ContainerError>())
        {
            Some(inner) => inner.clone(),
            None => ContainerError::Io(err.to_string()),
        }
    }
}

impl From<ContainerError> for io::Error {
    fn from(err: ContainerError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

/// How to write a container.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Compression inside the encryption.
    pub compression: Compression,
    /// zstd level when compressing (1..=19; 3 is zstd's default).
    pub zstd_level: i32,
    /// log2 of the chunk size (16..=24).
    pub chunk_log2: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            compression: Compression::None,
            zstd_level: 3,
            chunk_log2: DEFAULT_CHUNK_LOG2,
        }
    }
}

/// Seals a plaintext stream into chunks. The last chunk is only written by
/// [`Encryptor::finish`]: you **must** call it, or the container is truncated.
pub struct Encryptor<W: Write> {
    inner: W,
    stream: Stream,
    chunk: Vec<u8>,
    chunk_size: usize,
}

impl<W: Write> Encryptor<W> {
    /// Writes the header (with a fresh random salt) and returns the sealing writer.
    ///
    /// # Errors
    /// [`ContainerError`] on an invalid chunk size or a failed write.
    pub fn new(key: &ContainerKey, options: &Options, inner: W) -> Result<Self, ContainerError> {
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt)
            .map_err(|e| ContainerError::Io(format!("no randomness from the OS: {e}")))?;
        Self::with_salt(key, options, salt, inner)
    }

    /// As [`Encryptor::new`] with a given salt: for test vectors only (a salt must never
    /// repeat under one key).
    ///
    /// # Errors
    /// [`ContainerError`] on an invalid chunk size or a failed write.
    pub fn with_salt(
        key: &ContainerKey,
        options: &Options,
        salt: [u8; 32],
        mut inner: W,
    ) -> Result<Self, ContainerError> {
        let header = Header {
            compression: options.compression,
            chunk_log2: options.chunk_log2,
            salt,
        };
        let encoded = header.encode();
        Header::decode(&encoded)?;
        inner.write_all(&encoded)?;
        let chunk_size = header.chunk_size();
        Ok(Encryptor {
            inner,
            stream: Stream::new(&key.payload_key(&salt), encoded),
            chunk: Vec::with_capacity(chunk_size + TAG_LEN),
            chunk_size,
        })
    }

    /// Seals and writes the final chunk; returns the inner writer, flushed.
    ///
    /// # Errors
    /// [`ContainerError`] when writing fails.
    pub fn finish(mut self) -> Result<W, ContainerError> {
        self.stream.seal(&mut self.chunk, true)?;
        self.inner.write_all(&self.chunk)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

/// Moves as much of `data` into `chunk` as fits below `chunk_size`; returns the rest.
/// Both encryptors buffer plaintext into chunks this way.
fn fill_chunk<'a>(chunk: &mut Vec<u8>, chunk_size: usize, data: &'a [u8]) -> &'a [u8] {
    let take = chunk_size.saturating_sub(chunk.len()).min(data.len());
    chunk.extend_from_slice(&data[..take]);
    &data[take..]
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let written = data.len();
        while !data.is_empty() {
            if self.chunk.len() == self.chunk_size {
                // More data follows a full chunk: it is not the last one.
                self.stream.seal(&mut self.chunk, false)?;
                self.inner.write_all(&self.chunk)?;
                self.chunk.clear();
            }
            data = fill_chunk(&mut self.chunk, self.chunk_size, data);
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Opens a container as a stream of authenticated plaintext (before decompression).
/// Bytes are returned only from chunks that authenticated; the final `Ok(0)` comes only
/// after the last-flagged chunk did, so a truncated container ends in an error.
pub struct Decryptor<R: Read> {
    inner: R,
    header: Header,
    stream: Stream,
    plain: Vec<u8>,
    offset: usize,
    lookahead: Option<u8>,
    done: bool,
}

impl<R: Read> Decryptor<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// [`ContainerError::NotAContainer`], [`ContainerError::Unsupported`] or I/O.
    pub fn new(key: &ContainerKey, mut inner: R) -> Result<Self, ContainerError> {
        let mut encoded = [0u8; header::HEADER_LEN];
        inner.read_exact(&mut encoded).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ContainerError::NotAContainer,
            _ => e.into(),
        })?;
        let header = Header::decode(&encoded)?;
        Ok(Decryptor {
            inner,
            stream: Stream::new(&key.payload_key(&header.salt), encoded),
            header,
            plain: Vec::with_capacity(header.chunk_size() + TAG_LEN),
            offset: 0,
            lookahead: None,
            done: false,
        })
    }

    /// The container's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn next_chunk(&mut self) -> Result<(), ContainerError> {
        let want = self.header.chunk_size() + TAG_LEN;
        self.offset = 0;
        let last = read_sealed_chunk(&mut self.inner, &mut self.lookahead, &mut self.plain, want)?;
        let index = self.stream.position();
        self.stream.open_read(index, &mut self.plain, last, want)?;
        self.stream.advance()?;
        self.done = last;
        Ok(())
    }
}

/// Reads one sealed chunk (at most `want` bytes, starting with the look-ahead byte) into
/// `buf`, and says whether the input ends with it; the byte after a full chunk is kept in
/// `lookahead`.
fn read_sealed_chunk(
    reader: &mut impl Read,
    lookahead: &mut Option<u8>,
    buf: &mut Vec<u8>,
    want: usize,
) -> io::Result<bool> {
    buf.clear();
    if let Some(byte) = lookahead.take() {
        buf.push(byte);
    }
    fill(reader, buf, want)?;
    let mut peek = [0u8; 1];
    let last = buf.len() < want || read_some(reader, &mut peek)? == 0;
    if !last {
        *lookahead = Some(peek[0]);
    }
    Ok(last)
}

impl<R: Read> Decryptor<R> {
    /// The next authenticated chunk's plaintext, or `None` after the last chunk; lets a
    /// consumer write chunks out without another copy.
    ///
    /// # Errors
    /// [`ContainerError`] naming the chunk that failed, or truncation.
    pub fn next_plaintext(&mut self) -> Result<Option<&[u8]>, ContainerError> {
        while self.offset == self.plain.len() {
            if self.done {
                return Ok(None);
            }
            self.next_chunk()?;
        }
        let rest = &self.plain[self.offset..];
        self.offset = self.plain.len();
        Ok(Some(rest))
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.offset == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.plain.len() - self.offset);
        out[..n].copy_from_slice(&self.plain[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// Reads until `buf` holds `want` bytes or the input ends, into the buffer's spare
/// capacity (readers such as files and slices then fill it without zeroing it first).
fn fill(reader: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    let need = want.saturating_sub(buf.len());
    reader.by_ref().take(need as u64).read_to_end(buf)?;
    Ok(())
}

fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Encrypts everything `reader` yields into `writer` (compressing first if asked), on
/// the caller's thread; [`encrypt_parallel`] uses several.
///
/// # Errors
/// [`ContainerError`] on I/O failure.
pub fn encrypt<R: Read, W: Write>(
    key: &ContainerKey,
    options: &Options,
    reader: R,
    writer: W,
) -> Result<W, ContainerError> {
    encrypt_parallel(key, options, reader, writer, 1)
}

/// Decrypts (and decompresses) a container from `reader` into `writer`. Bytes already
/// written are authenticated, but the whole is only valid when this returns `Ok`.
///
/// # Errors
/// [`ContainerError`]: damaged, truncated, wrong key, or I/O.
pub fn decrypt<R: Read, W: Write>(
    key: &ContainerKey,
    reader: R,
    mut writer: W,
) -> Result<W, ContainerError> {
    let mut decryptor = Decryptor::new(key, reader)?;
    match decryptor.header().compression {
        Compression::None => {
            while let Some(plain) = decryptor.next_plaintext()? {
                writer.write_all(plain)?;
            }
        }
        Compression::Zstd => {
            let mut decompressor = zstd::stream::read::Decoder::new(decryptor)?;
            io::copy(&mut decompressor, &mut writer)?;
        }
    }
    writer.flush()?;
    Ok(writer)
}

/// Decrypts the container at `input` into `output` on all cores within
/// [`DecryptLimits::default`]; see [`decrypt_file_limited`].
///
/// # Errors
/// [`ContainerError`]; on error `output` is not created and the temp file is removed.
pub fn decrypt_file(key: &ContainerKey, input: &Path, output: &Path) -> Result<(), ContainerError> {
    decrypt_file_limited(key, input, output, DecryptLimits::default())
}

/// Decrypts the container at `input` into `output` on all cores: written to a temp file
/// beside it (created exclusively with mode 0600, never through a link left there), and
/// made durable under `output` ([`crate::durable`]) only after the last chunk
/// authenticated. The plaintext is counted while it is written (after decompression) and
/// refused past `limits`.
///
/// # Errors
/// [`ContainerError`]; on error `output` is not created and the temp file is removed.
pub fn decrypt_file_limited(
    key: &ContainerKey,
    input: &Path,
    output: &Path,
    limits: DecryptLimits,
) -> Result<(), ContainerError> {
    let source = File::open(input)?;
    let input_len = source.metadata()?.len();
    let reader = BufReader::new(source);
    let mut pending = crate::durable::Pending::beside(output, 0o600)?;
    {
        let file = pending.file();
        let writer = Bounded {
            inner: BufWriter::new(file),
            written: 0,
            limit: limits.max_output,
            error: ContainerError::OutputTooLarge {
                limit: limits.max_output,
            },
        };
        let mut decryptor = ParallelDecryptor::new(key, 0, reader)?;
        let writer = match decryptor.header().compression {
            Compression::None => copy_plaintext(&mut decryptor, writer)?,
            Compression::Zstd => {
                let expansion = input_len
                    .saturating_mul(limits.max_ratio)
                    .max(limits.ratio_floor);
                let mut writer = writer;
                if expansion < writer.limit {
                    writer.limit = expansion;
                    writer.error = ContainerError::Expansion {
                        ratio: limits.max_ratio,
                        limit: expansion,
                    };
                }
                let mut decompressor = zstd::stream::read::Decoder::new(decryptor)?;
                io::copy(&mut decompressor, &mut writer)?;
                writer
            }
        };
        writer
            .inner
            .into_inner()
            .map_err(|e| ContainerError::Io(e.to_string()))?;
    }
    pending.commit(output)?;
    Ok(())
}

/// Writes every authenticated chunk of an uncompressed container to `writer`.
fn copy_plaintext<R: Read, W: Write>(
    decryptor: &mut ParallelDecryptor<R>,
    mut writer: W,
) -> Result<W, ContainerError> {
    while let Some(plain) = decryptor.next_plaintext()? {
        writer.write_all(plain)?;
    }
    writer.flush()?;
    Ok(writer)
}
