//! Command line. Every setting is a flag with an environment variable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::layout::{Binaries, Layout, which};
use crate::plan::Options;
use crate::run::RunSettings;
use crate::supervise::Policy;

/// The nixpool builder agent: the builder image's PID 1. It prepares the container (FHS, users,
/// nix.conf, sshd), supervises nix-daemon and sshd, serves health and metrics, reloads
/// authorized keys live, drains on SIGTERM and pushes build results to caches.
#[derive(Parser, Debug)]
#[command(name = "nixpool-agent", version)]
pub struct Cli {
    /// Directory every path the agent reads or writes is relative to (a scratch root in tests).
    #[arg(long, env = "NIXPOOL_ROOT", default_value = "/", global = true)]
    pub root: PathBuf,
    /// Log format on stderr.
    #[arg(long, env = "NIXPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run as PID 1: prepare the root, supervise nix-daemon and sshd, drain on SIGTERM.
    Run(RunArgs),
    /// Validate the config and the mounted Secrets and print what `run` would do; exits non-zero
    /// with every problem found.
    Check(Common),
    /// The forced command of every builder key (sshd runs it): serves `nix-daemon --stdio`
    /// (passing only build and copy requests, and only harmless client settings) or runs
    /// `nix-store --serve [--write]` as asked in SSH_ORIGINAL_COMMAND; refuses anything else.
    Gate(GateArgs),
    /// The post-build hook (Nix runs it with OUT_PATHS and DRV_PATH): queues the paths for the
    /// cache pusher and returns at once; never fails a build.
    Enqueue(EnqueueArgs),
}

