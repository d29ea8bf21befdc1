//! Logging in as the daemon does (`ssh-auth`): root, the line's key, a known_hosts holding only
//! the pinned host key, batch mode; and telling ssh's failures apart from its stderr.

use std::path::Path;
use std::process::{Command, Stdio};

use nixpool_api::MachinesEntry;
use nixpool_api::machines::StoreUri;

use super::keys::{fingerprint, public_of};
use super::process::{RunError, output_within};
use super::{Check, CheckId, Options, is_root};

/// Why ssh (exit 255) did not log in, read from its stderr.
#[derive(Debug, PartialEq, Eq)]
enum SshFailure {
    /// The builder's host key is not the pinned one.
    HostKey,
    /// ssh refuses a private key others can read.
    KeyMode,
    /// The builder refuses the key.
    Denied,
    /// The key needs a passphrase batch mode cannot give.
    Passphrase,
    /// Something else; its last line.
    Other(String),
}

fn classify(stderr: &str) -> SshFailure {
    if stderr.contains("Host key verification failed") || stderr.contains("IDENTIFICATION HAS CHANGED") {
        SshFailure::HostKey
    } else if stderr.contains("UNPROTECTED PRIVATE KEY FILE") || stderr.contains("bad permissions") {
        SshFailure::KeyMode
    } else if stderr.contains("Permission denied") {
        SshFailure::Denied
    } else if stderr.contains("passphrase") {
        SshFailure::Passphrase
    } else {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        SshFailure::Other(last.to_string())
    }
}

/// A temp known_hosts with the pinned key, as Nix writes it from column 8.
fn known_hosts(uri: &StoreUri, entry: &MachinesEntry) -> Option<tempfile::NamedTempFile> {
    let key = entry.host_public_key.as_ref()?;
    let mut f = tempfile::NamedTempFile::new().ok()?;
    use std::io::Write;
    writeln!(f, "{} {}", uri.known_hosts_name(), key.trim()).ok()?;
    Some(f)
}

fn ssh_command(opts: &Options, entry: &MachinesEntry, uri: &StoreUri, known_hosts: Option<&Path>) -> Command {
    let mut c = Command::new(&opts.ssh);
    c.arg(uri.destination()).args(["-x", "-a", "-o", "BatchMode=yes"]);
    if let Some(p) = uri.port {
        c.args(["-p", &p.to_string()]);
    }
    if let Some(k) = &entry.ssh_key {
        c.args(["-i", k]);
    }
    if let Some(kh) = known_hosts {
        c.arg("-o").arg(format!("UserKnownHostsFile={}", kh.display()));
        c.args(["-o", "StrictHostKeyChecking=yes"]);
    }
    c.arg("-o")
        .arg(format!("ConnectTimeout={}", opts.connect_timeout_secs()));
    c
}

/// The host key the builder presents (`ssh-keyscan`), to name it when it is not the pinned one.
fn keyscan(opts: &Options, uri: &StoreUri) -> Option<String> {
    let mut cmd = Command::new(&opts.ssh_keyscan);
    cmd.args(["-T", &opts.connect_timeout_secs(), "-t", "ed25519"])
        .args(["-p", &uri.port.unwrap_or(22).to_string()])
        .arg(&uri.host)
        .stdin(Stdio::null());
    let out = output_within(&mut cmd, opts.remaining()).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.starts_with('#'))
        .and_then(|l| l.split_once(' ').map(|(_, k)| k.trim().to_string()))
}

