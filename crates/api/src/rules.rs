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
    // Not a setting: `include = x` is a line Nix refuses, so nix-daemon would not start.
    "include",
    // Old names Nix still reads for settings above: a later line under the old name wins.
    "build-max-jobs",
    "build-cores",
    "build-use-sandbox",
    "build-use-chroot",
    "binary-caches",
    "binary-cache-public-keys",
];

/// Nix settings (and old names of settings) Nix reads as a Boolean, in Nix 2.8 and 2.26: any
/// value but [`BOOLEAN_NIX_VALUES`] makes every Nix command, nix-daemon included, refuse
/// nix.conf. Refused settings are left out. A test checks the list against the real Nix.
pub const BOOLEAN_NIX_SETTINGS: &[&str] = &[
    "abort-on-warn",
    "accept-flake-config",
    "allow-dirty",
    "allow-dirty-locks",
    "allow-import-from-derivation",
    "allow-new-privileges",
    "allow-symlinked-store",
    "allow-unsafe-native-code-during-evaluation",
    "always-allow-substitutes",
    "auto-allocate-uids",
    "auto-optimise-store",
    "build-compress-log",
    "build-fallback",
    "build-impersonate-linux-26",
    "build-keep-log",
    "build-use-substitutes",
    "builders-use-substitutes",
    "compress-build-log",
    "debugger-on-trace",
    "debugger-on-warn",
    "enforce-determinism",
    "env-keep-derivations",
    "eval-cache",
    "fallback",
    "filter-syscalls",
    "fsync-metadata",
    "fsync-store-paths",
    "gc-keep-derivations",
    "gc-keep-outputs",
    "http2",
    "ignore-try",
    "impersonate-linux-26",
    "keep-build-log",
    "keep-derivations",
    "keep-env-derivations",
    "keep-failed",
    "keep-going",
    "keep-outputs",
    "nix-shell-always-looks-for-shell-nix",
    "nix-shell-shebang-arguments-relative-to-script",
    "preallocate-contents",
    "print-missing",
    "pure-eval",
    "require-drop-supplementary-groups",
    "require-sigs",
    "restrict-eval",
    "run-diff-hook",
    "sandbox-fallback",
    "show-trace",
    "substitute",
    "sync-before-registering",
    "trace-function-calls",
    "trace-verbose",
    "trust-tarballs-from-git-forges",
    "use-case-hack",
    "use-cgroups",
    "use-registries",
    "use-sqlite-wal",
    "use-xdg-base-directories",
    "warn-dirty",
];

/// What Nix takes as a Boolean.
pub const BOOLEAN_NIX_VALUES: &[&str] = &["true", "false", "yes", "no", "1", "0"];

/// Nix settings (and old names) Nix reads as a whole number, in Nix 2.8 and 2.26. Refused ones
/// are left out. Their value must be 1 to 9 digits: what every Nix version parses into any of
/// its integer types (2.26 also takes unit suffixes such as `1K`, 2.8 does not).
pub const INTEGER_NIX_SETTINGS: &[&str] = &[
    "binary-caches-parallel-connections",
    "build-max-log-size",
    "build-max-silent-time",
    "build-poll-interval",
    "build-repeat",
    "build-timeout",
    "connect-timeout",
    "download-attempts",
    "download-buffer-size",
    "download-speed",
    "gc-reserved-space",
    "http-connections",
    "id-count",
    "log-lines",
    "max-build-log-size",
    "max-call-depth",
    "max-silent-time",
    "max-substitution-jobs",
    "min-free-check-interval",
    "nar-buffer-size",
    "narinfo-cache-negative-ttl",
    "narinfo-cache-positive-ttl",
    "repeat",
    "stalled-download-timeout",
    "start-id",
    "substitution-max-jobs",
    "tarball-ttl",
    "timeout",
    "warn-large-path-threshold",
];

