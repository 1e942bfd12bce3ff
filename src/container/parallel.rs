//! Sealing and opening chunks on several cores.
//!
//! STREAM chunks are independent: chunk i is sealed with the nonce `i || last flag` under
//! the one payload key, so worker threads can seal or open different chunks at once while
//! the caller's thread reads input and writes output in order. At most `2 × threads`
//! chunks are in flight and their buffers are reused, so memory stays a few chunks
//! whatever the input size. The bytes written are exactly those of the single-threaded
//! [`super::Encryptor`]; [`ParallelDecryptor`] hands out a chunk's plaintext only after it
//! authenticated, in order, and reports the first failing chunk as the sequential reader
//! does.
//!
//! With one thread no worker is started: chunks are sealed on the caller's thread, still
//! read straight into the chunk buffer (no copy), which is what [`super::encrypt`] uses.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use super::fill_chunk;
use super::header::{self, Header};
use super::stream::{Stream, TAG_LEN};
use super::{Compression, ContainerError, ContainerKey, Options, fill, read_sealed_chunk};

/// The work done on one chunk: seal or open `buf` in place as chunk `index`.
type Work = dyn Fn(u64, &mut Vec<u8>, bool) -> Result<(), ContainerError> + Send + Sync;

/// Threads to use for a request: 0 means one per available core.
pub fn threads(requested: usize) -> usize {
    match requested {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    }
}

struct Job {
    index: u64,
    last: bool,
    buf: Vec<u8>,
}

struct Done {
    index: u64,
    last: bool,
    buf: Vec<u8>,
    result: Result<(), ContainerError>,
}

/// Worker threads fed in chunk order, with results handed back in chunk order and a
/// bounded number of chunks in flight.
struct Pool {
    work: Arc<Work>,
    jobs: Option<mpsc::SyncSender<Job>>,
    results: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    ready: BTreeMap<u64, Done>,
    next_in: u64,
    next_out: u64,
    limit: u64,
    free: Vec<Vec<u8>>,
    capacity: usize,
}

impl Pool {
    fn new(work: Arc<Work>, threads: usize, capacity: usize) -> Result<Pool, ContainerError> {
        let limit = 2 * threads.max(1);
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(limit);
        let (done_tx, results) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::new();
        if threads > 1 {
            for n in 0..threads {
                let (work, job_rx, done_tx) = (work.clone(), job_rx.clone(), done_tx.clone());
                let worker = std::thread::Builder::new()
                    .name(format!("container-{n}"))
                    .spawn(move || run_worker(&*work, &job_rx, &done_tx))
                    .map_err(|e| ContainerError::Io(format!("cannot start a thread: {e}")))?;
                workers.push(worker);
            }
        }
        Ok(Pool {
            work,
            jobs: Some(jobs),
            results,
            workers,
            ready: BTreeMap::new(),
            next_in: 0,
            next_out: 0,
            limit: limit as u64,
            free: Vec::new(),
            capacity,
        })
    }

    /// No more chunks may be submitted before the next one is taken out.
    fn full(&self) -> bool {
        self.next_in - self.next_out >= self.limit
    }

    /// A cleared buffer: a reused one, or a new one with room for a sealed chunk.
    fn buffer(&mut self) -> Vec<u8> {
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    fn recycle(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        self.free.push(buf);
    }

    /// Queues the next chunk (the caller checks [`Pool::full`] first).
    fn submit(&mut self, mut buf: Vec<u8>, last: bool) -> Result<(), ContainerError> {
        let index = self.next_in;
        self.next_in += 1;
        match (&self.jobs, self.workers.is_empty()) {
            (Some(jobs), false) => jobs.send(Job { index, last, buf }).map_err(|_| stopped()),
            _ => {
                let result = (self.work)(index, &mut buf, last);
                let done = Done {
                    index,
                    last,
                    buf,
                    result,
                };
                self.ready.insert(index, done);
                Ok(())
            }
        }
    }

    /// The next chunk in order, once its work is done; `None` when nothing is in flight.
    fn next_done(&mut self) -> Result<Option<Done>, ContainerError> {
        if self.next_out == self.next_in {
            return Ok(None);
        }
        loop {
            if let Some(done) = self.ready.remove(&self.next_out) {
                self.next_out += 1;
                return Ok(Some(done));
            }
            let done = self.results.recv().map_err(|_| stopped())?;
            self.ready.insert(done.index, done);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            // A worker that panicked has nothing left to clean up.
            let _ = worker.join();
        }
    }
}

fn stopped() -> ContainerError {
    ContainerError::Io("a container worker thread stopped unexpectedly".into())
}

fn run_worker(work: &Work, jobs: &Mutex<mpsc::Receiver<Job>>, done: &mpsc::Sender<Done>) {
    loop {
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok(mut job) = job else { return };
        let result = work(job.index, &mut job.buf, job.last);
        let finished = Done {
            index: job.index,
            last: job.last,
            buf: job.buf,
            result,
        };
        if done.send(finished).is_err() {
            return;
        }
    }
}

/// Seals a plaintext stream on several threads; the same bytes as
/// [`super::Encryptor`]. The last chunk is only written by [`ParallelEncryptor::finish`]:
/// you **must** call it, or the container is truncated.
pub struct ParallelEncryptor<W: Write> {
    inner: W,
    pool: Pool,
    chunk: Vec<u8>,
    chunk_size: usize,
}

impl<W: Write> ParallelEncryptor<W> {
    /// Writes the header (with a fresh random salt) and starts `threads` workers (0: one
    /// per core; 1: none, sealing on the caller's thread).
    ///
    /// # Errors
    /// [`ContainerError`] on an invalid chunk size, no randomness or a failed write.
    pub fn new(
        key: &ContainerKey,
        options: &Options,
        threads: usize,
        inner: W,
    ) -> Result<Self, ContainerError> {
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt)
            .map_err(|e| ContainerError::Io(format!("no randomness from the OS: {e}")))?;
        Self::with_salt(key, options, salt, threads, inner)
    }

