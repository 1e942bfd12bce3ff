//! The STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár), as in the age format:
//! the plaintext is cut into fixed-size chunks, each sealed with AES-256-GCM under the
//! per-file payload key with the nonce `counter (11 bytes, big endian) || last flag`, and
//! the header as associated data. Reordering, dropping, truncating or extending chunks,
//! and any change of the header, fail authentication.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};

use super::ContainerError;
use super::header::HEADER_LEN;
use super::keys::PayloadKey;

/// Bytes of the GCM tag after every chunk.
pub const TAG_LEN: usize = 16;

/// Seals or opens the chunks of one container, in order.
pub struct Stream {
    cipher: Aes256Gcm,
    aad: [u8; HEADER_LEN],
    counter: u64,
}

impl Stream {
    /// A stream at chunk 0.
    pub fn new(key: &PayloadKey, header: [u8; HEADER_LEN]) -> Stream {
        Stream {
            cipher: Aes256Gcm::new(&key.bytes().into()),
            aad: header,
            counter: 0,
        }
    }

    /// Index of the next chunk.
    pub fn position(&self) -> u64 {
        self.counter
    }

    fn nonce(index: u64, last: bool) -> Nonce<Aes256Gcm> {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&index.to_be_bytes());
        nonce[11] = u8::from(last);
        nonce.into()
    }

    /// Encrypts `chunk` in place and appends its tag.
    ///
    /// # Errors
    /// [`ContainerError::TooLarge`] past 2^64 chunks (never in practice).
    pub fn seal(&mut self, chunk: &mut Vec<u8>, last: bool) -> Result<(), ContainerError> {
        self.seal_at(self.counter, chunk, last)?;
        self.advance()
    }

    /// Authenticates and decrypts `chunk` (ciphertext followed by its tag) in place,
    /// leaving the plaintext. On failure the chunk is untouched and the stream does not
    /// advance.
    ///
    /// # Errors
    /// [`ContainerError::Damaged`] naming the chunk.
    pub fn open(&mut self, chunk: &mut Vec<u8>, last: bool) -> Result<(), ContainerError> {
        self.open_at(self.counter, chunk, last)?;
        self.advance()
    }

    /// Seals chunk `index` without touching the stream's position: chunks are
    /// independent, so several threads may seal different chunks of one stream at once.
    ///
    /// # Errors
    /// [`ContainerError::TooLarge`] if the cipher refuses the length (never for valid
    /// chunk sizes).
    pub fn seal_at(
        &self,
        index: u64,
        chunk: &mut Vec<u8>,
        last: bool,
    ) -> Result<(), ContainerError> {
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &Self::nonce(index, last),
                &self.aad,
                chunk.as_mut_slice().into(),
            )
            .map_err(|_| ContainerError::TooLarge)?;
        chunk.extend_from_slice(tag.as_slice());
        Ok(())
    }

    /// Opens chunk `index` in place without touching the stream's position (see
    /// [`Stream::seal_at`]); on failure the chunk is untouched.
    ///
    /// # Errors
    /// [`ContainerError::Damaged`] naming the chunk.
    pub fn open_at(
        &self,
        index: u64,
        chunk: &mut Vec<u8>,
        last: bool,
    ) -> Result<(), ContainerError> {
        let damaged = ContainerError::Damaged { chunk: index };
        let Some(split) = chunk.len().checked_sub(TAG_LEN) else {
            return Err(damaged);
        };
        let mut tag = Tag::<Aes256Gcm>::default();
        tag.copy_from_slice(&chunk[split..]);
        // aes-gcm checks the tag before it decrypts: on failure the bytes are untouched.
        self.cipher
            .decrypt_inout_detached(
                &Self::nonce(index, last),
                &self.aad,
                chunk[..split].as_mut().into(),
                &tag,
            )
            .map_err(|_| damaged)?;
        chunk.truncate(split);
        Ok(())
    }

    /// Opens chunk `index` read from a container, telling a cut from damage. `want` is a
    /// full sealed chunk's length and `last` whether the input ended with this chunk.
    ///
    /// # Errors
    /// [`ContainerError::Truncated`] when the container ends early,
    /// [`ContainerError::Damaged`] when the chunk does not authenticate.
    pub fn open_read(
        &self,
        index: u64,
        chunk: &mut Vec<u8>,
        last: bool,
        want: usize,
    ) -> Result<(), ContainerError> {
        if last && chunk.len() == TAG_LEN && index > 0 {
            // Only an empty container has an empty last chunk.
            return Err(ContainerError::Damaged { chunk: index });
        }
        match self.open_at(index, chunk, last) {
            Ok(()) => Ok(()),
            Err(damaged) if last && chunk.len() == want => {
                // A full chunk at the end that opens as a middle chunk: cut at a boundary.
                match self.open_at(index, chunk, false) {
                    Ok(()) => Err(ContainerError::Truncated { chunks: index + 1 }),
                    Err(_) => Err(damaged),
                }
            }
            Err(_) if last && chunk.len() < TAG_LEN => {
                Err(ContainerError::Truncated { chunks: index })
            }
            Err(damaged) => Err(damaged),
        }
    }

    /// Moves to the next chunk (after [`Stream::open_read`] of the current one).
    ///
    /// # Errors
    /// [`ContainerError::TooLarge`] past 2^64 chunks.
    pub fn advance(&mut self) -> Result<(), ContainerError> {
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or(ContainerError::TooLarge)?;
        Ok(())
    }
}
