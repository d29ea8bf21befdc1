//! `builderctl doctor`: every known way remote builds fail, checked in the order a build meets
//! them, each with what was found and the fix. SSH and Nix checks run the real `ssh` and `nix`
//! the way the Nix daemon does: as root, with the machines line's key and pinned host key.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use nixpool_api::MachinesEntry;
use serde::Serialize;

use crate::merge;
pub use crate::nixsetup::Os;
use crate::nixsetup::{Flavor, NixSetup};

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
    /// The check did not finish before doctor's `--timeout` ran out (counts as a failure).
    Timeout,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
            Status::Timeout => "TIME",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Stable id, for `--skip` and tools: `builders`, `machines-file`, `key`, `host-key`, `tcp`,
    /// `ssh-auth`, `store-ping`, `trusted-user`, `builders-use-substitutes`, `daemon`.
    pub id: &'static str,
    /// The pool (block id) or machine the check is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

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
    /// Check ids not to run.
    pub skip: Vec<String>,
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

    fn timed_out(&self, id: &'static str, t: Option<&str>, what: &str) -> Check {
        check(
            id,
            t,
            Status::Timeout,
            format!("{what}: doctor's --timeout of {}s ran out", self.timeout.as_secs()),
            Some(format!(
                "something on the way does not answer; run doctor with a longer --timeout, or --skip {id} to see the checks after it"
            )),
        )
    }
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
        if !opts.skip.iter().any(|s| s == c.id) {
            seen(&c);
            out.push(c);
        }
    };
    let conf = NixConf::load(&opts.nix_conf, opts);
    emit(check_builders(opts, &conf));
    let (file_check, entries) = check_machines_file(opts);
    let file_ok = file_check.status != Status::Fail;
    emit(file_check);
    if file_ok {
        for (target, entry, line) in &entries {
            check_entry(opts, target, entry, line, &mut emit);
        }
    }
    emit(check_substitutes(opts, &conf));
    emit(if opts.remaining().is_zero() {
        opts.timed_out("daemon", None, "not run")
    } else {
        check_daemon(opts, &conf)
    });
    out
}

/// Exit status: failure when any check failed or timed out.
pub fn passed(checks: &[Check]) -> bool {
    checks
        .iter()
        .all(|c| !matches!(c.status, Status::Fail | Status::Timeout))
}

/// One check as the human report prints it.
pub fn report_line(c: &Check) -> String {
    let mut s = String::new();
    let what = match &c.target {
        Some(t) => format!("{} ({t})", c.id),
        None => c.id.to_string(),
    };
    s.push_str(&format!("{}  {what}: {}\n", c.status.label(), c.found));
    if let Some(fix) = &c.fix {
        for (i, l) in fix.lines().enumerate() {
            s.push_str(if i == 0 { "      fix: " } else { "           " });
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// The last line of the human report.
pub fn summary(checks: &[Check]) -> String {
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let timeouts = checks.iter().filter(|c| c.status == Status::Timeout).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    let timed = if timeouts > 0 {
        format!(", {timeouts} timed out")
    } else {
        String::new()
    };
    format!(
        "\n{} checks: {} failed{timed}, {} warnings\n",
        checks.len(),
        fails,
        warns
    )
}

/// The human report, all at once.
pub fn report(checks: &[Check]) -> String {
    let mut s: String = checks.iter().map(report_line).collect();
    s.push_str(&summary(checks));
    s
}

/// Why a command gave no output.
enum RunError {
    Spawn(std::io::Error),
    TimedOut,
}

/// Runs `cmd` (stdin from /dev/null unless set) and collects its output, killing it (and what
/// it started: it runs in a process group of its own) when doctor's time runs out.
fn output_within(cmd: &mut Command, opts: &Options) -> Result<std::process::Output, RunError> {
    use std::os::unix::process::CommandExt;
    let deadline = Instant::now() + opts.remaining();
    let stdout = tempfile::tempfile().map_err(RunError::Spawn)?;
    let stderr = tempfile::tempfile().map_err(RunError::Spawn)?;
    let (mut out_r, mut err_r) = (
        stdout.try_clone().map_err(RunError::Spawn)?,
        stderr.try_clone().map_err(RunError::Spawn)?,
    );
    cmd.stdout(stdout).stderr(stderr).process_group(0);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::TimedOut);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(RunError::Spawn(e)),
        }
    };
    let read = |f: &mut std::fs::File| {
        use std::io::Seek;
        let mut v = Vec::new();
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.read_to_end(&mut v);
        v
    };
    Ok(std::process::Output {
        status,
        stdout: read(&mut out_r),
        stderr: read(&mut err_r),
    })
}

fn check(id: &'static str, target: Option<&str>, status: Status, found: String, fix: Option<String>) -> Check {
    Check {
        id,
        target: target.map(str::to_string),
        status,
        found,
        fix,
    }
}

// ---------------------------------------------------------------------------------------------
// nix.conf

