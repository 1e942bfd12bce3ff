//! The `cloudpdi` command line: parses arguments and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cloudpdi::config::Config;
use cloudpdi::telemetry::Escaped;

/// Cloud-PDI gateway: hand studies to other hospitals by token instead of CD.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon (DICOM C-STORE SCP, batching, admin endpoint).
    Serve(ConfigArg),
    /// Show what the running daemon holds (batches, instance counts, state).
    Status(StatusArgs),
    /// Run a failed outbound job again from the step that failed, once its cause is fixed
    /// (after a change to the configuration or a key file, restart the daemon first).
    Retry(RetryArgs),
    /// Send DICOM files or folders (e.g. a PDI read from disc) into a PACS with C-STORE.
    Import(ImportArgs),
    /// Create, inspect or print HI-TOKENs.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Encrypt a file into a container that the token opens (for operators).
    Encrypt(CryptArgs),
    /// Decrypt a container with its token (for operators); nothing is written unless
    /// every chunk authenticates.
    Decrypt(CryptArgs),
    /// The Cloud-PDI repository: run it, make facility keys, upload and download.
    #[command(subcommand)]
    Repository(RepositoryCommand),
    /// Build or verify IHE PDI file sets (DICOMDIR + DICOM files + manifest).
    #[command(subcommand)]
    Pdi(PdiCommand),
    /// Send files or folders through a route's outbound pipeline: PDI, encryption,
    /// upload; prints where the token and the slip were written.
    Send(SendArgs),
    /// Receive a token: hand it to the running daemon (its watch folder), or with --out
    /// download, decrypt and write the PDI folder here, as if reading the disc.
    Receive(ReceiveArgs),
}

#[derive(Subcommand)]
enum RepositoryCommand {
    /// Run the repository HTTP service.
    Serve {
        /// Configuration file; every key can be overridden as CLOUDPDI_REPO_<SECTION>__<KEY>.
        #[arg(long, default_value = "conf/repository.toml")]
        config: PathBuf,
    },
    /// Make a facility API key: the key goes to the facility, the hash into the config.
    NewKey,
    /// Upload a container: creates the document from the token's expiry and proof, and
    /// writes the token again with the document ID the repository assigned.
    Upload {
        /// Repository base URL.
        #[arg(long)]
        url: String,
        /// File holding the facility API key (or set CLOUDPDI_REPOSITORY_API_KEY).
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        /// The token made for this upload, or @FILE.
        #[arg(long)]
        token: String,
        /// Downloads allowed.
        #[arg(long, default_value_t = 3)]
        max_downloads: u32,
        /// Where to write the issued token (must not exist).
        #[arg(long)]
        token_out: PathBuf,
        /// The container to upload.
        file: PathBuf,
    },
    /// Download a token's container (resumes a partial output file).
    Download {
        /// The token, or @FILE.
        #[arg(long)]
        token: String,
        /// Output file.
        out: PathBuf,
    },
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The route whose settings apply (expiry, downloads, AI-image policy, slip).
    #[arg(long)]
    route: String,
    /// Non-DICOM attachment (referral letter PDF, FHIR JSON, ...); repeatable.
    #[arg(long)]
    attach: Vec<PathBuf>,
    /// DICOM files or folders.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct ReceiveArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The token, or @FILE (preferred: arguments are visible in the process list).
    token: String,
    /// Write the PDI folder here instead of handing the token to the daemon.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File the study under this local Patient ID (the sender's is kept in Other
    /// Patient IDs Sequence).
    #[arg(long, conflicts_with = "out")]
    patient_id: Option<String>,
}