/// Where the programs are and how the image is set up.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// sshd binary (a name is looked up on PATH).
    #[arg(long, env = "NIXPOOL_SSHD", default_value = "sshd")]
    pub sshd: PathBuf,
    /// nix-daemon binary.
    #[arg(long, env = "NIXPOOL_NIX_DAEMON", default_value = "nix-daemon")]
    pub nix_daemon: PathBuf,
    /// nix-store binary (runs `nix-store --serve` for ssh:// clients).
    #[arg(long, env = "NIXPOOL_NIX_STORE", default_value = "nix-store")]
    pub nix_store: PathBuf,
    /// nix binary (runs `nix copy` for store-URI push targets).
    #[arg(long, env = "NIXPOOL_NIX", default_value = "nix")]
    pub nix: PathBuf,
    /// attic CLI (Attic push targets).
    #[arg(long, env = "NIXPOOL_ATTIC", default_value = "attic")]
    pub attic: PathBuf,
    /// cachix CLI (Cachix push targets).
    #[arg(long, env = "NIXPOOL_CACHIX", default_value = "cachix")]
    pub cachix: PathBuf,
    /// This agent's path as the forced command and post-build hook call it (default: the
    /// running executable).
    #[arg(long, env = "NIXPOOL_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
    /// nix.conf `sandbox`.
    #[arg(long, env = "NIXPOOL_SANDBOX", value_enum, default_value_t = Sandbox::True)]
    pub sandbox: Sandbox,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sandbox {
    True,
    False,
    Relaxed,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// Crashes of one child tolerated within --restart-window-seconds; one more and the agent
    /// exits 1 with the reason in /dev/termination-log.
    #[arg(long, env = "NIXPOOL_RESTART_LIMIT", default_value_t = 5)]
    pub restart_limit: u32,
    /// Window in which crashes are counted; a child that stays up longer starts afresh.
    #[arg(long, env = "NIXPOOL_RESTART_WINDOW_SECONDS", default_value_t = 300)]
    pub restart_window_seconds: u64,
    /// Restart backoff after the second crash in the window (the first is restarted at once);
    /// doubles per further crash up to --restart-max-backoff-ms.
    #[arg(long, env = "NIXPOOL_RESTART_BACKOFF_MS", default_value_t = 500)]
    pub restart_backoff_ms: u64,
    /// Longest restart backoff.
    #[arg(long, env = "NIXPOOL_RESTART_MAX_BACKOFF_MS", default_value_t = 30_000)]
    pub restart_max_backoff_ms: u64,
    /// How often the authorized-keys ConfigMap is re-read.
    #[arg(long, env = "NIXPOOL_KEY_RELOAD_INTERVAL_MS", default_value_t = 1000)]
    pub key_reload_interval_ms: u64,
    /// How long nix-daemon may take to answer on its socket at start.
    #[arg(long, env = "NIXPOOL_DAEMON_START_TIMEOUT_SECONDS", default_value_t = 60)]
    pub daemon_start_timeout_seconds: u64,
    /// Address of the health endpoint (its port is the config's healthPort).
    #[arg(long, env = "NIXPOOL_HEALTH_ADDRESS", default_value = "0.0.0.0")]
    pub health_address: String,
    /// After SIGTERM, sshd keeps accepting this long (at most half the drain budget) while
    /// readiness is already off: the Service's endpoints and kube-proxy drop a terminating pod
    /// a moment later, and a connection sent to it meanwhile would be refused, a lost build
    /// (Nix does not retry a refused builder). Sessions accepted then are drained like the rest.
    #[arg(long, env = "NIXPOOL_DRAIN_ACCEPT_MS", default_value_t = 5000)]
    pub drain_accept_ms: u64,
    /// `/readyz` answers 503, naming the cause, while the store's file system has fewer free
    /// bytes than this (builds would fail with "No space left on device").
    #[arg(long, env = "NIXPOOL_READY_MIN_FREE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub ready_min_free_bytes: u64,
    /// The pod's store volume. When set, `/nix` becomes the image's `/nix` under a writable
    /// overlay layer kept on this volume (nothing copied); where the volume cannot hold an
    /// overlay layer, the image's `/nix` is copied into it first. The operator sets it.
    #[arg(long, env = "NIXPOOL_STORE_VOLUME")]
    pub store_volume: Option<PathBuf>,
    /// How often the pusher looks at its queue.
    #[arg(long, env = "NIXPOOL_PUSH_POLL_MS", default_value_t = 1000)]
    pub push_poll_ms: u64,
    /// First retry backoff of a failed push; doubles up to --push-max-backoff-ms (each plus up to as much again at random).
    #[arg(long, env = "NIXPOOL_PUSH_BACKOFF_MS", default_value_t = 2000)]
    pub push_backoff_ms: u64,
    /// Longest retry backoff of a failing push, before its random part.
    #[arg(long, env = "NIXPOOL_PUSH_MAX_BACKOFF_MS", default_value_t = 300_000)]
    pub push_max_backoff_ms: u64,
    /// Attempts to push one path to one cache before giving up on it (counted in
    /// push_dropped_paths_total{reason="gave_up"}); 100 is about 12 hours at the default backoff.
    #[arg(long, env = "NIXPOOL_PUSH_MAX_ATTEMPTS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub push_max_attempts: u32,
    /// Most paths queued per cache; paths beyond it are dropped for that cache (counted in
    /// push_dropped_paths_total{reason="queue_full"}).
    #[arg(long, env = "NIXPOOL_PUSH_MAX_QUEUED_PATHS", default_value_t = 10_000)]
    pub push_max_queued_paths: usize,
}

#[derive(Args, Debug)]
pub struct EnqueueArgs {
    /// nix-store, to find the outputs of DRV_PATH when Nix leaves OUT_PATHS empty (Nix 2.8).
    #[arg(long, env = "NIXPOOL_NIX_STORE", default_value = "nix-store")]
    pub nix_store: PathBuf,
}

#[derive(Args, Debug)]
pub struct GateArgs {
    /// nix-daemon's socket, which serves `nix-daemon --stdio` (ssh-ng://) through the gate's
    /// request filter; the client's program path is never used.
    #[arg(long, default_value = "/nix/var/nix/daemon-socket/socket")]
    pub daemon_socket: PathBuf,
    /// nix-store run for `nix-store --serve [--write]` (ssh://).
    #[arg(long, default_value = "nix-store")]
    pub nix_store: PathBuf,
    /// Directory of the build-slot lock files, taken when the gateway sends NIXPOOL_GATE_SLOTS.
    #[arg(long, default_value = crate::layout::GATE_SLOTS_DIR)]
    pub slots_dir: PathBuf,
}

