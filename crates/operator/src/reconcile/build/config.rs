//! The agent config document and the ConfigMap that carries it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use nixpool_api::agent::PushTarget;
use nixpool_api::{AgentConfig, NixBuilderPool, names, paths, ports};

use super::meta;
use crate::reconcile::validate::ValidatedSpec;

/// The public cache every builder substitutes from.
const NIXOS_CACHE: &str = "https://cache.nixos.org";
const NIXOS_CACHE_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fn secret_file(name: &str) -> String {
    format!("{}/{name}", paths::CACHE_SECRETS_DIR)
}

pub fn agent_config(pool: &NixBuilderPool, valid: &ValidatedSpec) -> AgentConfig {
    let spec = &pool.spec;
    let (mut substituters, mut trusted_public_keys) = if spec.cache.nixos_cache {
        (vec![NIXOS_CACHE.to_string()], vec![NIXOS_CACHE_KEY.to_string()])
    } else {
        (Vec::new(), Vec::new())
    };
    let mut add = |url: String, key: Option<&String>| {
        if !substituters.contains(&url) {
            substituters.push(url);
        }
        if let Some(k) = key
            && !trusted_public_keys.contains(k)
        {
            trusted_public_keys.push(k.clone());
        }
    };
    for s in &spec.cache.substituters {
        add(s.url.clone(), s.public_key.as_ref());
    }
    let mut push = Vec::new();
    if let Some(a) = &spec.cache.attic {
        let endpoint = a.endpoint.trim_end_matches('/').to_string();
        if a.public_key.is_some() {
            add(format!("{endpoint}/{}", a.cache), a.public_key.as_ref());
        }
        // A push needs its Secret; one left out (not opted in) pushes nowhere rather than stop
        // the builder.
        if a.push && a.token_secret.is_some() {
            push.push(PushTarget::Attic {
                endpoint,
                cache: a.cache.clone(),
                token_file: secret_file(paths::ATTIC_TOKEN_FILE),
            });
        }
    }
    if let Some(c) = &spec.cache.cachix {
        if c.public_key.is_some() {
            add(format!("https://{}.cachix.org", c.cache), c.public_key.as_ref());
        }
        if c.push && c.token_secret.is_some() {
            push.push(PushTarget::Cachix {
                cache: c.cache.clone(),
                token_file: secret_file(paths::CACHIX_TOKEN_FILE),
            });
        }
    }
    if let Some(s) = &spec.cache.store {
        if s.public_key.is_some() {
            add(s.uri.clone(), s.public_key.as_ref());
        }
        if s.push && s.signing_key_secret.is_some() {
            push.push(PushTarget::NixCopy {
                uri: s.uri.clone(),
                signing_key_file: secret_file(paths::STORE_SIGNING_KEY_FILE),
            });
        }
    }
    AgentConfig {
        pool: pool.name_any(),
        builder_user: spec.ssh.user.clone(),
        max_jobs: spec.max_jobs.max(1) as u32,
        cores: spec.cores.max(0) as u32,
        systems: spec.systems.clone(),
        supported_features: spec.supported_features.clone(),
        mandatory_features: spec.mandatory_features.clone(),
        ssh_port: ports::SSH,
        health_port: ports::AGENT_HEALTH,
        substituters,
        trusted_public_keys,
        min_free_bytes: valid.min_free_bytes,
        max_free_bytes: valid.max_free_bytes,
        extra_nix_config: spec.nix_config.clone(),
        push,
        // The agent drains within this; the last 10 s of the grace period are the margin before
        // the kubelet's SIGKILL.
        drain_timeout_seconds: (spec.termination_grace_period_seconds - 10).max(0) as u64,
    }
}

pub fn config_map(pool: &NixBuilderPool, valid: &ValidatedSpec) -> ConfigMap {
    ConfigMap {
        metadata: meta(pool, names::config_map(&pool.name_any()), "config"),
        data: Some(BTreeMap::from([(
            paths::AGENT_CONFIG_KEY.to_string(),
            agent_config(pool, valid).to_json(),
        )])),
        ..ConfigMap::default()
    }
}
