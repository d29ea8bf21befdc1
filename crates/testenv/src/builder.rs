//! Test tooling: a builder (the real agent, sshd, nix-daemon) in its own mount, network, UTS and
//! PID namespaces over a scratch root, and a Nix client on the host store that builds on it.
//! Shared by the agent's and builderctl's tests. Needs root, util-linux, iproute2 and Debian's
//! nix-bin, openssh-server/client and busybox-static; panics naming what is missing.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nixpool_api::{AgentConfig, MachinesEntry};

/// The `nixpool-agent` binary built next to the running test.
pub fn agent() -> PathBuf {
    crate::flow::binary("nixpool-agent").unwrap_or_else(|e| panic!("{e:#}"))
}
pub const SSHD: &str = "/usr/sbin/sshd";
pub const NIX_DAEMON: &str = "/usr/bin/nix-daemon";
pub const NIX_STORE: &str = "/usr/bin/nix-store";
pub const NIX: &str = "/usr/bin/nix";
pub const BUSYBOX: &str = "/bin/busybox";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics (never skips) when the machine lacks what the real-process tests need.
pub fn preflight() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (namespaces, bind mounts, sshd); run `cargo test -p nixpool-agent` as root"
    );
    for tool in [
        SSHD,
        NIX_DAEMON,
        NIX_STORE,
        NIX,
        "/usr/bin/nix-build",
        BUSYBOX,
        "/usr/bin/ssh",
        "/usr/bin/ssh-keygen",
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
        "/usr/sbin/ip",
    ] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install nix-bin openssh-server openssh-client busybox-static util-linux iproute2"
        );
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Generates an ed25519 key pair; returns the public line.
pub fn keygen(path: &Path) -> String {
    ok(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path));
    fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// Writes a Secret volume the way the kubelet does: files in a timestamped dir, `..data` a
/// symlink to it, each key a symlink through `..data`; a later write swaps `..data` atomically.
pub fn write_secret(dir: &Path, files: &[(&str, &str)], mode: u32) {
    fs::create_dir_all(dir).unwrap();
    let stamp = format!("..{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
    let data = dir.join(&stamp);
    fs::create_dir(&data).unwrap();
    for (name, content) in files {
        let p = data.join(name);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&stamp, &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
}

pub fn config(pool: &str) -> AgentConfig {
    AgentConfig {
        pool: pool.into(),
        builder_user: "builder".into(),
        max_jobs: 2,
        cores: 1,
        systems: vec!["x86_64-linux".into()],
        supported_features: vec!["big-parallel".into()],
        mandatory_features: vec![],
        ssh_port: 22,
        health_port: 8090,
        substituters: vec![],
        trusted_public_keys: vec![],
        min_free_bytes: None,
        max_free_bytes: None,
        extra_nix_config: Default::default(),
        push: vec![],
        drain_timeout_seconds: 60,
    }
}

/// A scratch root (not under a world-writable directory: sshd's StrictModes checks every
/// component of the authorized-keys path).
pub struct Root {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub client_key: PathBuf,
    pub client_public: String,
    pub host_public: String,
}

impl Root {
    pub fn new(config: &AgentConfig) -> Self {
        let base = &target_tmp();
        fs::create_dir_all(base).unwrap();
        fs::set_permissions(base, fs::Permissions::from_mode(0o755)).unwrap();
        // NIXPOOL_TEST_KEEP=1 keeps the scratch roots for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("agent-")
            .disable_cleanup(std::env::var_os("NIXPOOL_TEST_KEEP").is_some())
            .tempdir_in(base)
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("nix")).unwrap();
        fs::create_dir_all(root.join("run")).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        ok(Command::new("cp").arg("-a").arg("/etc").arg(root.join("etc")));
        let _ = fs::remove_dir_all(root.join("etc/nixpool"));
        let host_key = dir.path().join("host_key");
        let host_public = keygen(&host_key);
        let client_key = dir.path().join("client_ed25519");
        let client_public = keygen(&client_key);
        let r = Self {
            root,
            client_key,
            client_public,
            host_public,
            dir,
        };
        write_secret(
            &r.root.join("run/nixpool/host-key"),
            &[
                ("ssh_host_ed25519_key", &fs::read_to_string(&host_key).unwrap()),
                ("ssh_host_ed25519_key.pub", &r.host_public),
            ],
            0o400,
        );
        r.set_authorized_keys(&[&r.client_public.clone()]);
        r.write_config(config);
        r
    }

    pub fn write_config(&self, config: &AgentConfig) {
        let dir = self.root.join("etc/nixpool");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("agent.json"), config.to_json()).unwrap();
    }

    pub fn set_authorized_keys(&self, keys: &[&str]) {
        let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
        write_secret(
            &self.root.join("run/nixpool/authorized-keys"),
            &[("authorized_keys", &text)],
            0o644,
        );
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
}

/// `<target dir>/tmp` (Cargo's `CARGO_TARGET_TMPDIR`), from the running test's path: not under a
/// world-writable directory, which sshd's StrictModes would refuse.
pub fn target_tmp() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .join("tmp")
}