#[derive(Subcommand)]
enum PdiCommand {
    /// Build a file set from DICOM files or folders, as a folder or a ZIP (`--out X.zip`).
    Build(PdiBuildArgs),
    /// Check a file set (folder or ZIP) against its DICOMDIR and manifest; print a summary.
    Verify {
        /// The file set: a folder or a .zip file.
        path: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct PdiBuildArgs {
    /// DICOM files or folders (walked; non-DICOM files and DICOMDIRs are skipped).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output: a new folder, or a file ending in .zip.
    #[arg(long)]
    out: PathBuf,
    /// Non-DICOM file to carry in ATTACH/ (referral letter, FHIR JSON, lab results).
    #[arg(long)]
    attach: Vec<PathBuf>,
    /// Issuing facility, shown in README.TXT, INDEX.HTM and the manifest.
    #[arg(long, default_value = "")]
    facility: String,
    /// What happens to AI support images: include, exclude or label.
    #[arg(long, default_value = "label")]
    ai_action: String,
    /// A rule recognising AI support images, `key=value,...` with keys sop_class,
    /// image_type, manufacturer, series_description, private_tag (ggggeeee),
    /// private_creator, private_value; repeatable. Replaces the default rules.
    #[arg(long)]
    ai_rule: Vec<String>,
    /// With `label`: also prefix the Series Description of AI support images.
    #[arg(long)]
    ai_mark_series: bool,
    /// Leave out INDEX.HTM (README.TXT says the same in plain text).
    #[arg(long)]
    no_index_htm: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token with a fresh random secret and write it to a file (mode 0600).
    New {
        /// Repository base URL.
        #[arg(long)]
        repository: String,
        /// Document ID assigned by the repository.
        #[arg(long)]
        document_id: String,
        /// Issuing facility code.
        #[arg(long)]
        facility: String,
        /// Days until the token expires.
        #[arg(long, default_value_t = 30)]
        expires_in_days: u32,
        /// Description of the content, without patient data.
        #[arg(long, default_value = "")]
        summary: String,
        /// Where to write the token (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a token's fields, validity and time to expiry.
    Inspect {
        /// The token, or @FILE (preferred: arguments are visible in the process list).
        token: String,
        /// Also print the secret.
        #[arg(long)]
        show_secret: bool,
    },
    /// Render the printable slip for the patient (QR code, grouped text, expiry, issuing
    /// facility, instructions in Japanese and English); .png holds only the QR code.
    Slip(SlipArgs),
}

#[derive(Args)]
struct SlipArgs {
    /// The token, or @FILE (preferred: arguments are visible in the process list).
    token: String,
    /// Output file: .html, .pdf, .png or .svg (written with mode 0600: it holds the token).
    #[arg(long)]
    out: PathBuf,
    /// Facility name as patients know it (default: the token's issuer code).
    #[arg(long)]
    facility_name: Option<String>,
    /// How to reach the facility (phone, department).
    #[arg(long)]
    contact: Option<String>,
    /// Patient name, printed on the paper only (never in the QR code).
    #[arg(long)]
    patient_name: Option<String>,
    /// Description of the content (default: the token's summary).
    #[arg(long)]
    content: Option<String>,
}

#[derive(Args)]
struct CryptArgs {
    /// The token, or @FILE.
    #[arg(long)]
    token: String,
    /// Compress with zstd inside the encryption (encrypt only).
    #[arg(long)]
    zstd: bool,
    /// Input file.
    input: PathBuf,
    /// Output file (must not be the input).
    output: PathBuf,
}

#[derive(Args)]
struct ImportArgs {
    /// PACS address, host:port.
    #[arg(long)]
    pacs: String,
    /// The PACS's AE title.
    #[arg(long)]
    called: String,
    /// Our AE title, as the PACS knows it.
    #[arg(long, default_value = "CLOUDPDI")]
    calling: String,
    /// Associations used in parallel.
    #[arg(long, default_value_t = 4)]
    associations: usize,
    /// Attempts per instance when the PACS is unreachable or out of resources.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Replace the sender's Patient ID with this local one (the original is kept in
    /// Other Patient IDs Sequence).
    #[arg(long, conflicts_with = "patient_id_prefix")]
    patient_id: Option<String>,
    /// Prefix the sender's Patient ID with this text (e.g. the sending hospital's code).
    #[arg(long)]
    patient_id_prefix: Option<String>,
    /// Issuer of Patient ID written with a changed Patient ID (the local ID domain).
    #[arg(long, default_value = "LOCAL")]
    issuer: String,
    /// Files or folders (walked recursively; DICOMDIR and non-DICOM files are skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file; every key can be overridden as CLOUDPDI_<SECTION>__<KEY>.
    #[arg(long, default_value = "conf/cloudpdi.toml")]
    config: PathBuf,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Admin endpoint address (default: admin.listen from the configuration).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RetryArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Admin endpoint address (default: admin.listen from the configuration).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The job, as `cloudpdi status` lists it (e.g. B000042).
    job: String,
}

/// Errors are printed here rather than by the runtime so that text from outside in them
/// (a file name, a UID, a PACS's comment) is escaped.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", Escaped(&e.to_string()));
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {}", Escaped(&cause.to_string()));
            }
            ExitCode::FAILURE
        }
    }
}