/// The CEL rule on `spec.nixConfig` values of Boolean settings; a literal for the CRD derive,
/// kept equal to [`nix_value_rules`] by a test.
pub const NIX_BOOLEAN_RULE: &str = "self.all(k, !(k in ['abort-on-warn', 'accept-flake-config', 'allow-dirty', 'allow-dirty-locks', 'allow-import-from-derivation', 'allow-new-privileges', 'allow-symlinked-store', 'allow-unsafe-native-code-during-evaluation', 'always-allow-substitutes', 'auto-allocate-uids', 'auto-optimise-store', 'build-compress-log', 'build-fallback', 'build-impersonate-linux-26', 'build-keep-log', 'build-use-substitutes', 'builders-use-substitutes', 'compress-build-log', 'debugger-on-trace', 'debugger-on-warn', 'enforce-determinism', 'env-keep-derivations', 'eval-cache', 'fallback', 'filter-syscalls', 'fsync-metadata', 'fsync-store-paths', 'gc-keep-derivations', 'gc-keep-outputs', 'http2', 'ignore-try', 'impersonate-linux-26', 'keep-build-log', 'keep-derivations', 'keep-env-derivations', 'keep-failed', 'keep-going', 'keep-outputs', 'nix-shell-always-looks-for-shell-nix', 'nix-shell-shebang-arguments-relative-to-script', 'preallocate-contents', 'print-missing', 'pure-eval', 'require-drop-supplementary-groups', 'require-sigs', 'restrict-eval', 'run-diff-hook', 'sandbox-fallback', 'show-trace', 'substitute', 'sync-before-registering', 'trace-function-calls', 'trace-verbose', 'trust-tarballs-from-git-forges', 'use-case-hack', 'use-cgroups', 'use-registries', 'use-sqlite-wal', 'use-xdg-base-directories', 'warn-dirty']) || self[k] in ['true', 'false', 'yes', 'no', '1', '0'])";

pub const NIX_BOOLEAN_MESSAGE: &str = "spec.nixConfig: Nix reads this setting as a Boolean (keep-outputs, require-sigs, …): set true or false; any other value makes nix-daemon refuse nix.conf";

/// The CEL rule on `spec.nixConfig` values of integer settings (see [`NIX_BOOLEAN_RULE`]).
pub const NIX_INTEGER_RULE: &str = "self.all(k, !(k in ['binary-caches-parallel-connections', 'build-max-log-size', 'build-max-silent-time', 'build-poll-interval', 'build-repeat', 'build-timeout', 'connect-timeout', 'download-attempts', 'download-buffer-size', 'download-speed', 'gc-reserved-space', 'http-connections', 'id-count', 'log-lines', 'max-build-log-size', 'max-call-depth', 'max-silent-time', 'max-substitution-jobs', 'min-free-check-interval', 'nar-buffer-size', 'narinfo-cache-negative-ttl', 'narinfo-cache-positive-ttl', 'repeat', 'stalled-download-timeout', 'start-id', 'substitution-max-jobs', 'tarball-ttl', 'timeout', 'warn-large-path-threshold']) || self[k].matches('^[0-9]{1,9}$'))";

pub const NIX_INTEGER_MESSAGE: &str = "spec.nixConfig: Nix reads this setting as a whole number (max-silent-time, timeout, connect-timeout, …): set 1 to 9 digits, in the setting's unit (seconds, bytes), without a suffix; any other value makes nix-daemon refuse nix.conf";

/// [`NIX_BOOLEAN_RULE`] and [`NIX_INTEGER_RULE`] built from the lists.
pub fn nix_value_rules() -> (String, String) {
    let list = |l: &[&str]| l.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
    (
        format!(
            "self.all(k, !(k in [{}]) || self[k] in [{}])",
            list(BOOLEAN_NIX_SETTINGS),
            list(BOOLEAN_NIX_VALUES)
        ),
        format!(
            "self.all(k, !(k in [{}]) || self[k].matches('^[0-9]{{1,9}}$'))",
            list(INTEGER_NIX_SETTINGS)
        ),
    )
}