/// Nix's settings as the daemon reads them from nix.conf: from Nix itself (`nix config show`,
/// Nix 2.19 and later, or `nix show-config` before), else from the files (includes followed,
/// last one wins, `extra-` appends).
#[derive(Default, Debug)]
pub struct NixConf {
    pub path: PathBuf,
    pub exists: bool,
    /// The effective settings: from Nix when it answered, else from the files.
    pub settings: Vec<(String, String)>,
    /// The settings the files set (to tell "not set" from Nix's default).
    pub file_settings: Vec<(String, String)>,
    /// nix.conf and the files it includes that exist (their change times matter to the daemon).
    pub files: Vec<PathBuf>,
    /// Where `settings` came from: `nix config show`, `nix show-config` or `the files`.
    pub source: &'static str,
}

impl NixConf {
    /// From the files only.
    pub fn from_files(path: &Path) -> Self {
        Self::from_files_but(path, None)
    }

    /// From the files only, leaving out the lines of builderctl's own block `block_id` (what
    /// the user set, to decide what builderctl's block has to add).
    pub fn from_files_but(path: &Path, block_id: Option<&str>) -> Self {
        let mut conf = NixConf {
            path: path.into(),
            source: "the files",
            ..Default::default()
        };
        conf.exists = conf.read(path, 0, block_id);
        conf.settings = conf.file_settings.clone();
        conf
    }

    /// From Nix (`nix` is the command) when it answers within doctor's time, else the files.
    fn load(path: &Path, opts: &Options) -> Self {
        let mut conf = Self::from_files(path);
        if conf.exists
            && let Some((settings, source)) = from_nix(&opts.nix, path, opts)
        {
            conf.settings = settings;
            conf.source = source;
        }
        conf
    }

    fn read(&mut self, path: &Path, depth: usize, block_id: Option<&str>) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        self.files.push(path.to_path_buf());
        let mut in_block = false;
        for line in text.lines() {
            if let Some(id) = block_id {
                let marker = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|rest| rest.split_whitespace().next())
                        == Some(id)
                };
                if marker(merge::BEGIN) {
                    in_block = true;
                } else if marker(merge::END) {
                    in_block = false;
                    continue;
                }
                if in_block {
                    continue;
                }
            }
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(inc) = line.strip_prefix("include ").or_else(|| line.strip_prefix("!include ")) {
                let p = path.parent().unwrap_or(Path::new("/")).join(inc.trim());
                if depth < 8 {
                    self.read(&p, depth + 1, block_id);
                }
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                self.file_settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        true
    }

    /// The value of a setting with its `extra-` additions; `None` when never set.
    pub fn get(&self, name: &str) -> Option<String> {
        lookup(&self.settings, name)
    }

    /// Whether the files set `name` (or `extra-name`) at all.
    pub fn set_in_files(&self, name: &str) -> bool {
        lookup(&self.file_settings, name).is_some()
    }

    /// When the newest of the files changed.
    pub fn modified(&self) -> Option<SystemTime> {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .max()
    }
}

fn lookup(settings: &[(String, String)], name: &str) -> Option<String> {
    let extra = format!("extra-{name}");
    let mut value: Option<String> = None;
    for (k, v) in settings {
        if k == name {
            value = Some(v.clone());
        } else if *k == extra {
            value = Some(match value {
                Some(old) if !old.is_empty() => format!("{old} {v}"),
                _ => v.clone(),
            });
        }
    }
    value
}

/// `key = value` lines as `nix config show` prints them.
pub fn parse_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(" = ").or_else(|| l.split_once('=')))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty() && !k.contains(' '))
        .collect()
}

