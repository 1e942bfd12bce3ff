//! What `cloudpdi send` and `cloudpdi receive` need around the pipelines: the
//! configuration, the route, where the work happens, and the lines printed for the
//! person who ran them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError};
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
    /// No daemon answers on the admin address of the configuration.
    #[error(
        "no cloudpdi daemon answers at {addr} (admin.listen in {config}), so nothing would import the token: start it (`systemctl start cloudpdi`) and receive again, or write the study into a folder with `cloudpdi receive --out DIR`"
    )]
    NoDaemon {
        /// The admin address tried.
        addr: std::net::SocketAddr,
        /// The configuration file read.
        config: String,
    },
    /// The daemon declined the token; its sentence says why.
    #[error("the daemon did not queue the token: {0}")]
    Declined(String),
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
    let (_, mut job) = send_files(sender, route, paths, attachments, workdir, progress).await?;
    job.step = crate::gateway::outbound::OutStep::Done;
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
    lines.push(record_send(&config, &job).await);
    Ok(lines)
}

/// Records a finished send where `cloudpdi status` finds it: with the running daemon
/// (its admin endpoint), else directly in the job index when no daemon holds it. The
/// token is issued by then, so a failure here is reported, not an error of the send.
async fn record_send(config: &Config, job: &crate::gateway::outbound::OutboundJob) -> String {
    use crate::admin::status::{StatusError, post};
    let body = match serde_json::to_vec(job) {
        Ok(body) => body,
        Err(e) => return format!("not listed by `cloudpdi status`: {e}"),
    };
    let recorded = match post(
        config.admin.listen,
        "/jobs/sent",
        Some(("application/json", body)),
    )
    .await
    {
        Err(StatusError::Unreachable { source, .. }) if source.is_connect() => {
            record_in_index(config, job)
        }
        Err(e) => Err(e.to_string()),
        Ok(answer) => Ok(answer),
    };
    match recorded {
        Ok(answer) => answer,
        Err(why) => format!("not listed by `cloudpdi status`: {why}"),
    }
}

/// Records a finished send in the job index itself, when no daemon is running.
fn record_in_index(
    config: &Config,
    job: &crate::gateway::outbound::OutboundJob,
) -> Result<String, String> {
    use crate::gateway::store::{JobStore, Store};
    use std::os::unix::fs::MetadataExt;
    // Written only by the daemon's own user: files another user (root) created in the
    // index would stop the daemon from writing it.
    let index = config.index_dir();
    let owner = std::fs::metadata(&index).map(|m| m.uid()).ok();
    // `/proc/self` belongs to this process's effective user.
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if owner.is_none() || owner != me {
        return Err(format!(
            "no daemon answers and the index {} is not this user's: start the daemon, or run \
             `cloudpdi send` as the daemon's user",
            shown(&index)
        ));
    }
    let store = Store::open(&index).map_err(|e| e.to_string())?;
    let jobs =
        JobStore::open(&store, crate::gateway::outbound::JOB_STORE).map_err(|e| e.to_string())?;
    let created = jobs.create(job).map_err(|e| e.to_string())?;
    store.flush().map_err(|e| e.to_string())?;
    Ok(if created {
        format!(
            "recorded as job {} (no daemon is running: `cloudpdi status` lists it once one runs)",
            job.id
        )
    } else {
        format!("a job {} is already recorded", job.id)
    })
}

/// Downloads, opens and extracts a token's PDI into the folder `out`, as if reading the
/// disc; the `[inbound]` bounds and `[repositories]` of the configuration at
/// `config_path` apply when it exists, else their defaults. Returns the line to print.
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
    let config = if config_path.exists() {
        Config::load(config_path)?
    } else {
        Config::default()
    };
    let summary = crate::gateway::inbound::receive_to_folder(token, out, &config, progress).await?;
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

/// Hands a token to the running daemon (its admin endpoint), with the local Patient ID
/// to file the study under if given, and returns the daemon's answer: queued as a job,
/// or why not (the daemon does not import, the token expired, its repository is not
/// allowed, it was already imported).
///
/// # Errors
/// [`CliError::Token`] for an expired token, [`CliError::Config`],
/// [`CliError::NoDaemon`], [`CliError::Declined`] with the daemon's reason.
pub async fn hand_to_daemon(
    config_path: &Path,
    token: &Token,
    patient_id: Option<&str>,
) -> Result<String, CliError> {
    use crate::admin::status::{StatusError, post};
    token.check_not_expired(crate::clock::now_seconds())?;
    let addr = Config::load(config_path)?.admin.listen;
    let text = crate::gateway::inbound::watch::drop_text(token, patient_id);
    let body = Some(("text/plain", text.as_bytes().to_vec()));
    match post(addr, "/tokens", body).await {
        Ok(answer) => Ok(answer),
        // Only a refused connection means no daemon: a timeout after the request was sent
        // may come after the job was queued, and is reported as it is.
        Err(StatusError::Unreachable { source, .. }) if source.is_connect() => {
            Err(CliError::NoDaemon {
                addr,
                config: shown(config_path),
            })
        }
        Err(e) => Err(CliError::Declined(e.to_string())),
    }
}
