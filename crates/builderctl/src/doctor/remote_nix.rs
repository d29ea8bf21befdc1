//! Nix through the line: `nix store ping` over ssh-ng (`store-ping`), and a probe build that
//! only a user the builder trusts may send (`trusted-user`).

use std::process::{Command, Stdio};
use std::time::SystemTime;

use base64::Engine;
use nixpool_api::MachinesEntry;
use nixpool_api::machines::StoreUri;

use super::process::{RunError, last_lines, output_within};
use super::{Check, CheckId, Options, is_root};

/// The line's URI with its key and pinned host key as store parameters, as Nix builds it.
fn uri_with_keys(entry: &MachinesEntry) -> String {
    let mut params = Vec::new();
    if let Some(k) = &entry.ssh_key {
        params.push(format!("ssh-key={k}"));
    }
    if let Some(h) = &entry.host_public_key {
        params.push(format!(
            "base64-ssh-public-host-key={}",
            base64::engine::general_purpose::STANDARD.encode(h.trim())
        ));
    }
    if params.is_empty() {
        entry.uri.clone()
    } else {
        format!("{}?{}", entry.uri, params.join("&"))
    }
}

pub(super) fn check_store_ping(opts: &Options, entry: &MachinesEntry, uri: &StoreUri, subject: Option<&str>) -> Check {
    let id = CheckId::StorePing;
    if uri.scheme != "ssh-ng" {
        return Check::skip(id, subject, format!("{} is not ssh-ng://", entry.uri))
            .with_fix("use ssh-ng:// (builderctl machines-file writes it)");
    }
    let mut cmd = Command::new(&opts.nix);
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "ping",
        "--store",
    ])
    .arg(uri_with_keys(entry))
    .args(["--option", "connect-timeout", &opts.connect_timeout_secs()])
    .stdin(Stdio::null());
    match output_within(&mut cmd, opts.remaining()) {
        Err(RunError::TimedOut) => opts.timed_out(id, subject, "nix store ping over ssh-ng"),
        Err(RunError::Spawn(err)) => Check::fail(id, subject, format!("cannot run {}: {err}", opts.nix))
            .with_fix("is Nix installed and on PATH?"),
        Ok(o) if o.status.success() => Check::pass(
            id,
            subject,
            format!(
                "nix store ping over ssh-ng answers ({})",
                String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim()
            ),
        ),
        Ok(o) => Check::fail(
            id,
            subject,
            format!(
                "nix store ping over ssh-ng fails: {}",
                last_lines(&String::from_utf8_lossy(&o.stderr), 3)
            ),
        )
        .with_fix("the builder's nix-daemon does not answer through ssh: check the pool's builders are Ready and their logs (`kubectl logs`)"),
    }
}

/// What the probe build's outcome says about the builder.
#[derive(Debug, PartialEq, Eq)]
enum ProbeOutcome {
    /// The builder does not trust the user.
    NotTrusted,
    Built,
    /// Nix did not send it to the builder (systems or features do not match).
    NotPicked,
    /// The builder took it and the derivation failed there: trusted all the same.
    FailedOnBuilder,
    Failed,
}

fn classify_probe(succeeded: bool, stderr: &str) -> ProbeOutcome {
    if stderr.contains("not privileged to build input-addressed derivations")
        || stderr.contains("you are not privileged")
    {
        ProbeOutcome::NotTrusted
    } else if succeeded {
        ProbeOutcome::Built
    } else if stderr.contains("unable to start any build")
        || stderr.contains("required system or feature not available")
    {
        ProbeOutcome::NotPicked
    } else if stderr.contains("builder for") {
        ProbeOutcome::FailedOnBuilder
    } else {
        ProbeOutcome::Failed
    }
}

