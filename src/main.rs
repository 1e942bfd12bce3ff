//! The `cloudpdi` command line: parses arguments and hands over to the library (each
//! command's logic is in a `cli` module of the library: `token::cli`, `container::cli`,
//! `pdi::cli`, `repository::cli`, `gateway::cli`, `gateway::inbound::import`,
//! `admin::status`). Defaults of flags come from the configuration structs, so a flag
//! and the key it mirrors cannot disagree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cloudpdi::config::{InboundConfig, PacsTlsConfig, RouteConfig};
use cloudpdi::gateway::inbound::reconcile::PatientIdPolicy;
use cloudpdi::pdi::{AiAction, AiPolicy};
use cloudpdi::telemetry::Escaped;

/// `println!` for the commands' output: a reader that closes the pipe early (`| head`,
/// `| grep -q`) ends the printing, not the command with a panic; any other failure to
/// write standard output is an error.
macro_rules! say {
    ($($arg:tt)*) => { emit(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` for the commands' output, as [`say!`].
macro_rules! say_raw {
    ($($arg:tt)*) => { emit(format_args!($($arg)*)) };
}

/// Writes `text` to standard output; a closed pipe is ignored (the reader has what it
/// wanted), any other failure ends the process with a message.
fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}

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
    /// Release a batch held as possibly incomplete (instances refused, not resent) for
    /// sending as it is, when the PACS will not resend.
    Release(ReleaseArgs),
    /// Revoke the token of an outbound job (a slip lost, or issued for the wrong patient):
    /// the repository refuses every later download.
    Revoke(RevokeArgs),
    /// Extend the expiry of an outbound job's token: the token file and the slip are
    /// written again (same secret) with the new date; print the new slip.
    Extend(ExtendArgs),
    /// Send DICOM files or folders (e.g. a PDI read from disc) into a PACS with C-STORE.
    Import(ImportArgs),
    /// Create, inspect or print HI-TOKENs.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Encrypt a file into a container that the token opens (for operators).
    Encrypt(EncryptArgs),
    /// Decrypt a container with its token (for operators); nothing is written unless
    /// every chunk authenticates.
    Decrypt(DecryptArgs),
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
    /// This facility's key pair for sealed delivery: make it, or show its public key and
    /// fingerprint again.
    #[command(subcommand)]
    Facility(FacilityCommand),
    /// The reception web page's users (`[web]`): add one (or change their password), or
    /// remove one; the running daemon sees the change without a restart.
    #[command(subcommand)]
    Web(WebCommand),
}

#[derive(Subcommand)]
enum WebCommand {
    /// Add a user of the web page, or give an existing one a new password (asked twice
    /// without echo). Run it as the daemon's user, so that the daemon can read the file.
    AddUser {
        /// The user name (1-32 of a-z A-Z 0-9 . _ -).
        name: String,
        /// Read the password from the first line of standard input instead of asking.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a user of the web page; their open sessions end at their next request.
    RemoveUser {
        /// The user name.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum FacilityCommand {
    /// Make a new key pair: the private key goes to a new file (0600, never replaced); the
    /// public key and its fingerprint are printed.
    Keygen {
        /// The private key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key and the fingerprint of a private key file.
    Show {
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum RepositoryCommand {
    /// Run the repository HTTP service.
    Serve {
        /// Configuration file (default: conf/repository.toml if it exists, else
        /// /etc/cloudpdi/repository.toml); every key can be overridden as
        /// CLOUDPDI_REPO_<SECTION>__<KEY>.
        #[arg(long, env = "CLOUDPDI_REPO_CONFIG")]
        config: Option<PathBuf>,
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
        /// Downloads allowed (the default is a route's max_downloads default).
        #[arg(long, default_value_t = RouteConfig::default().max_downloads)]
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
    /// Show a document's state as the sending facility sees it: size, expiry,
    /// downloads, receipts from the receiver.
    Status(DocumentArgs),
    /// Revoke a document: its content is deleted and its token opens nothing any more
    /// (a slip handed to the wrong patient, a study sent by mistake).
    Revoke(DocumentArgs),
}

#[derive(Args)]
struct DocumentArgs {
    /// Repository base URL.
    #[arg(long)]
    url: String,
    /// File holding the facility API key (or set CLOUDPDI_REPOSITORY_API_KEY).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Print the state as JSON.
    #[arg(long)]
    json: bool,
    /// The document ID (in the token, and printed by `upload` and `send`).
    document_id: String,
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
    #[arg(long, default_value_t = AiPolicy::default().action)]
    ai_action: AiAction,
    /// A rule recognising AI support images, `key=value,...` with keys sop_class,
    /// image_type, manufacturer, series_description, private_tag (gggg,eeee or
    /// ggggeeee), private_creator, private_value; a value may hold commas
    /// (`private_tag=0029,1001,private_creator=ACME`); repeatable. Replaces the default
    /// rules.
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
    #[command(group = clap::ArgGroup::new("where").required(true))]
    New {
        /// Repository base URL (carried whole: a longer token).
        #[arg(long, group = "where")]
        repository: Option<String>,
        /// Community code of the repository (1-6 of A-Z 0-9, a `[repositories]` key of
        /// the receivers: a short token).
        #[arg(long, group = "where")]
        community: Option<String>,
        /// Document ID assigned by the repository (20 lower-case hex characters; any of
        /// that form, e.g. 20 zeros, for `cloudpdi repository upload` to replace).
        #[arg(long)]
        document_id: String,
        /// Days until the token expires (the default is a route's expires_in_days default).
        #[arg(long, default_value_t = RouteConfig::default().expires_in_days)]
        expires_in_days: u32,
        /// Where to write the token (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a token's fields, validity and time to expiry (local time); exits non-zero
    /// for an expired token. A community code is looked up in the configuration's
    /// [repositories].
    Inspect {
        #[command(flatten)]
        config: ConfigArg,
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
    /// Facility name as patients know it (the token does not carry it).
    #[arg(long)]
    facility_name: String,
    /// How to reach the facility (phone, department).
    #[arg(long)]
    contact: Option<String>,
    /// Patient name, printed on the paper only (never in the QR code).
    #[arg(long)]
    patient_name: Option<String>,
    /// Description of the content, without patient data (default: none).
    #[arg(long)]
    content: Option<String>,
}

#[derive(Args)]
struct EncryptArgs {
    /// The token, or @FILE.
    #[arg(long)]
    token: String,
    /// Compress with zstd inside the encryption.
    #[arg(long)]
    zstd: bool,
    /// Input file.
    input: PathBuf,
    /// Output file (must not exist).
    output: PathBuf,
}

#[derive(Args)]
struct DecryptArgs {
    /// The token, or @FILE.
    #[arg(long)]
    token: String,
    /// The container.
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
    /// Our AE title, as the PACS knows it (as inbound.calling_ae_title).
    #[arg(long, default_value_t = InboundConfig::default().calling_ae_title)]
    calling: String,
    /// Associations used in parallel (as inbound.associations).
    #[arg(long, default_value_t = InboundConfig::default().associations)]
    associations: usize,
    /// Attempts per instance when the PACS is unreachable or out of resources (as
    /// inbound.attempts).
    #[arg(long, default_value_t = InboundConfig::default().attempts)]
    attempts: u32,
    /// Replace the sender's Patient ID with this local one (the original is kept in
    /// Other Patient IDs Sequence).
    #[arg(long, conflicts_with = "patient_id_prefix")]
    patient_id: Option<String>,
    /// Prefix the sender's Patient ID with this text (e.g. the sending hospital's code).
    #[arg(long)]
    patient_id_prefix: Option<String>,
    /// Issuer of Patient ID written with a changed Patient ID (the local ID domain; as
    /// inbound.issuer).
    #[arg(long, default_value_t = InboundConfig::default().issuer)]
    issuer: String,
    /// DICOM TLS to the PACS: the CA certificates (PEM) that sign its certificate (as
    /// inbound.pacs_tls.ca); without it, plain DICOM.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Our client certificate (PEM), for a PACS that asks for one (as
    /// inbound.pacs_tls.certificate).
    #[arg(long, requires = "tls_ca", requires = "tls_key")]
    tls_certificate: Option<PathBuf>,
    /// The private key of --tls-certificate (as inbound.pacs_tls.key).
    #[arg(long, requires = "tls_certificate")]
    tls_key: Option<PathBuf>,
    /// Name the PACS's certificate must carry (as inbound.pacs_tls.server_name; default:
    /// the host of --pacs).
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// "when-refused": decode compressed pixel data the PACS accepts only uncompressed
    /// (JPEG, JPEG 2000, RLE); "never": refuse such instances (as inbound.transcode).
    #[arg(long, default_value_t = InboundConfig::default().transcode, value_parser = transcode_mode)]
    transcode: cloudpdi::config::Transcode,
    /// Files or folders (walked recursively; DICOMDIR and non-DICOM files are skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file (default: conf/cloudpdi.toml if it exists, else
    /// /etc/cloudpdi/cloudpdi.toml); every key can be overridden as
    /// CLOUDPDI_<SECTION>__<KEY>.
    #[arg(long, env = "CLOUDPDI_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(cloudpdi::config::default_path)
    }
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

#[derive(Args)]
struct ReleaseArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Admin endpoint address (default: admin.listen from the configuration).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The held batch, as `cloudpdi status` lists it (e.g. B000042).
    batch: String,
}

#[derive(Args)]
struct RevokeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Admin endpoint address (default: admin.listen from the configuration).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The job, as `cloudpdi status` lists it (e.g. B000042).
    job: String,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("expiry").required(true).args(["days", "until"])))]
struct ExtendArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Admin endpoint address (default: admin.listen from the configuration).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The job, as `cloudpdi status` lists it (e.g. B000042).
    job: String,
    /// The new expiry: this many days from now.
    #[arg(long)]
    days: Option<u32>,
    /// The new expiry: the end of this day (YYYY-MM-DD, in facility.time_zone).
    #[arg(long)]
    until: Option<String>,
}

/// Errors are printed here rather than by the runtime so that text from outside in them
/// (a file name, a UID, a PACS's comment) is escaped. Library messages are whole: each
/// names its subject and ends with its cause, so a cause is printed only when its text
/// is not already part of what was printed (no line says the same thing twice).
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut shown = e.to_string();
            eprintln!("error: {}", Escaped(&shown));
            for cause in e.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {}", Escaped(&text));
                    shown.push_str(&text);
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Status(args) => status(&args),
        Command::Retry(args) => retry(&args),
        Command::Release(args) => release(&args),
        Command::Revoke(args) => revoke(&args),
        Command::Extend(args) => extend(&args),
        Command::Import(args) => import(args),
        Command::Token(command) => token(command),
        Command::Encrypt(args) => encrypt(&args),
        Command::Decrypt(args) => decrypt(&args),
        Command::Repository(command) => repository(command),
        Command::Pdi(command) => pdi(command),
        Command::Send(args) => send(args),
        Command::Receive(args) => receive(&args),
        Command::Facility(command) => facility(command),
        Command::Web(command) => web(command),
    }
}

fn web(command: WebCommand) -> anyhow::Result<()> {
    use cloudpdi::web::cli::{self, PasswordFrom};
    let text = match command {
        WebCommand::AddUser {
            name,
            password_stdin,
            config,
        } => {
            let config = cloudpdi::config::Config::load(&config.path())?;
            let from = match password_stdin {
                true => PasswordFrom::Stdin,
                false => PasswordFrom::Prompt,
            };
            cli::add_user(&config, &name, from)?
        }
        WebCommand::RemoveUser { name, config } => {
            let config = cloudpdi::config::Config::load(&config.path())?;
            cli::remove_user(&config, &name)?
        }
    };
    say!("{text}");
    Ok(())
}

fn facility(command: FacilityCommand) -> anyhow::Result<()> {
    use cloudpdi::facility::cli;
    let text = match command {
        FacilityCommand::Keygen { out } => cli::keygen(&out)?,
        FacilityCommand::Show { key } => cli::show(&key)?,
    };
    say_raw!("{text}");
    Ok(())
}

fn serve(args: &ConfigArg) -> anyhow::Result<()> {
    let config = cloudpdi::config::Config::load_to_serve(&args.path())?;
    cloudpdi::telemetry::init(&config.log);
    runtime()?.block_on(async {
        anyhow::Ok(cloudpdi::gateway::serve::run(config, shutdown_signal()?).await?)
    })?;
    Ok(())
}

fn status(args: &StatusArgs) -> anyhow::Result<()> {
    use cloudpdi::admin::status;
    let addr = status::admin_address(args.admin, &args.config.path())?;
    let answer = runtime()?.block_on(status::fetch(addr))?;
    if args.json {
        say!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        say_raw!("{}", status::render(&answer));
    }
    Ok(())
}

fn retry(args: &RetryArgs) -> anyhow::Result<()> {
    let config = args.config.path();
    let retry = cloudpdi::admin::status::retry(args.admin, &config, &args.job);
    say!("{}", runtime()?.block_on(retry)?);
    Ok(())
}

fn release(args: &ReleaseArgs) -> anyhow::Result<()> {
    let config = args.config.path();
    let release = cloudpdi::admin::status::release(args.admin, &config, &args.batch);
    say!("{}", runtime()?.block_on(release)?);
    Ok(())
}

fn revoke(args: &RevokeArgs) -> anyhow::Result<()> {
    let config = args.config.path();
    let revoke = cloudpdi::admin::status::revoke(args.admin, &config, &args.job);
    say!("{}", runtime()?.block_on(revoke)?);
    Ok(())
}

fn extend(args: &ExtendArgs) -> anyhow::Result<()> {
    use cloudpdi::admin::status::NewExpiry;
    let expiry = match (&args.days, &args.until) {
        (Some(days), _) => NewExpiry::Days(*days),
        (None, Some(date)) => NewExpiry::Until(date.clone()),
        (None, None) => anyhow::bail!("give the new expiry: --days N or --until YYYY-MM-DD"),
    };
    let config = args.config.path();
    let extend = cloudpdi::admin::status::extend(args.admin, &config, &args.job, &expiry);
    say!("{}", runtime()?.block_on(extend)?);
    Ok(())
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    use cloudpdi::gateway::inbound::import;
    let inbound = InboundConfig {
        pacs: args.pacs,
        pacs_ae_title: args.called,
        calling_ae_title: args.calling,
        associations: args.associations,
        attempts: args.attempts,
        issuer: args.issuer,
        pacs_tls: args.tls_ca.map(|ca| PacsTlsConfig {
            ca,
            certificate: args.tls_certificate,
            key: args.tls_key,
            server_name: args.tls_server_name,
        }),
        transcode: args.transcode,
        ..InboundConfig::default()
    };
    let policy = match (args.patient_id, args.patient_id_prefix) {
        (Some(id), _) => PatientIdPolicy::Local(id),
        (None, Some(prefix)) => PatientIdPolicy::Prefix(prefix),
        (None, None) => PatientIdPolicy::Keep,
    };
    let report = runtime()?.block_on(import::import(&inbound, policy, &args.paths))?;
    for note in &report.notes {
        eprintln!("{note}");
    }
    say!("{}", report.summary());
    Ok(report.check()?)
}

/// `--transcode`, by the names `inbound.transcode` takes in the configuration file.
fn transcode_mode(name: &str) -> Result<cloudpdi::config::Transcode, String> {
    use serde::Deserialize;
    use serde::de::value::{Error, StrDeserializer};
    cloudpdi::config::Transcode::deserialize(StrDeserializer::<Error>::new(name))
        .map_err(|_| format!("{name:?}: use \"never\" or \"when-refused\""))
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    use cloudpdi::token::cli;
    match command {
        TokenCommand::New {
            repository,
            community,
            document_id,
            expires_in_days,
            out,
        } => {
            use cloudpdi::token::RepositoryRef;
            let repository = match (repository, community) {
                (Some(url), _) => RepositoryRef::Url(url),
                (None, code) => RepositoryRef::Community(code.unwrap_or_default()),
            };
            let token = cli::issue(repository, &document_id, expires_in_days)?;
            cli::write_token_file(&token, &out)?;
            say!("token written to {}", shown(&out));
        }
        TokenCommand::Inspect {
            config,
            token,
            show_secret,
        } => {
            let token = cli::read_token(&token)?;
            // Only to name a community's repository: without a readable configuration
            // the token is still shown.
            let known = cloudpdi::config::Config::load(&config.path())
                .ok()
                .and_then(|c| c.repository_url(&token.repository).ok());
            let known = known.filter(|_| {
                matches!(
                    token.repository,
                    cloudpdi::token::RepositoryRef::Community(_)
                )
            });
            say_raw!(
                "{}",
                cli::describe_now(&token, known.as_deref(), show_secret)
            );
            cli::check_valid_now(&token)?;
        }
        TokenCommand::Slip(args) => {
            let token = cli::read_token(&args.token)?;
            let text = cli::SlipText {
                facility_name: args.facility_name,
                contact: args.contact,
                patient_name: args.patient_name,
                content: args.content,
            };
            cli::write_slip(&token, text, &args.out)?;
            say!("slip written to {}", shown(&args.out));
        }
    }
    Ok(())
}

fn encrypt(args: &EncryptArgs) -> anyhow::Result<()> {
    use cloudpdi::container::Compression;
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    let compression = if args.zstd {
        Compression::Zstd
    } else {
        Compression::None
    };
    cloudpdi::container::cli::encrypt_file(&token, compression, &args.input, &args.output)?;
    Ok(())
}

fn decrypt(args: &DecryptArgs) -> anyhow::Result<()> {
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    cloudpdi::container::cli::decrypt_file(&token, &args.input, &args.output)?;
    Ok(())
}

fn repository(command: RepositoryCommand) -> anyhow::Result<()> {
    use cloudpdi::repository::{cli, config::RepositoryConfig};
    match command {
        RepositoryCommand::Serve { config } => {
            let path = config.unwrap_or_else(cloudpdi::repository::config::default_path);
            let config = RepositoryConfig::load(&path)?;
            cloudpdi::telemetry::init(&config.log);
            runtime()?
                .block_on(async { anyhow::Ok(cli::serve(config, shutdown_signal()?).await?) })?;
        }
        RepositoryCommand::NewKey => {
            let (key, hash) = cloudpdi::repository::auth::new_api_key()?;
            say!(
                "API key (give it to the facility, shown once): {}",
                key.as_str()
            );
            say!("api_key_sha256 = \"{hash}\"");
        }
        RepositoryCommand::Upload {
            url,
            api_key_file,
            token,
            max_downloads,
            token_out,
            file,
        } => {
            let api_key = cli::api_key(api_key_file.as_deref())?;
            let token = cloudpdi::token::cli::read_token(&token)?;
            let upload = cli::upload(&url, api_key, &token, max_downloads, &file, &token_out);
            let id = runtime()?.block_on(upload)?;
            say!(
                "document {id} uploaded; token written to {}",
                shown(&token_out)
            );
        }
        RepositoryCommand::Download { token, out } => {
            let token = cloudpdi::token::cli::read_token(&token)?;
            let size = runtime()?.block_on(cli::download(&token, &out))?;
            say!("{size} bytes written to {}", shown(&out));
        }
        RepositoryCommand::Status(args) => {
            let api_key = cli::api_key(args.api_key_file.as_deref())?;
            let state = runtime()?.block_on(cli::status(&args.url, api_key, &args.document_id))?;
            print_document(&state, args.json)?;
        }
        RepositoryCommand::Revoke(args) => {
            let api_key = cli::api_key(args.api_key_file.as_deref())?;
            let state = runtime()?.block_on(cli::revoke(&args.url, api_key, &args.document_id))?;
            print_document(&state, args.json)?;
        }
    }
    Ok(())
}

fn print_document(
    state: &cloudpdi::repository::api::DocumentStatus,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        say!("{}", serde_json::to_string_pretty(state)?);
    } else {
        say_raw!("{}", cloudpdi::repository::cli::describe_status(state));
    }
    Ok(())
}

fn pdi(command: PdiCommand) -> anyhow::Result<()> {
    use cloudpdi::pdi::{self, cli};
    match command {
        PdiCommand::Build(args) => {
            let options = pdi::BuildOptions {
                facility: args.facility,
                attachments: args.attach,
                policy: cli::ai_policy(args.ai_action, args.ai_mark_series, &args.ai_rule)?,
                index_htm: !args.no_index_htm,
                ..pdi::BuildOptions::default()
            };
            let report = cli::build(&args.inputs, &options, &args.out)?;
            let (notes, summary) = cli::describe_build(&args.out, &report);
            for note in notes {
                eprintln!("{note}");
            }
            say!("{summary}");
        }
        PdiCommand::Verify { path, json } => {
            let summary = pdi::verify(&path)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                say_raw!("{}", cli::describe_summary(&path, &summary));
            }
        }
    }
    Ok(())
}

fn send(args: SendArgs) -> anyhow::Result<()> {
    let config = args.config.path();
    let bar = progress_bar("uploading");
    let report = |bytes: u64| bar.set_position(bytes);
    let send = cloudpdi::gateway::cli::send(&config, &args.route, args.paths, args.attach, &report);
    let lines = runtime()?.block_on(send)?;
    bar.finish_and_clear();
    for line in lines {
        say!("{line}");
    }
    Ok(())
}

fn receive(args: &ReceiveArgs) -> anyhow::Result<()> {
    use cloudpdi::gateway::cli;
    let token = cloudpdi::token::cli::read_token(&args.token)?;
    let config = args.config.path();
    let line = match &args.out {
        Some(out) => {
            let bar = progress_bar("downloading");
            let report = |bytes: u64| bar.set_position(bytes);
            let receive = cli::receive_to_folder(&config, &token, out, &report);
            let line = runtime()?.block_on(receive)?;
            bar.finish_and_clear();
            line
        }
        None => {
            let hand = cli::hand_to_daemon(&config, &token, args.patient_id.as_deref());
            runtime()?.block_on(hand)?
        }
    };
    say!("{line}");
    Ok(())
}

/// A path named in output: escaped, as a file name may come from a disc or a ZIP.
fn shown(path: &std::path::Path) -> String {
    cloudpdi::telemetry::escape(&path.display().to_string())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C). Both are caught from the
/// call on, so a stop that arrives while the server is still starting (opening its
/// index, checking its registration at the repository) ends in a clean shutdown once it
/// is up, instead of killing it with the signal's default action.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
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
