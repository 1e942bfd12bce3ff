//! Container throughput, single core: seal and open 1 GiB in memory-bounded streams
//! (1 MiB chunks), and zstd on a generated CT study when one is given.
//! Run through bench/crypto/run.sh, which also runs `openssl speed` for the ratio.

use std::io::{Read, Write};
use std::time::Instant;

use cloudpdi::container::{Compression, ContainerKey, Options, decrypt, encrypt};

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

fn main() {
    let key = ContainerKey::from_bytes([5; 32]);
    let options = Options::default();

    let started = Instant::now();
    let sealed_len = encrypt(&key, &options, Pattern::new(LEN), Sink(0))
        .expect("encrypt")
        .0;
    let seal_s = started.elapsed().as_secs_f64();
    // The opening run reads a sealed gigabyte from memory (sealed again, untimed).
    let sealed = encrypt(
        &key,
        &options,
        Pattern::new(LEN),
        Vec::with_capacity(sealed_len as usize),
    )
    .expect("encrypt");
    let started = Instant::now();
    let out = decrypt(&key, sealed.as_slice(), Sink(0)).expect("decrypt");
    let open_s = started.elapsed().as_secs_f64();
    assert_eq!(out.0, LEN);
    let mb = LEN as f64 / 1e6;
    println!("cloudpdi seal 1 core: {:.0} MB/s", mb / seal_s);
    println!("cloudpdi open 1 core: {:.0} MB/s", mb / open_s);

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
        let started = Instant::now();
        let sealed = encrypt(&key, &zstd, plain.as_slice(), Vec::new()).expect("encrypt zstd");
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "zstd+seal on the CT study: {:.1} MB -> {:.1} MB (ratio {:.2}), {:.0} MB/s",
            plain.len() as f64 / 1e6,
            sealed.len() as f64 / 1e6,
            plain.len() as f64 / sealed.len() as f64,
            plain.len() as f64 / 1e6 / seconds
        );
    }
}
