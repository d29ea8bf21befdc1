//! Every path the agent reads or writes, relative to `--root`, and the binaries it runs.

use std::path::{Path, PathBuf};

use nixpool_api::paths;

/// The gate's build-slot lock files (`0` .. `maxJobs-1`), used when the pool's gateway asks the
/// builder to count its sessions (`NIXPOOL_GATE_SLOTS`). Owned by the builder user, mode 0700.
/// Only the agent and its gate use it, so it lives here rather than in `nixpool_api::paths`.
pub const GATE_SLOTS_DIR: &str = "/run/nixpool/gate-slots";

/// Paths under the root. Paths written into config files are these same root-prefixed paths,
/// so a scratch root works without bind mounts and `--root /` gives the plain paths.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `abs` (an absolute path inside the container) under the root.
    pub fn path(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        self.root.join(abs.strip_prefix("/").unwrap_or(abs))
    }

    pub fn is_slash(&self) -> bool {
        self.root == Path::new("/")
    }

    pub fn config_file(&self) -> PathBuf {
        self.path(paths::CONFIG_DIR).join(paths::AGENT_CONFIG_KEY)
    }
    pub fn host_key_secret(&self) -> PathBuf {
        self.path(paths::HOST_KEY_DIR).join(paths::HOST_KEY_FILE)
    }
    pub fn authorized_keys_secret(&self) -> PathBuf {
        self.path(paths::AUTHORIZED_KEYS_DIR).join(paths::AUTHORIZED_KEYS_FILE)
    }
    pub fn nix_conf_dir(&self) -> PathBuf {
        self.path("/etc/nix")
    }
    pub fn nix_conf(&self) -> PathBuf {
        self.nix_conf_dir().join("nix.conf")
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.path("/etc/ssh")
    }
    pub fn sshd_config(&self) -> PathBuf {
        self.ssh_dir().join("sshd_config")
    }
    pub fn host_key(&self) -> PathBuf {
        self.ssh_dir().join("ssh_host_ed25519_key")
    }
    pub fn authorized_keys_dir(&self) -> PathBuf {
        self.ssh_dir().join("authorized_keys.d")
    }
    pub fn daemon_socket(&self) -> PathBuf {
        self.path("/nix/var/nix/daemon-socket/socket")
    }
    pub fn store(&self) -> PathBuf {
        self.path("/nix/store")
    }
    pub fn push_queue(&self) -> PathBuf {
        self.path("/nix/var/nixpool/push-queue")
    }
    pub fn agent_run_dir(&self) -> PathBuf {
        self.path("/run/nixpool-agent")
    }
    pub fn gate_slots_dir(&self) -> PathBuf {
        self.path(GATE_SLOTS_DIR)
    }
    pub fn post_build_hook(&self) -> PathBuf {
        self.agent_run_dir().join("post-build-hook")
    }
    pub fn termination_log(&self) -> PathBuf {
        self.path("/dev/termination-log")
    }
    pub fn kvm(&self) -> PathBuf {
        self.path("/dev/kvm")
    }
}

/// The programs the agent runs. Defaults come from `PATH`; flags and env override them.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub sshd: PathBuf,
    pub nix_daemon: PathBuf,
    pub nix_store: PathBuf,
    pub nix: PathBuf,
    pub attic: PathBuf,
    pub cachix: PathBuf,
    /// This agent, as the forced command and post-build hook call it.
    pub agent: PathBuf,
}

/// `name` as given if it has a slash, else the first executable match on `PATH` (or the bare name
/// when none, so the error later names it).
pub fn which(name: &Path) -> PathBuf {
    if name.components().count() > 1 {
        return name.to_path_buf();
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    name.to_path_buf()
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_the_root() {
        let l = Layout::new("/scratch/r");
        assert_eq!(l.config_file(), PathBuf::from("/scratch/r/etc/nixpool/agent.json"));
        assert_eq!(
            l.host_key_secret(),
            PathBuf::from("/scratch/r/run/nixpool/host-key/ssh_host_ed25519_key")
        );
        assert_eq!(Layout::new("/").nix_conf(), PathBuf::from("/etc/nix/nix.conf"));
        assert!(Layout::new("/").is_slash());
    }

    #[test]
    fn which_searches_path_and_keeps_paths() {
        assert_eq!(which(Path::new("/x/y")), PathBuf::from("/x/y"));
        let sh = which(Path::new("sh"));
        assert!(sh.is_absolute(), "sh on PATH: {sh:?}");
        assert_eq!(
            which(Path::new("no-such-binary-xyz")),
            PathBuf::from("no-such-binary-xyz")
        );
    }
}
