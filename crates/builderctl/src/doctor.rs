//! `builderctl doctor`: every known way remote builds fail, checked in the order a build meets
//! them, each with what was found and the fix. SSH and Nix checks run the real `ssh` and `nix`
//! the way the Nix daemon does: as root, with the machines line's key and pinned host key.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::Engine;
use nixpool_api::MachinesEntry;
use serde::Serialize;

use crate::merge;

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
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

/// The operating system, for the right restart command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
}

impl Os {
    pub fn current() -> Self {
        if cfg!(target_os = "macos") {
            Os::MacOs
        } else {
            Os::Linux
        }
    }
    pub fn restart_daemon(self) -> &'static str {
        match self {
            Os::MacOs => "sudo launchctl kickstart -k system/org.nixos.nix-daemon",
            Os::Linux => "sudo systemctl restart nix-daemon",
        }
    }
}

/// What doctor looks at.
#[derive(Clone, Debug)]
pub struct Options {
    /// A pool (`name` or `ns/name`); `None`: every nixpool block, or every line if there is none.
    pub pool: Option<String>,
    pub machines_file: PathBuf,
    pub nix_conf: PathBuf,
    /// The host key the pool publishes (from `--from` or the cluster), to compare with the pin.
    pub expected_host_key: Option<String>,
    pub connect_timeout: Duration,
    pub os: Os,
    /// Check ids not to run.
    pub skip: Vec<String>,
    pub ssh: String,
    pub ssh_keyscan: String,
    pub nix: String,
    pub nix_build: String,
}

/// Runs every check and returns the results in order.
pub fn run(opts: &Options) -> Vec<Check> {
    let mut out = Vec::new();
    let conf = NixConf::load(&opts.nix_conf);
    let push = |out: &mut Vec<Check>, c: Check| {
        if !opts.skip.iter().any(|s| s == c.id) {
            out.push(c);
        }
    };
    push(&mut out, check_builders(opts, &conf));
    let (file_check, entries) = check_machines_file(opts);
    let file_ok = file_check.status != Status::Fail;
    push(&mut out, file_check);
    if file_ok {
        for (target, entry, line) in &entries {
            for c in check_entry(opts, target, entry, line) {
                push(&mut out, c);
            }
        }
    }
    push(&mut out, check_substitutes(&conf));
    push(&mut out, check_daemon(opts));
    out
}

/// Exit status: failure when any check failed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != Status::Fail)
}

/// The human report.
pub fn report(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
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
    }
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    s.push_str(&format!(
        "\n{} checks: {} failed, {} warnings\n",
        checks.len(),
        fails,
        warns
    ));
    s
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

/// The settings of a nix.conf (and the files it includes), last one wins; `extra-` appends.
#[derive(Default, Debug)]
pub struct NixConf {
    pub path: PathBuf,
    pub exists: bool,
    pub settings: Vec<(String, String)>,
}

impl NixConf {
    pub fn load(path: &Path) -> Self {
        let mut conf = NixConf {
            path: path.into(),
            ..Default::default()
        };
        conf.exists = conf.read(path, 0);
        conf
    }

    fn read(&mut self, path: &Path, depth: usize) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(inc) = line.strip_prefix("include ").or_else(|| line.strip_prefix("!include ")) {
                let p = path.parent().unwrap_or(Path::new("/")).join(inc.trim());
                if depth < 8 {
                    self.read(&p, depth + 1);
                }
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                self.settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        true
    }

