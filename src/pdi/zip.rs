//! ZIP for file sets: a streaming writer of stored entries (ZIP64 when an entry, an offset
//! or the entry count needs it) and a safe, bounded extractor.
//!
//! The writer never seeks: each entry's CRC-32 and size are known before it is written
//! (the builder hashes every file first), so it writes straight into a pipe, a socket or
//! the encrypting container. The extractor trusts nothing in the archive: every name is
//! checked to stay inside the target folder, every declared size is checked against the
//! bytes actually there, and entry count and total size are bounded.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const END: u32 = 0x0605_4b50;
const END64: u32 = 0x0606_4b50;
const LOCATOR64: u32 = 0x0706_4b50;
const MAX32: u64 = 0xFFFF_FFFF;
const COPY_BUFFER: usize = 256 * 1024;

/// Why an archive cannot be written or extracted.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The file is not a ZIP archive this reader understands.
    #[error("not a usable ZIP archive: {0}")]
    NotZip(String),
    /// An entry name would leave the target folder or is not a plain file name.
    #[error("unsafe entry name {name:?} in the ZIP: {why}; nothing of the archive was kept")]
    UnsafeName {
        /// The name as found.
        name: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The archive's declared sizes or checksums do not match its content.
    #[error("ZIP entry {name:?}: {why}; the archive is damaged or forged")]
    Lying {
        /// The entry.
        name: String,
        /// What does not match.
        why: String,
    },
    /// The archive exceeds a limit of the extractor.
    #[error("ZIP archive refused: {0}; nothing of it was kept")]
    TooLarge(String),
    /// A file changed while it was being written into the archive.
    #[error("{0} changed while the archive was written")]
    Changed(String),
    /// An entry that cannot be read front to back ([`read_stream`]): its sizes and CRC
    /// follow its data, or it is compressed.
    #[error(
        "ZIP entry {name:?} cannot be read as it arrives: {why}; cloudpdi's own sets \
         never hold such entries: extract the archive whole instead"
    )]
    Unstreamable {
        /// The entry.
        name: String,
        /// What makes it so.
        why: &'static str,
    },
}

/// Most folder entries [`read_stream`] takes: a PDI has a folder per patient, study and
/// series, far fewer than this; file entries are bounded by the manifest, folder entries
/// only by this (each is remembered and created on disk).
pub const MAX_STREAM_FOLDERS: u64 = 65_536;

/// Most bytes of all entry names together that [`read_stream`] remembers (to refuse a
/// name twice): 16 MiB, room for about 400,000 files of a PDI's usual 40-byte names,
/// within the receiver's memory bound however many entries an archive declares.
pub const MAX_STREAM_NAME_BYTES: u64 = 16 << 20;

/// Bounds for extraction, so an archive cannot exhaust the disk or the memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most entries.
    pub max_entries: u64,
    /// Most bytes in all entries together (uncompressed).
    pub max_total_bytes: u64,
}

impl Default for Limits {
    /// 1 million entries, 1 TiB: far above any study, far below what breaks a server.
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_total_bytes: 1 << 40,
        }
    }
}

struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CentralEntry {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

/// Writes stored entries to any `Write`, without seeking.
pub struct ZipWriter<W: Write> {
    out: Counting<W>,
    entries: Vec<CentralEntry>,
    dos_time: u16,
    dos_date: u16,
}

impl<W: Write> ZipWriter<W> {
    /// Starts an archive; entries carry the modification time `unix_seconds` (UTC).
    pub fn new(out: W, unix_seconds: u64) -> ZipWriter<W> {
        let t = crate::clock::civil(unix_seconds);
        let year = t.year().clamp(1980, 2107) as u16 - 1980;
        let (mo, d) = (
            u16::from(t.month().unsigned_abs()),
            u16::from(t.day().unsigned_abs()),
        );
        let (h, mi, s) = (t.hour() as u16, t.minute() as u16, t.second() as u16);
        ZipWriter {
            out: Counting {
                inner: out,
                written: 0,
            },
            entries: Vec::new(),
            dos_time: (h << 11) | (mi << 5) | (s / 2),
            dos_date: (year << 9) | (mo << 5) | d,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.out.written
    }

    /// Adds an entry of `size` bytes whose CRC-32 is `crc`, copying from `data`.
    ///
    /// # Errors
    /// I/O errors, or [`ZipError::Changed`] when `data` does not hold exactly `size` bytes
    /// with that CRC (the file changed since it was hashed).
    pub fn add(
        &mut self,
        name: &str,
        size: u64,
        crc: u32,
        data: &mut dyn Read,
    ) -> Result<(), ZipError> {
        let offset = self.out.written;
        let zip64 = size >= MAX32;
        let mut header = Vec::with_capacity(64 + name.len());
        put32(&mut header, LOCAL);
        put16(&mut header, if zip64 { 45 } else { 20 });
        put16(&mut header, 0x0800); // names are UTF-8 (ours are ASCII anyway)
        put16(&mut header, 0); // stored
        put16(&mut header, self.dos_time);
        put16(&mut header, self.dos_date);
        put32(&mut header, crc);
        let small = if zip64 { MAX32 as u32 } else { size as u32 };
        put32(&mut header, small);
        put32(&mut header, small);
        put16(&mut header, name.len() as u16);
        put16(&mut header, if zip64 { 20 } else { 0 });
        header.extend_from_slice(name.as_bytes());
        if zip64 {
            put16(&mut header, 0x0001);
            put16(&mut header, 16);
            put64(&mut header, size);
            put64(&mut header, size);
        }
        self.out.write_all(&header)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buffer = vec![0u8; COPY_BUFFER];
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left.min(COPY_BUFFER as u64)).expect("bounded");
            let n = data.read(&mut buffer[..want])?;
            if n == 0 {
                return Err(ZipError::Changed(name.to_owned()));
            }
            hasher.update(&buffer[..n]);
            self.out.write_all(&buffer[..n])?;
            left -= n as u64;
        }
        if hasher.finalize() != crc {
            return Err(ZipError::Changed(name.to_owned()));
        }
        self.entries.push(CentralEntry {
            name: name.to_owned(),
            crc,
            size,
            offset,
        });
        Ok(())
    }

    /// Adds an entry from memory.
    ///
    /// # Errors
    /// I/O errors of the output.
    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), ZipError> {
        let crc = crc32fast::hash(bytes);
        self.add(name, bytes.len() as u64, crc, &mut &bytes[..])
    }

    /// Writes the central directory and gives back the output.
    ///
    /// # Errors
    /// I/O errors of the output.
    pub fn finish(mut self) -> Result<W, ZipError> {
        let start = self.out.written;
        let mut central = Vec::new();
        for entry in &self.entries {
            let mut extra = Vec::new();
            if entry.size >= MAX32 {
                put64(&mut extra, entry.size);
                put64(&mut extra, entry.size);
            }
            if entry.offset >= MAX32 {
                put64(&mut extra, entry.offset);
            }
            let zip64 = !extra.is_empty();
            let small = if entry.size >= MAX32 {
                MAX32 as u32
            } else {
                entry.size as u32
            };
            put32(&mut central, CENTRAL);
            put16(&mut central, 0x0300 | 45); // made by: Unix, spec 4.5
            put16(&mut central, if zip64 { 45 } else { 20 });
            put16(&mut central, 0x0800);
            put16(&mut central, 0);
            put16(&mut central, self.dos_time);
            put16(&mut central, self.dos_date);
            put32(&mut central, entry.crc);
            put32(&mut central, small);
            put32(&mut central, small);
            put16(&mut central, entry.name.len() as u16);
            put16(&mut central, if zip64 { extra.len() as u16 + 4 } else { 0 });
            put16(&mut central, 0); // comment
            put16(&mut central, 0); // disk
            put16(&mut central, 0); // internal attributes
            put32(&mut central, 0o100_644 << 16); // regular file, rw-r--r--
            put32(
                &mut central,
                if entry.offset >= MAX32 {
                    MAX32 as u32
                } else {
                    entry.offset as u32
                },
            );
            central.extend_from_slice(entry.name.as_bytes());
            if zip64 {
                put16(&mut central, 0x0001);
                put16(&mut central, extra.len() as u16);
                central.extend_from_slice(&extra);
            }
            if central.len() >= COPY_BUFFER {
                self.out.write_all(&central)?;
                central.clear();
            }
        }
        self.out.write_all(&central)?;
        let size = self.out.written - start;
        let count = self.entries.len() as u64;
        let mut end = Vec::new();
        if count >= 0xFFFF || size >= MAX32 || start >= MAX32 {
            let end64 = self.out.written;
            put32(&mut end, END64);
            put64(&mut end, 44);
            put16(&mut end, 0x0300 | 45);
            put16(&mut end, 45);
            put32(&mut end, 0);
            put32(&mut end, 0);
            put64(&mut end, count);
            put64(&mut end, count);
            put64(&mut end, size);
            put64(&mut end, start);
            put32(&mut end, LOCATOR64);
            put32(&mut end, 0);
            put64(&mut end, end64);
            put32(&mut end, 1);
        }
        put32(&mut end, END);
        put16(&mut end, 0);
        put16(&mut end, 0);
        put16(&mut end, count.min(0xFFFF) as u16);
        put16(&mut end, count.min(0xFFFF) as u16);
        put32(&mut end, size.min(MAX32) as u32);
        put32(&mut end, start.min(MAX32) as u32);
        put16(&mut end, 0);
        self.out.write_all(&end)?;
        self.out.flush()?;
        Ok(self.out.inner)
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Replaces each of `fields` that holds 0xFFFFFFFF with its 64-bit value from the ZIP64
/// extended-information field (0x0001) of `extra`, in order; `broken` is the error of an
/// extra field that ends early.
fn zip64_sizes<const N: usize>(
    extra: &[u8],
    fields: [&mut u64; N],
    broken: impl Fn() -> ZipError,
) -> Result<(), ZipError> {
    let mut x = 0;
    let mut fields = fields;
    while x + 4 <= extra.len() {
        let (id, len) = (get16(extra, x), usize::from(get16(extra, x + 2)));
        let body = extra.get(x + 4..x + 4 + len).ok_or_else(&broken)?;
        if id == 0x0001 {
            let mut b = 0;
            for field in &mut fields {
                if **field == MAX32 {
                    **field = body
                        .get(b..b + 8)
                        .map(|_| get64(body, b))
                        .ok_or_else(&broken)?;
                    b += 8;
                }
            }
        }
        x += 4 + len;
    }
    Ok(())
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One entry of the central directory, checked.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    offset: u64,
    directory: bool,
}

/// What an extraction produced.
#[derive(Debug, Clone, Default)]
pub struct Extracted {
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// What extracting `zip` would write (files and bytes, as its central directory
/// declares them), checked as [`extract`] checks it, without writing anything: lets a
/// caller compare it with the free disk space first.
///
/// # Errors
/// [`ZipError`] as [`extract`].
pub fn declared(zip: &Path, limits: Limits) -> Result<Extracted, ZipError> {
    let mut file = File::open(zip).map_err(io_at("open", zip))?;
    let entries = central_directory(&mut file, limits).map_err(zip_io_at("read", zip))?;
    let mut out = Extracted::default();
    for entry in entries.iter().filter(|e| !e.directory) {
        out.files += 1;
        out.bytes = out.bytes.saturating_add(entry.size);
    }
    Ok(out)
}

/// Creates a folder (and missing parents) readable by its owner only: an extracted set
/// holds patient data.
fn private_dir(path: &Path, recursive: bool) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(recursive)
        .mode(0o700)
        .create(path)
}

/// Extracts `zip` into `dest`, which must not exist yet; folders are created with mode
/// 0700 and files with 0600 (each exclusively: nothing existing is overwritten or
/// followed). On any error `dest` is removed again, so a refused archive leaves nothing
/// behind.
///
/// # Errors
/// [`ZipError`] naming the entry and what is wrong with it.
pub fn extract(zip: &Path, dest: &Path, limits: Limits) -> Result<Extracted, ZipError> {
    private_dir(dest, false).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create {} (must not exist): {e}", dest.display()),
        )
    })?;
    let result = extract_into(zip, dest, limits);
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

