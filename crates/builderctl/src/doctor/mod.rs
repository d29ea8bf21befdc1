//! `builderctl doctor`: every known way remote builds fail, checked in the order a build meets
//! them, each with what was found and the fix. SSH and Nix checks run the real `ssh` and `nix`
//! the way the Nix daemon does: as root, with the machines line's key and pinned host key.
//!
//! This file holds the order of the checks; each concern has its file: `report` (what a check
//! says), `nixconf`, `machines`, `keys`, `network`, `ssh`, `remote_nix` (Nix through the line),
//! `daemon`, and `process` (running a command within the time left). The store URI is
//! `nixpool_api::machines::StoreUri`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod daemon;
mod keys;
mod machines;
mod network;
mod nixconf;
mod process;
mod remote_nix;
mod report;
mod ssh;

pub use self::daemon::parse_etime;
pub use self::nixconf::{NixConf, builders_reach, from_nix, parse_settings};
pub use self::report::{Check, CheckId, Status, passed, report, report_line, summary};
use crate::nixsetup::NixSetup;
pub use crate::nixsetup::Os;
use nixpool_api::MachinesEntry;
use nixpool_api::machines::StoreUri;

/// What doctor looks at.
#[derive(Clone, Debug)]
pub struct Options {
    /// A pool (`name` or `ns/name`); `None`: every nixpool block, or every line if there is none.
    pub pool: Option<String>,
    pub machines_file: PathBuf,
    pub nix_conf: PathBuf,
    /// Which Nix (upstream or Determinate), where its settings go, how to restart its daemon.
    pub setup: NixSetup,
    /// The host key the pool publishes (from `--from` or the cluster), to compare with the pin.
    pub expected_host_key: Option<String>,
    pub connect_timeout: Duration,
    /// For all checks together; a check still running then is killed and reported as timed out.
    pub timeout: Duration,
    /// Checks not to run.
    pub skip: Vec<CheckId>,
    pub ssh: String,
    pub ssh_keyscan: String,
    /// launchctl (macOS: which daemon job launchd has).
    pub launchctl: String,
    pub nix: String,
    pub nix_build: String,
    /// Set by [`run`]: when `timeout` runs out.
    pub deadline: Option<Instant>,
}

impl Options {
    /// Time left before the overall timeout.
    fn remaining(&self) -> Duration {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(self.timeout)
    }

    /// `--connect-timeout` in whole seconds as ssh and Nix take it (0 would mean no limit).
    fn connect_timeout_secs(&self) -> String {
        self.connect_timeout.as_secs().max(1).to_string()
    }

    /// `id` did not finish (`what` was still running) before the overall timeout.
    fn timed_out(&self, id: CheckId, subject: Option<&str>, what: &str) -> Check {
        Check::timed_out(
            id,
            subject,
            format!("{what}: doctor's --timeout of {}s ran out", self.timeout.as_secs()),
        )
        .with_fix(format!(
            "something on the way does not answer; run doctor with a longer --timeout, or --skip {id} to see the checks after it"
        ))
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs every check in order, handing each result to `seen` as soon as it is known (so a
/// person sees progress), and returns them all. The whole run takes at most `opts.timeout`: a
/// command still running then is killed and its check reported as [`Status::Timeout`]; checks
/// not started by then are reported so too.
pub fn run(opts: &Options, seen: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let opts = &Options {
        deadline: Some(Instant::now() + opts.timeout),
        ..opts.clone()
    };
    let mut out = Vec::new();
    let mut emit = |c: Check| {
        if !opts.skip.contains(&c.id) {
            seen(&c);
            out.push(c);
        }
    };
    let conf = NixConf::load(&opts.nix_conf, opts);
    emit(nixconf::check_builders(opts, &conf));
    let (file_check, machines) = machines::check_machines_file(opts);
    let file_ok = file_check.status != Status::Fail;
    emit(file_check);
    if file_ok {
        for m in &machines {
            check_machine(opts, &m.subject, &m.entry, &m.line, &mut emit);
        }
    }
    emit(nixconf::check_substitutes(opts, &conf));
    emit(if opts.remaining().is_zero() {
        opts.timed_out(CheckId::Daemon, None, "not run")
    } else {
        daemon::check_daemon(opts, &conf)
    });
    out
}

/// The checks of one machines line, each after the one it needs: keys, then TCP, then ssh,
/// then Nix through it.
fn check_machine(opts: &Options, subject: &str, entry: &MachinesEntry, line: &str, emit: &mut dyn FnMut(Check)) {
    let subject = Some(subject);
    let Ok(uri) = entry.uri.parse::<StoreUri>() else {
        emit(
            Check::fail(
                CheckId::Tcp,
                subject,
                format!("cannot read host and port from {}", entry.uri),
            )
            .with_fix("write the line again with builderctl machines-file"),
        );
        return;
    };
    let key = keys::check_key(entry.ssh_key.as_deref(), subject);
    let key_ok = key.status != Status::Fail;
    emit(key);
    emit(keys::check_host_key(opts, entry, subject));

    let later = [CheckId::SshAuth, CheckId::StorePing, CheckId::TrustedUser];
    let out_of_time = |id: CheckId| opts.timed_out(id, subject, "not run");
    if opts.remaining().is_zero() {
        for id in [CheckId::Tcp].into_iter().chain(later) {
            emit(out_of_time(id));
        }
        return;
    }
    // Where ssh really connects (ssh_config Host blocks apply, as for the daemon).
    let (host, port) = network::resolve(opts, &uri);
    let tcp = if opts.skip.contains(&CheckId::Tcp) {
        None
    } else {
        Some(network::check_tcp(opts, &host, port, subject))
    };
    let tcp_status = tcp.as_ref().map(|c| c.status);
    if let Some(c) = tcp {
        emit(c);
    }
    match tcp_status {
        None | Some(Status::Pass) => {}
        Some(Status::Timeout) => {
            for id in later {
                emit(out_of_time(id));
            }
            return;
        }
        Some(_) => {
            for id in later {
                emit(Check::skip(id, subject, "not tried: the builder cannot be reached"));
            }
            return;
        }
    }
    let auth = ssh::check_ssh_auth(opts, entry, &uri, subject, key_ok);
    let auth_status = auth.status;
    emit(auth);
    if matches!(auth_status, Status::Fail | Status::Timeout) {
        for id in later[1..].iter().copied() {
            emit(if auth_status == Status::Timeout {
                out_of_time(id)
            } else {
                Check::skip(id, subject, "not tried: SSH login failed")
            });
        }
        return;
    }
    emit(remote_nix::check_store_ping(opts, entry, &uri, subject));
    emit(remote_nix::check_trusted(opts, entry, line, subject));
}
