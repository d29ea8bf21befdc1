//! The forced command of every builder key: lets through only what Nix runs over SSH and refuses
//! anything else with a clear message. sshd runs it as the builder user with the client's
//! command in `SSH_ORIGINAL_COMMAND`.
//! - `ssh-ng://` (`nix-daemon --stdio`): the gate connects to nix-daemon's socket itself and
//!   passes the client's requests through [`worker`], which keeps a trusted client from changing
//!   how builds run.
//! - `ssh://` (`nix-store --serve`): the gate replaces itself with `nix-store --serve`, in an
//!   environment that gives it no settings of its own; the serve protocol carries only build
//!   limits.
//!
//! When the pool's gateway asks (`NIXPOOL_GATE_SLOTS`), the gate first takes one of the
//! builder's build slots for the whole session, or refuses with exit status 75 ([`slots`]).

pub mod slots;
mod wire;
pub mod worker;

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use nixpool_api::rules::{RemoteCommand, remote_command};

pub fn refusal(reason: &str) -> String {
    format!(
        "nixpool: this account only serves Nix remote builds (ssh-ng:// runs `nix-daemon --stdio`, ssh:// runs `nix-store --serve --write`); {reason}"
    )
}

/// Serves the client's command, or prints why not and exits 1 (75 when the gateway asked the
/// builder to count its build slots and none is free). A slot taken in `slots_dir` is held until
/// the session ends.
pub fn run(daemon_socket: &Path, nix_store: &Path, slots_dir: &Path) -> ExitCode {
    let original = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let command = match remote_command(original.as_deref()) {
        Ok(c) => c,
        Err(reason) => {
            eprintln!("{}", refusal(&reason));
            return ExitCode::from(1);
        }
    };
    // Before anything is read from the client, so that a refused session can go elsewhere.
    let slot = match slots::claim(slots_dir, std::env::var_os(slots::SLOTS_ENV).as_deref()) {
        Ok(slot) => slot,
        Err(code) => return code,
    };
    match command {
        RemoteCommand::Daemon => {
            let _held = slot;
            serve_daemon(daemon_socket)
        }
        RemoteCommand::Serve { write } => {
            // nix-store works through the daemon: a session that came while it restarts waits
            // for it here rather than failing in nix-store. The probe costs the daemon one
            // connection (a worker that reads EOF and exits) per ssh:// session.
            if let Err(e) = connect_waiting(daemon_socket, DAEMON_WAIT) {
                eprintln!(
                    "nixpool: cannot reach nix-daemon at {} ({e}); the builder is not ready, try again or see the pod's log",
                    daemon_socket.display()
                );
                return ExitCode::from(1);
            }
            // nix-store holds the slot from here: the lock's descriptor survives the exec.
            if let Some(s) = &slot
                && let Err(e) = s.keep_across_exec()
            {
                eprintln!(
                    "nixpool: cannot pass build slot {} to nix-store ({e}); the session is not counted",
                    s.index
                );
            }
            let mut c = Command::new(nix_store);
            c.arg("--serve");
            if write {
                c.arg("--write");
            }
            // No settings from the environment or the builder user's files: the daemon applies
            // what this trusted client forwards.
            c.env_clear()
                .env(
                    "PATH",
                    std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
                )
                .env("NIX_USER_CONF_FILES", "/dev/null");
            let err = c.exec();
            eprintln!("nixpool: cannot start {}: {err}", nix_store.display());
            ExitCode::from(1)
        }
    }
}

/// `nix-daemon --stdio`, served through the request filter: the client's bytes are read here,
/// the daemon's answers are copied back by a second thread.
fn serve_daemon(socket: &Path) -> ExitCode {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("nixpool: {what}: {e}; the builder is not ready, try again or see the pod's log");
        ExitCode::from(1)
    };
    let daemon = match connect_waiting(socket, DAEMON_WAIT) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot reach nix-daemon at {}", socket.display()), &e),
    };
    let (from_daemon, stdout) = match (daemon.try_clone(), std::io::stdout().as_fd().try_clone_to_owned()) {
        (Ok(d), Ok(o)) => (d, std::fs::File::from(o)),
        (Err(e), _) | (_, Err(e)) => return fail("cannot set up the session", &e),
    };
    let stdout = Arc::new(Mutex::new(stdout));
    let (version_tx, version_rx) = mpsc::channel();
    let copy_out = Arc::clone(&stdout);
    std::thread::spawn(move || copy_answers(from_daemon, &copy_out, version_tx));
    let mut to_daemon = BufWriter::new(&daemon);
    let end = worker::session(
        BufReader::new(std::io::stdin().lock()),
        &mut to_daemon,
        || version_rx.recv().ok(),
        &mut |bytes| {
            let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
            out.write_all(bytes).and_then(|()| out.flush())
        },
    );
    match end {
        worker::End::Done => {
            // The client is done asking; the answers still under way are copied to the end.
            let _ = to_daemon.flush();
            drop(to_daemon);
            let _ = daemon.shutdown(std::net::Shutdown::Write);
            loop {
                std::thread::park();
            }
        }
        worker::End::Refused(reason) => {
            eprintln!("{reason}");
            ExitCode::from(1)
        }
        worker::End::Broken(wire::WireError::Malformed(m)) => {
            eprintln!("nixpool: not a Nix worker-protocol client ({m}); the builder serves only Nix");
            ExitCode::from(1)
        }
        worker::End::Broken(wire::WireError::Io(e)) => {
            eprintln!("nixpool: the session ended mid-request: {e}");
            ExitCode::from(1)
        }
    }
}

