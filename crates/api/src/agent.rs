//! The agent's config document: what the operator writes into a pool's ConfigMap (key
//! [`crate::paths::AGENT_CONFIG_KEY`]) and the agent reads at start. Secrets are never in it: it
//! names the files where they are mounted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything a builder needs to know about its pool, but for the Secrets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of the pool (for logs and metrics).
    pub pool: String,
    /// The SSH user clients log in as; a Nix trusted user.
    pub builder_user: String,
    /// nix.conf `max-jobs`.
    pub max_jobs: u32,
    /// nix.conf `cores` (0: all).
    pub cores: u32,
    /// Systems advertised (nix.conf `extra-platforms` beyond the native one).
    pub systems: Vec<String>,
    /// nix.conf `system-features` the pool asks for; the agent adds `kvm` and `nixos-test` only
    /// where /dev/kvm is usable.
    pub supported_features: Vec<String>,
    /// Features a derivation must require to be built here.
    #[serde(default)]
    pub mandatory_features: Vec<String>,
    /// Port sshd listens on.
    pub ssh_port: u16,
    /// Port of the agent's health and metrics endpoint.
    pub health_port: u16,
    /// nix.conf `substituters`, in order.
    pub substituters: Vec<String>,
    /// nix.conf `trusted-public-keys`.
    pub trusted_public_keys: Vec<String>,
    /// nix.conf `min-free` in bytes.
    #[serde(default)]
    pub min_free_bytes: Option<u64>,
    /// nix.conf `max-free` in bytes.
    #[serde(default)]
    pub max_free_bytes: Option<u64>,
    /// The pool's extra nix.conf settings, none of them one the agent owns.
    #[serde(default)]
    pub extra_nix_config: BTreeMap<String, String>,
    /// Where to push what this builder builds.
    #[serde(default)]
    pub push: Vec<PushTarget>,
    /// The whole drain's budget after SIGTERM (sessions, the push flush, stopping sshd and
    /// nix-daemon): the agent exits within it. The operator sets it 10 s below the pod's
    /// `terminationGracePeriodSeconds`, the margin before the kubelet's SIGKILL.
    pub drain_timeout_seconds: u64,
}

/// A cache the agent pushes build results to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum PushTarget {
    /// `nix copy --to <uri>` after signing with the key in `signingKeyFile`.
    #[serde(rename_all = "camelCase")]
    NixCopy { uri: String, signing_key_file: String },
    /// `attic push` with the token in `tokenFile`.
    #[serde(rename_all = "camelCase")]
    Attic {
        endpoint: String,
        cache: String,
        token_file: String,
    },
    /// `cachix push` with the token in `tokenFile`.
    #[serde(rename_all = "camelCase")]
    Cachix { cache: String, token_file: String },
}

impl AgentConfig {
    /// Parses the document, naming what is wrong.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The document as the operator writes it (stable order, so its hash is stable).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("AgentConfig serializes")
    }

    /// What is wrong with the document beyond its shape, as (field, problem with the fix). The
    /// agent refuses to start on any; the operator never writes one for a spec the API server
    /// accepts (the rule-parity test feeds both one corpus).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        use crate::rules;
        let mut out = Vec::new();
        let mut bad = |field: &'static str, problem: String| out.push((field, problem));
        if let Some(p) = rules::builder_user_problem(&self.builder_user) {
            bad("builderUser", p);
        }
        if self.max_jobs == 0 {
            bad("maxJobs", "is 0, so nothing would build here: set at least 1".into());
        }
        if self.ssh_port == 0 {
            bad("sshPort", "is 0: set the port sshd listens on (22)".into());
        }
        if self.health_port == 0 || self.health_port == self.ssh_port {
            bad(
                "healthPort",
                format!("{} is 0 or the SSH port: set another port (8090)", self.health_port),
            );
        }
        for (k, v) in &self.extra_nix_config {
            if rules::refused_nix_setting(k) {
                bad(
                    "extraNixConfig",
                    format!(
                        "sets `{k}`, which nixpool sets itself or which runs a program as root: use the pool field for it instead"
                    ),
                );
            } else if !rules::is_nix_setting_name(k) || rules::has_control(v) || v.contains('#') {
                bad(
                    "extraNixConfig",
                    format!(
                        "entry {k:?} is not a single `key = value` line (a name is lower-case words joined by `-`; a value holds no control character or `#`)"
                    ),
                );
            } else if let Some(problem) = rules::nix_setting_value_problem(k, v) {
                bad("extraNixConfig", format!("{problem} (Nix would refuse nix.conf)"));
            }
        }
        let lists = [
            ("systems", &self.systems),
            ("supportedFeatures", &self.supported_features),
            ("mandatoryFeatures", &self.mandatory_features),
            ("substituters", &self.substituters),
            ("trustedPublicKeys", &self.trusted_public_keys),
        ];
        for (field, list) in lists {
            if let Some(v) = list
                .iter()
                .find(|v| v.is_empty() || v.contains(char::is_whitespace) || v.contains('#') || rules::has_control(v))
            {
                bad(
                    field,
                    format!(
                        "{v:?} is empty or holds whitespace, `#` or a control character (nix.conf lists are space-separated; `#` starts a comment)"
                    ),
                );
            }
        }
        for (i, t) in self.push.iter().enumerate() {
            // Named by field, never by value: a cache URI can carry a credential.
            let (kind, fields): (&str, Vec<(&str, &String)>) = match t {
                PushTarget::NixCopy { uri, signing_key_file } => {
                    ("nixCopy", vec![("uri", uri), ("signingKeyFile", signing_key_file)])
                }
                PushTarget::Attic {
                    endpoint,
                    cache,
                    token_file,
                } => (
                    "attic",
                    vec![("endpoint", endpoint), ("cache", cache), ("tokenFile", token_file)],
                ),
                PushTarget::Cachix { cache, token_file } => {
                    ("cachix", vec![("cache", cache), ("tokenFile", token_file)])
                }
            };
            for (name, value) in fields {
                if value.is_empty() || rules::has_control(value) {
                    bad(
                        "push",
                        format!(
                            "push[{i}] ({kind}): {name} is empty or has a control character: fix the pool's spec.cache"
                        ),
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_push_target_is_named_by_field_never_by_its_value() {
        let secret = "https://user:s3cret-token@cache.example/c";
        let config = AgentConfig {
            pool: "builders".into(),
            builder_user: "builder".into(),
            max_jobs: 1,
            cores: 1,
            systems: vec!["x86_64-linux".into()],
            supported_features: vec![],
            mandatory_features: vec![],
            ssh_port: 22,
            health_port: 8080,
            substituters: vec![],
            trusted_public_keys: vec![],
            min_free_bytes: None,
            max_free_bytes: None,
            extra_nix_config: BTreeMap::new(),
            push: vec![PushTarget::NixCopy {
                uri: format!("{secret}\n"),
                signing_key_file: "/keys/signing".into(),
            }],
            drain_timeout_seconds: 60,
        };
        let problems = config.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (field, message) = &problems[0];
        assert_eq!(*field, "push");
        assert!(message.contains("push[0] (nixCopy): uri"), "{message}");
        assert!(
            !message.contains("s3cret"),
            "the message shows the credential: {message}"
        );
    }
}
