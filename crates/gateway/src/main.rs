//! `nixpool-gateway`: the pool's SSH front door. See docs/gateway.md.

use clap::Parser;

mod cli;
mod demand;
mod discover;
mod health;
mod keys;
mod peers;
mod route;
mod server;

fn main() -> std::process::ExitCode {
    cli::Cli::parse().run()
}
