//! The `cloudpdi` command line: parses arguments and hands over to the library.

use clap::{Parser, Subcommand};

/// Cloud-PDI gateway: hand studies to other hospitals by token instead of CD.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
