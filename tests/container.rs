//! The encrypted container: round trips at every size edge, rejection of every
//! truncation, extension, reordering and a large sample of bit flips, the committed test
//! vectors, and a multi-GiB stream in constant memory.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};

use cloudpdi::container::{
    Compression, ContainerError, ContainerKey, Decryptor, Encryptor, Options, ParallelDecryptor,
    ParallelEncryptor, decrypt, decrypt_file, decrypt_parallel, encrypt, encrypt_parallel,
};
use sha2::{Digest, Sha256};

const LOG2: u8 = 16;
const CHUNK: usize = 1 << LOG2;

fn key(byte: u8) -> ContainerKey {
    ContainerKey::from_bytes([byte; 32])
}

fn options(compression: Compression) -> Options {
    Options {
        compression,
        zstd_level: 3,
        chunk_log2: LOG2,
    }
}

/// Deterministic, incompressible-ish plaintext.
fn plaintext(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut counter = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(counter.to_le_bytes()));
        counter += 1;
    }
    out.truncate(len);
    out
}

fn seal(data: &[u8], compression: Compression) -> Vec<u8> {
    encrypt(&key(1), &options(compression), data, Vec::new()).unwrap()
}

/// Opens with the sequential reader and with the 3-thread one, which must agree exactly
/// (same plaintext, same error), so every rejection test below covers both.
fn open(container: &[u8]) -> Result<Vec<u8>, ContainerError> {
    let sequential = decrypt(&key(1), container, Vec::new());
    let parallel = decrypt_parallel(&key(1), container, Vec::new(), 3);
    assert_eq!(
        sequential, parallel,
        "sequential and parallel opening differ"
    );
    sequential
}

#[test]
fn round_trips_at_every_size_edge_with_and_without_zstd() {
    for compression in [Compression::None, Compression::Zstd] {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
            let data = plaintext(len);
            let container = seal(&data, compression);
            assert_eq!(
                open(&container).unwrap(),
                data,
                "{len} bytes, {compression:?}"
            );
        }
    }
}

#[test]
fn parallel_round_trips_at_every_size_edge_and_matches_the_sequential_bytes() {
    for compression in [Compression::None, Compression::Zstd] {
        for len in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 5,
            20 * CHUNK + 9,
        ] {
            let data = plaintext(len);
            for threads in [1, 2, 5] {
                let container = encrypt_parallel(
                    &key(1),
                    &options(compression),
                    data.as_slice(),
                    Vec::new(),
                    threads,
                )
                .unwrap();
                assert_eq!(
                    open(&container).unwrap(),
                    data,
                    "{len} bytes, {threads} threads"
                );
                let sequential = seal(&data, compression);
                if compression == Compression::None || threads == 1 {
                    assert_eq!(container.len(), sequential.len());
                }
                assert_eq!(
                    decrypt_parallel(&key(1), sequential.as_slice(), Vec::new(), threads).unwrap(),
                    data
                );
            }
        }
    }
}

#[test]
fn chunk_layout_is_header_plus_sealed_chunks() {
    for (len, chunks) in [(0, 1), (1, 1), (CHUNK, 1), (CHUNK + 1, 2), (3 * CHUNK, 3)] {
        let container = seal(&plaintext(len), Compression::None);
        assert_eq!(container.len(), 48 + len + 16 * chunks, "{len} bytes");
    }
}

#[test]
fn every_truncation_is_rejected() {
    let container = seal(&plaintext(3 * CHUNK + 100), Compression::None);
    // Every cut inside the header and the first bytes, around every chunk boundary and
    // tag, and a sample of cuts everywhere else.
    let boundaries = (0..4).map(|i| 48 + i * (CHUNK + 16));
    let around = boundaries.clone().flat_map(|b| {
        [-17isize, -16, -15, -1, 0, 1, 15, 16, 17].map(|d| b.saturating_add_signed(d))
    });
    let inside = (0..container.len()).step_by(997);
    let cuts = (0..=80).chain(boundaries).chain(around).chain(inside);
    for cut in cuts.filter(|&c| c < container.len()) {
        let result = open(&container[..cut]);
        assert!(result.is_err(), "cut at {cut} accepted");
    }
    // At a chunk boundary the error says what happened.
    let cut = 48 + 2 * (CHUNK + 16);
    assert_eq!(
        open(&container[..cut]),
        Err(ContainerError::Truncated { chunks: 2 })
    );
    assert_eq!(open(&container[..40]), Err(ContainerError::NotAContainer));
}

