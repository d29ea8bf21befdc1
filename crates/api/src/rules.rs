//! Rules about a spec that more than one binary enforces, kept in one place. Each rule feeds:
//! - the CRD's CEL, through a rule string a test checks against these lists;
//! - the operator, which runs that CEL;
//! - the agent, which checks its config with [`crate::AgentConfig::problems`].
//!
//! So nothing the API server accepts can stop a builder from starting.

/// The group of Nix's build users in a builder.
pub const BUILD_GROUP: &str = "nixbld";
/// The account sshd drops privileges to in a builder.
pub const SSHD_USER: &str = "sshd";

/// nix.conf settings `spec.nixConfig` may not set, nor their `extra-` forms. The agent writes
/// the first group itself from pool fields. The second would make nix-daemon (root) run a
/// program or plugin the pool names.
pub const REFUSED_NIX_SETTINGS: &[&str] = &[
    "build-users-group",
    "trusted-users",
    "allowed-users",
    "max-jobs",
    "cores",
    "sandbox",
    "system-features",
    "platforms",
    "substituters",
    "trusted-public-keys",
    "min-free",
    "max-free",
    "post-build-hook",
    "ssl-cert-file",
    "builders",
    "secret-key-files",
    // Programs and plugins run by the daemon.
    "pre-build-hook",
    "build-hook",
    "diff-hook",
    "plugin-files",
];

/// The CEL rule on `spec.nixConfig` keys: every name of [`REFUSED_NIX_SETTINGS`] and its
/// `extra-` form. It is a literal because the CRD derive needs one; a test keeps it equal to
/// [`nix_settings_rule`].
pub const NIX_SETTINGS_RULE: &str = "self.all(k, !(k in ['build-users-group', 'extra-build-users-group', 'trusted-users', 'extra-trusted-users', 'allowed-users', 'extra-allowed-users', 'max-jobs', 'extra-max-jobs', 'cores', 'extra-cores', 'sandbox', 'extra-sandbox', 'system-features', 'extra-system-features', 'platforms', 'extra-platforms', 'substituters', 'extra-substituters', 'trusted-public-keys', 'extra-trusted-public-keys', 'min-free', 'extra-min-free', 'max-free', 'extra-max-free', 'post-build-hook', 'extra-post-build-hook', 'ssl-cert-file', 'extra-ssl-cert-file', 'builders', 'extra-builders', 'secret-key-files', 'extra-secret-key-files', 'pre-build-hook', 'extra-pre-build-hook', 'build-hook', 'extra-build-hook', 'diff-hook', 'extra-diff-hook', 'plugin-files', 'extra-plugin-files']))";

pub const NIX_SETTINGS_MESSAGE: &str = "spec.nixConfig: this setting is set by nixpool from a pool field, or would make nix-daemon run a program as root; use spec.maxJobs, spec.cores, spec.systems, spec.supportedFeatures, spec.cache or spec.gc instead (see docs/security.md)";

/// [`NIX_SETTINGS_RULE`] built from the list.
pub fn nix_settings_rule() -> String {
    let names: Vec<String> = REFUSED_NIX_SETTINGS
        .iter()
        .flat_map(|s| [format!("'{s}'"), format!("'extra-{s}'")])
        .collect();
    format!("self.all(k, !(k in [{}]))", names.join(", "))
}

/// Whether `spec.nixConfig` may not set this setting.
pub fn refused_nix_setting(name: &str) -> bool {
    let base = name.strip_prefix("extra-").unwrap_or(name);
    REFUSED_NIX_SETTINGS.contains(&name) || REFUSED_NIX_SETTINGS.contains(&base)
}

/// The CEL rule on `spec.ssh.user`; [`builder_user_problem`] is the same rule in Rust.
pub const USER_RULE: &str =
    "self.matches('^[a-z_][a-z0-9_-]{0,30}$') && !(self in ['root', 'sshd', 'nobody']) && !self.startsWith('nixbld')";

pub const USER_MESSAGE: &str =
    "spec.ssh.user: use a lower-case POSIX user name other than root, sshd, nobody or nixbld*, e.g. builder";

/// Why a name cannot be the builder user, if it cannot.
pub fn builder_user_problem(user: &str) -> Option<String> {
    let mut chars = user.chars();
    let shape = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && user.len() <= 31;
    if !shape {
        return Some(format!(
            "{user:?} is not a user name: use lower-case letters, digits, `_` and `-`, at most 31, e.g. builder"
        ));
    }
    if user == "root" || user == SSHD_USER || user == "nobody" || user.starts_with(BUILD_GROUP) {
        return Some(format!(
            "{user:?} is reserved (root, sshd, nobody and the nixbld build users): pick another name such as builder"
        ));
    }
    None
}

/// Whether a string holds a control character (a line break would start a new setting in
/// nix.conf, sshd_config or a machines line).
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Options of a user's `authorized_keys` line that nixpool keeps on the builder: each one only
/// narrows who may log in. Every other option is dropped (the builder's own `restrict` and
/// forced command replace them).
pub const KEPT_KEY_OPTIONS: &[&str] = &["from", "expiry-time", "verify-required"];