    /// As [`ParallelEncryptor::new`] with a given salt: for test vectors only (a salt
    /// must never repeat under one key).
    ///
    /// # Errors
    /// [`ContainerError`] on an invalid chunk size or a failed write.
    pub fn with_salt(
        key: &ContainerKey,
        options: &Options,
        salt: [u8; 32],
        threads: usize,
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
        let stream = Stream::new(&key.payload_key(&salt), encoded);
        let work: Arc<Work> = Arc::new(move |index, buf, last| stream.seal_at(index, buf, last));
        let chunk_size = header.chunk_size();
        let mut pool = Pool::new(work, self::threads(threads), chunk_size + TAG_LEN)?;
        Ok(ParallelEncryptor {
            inner,
            chunk: pool.buffer(),
            pool,
            chunk_size,
        })
    }

    /// Writes sealed chunks out in order until another chunk may be submitted.
    fn make_room(&mut self) -> Result<(), ContainerError> {
        while self.pool.full() {
            self.write_next()?;
        }
        Ok(())
    }

    /// Writes the next sealed chunk; false when none is in flight.
    fn write_next(&mut self) -> Result<bool, ContainerError> {
        let Some(done) = self.pool.next_done()? else {
            return Ok(false);
        };
        done.result?;
        self.inner.write_all(&done.buf)?;
        self.pool.recycle(done.buf);
        Ok(true)
    }

    /// Submits the current chunk and continues with `next`.
    fn submit(&mut self, last: bool, next: Vec<u8>) -> Result<(), ContainerError> {
        self.make_room()?;
        let chunk = std::mem::replace(&mut self.chunk, next);
        self.pool.submit(chunk, last)
    }

    /// Reads `reader` to its end straight into chunk buffers (no intermediate copy).
    ///
    /// # Errors
    /// [`ContainerError`] on a failed read or write.
    pub fn read_from(&mut self, reader: &mut impl Read) -> Result<(), ContainerError> {
        loop {
            if self.chunk.len() < self.chunk_size {
                fill(reader, &mut self.chunk, self.chunk_size)?;
                if self.chunk.len() < self.chunk_size {
                    return Ok(());
                }
            }
            // A full chunk is sealed as a middle chunk only once more data is there.
            let mut next = self.pool.buffer();
            fill(reader, &mut next, self.chunk_size)?;
            if next.is_empty() {
                self.pool.recycle(next);
                return Ok(());
            }
            self.submit(false, next)?;
        }
    }

