//! The forced command of every builder key: lets through only what Nix runs over SSH and refuses
//! anything else with a clear message. sshd runs it as the builder user with the client's
//! command in `SSH_ORIGINAL_COMMAND`; it replaces itself with the real program.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

/// What a client may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// `nix-daemon --stdio` (`ssh-ng://`).
    Daemon,
    /// `nix-store --serve [--write]` (`ssh://`).
    Serve { write: bool },
}

/// Decides on the client's command. The program may be named by path (Nix's `remote-program`),
/// but the configured binary is run, never the client's path.
pub fn decide(original: Option<&str>) -> Result<Allowed, String> {
    let Some(original) = original.map(str::trim).filter(|s| !s.is_empty()) else {
        return Err("no command given: this account has no shell".into());
    };
    let words: Vec<&str> = original.split_whitespace().collect();
    let program = words[0].rsplit('/').next().unwrap_or(words[0]);
    match (program, &words[1..]) {
        ("nix-daemon", ["--stdio"]) => Ok(Allowed::Daemon),
        ("nix-store", ["--serve", "--write"]) | ("nix-store", ["--write", "--serve"]) => {
            Ok(Allowed::Serve { write: true })
        }
        ("nix-store", ["--serve"]) => Ok(Allowed::Serve { write: false }),
        _ => Err(format!("refusing {original:?}")),
    }
}

pub fn refusal(reason: &str) -> String {
    format!(
        "nixpool: this account only serves Nix remote builds (ssh-ng:// runs `nix-daemon --stdio`, ssh:// runs `nix-store --serve --write`); {reason}"
    )
}

/// Runs (execs) the allowed program, or prints why not and exits 1.
pub fn run(nix_daemon: &Path, nix_store: &Path) -> ExitCode {
    let original = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let err = match decide(original.as_deref()) {
        Ok(Allowed::Daemon) => Command::new(nix_daemon).arg("--stdio").exec(),
        Ok(Allowed::Serve { write }) => {
            let mut c = Command::new(nix_store);
            c.arg("--serve");
            if write {
                c.arg("--write");
            }
            c.exec()
        }
        Err(reason) => {
            eprintln!("{}", refusal(&reason));
            return ExitCode::from(1);
        }
    };
    eprintln!("nixpool: cannot start the Nix program: {err}");
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_through_what_nix_runs() {
        assert_eq!(decide(Some("nix-daemon --stdio")), Ok(Allowed::Daemon));
        assert_eq!(
            decide(Some("/nix/store/x-nix/bin/nix-daemon --stdio")),
            Ok(Allowed::Daemon)
        );
        assert_eq!(
            decide(Some("nix-store --serve --write")),
            Ok(Allowed::Serve { write: true })
        );
        assert_eq!(decide(Some("nix-store --serve")), Ok(Allowed::Serve { write: false }));
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
            assert!(decide(Some(cmd)).is_err(), "{cmd} let through");
        }
        assert!(decide(None).unwrap_err().contains("no shell"));
        assert!(refusal("refusing \"ls\"").contains("only serves Nix remote builds"));
    }
}
