//! sshd's config, the host key and the builder's `authorized_keys`. The renderers are pure.

use std::path::Path;

use nixpool_api::ssh_keys;
use ssh_key::PublicKey;

use crate::error::HostKeyError;

/// Inputs of `sshd_config`.
#[derive(Clone, Debug)]
pub struct SshdSettings {
    pub port: u16,
    pub host_key: String,
    /// Directory holding one root-owned file per user (`%u`).
    pub authorized_keys_dir: String,
    pub pid_file: String,
    pub builder_user: String,
    pub max_jobs: u32,
}

/// `MaxStartups start:rate:full`, with `start` well above max-jobs so parallel builds that open
/// connections at once are never dropped.
pub fn max_startups(max_jobs: u32) -> (u32, u32, u32) {
    let start = (max_jobs.saturating_mul(4)).max(32);
    (start, 30, start.saturating_mul(2))
}

pub fn render_sshd_config(s: &SshdSettings) -> String {
    let (start, rate, full) = max_startups(s.max_jobs);
    format!(
        "# Written by nixpool-agent; rewritten at every start.
Port {port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {ak}/%u
AuthorizedKeysCommand none
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
HostbasedAuthentication no
PermitRootLogin no
AllowUsers {user}
UsePAM no
StrictModes yes
AllowTcpForwarding no
AllowStreamLocalForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
GatewayPorts no
PermitTTY no
PermitUserEnvironment no
PermitUserRC no
AcceptEnv {slots_env}
ClientAliveInterval 15
ClientAliveCountMax 4
MaxStartups {start}:{rate}:{full}
MaxSessions {sessions}
LoginGraceTime 30
UseDNS no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
",
        port = s.port,
        host_key = s.host_key,
        pid_file = s.pid_file,
        ak = s.authorized_keys_dir,
        user = s.builder_user,
        sessions = s.max_jobs.max(10),
        slots_env = crate::gate::slots::SLOTS_ENV,
    )
}

/// The forced command every key gets.
pub fn forced_command(agent: &Path, daemon_socket: &Path, nix_store: &Path, slots_dir: &Path) -> String {
    format!(
        "{} gate --daemon-socket {} --nix-store {} --slots-dir {}",
        agent.display(),
        daemon_socket.display(),
        nix_store.display(),
        slots_dir.display()
    )
}

/// A skipped line of the authorized-keys ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

/// The builder's `authorized_keys`: every key of the ConfigMap with `restrict` and the forced
/// command; of its own options only those that narrow access (`from`, `expiry-time`,
/// `verify-required`) are kept. Lines that are not public keys are reported, not copied.
pub fn render_authorized_keys(secret: &str, command: &str) -> (String, Vec<BadLine>) {
    // sshd's `opt_dequote` unescapes only `\"`; any other backslash is kept as it is. So only
    // quotes are escaped, and the command may not end in `\` (it would escape the closing
    // quote): the agent's own paths never do.
    debug_assert!(
        !command.ends_with('\\'),
        "a forced command ending in a backslash: {command}"
    );
    let command = command.replace('"', "\\\"");
    let mut out = String::from("# Written by nixpool-agent from the authorized-keys ConfigMap.\n");
    let mut bad = Vec::new();
    for (i, raw) in secret.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_key_line(line).and_then(|key| Ok((key, nixpool_api::rules::kept_key_options(line)?))) {
            Ok((key, kept)) => {
                let key = key.to_openssh().expect("a parsed key encodes");
                out.push_str(&format!("restrict,command=\"{command}\"{kept} {key}\n"));
            }
            Err(reason) => bad.push(BadLine { line: i + 1, reason }),
        }
    }
    (out, bad)
}

/// A public key line, with or without leading options.
fn parse_key_line(line: &str) -> Result<PublicKey, String> {
    ssh_keys::parse_authorized_line(line)
        .map(|e| e.public_key().clone())
        .map_err(|e| format!("not an OpenSSH public key ({e})"))
}

/// Parses the mounted host key: an OpenSSH ed25519 private key. Returns the public key line.
pub fn check_host_key(text: &str) -> Result<String, HostKeyError> {
    let key = ssh_keys::parse_host_key(text).map_err(|e| match e {
        ssh_keys::HostKeyError::NotOpenSsh(reason) => HostKeyError::Parse(reason),
        ssh_keys::HostKeyError::NotEd25519(algorithm) => HostKeyError::Algorithm(algorithm),
        ssh_keys::HostKeyError::Encrypted => HostKeyError::Encrypted,
    })?;
    Ok(ssh_keys::public_line_without_comment(key.public_key()).expect("a public key encodes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 dev@laptop";

    #[test]
    fn keys_get_restrict_and_the_forced_command_and_lose_their_options() {
        let secret = format!("# comment\n{KEY}\n\nno-pty,permitopen=\"x:1\" {KEY}\nnot a key\n");
        let (out, bad) = render_authorized_keys(&secret, "/bin/nixpool-agent gate");
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines.len(), 2);
        for l in lines {
            assert!(
                l.starts_with("restrict,command=\"/bin/nixpool-agent gate\" ssh-ed25519 AAAA"),
                "{l}"
            );
            assert!(!l.contains("permitopen"));
        }
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 5);
    }

    #[test]
    fn options_that_narrow_access_are_kept() {
        let secret =
            format!("from=\"10.0.0.0/8\",command=\"sh\",expiry-time=\"20270101\" {KEY}\nfrom=\"unclosed {KEY}\n");
        let (out, bad) = render_authorized_keys(&secret, "/bin/nixpool-agent gate");
        let line = out.lines().find(|l| !l.starts_with('#')).unwrap();
        assert!(
            line.starts_with("restrict,command=\"/bin/nixpool-agent gate\",from=\"10.0.0.0/8\",expiry-time=\"20270101\" ssh-ed25519 AAAA"),
            "{line}"
        );
        assert_eq!(bad.len(), 1, "a line whose options cannot be read is reported");
        assert_eq!(bad[0].line, 2);
    }

    #[test]
    fn quotes_in_the_command_are_escaped() {
        let (out, _) = render_authorized_keys(KEY, "a \"b\"");
        assert!(out.contains("command=\"a \\\"b\\\"\""));
    }

    #[test]
    fn sshd_config_is_hardened() {
        let c = render_sshd_config(&SshdSettings {
            port: 22,
            host_key: "/etc/ssh/k".into(),
            authorized_keys_dir: "/etc/ssh/authorized_keys.d".into(),
            pid_file: "/run/sshd.pid".into(),
            builder_user: "builder".into(),
            max_jobs: 16,
        });
        for line in [
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "AllowUsers builder",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "ClientAliveInterval 15",
            "ClientAliveCountMax 4",
            "MaxStartups 64:30:128",
            "LogLevel VERBOSE",
            "AuthorizedKeysFile /etc/ssh/authorized_keys.d/%u",
            "PermitUserEnvironment no",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line:?}");
        }
        // The only variable a client may send is the gateway's slot count.
        let accept: Vec<&str> = c.lines().filter(|l| l.starts_with("AcceptEnv")).collect();
        assert_eq!(accept, ["AcceptEnv NIXPOOL_GATE_SLOTS"]);
        let (start, _, _) = max_startups(100);
        assert!(start > 100);
    }

    #[test]
    fn host_key_must_be_ed25519_private() {
        let key = ssh_keys::generate_ed25519().unwrap();
        let text = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let public = check_host_key(&text).unwrap();
        assert!(public.starts_with("ssh-ed25519 "));
        assert!(matches!(check_host_key(KEY), Err(HostKeyError::Parse(_))));
    }
}
