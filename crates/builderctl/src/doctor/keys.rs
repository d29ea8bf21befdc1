//! The line's keys: the client key (exists, 0600, no passphrase, root's) and the pinned host
//! key (present, decodes, the pool's).

use std::os::unix::fs::MetadataExt;

use nixpool_api::MachinesEntry;
use nixpool_api::ssh_keys::{self, PrivateKeyError};

use super::{Check, CheckId, Options, is_root};

pub(super) fn check_key(key: Option<&str>, subject: Option<&str>) -> Check {
    let id = CheckId::Key;
    let Some(key) = key else {
        return Check::warn(
            id,
            subject,
            "the line names no key (column 3 is `-`): ssh uses root's default identity",
        )
        .with_fix("create one with `sudo builderctl keygen` and write the line with `--key`");
    };
    let meta = match std::fs::metadata(key) {
        Ok(m) => m,
        Err(e) => {
            return Check::fail(id, subject, format!("{key}: {e}")).with_fix(format!(
                "create it: `sudo builderctl keygen --out {key}`, then authorize its .pub in the pool"
            ));
        }
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Check::fail(
            id,
            subject,
            format!(
                "{key} has mode {mode:04o}: others can read the private key, and ssh refuses it (\"UNPROTECTED PRIVATE KEY FILE\")"
            ),
        )
        .with_fix(format!("sudo chmod 600 {key}"));
    }
    let text = match std::fs::read_to_string(key) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !is_root() => {
            return Check::warn(
                id,
                subject,
                format!(
                    "{key} has mode {mode:04o} but cannot be read by uid {}; the daemon reads it as root",
                    nix::unistd::geteuid()
                ),
            )
            .with_fix("run doctor with sudo to check the key as the daemon sees it");
        }
        Err(e) => return Check::fail(id, subject, format!("{key}: {e}")),
    };
    match ssh_keys::parse_unencrypted_private_key(text.trim()) {
        Ok(_) => {}
        Err(PrivateKeyError::NotOpenSsh(e)) => {
            return Check::fail(id, subject, format!("{key} is not an OpenSSH private key ({e})"))
                .with_fix(format!("make a new one: `sudo builderctl keygen --out {key} --force`"));
        }
        Err(PrivateKeyError::Encrypted) => {
            return Check::fail(
                id,
                subject,
                format!("{key} has a passphrase: the daemon cannot type it and ssh fails in batch mode"),
            )
            .with_fix(format!(
                "remove it: `sudo ssh-keygen -p -N '' -f {key}` (or `sudo builderctl keygen --out {key} --force`)"
            ));
        }
    }
    if meta.uid() != 0 {
        return Check::warn(
            id,
            subject,
            format!(
                "{key} is owned by uid {}, not root: that user can read the key",
                meta.uid()
            ),
        )
        .with_fix(format!("sudo chown root {key}"));
    }
    Check::pass(
        id,
        subject,
        format!("{key}: mode {mode:04o}, owned by root, no passphrase"),
    )
}

/// `SHA256:...` of an OpenSSH public key, as ssh prints it.
pub(super) fn fingerprint(key: &str) -> String {
    ssh_keys::fingerprint(key).unwrap_or_else(|| "<not a public key>".into())
}

/// The public half of the private key file `key`, as authorized_keys takes it.
pub(super) fn public_of(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(key).ok()?;
    let k = ssh_keys::parse_private_key(text.trim()).ok()?;
    k.public_key().to_openssh().ok()
}

pub(super) fn check_host_key(opts: &Options, entry: &MachinesEntry, subject: Option<&str>) -> Check {
    let id = CheckId::HostKey;
    let rewrite = "write the line again with builderctl machines-file";
    let Some(pinned) = &entry.host_public_key else {
        return Check::fail(
            id,
            subject,
            "the line pins no host key (column 8 is `-`): the daemon checks root's known_hosts and fails with \"Host key verification failed\"",
        )
        .with_fix(format!("{rewrite} (it pins status.hostPublicKey)"));
    };
    if ssh_keys::parse_public_key(pinned).is_err() {
        return Check::fail(id, subject, "column 8 does not decode to an OpenSSH public key").with_fix(rewrite);
    }
    if let Some(expected) = &opts.expected_host_key
        && expected.trim() != pinned.trim()
    {
        return Check::fail(
            id,
            subject,
            format!(
                "the file pins {}, but the pool publishes {}",
                fingerprint(pinned),
                fingerprint(expected)
            ),
        )
        .with_fix("write the line again: `sudo builderctl machines-file <pool>`");
    }
    Check::pass(id, subject, format!("pinned: {}", fingerprint(pinned)))
}
