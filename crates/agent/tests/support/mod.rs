//! The builder harness lives in `nixpool_testenv::builder` (builderctl's tests use it too).
#![allow(unused_imports, dead_code)]

pub use nixpool_testenv::builder::*;

use std::time::Duration;

/// The first 8 bytes a Nix worker-protocol client sends (`nix-daemon --stdio`).
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;

/// This package's agent binary.
pub const AGENT: &str = env!("CARGO_BIN_EXE_nixpool-agent");

/// An SSH session to the gate, held open: the first 8 bytes of its protocol are sent and the
/// server's 16-byte answer read, so the gate has taken its slot (if any) and serves.
pub struct Session {
    pub ssh: std::process::Child,
}

impl Session {
    pub fn open(b: &Builder, slots: Option<&str>, command: &str, magic: u64) -> Result<Self, std::process::Output> {
        use std::io::{Read, Write};
        use std::process::Stdio;
        let mut c = session_command(b, slots, command);
        let mut ssh = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ssh.stdin.as_mut().unwrap().write_all(&magic.to_le_bytes()).unwrap();
        let mut stdout = ssh.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut hello = [0u8; 16];
            let _ = tx.send(stdout.read_exact(&mut hello).map(|()| stdout));
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(stdout)) => {
                ssh.stdout = Some(stdout);
                Ok(Self { ssh })
            }
            Ok(Err(_)) => Err(wait_timeout_output(ssh)),
            Err(_) => {
                let _ = ssh.kill();
                panic!("{command}: no answer within 20 s:\n{}", b.log());
            }
        }
    }

    /// Ends the session as a client does: closes its input.
    pub fn close(mut self) {
        drop(self.ssh.stdin.take());
        if wait_timeout(&mut self.ssh, Duration::from_secs(10)).is_none() {
            let _ = self.ssh.kill();
            let _ = self.ssh.wait();
        }
    }
}

pub fn wait_timeout_output(mut ssh: std::process::Child) -> std::process::Output {
    if wait_timeout(&mut ssh, Duration::from_secs(20)).is_none() {
        let _ = ssh.kill();
    }
    ssh.wait_with_output().unwrap()
}

/// `ssh builder@127.0.0.1 <command>`, sending `NIXPOOL_GATE_SLOTS=<slots>` as the gateway does.
pub fn session_command(b: &Builder, slots: Option<&str>, command: &str) -> std::process::Command {
    let known = b.root.dir.path().join("known_hosts");
    std::fs::write(&known, format!("127.0.0.1 {}\n", b.root.host_public)).unwrap();
    let mut c = b.client("/usr/bin/ssh");
    if let Some(n) = slots {
        c.args(["-o", &format!("SetEnv=NIXPOOL_GATE_SLOTS={n}")]);
    }
    nixpool_testenv::flow::ssh_args(&mut c, &b.root.client_key, &known, "builder@127.0.0.1", command);
    c
}