/// Asks Nix for the settings a daemon reading `nix_conf` has: `NIX_CONF_DIR` is its directory,
/// and no user file or `NIX_CONFIG` is mixed in (the daemon reads neither). Only for a file
/// called nix.conf (that is the only name Nix reads from a directory).
pub fn from_nix(nix: &str, nix_conf: &Path, opts: &Options) -> Option<(Vec<(String, String)>, &'static str)> {
    if nix_conf.file_name()? != "nix.conf" {
        return None;
    }
    let dir = nix_conf.parent()?;
    let ways: [(&[&str], &'static str); 2] = [
        (&["config", "show"], "nix config show"),
        (&["show-config"], "nix show-config"),
    ];
    for (args, source) in ways {
        let mut cmd = Command::new(nix);
        cmd.args(["--extra-experimental-features", "nix-command"])
            .args(args)
            .env("NIX_CONF_DIR", dir)
            .env("NIX_USER_CONF_FILES", "")
            .env_remove("NIX_CONFIG")
            .stdin(Stdio::null());
        if let Ok(out) = output_within(&mut cmd, opts)
            && out.status.success()
        {
            let settings = parse_settings(&String::from_utf8_lossy(&out.stdout));
            if !settings.is_empty() {
                return Some((settings, source));
            }
        }
    }
    None
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Whether a `builders` value reads `machines_file` (`@file` items).
pub fn builders_reach(value: &str, machines_file: &Path) -> bool {
    value
        .split([';', ' ', '\n'])
        .filter_map(|item| item.strip_prefix('@'))
        .any(|p| same_file(Path::new(p), machines_file))
}

/// Where the fix goes, and what kind of Nix this is, for messages.
fn settings_note(setup: &NixSetup) -> String {
    match setup.flavor {
        Flavor::Determinate => format!(
            " (Determinate Nix: {}; your settings go in {}, never in the nix.conf it rewrites)",
            setup.evidence,
            setup.settings_file.display()
        ),
        Flavor::Upstream => String::new(),
    }
}

fn check_builders(opts: &Options, conf: &NixConf) -> Check {
    let m = opts.machines_file.display();
    let c = opts.nix_conf.display();
    let s = opts.setup.settings_file.display();
    let restart = opts.setup.restart_command();
    let note = settings_note(&opts.setup);
    let fix = Some(format!(
        "add `builders = @{m}` to {s}, then restart the daemon ({restart}); `sudo builderctl machines-file --configure-nix` does both but the restart"
    ));
    if !conf.exists {
        return check(
            "builders",
            None,
            Status::Fail,
            format!("{c} does not exist or cannot be read"),
            fix,
        );
    }
    let default_path = opts.nix_conf.parent().unwrap_or(Path::new("/etc/nix")).join("machines");
    let value = if conf.set_in_files("builders") {
        conf.get("builders")
    } else {
        None
    };
    match value {
        None if same_file(&default_path, &opts.machines_file) => check(
            "builders",
            None,
            Status::Warn,
            format!(
                "{c} has no `builders` line; Nix's built-in default (@{}) happens to be {m}, but nix-darwin and other installers write their own{note}",
                default_path.display()
            ),
            fix,
        ),
        None => check(
            "builders",
            None,
            Status::Fail,
            format!(
                "{c} has no `builders` line, so Nix never reads {m} (its default is @{}){note}",
                default_path.display()
            ),
            fix,
        ),
        Some(v) if v.trim().is_empty() => check(
            "builders",
            None,
            Status::Fail,
            format!(
                "{c} sets `builders =` (empty): remote builds are off (nix-darwin writes this when nix.distributedBuilds is false){note}"
            ),
            fix,
        ),
        Some(v) => {
            let from = conf.source;
            if builders_reach(&v, &opts.machines_file) {
                check(
                    "builders",
                    None,
                    Status::Pass,
                    format!("{c}: builders = {v} (as {from} reads it){note}"),
                    None,
                )
            } else {
                check(
                    "builders",
                    None,
                    Status::Fail,
                    format!("{c}: builders = {v} (as {from} reads it) does not read {m}{note}"),
                    Some(format!(
                        "change it to `builders = @{m}` in {s} (keep other builders in {m}), then {restart}"
                    )),
                )
            }
        }
    }
}

fn check_substitutes(opts: &Options, conf: &NixConf) -> Check {
    let c = conf.path.display();
    let from = conf.source;
    match conf.get("builders-use-substitutes").as_deref().map(str::trim) {
        Some("true") => check(
            "builders-use-substitutes",
            None,
            Status::Pass,
            format!("{c}: builders-use-substitutes = true (as {from} reads it)"),
            None,
        ),
        other => check(
            "builders-use-substitutes",
            None,
            Status::Warn,
            format!(
                "{c}: builders-use-substitutes is {} (as {from} reads it): every dependency a build needs is uploaded from this machine instead of fetched by the builder from the cache",
                other.unwrap_or("not set (false)")
            ),
            Some(format!(
                "add `builders-use-substitutes = true` to {} and restart the daemon ({})",
                opts.setup.settings_file.display(),
                opts.setup.restart_command()
            )),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The machines file

type Selected = Vec<(String, MachinesEntry, String)>;

fn check_machines_file(opts: &Options) -> (Check, Selected) {
    let m = opts.machines_file.display().to_string();
    let text = match std::fs::read_to_string(&opts.machines_file) {
        Ok(t) => t,
        Err(e) => {
            return (
                check(
                    "machines-file",
                    None,
                    Status::Fail,
                    format!("{m}: {e}"),
                    Some("write it: `sudo builderctl machines-file <pool>` (or --from pool.yaml)".into()),
                ),
                Vec::new(),
            );
        }
    };
    let entries = merge::entries(&text);
    let lines: Vec<&str> = text.lines().collect();
    let bad: Vec<String> = entries
        .iter()
        .filter_map(|(n, r, _)| r.as_ref().err().map(|e| format!("line {n}: {e}")))
        .collect();
    if !bad.is_empty() {
        return (
            check(
                "machines-file",
                None,
                Status::Fail,
                format!(
                    "{m} does not parse, and Nix then uses no builder at all: {}",
                    bad.join("; ")
                ),
                Some(format!(
                    "fix or delete those lines in {m} (builderctl never rewrites them)"
                )),
            ),
            Vec::new(),
        );
    }
    let wanted = opts.pool.as_ref().map(|p| merge::resolve_id(&text, p));
    let mut selected: Selected = Vec::new();
    let any_block = entries.iter().any(|(_, _, b)| b.is_some());
    for (n, r, block) in &entries {
        let Ok(e) = r else { continue };
        let keep = match (&wanted, block) {
            (Some(Ok(id)), Some(b)) => b == id,
            (Some(Ok(_)), None) => false,
            (Some(Err(_)), _) => false,
            (None, Some(_)) => true,
            (None, None) => !any_block,
        };
        if keep {
            let target = block.clone().unwrap_or_else(|| format!("line {n}: {}", e.uri));
            selected.push((target, e.clone(), lines[n - 1].trim().to_string()));
        }
    }
    if let Some(Err(ids)) = &wanted {
        return (
            check(
                "machines-file",
                None,
                Status::Fail,
                format!("{m}: several pools are called that: {}", ids.join(", ")),
                Some("name the pool as namespace/name".into()),
            ),
            Vec::new(),
        );
    }
    if selected.is_empty() {
        let what = match &opts.pool {
            Some(p) => format!("{m} has no block for pool {p}"),
            None => format!("{m} has no builder in it"),
        };
        return (
            check(
                "machines-file",
                None,
                Status::Fail,
                what,
                Some("write it: `sudo builderctl machines-file <pool>` (or --from pool.yaml)".into()),
            ),
            Vec::new(),
        );
    }
    (
        check(
            "machines-file",
            None,
            Status::Pass,
            format!(
                "{m} parses; checking {}",
                selected.iter().map(|s| s.0.as_str()).collect::<Vec<_>>().join(", ")
            ),
            None,
        ),
        selected,
    )
}

// ---------------------------------------------------------------------------------------------
// Per machine

/// The parts of a machines URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl Target {
    pub fn parse(uri: &str) -> Option<Target> {
        let (scheme, rest) = uri.split_once("://").unwrap_or(("ssh", uri));
        let rest = rest.split('?').next().unwrap_or(rest);
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h.split_once(']')?;
            (h.to_string(), after.strip_prefix(':').and_then(|p| p.parse().ok()))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
                _ => (hostport.to_string(), None),
            }
        };
        Some(Target {
            scheme: scheme.into(),
            user,
            host,
            port,
        })
    }

    /// `user@host` as ssh takes it.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The known_hosts name Nix pins the host key under.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn check_entry(opts: &Options, target: &str, e: &MachinesEntry, line: &str, emit: &mut dyn FnMut(Check)) {
    let t = Some(target);
    let Some(dest) = Target::parse(&e.uri) else {
        emit(check(
            "tcp",
            t,
            Status::Fail,
            format!("cannot read host and port from {}", e.uri),
            Some("write the line again with builderctl machines-file".into()),
        ));
        return;
    };
    let key = check_key(e.ssh_key.as_deref(), t);
    let key_ok = key.status != Status::Fail;
    emit(key);
    emit(check_host_key(opts, e, t));

    let later = ["ssh-auth", "store-ping", "trusted-user"];
    let out_of_time = |id: &'static str| opts.timed_out(id, t, "not run");
    if opts.remaining().is_zero() {
        for id in ["tcp"].into_iter().chain(later) {
            emit(out_of_time(id));
        }
        return;
    }
    // Where ssh really connects (ssh_config Host blocks apply, as for the daemon).
    let (host, port) = resolve(opts, &dest);
    let tcp = if opts.skip.iter().any(|s| s == "tcp") {
        None
    } else {
        Some(check_tcp(opts, &host, port, t))
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
                emit(check(
                    id,
                    t,
                    Status::Skip,
                    "not tried: the builder cannot be reached".into(),
                    None,
                ));
            }
            return;
        }
    }
    let auth = check_ssh_auth(opts, e, &dest, t, key_ok);
    let auth_status = auth.status;
    emit(auth);
    if matches!(auth_status, Status::Fail | Status::Timeout) {
        for id in &later[1..] {
            emit(if auth_status == Status::Timeout {
                out_of_time(id)
            } else {
                check(id, t, Status::Skip, "not tried: SSH login failed".into(), None)
            });
        }
        return;
    }
    emit(check_store_ping(opts, e, &dest, t));
    emit(check_trusted(opts, e, line, t));
}

