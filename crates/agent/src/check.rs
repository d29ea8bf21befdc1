//! `check`: validate the config and the mounts and print what `run` would do.

use std::process::ExitCode;

use crate::layout::{Binaries, Layout};
use crate::plan::{self, Options};

/// Prints the plan `run` would carry out, or every problem that stops it (exit 1).
pub fn print_plan(layout: &Layout, bins: &Binaries, opts: &Options) -> ExitCode {
    let plan = match plan::build(layout, bins, opts) {
        Ok(p) => p,
        Err(problems) => {
            eprintln!(
                "nixpool-agent check: {} problem(s) under {}:",
                problems.len(),
                layout.root.display()
            );
            for p in problems {
                eprintln!("  - {p}");
            }
            return ExitCode::from(1);
        }
    };
    println!(
        "pool {}: builder user {:?}, max-jobs {}, ssh port {}, health port {}",
        plan.config.pool, plan.config.builder_user, plan.config.max_jobs, plan.config.ssh_port, plan.config.health_port
    );
    println!("host key: {}", plan.host_public_key);
    println!(
        "authorized keys: {} key(s), each with restrict,command=\"{}\"",
        plan.key_count, plan.forced_command
    );
    println!("found:");
    for n in &plan.notes {
        println!("  {n}");
    }
    println!("would create directories:");
    for d in &plan.dirs {
        println!(
            "  {} ({:o}, owner {}:{})",
            d.path.display(),
            d.mode,
            d.owner.0,
            d.owner.1
        );
    }
    println!("would write:");
    for f in &plan.files {
        println!(
            "  {} ({:o}{})",
            f.path.display(),
            f.mode,
            if f.secret { ", secret: content not shown" } else { "" }
        );
    }
    let conf = plan
        .files
        .iter()
        .find(|f| f.path == layout.nix_conf())
        .expect("nix.conf is planned");
    println!("nix.conf:");
    for l in String::from_utf8_lossy(&conf.content).lines() {
        println!("  {l}");
    }
    println!(
        "would start: {} (waiting for {}), then {} -D -e -f {} after `sshd -t`",
        bins.nix_daemon.display(),
        layout.daemon_socket().display(),
        bins.sshd.display(),
        layout.sshd_config().display()
    );
    if !plan.config.push.is_empty() {
        println!(
            "would push built paths to: {}",
            plan.config
                .push
                .iter()
                .map(crate::push::target_name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if plan.bad_keys.is_empty() && plan.key_count > 0 {
        println!("ok");
        return ExitCode::SUCCESS;
    }
    for b in &plan.bad_keys {
        eprintln!(
            "authorized keys line {}: {} (fix the authorized-keys ConfigMap)",
            b.line, b.reason
        );
    }
    if plan.key_count == 0 {
        eprintln!(
            "authorized keys: no usable key, so nobody can build here (add a public key to the authorized-keys ConfigMap)"
        );
    }
    ExitCode::from(1)
}