#[test]
fn extension_reordering_and_a_wrong_key_are_rejected() {
    let container = seal(&plaintext(3 * CHUNK), Compression::None);
    let mut extended = container.clone();
    extended.push(0);
    assert!(open(&extended).is_err());
    let mut doubled = container.clone();
    doubled.extend_from_slice(&container[48..]);
    assert!(open(&doubled).is_err());

    let mut swapped = container.clone();
    let (a, b) = (48..48 + CHUNK + 16, 48 + CHUNK + 16..48 + 2 * (CHUNK + 16));
    let first = container[a.clone()].to_vec();
    swapped[a].copy_from_slice(&container[b.clone()]);
    swapped[b].copy_from_slice(&first);
    assert_eq!(open(&swapped), Err(ContainerError::Damaged { chunk: 0 }));

    let mut swapped = container.clone();
    let (b, c) = (
        48 + CHUNK + 16..48 + 2 * (CHUNK + 16),
        48 + 2 * (CHUNK + 16)..container.len(),
    );
    let middle = container[b.clone()].to_vec();
    swapped[b].copy_from_slice(&container[c.clone()]);
    swapped[c].copy_from_slice(&middle);
    assert_eq!(open(&swapped), Err(ContainerError::Damaged { chunk: 1 }));

    let mut last_again = container.clone();
    last_again.extend_from_slice(&container[48 + 2 * (CHUNK + 16)..]);
    assert!(open(&last_again).is_err());
    let mut zeros = container.clone();
    zeros.extend_from_slice(&[0; 16]);
    assert!(open(&zeros).is_err());

    let wrong = decrypt(&key(2), container.as_slice(), Vec::new());
    assert_eq!(wrong, Err(ContainerError::Damaged { chunk: 0 }));
    assert!(
        wrong
            .unwrap_err()
            .to_string()
            .contains("damaged or the token is wrong (chunk 0")
    );
}

#[test]
fn any_flipped_bit_is_rejected() {
    let container = seal(&plaintext(2 * CHUNK + 7), Compression::Zstd);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..1500 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bit = (state % (container.len() as u64 * 8)) as usize;
        let mut damaged = container.clone();
        damaged[bit / 8] ^= 1 << (bit % 8);
        assert!(open(&damaged).is_err(), "flip of bit {bit} accepted");
    }
    for byte in 0..48 {
        let mut damaged = container.clone();
        damaged[byte] ^= 0x01;
        assert!(open(&damaged).is_err(), "header byte {byte} changed");
    }
}

#[test]
fn the_reader_yields_nothing_from_a_chunk_that_fails() {
    let mut container = seal(&plaintext(2 * CHUNK), Compression::None);
    let last = container.len() - 1;
    container[last] ^= 0xFF;
    let mut reader = Decryptor::new(&key(1), container.as_slice()).unwrap();
    let mut out = Vec::new();
    let err = reader.read_to_end(&mut out).unwrap_err();
    assert_eq!(out.len(), CHUNK, "only the authenticated first chunk");
    assert!(err.to_string().contains("chunk 1"), "{err}");
}

#[test]
fn the_parallel_reader_yields_only_chunks_before_the_first_failure() {
    let mut container = seal(&plaintext(6 * CHUNK), Compression::None);
    let third = 48 + 2 * (CHUNK + 16) + 5;
    let fifth = 48 + 4 * (CHUNK + 16) + 5;
    container[third] ^= 0x01;
    container[fifth] ^= 0x01;
    let mut reader = ParallelDecryptor::new(&key(1), 4, container.as_slice()).unwrap();
    let mut out = Vec::new();
    let err = reader.read_to_end(&mut out).unwrap_err();
    assert_eq!(
        out,
        plaintext(2 * CHUNK),
        "only the chunks before the damage"
    );
    assert!(err.to_string().contains("chunk 2 failed"), "{err}");
    let again = reader.read(&mut [0u8; 16]).unwrap_err();
    assert!(again.to_string().contains("chunk 2 failed"), "{again}");
}

