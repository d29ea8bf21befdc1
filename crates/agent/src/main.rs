//! `nixpool-agent`: the builder image's PID 1. See docs/agent.md.

use clap::Parser;

mod accounts;
mod check;
mod cli;
mod drain;
mod error;
mod fhs;
mod gate;
mod health;
mod layout;
mod nixconf;
mod plan;
mod procs;
#[cfg(test)]
mod props;
mod push;
mod run;
mod ssh;
mod store;
mod supervise;

fn main() -> std::process::ExitCode {
    cli::Cli::parse().run()
}
