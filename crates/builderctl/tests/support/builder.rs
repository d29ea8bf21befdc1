//! A real builder for end-to-end tests: the nixpool agent (crates/agent) as PID 1 of its own
//! mount, network and UTS namespaces over a scratch root, serving sshd + nix-daemon on
//! 127.0.0.1:22 of that network namespace. The client (nix-build, ssh, builderctl) runs as root
//! on the host store and /etc, inside the same network namespace only.
//!
//! Needs root, util-linux (unshare, nsenter), Debian's nix-bin, openssh-server/-client and
//! busybox-static, and the agent binary (`cargo build -p nixpool-agent`); panics naming what is
//! missing.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nixpool_api::AgentConfig;

pub const SSHD: &str = "/usr/sbin/sshd";
pub const NIX_DAEMON: &str = "/usr/bin/nix-daemon";
pub const BUSYBOX: &str = "/bin/busybox";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The agent binary: $NIXPOOL_AGENT_BIN, or next to builderctl in the target directory.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NIXPOOL_AGENT_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_BIN_EXE_builderctl")).with_file_name("nixpool-agent");
    assert!(
        p.is_file(),
        "{} is missing: the end-to-end tests run the real builder agent. Build it first with `cargo build -p nixpool-agent` (or set NIXPOOL_AGENT_BIN)",
        p.display()
    );
    p
}

pub fn preflight() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (namespaces, bind mounts, sshd): run `cargo test -p builderctl` as root"
    );
    for tool in [
        SSHD,
        NIX_DAEMON,
        "/usr/bin/nix-store",
        "/usr/bin/nix",
        "/usr/bin/nix-build",
        BUSYBOX,
        "/usr/bin/ssh",
        "/usr/bin/ssh-keygen",
        "/usr/bin/ssh-keyscan",
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
    ] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install nix-bin openssh-server openssh-client busybox-static util-linux"
        );
    }
}

pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn keygen(path: &Path) -> String {
    ok(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path));
    fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// A kubelet-style Secret volume: files in a timestamped dir behind `..data`.