/// Why Nix would refuse `name = value` for its type (a Boolean or integer setting), if it would.
pub fn nix_setting_value_problem(name: &str, value: &str) -> Option<String> {
    if BOOLEAN_NIX_SETTINGS.contains(&name) && !BOOLEAN_NIX_VALUES.contains(&value) {
        return Some(format!(
            "`{name}` is a Boolean setting and {value:?} is not one: set true or false"
        ));
    }
    let digits = !value.is_empty() && value.len() <= 9 && value.bytes().all(|b| b.is_ascii_digit());
    if INTEGER_NIX_SETTINGS.contains(&name) && !digits {
        return Some(format!(
            "`{name}` is a whole number and {value:?} is not 1 to 9 digits: set it in the setting's unit (seconds, bytes), without a suffix"
        ));
    }
    None
}

/// The CEL rule on `spec.nixConfig` keys: every name of [`REFUSED_NIX_SETTINGS`] and its
/// `extra-` form. It is a literal because the CRD derive needs one; a test keeps it equal to
/// [`nix_settings_rule`].
pub const NIX_SETTINGS_RULE: &str = "self.all(k, !(k in ['build-users-group', 'extra-build-users-group', 'trusted-users', 'extra-trusted-users', 'allowed-users', 'extra-allowed-users', 'max-jobs', 'extra-max-jobs', 'cores', 'extra-cores', 'sandbox', 'extra-sandbox', 'system-features', 'extra-system-features', 'platforms', 'extra-platforms', 'substituters', 'extra-substituters', 'trusted-public-keys', 'extra-trusted-public-keys', 'min-free', 'extra-min-free', 'max-free', 'extra-max-free', 'post-build-hook', 'extra-post-build-hook', 'ssl-cert-file', 'extra-ssl-cert-file', 'builders', 'extra-builders', 'secret-key-files', 'extra-secret-key-files', 'pre-build-hook', 'extra-pre-build-hook', 'build-hook', 'extra-build-hook', 'diff-hook', 'extra-diff-hook', 'plugin-files', 'extra-plugin-files', 'include', 'extra-include', 'build-max-jobs', 'extra-build-max-jobs', 'build-cores', 'extra-build-cores', 'build-use-sandbox', 'extra-build-use-sandbox', 'build-use-chroot', 'extra-build-use-chroot', 'binary-caches', 'extra-binary-caches', 'binary-cache-public-keys', 'extra-binary-cache-public-keys']))";

pub const NIX_SETTINGS_MESSAGE: &str = "spec.nixConfig: this setting is set by nixpool from a pool field, would make nix-daemon run a program as root, is an old name of one of those (build-max-jobs, build-use-sandbox, binary-caches, …), or is `include` (which Nix refuses in nix.conf); use spec.maxJobs, spec.cores, spec.systems, spec.supportedFeatures, spec.cache or spec.gc instead (see docs/security.md)";

/// [`NIX_SETTINGS_RULE`] built from the list.
pub fn nix_settings_rule() -> String {
    let names: Vec<String> = REFUSED_NIX_SETTINGS
        .iter()
        .flat_map(|s| [format!("'{s}'"), format!("'extra-{s}'")])
        .collect();
    format!("self.all(k, !(k in [{}]))", names.join(", "))
}

/// Whether `name` has the shape of a nix.conf setting name the CRD allows in `spec.nixConfig`
/// (`^[a-z][a-z0-9-]*$`): lower-case words joined by `-`.
pub fn is_nix_setting_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
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

/// The prefix of every label and annotation nixpool itself sets (`nixpool.dev/config-hash`, …).
pub const OWN_PREFIX: &str = "nixpool.dev/";

/// Pod labels `spec.pod.labels` may not set, besides [`OWN_PREFIX`]: the operator sets them on
/// every builder and gateway pod (its Deployments select their pods by the first two), and the
/// Deployment controller sets `pod-template-hash`.
pub const RESERVED_POD_LABELS: &[&str] = &[
    crate::labels::NAME,
    crate::labels::INSTANCE,
    crate::labels::COMPONENT,
    crate::labels::PART_OF,
    "pod-template-hash",
];

/// Pod annotations `spec.pod.annotations` may not set, besides [`OWN_PREFIX`]: the operator sets
/// them itself.
pub const RESERVED_POD_ANNOTATIONS: &[&str] = &[crate::annotations::POD_DELETION_COST];