fn extract_into(zip: &Path, dest: &Path, limits: Limits) -> Result<Extracted, ZipError> {
    let mut file = File::open(zip).map_err(io_at("open", zip))?;
    let entries = central_directory(&mut file, limits).map_err(zip_io_at("read", zip))?;
    let mut done = Extracted::default();
    for entry in &entries {
        let target = dest.join(&entry.name);
        if entry.directory {
            private_dir(&target, true).map_err(io_at("create", &target))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            private_dir(parent, true).map_err(io_at("create", parent))?;
        }
        let out = private_file(&target).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", target.display()))
        })?;
        let mut out = io::BufWriter::with_capacity(COPY_BUFFER, out);
        done.bytes +=
            copy_entry(&mut file, entry, &mut out).map_err(zip_io_at("extract into", &target))?;
        out.flush().map_err(io_at("write", &target))?;
        done.files += 1;
    }
    Ok(done)
}

/// An I/O error that names what was being done and on which file (the system's message
/// alone does not say which of the archive, a folder or an extracted file failed).
fn io_at<'a>(action: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> ZipError + 'a {
    move |e| {
        ZipError::Io(io::Error::new(
            e.kind(),
            format!("cannot {action} {}: {e}", path.display()),
        ))
    }
}

/// As [`io_at`], for a step that may also fail for a reason of the archive's own
/// (those already name their entry and pass through).
fn zip_io_at<'a>(action: &'a str, path: &'a Path) -> impl FnOnce(ZipError) -> ZipError + 'a {
    move |e| match e {
        ZipError::Io(e) => io_at(action, path)(e),
        other => other,
    }
}

/// Creates a new file with mode 0600; an existing file or link at `path` is an error.
fn private_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Copies one entry's data into `out`, checking its local header, sizes and CRC.
fn copy_entry(file: &mut File, entry: &Entry, out: &mut dyn Write) -> Result<u64, ZipError> {
    let lying = |why: String| ZipError::Lying {
        name: entry.name.clone(),
        why,
    };
    file.seek(SeekFrom::Start(entry.offset))?;
    let mut local = [0u8; 30];
    file.read_exact(&mut local)
        .map_err(|_| lying("its local header is outside the archive".into()))?;
    if get32(&local, 0) != LOCAL {
        return Err(lying("its offset does not point at a local header".into()));
    }
    let flags = get16(&local, 6);
    let name_len = u64::from(get16(&local, 26));
    let extra_len = u64::from(get16(&local, 28));
    let mut name = vec![0u8; name_len as usize];
    file.read_exact(&mut name)?;
    if name != entry.name.as_bytes() {
        return Err(lying("the local header names another file".into()));
    }
    if flags & 0x0008 == 0 {
        let (crc, csize, usize_) = (
            get32(&local, 14),
            u64::from(get32(&local, 18)),
            u64::from(get32(&local, 22)),
        );
        let sizes_agree = (csize == MAX32 || csize == entry.compressed)
            && (usize_ == MAX32 || usize_ == entry.size);
        if crc != entry.crc || !sizes_agree {
            return Err(lying(
                "its local header and the central directory declare different sizes or CRC".into(),
            ));
        }
    }
    file.seek(SeekFrom::Current(extra_len as i64))?;
    let data = BufReader::with_capacity(COPY_BUFFER, (&*file).take(entry.compressed));
    let mut reader: Box<dyn Read> = match entry.method {
        0 => Box::new(data),
        _ => Box::new(flate2::read::DeflateDecoder::new(data)),
    };
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| lying(format!("its data cannot be read: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > entry.size {
            return Err(lying(format!(
                "it holds more than the {} bytes it declares",
                entry.size
            )));
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n])?;
    }
    if total != entry.size {
        return Err(lying(format!(
            "it declares {} bytes but holds {total}",
            entry.size
        )));
    }
    if hasher.finalize() != entry.crc {
        return Err(lying("its CRC-32 does not match its data".into()));
    }
    Ok(total)
}

