//! `cloudpdi repository upload|download`: the client for an operator, with a progress bar.
//!
//! An upload takes a token made beforehand (`cloudpdi token new` with any document ID):
//! the token's expiry and download proof go into the create call, and the token is
//! written again with the document ID the repository assigned.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::repository::api::NewDocument;
use crate::repository::client::{Client, ClientError, ClientOptions};
use crate::token::Token;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The repository call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file could not be used.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The token could not be rewritten.
    #[error(transparent)]
    Token(#[from] crate::token::cli::CliError),
}

fn bar(len: u64, verb: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{verb} {{bar:40}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
        ))
        .expect("the template is valid"),
    );
    bar
}

/// Creates a document for `file`, uploads it (resumable: run again to resume with the
/// same `token_out`), and writes the token with the assigned ID to `token_out`.
/// Returns the document ID.
///
/// # Errors
/// [`CliError`].
pub async fn upload(
    url: &str,
    api_key: String,
    token: &Token,
    max_downloads: u32,
    file: &Path,
    token_out: &Path,
) -> Result<String, CliError> {
    let client = Client::new(url, Some(api_key), ClientOptions::default())?;
    let size = std::fs::metadata(file)
        .map_err(|source| CliError::File {
            path: file.display().to_string(),
            source,
        })?
        .len();
    let created = client
        .create(&NewDocument {
            size,
            expires_at: u64::from(token.expires_at),
            max_downloads,
            proof_hash: token.download_proof().hash(),
        })
        .await?;
    let mut issued = token.clone();
    issued.document_id.clone_from(&created.document_id);
    issued.repository = url.to_owned();
    crate::token::cli::write_token_file(&issued, token_out)?;
    let progress = bar(size, "upload  ");
    client
        .upload_file(&created.document_id, file, |done| {
            progress.set_position(done)
        })
        .await?;
    progress.finish();
    Ok(created.document_id)
}

/// Downloads the token's document into `out` (resuming a partial `out`). Returns its size.
///
/// # Errors
/// [`CliError`].
pub async fn download(token: &Token, out: &Path) -> Result<u64, CliError> {
    let client = Client::new(&token.repository, None, ClientOptions::default())?;
    let progress = bar(0, "download");
    let size = client
        .download_to(&token.document_id, &token.download_proof(), out, |held| {
            progress.set_position(held);
        })
        .await?;
    progress.set_length(size);
    progress.finish();
    Ok(size)
}