fn check_key(key: Option<&str>, t: Option<&str>) -> Check {
    let Some(key) = key else {
        return check(
            "key",
            t,
            Status::Warn,
            "the line names no key (column 3 is `-`): ssh uses root's default identity".into(),
            Some("create one with `sudo builderctl keygen` and write the line with `--key`".into()),
        );
    };
    let meta = match std::fs::metadata(key) {
        Ok(m) => m,
        Err(e) => {
            return check(
                "key",
                t,
                Status::Fail,
                format!("{key}: {e}"),
                Some(format!(
                    "create it: `sudo builderctl keygen --out {key}`, then authorize its .pub in the pool"
                )),
            );
        }
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return check(
            "key",
            t,
            Status::Fail,
            format!(
                "{key} has mode {mode:04o}: others can read the private key, and ssh refuses it (\"UNPROTECTED PRIVATE KEY FILE\")"
            ),
            Some(format!("sudo chmod 600 {key}")),
        );
    }
    let text = match std::fs::read_to_string(key) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !is_root() => {
            return check(
                "key",
                t,
                Status::Warn,
                format!(
                    "{key} has mode {mode:04o} but cannot be read by uid {}; the daemon reads it as root",
                    nix::unistd::geteuid()
                ),
                Some("run doctor with sudo to check the key as the daemon sees it".into()),
            );
        }
        Err(e) => return check("key", t, Status::Fail, format!("{key}: {e}"), None),
    };
    let parsed = match ssh_key::PrivateKey::from_openssh(text.trim()) {
        Ok(k) => k,
        Err(e) => {
            return check(
                "key",
                t,
                Status::Fail,
                format!("{key} is not an OpenSSH private key ({e})"),
                Some(format!("make a new one: `sudo builderctl keygen --out {key} --force`")),
            );
        }
    };
    if parsed.is_encrypted() {
        return check(
            "key",
            t,
            Status::Fail,
            format!("{key} has a passphrase: the daemon cannot type it and ssh fails in batch mode"),
            Some(format!(
                "remove it: `sudo ssh-keygen -p -N '' -f {key}` (or `sudo builderctl keygen --out {key} --force`)"
            )),
        );
    }
    if meta.uid() != 0 {
        return check(
            "key",
            t,
            Status::Warn,
            format!(
                "{key} is owned by uid {}, not root: that user can read the key",
                meta.uid()
            ),
            Some(format!("sudo chown root {key}")),
        );
    }
    check(
        "key",
        t,
        Status::Pass,
        format!("{key}: mode {mode:04o}, owned by root, no passphrase"),
        None,
    )
}