/// The namespaces, held open by a sleeping process.
pub struct Builder {
    pub root: Root,
    holder: Child,
    pub holder_pid: u32,
    pub agent: Option<Child>,
    pub hand_made: Option<Child>,
}

impl Builder {
    pub fn new(config: &AgentConfig) -> Self {
        preflight();
        let root = Root::new(config);
        let r = root.root.display().to_string();
        // A fresh host has no /nix to mount on until its own Nix first runs.
        let script = format!(
            "set -e; mkdir -p /nix; mount --bind {r}/etc /etc; mount --bind {r}/nix /nix; mount --bind {r}/run /run; ip link set lo up; hostname nixpool-test-builder; echo ready; exec sleep 100000"
        );
        let mut holder = Command::new("unshare")
            .args([
                "--mount",
                "--net",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the namespace did not come up: unshare --mount --net --uts needs root and a kernel with namespaces"
        );
        // Nix kills every process of a build user before a build; without a PID namespace of its
        // own, one builder would kill another's builds (they share nixbld uids), as pods do not.
        let holder_pid = child_of(holder.id()).expect("the namespace's init");
        Self {
            root,
            holder,
            holder_pid,
            agent: None,
            hand_made: None,
        }
    }

    /// A command inside the builder's namespaces.
    pub fn inside(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder_pid.to_string(),
            "-m",
            "-n",
            "-u",
            "-p",
            "--",
            program,
        ]);
        c
    }

    /// A command in the builder's network namespace only (the client: host store, host /etc).
    pub fn client(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder_pid.to_string(), "-n", "--", program]);
        c
    }

    pub fn agent_log(&self) -> PathBuf {
        self.root.dir.path().join("agent.log")
    }

    pub fn start_agent(&mut self, extra: &[&str]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())
            .unwrap();
        let mut c = self.inside(&agent().display().to_string());
        c.arg("--root").arg(&self.root.root).arg("run");
        for (flag, default) in [
            ("--sshd", SSHD),
            ("--nix-daemon", NIX_DAEMON),
            ("--nix-store", NIX_STORE),
            ("--nix", NIX),
        ] {
            if !extra.contains(&flag) {
                c.args([flag, default]);
            }
        }
        c.args(extra);
        c.stdout(log.try_clone().unwrap()).stderr(log);
        self.agent = Some(c.spawn().expect("start the agent"));
    }

    /// The agent's pid (nsenter forks to enter the PID namespace; the agent is its child).
    pub fn agent_pid(&self) -> u32 {
        let nsenter = self.agent.as_ref().expect("agent started").id();
        for _ in 0..100 {
            if let Some(pid) = child_of(nsenter) {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the agent process did not show up under nsenter {nsenter}")
    }

    /// Sends `sig` to every process in the builder's PID namespace but its init.
    pub fn kill_all_inside(&self, sig: &str) {
        ok(self.inside("sh").args(["-c", &format!("kill -{sig} -1; sleep 0.3")]));
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.agent_log()).unwrap_or_default()
    }

    /// GET on the agent's health port from inside the builder's network namespace; (ok, body).
    pub fn http(&self, path: &str) -> (bool, String) {
        use std::io::{Read, Write};
        let ns = format!("/proc/{}/ns/net", self.holder_pid);
        let path = path.to_string();
        std::thread::spawn(move || {
            let f = fs::File::open(&ns).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the builder's network namespace");
            let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&"127.0.0.1:8090".parse().unwrap(), Duration::from_secs(3))
            else {
                return (false, String::new());
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: builder\r\n\r\n").unwrap();
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            let ok = resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200");
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (ok, body)
        })
        .join()
        .unwrap()
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http("/metrics");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(status) = self.agent.as_mut().and_then(|a| a.try_wait().unwrap()) {
                panic!("the agent exited ({status}) before ready:\n{}", self.log());
            }
            if self.http("/readyz").0 {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent was not ready within {timeout:?}:\n{}", self.log());
    }

    /// SIGTERM to the agent; waits for its exit.
    pub fn stop_agent(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.agent_pid();
        let mut agent = self.agent.take().expect("agent started");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        wait_timeout(&mut agent, timeout)
            .unwrap_or_else(|| panic!("the agent did not exit within {timeout:?}:\n{}", self.log()))
    }

    /// sshd listeners that are children of `parent`.
    pub fn sshd_pid(&self, parent: u32) -> Option<u32> {
        for e in fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else { continue };
            let comm = &stat[stat.find('(').unwrap() + 1..close];
            let ppid: u32 = stat[close + 2..]
                .split(' ')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if comm == "sshd" && ppid == parent {
                return e.file_name().to_string_lossy().parse().ok();
            }
        }
        None
    }

    pub fn machines_line(&self, scheme: &str, key: &Path) -> String {
        MachinesEntry {
            uri: format!("{scheme}://builder@127.0.0.1"),
            systems: vec!["x86_64-linux".into()],
            ssh_key: Some(key.display().to_string()),
            max_jobs: 2,
            speed_factor: 1,
            supported_features: vec!["big-parallel".into()],
            mandatory_features: vec![],
            host_public_key: Some(self.root.host_public.clone()),
        }
        .to_string()
    }

    /// Writes a derivation whose builder is static busybox (no nixpkgs) and returns its file.
    pub fn derivation(&self, name: &str, script: &str) -> PathBuf {
        crate::flow::derivation(self.root.dir.path(), name, script).unwrap()
    }

    /// `nix-build` as root on the host store, building only remotely.
    pub fn build(&self, scheme: &str, key: &Path, file: &Path) -> Output {
        run(self
            .client("/usr/bin/nix-build")
            .args(crate::flow::nix_build_args(&self.machines_line(scheme, key), file)))
    }

    /// `ssh builder@127.0.0.1 <command>` with the host key pinned.
    pub fn ssh(&self, user: &str, key: &Path, command: &str) -> Output {
        run(&mut self.ssh_command(user, key, command))
    }

    /// The command of [`Builder::ssh`], not yet run.
    pub fn ssh_command(&self, user: &str, key: &Path, command: &str) -> Command {
        let known = self.root.dir.path().join("known_hosts");
        fs::write(&known, format!("127.0.0.1 {}\n", self.root.host_public)).unwrap();
        let mut c = self.client("/usr/bin/ssh");
        crate::flow::ssh_args(&mut c, key, &known, &format!("{user}@127.0.0.1"), command);
        c
    }
}

