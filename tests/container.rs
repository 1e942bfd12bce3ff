//! The encrypted container: round trips at every size edge, rejection of every
//! truncation, extension, reordering and a large sample of bit flips, the committed test
//! vectors, and a multi-GiB stream in constant memory.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};

use cloudpdi::container::{
    Compression, ContainerError, ContainerKey, Decryptor, Encryptor, Options, decrypt,
    decrypt_file, encrypt,
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

fn open(container: &[u8]) -> Result<Vec<u8>, ContainerError> {
    decrypt(&key(1), container, Vec::new())
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
fn chunk_layout_is_header_plus_sealed_chunks() {
    for (len, chunks) in [(0, 1), (1, 1), (CHUNK, 1), (CHUNK + 1, 2), (3 * CHUNK, 3)] {
        let container = seal(&plaintext(len), Compression::None);
        assert_eq!(container.len(), 48 + len + 16 * chunks, "{len} bytes");
    }
}

#[test]
fn every_truncation_is_rejected() {
    let container = seal(&plaintext(3 * CHUNK + 100), Compression::None);
    let boundaries = (0..4).map(|i| 48 + i * (CHUNK + 16));
    let inside = (0..container.len()).step_by(997);
    for cut in boundaries.chain(inside).filter(|&c| c < container.len()) {
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
        let sealed = match compression {
            Compression::None => {
                let mut w =
                    Encryptor::with_salt(&key(7), &options(compression), [9; 32], Vec::new())
                        .unwrap();
                w.write_all(&data).unwrap();
                w.finish().unwrap()
            }
            Compression::Zstd => {
                let w = Encryptor::with_salt(&key(7), &options(compression), [9; 32], Vec::new())
                    .unwrap();
                let mut z = zstd::stream::write::Encoder::new(w, 3).unwrap();
                z.write_all(&data).unwrap();
                z.finish().unwrap().finish().unwrap()
            }
        };
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

/// A writer that only hashes.
struct Hasher(Sha256, u64);

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_multi_gib_stream_round_trips_in_constant_memory() {
    const LEN: u64 = (2 << 30) + 3;
    let (reader, writer) = std::io::pipe().unwrap();
    let sealer = std::thread::spawn(move || {
        let options = Options {
            chunk_log2: 20,
            ..Options::default()
        };
        encrypt(
            &key(3),
            &options,
            Zeros(LEN),
            std::io::BufWriter::new(writer),
        )
        .map(|_| ())
    });
    let out = decrypt(
        &key(3),
        std::io::BufReader::new(reader),
        Hasher(Sha256::new(), 0),
    )
    .unwrap();
    sealer.join().unwrap().unwrap();
    let mut expected = Sha256::new();
    let mut zeros = Zeros(LEN);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = zeros.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        expected.update(&buf[..n]);
    }
    assert_eq!(out.1, LEN);
    assert_eq!(out.0.finalize(), expected.finalize());
}
