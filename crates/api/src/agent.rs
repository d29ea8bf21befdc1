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
    /// Seconds to let running builds finish after SIGTERM.
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
}