/// Finds and checks the central directory: names, sizes, limits, overlaps.
fn central_directory(file: &mut File, limits: Limits) -> Result<Vec<Entry>, ZipError> {
    let len = file.metadata()?.len();
    let tail_len = len.min(22 + 0xFFFF);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    let end_at = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| get32(&tail, i) == END && i + 22 + get16(&tail, i + 20) as usize == tail.len())
        .ok_or_else(|| ZipError::NotZip("no end of central directory record".into()))?;
    let end = &tail[end_at..];
    let end_offset = len - tail_len + end_at as u64;
    if get16(end, 4) != 0 || get16(end, 6) != 0 {
        return Err(ZipError::NotZip(
            "multi-volume archives are not supported".into(),
        ));
    }
    let mut count = u64::from(get16(end, 10));
    let mut cd_size = u64::from(get32(end, 12));
    let mut cd_offset = u64::from(get32(end, 16));
    let mut cd_limit = end_offset;
    if count == 0xFFFF || cd_size == MAX32 || cd_offset == MAX32 {
        if end_at < 20 || get32(&tail, end_at - 20) != LOCATOR64 {
            return Err(ZipError::NotZip("ZIP64 end record locator missing".into()));
        }
        let end64 = get64(&tail, end_at - 12);
        if end64.checked_add(56).is_none_or(|end| end > end_offset) {
            return Err(ZipError::NotZip(
                "ZIP64 end record outside the archive".into(),
            ));
        }
        file.seek(SeekFrom::Start(end64))?;
        let mut record = [0u8; 56];
        file.read_exact(&mut record)?;
        if get32(&record, 0) != END64 {
            return Err(ZipError::NotZip("ZIP64 end record not found".into()));
        }
        count = get64(&record, 32);
        cd_size = get64(&record, 40);
        cd_offset = get64(&record, 48);
        cd_limit = end64;
    }
    if count > limits.max_entries {
        return Err(ZipError::TooLarge(format!(
            "{count} entries (at most {} allowed, far more than any study)",
            limits.max_entries
        )));
    }
    if cd_offset.checked_add(cd_size).is_none_or(|e| e > cd_limit) || cd_size > 512 << 20 {
        return Err(ZipError::NotZip(
            "the central directory lies outside the archive".into(),
        ));
    }
    file.seek(SeekFrom::Start(cd_offset))?;
    let mut cd = vec![0u8; cd_size as usize];
    file.read_exact(&mut cd)?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    let mut names = HashSet::new();
    let mut total = 0u64;
    for _ in 0..count {
        let entry = parse_central(&cd, &mut at)?;
        total = total.saturating_add(entry.size);
        if total > limits.max_total_bytes {
            return Err(ZipError::TooLarge(format!(
                "its entries hold more than {} bytes, the most allowed (when receiving: \
                 inbound.max_document_mb; raise it if the study is expected to be this large)",
                limits.max_total_bytes
            )));
        }
        if !names.insert(entry.name.to_ascii_lowercase()) {
            return Err(ZipError::UnsafeName {
                name: entry.name,
                why: "the name occurs twice",
            });
        }
        if entry.offset >= cd_offset
            || entry
                .offset
                .checked_add(30)
                .and_then(|e| e.checked_add(entry.compressed))
                .is_none_or(|e| e > cd_offset)
        {
            return Err(ZipError::Lying {
                name: entry.name,
                why: "its declared size runs past the data area of the archive".into(),
            });
        }
        entries.push(entry);
    }
    let mut spans: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|e| {
            // Checked above: offset + 30 + compressed stays within the archive.
            let end = e.offset.saturating_add(30).saturating_add(e.compressed);
            (e.offset, end, e.name.as_str())
        })
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(ZipError::Lying {
                name: pair[1].2.to_owned(),
                why: "its data overlaps another entry's".into(),
            });
        }
    }
    Ok(entries)
}