fn fingerprint(key: &str) -> String {
    ssh_key::PublicKey::from_openssh(key.trim())
        .map(|k| k.fingerprint(ssh_key::HashAlg::Sha256).to_string())
        .unwrap_or_else(|_| "<not a public key>".into())
}

fn check_host_key(opts: &Options, e: &MachinesEntry, t: Option<&str>) -> Check {
    let Some(pinned) = &e.host_public_key else {
        return check(
            "host-key",
            t,
            Status::Fail,
            "the line pins no host key (column 8 is `-`): the daemon checks root's known_hosts and fails with \"Host key verification failed\"".into(),
            Some("write the line again with builderctl machines-file (it pins status.hostPublicKey)".into()),
        );
    };
    if ssh_key::PublicKey::from_openssh(pinned).is_err() {
        return check(
            "host-key",
            t,
            Status::Fail,
            "column 8 does not decode to an OpenSSH public key".into(),
            Some("write the line again with builderctl machines-file".into()),
        );
    }
    if let Some(expected) = &opts.expected_host_key
        && expected.trim() != pinned.trim()
    {
        return check(
            "host-key",
            t,
            Status::Fail,
            format!(
                "the file pins {}, but the pool publishes {}",
                fingerprint(pinned),
                fingerprint(expected)
            ),
            Some("write the line again: `sudo builderctl machines-file <pool>`".into()),
        );
    }
    check(
        "host-key",
        t,
        Status::Pass,
        format!("pinned: {}", fingerprint(pinned)),
        None,
    )
}

/// Host name and port ssh really uses (`ssh -G` applies ssh_config).
fn resolve(opts: &Options, dest: &Target) -> (String, u16) {
    let mut cmd = Command::new(&opts.ssh);
    cmd.arg("-G");
    if let Some(p) = dest.port {
        cmd.args(["-p", &p.to_string()]);
    }
    cmd.arg(dest.destination());
    let fallback = (dest.host.clone(), dest.port.unwrap_or(22));
    let Ok(out) = output_within(cmd.stdin(Stdio::null()), opts) else {
        return fallback;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut host = fallback.0.clone();
    let mut port = fallback.1;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("hostname ") {
            host = h.trim().to_string();
        } else if let Some(p) = line.strip_prefix("port ") {
            port = p.trim().parse().unwrap_or(port);
        }
    }
    (host, port)
}