/// A path named in output: escaped, as a file name may come from a disc or a ZIP.
fn shown(path: &std::path::Path) -> String {
    cloudpdi::telemetry::escape(&path.display().to_string())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Status(args) => status(&args),
        Command::Retry(args) => retry(&args),
        Command::Import(args) => import(args),
        Command::Token(command) => token(command),
        Command::Encrypt(args) => encrypt(&args),
        Command::Decrypt(args) => decrypt(&args),
        Command::Repository(command) => repository(command),
        Command::Pdi(command) => pdi(command),
        Command::Send(args) => send(args),
        Command::Receive(args) => receive(&args),
    }
}

fn repository(command: RepositoryCommand) -> anyhow::Result<()> {
    use cloudpdi::repository;
    match command {
        RepositoryCommand::Serve { config } => {
            let config = repository::config::RepositoryConfig::load(&config)?;
            cloudpdi::telemetry::init(&config.log);
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.server.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", config.server.listen))?;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                repository::server::run(config, listener, shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
        RepositoryCommand::NewKey => {
            let (key, hash) = repository::auth::new_api_key()?;
            println!(
                "API key (give it to the facility, shown once): {}",
                key.as_str()
            );
            println!("api_key_sha256 = \"{hash}\"");
            Ok(())
        }
        RepositoryCommand::Upload {
            url,
            api_key_file,
            token,
            max_downloads,
            token_out,
            file,
        } => {
            let api_key = match api_key_file {
                Some(path) => {
                    std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?
                }
                None => std::env::var("CLOUDPDI_REPOSITORY_API_KEY")
                    .context("give --api-key-file or set CLOUDPDI_REPOSITORY_API_KEY")?,
            };
            let token = cloudpdi::token::cli::read_token(&token)?;
            let id = runtime()?.block_on(repository::cli::upload(
                &url,
                api_key.trim().to_owned(),
                &token,
                max_downloads,
                &file,
                &token_out,
            ))?;
            println!(
                "document {id} uploaded; token written to {}",
                token_out.display()
            );
            Ok(())
        }
        RepositoryCommand::Download { token, out } => {
            let token = cloudpdi::token::cli::read_token(&token)?;
            let size = runtime()?.block_on(repository::cli::download(&token, &out))?;
            println!("{size} bytes written to {}", out.display());
            Ok(())
        }
    }
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    use cloudpdi::token::{Token, cli};
    match command {
        TokenCommand::New {
            repository,
            document_id,
            facility,
            expires_in_days,
            summary,
            out,
        } => {
            let expires = cloudpdi::clock::now_seconds() + u64::from(expires_in_days) * 86_400;
            let expires = u32::try_from(expires).context("expiry beyond 2106")?;
            let token = Token::issue(&repository, &document_id, expires, &facility, &summary)?;
            cli::write_token_file(&token, &out)?;
            println!("token written to {}", out.display());
        }
        TokenCommand::Inspect { token, show_secret } => {
            let token = cli::read_token(&token)?;
            print!(
                "{}",
                cli::describe(&token, cloudpdi::clock::now_seconds(), show_secret)
            );
        }
        TokenCommand::Slip(args) => slip(args)?,
    }
    Ok(())
}

fn slip(args: SlipArgs) -> anyhow::Result<()> {
    use cloudpdi::token::slip::{SlipDetails, SlipError, SlipFormat, render};
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    let format = SlipFormat::from_path(&args.out).ok_or(SlipError::Format)?;
    let details = SlipDetails {
        facility_name: args.facility_name.unwrap_or_else(|| token.issuer.clone()),
        facility_contact: args.contact,
        patient_name: args.patient_name,
        content: args.content.unwrap_or_else(|| token.summary.clone()),
    };
    render(&token, &details, format, &args.out)?;
    println!("slip written to {}", args.out.display());
    Ok(())
}

fn encrypt(args: &CryptArgs) -> anyhow::Result<()> {
    use cloudpdi::container::{Compression, Options};
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    token.check_not_expired(cloudpdi::clock::now_seconds())?;
    let options = Options {
        compression: if args.zstd {
            Compression::Zstd
        } else {
            Compression::None
        },
        ..Options::default()
    };
    let input = std::io::BufReader::new(
        std::fs::File::open(&args.input).with_context(|| format!("{}", args.input.display()))?,
    );
    cloudpdi::durable::create_new(&args.output, 0o666, |file| {
        let output = std::io::BufWriter::new(file);
        cloudpdi::container::encrypt_parallel(&token.container_key(), &options, input, output, 0)?
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.output.display()))?;
        Ok(())
    })
}