/// Copies the daemon's answers to the client, first reporting the version it announces. The
/// process ends with the daemon's side of the connection.
fn copy_answers(mut daemon: UnixStream, stdout: &Mutex<std::fs::File>, version: mpsc::Sender<u64>) -> ! {
    let mut hello = [0u8; 16];
    if daemon.read_exact(&mut hello).is_err() || hello[..8] != wire::WORKER_MAGIC_2.to_le_bytes() {
        eprintln!("nixpool: nix-daemon did not answer the handshake; see the pod's log");
        std::process::exit(1);
    }
    {
        let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
        if out.write_all(&hello).and_then(|()| out.flush()).is_err() {
            std::process::exit(1);
        }
    }
    let _ = version.send(u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match daemon.read(&mut buf) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(n) => n,
        };
        let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            std::process::exit(1);
        }
    }
}

/// How long a session waits for nix-daemon to listen. The agent restarts a nix-daemon that died
/// at once (in well under a second); a session refused meanwhile would fail its build, and Nix
/// does not try a refused builder again (docs/reliability.md, section 4).
const DAEMON_WAIT: Duration = Duration::from_secs(10);

/// Connects to nix-daemon, waiting up to `wait` while nothing listens on its socket (refused, or
/// the socket not there yet); any other error is returned at once.
fn connect_waiting(socket: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    use backon::{BlockingRetryable as _, ExponentialBuilder};
    let delays = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .without_max_times()
        .with_total_delay(Some(wait));
    (|| connect(socket))
        .retry(delays)
        .sleep(std::thread::sleep)
        .when(|e| daemon_not_listening(e.kind()))
        .call()
}

fn daemon_not_listening(kind: std::io::ErrorKind) -> bool {
    matches!(
        kind,
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
    )
}

/// Connects; a path longer than `sun_path` (a deep `--root` in tests) from the socket's
/// directory.
fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    const SUN_PATH: usize = 108;
    if socket.as_os_str().len() < SUN_PATH {
        return UnixStream::connect(socket);
    }
    match (socket.parent(), socket.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => {
            std::env::set_current_dir(dir)?;
            UnixStream::connect(name)
        }
        _ => UnixStream::connect(socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_through_what_nix_runs() {
        assert_eq!(remote_command(Some("nix-daemon --stdio")), Ok(RemoteCommand::Daemon));
        assert_eq!(
            remote_command(Some("/nix/store/x-nix/bin/nix-daemon --stdio")),
            Ok(RemoteCommand::Daemon)
        );
        assert_eq!(
            remote_command(Some("nix-store --serve --write")),
            Ok(RemoteCommand::Serve { write: true })
        );
        assert_eq!(
            remote_command(Some("nix-store --serve")),
            Ok(RemoteCommand::Serve { write: false })
        );
    }

    #[test]
    fn waits_for_a_daemon_that_listens_late() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        // Nothing there yet: after a short wait, the refusal is the caller's to report.
        let started = std::time::Instant::now();
        let err = connect_waiting(&socket, Duration::from_millis(200)).unwrap_err();
        assert!(daemon_not_listening(err.kind()), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        // A daemon that binds 300 ms later is reached.
        let late = socket.clone();
        let listener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let l = std::os::unix::net::UnixListener::bind(&late).unwrap();
            l.accept().unwrap();
        });
        connect_waiting(&socket, Duration::from_secs(5)).unwrap();
        listener.join().unwrap();
        // A socket whose daemon died (the file stays, nobody listens) is refused, and waited for.
        let err = connect_waiting(&socket, Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn refuses_everything_else() {
        for cmd in [
            "ls",
            "nix-daemon",
            "nix-daemon --stdio; rm -rf /",
            "nix-store --delete x",
            "sh -c nix-daemon --stdio",
            "bash",
        ] {
            assert!(remote_command(Some(cmd)).is_err(), "{cmd} let through");
        }
        assert!(remote_command(None).unwrap_err().contains("no shell"));
        assert!(refusal("refusing \"ls\"").contains("only serves Nix remote builds"));
    }
}
