//! nixpool-operator: reconciles NixBuilderPool resources into pools of Nix remote builders.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nixpool_operator::cli::Cli::parse().run().await
}
