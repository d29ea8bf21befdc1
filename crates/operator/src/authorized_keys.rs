//! Authorized keys: validated, de-duplicated, and every bad line accounted for.

use nixpool_api::ssh_keys;
use std::collections::HashSet;

/// Where a key line came from, for messages: `spec.ssh.authorizedKeys[2]` or
/// `Secret team-a key keys line 3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin(pub String);

/// A line that is not a usable key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadKey {
    pub origin: Origin,
    pub reason: String,
}

impl std::fmt::Display for BadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.origin.0, self.reason)
    }
}

/// The merged `authorized_keys` content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizedKeys {
    /// One key per line, in the order first seen, without duplicates.
    pub lines: Vec<String>,
    pub bad: Vec<BadKey>,
    seen: HashSet<String>,
}

impl AuthorizedKeys {
    /// Adds one line. Blank lines and `#` comments are skipped; a key already present (same key
    /// material, whatever its comment) is skipped; anything else unparsable is recorded as bad.
    pub fn add(&mut self, line: &str, origin: impl FnOnce() -> Origin) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return;
        }
        match check(line) {
            Ok(key_id) => {
                if self.seen.insert(key_id) {
                    self.lines.push(line.to_string());
                }
            }
            Err(reason) => self.bad.push(BadKey {
                origin: origin(),
                reason,
            }),
        }
    }

    /// Adds every line of a Secret value.
    /// Every line of one key of an object; `source` names it, e.g. `ConfigMap team-keys`.
    pub fn add_text(&mut self, text: &str, source: &str, key: &str) {
        for (i, line) in text.lines().enumerate() {
            self.add(line, || Origin(format!("{source} key {key} line {}", i + 1)));
        }
    }

    /// The file content.
    pub fn render(&self) -> String {
        let mut out = self.lines.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// Checks one `authorized_keys` line; returns the key material (algorithm + base64) that makes
/// it unique.
pub fn check(line: &str) -> Result<String, String> {
    let entry = ssh_keys::parse_authorized_line(line).map_err(|e| {
        format!("not an OpenSSH public key line ({e}); paste the whole line of the .pub file, e.g. ssh-ed25519 AAAA... you@laptop")
    })?;
    let opts = entry.config_opts();
    // sshd reads option names in any case.
    if opts
        .iter()
        .any(|o| o.get(..8).is_some_and(|n| n.eq_ignore_ascii_case("command=")))
    {
        return Err(
            "a command= option is not allowed: the builder forces its own command (the Nix remote-build protocol)"
                .into(),
        );
    }
    // The builder keeps only the options that narrow access; the rest must at least parse the
    // same way there.
    nixpool_api::rules::kept_key_options(line)
        .map_err(|e| format!("its options cannot be read ({e}); quote each value, e.g. from=\"10.0.0.0/8\""))?;
    ssh_keys::public_line_without_comment(entry.public_key()).map_err(|e| format!("cannot encode the key ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice@mac";
    const B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qB bob@mac";

    #[test]
    fn merges_dedupes_and_reports_bad_lines_with_their_origin() {
        let mut keys = AuthorizedKeys::default();
        keys.add(A, || Origin("spec.ssh.authorizedKeys[0]".into()));
        keys.add_text(
            &format!("# team keys\n\n{B}\n{}\nnot a key\n", A.replace("alice", "alice-again")),
            "ConfigMap team-a",
            "keys",
        );
        assert_eq!(keys.lines, vec![A.to_string(), B.to_string()]);
        assert_eq!(keys.bad.len(), 1);
        assert_eq!(keys.bad[0].origin, Origin("ConfigMap team-a key keys line 5".into()));
        assert!(
            keys.bad[0]
                .to_string()
                .starts_with("ConfigMap team-a key keys line 5: not an OpenSSH public key line")
        );
        assert_eq!(keys.render(), format!("{A}\n{B}\n"));
    }

    #[test]
    fn refuses_a_forced_command_of_its_own() {
        let err = check(&format!("command=\"/bin/sh\" {A}")).unwrap_err();
        assert!(err.contains("command= option is not allowed"), "{err}");
        assert!(
            check(&format!("COMMAND=\"/bin/sh\" {A}")).is_err(),
            "sshd reads option names in any case"
        );
        assert!(check(&format!("from=\"10.0.0.0/8\" {A}")).is_ok());
    }
}