#[test]
fn decrypt_file_commits_nothing_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let data = plaintext(CHUNK * 2 + 3);
    let mut container = seal(&data, Compression::None);
    let (input, output) = (dir.path().join("in.cpdi"), dir.path().join("out.zip"));
    std::fs::write(&input, &container).unwrap();
    decrypt_file(&key(1), &input, &output).unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), data);

    std::fs::remove_file(&output).unwrap();
    container.truncate(container.len() - 1);
    std::fs::write(&input, &container).unwrap();
    assert!(decrypt_file(&key(1), &input, &output).is_err());
    assert!(!output.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp left"
    );
}

#[derive(Debug, Clone, Copy)]
enum Sealer {
    Sequential,
    /// `read`: the copy-free `read_from` path (only without compression) instead of `Write`.
    Parallel {
        threads: usize,
        read: bool,
    },
}

/// Seals `data` under key 7 and salt 9 with one of the sealers.
fn seal_with_salt(data: &[u8], compression: Compression, sealer: Sealer) -> Vec<u8> {
    let options = options(compression);
    let compress = |writer: &mut dyn Write| match compression {
        Compression::None => writer.write_all(data).unwrap(),
        Compression::Zstd => {
            let mut z = zstd::stream::write::Encoder::new(writer, 3).unwrap();
            z.write_all(data).unwrap();
            z.finish().unwrap();
        }
    };
    match sealer {
        Sealer::Sequential => {
            let mut w = Encryptor::with_salt(&key(7), &options, [9; 32], Vec::new()).unwrap();
            compress(&mut w);
            w.finish().unwrap()
        }
        Sealer::Parallel { threads, read } => {
            let mut w =
                ParallelEncryptor::with_salt(&key(7), &options, [9; 32], threads, Vec::new())
                    .unwrap();
            if read && compression == Compression::None {
                w.read_from(&mut &data[..]).unwrap();
            } else {
                compress(&mut w);
            }
            w.finish().unwrap()
        }
    }
}

#[test]
fn parallel_sealing_is_byte_identical_over_many_chunks() {
    for compression in [Compression::None, Compression::Zstd] {
        let data = plaintext(20 * CHUNK + 9);
        let sequential = seal_with_salt(&data, compression, Sealer::Sequential);
        for threads in [2, 3, 8] {
            for read in [false, true] {
                let sealer = Sealer::Parallel { threads, read };
                let parallel = seal_with_salt(&data, compression, sealer);
                assert!(parallel == sequential, "{sealer:?} {compression:?}");
            }
        }
    }
}

/// tests/vectors/container/*.hex: fixed key, salt and plaintext -> exact bytes. A change
/// of the format must change the version, not silently these bytes.
#[test]
fn committed_vectors_match_exactly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/container");
    let cases = [
        ("empty", 0usize, Compression::None),
        ("one_chunk_plus_one", CHUNK + 1, Compression::None),
        ("zstd_two_chunks", 2 * CHUNK, Compression::Zstd),
    ];
    for (name, len, compression) in cases {
        let expected = std::fs::read_to_string(dir.join(format!("{name}.hex"))).unwrap_or_default();
        let data = plaintext(len);
        let sealed = seal_with_salt(&data, compression, Sealer::Sequential);
        for sealer in [
            Sealer::Parallel {
                threads: 1,
                read: false,
            },
            Sealer::Parallel {
                threads: 3,
                read: false,
            },
            Sealer::Parallel {
                threads: 1,
                read: true,
            },
            Sealer::Parallel {
                threads: 4,
                read: true,
            },
        ] {
            let other = seal_with_salt(&data, compression, sealer);
            assert!(other == sealed, "vector {name}: {sealer:?} differs");
        }
        let digest = hex::encode(Sha256::digest(&sealed));
        let head = hex::encode(&sealed[..sealed.len().min(96)]);
        let text = format!("len {}\nsha256 {digest}\nhead {head}\n", sealed.len());
        if std::env::var_os("WRITE_TEST_VECTORS").is_some() {
            // Only when the format version changes (docs/container.md).
            std::fs::write(dir.join(format!("{name}.hex")), &text).unwrap();
            if name == "one_chunk_plus_one" {
                std::fs::write(dir.join("fail_truncated.bin"), &sealed[..sealed.len() - 16])
                    .unwrap();
            }
            continue;
        }
        assert_eq!(text, expected, "vector {name}");
        assert_eq!(
            decrypt(&key(7), sealed.as_slice(), Vec::new()).unwrap(),
            data
        );
    }
    let fail = std::fs::read(dir.join("fail_truncated.bin")).unwrap();
    assert!(decrypt(&key(7), fail.as_slice(), Vec::new()).is_err());
}