    /// The value of a setting with its `extra-` additions; `None` when never set.
    pub fn get(&self, name: &str) -> Option<String> {
        let extra = format!("extra-{name}");
        let mut value: Option<String> = None;
        for (k, v) in &self.settings {
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
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn check_builders(opts: &Options, conf: &NixConf) -> Check {
    let m = opts.machines_file.display();
    let c = opts.nix_conf.display();
    let fix = Some(format!(
        "add `builders = @{m}` to {c}, then restart the daemon ({})",
        opts.os.restart_daemon()
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
    match conf.get("builders") {
        None if same_file(&default_path, &opts.machines_file) => check(
            "builders",
            None,
            Status::Warn,
            format!(
                "{c} has no `builders` line; Nix's built-in default (@{}) happens to be {m}, but nix-darwin and other installers write their own",
                default_path.display()
            ),
            fix,
        ),
        None => check(
            "builders",
            None,
            Status::Fail,
            format!(
                "{c} has no `builders` line, so Nix never reads {m} (its default is @{})",
                default_path.display()
            ),
            fix,
        ),
        Some(v) if v.trim().is_empty() => check(
            "builders",
            None,
            Status::Fail,
            format!(
                "{c} sets `builders =` (empty): remote builds are off (nix-darwin writes this when nix.distributedBuilds is false)"
            ),
            fix,
        ),
        Some(v) => {
            let reaches = v
                .split([';', ' ', '\n'])
                .filter_map(|item| item.strip_prefix('@'))
                .any(|p| same_file(Path::new(p), &opts.machines_file));
            if reaches {
                check("builders", None, Status::Pass, format!("{c}: builders = {v}"), None)
            } else {
                check(
                    "builders",
                    None,
                    Status::Fail,
                    format!("{c}: builders = {v} does not read {m}"),
                    Some(format!(
                        "change it to `builders = @{m}` (keep other builders in {m}), then {}",
                        opts.os.restart_daemon()
                    )),
                )
            }
        }
    }
}

fn check_substitutes(conf: &NixConf) -> Check {
    let c = conf.path.display();
    match conf.get("builders-use-substitutes").as_deref().map(str::trim) {
        Some("true") => check(
            "builders-use-substitutes",
            None,
            Status::Pass,
            format!("{c}: builders-use-substitutes = true"),
            None,
        ),
        other => check(
            "builders-use-substitutes",
            None,
            Status::Warn,
            format!(
                "{c}: builders-use-substitutes is {}: every dependency a build needs is uploaded from this machine instead of fetched by the builder from the cache",
                other.unwrap_or("not set (false)")
            ),
            Some(format!(
                "add `builders-use-substitutes = true` to {c} and restart the daemon"
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

fn check_entry(opts: &Options, target: &str, e: &MachinesEntry, line: &str) -> Vec<Check> {
    let t = Some(target);
    let mut out = Vec::new();
    let Some(dest) = Target::parse(&e.uri) else {
        out.push(check(
            "tcp",
            t,
            Status::Fail,
            format!("cannot read host and port from {}", e.uri),
            Some("write the line again with builderctl machines-file".into()),
        ));
        return out;
    };
    let key_ok = {
        let c = check_key(e.ssh_key.as_deref(), t);
        let ok = c.status != Status::Fail;
        out.push(c);
        ok
    };
    out.push(check_host_key(opts, e, t));

    // Where ssh really connects (ssh_config Host blocks apply, as for the daemon).
    let (host, port) = resolve(opts, &dest);
    let tcp = check_tcp(opts, &host, port, t);
    let tcp_ok = tcp.status == Status::Pass;
    out.push(tcp);
    let later = ["ssh-auth", "store-ping", "trusted-user"];
    if !tcp_ok {
        for id in later {
            out.push(check(
                id,
                t,
                Status::Skip,
                "not tried: the builder cannot be reached".into(),
                None,
            ));
        }
        return out;
    }
    let auth = check_ssh_auth(opts, e, &dest, t, key_ok);
    let auth_ok = auth.status != Status::Fail;
    out.push(auth);
    if !auth_ok {
        for id in &later[1..] {
            out.push(check(id, t, Status::Skip, "not tried: SSH login failed".into(), None));
        }
        return out;
    }
    out.push(check_store_ping(opts, e, &dest, t));
    out.push(check_trusted(opts, e, line, t));
    out
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
    let Ok(out) = cmd.stderr(Stdio::null()).output() else {
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
    let addrs: Vec<_> = match (host, port).to_socket_addrs() {
        Ok(a) => a.collect(),
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
        match TcpStream::connect_timeout(a, opts.connect_timeout) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(opts.connect_timeout));
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
    let out = match cmd.output() {
        Ok(o) => o,
        Err(err) => {
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
    let out = Command::new(&opts.ssh_keyscan)
        .args([
            "-T",
            &opts.connect_timeout.as_secs().max(1).to_string(),
            "-t",
            "ed25519",
        ])
        .args(["-p", &dest.port.unwrap_or(22).to_string()])
        .arg(&dest.host)
        .stderr(Stdio::null())
        .output()
        .ok()?;
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
    let out = Command::new(&opts.nix)
        .args([
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
        .stdin(Stdio::null())
        .output();
    match out {
        Err(err) => check(
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
    let out = match cmd.output() {
        Ok(o) => o,
        Err(err) => {
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

/// Seconds the longest-running nix-daemon has been up.
fn daemon_uptime() -> Option<u64> {
    let out = Command::new("ps")
        .args(["-A", "-o", "etime=", "-o", "comm="])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let etime = it.next()?;
            let comm = it.collect::<Vec<_>>().join(" ");
            comm.rsplit('/').next().filter(|c| *c == "nix-daemon")?;
            parse_etime(etime)
        })
        .max()
}

fn check_daemon(opts: &Options) -> Check {
    let c = opts.nix_conf.display();
    let Some(up) = daemon_uptime() else {
        return check(
            "daemon",
            None,
            Status::Warn,
            "no nix-daemon is running: a single-user Nix, or the daemon is down".into(),
            Some(format!("start it: {}", opts.os.restart_daemon())),
        );
    };
    let age = std::fs::metadata(&opts.nix_conf)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .map(|d| d.as_secs());
    match age {
        Some(age) if age < up => check(
            "daemon",
            None,
            Status::Fail,
            format!("{c} changed {age}s ago but the nix-daemon has run for {up}s: it still uses the old settings"),
            Some(opts.os.restart_daemon().to_string()),
        ),
        _ => check(
            "daemon",
            None,
            Status::Pass,
            format!("the nix-daemon (up {up}s) started after {c} last changed"),
            None,
        ),
    }
}
