//! Container throughput on one core and on all cores: seal and open 1 GiB in
//! memory-bounded streams (1 MiB chunks), the bare AES-256-GCM loop of the `aes-gcm` crate
//! as a ceiling, and zstd + seal on a generated CT study when one is given.
//! Run through bench/crypto/run.sh, which also runs `openssl speed` for the ratios.
//!
//! One-core figures divide by the thread's CPU time (as `openssl speed` divides by user
//! CPU time), so other processes on a busy machine distort them less; all-core figures
//! divide by wall-clock time (as `openssl speed -elapsed -multi N`).

use std::io::{Read, Write};
use std::time::Instant;

use aes_gcm::aead::{AeadInOut, KeyInit};
use cloudpdi::container::{
    Compression, ContainerKey, Options, decrypt, decrypt_parallel, encrypt, encrypt_parallel,
};

const LEN: u64 = 1 << 30;

/// `remaining` bytes of a repeating non-zero pattern, copied from one small block.
struct Pattern {
    block: Vec<u8>,
    remaining: u64,
}

impl Pattern {
    fn new(len: u64) -> Pattern {
        Pattern {
            block: (0..1 << 16).map(|i| (i % 251) as u8).collect(),
            remaining: len,
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.block.len()).min(self.remaining as usize);
        buf[..n].copy_from_slice(&self.block[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A clock for `threads`: this thread's CPU time for one, wall-clock time for more.
struct Clock {
    cpu: bool,
    wall: Instant,
    cpu_start: f64,
}

impl Clock {
    fn start(threads: usize) -> Clock {
        Clock {
            cpu: threads == 1,
            wall: Instant::now(),
            cpu_start: thread_cpu_seconds(),
        }
    }

    fn seconds(&self) -> f64 {
        if self.cpu {
            thread_cpu_seconds() - self.cpu_start
        } else {
            self.wall.elapsed().as_secs_f64()
        }
    }
}

/// CPU time of the calling thread (first field of /proc/thread-self/schedstat, ns).
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("Linux schedstat");
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("schedstat starts with the CPU time in ns");
    ns / 1e9
}

/// Seconds to seal `plain` on `threads` threads (1: the sequential `encrypt`). The input
/// is read from memory as from a file in the page cache: one copy into the chunk buffer.
fn seal_seconds(key: &ContainerKey, plain: &[u8], threads: usize) -> f64 {
    let clock = Clock::start(threads);
    let sink = if threads == 1 {
        encrypt(key, &Options::default(), plain, Sink(0))
    } else {
        encrypt_parallel(key, &Options::default(), plain, Sink(0), threads)
    };
    assert!(sink.expect("encrypt").0 > LEN);
    clock.seconds()
}

/// Seconds to open `sealed` on `threads` threads (1: the sequential `decrypt`).
fn open_seconds(key: &ContainerKey, sealed: &[u8], threads: usize) -> f64 {
    let clock = Clock::start(threads);
    let sink = if threads == 1 {
        decrypt(key, sealed, Sink(0))
    } else {
        decrypt_parallel(key, sealed, Sink(0), threads)
    };
    assert_eq!(sink.expect("decrypt").0, LEN);
    clock.seconds()
}

/// The crate's own ceiling: AES-256-GCM in place over one 1 MiB buffer, no I/O.
fn bare_aes_gcm_seconds() -> f64 {
    let cipher = aes_gcm::Aes256Gcm::new(&[5u8; 32].into());
    let mut buf = vec![7u8; 1 << 20];
    let clock = Clock::start(1);
    for i in 0..LEN >> 20 {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&i.to_be_bytes());
        cipher
            .encrypt_inout_detached(&nonce.into(), b"", buf.as_mut_slice().into())
            .expect("1 MiB is a valid GCM length");
    }
    std::hint::black_box(&buf);
    clock.seconds()
}

fn main() {
    let key = ContainerKey::from_bytes([5; 32]);
    let cores = cloudpdi::container::parallel::threads(0);
    let mb = LEN as f64 / 1e6;
    println!(
        "aes-gcm bare loop 1 core: {:.0} MB/s",
        mb / bare_aes_gcm_seconds()
    );
    let mut plain = Vec::with_capacity(LEN as usize);
    Pattern::new(LEN)
        .read_to_end(&mut plain)
        .expect("pattern in memory");
    let sealed = encrypt(&key, &Options::default(), plain.as_slice(), Vec::new()).expect("encrypt");
    for threads in [1, cores] {
        let seal = mb / seal_seconds(&key, &plain, threads);
        let open = mb / open_seconds(&key, &sealed, threads);
        println!("cloudpdi seal {threads} cores: {seal:.0} MB/s");
        println!("cloudpdi open {threads} cores: {open:.0} MB/s");
    }
    drop((plain, sealed));

    if let Some(study) = std::env::args().nth(1) {
        let mut plain = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(&study)
            .expect("study folder")
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            std::fs::File::open(entry.path())
                .and_then(|mut f| f.read_to_end(&mut plain))
                .expect("read study file");
        }
        let zstd = Options {
            compression: Compression::Zstd,
            ..Options::default()
        };
        for threads in [1, cores] {
            let clock = Clock::start(threads);
            let sealed = encrypt_parallel(&key, &zstd, plain.as_slice(), Vec::new(), threads)
                .expect("encrypt zstd");
            let seal_s = clock.seconds();
            let clock = Clock::start(threads);
            let opened =
                decrypt_parallel(&key, sealed.as_slice(), Sink(0), threads).expect("decrypt zstd");
            let open_s = clock.seconds();
            assert_eq!(opened.0, plain.len() as u64);
            let mb = plain.len() as f64 / 1e6;
            println!(
                "zstd CT study {:.1} MB -> {:.1} MB: ratio {:.2} x",
                mb,
                sealed.len() as f64 / 1e6,
                plain.len() as f64 / sealed.len() as f64
            );
            println!("zstd+seal CT {threads} cores: {:.0} MB/s", mb / seal_s);
            println!("open+unzstd CT {threads} cores: {:.0} MB/s", mb / open_s);
        }
    }
}
