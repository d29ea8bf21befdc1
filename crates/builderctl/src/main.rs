//! builderctl: puts a nixpool builder pool into your Nix and says what is wrong when builds do
//! not reach it. See docs/builderctl.md.

use std::process::ExitCode;

use builderctl::cli::{Cli, exit};
use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match Cli::parse().run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
