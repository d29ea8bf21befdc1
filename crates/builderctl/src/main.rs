//! builderctl: the client CLI of nixpool (being built).

use clap::Parser;

/// Puts a nixpool builder pool into your Nix (/etc/nix/machines) and says what is wrong when builds do not reach it.
#[derive(Parser, Debug)]
#[command(name = "builderctl", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    Ok(())
}
