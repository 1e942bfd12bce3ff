//! `cloudpdi serve`: wires the SCP, the batch stabilizer, both pipelines, the retention of
//! records and the admin endpoint together, and stops them in order.
//!
//! Shutdown (SIGTERM from systemd, or Ctrl-C): stop accepting associations, let every
//! instance in flight finish and be acknowledged, abort idle associations, flush the
//! index, exit 0.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::metrics::Metrics;
use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::facility::{FacilityKey, PublicKey};
use crate::gateway::inbound::Inbound;
use crate::gateway::inbound::mailbox::Mailbox;
use crate::gateway::inbound::watch::Watch;
use crate::gateway::jobs::Pipeline;
use crate::gateway::outbound::{Outbound, Sender};
use crate::gateway::reception::route::Routes;
use crate::gateway::reception::scp::{Listener, ScpContext};
use crate::gateway::reception::spool::{Spool, StoreError};
use crate::gateway::retention::Retention;
use crate::listen;
use crate::repository::client::{Client, ClientError};

/// How long shutdown waits for associations to finish their instance in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The spool or its index cannot be opened.
    #[error("cannot open the spool under {dir}: {source}")]
    Spool {
        /// The data folder.
        dir: std::path::PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// The repository cannot be used (key file, embedded repository).
    #[error("repository: {0}")]
    Repository(String),
    /// A folder of the data folder cannot be created or given its mode.
    #[error("cannot prepare the folder {}: {source}; check the owner of the data folder (spool.data_dir): the daemon's user must own it", crate::telemetry::escape(&.path.display().to_string()))]
    Folder {
        /// The folder.
        path: std::path::PathBuf,
        /// What the system reported.
        source: io::Error,
    },
    /// This facility's private key (`facility.key_file`) cannot be loaded.
    #[error("cannot load this facility's key {} (facility.key_file): {source}", crate::telemetry::escape(&.path.display().to_string()))]
    FacilityKey {
        /// The key file.
        path: std::path::PathBuf,
        /// Why (missing, readable by others, damaged).
        source: crate::facility::KeyError,
    },
    /// A repository's directory has no key, or another key, for `facility.code`: no
    /// facility could open what this one seals, nor this one what they seal to it.
    #[error("{0}")]
    Registration(String),
    /// A job store cannot be opened.
    #[error("cannot open the job index: {0}")]
    Jobs(#[from] crate::gateway::store::IndexError),
    /// A listening socket cannot be bound (the message says why and what to do).
    #[error(transparent)]
    Bind(#[from] crate::listen::BindError),
    /// A certificate or key of `[dicom.tls]` or `[inbound.pacs_tls]` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::dicom::tls::DicomTlsError),
}

/// Runs the daemon until `shutdown` completes.
///
/// # Errors
/// [`ServeError`] when the spool cannot be opened or a port cannot be bound.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let started = Instant::now();
    let config = Arc::new(config);
    prepare_folders(&config)?;
    let spool = open_spool(&config).await?;
    let dicom = listen::bind(config.dicom.listen, "dicom.listen", "DICOM").await?;
    let dicom_tls = match &config.dicom.tls {
        Some(settings) => {
            let tls = Arc::new(crate::dicom::tls::ServerTls::load(settings)?);
            let bound = listen::bind(settings.listen, "dicom.tls.listen", "DICOM TLS").await?;
            Some((bound, tls))
        }
        None => None,
    };
    if let Some(settings) = &config.inbound.pacs_tls {
        // Checked now so that a wrong file stops the start, not the first import.
        crate::dicom::tls::PacsTls::load(settings, &config.inbound.pacs)?;
    }
    let admin_listener = listen::bind(config.admin.listen, "admin.listen", "admin").await?;
    let web_listener = match config.web.address().ok().flatten() {
        Some(addr) => {
            let tls = match config.web.https() {
                true => Some(crate::web::tls_config(&config.web)?),
                false => None,
            };
            Some((listen::bind(addr, "web.listen", "the web page").await?, tls))
        }
        None => None,
    };
    let routes = Arc::new(Routes::new(&config.routes));
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let repository_stop = CancellationToken::new();
    let repository = match config.repository.url.as_str() {
        "embedded" => Some(embedded_repository(&config, repository_stop.clone()).await?),
        _ => None,
    };
    let facility_key = match config.uses_facility_key() {
        true => Some(Arc::new(
            FacilityKey::load(&config.facility.key_file).map_err(|source| {
                ServeError::FacilityKey {
                    path: config.facility.key_file.clone(),
                    source,
                }
            })?,
        )),
        false => None,
    };
    if let Some(key) = &facility_key {
        check_registration(&config, key).await?;
    }
    let sender = match &facility_key {
        Some(key) => Sender::from_config(config.clone()).with_facility_key(key.clone()),
        None => Sender::from_config(config.clone()),
    };
    let outbound = Arc::new(Outbound::new(sender, spool.clone())?);
    if let Some(reason) = config.outbound_off_reason() {
        info!("outbound is off: {reason}");
    }
    let outbound_task = config.outbound_off_reason().is_none().then(|| {
        tokio::spawn(crate::gateway::jobs::work(
            outbound.clone(),
            config.outbound.workers,
            cancel.clone(),
            metrics.clone(),
        ))
    });
    let inbound = match config.inbound.pacs.is_empty() {
        true => None,
        false => Some(Arc::new(Inbound::new(
            config.clone(),
            spool.index().store(),
        )?)),
    };
    let mailbox = match (&inbound, &facility_key) {
        (Some(inbound), Some(key)) if !config.inbound.accept_from.is_empty() => Some(
            Mailbox::new(&config, inbound.clone(), key.clone()).map_err(ServeError::Repository)?,
        ),
        _ => None,
    };
    let mailbox_task = mailbox.map(|mailbox| tokio::spawn(mailbox.run(cancel.clone())));
    restore_last_success(&metrics, &*outbound)?;
    if let Some(inbound) = &inbound {
        restore_last_success(&metrics, &**inbound)?;
    }
    let inbound_tasks = inbound.clone().map(|inbound| {
        let watch = Watch::new(
            config.watch_dir(),
            inbound.clone(),
            Duration::from_secs(config.inbound.poll_interval.max(1)),
        );
        (
            tokio::spawn(crate::gateway::jobs::work(
                inbound,
                config.inbound.workers,
                cancel.clone(),
                metrics.clone(),
            )),
            tokio::spawn(watch.run(cancel.clone())),
        )
    });

    let retention = Retention {
        batches: spool.index().clone(),
        outbound: outbound.store().clone(),
        inbound: inbound.as_ref().map(|inbound| inbound.store().clone()),
        keep: config.spool.records_kept(),
    };
    let retention_task = tokio::spawn(retention.run(cancel.clone()));

    let ctx = Arc::new(ScpContext {
        routes: routes.clone(),
        spool: spool.clone(),
        metrics: metrics.clone(),
        config: config.dicom.clone(),
        outbound: outbound.store().bell(),
        import_reports: inbound
            .as_ref()
            .filter(|_| config.inbound.storage_commitment)
            .map(|inbound| {
                Arc::new(crate::gateway::reception::commitment::ImportReports {
                    ours: config.inbound.calling_ae_title.trim().to_owned(),
                    pacs_ae: config.inbound.pacs_ae_title.trim().to_owned(),
                    pacs_address: config.inbound.pacs.clone(),
                    reports: inbound.reports(),
                })
            }),
    });
    let scp = Listener::new(dicom, ctx, cancel.clone(), tracker.clone());
    let scp_tls = dicom_tls.map(|(bound, tls)| tokio::spawn(scp.tls(bound, tls).run()));
    let scp = tokio::spawn(scp.run());
    let stabilizer = tokio::spawn(crate::gateway::reception::stabilizer::stabilize(
        spool.clone(),
        routes.clone(),
        metrics.clone(),
        outbound.store().bell(),
        cancel.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        spool: spool.clone(),
        routes: routes.clone(),
        metrics,
        started,
        outbound,
        inbound,
        documents: admin::DocumentCache::default(),
        time_zone: config.facility.time_zone.clone(),
    });
    let web_task = web_listener.map(|(listener, tls)| {
        let users = config.web_users_file();
        let web = Arc::new(crate::web::WebState::new(
            admin_state.clone(),
            &config.web,
            users,
            cancel.clone(),
        ));
        tokio::spawn(crate::web::serve(listener, web, tls, cancel.clone()))
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, cancel.clone()));

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(
        dicom = %config.dicom.listen,
        dicom_tls = %config.dicom.tls.as_ref().map_or("none".to_owned(), |tls| tls.listen.to_string()),
        admin = %config.admin.listen,
        web = %config.web.listen,
        data = %config.spool.data_dir.display(),
        routes = %routes.iter().map(|r| format!("{}={}", r.ae_title, r.name)).collect::<Vec<_>>().join(","),
        repository = %config.repository.url,
        watch = %config.watch_dir().display(),
        "cloudpdi serve ready"
    );

    shutdown.await;
    info!("shutting down: no new associations; finishing instances in flight");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    let _ = scp.await;
    if let Some(scp_tls) = scp_tls {
        let _ = scp_tls.await;
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "associations still open after {} s; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    let _ = stabilizer.await;
    let _ = retention_task.await;
    if let Some(outbound) = outbound_task {
        let _ = outbound.await;
    }
    if let Some(mailbox) = mailbox_task {
        let _ = mailbox.await;
    }
    if let Some((inbound, watch)) = inbound_tasks {
        let _ = inbound.await;
        let _ = watch.await;
    }
    repository_stop.cancel();
    if let Some(repository) = repository {
        let _ = repository.await;
    }
    match admin_task.await {
        Ok(Err(e)) => warn!("admin endpoint ended with an error: {e}"),
        Err(e) => warn!("admin endpoint task failed: {e}"),
        Ok(Ok(())) => {}
    }
    if let Some(web) = web_task {
        match web.await {
            Ok(Err(e)) => warn!("web page ended with an error: {e}"),
            Err(e) => warn!("web page task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let flushed = tokio::task::spawn_blocking(move || spool.index().flush()).await;
    match flushed {
        Ok(Ok(())) => info!("stopped; index flushed"),
        Ok(Err(e)) => error!("index flush at shutdown failed: {e}"),
        Err(e) => error!("index flush at shutdown failed: {e}"),
    }
    Ok(())
}

/// How long the start waits for each repository's directory: a repository that is down
/// must not hold the daemon up.
pub const REGISTRATION_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Looks `facility.code` up in the directory of each repository sealed tokens go through
/// (the repository of every route with `deliver_to`, and `repository.url` for
/// `inbound.accept_from`): a facility the directory does not know, or knows with another
/// key, would have every sealed token refused by the other side, so the start is refused
/// with what to do. A repository that does not answer within
/// [`REGISTRATION_CHECK_TIMEOUT`] (or answers an error) is only warned about: it may be
/// down for a while, and the jobs retry.
async fn check_registration(config: &Config, key: &FacilityKey) -> Result<(), ServeError> {
    let mut repositories: Vec<(String, std::path::PathBuf)> = Vec::new();
    if config.outbound_off_reason().is_none() {
        for route in config.routes.values().filter(|r| !r.deliver_to.is_empty()) {
            repositories.push(config.repository_of(route));
        }
    }
    if !config.inbound.accept_from.is_empty() {
        let url = config.repository.url.trim_end_matches('/').to_owned();
        repositories.push((url, config.repository.api_key_file.clone()));
    }
    repositories.sort();
    repositories.dedup();
    let code = &config.facility.code;
    let ours = key.public();
    let give = format!(
        "give the repository operator this facility's public key {} (fingerprint {}, \
         `cloudpdi facility show`) to register as [facility.{code}] public_key, or correct \
         facility.code or facility.key_file, then start the daemon again",
        ours.to_text(),
        ours.fingerprint()
    );
    for (url, key_file) in repositories {
        let client = match Client::for_facility(&url, &key_file, config.repository.allow_plain_http)
        {
            Ok(client) => client,
            Err(e) => {
                warn!(repository = %url, "cannot check this facility's registration: {e}");
                continue;
            }
        };
        let found = tokio::time::timeout(REGISTRATION_CHECK_TIMEOUT, client.facility(code)).await;
        match found {
            Ok(Ok(entry)) => {
                if PublicKey::parse(&entry.public_key).ok().as_ref() != Some(&ours) {
                    return Err(ServeError::Registration(format!(
                        "the repository at {url} has another public key for facility {code} \
                         than facility.key_file: facilities would seal to a key this daemon \
                         does not hold; {give}"
                    )));
                }
                info!(repository = %url, facility = %code, "this facility's key is registered");
            }
            Ok(Err(ClientError::Refused { status: 404, .. })) => {
                return Err(ServeError::Registration(format!(
                    "facility {code} (facility.code) is not registered in the directory of \
                     the repository at {url}: no facility can seal to it or check what it \
                     seals; {give}"
                )));
            }
            Ok(Err(e)) => {
                warn!(repository = %url, "cannot check this facility's registration: {e}");
            }
            Err(_) => warn!(
                repository = %url,
                "cannot check this facility's registration: no answer within {} s; the \
                 daemon starts, sealed deliveries retry until the repository answers",
                REGISTRATION_CHECK_TIMEOUT.as_secs()
            ),
        }
    }
    Ok(())
}

/// Sets the last-success gauge of `pipeline` from its records (a restart must not look
/// like a pipeline that stopped succeeding).
fn restore_last_success<P: crate::gateway::jobs::Pipeline>(
    metrics: &Metrics,
    pipeline: &P,
) -> Result<(), ServeError> {
    if let Some(at) = crate::gateway::jobs::last_success(pipeline)? {
        metrics.last_success_at(P::NAME, at);
    }
    Ok(())
}

/// Gives the data folder's parts their modes: what holds patient data, tokens or keys
/// (spool, index, job folders, the embedded repository, set-aside instances, the watch
/// folder) is the daemon's alone (0700); the token
/// folders may be read by its group (0750: the clerks who print slips; token files and
/// slips are 0640), never by others. A route's own `token_dir` gets 0750 only when the
/// daemon creates it.
fn prepare_folders(config: &Config) -> Result<(), ServeError> {
    let data = &config.spool.data_dir;
    let mut private = vec![
        config.spool_dir(),
        config.index_dir(),
        config.jobs_dir(),
        data.join("repository"),
        data.join("set-aside"),
    ];
    // The watch folder receives tokens: the daemon's alone, unless the admin pointed
    // `inbound.watch_dir` at a folder of their own (then it is left as it is).
    if config.inbound.watch_dir.as_os_str().is_empty() || !config.watch_dir().exists() {
        private.push(config.watch_dir());
    }
    let shared = std::iter::once(data.join("tokens")).chain(
        config
            .routes
            .iter()
            .filter(|(_, route)| route.token_dir.as_os_str().is_empty())
            .map(|(name, _)| config.token_dir(name)),
    );
    let configured = config
        .routes
        .iter()
        .filter(|(_, route)| !route.token_dir.as_os_str().is_empty())
        .map(|(name, _)| config.token_dir(name));
    let folder_error = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| ServeError::Folder { path, source }
    };
    for dir in &private {
        crate::durable::folder_with_mode(dir, 0o700).map_err(folder_error(dir))?;
    }
    for dir in shared {
        crate::durable::folder_with_mode(&dir, 0o750).map_err(folder_error(&dir))?;
    }
    for dir in configured.filter(|dir| !dir.exists()) {
        crate::durable::folder_with_mode(&dir, 0o750).map_err(folder_error(&dir))?;
    }
    Ok(())
}

async fn open_spool(config: &Config) -> Result<Arc<Spool>, ServeError> {
    let (spool_dir, index_dir) = (config.spool_dir(), config.index_dir());
    let min_free_mb = config.spool.min_free_mb;
    let routes: Vec<String> = config.routes.keys().cloned().collect();
    let opened = tokio::task::spawn_blocking(move || {
        let spool = Spool::open(&spool_dir, &index_dir, min_free_mb)?;
        routes
            .iter()
            .try_for_each(|route| spool.prepare_route(route))?;
        Ok(spool)
    })
    .await
    .unwrap_or_else(|e| Err(StoreError::Io(io::Error::other(e))));
    opened.map(Arc::new).map_err(|source| ServeError::Spool {
        dir: config.spool.data_dir.clone(),
        source,
    })
}

/// Starts the in-process repository on local storage under the data folder. Its address
/// is fixed (tokens name it) and this facility's API key is kept in a 0600 file, created
/// once, that `cloudpdi send` reads too.
async fn embedded_repository(
    config: &Config,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let repository_error = |e: &dyn std::fmt::Display| ServeError::Repository(e.to_string());
    let key_file = config.embedded_key_file();
    let key = match std::fs::read_to_string(&key_file) {
        Ok(key) => zeroize::Zeroizing::new(key.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (key, _) =
                crate::repository::auth::new_api_key().map_err(|e| repository_error(&e))?;
            crate::durable::write(&key_file, format!("{}\n", key.as_str()).as_bytes(), 0o600)
                .map_err(|e| ServeError::Repository(format!("{}: {e}", key_file.display())))?;
            key
        }
        Err(e) => {
            return Err(ServeError::Repository(format!(
                "{}: {e}",
                key_file.display()
            )));
        }
    };
    let listener = listen::bind(
        config.repository.embedded_listen,
        "repository.embedded_listen",
        "the embedded repository",
    )
    .await?;
    let embedded = crate::repository::server::start_embedded(
        &config.spool.data_dir,
        listener,
        &crate::repository::auth::api_key_hash(&key),
        embedded_facility(&config.facility.code),
        stop.cancelled_owned(),
    )
    .await
    .map_err(|e| repository_error(&e))?;
    Ok(tokio::spawn(async move {
        match embedded.task.await {
            Ok(Err(e)) => error!("embedded repository stopped: {e}"),
            Err(e) => error!("embedded repository task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }))
}

/// The facility the embedded repository records as the creator of this daemon's documents:
/// `facility.code` when the repository can name it (1-32 of `A-Z a-z 0-9 _ -`), so a
/// receiver's issuer (e.g. its Patient ID prefix) is this facility; else `embedded`
/// (the name all its documents had before, which the embedded repository still gives to
/// this facility).
fn embedded_facility(code: &str) -> &str {
    if crate::facility::is_code(code) {
        code
    } else {
        crate::repository::server::FORMER_EMBEDDED_FACILITY
    }
}