/// `key_ok`: the `key` check did not fail (else a refusal points back at it).
pub(super) fn check_ssh_auth(
    opts: &Options,
    entry: &MachinesEntry,
    uri: &StoreUri,
    subject: Option<&str>,
    key_ok: bool,
) -> Check {
    let id = CheckId::SshAuth;
    let kh = known_hosts(uri, entry);
    let mut cmd = ssh_command(opts, entry, uri, kh.as_ref().map(|f| f.path()));
    cmd.args(["--", "nix-daemon", "--stdio"]).stdin(Stdio::null());
    let out = match output_within(&mut cmd, opts.remaining()) {
        Ok(o) => o,
        Err(RunError::TimedOut) => {
            return opts.timed_out(id, subject, &format!("ssh to {}", uri.destination()));
        }
        Err(RunError::Spawn(err)) => {
            return Check::fail(id, subject, format!("cannot run {}: {err}", opts.ssh))
                .with_fix("install the OpenSSH client");
        }
    };
    let who = if is_root() {
        "as root".to_string()
    } else {
        format!(
            "as uid {} (the daemon connects as root: run doctor with sudo for the exact check)",
            nix::unistd::geteuid()
        )
    };
    if out.status.code() != Some(255) {
        let found = format!(
            "ssh {who} with the line's key and pinned host key logs in as {}",
            uri.destination()
        );
        return if is_root() {
            Check::pass(id, subject, found)
        } else {
            Check::warn(id, subject, found)
        };
    }
    let key_file = entry.ssh_key.as_deref();
    match classify(&String::from_utf8_lossy(&out.stderr)) {
        SshFailure::HostKey => {
            let pinned = entry.host_public_key.as_deref().map(fingerprint).unwrap_or_default();
            let found = match keyscan(opts, uri) {
                Some(presented) => format!(
                    "wrong host key: the builder presents {}, the machines line pins {pinned} (\"Host key verification failed\")",
                    fingerprint(&presented)
                ),
                None => format!("host key verification failed: the builder does not present the pinned key {pinned}"),
            };
            Check::fail(id, subject, found).with_fix("write the line again from the pool's status (`sudo builderctl machines-file <pool>`); if the pool's host key changed on purpose, that is the fix, otherwise find out who answers on that address")
        }
        SshFailure::KeyMode => Check::fail(id, subject, "ssh refuses the key: its mode lets others read it")
            .with_fix(format!("sudo chmod 600 {}", key_file.unwrap_or("<key>"))),
        SshFailure::Denied => {
            let fix = match key_file.and_then(public_of) {
                Some(p) => format!(
                    "authorize the key in the pool: add `{p}` to spec.ssh.authorizedKeys (or to a team ConfigMap in spec.ssh.authorizedKeysConfigMaps); builders pick it up within seconds"
                ),
                None => "authorize the public half of the line's key in the pool's spec.ssh.authorizedKeys".into(),
            };
            let found = if key_ok {
                format!(
                    "the builder refuses the key for {} (Permission denied (publickey))",
                    uri.destination()
                )
            } else {
                format!(
                    "login as {} failed (Permission denied); see the key check above",
                    uri.destination()
                )
            };
            Check::fail(id, subject, found).with_fix(fix)
        }
        SshFailure::Passphrase => Check::fail(id, subject, "the key needs a passphrase")
            .with_fix("remove it: `sudo ssh-keygen -p -N '' -f <key>`"),
        SshFailure::Other(last) => Check::fail(id, subject, format!("ssh {who} failed: {last}"))
            .with_fix("run the same ssh by hand with -v to see more: sudo ssh -v -i <key> user@host"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_stderr_is_told_apart_as_openssh_writes_it() {
        let changed = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\nHost key for [127.0.0.1]:2222 has changed and you have requested strict checking.\nHost key verification failed.\n";
        assert_eq!(classify(changed), SshFailure::HostKey);
        assert_eq!(
            classify(
                "No ED25519 host key is known for [h]:2222 and you have requested strict checking.\nHost key verification failed.\n"
            ),
            SshFailure::HostKey
        );
        let unprotected = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n@         WARNING: UNPROTECTED PRIVATE KEY FILE!          @\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\nPermissions 0644 for '/etc/nix/nixpool_ed25519' are too open.\nThis private key will be ignored.\nLoad key \"/etc/nix/nixpool_ed25519\": bad permissions\nbuilder@127.0.0.1: Permission denied (publickey).\n";
        // The key's mode is the cause, though ssh then also says "Permission denied".
        assert_eq!(classify(unprotected), SshFailure::KeyMode);
        assert_eq!(
            classify("builder@127.0.0.1: Permission denied (publickey).\n"),
            SshFailure::Denied
        );
        assert_eq!(
            classify("Load key \"/k\": incorrect passphrase supplied to decrypt private key\n"),
            SshFailure::Passphrase
        );
        assert_eq!(
            classify("ssh: connect to host 192.0.2.1 port 22: Connection timed out\n\n"),
            SshFailure::Other("ssh: connect to host 192.0.2.1 port 22: Connection timed out".into())
        );
        assert_eq!(classify(""), SshFailure::Other(String::new()));
    }

    #[test]
    fn the_known_hosts_line_names_the_host_as_nix_pins_it() {
        let mut entry = MachinesEntry::parse("ssh-ng://builder@127.0.0.1:2222 x86_64-linux").unwrap();
        let uri = entry.uri.parse::<StoreUri>().unwrap();
        assert!(known_hosts(&uri, &entry).is_none());
        entry.host_public_key = Some("ssh-ed25519 AAAAC3Nza key\n".into());
        let f = known_hosts(&uri, &entry).unwrap();
        assert_eq!(
            std::fs::read_to_string(f.path()).unwrap(),
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nza key\n"
        );
    }
}