/// The scratch-root builder under attack, from the client key's holder.
impl crate::attack::Target for Builder {
    fn ssh(&self, command: &str) -> Command {
        self.ssh_command("builder", &self.root.client_key, command)
    }

    fn machines_line(&self, scheme: &str) -> String {
        Builder::machines_line(self, scheme, &self.root.client_key)
    }

    fn store_uri(&self) -> String {
        let entry = MachinesEntry::parse(&Builder::machines_line(self, "ssh-ng", &self.root.client_key)).unwrap();
        format!(
            "ssh-ng://builder@127.0.0.1?ssh-key={}&base64-ssh-public-host-key={}",
            self.root.client_key.display(),
            entry.host_key_column()
        )
    }

    fn client(&self, program: &str) -> Command {
        Builder::client(self, program)
    }

    fn read(&self, path: &str) -> Option<String> {
        fs::read_to_string(self.root.path(path)).ok()
    }

    fn exists(&self, path: &str) -> bool {
        self.root.path(path).symlink_metadata().is_ok()
    }

    fn secrets(&self) -> Vec<String> {
        vec![fs::read_to_string(self.root.dir.path().join("host_key")).unwrap()]
    }

    fn scratch(&self) -> PathBuf {
        self.root.dir.path().to_path_buf()
    }
}

/// The first child of `pid`.
pub fn child_of(pid: u32) -> Option<u32> {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Every process in the mount namespace of `pid`.
fn processes_in_mount_ns(pid: u32) -> Vec<i32> {
    let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
        return Vec::new();
    };
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| *p as u32 != pid && fs::read_link(format!("/proc/{p}/ns/mnt")).ok().as_ref() == Some(&ns))
        .collect()
}

impl Drop for Builder {
    fn drop(&mut self) {
        for p in processes_in_mount_ns(self.holder_pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
        }
        for c in [self.agent.as_mut(), self.hand_made.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
    }
}
