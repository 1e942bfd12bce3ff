//! The `cloudpdi` command line: parses arguments and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cloudpdi::config::Config;

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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Status(args) => status(&args),
    }
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
    runtime()?.block_on(cloudpdi::serve::run(config, shutdown_signal()))?;
    Ok(())
}

fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let addr = match args.admin {
        Some(addr) => addr,
        None => Config::load(&args.config.config)?.admin.listen,
    };
    let status = runtime()?.block_on(cloudpdi::status::fetch(addr))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", cloudpdi::status::render(&status));
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