fn parse_central(cd: &[u8], at: &mut usize) -> Result<Entry, ZipError> {
    let broken = || ZipError::NotZip("the central directory is truncated or damaged".into());
    let fixed = cd.get(*at..*at + 46).ok_or_else(broken)?;
    if get32(fixed, 0) != CENTRAL {
        return Err(broken());
    }
    let made_by = get16(fixed, 4);
    let flags = get16(fixed, 8);
    let method = get16(fixed, 10);
    let crc = get32(fixed, 16);
    let mut compressed = u64::from(get32(fixed, 20));
    let mut size = u64::from(get32(fixed, 24));
    let name_len = usize::from(get16(fixed, 28));
    let extra_len = usize::from(get16(fixed, 30));
    let comment_len = usize::from(get16(fixed, 32));
    let external = get32(fixed, 38);
    let mut offset = u64::from(get32(fixed, 42));
    let name_bytes = cd.get(*at + 46..*at + 46 + name_len).ok_or_else(broken)?;
    let extra = cd
        .get(*at + 46 + name_len..*at + 46 + name_len + extra_len)
        .ok_or_else(broken)?;
    *at += 46 + name_len + extra_len + comment_len;
    if *at > cd.len() {
        return Err(broken());
    }
    let name = String::from_utf8(name_bytes.to_vec()).map_err(|_| ZipError::UnsafeName {
        name: String::from_utf8_lossy(name_bytes).into_owned(),
        why: "the name is not UTF-8 text",
    })?;
    zip64_sizes(extra, [&mut size, &mut compressed, &mut offset], broken)?;
    let unsafe_name = |why| ZipError::UnsafeName {
        name: name.clone(),
        why,
    };
    if flags & 0x0001 != 0 {
        return Err(unsafe_name("the entry is encrypted"));
    }
    if method != 0 && method != 8 {
        return Err(unsafe_name(
            "the entry uses a compression method other than stored or deflate",
        ));
    }
    if method == 0 && compressed != size {
        return Err(ZipError::Lying {
            name,
            why: "a stored entry declares different compressed and uncompressed sizes".into(),
        });
    }
    if made_by >> 8 == 3 && (external >> 16) & 0o170_000 == 0o120_000 {
        return Err(unsafe_name("the entry is a symbolic link"));
    }
    let directory = name.ends_with('/');
    check_name(name.trim_end_matches('/')).map_err(unsafe_name)?;
    Ok(Entry {
        name,
        method,
        crc,
        compressed,
        size,
        offset,
        directory,
    })
}

/// One entry of an archive read front to back, as its local header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The name, checked with [`check_name`] (a folder's ends with `/`).
    pub name: String,
    /// Bytes of data the entry declares.
    pub size: u64,
    /// Whether it is a folder (no data).
    pub directory: bool,
}

/// Reads the ZIP archive coming from `input` front to back, without seeking (a pipe, a
/// decrypting container still downloading), and hands every file entry to `each` with a
/// reader of exactly its data; folders are handed over with an empty reader.
///
/// Every check of [`extract`] that the local headers allow is made as the entries come:
/// names ([`check_name`], no name twice), encrypted entries, entry count and total size
/// within `limits`, stored entries only (compressed and uncompressed sizes equal). The
/// reader handed to `each` returns an error instead of its end when the data does not
/// have the declared CRC-32, so a callback that reads to the end has checked it; data the
/// callback leaves unread is read and checked after it. At the end the central
/// directory must list exactly the entries read, in order and with the same sizes, CRCs
/// and offsets, and nothing may follow the end record.
///
/// Entries whose sizes follow their data (general purpose flag 3) and compressed entries
/// cannot be read this way: [`ZipError::Unstreamable`].
///
/// # Errors
/// The callback's error, or a [`ZipError`] (converted into `E`) naming the entry.
pub fn read_stream<R: Read, E: From<ZipError>>(
    input: R,
    limits: Limits,
    mut each: impl FnMut(&StreamEntry, &mut dyn Read) -> Result<(), E>,
) -> Result<Extracted, E> {
    let mut input = Counting {
        inner: input,
        written: 0,
    };
    let mut names = HashSet::new();
    let mut local = Sha256::new();
    let mut done = Extracted::default();
    let mut entries = 0u64;
    let mut folders = 0u64;
    let mut name_bytes = 0u64;
    loop {
        let offset = input.written;
        let signature = read_u32(&mut input)?;
        if signature != LOCAL {
            if signature != CENTRAL && signature != END {
                return Err(ZipError::NotZip(format!(
                    "no ZIP record at byte {offset} (a damaged or foreign archive)"
                ))
                .into());
            }
            check_central_stream(&mut input, signature, entries, local.finalize().into())?;
            return Ok(done);
        }
        entries += 1;
        if entries > limits.max_entries {
            return Err(ZipError::TooLarge(format!(
                "more than {} entries (at most {} allowed, far more than any study)",
                limits.max_entries, limits.max_entries
            ))
            .into());
        }
        let header = read_local(&mut input)?;
        if header.entry.directory {
            folders += 1;
            if folders > MAX_STREAM_FOLDERS {
                return Err(ZipError::TooLarge(format!(
                    "more than {MAX_STREAM_FOLDERS} folder entries (at most \
                     {MAX_STREAM_FOLDERS} allowed, far more than any study has series); \
                     the sender's archive is not a PDI cloudpdi builds: ask the sender"
                ))
                .into());
            }
        }
        name_bytes = name_bytes.saturating_add(header.entry.name.len() as u64);
        if name_bytes > MAX_STREAM_NAME_BYTES {
            return Err(ZipError::TooLarge(format!(
                "its entry names take more than {MAX_STREAM_NAME_BYTES} bytes together (the \
                 most allowed, room for about 400,000 files); the sender's archive is not a \
                 PDI cloudpdi builds: ask the sender"
            ))
            .into());
        }
        if !names.insert(header.entry.name.to_ascii_lowercase()) {
            return Err(ZipError::UnsafeName {
                name: header.entry.name,
                why: "the name occurs twice",
            }
            .into());
        }
        let entry = &header.entry;
        done.bytes = done.bytes.saturating_add(entry.size);
        if done.bytes > limits.max_total_bytes {
            return Err(ZipError::TooLarge(format!(
                "its entries hold more than {} bytes, the most allowed (when receiving: \
                 inbound.max_document_mb; raise it if the study is expected to be this large)",
                limits.max_total_bytes
            ))
            .into());
        }
        local.update(central_key(&entry.name, header.crc, entry.size, offset));
        let mut data = EntryData {
            inner: (&mut input).take(entry.size),
            name: &entry.name,
            size: entry.size,
            left: entry.size,
            crc: header.crc,
            hasher: crc32fast::Hasher::new(),
        };
        each(entry, &mut data)?;
        io::copy(&mut data, &mut io::sink()).map_err(ZipError::from_io)?;
        if !entry.directory {
            done.files += 1;
        }
    }
}