fn write_secret(dir: &Path, files: &[(&str, &str)], mode: u32) {
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

pub fn config() -> AgentConfig {
    AgentConfig {
        pool: "e2e".into(),
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
        drain_timeout_seconds: 10,
    }
}

/// The builder, its scratch root and the client key it authorizes.
pub struct Builder {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub client_key: PathBuf,
    pub host_public: String,
    holder: Child,
    pub holder_pid: u32,
    agent: Option<Child>,
    hand_made: Option<Child>,
}

impl Builder {
    pub fn start() -> Builder {
        preflight();
        let agent = agent_binary();
        // Not under a world-writable directory: sshd's StrictModes checks every path component.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(base).unwrap();
        fs::set_permissions(base, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("builderctl-e2e-")
            .tempdir_in(base)
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("root");
        for d in ["nix", "run", "dev"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        ok(Command::new("cp").arg("-a").arg("/etc").arg(root.join("etc")));
        let _ = fs::remove_dir_all(root.join("etc/nixpool"));
        let host_key = dir.path().join("host_key");
        let host_public = keygen(&host_key);
        let client_key = dir.path().join("client_ed25519");
        let client_public = keygen(&client_key);
        write_secret(
            &root.join("run/nixpool/host-key"),
            &[
                ("ssh_host_ed25519_key", &fs::read_to_string(&host_key).unwrap()),
                ("ssh_host_ed25519_key.pub", &host_public),
            ],
            0o400,
        );
        write_secret(
            &root.join("run/nixpool/authorized-keys"),
            &[("authorized_keys", &format!("{client_public}\n"))],
            0o644,
        );
        fs::create_dir_all(root.join("etc/nixpool")).unwrap();
        fs::write(root.join("etc/nixpool/agent.json"), config().to_json()).unwrap();

        let r = root.display();
        let script = format!(
            "set -e; mount --bind {r}/etc /etc; mount --bind {r}/nix /nix; mount --bind {r}/run /run; ip link set lo up; hostname builderctl-e2e; echo ready; exec sleep 100000"
        );
        let mut holder = Command::new("unshare")
            .args([
                "--mount",
                "--net",
                "--uts",
                "--fork",
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
            "the namespaces did not come up (unshare needs root)"
        );
        let holder_pid = holder.id();
        let mut b = Builder {
            dir,
            root,
            client_key,
            host_public,
            holder,
            holder_pid,
            agent: None,
            hand_made: None,
        };
        let log = fs::File::create(b.log_path()).unwrap();
        let mut c = b.inside(agent.to_str().unwrap());
        c.arg("--root").arg(&b.root).arg("run");
        c.args([
            "--sshd",
            SSHD,
            "--nix-daemon",
            NIX_DAEMON,
            "--nix-store",
            "/usr/bin/nix-store",
            "--nix",
            "/usr/bin/nix",
        ]);
        c.stdout(log.try_clone().unwrap()).stderr(log);
        b.agent = Some(c.spawn().expect("start the agent"));
        b.wait_ready(Duration::from_secs(60));
        b
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A command inside the builder's namespaces.
    pub fn inside(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder_pid.to_string(), "-m", "-n", "-u", "--", program]);
        c
    }

    /// A command in the builder's network namespace only: the client side.
    pub fn client(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder_pid.to_string(), "-n", "--", program]);
        c
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.agent.as_mut().and_then(|a| a.try_wait().unwrap()) {
                panic!("the agent exited ({s}) before it was ready:\n{}", self.log());
            }
            // The agent starts sshd only once nix-daemon answers: a host key on port 22 is ready.
            let out = self
                .client("/usr/bin/ssh-keyscan")
                .args(["-T", "1", "-t", "ed25519", "127.0.0.1"])
                .stderr(Stdio::null())
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("ssh-ed25519") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the agent was not ready within {timeout:?}:\n{}", self.log());
    }

    /// Stops the agent and serves the same files by hand, but with the builder user not trusted.
    pub fn restart_untrusted(&mut self) {
        let mut agent = self.agent.take().expect("the agent runs");
        ok(Command::new("kill").args(["-TERM", &agent.id().to_string()]));
        let t0 = Instant::now();
        while agent.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the agent did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let conf_path = self.root.join("etc/nix/nix.conf");
        let conf = fs::read_to_string(&conf_path).unwrap();
        assert!(conf.contains("trusted-users = root builder"), "{conf}");
        fs::write(
            &conf_path,
            conf.replace("trusted-users = root builder", "trusted-users = root"),
        )
        .unwrap();
        let script = format!("NIX_CONF_DIR=/etc/nix {NIX_DAEMON} & exec {SSHD} -D -e -f /etc/ssh/sshd_config",);
        self.hand_made = Some(
            self.inside("sh")
                .args(["-c", &script])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Wait for sshd.
        let t0 = Instant::now();
        loop {
            let out = self
                .client("/usr/bin/ssh-keyscan")
                .args(["-T", "1", "127.0.0.1"])
                .output()
                .unwrap();
            if !out.stdout.is_empty() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the hand-made sshd did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A derivation whose builder is static busybox (no nixpkgs).
    pub fn derivation(&self, name: &str, script: &str) -> PathBuf {
        nixpool_testenv::flow::derivation(self.dir.path(), name, script).unwrap()
    }
}

fn processes_in_mount_ns(pid: u32) -> Vec<u32> {
    let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
        return Vec::new();
    };
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| *p != pid && fs::read_link(format!("/proc/{p}/ns/mnt")).ok().as_ref() == Some(&ns))
        .collect()
}

/// Every process (other than us) whose mounts include the scratch root: the builder's own, and
/// any that made a namespace of its own from there (a sandboxed build).
fn processes_mounting(root: &Path) -> Vec<u32> {
    let needle = root.display().to_string();
    let me = std::process::id();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| *p != me)
        .filter(|p| fs::read_to_string(format!("/proc/{p}/mountinfo")).is_ok_and(|m| m.contains(&needle)))
        .collect()
}

impl Drop for Builder {
    fn drop(&mut self) {
        // The agent first (it would restart the children killed before it), then every process
        // left in the builder's mount namespace, until none is.
        for c in [self.agent.as_mut(), self.hand_made.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for _ in 0..20 {
            let mut left = processes_in_mount_ns(self.holder_pid);
            left.extend(processes_mounting(&self.root));
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
    }
}