/// The options of an `authorized_keys` line (empty when it starts with the key type), as
/// `name` / `name="value"` pairs, or why they cannot be read.
pub fn key_options(line: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let line = line.trim();
    if has_control(line) {
        return Err("holds a control character".into());
    }
    let first = line.split_whitespace().next().unwrap_or_default();
    if first.starts_with("ssh-") || first.starts_with("ecdsa-") || first.starts_with("sk-") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        let name_end = rest.find(['=', ',', ' ', '\t']).unwrap_or(rest.len());
        let name = rest[..name_end].to_ascii_lowercase();
        if name.is_empty() {
            return Err("an empty option".into());
        }
        rest = &rest[name_end..];
        let value = if let Some(after) = rest.strip_prefix("=\"") {
            let close = after
                .find('"')
                .ok_or_else(|| format!("option {name}: no closing quote"))?;
            let v = &after[..close];
            if v.contains('\\') {
                return Err(format!("option {name}: escaped quotes are not supported"));
            }
            rest = &after[close + 1..];
            Some(v.to_string())
        } else if rest.starts_with('=') {
            return Err(format!("option {name}: put the value in double quotes"));
        } else {
            None
        };
        out.push((name, value));
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if rest.starts_with([' ', '\t']) {
            return Ok(out);
        } else {
            return Err("options are not followed by a key".into());
        }
    }
}

/// The kept options of a key line, rendered for the builder's `authorized_keys`
/// (`,from="…",expiry-time="…"`, or empty).
pub fn kept_key_options(line: &str) -> Result<String, String> {
    let mut out = String::new();
    for (name, value) in key_options(line)? {
        if !KEPT_KEY_OPTIONS.contains(&name.as_str()) {
            continue;
        }
        match value {
            Some(v) => out.push_str(&format!(",{name}=\"{v}\"")),
            None => out.push_str(&format!(",{name}")),
        }
    }
    Ok(out)
}

/// What a key holder may run over SSH: what Nix runs for a remote store. The builder's gate and
/// the pool's gateway both decide with [`remote_command`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteCommand {
    /// `nix-daemon --stdio` (`ssh-ng://`).
    Daemon,
    /// `nix-store --serve [--write]` (`ssh://`).
    Serve { write: bool },
}

/// Decides on the client's command. The program may be named by path (Nix's `remote-program`),
/// but the configured binary is run, never the client's path.
pub fn remote_command(original: Option<&str>) -> Result<RemoteCommand, String> {
    let Some(original) = original.map(str::trim).filter(|s| !s.is_empty()) else {
        return Err("no command given: this account has no shell".into());
    };
    let words: Vec<&str> = original.split_whitespace().collect();
    let program = words[0].rsplit('/').next().unwrap_or(words[0]);
    match (program, &words[1..]) {
        ("nix-daemon", ["--stdio"]) => Ok(RemoteCommand::Daemon),
        ("nix-store", ["--serve", "--write"]) | ("nix-store", ["--write", "--serve"]) => {
            Ok(RemoteCommand::Serve { write: true })
        }
        ("nix-store", ["--serve"]) => Ok(RemoteCommand::Serve { write: false }),
        _ => Err(format!("refusing {original:?}")),
    }
}

impl RemoteCommand {
    /// The command line the builder runs for it.
    pub fn command_line(&self) -> &'static str {
        match self {
            RemoteCommand::Daemon => "nix-daemon --stdio",
            RemoteCommand::Serve { write: true } => "nix-store --serve --write",
            RemoteCommand::Serve { write: false } => "nix-store --serve",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cel_rule_lists_exactly_the_refused_settings_and_their_extra_forms() {
        assert_eq!(NIX_SETTINGS_RULE, nix_settings_rule());
        assert!(refused_nix_setting("extra-trusted-users"));
        assert!(refused_nix_setting("plugin-files"));
        assert!(refused_nix_setting("extra-platforms"));
        assert!(!refused_nix_setting("keep-outputs"));
        assert!(!refused_nix_setting("extra-experimental-features"));
    }

    #[test]
    fn builder_users() {
        for ok in [
            "builder",
            "_b",
            "ci-builder",
            "a1234567890123456789012345678901"[..31].as_ref(),
        ] {
            assert_eq!(builder_user_problem(ok), None, "{ok}");
        }
        for bad in [
            "root",
            "sshd",
            "nobody",
            "nixbld",
            "nixbld1",
            "Builder",
            "1b",
            "",
            "a b",
            &"a".repeat(32),
        ] {
            assert!(builder_user_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn restrictive_key_options_are_kept_and_others_dropped() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice";
        assert_eq!(kept_key_options(key).unwrap(), "");
        let line = format!("from=\"10.0.0.0/8,192.168.1.1\",command=\"sh\",no-pty,expiry-time=\"20270101\" {key}");
        assert_eq!(
            kept_key_options(&line).unwrap(),
            ",from=\"10.0.0.0/8,192.168.1.1\",expiry-time=\"20270101\""
        );
        assert_eq!(
            kept_key_options(&format!("verify-required {key}")).unwrap(),
            ",verify-required"
        );
        for bad in [
            format!("from=\"10.0.0.1 {key}"),
            format!("from=10.0.0.1 {key}"),
            format!("from=\"a\\\"b\" {key}"),
            format!("from=\"a\"x {key}"),
            format!("from=\"a\u{7}\" {key}"),
        ] {
            assert!(kept_key_options(&bad).is_err(), "{bad}");
        }
    }
}
