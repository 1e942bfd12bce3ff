//! `cloudpdi encrypt|decrypt`: a container from a file and back, for operators. The
//! errors name the files, which the codec's own errors cannot know.

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use super::{Compression, ContainerError, Options};
use crate::token::{Token, TokenError};

/// Why `encrypt` or `decrypt` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The token cannot seal anything any more.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A file cannot be opened or created.
    #[error("cannot {action} {path}: {source}")]
    File {
        /// What was being done (`open`, `create (it must not exist yet)`).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
    /// Sealing or opening failed.
    #[error("cannot {action} {input} into {output}: {source}")]
    Container {
        /// `encrypt` or `decrypt`.
        action: &'static str,
        /// The file read.
        input: PathBuf,
        /// The file written.
        output: PathBuf,
        /// What the codec reported.
        source: ContainerError,
    },
}

/// Seals `input` into the new file `output` with the token's key (zstd inside the
/// encryption when `compression` says so), on all cores, and fsyncs it.
///
/// # Errors
/// [`CliError`]: an expired token, an unreadable input, an existing output, a full disk.
pub fn encrypt_file(
    token: &Token,
    compression: Compression,
    input: &Path,
    output: &Path,
) -> Result<(), CliError> {
    token.check_not_expired(crate::clock::now_seconds())?;
    let options = Options {
        compression,
        ..Options::default()
    };
    let file_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| CliError::File {
            action,
            path,
            source,
        }
    };
    let reader = BufReader::new(std::fs::File::open(input).map_err(file_error("open", input))?);
    let sealing = |source| CliError::Container {
        action: "encrypt",
        input: input.to_owned(),
        output: output.to_owned(),
        source,
    };
    let key = token.container_key();
    crate::durable::create_new(output, 0o666, |file| {
        super::encrypt_parallel(&key, &options, reader, BufWriter::new(file), 0)?
            .into_inner()
            .map_err(|e| ContainerError::from(e.into_error()))?;
        Ok(())
    })
    .map_err(|e| match e {
        ContainerError::Io(_) if output.symlink_metadata().is_ok() => CliError::File {
            action: "create (it must not exist yet)",
            path: output.to_owned(),
            source: std::io::ErrorKind::AlreadyExists.into(),
        },
        other => sealing(other),
    })
}

/// Opens the container `input` into the new file `output`; nothing is written unless
/// every chunk authenticates.
///
/// # Errors
/// [`CliError::Container`]: a wrong token, a damaged or truncated container, a full disk.
pub fn decrypt_file(token: &Token, input: &Path, output: &Path) -> Result<(), CliError> {
    super::decrypt_file(&token.container_key(), input, output).map_err(|source| {
        CliError::Container {
            action: "decrypt",
            input: input.to_owned(),
            output: output.to_owned(),
            source,
        }
    })
}
