//! Both decryptors' framing: `container::decrypt` (one thread) and
//! `container::decrypt_parallel` (worker pool), with a fixed key, on hostile containers.
//! They must agree: the same plaintext when both succeed, an error from both otherwise.
//!
//! Input: a mode byte, then
//! - even mode: the container bytes as they are (header and framing checks; chunks fail
//!   authentication);
//! - odd mode: a recipe for a container sealed with the fuzzing key, so that the
//!   decryptors get past authentication: chunks of chosen lengths, last flags, indices
//!   and cuts, and (bit 1 of the mode) zstd compression declared in the header, so that
//!   the plaintext goes through the zstd decoder.
//!
//! Output is capped (`CAP`): a decompression bomb is an error here, not an exhaustion
//! (bounding it in the product is issue 12 item 5).
#![no_main]

use std::io::{self, Write};

use cloudpdi::container::stream::Stream;
use cloudpdi::container::{Compression, ContainerKey, Header, decrypt, decrypt_parallel};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [0x42; 32];
const SALT: [u8; 32] = [0x17; 32];
/// Smallest chunk size the format allows, so that several chunks fit a fuzz input.
const CHUNK_LOG2: u8 = 16;
/// Most plaintext bytes a run may produce.
const CAP: usize = 8 << 20;

/// A writer that refuses to hold more than `CAP` bytes.
#[derive(Default)]
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.0.len() + data.len() > CAP {
            return Err(io::Error::other("output cap reached"));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Builds a container from a recipe: 4 bytes per chunk (flags, length in 256-byte units
/// plus extra, a fill byte), the chunk's plaintext taken from the recipe and padded.
fn sealed(mode: u8, recipe: &[u8]) -> Vec<u8> {
    let header = Header {
        compression: if mode & 2 == 0 {
            Compression::None
        } else {
            Compression::Zstd
        },
        chunk_log2: CHUNK_LOG2,
        salt: SALT,
    };
    let encoded = header.encode();
    let stream = Stream::new(&ContainerKey::from_bytes(KEY).payload_key(&SALT), encoded);
    let mut out = encoded.to_vec();
    let chunk_size = header.chunk_size();
    let mut rest = recipe;
    let mut index = 0u64;
    while rest.len() >= 4 {
        let (spec, tail) = rest.split_at(4);
        rest = tail;
        let flags = spec[0];
        let length = if flags & 0x80 != 0 {
            chunk_size
        } else {
            (usize::from(spec[1]) << 8 | usize::from(spec[2])).min(chunk_size)
        };
        let take = length.min(rest.len()).min(usize::from(spec[1]) + 1);
        let mut chunk = rest[..take].to_vec();
        rest = &rest[take..];
        chunk.resize(length, spec[3]);
        let last = flags & 1 != 0;
        let at = match flags & 6 {
            2 => index + 1,
            4 => index.saturating_sub(1),
            _ => index,
        };
        stream.seal_at(at, &mut chunk, last).expect("seal");
        if flags & 8 != 0 {
            let cut = usize::from(spec[3]) % chunk.len().max(1);
            chunk.truncate(cut);
        }
        if flags & 16 != 0 && !chunk.is_empty() {
            let at = usize::from(spec[2]) % chunk.len();
            chunk[at] ^= 1;
        }
        out.extend_from_slice(&chunk);
        index += 1;
        if flags & 32 != 0 {
            break;
        }
    }
    out.extend_from_slice(rest.get(..rest.len().min(3)).unwrap_or_default());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let container = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        sealed(mode, rest)
    };
    let key = ContainerKey::from_bytes(KEY);
    let serial = decrypt(&key, container.as_slice(), Capped::default());
    let parallel = decrypt_parallel(&key, container.as_slice(), Capped::default(), 2);
    match (serial, parallel) {
        (Ok(a), Ok(b)) => assert!(a.0 == b.0, "the decryptors disagree on the plaintext"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "one decryptor accepts what the other refuses: serial {:?}, parallel {:?}",
            a.map(|w| w.0.len()),
            b.map(|w| w.0.len())
        ),
    }
});
