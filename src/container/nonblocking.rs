//! Tokio adapters: the daemon seals and opens containers without blocking its runtime.
//!
//! Each call runs the multi-core sealer or opener ([`super::parallel`]) on a blocking
//! thread (`spawn_blocking`), bridged to the caller's `AsyncRead`/`AsyncWrite` with
//! `tokio_util::io::SyncIoBridge`: data flows through as it is read, one chunk per worker
//! in flight, so memory does not grow with the input. The results and errors are those of
//! the synchronous functions.

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::SyncIoBridge;

use super::{ContainerError, ContainerKey, Options, decrypt_parallel, encrypt_parallel};

fn joined(err: tokio::task::JoinError) -> ContainerError {
    ContainerError::Io(format!("the container task failed: {err}"))
}

/// Encrypts everything `reader` yields into `writer` on `threads` threads (0: one per
/// core); returns `writer`, flushed but not shut down.
///
/// # Errors
/// [`ContainerError`] on I/O failure.
pub async fn encrypt_async<R, W>(
    key: &ContainerKey,
    options: &Options,
    reader: R,
    writer: W,
    threads: usize,
) -> Result<W, ContainerError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (key, options) = (key.clone(), *options);
    tokio::task::spawn_blocking(move || {
        let reader = SyncIoBridge::new(reader);
        let writer = SyncIoBridge::new(writer);
        encrypt_parallel(&key, &options, reader, writer, threads).map(SyncIoBridge::into_inner)
    })
    .await
    .map_err(joined)?
}

/// Decrypts (and decompresses) the container `reader` yields into `writer` on `threads`
/// threads (0: one per core). Bytes already written are authenticated, but the whole is
/// only valid when this returns `Ok`; to commit nothing on failure use
/// [`decrypt_file_async`].
///
/// # Errors
/// [`ContainerError`]: damaged, truncated, wrong key, or I/O.
pub async fn decrypt_async<R, W>(
    key: &ContainerKey,
    reader: R,
    writer: W,
    threads: usize,
) -> Result<W, ContainerError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let key = key.clone();
    tokio::task::spawn_blocking(move || {
        let reader = SyncIoBridge::new(reader);
        let writer = SyncIoBridge::new(writer);
        decrypt_parallel(&key, reader, writer, threads).map(SyncIoBridge::into_inner)
    })
    .await
    .map_err(joined)?
}

/// [`super::decrypt_file`] off the runtime: `output` appears (fsynced) only when every
/// chunk authenticated.
///
/// # Errors
/// [`ContainerError`]; on error `output` is not created.
pub async fn decrypt_file_async(
    key: &ContainerKey,
    input: PathBuf,
    output: PathBuf,
) -> Result<(), ContainerError> {
    let key = key.clone();
    tokio::task::spawn_blocking(move || super::decrypt_file(&key, &input, &output))
        .await
        .map_err(joined)?
}