fn decrypt(args: &CryptArgs) -> anyhow::Result<()> {
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    cloudpdi::container::decrypt_file(&token.container_key(), &args.input, &args.output)?;
    Ok(())
}

fn pdi(command: PdiCommand) -> anyhow::Result<()> {
    use cloudpdi::pdi;
    match command {
        PdiCommand::Build(args) => {
            let mut policy = pdi::AiPolicy {
                action: serde_json::from_value(serde_json::Value::String(args.ai_action.clone()))
                    .map_err(|_| {
                    anyhow::anyhow!("--ai-action must be include, exclude or label")
                })?,
                mark_series_description: args.ai_mark_series,
                ..pdi::AiPolicy::default()
            };
            if !args.ai_rule.is_empty() {
                policy.rules = args
                    .ai_rule
                    .iter()
                    .map(|r| {
                        pdi::policy::parse_rule(r).map_err(|e| anyhow::anyhow!("--ai-rule {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            let options = pdi::BuildOptions {
                facility: args.facility,
                attachments: args.attach,
                policy,
                index_htm: !args.no_index_htm,
                ..pdi::BuildOptions::default()
            };
            let is_zip = args
                .out
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
            let report = if is_zip {
                cloudpdi::durable::create_new(&args.out, 0o666, |file| {
                    pdi::build_zip(&args.inputs, &options, std::io::BufWriter::new(file))
                        .map_err(anyhow::Error::from)
                })?
            } else {
                pdi::build_dir(&args.inputs, &options, &args.out)?
            };
            for skipped in &report.skipped {
                eprintln!("skipped (not DICOM): {}", shown(skipped));
            }
            for warning in &report.warnings {
                eprintln!("warning: {}", Escaped(warning));
            }
            println!(
                "{}: {} patients, {} studies, {} series, {} instances ({} labelled, {} excluded as AI support images, {} duplicates), {} attachments, {} bytes",
                args.out.display(),
                report.patients,
                report.studies,
                report.series,
                report.instances,
                report.labelled,
                report.excluded,
                report.duplicates,
                report.attachments,
                report.bytes
            );
        }
        PdiCommand::Verify { path, json } => {
            let summary = pdi::verify(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "{}: OK\npatients: {}\nstudies: {}\nseries: {}\ninstances: {}\nmodalities: {}\nsize: {} bytes in {} files\nmanifest: {}\nAI support images: {} labelled, {} left out",
                    path.display(),
                    summary.patients,
                    summary.studies,
                    summary.series,
                    summary.instances,
                    summary.modalities.join(", "),
                    summary.bytes,
                    summary.files,
                    if summary.manifest {
                        "present, every file matches"
                    } else {
                        "absent (not a cloudpdi set)"
                    },
                    summary.ai_labelled,
                    summary.ai_excluded,
                );
                for problem in &summary.problems {
                    println!("note: {}", Escaped(problem));
                }
            }
        }
    }
    Ok(())
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    use cloudpdi::dicom::scu::{Outcome, StoreTarget, collect, store_all};
    use cloudpdi::gateway::inbound::reconcile::{PatientIdPolicy, Reconciler};
    let (instances, skipped) = collect(&args.paths);
    for not_dicom in &skipped {
        eprintln!("skipped: {}", Escaped(&not_dicom.to_string()));
    }
    let total = instances.len();
    let target = StoreTarget {
        address: args.pacs,
        called_ae: args.called,
        calling_ae: args.calling,
        associations: args.associations,
        max_pdu_length: 131_072,
        timeout: std::time::Duration::from_secs(30),
        max_attempts: args.attempts,
        backoff: std::time::Duration::from_millis(500),
        reconcile: Some(Reconciler {
            policy: match (args.patient_id, args.patient_id_prefix) {
                (Some(id), _) => PatientIdPolicy::Local(id),
                (None, Some(prefix)) => PatientIdPolicy::Prefix(prefix),
                (None, None) => PatientIdPolicy::Keep,
            },
            local_issuer: args.issuer,
        }),
    };
    let results = runtime()?.block_on(store_all(std::sync::Arc::new(target), instances));
    let mut refused = 0;
    for (instance, outcome) in &results {
        if let Outcome::Refused { reason, .. } | Outcome::Unavailable { reason } = outcome {
            refused += 1;
            eprintln!("refused: {}: {}", shown(&instance.path), Escaped(reason));
        }
    }
    println!(
        "{} of {total} instances stored, {refused} refused, {} files skipped",
        total - refused,
        skipped.len()
    );
    anyhow::ensure!(refused == 0, "{refused} instances were not stored");
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: &ConfigArg) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    cloudpdi::telemetry::init(&config.log);
    runtime()?.block_on(cloudpdi::gateway::serve::run(config, shutdown_signal()))?;
    Ok(())
}

/// The admin endpoint: given, or from the configuration.
fn admin_addr(given: Option<SocketAddr>, config: &ConfigArg) -> anyhow::Result<SocketAddr> {
    Ok(match given {
        Some(addr) => addr,
        None => Config::load(&config.config)?.admin.listen,
    })
}

fn retry(args: &RetryArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.job.is_empty()
            && args
                .job
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        "{:?} is not a job ID: `cloudpdi status` lists them (e.g. B000042)",
        args.job
    );
    let addr = admin_addr(args.admin, &args.config)?;
    let (accepted, answer) =
        runtime()?.block_on(cloudpdi::admin::status::retry(addr, &args.job))?;
    anyhow::ensure!(accepted, "{}", answer.trim_end());
    println!("{}", Escaped(answer.trim_end()));
    Ok(())
}

fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let addr = admin_addr(args.admin, &args.config)?;
    let status = runtime()?.block_on(cloudpdi::admin::status::fetch(addr))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", cloudpdi::admin::status::render(&status));
    }
    Ok(())
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn send(args: SendArgs) -> anyhow::Result<()> {
    use cloudpdi::gateway::outbound::{Sender, send_files};
    let config = std::sync::Arc::new(Config::load(&args.config.config)?);
    anyhow::ensure!(
        config.routes.contains_key(&args.route),
        "route {:?} is not in {}: use one of {}",
        args.route,
        args.config.config.display(),
        config.routes.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    let sender = std::sync::Arc::new(Sender::from_config(config.clone()));
    let workdir = config
        .jobs_dir()
        .join("send")
        .join(std::process::id().to_string());
    let bar = progress_bar("uploading");
    let report = |bytes: u64| bar.set_position(bytes);
    let (_, job) = runtime()?.block_on(send_files(
        sender,
        &args.route,
        args.paths,
        args.attach,
        workdir,
        &report,
    ))?;
    bar.finish_and_clear();
    println!(
        "sent {} instances ({} left out by the AI-image policy) as document {}",
        job.instances,
        job.excluded,
        job.document_id.as_deref().unwrap_or("?")
    );
    if let Some(token) = &job.token_file {
        println!("token: {}", token.display());
    }
    if let Some(slip) = &job.slip_file {
        println!("slip:  {}", slip.display());
    }
    Ok(())
}

fn receive(args: &ReceiveArgs) -> anyhow::Result<()> {
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    token.check_not_expired(cloudpdi::clock::now_seconds())?;
    match &args.out {
        Some(out) => {
            let bar = progress_bar("downloading");
            let report = |bytes: u64| bar.set_position(bytes);
            // The [inbound] bounds apply when a configuration is there; else their defaults.
            let inbound = if args.config.config.exists() {
                Config::load(&args.config.config)?.inbound
            } else {
                cloudpdi::config::InboundConfig::default()
            };
            let summary = runtime()?.block_on(cloudpdi::gateway::inbound::receive_to_folder(
                &token, out, &inbound, &report,
            ))?;
            bar.finish_and_clear();
            println!(
                "{}: {} patient(s), {} study(ies), {} series, {} instances ({}), {:.1} MB",
                out.display(),
                summary.patients,
                summary.studies,
                summary.series,
                summary.instances,
                summary.modalities.join(", "),
                summary.bytes as f64 / 1e6
            );
        }
        None => {
            let config = Config::load(&args.config.config)?;
            let dir = config.watch_dir();
            let path = cloudpdi::gateway::inbound::watch::drop_token(
                &dir,
                &token,
                args.patient_id.as_deref(),
            )
            .with_context(|| format!("cannot write into the watch folder {}", dir.display()))?;
            println!(
                "handed to the daemon: {} (see `cloudpdi status`)",
                path.display()
            );
        }
    }
    Ok(())
}

fn progress_bar(what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bytes} ({bytes_per_sec}) {elapsed}")
            .expect("the template is valid"),
    );
    bar.set_message(what);
    bar
}
