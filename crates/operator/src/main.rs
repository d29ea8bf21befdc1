//! nixpool-operator: reconciles NixBuilderPool resources into pools of Nix remote builders.

use clap::Parser;

mod cli;
mod context;
mod error;
mod hostkey;
mod http;
mod keys;
mod leader;
mod metrics;
mod reconcile;
mod reference;
mod render;
mod telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::Cli::parse().run().await
}