    /// Seals the final chunk, writes everything in order; returns the inner writer,
    /// flushed.
    ///
    /// # Errors
    /// [`ContainerError`] when sealing or writing fails.
    pub fn finish(mut self) -> Result<W, ContainerError> {
        let next = Vec::new();
        self.submit(true, next)?;
        while self.write_next()? {}
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelEncryptor<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let written = data.len();
        while !data.is_empty() {
            if self.chunk.len() == self.chunk_size {
                let next = self.pool.buffer();
                self.submit(false, next)?;
            }
            data = fill_chunk(&mut self.chunk, self.chunk_size, data);
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Opens a container on several threads as a stream of authenticated plaintext (before
/// decompression), in order; the final end of stream comes only after the last-flagged
/// chunk authenticated. After an error it keeps returning that error.
pub struct ParallelDecryptor<R: Read> {
    inner: R,
    header: Header,
    pool: Pool,
    want: usize,
    lookahead: Option<u8>,
    input_done: bool,
    plain: Vec<u8>,
    offset: usize,
    done: bool,
    failed: Option<ContainerError>,
}

impl<R: Read> ParallelDecryptor<R> {
    /// Reads and checks the header, and starts `threads` workers (0: one per core).
    ///
    /// # Errors
    /// [`ContainerError::NotAContainer`], [`ContainerError::Unsupported`] or I/O.
    pub fn new(key: &ContainerKey, threads: usize, mut inner: R) -> Result<Self, ContainerError> {
        let mut encoded = [0u8; header::HEADER_LEN];
        inner.read_exact(&mut encoded).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ContainerError::NotAContainer,
            _ => e.into(),
        })?;
        let header = Header::decode(&encoded)?;
        let want = header.chunk_size() + TAG_LEN;
        let stream = Stream::new(&key.payload_key(&header.salt), encoded);
        let work: Arc<Work> = Arc::new(move |index, buf, last| {
            // `open_read` needs to know the full length to tell a cut from damage.
            stream.open_read(index, buf, last, want)
        });
        Ok(ParallelDecryptor {
            inner,
            header,
            pool: Pool::new(work, self::threads(threads), want)?,
            want,
            lookahead: None,
            input_done: false,
            plain: Vec::new(),
            offset: 0,
            done: false,
            failed: None,
        })
    }

    /// The container's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next authenticated chunk's plaintext, or `None` after the last chunk.
    ///
    /// # Errors
    /// [`ContainerError`] naming the first chunk that failed, or truncation.
    pub fn next_plaintext(&mut self) -> Result<Option<&[u8]>, ContainerError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        while self.offset == self.plain.len() {
            if self.done {
                return Ok(None);
            }
            if let Err(error) = self.next_chunk() {
                self.failed = Some(error.clone());
                return Err(error);
            }
        }
        let rest = &self.plain[self.offset..];
        self.offset = self.plain.len();
        Ok(Some(rest))
    }

    /// Keeps the workers busy with the chunks that follow, then takes the next one.
    fn next_chunk(&mut self) -> Result<(), ContainerError> {
        while !self.input_done && !self.pool.full() {
            let mut buf = self.pool.buffer();
            let last =
                read_sealed_chunk(&mut self.inner, &mut self.lookahead, &mut buf, self.want)?;
            self.pool.submit(buf, last)?;
            self.input_done = last;
        }
        let done = self.pool.next_done()?.ok_or_else(stopped)?;
        done.result?;
        let used = std::mem::replace(&mut self.plain, done.buf);
        self.pool.recycle(used);
        self.offset = 0;
        self.done = done.last;
        Ok(())
    }
}

impl<R: Read> Read for ParallelDecryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.offset == self.plain.len() && self.next_plaintext()?.is_some() {
            // next_plaintext marked the chunk as taken; hand it out from its start.
            self.offset = 0;
        }
        let n = out.len().min(self.plain.len() - self.offset);
        out[..n].copy_from_slice(&self.plain[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// Encrypts everything `reader` yields into `writer` (compressing first if asked) on
/// `threads` threads (0: one per core). Without compression the bytes are those of
/// [`super::encrypt`] for the same salt; with zstd and several threads, zstd compresses on
/// that many threads too (a different but equally standard zstd frame inside the same
/// container format).
///
/// # Errors
/// [`ContainerError`] on I/O failure.
pub fn encrypt_parallel<R: Read, W: Write>(
    key: &ContainerKey,
    options: &Options,
    mut reader: R,
    writer: W,
    threads: usize,
) -> Result<W, ContainerError> {
    let mut encryptor = ParallelEncryptor::new(key, options, threads, writer)?;
    match options.compression {
        Compression::None => {
            encryptor.read_from(&mut reader)?;
            encryptor.finish()
        }
        Compression::Zstd => {
            let mut compressor = zstd::stream::write::Encoder::new(encryptor, options.zstd_level)?;
            let workers = self::threads(threads);
            if workers > 1 {
                // zstd's own workers compress blocks in parallel: still one standard frame,
                // but not the same bytes as single-threaded zstd.
                compressor.multithread(u32::try_from(workers).unwrap_or(u32::MAX))?;
            }
            io::copy(&mut reader, &mut compressor)?;
            compressor.finish()?.finish()
        }
    }
}

/// Decrypts (and decompresses) a container on `threads` threads (0: one per core). Bytes
/// already written are authenticated, but the whole is only valid when this returns `Ok`.
///
/// # Errors
/// [`ContainerError`]: damaged, truncated, wrong key, or I/O.
pub fn decrypt_parallel<R: Read, W: Write>(
    key: &ContainerKey,
    reader: R,
    mut writer: W,
    threads: usize,
) -> Result<W, ContainerError> {
    let mut decryptor = ParallelDecryptor::new(key, threads, reader)?;
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