impl Common {
    /// The programs, looked up, and the nix.conf options.
    fn binaries_and_options(self) -> (Binaries, Options) {
        // Every field named, so a flag that is never used fails to compile.
        let Common {
            sshd,
            nix_daemon,
            nix_store,
            nix,
            attic,
            cachix,
            agent_binary,
            sandbox,
        } = self;
        let agent = agent_binary
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from(nixpool_api::paths::AGENT_BINARY));
        let binaries = Binaries {
            sshd: which(&sshd),
            nix_daemon: which(&nix_daemon),
            nix_store: which(&nix_store),
            nix: which(&nix),
            attic: which(&attic),
            cachix: which(&cachix),
            agent,
        };
        let sandbox = match sandbox {
            Sandbox::True => "true",
            Sandbox::False => "false",
            Sandbox::Relaxed => "relaxed",
        };
        let options = Options {
            sandbox: sandbox.into(),
        };
        (binaries, options)
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

impl Cli {
    pub fn run(self) -> ExitCode {
        // Every field named (here and in each command), so a flag that is never used fails to compile.
        let Cli {
            root,
            log_format,
            command,
        } = self;
        let layout = Layout::new(&root);
        match command {
            Command::Gate(GateArgs {
                daemon_socket,
                nix_store,
                slots_dir,
            }) => crate::gate::run(&daemon_socket, &nix_store, &slots_dir),
            Command::Enqueue(EnqueueArgs { nix_store }) => {
                let mut paths = std::env::var("OUT_PATHS").unwrap_or_default();
                if paths.trim().is_empty()
                    && let Ok(drv) = std::env::var("DRV_PATH")
                {
                    paths = crate::push::outputs_of(&layout.store(), &drv, &which(&nix_store)).join(" ");
                }
                if let Err(e) = crate::push::enqueue(&layout.push_queue(), &paths) {
                    eprintln!("nixpool-agent enqueue: cannot queue {paths:?} for push: {e}");
                }
                ExitCode::SUCCESS
            }
            Command::Check(common) => {
                let (binaries, options) = common.binaries_and_options();
                crate::check::print_plan(&layout, &binaries, &options)
            }
            Command::Run(RunArgs {
                common,
                restart_limit,
                restart_window_seconds,
                restart_backoff_ms,
                restart_max_backoff_ms,
                key_reload_interval_ms,
                daemon_start_timeout_seconds,
                health_address,
                drain_accept_ms,
                ready_min_free_bytes,
                store_volume,
                push_poll_ms,
                push_backoff_ms,
                push_max_backoff_ms,
                push_max_attempts,
                push_max_queued_paths,
            }) => {
                init_logs(log_format);
                let settings = RunSettings {
                    policy: Policy {
                        max_restarts: restart_limit,
                        window: Duration::from_secs(restart_window_seconds),
                        backoff: Duration::from_millis(restart_backoff_ms),
                        max_backoff: Duration::from_millis(restart_max_backoff_ms),
                    },
                    key_reload_interval: Duration::from_millis(key_reload_interval_ms),
                    daemon_start_timeout: Duration::from_secs(daemon_start_timeout_seconds),
                    health_address,
                    push: crate::push::Settings {
                        poll: Duration::from_millis(push_poll_ms),
                        base_backoff: Duration::from_millis(push_backoff_ms),
                        max_backoff: Duration::from_millis(push_max_backoff_ms),
                        max_attempts: push_max_attempts,
                        max_queued: push_max_queued_paths,
                    },
                    ready_min_free_bytes,
                    drain_accept: Duration::from_millis(drain_accept_ms),
                    store_volume,
                };
                let (binaries, options) = common.binaries_and_options();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let code = rt.block_on(crate::run::run(layout, binaries, options, settings));
                // Do not wait for blocking work still running (a store copy cut short by SIGTERM).
                rt.shutdown_timeout(Duration::from_millis(100));
                code
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_and_flag_has_help() {
        for sub in Cli::command().get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
            for arg in sub.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{} has no help",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
