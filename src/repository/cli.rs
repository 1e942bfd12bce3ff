//! `cloudpdi repository serve|upload|download|status|revoke`: the server's start-up and
//! the client for an operator, with a progress bar.
//!
//! An upload takes a token made beforehand (`cloudpdi token new` with any document ID of
//! the form, e.g. 20 zeros): the token's expiry and download proof go into the create
//! call, and the token is written again with the document ID the repository assigned and
//! the repository's URL.

use std::fmt::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::repository::api::{DocumentStatus, NewDocument};
use crate::repository::client::{Client, ClientError, ClientOptions};
use crate::repository::config::RepositoryConfig;
use crate::telemetry::escape;
use crate::token::{RepositoryRef, Token};

/// The environment variable holding the facility API key when no key file is given.
pub const API_KEY_ENV: &str = "CLOUDPDI_REPOSITORY_API_KEY";

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The repository call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Neither a key file nor the variable gives the facility API key.
    #[error("no facility API key: give --api-key-file or set {API_KEY_ENV}")]
    NoApiKey,
    /// The server cannot listen on its address (the message says why and what to do).
    #[error(transparent)]
    Listen(#[from] crate::listen::BindError),
    /// The server stopped with an error.
    #[error(transparent)]
    Server(#[from] crate::repository::server::ServerError),
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
    /// The token names its repository by a community code, which this command cannot
    /// resolve (it reads no configuration).
    #[error(
        "the token names community {0}, not a repository URL: receive it with `cloudpdi \
         receive`, which looks the code up in [repositories] of the gateway configuration"
    )]
    Community(String),
}

/// Runs the repository service on `config.server.listen` until `shutdown` completes,
/// telling systemd it is ready once it listens.
///
/// # Errors
/// [`CliError::Listen`] when the address is taken, [`CliError::Server`].
pub async fn serve(
    config: RepositoryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CliError> {
    let listener = crate::listen::bind(
        config.server.listen,
        "server.listen",
        "the repository server",
    )
    .await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    crate::repository::server::run(config, listener, shutdown).await?;
    Ok(())
}

/// The facility API key: the first line of `file`, else [`API_KEY_ENV`].
///
/// # Errors
/// [`CliError::File`] when the file cannot be read, [`CliError::NoApiKey`] without both.
pub fn api_key(file: Option<&Path>) -> Result<String, CliError> {
    let key = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|source| CliError::File {
            path: path.display().to_string(),
            source,
        })?,
        None => std::env::var(API_KEY_ENV).map_err(|_| CliError::NoApiKey)?,
    };
    Ok(key.trim().to_owned())
}

/// The sender's view of a document (`cloudpdi repository status`).
///
/// # Errors
/// [`CliError::Client`]: unreachable, unknown document, wrong key.
pub async fn status(
    url: &str,
    api_key: String,
    document_id: &str,
) -> Result<DocumentStatus, CliError> {
    let client = Client::new(url, Some(api_key), ClientOptions::default())?;
    Ok(client.status(document_id).await?)
}

/// Revokes a document: its content is deleted and its token opens nothing any more
/// (`cloudpdi repository revoke`). Returns the document's state after.
///
/// # Errors
/// [`CliError::Client`]: unreachable, unknown document, wrong key.
pub async fn revoke(
    url: &str,
    api_key: String,
    document_id: &str,
) -> Result<DocumentStatus, CliError> {
    let client = Client::new(url, Some(api_key), ClientOptions::default())?;
    Ok(client.revoke(document_id).await?)
}

/// A document's state for a person: state, size, expiry, downloads, receipts.
pub fn describe_status(status: &DocumentStatus) -> String {
    let state = serde_json::to_value(status.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut out = format!(
        "document:  {}\nstate:     {state}\nsize:      {} bytes ({} of {} parts held)\n\
         expires:   {} (UTC)\ndownloads: {} of {}\n",
        escape(&status.document_id),
        status.size,
        status.parts_held.len(),
        status.size.div_ceil(status.part_size.max(1)),
        crate::clock::date(status.expires_at),
        status.downloads,
        status.max_downloads,
    );
    for receipt in &status.receipts {
        let _ = writeln!(
            out,
            "receipt:   {} (UTC): {} imported, {} refused{}",
            crate::clock::date(receipt.received_at),
            receipt.receipt.instances_imported,
            receipt.receipt.instances_refused,
            if receipt.receipt.note.is_empty() {
                String::new()
            } else {
                format!(": {}", escape(&receipt.receipt.note))
            }
        );
    }
    out
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
            size: Some(size),
            expires_at: u64::from(token.expires_at),
            max_downloads,
            proof_hash: token.download_proof().hash(),
        })
        .await?;
    let mut issued = token.clone();
    issued.document_id.clone_from(&created.document_id);
    issued.repository = RepositoryRef::Url(url.to_owned());
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
    let url = match &token.repository {
        RepositoryRef::Url(url) => url,
        RepositoryRef::Community(code) => return Err(CliError::Community(code.clone())),
    };
    let client = Client::new(url, None, ClientOptions::default())?;
    let progress = bar(0, "download");
    let size = client
        .download_to(&token.document_id, &token.download_proof(), out, |held| {
            progress.set_position(held);
        })
        .await?;
    progress.set_length(size.size);
    progress.finish();
    Ok(size.size)
}