/// The CEL rule on `spec.pod.labels` keys: none of [`RESERVED_POD_LABELS`], nothing under
/// [`OWN_PREFIX`]. A literal because the CRD derive needs one; a test keeps it equal to
/// [`reserved_keys_rule`] of the list.
pub const POD_LABELS_RULE: &str = "self.all(k, !(k in ['app.kubernetes.io/name', 'app.kubernetes.io/instance', 'app.kubernetes.io/component', 'app.kubernetes.io/part-of', 'pod-template-hash']) && !k.startsWith('nixpool.dev/'))";

pub const POD_LABELS_MESSAGE: &str = "spec.pod.labels: app.kubernetes.io/name, app.kubernetes.io/instance, app.kubernetes.io/component, app.kubernetes.io/part-of, pod-template-hash and nixpool.dev/* are set by nixpool and Kubernetes (the Deployment selects its pods by them); remove them and use a label of your own, e.g. team: ci";

/// The CEL rule on `spec.pod.annotations` keys; see [`POD_LABELS_RULE`].
pub const POD_ANNOTATIONS_RULE: &str =
    "self.all(k, !(k in ['controller.kubernetes.io/pod-deletion-cost']) && !k.startsWith('nixpool.dev/'))";

pub const POD_ANNOTATIONS_MESSAGE: &str = "spec.pod.annotations: controller.kubernetes.io/pod-deletion-cost and nixpool.dev/* are set by nixpool (the pod-deletion cost picks which builder goes first on a scale-down); remove them";

/// The CEL rule refusing `reserved` keys and keys under [`OWN_PREFIX`].
pub fn reserved_keys_rule(reserved: &[&str]) -> String {
    let names: Vec<String> = reserved.iter().map(|s| format!("'{s}'")).collect();
    format!(
        "self.all(k, !(k in [{}]) && !k.startsWith('{OWN_PREFIX}'))",
        names.join(", ")
    )
}

/// Whether nixpool sets this pod label itself.
pub fn reserved_pod_label(key: &str) -> bool {
    key.starts_with(OWN_PREFIX) || RESERVED_POD_LABELS.contains(&key)
}

/// Whether nixpool sets this pod annotation itself.
pub fn reserved_pod_annotation(key: &str) -> bool {
    key.starts_with(OWN_PREFIX) || RESERVED_POD_ANNOTATIONS.contains(&key)
}

/// A label or annotation key as Kubernetes has it (a qualified name): an optional prefix, a DNS
/// subdomain, then `/`, then a name of at most 63 letters, digits, `-`, `_` and `.` that starts
/// and ends with a letter or digit. The prefix's length (at most 253) is [`KEY_PREFIX_TOO_LONG`].
pub const QUALIFIED_NAME: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A key whose prefix is longer than a DNS subdomain may be.
pub const KEY_PREFIX_TOO_LONG: &str = "^[^/]{254,}/";
/// The CEL rule on the keys of `spec.pod.labels` and `spec.pod.annotations`.
pub const KEY_RULE: &str = "self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$') && !k.matches('^[^/]{254,}/'))";
/// A label value as Kubernetes has it: empty, or at most 63 letters, digits, `-`, `_` and `.`
/// starting and ending with a letter or digit.
pub const LABEL_VALUE: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";
/// The CEL rule on the values of `spec.pod.labels`.
pub const LABEL_VALUE_RULE: &str = "self.all(k, self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))";
/// A DNS subdomain: dot-separated parts of lower-case letters, digits and `-`, each starting and
/// ending with a letter or digit. The names of PriorityClasses, RuntimeClasses and Secrets.
pub const DNS_SUBDOMAIN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// The CEL rule of [`DNS_SUBDOMAIN`] (the field's `maxLength` bounds it to 253 characters).
pub const DNS_SUBDOMAIN_RULE: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";

/// Whether `name` is a DNS subdomain of at most 253 characters ([`DNS_SUBDOMAIN`], for names
/// that do not pass through the CRD, such as the operator's `--default-image-pull-secret`).
pub fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|part| part.starts_with(alnum) && part.ends_with(alnum) && part.chars().all(|c| alnum(c) || c == '-'))
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
        // sshd's option names are letters, digits and `-`; anything else (a stray quote) makes
        // sshd read the options differently, or refuse the line.
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("{name:?} is not an option name"));
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

