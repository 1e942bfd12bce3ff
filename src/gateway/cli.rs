//! What `cloudpdi send` and `cloudpdi receive` need around the pipelines: the
//! configuration, the route, where the work happens, and the lines printed for the
//! person who ran them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError, InboundConfig};
use crate::gateway::jobs::StepError;
use crate::telemetry::escape;
use crate::token::{Token, TokenError};

/// Why `send` or `receive` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The configuration cannot be used.
    #[error(transparent)]
    Config(Box<ConfigError>),
    /// The route asked for is not configured.
    #[error("route {route:?} is not in {config}: use one of {routes}")]
    UnknownRoute {
        /// The route given.
        route: String,
        /// The configuration file read.
        config: String,
        /// The routes it has.
        routes: String,
    },
    /// The token has expired.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A pipeline step failed; its message says which and why.
    #[error(transparent)]
    Step(#[from] StepError),
    /// The token cannot be handed to the daemon.
    #[error("cannot write into the watch folder {dir}: {source}")]
    Watch {
        /// The watch folder (`inbound.watch_dir`).
        dir: String,
        /// What the system reported.
        source: std::io::Error,
    },
}

impl From<ConfigError> for CliError {
    /// Boxed: a configuration error is large and rare.
    fn from(e: ConfigError) -> Self {
        CliError::Config(Box::new(e))
    }
}

fn shown(path: &Path) -> String {
    escape(&path.display().to_string())
}

/// Sends files and folders through `route`'s outbound pipeline in one go (pack, seal,
/// upload, issue), in a work folder under the data folder; returns the lines to print
/// (what was sent, where the token and the slip are).
///
/// # Errors
/// [`CliError::UnknownRoute`], [`CliError::Config`], or the failed step.
pub async fn send(
    config_path: &Path,
    route: &str,
    paths: Vec<PathBuf>,
    attachments: Vec<PathBuf>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<String>, CliError> {
    use crate::gateway::outbound::{Sender, send_files};
    let config = Arc::new(Config::load(config_path)?);
    if !config.routes.contains_key(route) {
        return Err(CliError::UnknownRoute {
            route: route.to_owned(),
            config: shown(config_path),
            routes: config.routes.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let sender = Arc::new(Sender::from_config(config.clone()));
    let workdir = config
        .jobs_dir()
        .join("send")
        .join(std::process::id().to_string());
    let (_, job) = send_files(sender, route, paths, attachments, workdir, progress).await?;
    let mut lines = vec![format!(
        "sent {} instances ({} left out by the AI-image policy) as document {}",
        job.instances,
        job.excluded,
        job.document_id.as_deref().unwrap_or("?")
    )];
    if let Some(token) = &job.token_file {
        lines.push(format!("token: {}", shown(token)));
    }
    if let Some(slip) = &job.slip_file {
        lines.push(format!("slip:  {}", shown(slip)));
    }
    Ok(lines)
}

/// Downloads, opens and extracts a token's PDI into the folder `out`, as if reading the
/// disc; the `[inbound]` bounds of the configuration at `config_path` apply when it
/// exists, else their defaults. Returns the line to print.
///
/// # Errors
/// [`CliError::Token`] for an expired token, [`CliError::Config`], or the failed step.
pub async fn receive_to_folder(
    config_path: &Path,
    token: &Token,
    out: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<String, CliError> {
    token.check_not_expired(crate::clock::now_seconds())?;
    let inbound = if config_path.exists() {
        Config::load(config_path)?.inbound
    } else {
        InboundConfig::default()
    };
    let summary =
        crate::gateway::inbound::receive_to_folder(token, out, &inbound, progress).await?;
    Ok(format!(
        "{}: {} patient(s), {} study(ies), {} series, {} instances ({}), {:.1} MB",
        shown(out),
        summary.patients,
        summary.studies,
        summary.series,
        summary.instances,
        summary.modalities.join(", "),
        summary.bytes as f64 / 1e6
    ))
}

/// Hands a token to the running daemon through its watch folder, with the local
/// Patient ID to file the study under if given. Returns the line to print.
///
/// # Errors
/// [`CliError::Token`] for an expired token, [`CliError::Config`], [`CliError::Watch`].
pub fn hand_to_daemon(
    config_path: &Path,
    token: &Token,
    patient_id: Option<&str>,
) -> Result<String, CliError> {
    token.check_not_expired(crate::clock::now_seconds())?;
    let dir = Config::load(config_path)?.watch_dir();
    let path =
        crate::gateway::inbound::watch::drop_token(&dir, token, patient_id).map_err(|source| {
            CliError::Watch {
                dir: shown(&dir),
                source,
            }
        })?;
    Ok(format!(
        "handed to the daemon: {} (see `cloudpdi status`)",
        shown(&path)
    ))
}