/// A local header as [`read_stream`] checked it.
struct LocalHeader {
    entry: StreamEntry,
    crc: u32,
}

/// Reads the rest of a local header (after its signature) and checks it.
fn read_local(input: &mut impl Read) -> Result<LocalHeader, ZipError> {
    let mut fixed = [0u8; 26];
    read_all(input, &mut fixed)?;
    let flags = get16(&fixed, 2);
    let method = get16(&fixed, 4);
    let crc = get32(&fixed, 10);
    let mut compressed = u64::from(get32(&fixed, 14));
    let mut size = u64::from(get32(&fixed, 18));
    let mut name = vec![0u8; usize::from(get16(&fixed, 22))];
    let mut extra = vec![0u8; usize::from(get16(&fixed, 24))];
    read_all(input, &mut name)?;
    read_all(input, &mut extra)?;
    let name = String::from_utf8(name).map_err(|e| ZipError::UnsafeName {
        name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        why: "the name is not UTF-8 text",
    })?;
    let broken = || ZipError::NotZip(format!("the local header of {name:?} is damaged"));
    zip64_sizes(&extra, [&mut size, &mut compressed], broken)?;
    let unsafe_name = |why| ZipError::UnsafeName {
        name: name.clone(),
        why,
    };
    if flags & 0x0001 != 0 {
        return Err(unsafe_name("the entry is encrypted"));
    }
    let directory = name.ends_with('/');
    check_name(name.trim_end_matches('/')).map_err(unsafe_name)?;
    let unstreamable = |why| ZipError::Unstreamable {
        name: name.clone(),
        why,
    };
    if flags & 0x0008 != 0 {
        return Err(unstreamable(
            "its sizes and CRC follow its data (a data descriptor)",
        ));
    }
    if method != 0 {
        return Err(unstreamable("it is compressed (only stored entries are)"));
    }
    if compressed != size {
        return Err(ZipError::Lying {
            name,
            why: "a stored entry declares different compressed and uncompressed sizes".into(),
        });
    }
    if directory && size != 0 {
        return Err(ZipError::Lying {
            name,
            why: "a folder entry declares data".into(),
        });
    }
    Ok(LocalHeader {
        entry: StreamEntry {
            name,
            size,
            directory,
        },
        crc,
    })
}

/// What [`read_stream`] compares between the local headers and the central directory.
fn central_key(name: &str, crc: u32, size: u64, offset: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 24);
    put64(&mut key, name.len() as u64);
    key.extend_from_slice(name.as_bytes());
    put32(&mut key, crc);
    put64(&mut key, size);
    put64(&mut key, offset);
    key
}

/// Reads the central directory and end records after the entries (`signature` already
/// read) and checks that they list the `entries` read, whose keys hash to `local`.
fn check_central_stream(
    input: &mut Counting<impl Read>,
    mut signature: u32,
    entries: u64,
    local: [u8; 32],
) -> Result<(), ZipError> {
    let differs = || ZipError::Lying {
        name: "(central directory)".into(),
        why: "the central directory does not list the entries the archive holds".into(),
    };
    let mut central = Sha256::new();
    let mut count = 0u64;
    while signature == CENTRAL {
        count += 1;
        if count > entries {
            return Err(differs());
        }
        let mut fixed = [0u8; 42];
        read_all(input, &mut fixed)?;
        let crc = get32(&fixed, 12);
        let mut size = u64::from(get32(&fixed, 20));
        let mut compressed = u64::from(get32(&fixed, 16));
        let mut name = vec![0u8; usize::from(get16(&fixed, 24))];
        let mut extra = vec![0u8; usize::from(get16(&fixed, 26))];
        let mut comment = vec![0u8; usize::from(get16(&fixed, 28))];
        let mut offset = u64::from(get32(&fixed, 38));
        read_all(input, &mut name)?;
        read_all(input, &mut extra)?;
        read_all(input, &mut comment)?;
        zip64_sizes(&extra, [&mut size, &mut compressed, &mut offset], differs)?;
        let name = String::from_utf8(name).map_err(|_| differs())?;
        central.update(central_key(&name, crc, size, offset));
        signature = read_u32(input)?;
    }
    if count != entries || <[u8; 32]>::from(central.finalize()) != local {
        return Err(differs());
    }
    if signature == END64 {
        let mut record = [0u8; 52];
        read_all(input, &mut record)?;
        let mut skip = get64(&record, 0).saturating_sub(44);
        if skip > 1 << 16 {
            return Err(ZipError::NotZip("the ZIP64 end record is too long".into()));
        }
        while skip > 0 {
            let mut byte = [0u8; 1];
            read_all(input, &mut byte)?;
            skip -= 1;
        }
        if read_u32(input)? != LOCATOR64 {
            return Err(ZipError::NotZip("ZIP64 end record locator missing".into()));
        }
        let mut locator = [0u8; 16];
        read_all(input, &mut locator)?;
        signature = read_u32(input)?;
    }
    if signature != END {
        return Err(ZipError::NotZip(
            "no end of central directory record".into(),
        ));
    }
    let mut end = [0u8; 18];
    read_all(input, &mut end)?;
    let mut comment = vec![0u8; usize::from(get16(&end, 16))];
    read_all(input, &mut comment)?;
    let mut more = [0u8; 1];
    if input.read(&mut more)? != 0 {
        return Err(ZipError::NotZip(
            "bytes follow the end of the archive".into(),
        ));
    }
    Ok(())
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.written += n as u64;
        Ok(n)
    }
}