/// The authorized keys of a pool whose spec is invalid. The operator applies nothing such a spec
/// asks for, but revocations still flow: of the lines the builders trust now (`trusted`, the
/// pool's authorized-keys file as last written), only those the spec's key sources still give
/// (`given`, rendered the same way) are kept, compared line for line. So a key removed from a
/// team ConfigMap or Secret goes, and nothing is ever added: not a new key, not a key whose
/// options or comment changed (it comes back, as given, once the spec is valid again).
pub fn narrowed_authorized_keys(trusted: &str, given: &str) -> String {
    let given: std::collections::HashSet<&str> = given.lines().map(str::trim).collect();
    trusted
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && given.contains(line))
        .map(|line| format!("{line}\n"))
        .collect()
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
        assert_eq!(
            (NIX_BOOLEAN_RULE.to_string(), NIX_INTEGER_RULE.to_string()),
            nix_value_rules()
        );
        assert!(refused_nix_setting("extra-trusted-users"));
        assert!(refused_nix_setting("plugin-files"));
        assert!(refused_nix_setting("extra-platforms"));
        assert!(!refused_nix_setting("keep-outputs"));
        assert!(!refused_nix_setting("extra-experimental-features"));
    }

    #[test]
    fn the_pod_key_rules_are_built_from_the_lists_and_the_regexes() {
        assert_eq!(POD_LABELS_RULE, reserved_keys_rule(RESERVED_POD_LABELS));
        assert_eq!(POD_ANNOTATIONS_RULE, reserved_keys_rule(RESERVED_POD_ANNOTATIONS));
        assert_eq!(
            KEY_RULE,
            format!("self.all(k, k.matches('{QUALIFIED_NAME}') && !k.matches('{KEY_PREFIX_TOO_LONG}'))")
        );
        assert_eq!(
            LABEL_VALUE_RULE,
            format!("self.all(k, self[k].matches('{LABEL_VALUE}'))")
        );
        assert_eq!(DNS_SUBDOMAIN_RULE, format!("self.matches('{DNS_SUBDOMAIN}')"));
        for reserved in RESERVED_POD_LABELS {
            assert!(POD_LABELS_MESSAGE.contains(reserved), "{reserved}");
        }
        for reserved in RESERVED_POD_ANNOTATIONS {
            assert!(POD_ANNOTATIONS_MESSAGE.contains(reserved), "{reserved}");
        }
        assert!(reserved_pod_label("app.kubernetes.io/instance"));
        assert!(reserved_pod_label("nixpool.dev/anything"));
        assert!(!reserved_pod_label("app.kubernetes.io/version"));
        assert!(reserved_pod_annotation(crate::annotations::CONFIG_HASH));
        assert!(!reserved_pod_annotation("karpenter.sh/do-not-disrupt"));
    }

    #[test]
    fn dns_subdomains() {
        for ok in [
            "regcred",
            "a",
            "nix-builders",
            "runc.privileged",
            "0-a.b-0",
            &"a".repeat(253),
        ] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "Regcred",
            "a_b",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
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
            format!("\",command=\"/bin/sh\" {key}"),
        ] {
            assert!(kept_key_options(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_invalid_specs_keys_only_narrow() {
        let a = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice";
        let b = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qB bob";
        let c = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qC carol";
        let trusted = format!("{a}\n{b}\n");
        // b was removed from its source, c added: b goes, c does not come.
        assert_eq!(
            narrowed_authorized_keys(&trusted, &format!("{a}\n{c}\n")),
            format!("{a}\n")
        );
        // Unchanged sources keep the file byte for byte.
        assert_eq!(narrowed_authorized_keys(&trusted, &format!("{b}\n{a}\n")), trusted);
        // A key given with wider options is a different line: it is not trusted more.
        let from_one_net = format!("from=\"10.0.0.0/8\" {b}\n");
        assert_eq!(narrowed_authorized_keys(&from_one_net, &format!("{b}\n")), "");
        assert_eq!(narrowed_authorized_keys(&trusted, ""), "");
    }
}
