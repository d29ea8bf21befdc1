//! A real builder (the nixpool agent with sshd and nix-daemon) in its own namespaces, from the
//! shared harness `nixpool_testenv::builder`, plus what builderctl's doctor tests need: the same
//! builder served by hand without trusting the builder user.
#![allow(dead_code)]

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixpool_testenv::builder as shared;
pub use nixpool_testenv::builder::Root;
#[allow(unused_imports)]
pub use nixpool_testenv::builder::keygen;

const SSHD: &str = "/usr/sbin/sshd";
const NIX_DAEMON: &str = "/usr/bin/nix-daemon";

/// The builder, its scratch root (`Deref`: `dir`, `root`, `client_key`, `host_public`) and the
/// client key it authorizes.
pub struct Builder {
    inner: shared::Builder,
}

impl std::ops::Deref for Builder {
    type Target = Root;
    fn deref(&self) -> &Root {
        &self.inner.root
    }
}

impl Builder {
    /// A ready builder, the agent serving it.
    pub fn start() -> Builder {
        let mut inner = shared::Builder::new(&shared::config("e2e"));
        inner.start_agent(&[]);
        inner.wait_ready(Duration::from_secs(60));
        Builder { inner }
    }

    pub fn log(&self) -> String {
        self.inner.log()
    }

    /// A command in the builder's network namespace only: the client side.
    pub fn client(&self, program: &str) -> Command {
        self.inner.client(program)
    }

    pub fn derivation(&self, name: &str, script: &str) -> std::path::PathBuf {
        self.inner.derivation(name, script)
    }

    /// Stops the agent and serves the same files by hand, but with the builder user not trusted.
    pub fn restart_untrusted(&mut self) {
        let status = self.inner.stop_agent(Duration::from_secs(30));
        assert!(
            status.success(),
            "the agent did not stop cleanly ({status}):\n{}",
            self.log()
        );
        let conf_path = self.inner.root.path("etc/nix/nix.conf");
        let conf = fs::read_to_string(&conf_path).unwrap();
        assert!(conf.contains("trusted-users = root builder"), "{conf}");
        fs::write(
            &conf_path,
            conf.replace("trusted-users = root builder", "trusted-users = root"),
        )
        .unwrap();
        let script = format!("NIX_CONF_DIR=/etc/nix {NIX_DAEMON} & exec {SSHD} -D -e -f /etc/ssh/sshd_config");
        self.inner.hand_made = Some(
            self.inner
                .inside("sh")
                .args(["-c", &script])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
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
}