/// Fills `buf` or says that the archive ended too early.
fn read_all(input: &mut impl Read, buf: &mut [u8]) -> Result<(), ZipError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            ZipError::NotZip("the archive ends in the middle of a record".into())
        }
        _ => ZipError::from_io(e),
    })
}

fn read_u32(input: &mut impl Read) -> Result<u32, ZipError> {
    let mut b = [0u8; 4];
    read_all(input, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl ZipError {
    /// The [`ZipError`] an I/O error carries (the reader of an entry's data that
    /// [`read_stream`] hands over reports a size or CRC that does not match so), or the
    /// I/O error itself.
    pub fn from_io(e: io::Error) -> ZipError {
        if !e.get_ref().is_some_and(|inner| inner.is::<ZipError>()) {
            return ZipError::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<ZipError>()) {
            Some(Ok(zip)) => *zip,
            _ => ZipError::Io(kind.into()),
        }
    }
}

/// The data of one entry read front to back: exactly its declared size, and an error
/// instead of the end when it is short or its CRC-32 differs.
struct EntryData<'a, R> {
    inner: io::Take<R>,
    name: &'a str,
    size: u64,
    left: u64,
    crc: u32,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let lying = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                ZipError::Lying {
                    name: self.name.to_owned(),
                    why,
                },
            )
        };
        if self.left == 0 {
            if self.hasher.clone().finalize() != self.crc {
                return Err(lying("its CRC-32 does not match its data".into()));
            }
            return Ok(0);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(lying(format!(
                "it declares {} bytes but the archive ends after {}",
                self.size,
                self.size - self.left
            )));
        }
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Checks that an archive or manifest name is a relative path that stays inside its
/// folder: no absolute path, no `..`, no backslash, no drive letter, no control characters.
///
/// # Errors
/// Why the name is refused.
pub fn check_name(name: &str) -> Result<PathBuf, &'static str> {
    if name.is_empty() || name.len() > 1024 {
        return Err("the name is empty or too long");
    }
    if name.contains('\\') || name.contains(':') || name.chars().any(char::is_control) {
        return Err("the name holds a backslash, a colon or a control character");
    }
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => return Err("the name climbs out of the folder with ..")?,
            Component::RootDir | Component::Prefix(_) => return Err("the name is absolute"),
            Component::CurDir => return Err("the name holds a . component"),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("the name is empty");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file error says which file: the archive, a folder or an extracted file.
    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.zip");
        let declared = declared(&missing, Limits::default()).expect_err("no archive");
        assert!(
            declared.to_string().contains("cannot open")
                && declared.to_string().contains("missing.zip"),
            "{declared}"
        );
        let extracted =
            extract(&missing, &dir.path().join("out"), Limits::default()).expect_err("no archive");
        assert!(extracted.to_string().contains("missing.zip"), "{extracted}");
        assert!(!dir.path().join("out").exists(), "nothing left behind");
    }

    /// An archive of `entries` (name, data) as the builder writes them.
    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = ZipWriter::new(Vec::new(), 0);
        for (name, data) in entries {
            zip.add_bytes(name, data).expect("add");
        }
        zip.finish().expect("finish")
    }

    /// Every entry `read_stream` hands over, with its data, or its error.
    fn streamed(bytes: &[u8], limits: Limits) -> Result<Vec<(String, Vec<u8>)>, ZipError> {
        let mut seen = Vec::new();
        read_stream(bytes, limits, |entry: &StreamEntry, data: &mut dyn Read| {
            let mut held = Vec::new();
            data.read_to_end(&mut held).map_err(ZipError::from_io)?;
            seen.push((entry.name.clone(), held));
            Ok::<(), ZipError>(())
        })?;
        Ok(seen)
    }

    #[test]
    fn a_stream_gives_every_entry_in_order_with_its_data() {
        let entries: &[(&str, &[u8])] = &[
            ("CLOUDPDI/MANIFEST.JSON", b"{}"),
            ("DICOMDIR", b"dir"),
            ("DICOM/I1", &[7u8; 100_000]),
            ("EMPTY", b""),
        ];
        let bytes = archive(entries);
        let seen = streamed(&bytes, Limits::default()).expect("read");
        let expected: Vec<(String, Vec<u8>)> = entries
            .iter()
            .map(|(n, d)| ((*n).to_owned(), d.to_vec()))
            .collect();
        assert_eq!(seen, expected);
        // A callback that reads nothing: the data is still read past and checked.
        let count = read_stream(
            &bytes[..],
            Limits::default(),
            |_: &StreamEntry, _: &mut dyn Read| Ok::<(), ZipError>(()),
        )
        .expect("read");
        assert_eq!((count.files, count.bytes), (4, 100_005));
    }

    /// Byte offset of the local header of the entry named `name`.
    fn local_at(bytes: &[u8], name: &str) -> usize {
        (0..bytes.len() - 30)
            .find(|&i| {
                get32(bytes, i) == LOCAL
                    && bytes.get(i + 30..i + 30 + name.len()) == Some(name.as_bytes())
            })
            .expect("local header")
    }

    #[test]
    fn hostile_streams_are_refused_with_the_reason() {
        let good = archive(&[("A", b"0123456789"), ("B", b"abc")]);
        let refused = |bytes: &[u8], limits: Limits| -> String {
            streamed(bytes, limits).expect_err("refused").to_string()
        };
        // Zip slip, absolute and backslash names.
        for bad in ["../evil", "/etc/passwd", "a\\..\\b", "C:x"] {
            let text = refused(&archive(&[(bad, b"x")]), Limits::default());
            assert!(text.contains("unsafe entry name"), "{bad}: {text}");
        }
        // A name twice (also differing in case only).
        let text = refused(&archive(&[("a", b"1"), ("A", b"2")]), Limits::default());
        assert!(text.contains("occurs twice"), "{text}");
        // A size that lies: shorter than the data (the CRC then differs).
        let mut short = good.clone();
        let at = local_at(&short, "A");
        short[at + 18..at + 26].copy_from_slice(&[5, 0, 0, 0, 5, 0, 0, 0]);
        assert!(refused(&short, Limits::default()).contains("CRC-32"));
        // Larger than the rest of the archive.
        let mut long = good.clone();
        long[at + 18..at + 26].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        let text = refused(&long, Limits::default());
        assert!(text.contains("archive ends after"), "{text}");
        // Compressed and uncompressed sizes that differ for a stored entry.
        let mut differ = good.clone();
        differ[at + 18] = 9;
        assert!(refused(&differ, Limits::default()).contains("different compressed"));
        // A CRC that does not match.
        let mut crc = good.clone();
        crc[at + 14] ^= 1;
        assert!(refused(&crc, Limits::default()).contains("CRC-32"));
        // A data descriptor: sizes after the data.
        let mut descriptor = good.clone();
        descriptor[at + 6] |= 0x08;
        let text = refused(&descriptor, Limits::default());
        assert!(text.contains("cannot be read as it arrives"), "{text}");
        // Deflated.
        let mut deflated = good.clone();
        deflated[at + 8] = 8;
        assert!(refused(&deflated, Limits::default()).contains("compressed"));
        // Encrypted.
        let mut encrypted = good.clone();
        encrypted[at + 6] |= 0x01;
        assert!(refused(&encrypted, Limits::default()).contains("encrypted"));
        // Too many entries, too many bytes.
        let few = Limits {
            max_entries: 1,
            ..Limits::default()
        };
        assert!(refused(&good, few).contains("at most 1 allowed"));
        let small = Limits {
            max_total_bytes: 12,
            ..Limits::default()
        };
        assert!(refused(&good, small).contains("more than 12 bytes"));
        // A central directory that lists something else.
        let mut central = good.clone();
        let cd = (0..central.len() - 4)
            .rev()
            .find(|&i| get32(&central, i) == CENTRAL)
            .expect("central entry");
        central[cd + 46] = b'C';
        assert!(refused(&central, Limits::default()).contains("central directory"));
        // Truncated, and with bytes after the end.
        let text = refused(&good[..good.len() - 5], Limits::default());
        assert!(text.contains("ends in the middle"), "{text}");
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(refused(&trailing, Limits::default()).contains("follow the end"));
        // Not a ZIP at all.
        assert!(refused(b"GIF89a and more", Limits::default()).contains("no ZIP record"));
        // And the good one passes.
        assert_eq!(streamed(&good, Limits::default()).expect("good").len(), 2);
    }

    /// Folder entries and name bytes, which no manifest bounds, are bounded in the
    /// stream itself (the names are remembered to refuse one twice).
    #[test]
    fn many_folders_or_long_names_are_refused_in_a_stream() {
        let count = usize::try_from(MAX_STREAM_FOLDERS).expect("fits") + 1;
        let folders: Vec<String> = (0..count).map(|i| format!("D{i}/")).collect();
        let entries: Vec<(&str, &[u8])> = folders.iter().map(|n| (n.as_str(), &b""[..])).collect();
        let text = streamed(&archive(&entries), Limits::default())
            .expect_err("refused")
            .to_string();
        assert!(text.contains("more than 65536 folder entries"), "{text}");
        assert!(
            streamed(&archive(&entries[..count - 1]), Limits::default()).is_ok(),
            "the most folders allowed pass"
        );
        let long: Vec<String> = (0..(MAX_STREAM_NAME_BYTES / 1000) + 1)
            .map(|i| format!("{i:0>1000}"))
            .collect();
        let entries: Vec<(&str, &[u8])> = long.iter().map(|n| (n.as_str(), &b""[..])).collect();
        let text = streamed(&archive(&entries), Limits::default())
            .expect_err("refused")
            .to_string();
        assert!(
            text.contains("entry names take more than 16777216 bytes"),
            "{text}"
        );
    }

    #[test]
    fn names_that_escape_are_refused() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "C:\\x",
            "a\\..\\b",
            "./a",
            "",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name("DICOM/PA000001/ST000001").is_ok());
    }
}