fn check_tcp(opts: &Options, host: &str, port: u16, t: Option<&str>) -> Check {
    let fix = Some(
        "check the pool is Ready (`builderctl status`) and that this machine reaches its Service: a ClusterIP needs the cluster network (VPN), a LoadBalancer its source ranges, a firewall the port".to_string(),
    );
    // Name resolution cannot be given a timeout; it runs aside and is given up on in time.
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::spawn(move || {
        let _ = tx.send((name.as_str(), port).to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    let resolved = match rx.recv_timeout(opts.remaining()) {
        Ok(r) => r,
        Err(_) => return opts.timed_out("tcp", t, &format!("resolving {host}")),
    };
    let addrs: Vec<_> = match resolved {
        Ok(a) => a,
        Err(e) => {
            return check(
                "tcp",
                t,
                Status::Fail,
                format!("cannot resolve {host}: {e}"),
                Some("check the name in status.endpoint (spec.service.externalHost) and your DNS".into()),
            );
        }
    };
    let mut last = String::new();
    for a in &addrs {
        let left = opts.remaining();
        if left.is_zero() {
            return opts.timed_out("tcp", t, &format!("connecting to {host}:{port}"));
        }
        let wait = opts.connect_timeout.min(left);
        match TcpStream::connect_timeout(a, wait) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(wait));
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                let banner = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                if banner.starts_with("SSH-") {
                    return check("tcp", t, Status::Pass, format!("{host}:{port} answers: {banner}"), None);
                }
                return check(
                    "tcp",
                    t,
                    Status::Fail,
                    format!("{host}:{port} accepts connections but does not speak SSH (it sent {banner:?})"),
                    Some("the endpoint points at something else: check status.endpoint and the Service's port".into()),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = format!("nothing is listening on {host}:{port} (connection refused)");
            }
            Err(e)
                if (e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock)
                    && wait < opts.connect_timeout =>
            {
                return opts.timed_out("tcp", t, &format!("connecting to {host}:{port}"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
                last = format!(
                    "{host}:{port} does not answer within {:?} (a firewall or no route)",
                    opts.connect_timeout
                );
            }
            Err(e) => last = format!("{host}:{port}: {e}"),
        }
    }
    check("tcp", t, Status::Fail, last, fix)
}

/// A temp known_hosts with the pinned key, as Nix writes it from column 8.
fn known_hosts(dest: &Target, e: &MachinesEntry) -> Option<tempfile::NamedTempFile> {
    let key = e.host_public_key.as_ref()?;
    let mut f = tempfile::NamedTempFile::new().ok()?;
    use std::io::Write;
    writeln!(f, "{} {}", dest.known_hosts_name(), key.trim()).ok()?;
    Some(f)
}

fn ssh_command(opts: &Options, e: &MachinesEntry, dest: &Target, kh: Option<&Path>) -> Command {
    let mut c = Command::new(&opts.ssh);
    c.arg(dest.destination()).args(["-x", "-a", "-o", "BatchMode=yes"]);
    if let Some(p) = dest.port {
        c.args(["-p", &p.to_string()]);
    }
    if let Some(k) = &e.ssh_key {
        c.args(["-i", k]);
    }
    if let Some(kh) = kh {
        c.arg("-o").arg(format!("UserKnownHostsFile={}", kh.display()));
        c.args(["-o", "StrictHostKeyChecking=yes"]);
    }
    c.arg("-o")
        .arg(format!("ConnectTimeout={}", opts.connect_timeout.as_secs().max(1)));
    c
}

fn check_ssh_auth(opts: &Options, e: &MachinesEntry, dest: &Target, t: Option<&str>, key_ok: bool) -> Check {
    let kh = known_hosts(dest, e);
    let mut cmd = ssh_command(opts, e, dest, kh.as_ref().map(|f| f.path()));
    cmd.args(["--", "nix-daemon", "--stdio"]).stdin(Stdio::null());
    let out = match output_within(&mut cmd, opts) {
        Ok(o) => o,
        Err(RunError::TimedOut) => {
            return opts.timed_out("ssh-auth", t, &format!("ssh to {}", dest.destination()));
        }
        Err(RunError::Spawn(err)) => {
            return check(
                "ssh-auth",
                t,
                Status::Fail,
                format!("cannot run {}: {err}", opts.ssh),
                Some("install the OpenSSH client".into()),
            );
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let who = if is_root() {
        "as root".to_string()
    } else {
        format!(
            "as uid {} (the daemon connects as root: run doctor with sudo for the exact check)",
            nix::unistd::geteuid()
        )
    };
    if out.status.code() != Some(255) {
        let status = if is_root() { Status::Pass } else { Status::Warn };
        return check(
            "ssh-auth",
            t,
            status,
            format!(
                "ssh {who} with the line's key and pinned host key logs in as {}",
                dest.destination()
            ),
            None,
        );
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    if stderr.contains("Host key verification failed") || stderr.contains("IDENTIFICATION HAS CHANGED") {
        let presented = keyscan(opts, dest);
        let pinned = e.host_public_key.as_deref().map(fingerprint).unwrap_or_default();
        let found = match presented {
            Some(p) => format!(
                "wrong host key: the builder presents {}, the machines line pins {pinned} (\"Host key verification failed\")",
                fingerprint(&p)
            ),
            None => format!("host key verification failed: the builder does not present the pinned key {pinned}"),
        };
        return check(
            "ssh-auth",
            t,
            Status::Fail,
            found,
            Some("write the line again from the pool's status (`sudo builderctl machines-file <pool>`); if the pool's host key changed on purpose, that is the fix, otherwise find out who answers on that address".into()),
        );
    }
    if stderr.contains("UNPROTECTED PRIVATE KEY FILE") || stderr.contains("bad permissions") {
        return check(
            "ssh-auth",
            t,
            Status::Fail,
            "ssh refuses the key: its mode lets others read it".into(),
            Some(format!("sudo chmod 600 {}", e.ssh_key.as_deref().unwrap_or("<key>"))),
        );
    }
    if stderr.contains("Permission denied") {
        let public = e.ssh_key.as_deref().and_then(public_of);
        let fix = match public {
            Some(p) => format!(
                "authorize the key in the pool: add `{p}` to spec.ssh.authorizedKeys (or to a team ConfigMap in spec.ssh.authorizedKeysConfigMaps); builders pick it up within seconds"
            ),
            None => "authorize the public half of the line's key in the pool's spec.ssh.authorizedKeys".into(),
        };
        let found = if key_ok {
            format!(
                "the builder refuses the key for {} (Permission denied (publickey))",
                dest.destination()
            )
        } else {
            format!(
                "login as {} failed (Permission denied); see the key check above",
                dest.destination()
            )
        };
        return check("ssh-auth", t, Status::Fail, found, Some(fix));
    }
    if stderr.contains("passphrase") {
        return check(
            "ssh-auth",
            t,
            Status::Fail,
            "the key needs a passphrase".into(),
            Some("remove it: `sudo ssh-keygen -p -N '' -f <key>`".into()),
        );
    }
    check(
        "ssh-auth",
        t,
        Status::Fail,
        format!("ssh {who} failed: {last}"),
        Some("run the same ssh by hand with -v to see more: sudo ssh -v -i <key> user@host".into()),
    )
}

fn public_of(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(key).ok()?;
    let k = ssh_key::PrivateKey::from_openssh(text.trim()).ok()?;
    k.public_key().to_openssh().ok()
}

fn keyscan(opts: &Options, dest: &Target) -> Option<String> {
    let mut cmd = Command::new(&opts.ssh_keyscan);
    cmd.args([
        "-T",
        &opts.connect_timeout.as_secs().max(1).to_string(),
        "-t",
        "ed25519",
    ])
    .args(["-p", &dest.port.unwrap_or(22).to_string()])
    .arg(&dest.host)
    .stdin(Stdio::null());
    let out = output_within(&mut cmd, opts).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.starts_with('#'))
        .and_then(|l| l.split_once(' ').map(|(_, k)| k.trim().to_string()))
}

fn store_uri(e: &MachinesEntry) -> String {
    let mut params = Vec::new();
    if let Some(k) = &e.ssh_key {
        params.push(format!("ssh-key={k}"));
    }
    if let Some(h) = &e.host_public_key {
        params.push(format!(
            "base64-ssh-public-host-key={}",
            base64::engine::general_purpose::STANDARD.encode(h.trim())
        ));
    }
    if params.is_empty() {
        e.uri.clone()
    } else {
        format!("{}?{}", e.uri, params.join("&"))
    }
}

fn check_store_ping(opts: &Options, e: &MachinesEntry, dest: &Target, t: Option<&str>) -> Check {
    if dest.scheme != "ssh-ng" {
        return check(
            "store-ping",
            t,
            Status::Skip,
            format!("{} is not ssh-ng://", e.uri),
            Some("use ssh-ng:// (builderctl machines-file writes it)".into()),
        );
    }
    let mut cmd = Command::new(&opts.nix);
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "ping",
        "--store",
    ])
    .arg(store_uri(e))
    .args([
        "--option",
        "connect-timeout",
        &opts.connect_timeout.as_secs().max(1).to_string(),
    ])
    .stdin(Stdio::null());
    match output_within(&mut cmd, opts) {
        Err(RunError::TimedOut) => opts.timed_out("store-ping", t, "nix store ping over ssh-ng"),
        Err(RunError::Spawn(err)) => check(
            "store-ping",
            t,
            Status::Fail,
            format!("cannot run {}: {err}", opts.nix),
            Some("is Nix installed and on PATH?".into()),
        ),
        Ok(o) if o.status.success() => check(
            "store-ping",
            t,
            Status::Pass,
            format!(
                "nix store ping over ssh-ng answers ({})",
                String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim()
            ),
            None,
        ),
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            check(
                "store-ping",
                t,
                Status::Fail,
                format!("nix store ping over ssh-ng fails: {}", last_lines(&stderr, 3)),
                Some("the builder's nix-daemon does not answer through ssh: check the pool's builders are Ready and their logs (`kubectl logs`)".into()),
            )
        }
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

fn check_trusted(opts: &Options, e: &MachinesEntry, line: &str, t: Option<&str>) -> Check {
    if !is_root() {
        return check(
            "trusted-user",
            t,
            Status::Skip,
            "not root: the probe build needs to choose its builder, which only root (a trusted user) may".into(),
            Some("run doctor with sudo".into()),
        );
    }
    let system = e.systems.first().cloned().unwrap_or_else(|| "x86_64-linux".into());
    let nonce = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let expr = format!(
        "derivation {{ name = \"builderctl-doctor-probe\"; system = \"{system}\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo ok > $out\" ]; nonce = \"{nonce}\"; }}"
    );
    let features: Vec<String> = e.mandatory_features.clone();
    let mut cmd = Command::new(&opts.nix_build);
    cmd.args(["--no-out-link", "--max-jobs", "0", "-E", &expr])
        .args(["--option", "builders", line])
        .args([
            "--option",
            "connect-timeout",
            &opts.connect_timeout.as_secs().max(1).to_string(),
        ])
        .stdin(Stdio::null());
    if !features.is_empty() {
        cmd.args(["--option", "system-features", &features.join(" ")]);
    }
    let out = match output_within(&mut cmd, opts) {
        Ok(o) => o,
        Err(RunError::TimedOut) => return opts.timed_out("trusted-user", t, "the probe build"),
        Err(RunError::Spawn(err)) => {
            return check(
                "trusted-user",
                t,
                Status::Fail,
                format!("cannot run {}: {err}", opts.nix_build),
                Some("is Nix installed and on PATH?".into()),
            );
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let user = Target::parse(&e.uri)
        .and_then(|d| d.user)
        .unwrap_or_else(|| "the login user".into());
    if stderr.contains("not privileged to build input-addressed derivations")
        || stderr.contains("you are not privileged")
    {
        return check(
            "trusted-user",
            t,
            Status::Fail,
            format!(
                "the builder does not trust {user}: \"you are not privileged to build input-addressed derivations\""
            ),
            Some(format!(
                "the builder's nix.conf needs `trusted-users = {user}` (nixpool builders set it; a hand-made builder needs it added and its nix-daemon restarted)"
            )),
        );
    }
    if out.status.success() {
        return check(
            "trusted-user",
            t,
            Status::Pass,
            format!("a probe derivation for {system} was built on the builder as {user}"),
            None,
        );
    }
    if stderr.contains("unable to start any build") || stderr.contains("required system or feature not available") {
        return check(
            "trusted-user",
            t,
            Status::Fail,
            format!(
                "Nix did not pick the builder for a {system} build: {}",
                last_lines(&stderr, 2)
            ),
            Some("check the line's systems and features (column 2, 6, 7) against what you build".into()),
        );
    }
    if stderr.contains("builder for") {
        return check(
            "trusted-user",
            t,
            Status::Pass,
            format!(
                "the builder accepted a build from {user} (the probe itself failed there: {})",
                last_lines(&stderr, 1)
            ),
            None,
        );
    }
    check(
        "trusted-user",
        t,
        Status::Fail,
        format!("the probe build failed: {}", last_lines(&stderr, 3)),
        Some("run it with -v to see more: sudo nix-build --max-jobs 0 -v ...".into()),
    )
}

// ---------------------------------------------------------------------------------------------
// The running daemon

/// `[[dd-]hh:]mm:ss` → seconds.
pub fn parse_etime(s: &str) -> Option<u64> {
    let (days, rest) = match s.trim().split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s.trim()),
    };
    let parts: Vec<u64> = rest.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let secs = match parts.as_slice() {
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(days * 86400 + secs)
}

/// macOS: whether launchd has the daemon job builderctl expects (`systems.determinate.nix-daemon`
/// for Determinate Nix, `org.nixos.nix-daemon` otherwise). `None` when it has, or when launchctl
/// cannot tell.
fn check_launchd(opts: &Options) -> Option<Check> {
    use crate::nixsetup::{DETERMINATE_LABEL, UPSTREAM_LABEL};
    let loaded = |label: &str| {
        let mut cmd = Command::new(&opts.launchctl);
        cmd.args(["print", &format!("system/{label}")]).stdin(Stdio::null());
        output_within(&mut cmd, opts).ok().map(|o| o.status.success())
    };
    let ours = opts.setup.launchd_label();
    let other = if ours == DETERMINATE_LABEL {
        UPSTREAM_LABEL
    } else {
        DETERMINATE_LABEL
    };
    match (loaded(ours)?, loaded(other)) {
        (true, _) => None,
        (false, Some(true)) => Some(check(
            "daemon",
            None,
            Status::Warn,
            format!(
                "this looks like {} ({}), but launchd runs {other}, not {ours}: the daemon is not the one this Nix installs",
                opts.setup.name(),
                opts.setup.evidence
            ),
            Some(format!(
                "restart the daemon that runs: sudo launchctl kickstart -k system/{other}; if you moved between Determinate Nix and the upstream installer, finish that (reinstall one of them) so that one daemon reads {}",
                opts.setup.settings_file.display()
            )),
        )),
        (false, _) => Some(check(
            "daemon",
            None,
            Status::Warn,
            format!("launchd has no {ours} job (nor {other}): no Nix daemon is loaded"),
            Some(format!(
                "load it: sudo launchctl bootstrap system /Library/LaunchDaemons/{ours}.plist"
            )),
        )),
    }
}

/// Seconds the longest-running Nix daemon has been up: `nix-daemon`, or Determinate's
/// `determinate-nixd` when no `nix-daemon` process shows.
fn daemon_uptime(opts: &Options) -> Option<u64> {
    let mut cmd = Command::new("ps");
    cmd.args(["-A", "-o", "etime=", "-o", "comm="]).stdin(Stdio::null());
    let out = output_within(&mut cmd, opts).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let uptime = |name: &str| {
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let etime = it.next()?;
                let comm = it.collect::<Vec<_>>().join(" ");
                comm.rsplit('/').next().filter(|c| *c == name)?;
                parse_etime(etime)
            })
            .max()
    };
    uptime("nix-daemon").or_else(|| uptime("determinate-nixd"))
}

fn check_daemon(opts: &Options, conf: &NixConf) -> Check {
    let c = conf
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let c = if c.is_empty() {
        opts.nix_conf.display().to_string()
    } else {
        c
    };
    let restart = opts.setup.restart_command();
    if opts.setup.os == Os::MacOs
        && let Some(c) = check_launchd(opts)
    {
        return c;
    }
    let Some(up) = daemon_uptime(opts) else {
        return check(
            "daemon",
            None,
            Status::Warn,
            "no nix-daemon is running: a single-user Nix, or the daemon is down".into(),
            Some(format!("start it: {restart}")),
        );
    };
    let age = conf
        .modified()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .map(|d| d.as_secs());
    let who = format!(
        "the {} daemon{}",
        opts.setup.name(),
        match opts.setup.os {
            Os::MacOs => format!(" (launchd: {})", opts.setup.launchd_label()),
            Os::Linux => String::new(),
        }
    );
    match age {
        Some(age) if age < up => check(
            "daemon",
            None,
            Status::Fail,
            format!("{c} changed {age}s ago but {who} has run for {up}s: it still uses the old settings"),
            Some(restart),
        ),
        _ => check(
            "daemon",
            None,
            Status::Pass,
            format!("{who} (up {up}s) started after {c} last changed"),
            None,
        ),
    }
}