/// A reader of `len` zero bytes that allocates nothing.
struct Zeros(u64);

impl Read for Zeros {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.0) as usize;
        buf[..n].fill(0);
        self.0 -= n as u64;
        Ok(n)
    }
}

/// A writer that counts bytes and checks that every one is zero.
struct ZeroCheck(u64);

impl Write for ZeroCheck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        assert!(
            buf.iter().all(|&b| b == 0),
            "non-zero plaintext after {}",
            self.0
        );
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Peak resident memory of this test process (VmHWM), in bytes.
fn peak_memory() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// 2.5 GiB (+3 bytes) of zeros sealed on two threads, piped through the kernel and opened
/// on two threads: every byte comes back, and the process never holds more than a few
/// chunks (peak memory stays far below the stream's size).
#[test]
fn a_multi_gib_stream_round_trips_in_parallel_in_constant_memory() {
    const LEN: u64 = (5 << 29) + 3;
    let (reader, writer) = std::io::pipe().unwrap();
    let sealer = std::thread::spawn(move || {
        encrypt_parallel(&key(3), &Options::default(), Zeros(LEN), writer, 2).map(|_| ())
    });
    let out = decrypt_parallel(&key(3), reader, ZeroCheck(0), 2).unwrap();
    sealer.join().unwrap().unwrap();
    assert_eq!(out.0, LEN);
    let peak = peak_memory();
    assert!(peak < 256 << 20, "peak memory {} MiB", peak >> 20);
}

/// Files in, files out on all cores (what the pipelines run off the runtime): both
/// compressions round trip; a damaged chunk is named by the parallel decryptor and by
/// `decrypt_file`, which commits nothing.
#[test]
fn files_round_trip_on_all_cores_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, sealed, opened) = (
        dir.path().join("plain.zip"),
        dir.path().join("sealed.cpdi"),
        dir.path().join("opened.zip"),
    );
    let data = plaintext(7 * CHUNK + 11);
    std::fs::write(&plain, &data).unwrap();
    for compression in [Compression::None, Compression::Zstd] {
        let input = std::fs::File::open(&plain).unwrap();
        let output = std::fs::File::create(&sealed).unwrap();
        encrypt_parallel(&key(4), &options(compression), input, output, 0)
            .unwrap()
            .sync_all()
            .unwrap();
        let input = std::fs::File::open(&sealed).unwrap();
        let opened_bytes = decrypt_parallel(&key(4), input, Vec::new(), 2).unwrap();
        assert_eq!(opened_bytes, data, "{compression:?}");
    }
    let mut container = std::fs::read(&sealed).unwrap();
    container[48 + CHUNK + 16 + 3] ^= 0x40;
    std::fs::write(&sealed, &container).unwrap();
    let input = std::fs::File::open(&sealed).unwrap();
    let err = decrypt_parallel(&key(4), input, Vec::new(), 2).unwrap_err();
    assert_eq!(err, ContainerError::Damaged { chunk: 1 });
    let err = decrypt_file(&key(4), &sealed, &opened).unwrap_err();
    assert_eq!(err, ContainerError::Damaged { chunk: 1 });
    assert!(!opened.exists());
}