pub(super) fn check_trusted(opts: &Options, entry: &MachinesEntry, line: &str, subject: Option<&str>) -> Check {
    let id = CheckId::TrustedUser;
    if !is_root() {
        return Check::skip(
            id,
            subject,
            "not root: the probe build needs to choose its builder, which only root (a trusted user) may",
        )
        .with_fix("run doctor with sudo");
    }
    let system = entry.systems.first().cloned().unwrap_or_else(|| "x86_64-linux".into());
    let nonce = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let expr = format!(
        "derivation {{ name = \"builderctl-doctor-probe\"; system = \"{system}\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo ok > $out\" ]; nonce = \"{nonce}\"; }}"
    );
    let mut cmd = Command::new(&opts.nix_build);
    cmd.args(["--no-out-link", "--max-jobs", "0", "-E", &expr])
        .args(["--option", "builders", line])
        .args(["--option", "connect-timeout", &opts.connect_timeout_secs()])
        .stdin(Stdio::null());
    if !entry.mandatory_features.is_empty() {
        cmd.args(["--option", "system-features", &entry.mandatory_features.join(" ")]);
    }
    let out = match output_within(&mut cmd, opts.remaining()) {
        Ok(o) => o,
        Err(RunError::TimedOut) => return opts.timed_out(id, subject, "the probe build"),
        Err(RunError::Spawn(err)) => {
            return Check::fail(id, subject, format!("cannot run {}: {err}", opts.nix_build))
                .with_fix("is Nix installed and on PATH?");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let user = entry
        .uri
        .parse::<StoreUri>()
        .ok()
        .and_then(|u| u.user)
        .unwrap_or_else(|| "the login user".into());
    match classify_probe(out.status.success(), &stderr) {
        ProbeOutcome::NotTrusted => Check::fail(
            id,
            subject,
            format!(
                "the builder does not trust {user}: \"you are not privileged to build input-addressed derivations\""
            ),
        )
        .with_fix(format!(
            "the builder's nix.conf needs `trusted-users = {user}` (nixpool builders set it; a hand-made builder needs it added and its nix-daemon restarted)"
        )),
        ProbeOutcome::Built => Check::pass(
            id,
            subject,
            format!("a probe derivation for {system} was built on the builder as {user}"),
        ),
        ProbeOutcome::NotPicked => Check::fail(
            id,
            subject,
            format!(
                "Nix did not pick the builder for a {system} build: {}",
                last_lines(&stderr, 2)
            ),
        )
        .with_fix("check the line's systems and features (column 2, 6, 7) against what you build"),
        ProbeOutcome::FailedOnBuilder => Check::pass(
            id,
            subject,
            format!(
                "the builder accepted a build from {user} (the probe itself failed there: {})",
                last_lines(&stderr, 1)
            ),
        ),
        ProbeOutcome::Failed => Check::fail(
            id,
            subject,
            format!("the probe build failed: {}", last_lines(&stderr, 3)),
        )
        .with_fix("run it with -v to see more: sudo nix-build --max-jobs 0 -v ..."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_builds_stderr_says_whether_the_builder_trusts_the_user() {
        let untrusted = "building '/nix/store/abc-builderctl-doctor-probe.drv' on 'ssh-ng://builder@h'...\nerror: you are not privileged to build input-addressed derivations\n";
        assert_eq!(classify_probe(false, untrusted), ProbeOutcome::NotTrusted);
        // Nix may still exit 0 after a remote refusal falls back; the refusal wins.
        assert_eq!(classify_probe(true, untrusted), ProbeOutcome::NotTrusted);
        assert_eq!(
            classify_probe(true, "building '/nix/store/abc.drv' on 'ssh-ng://h'...\n"),
            ProbeOutcome::Built
        );
        assert_eq!(
            classify_probe(
                false,
                "error: unable to start any build; either increase '--max-jobs' or enable remote builds.\n"
            ),
            ProbeOutcome::NotPicked
        );
        assert_eq!(
            classify_probe(
                false,
                "error: a 'aarch64-linux' with features {} is required to build '/nix/store/abc.drv', but I am a 'x86_64-linux' with features {}; required system or feature not available\n"
            ),
            ProbeOutcome::NotPicked
        );
        assert_eq!(
            classify_probe(
                false,
                "error: builder for '/nix/store/abc-builderctl-doctor-probe.drv' failed with exit code 127\n"
            ),
            ProbeOutcome::FailedOnBuilder
        );
        assert_eq!(
            classify_probe(false, "error: cannot connect to 'h'\n"),
            ProbeOutcome::Failed
        );
    }

    #[test]
    fn the_ping_uri_carries_the_lines_key_and_host_key() {
        let mut entry = MachinesEntry::parse("ssh-ng://builder@h:2222 x86_64-linux").unwrap();
        assert_eq!(uri_with_keys(&entry), "ssh-ng://builder@h:2222");
        entry.ssh_key = Some("/etc/nix/nixpool_ed25519".into());
        entry.host_public_key = Some("ssh-ed25519 AAAA\n".into());
        let encoded = base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAA");
        assert_eq!(
            uri_with_keys(&entry),
            format!("ssh-ng://builder@h:2222?ssh-key=/etc/nix/nixpool_ed25519&base64-ssh-public-host-key={encoded}")
        );
    }
}
