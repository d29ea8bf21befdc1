//! The authorized-keys ConfigMap: every public key allowed to log in, merged from the spec and
//! the team ConfigMaps/Secrets. Public keys are not secrets, so this is a ConfigMap, which the
//! operator may watch without any right on Secrets. The kubelet refreshes it in running pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use nixpool_api::{NixBuilderPool, names, paths};

use super::meta;
use crate::authorized_keys::AuthorizedKeys;

pub fn authorized_keys(pool: &NixBuilderPool, keys: &AuthorizedKeys) -> ConfigMap {
    ConfigMap {
        metadata: meta(pool, names::authorized_keys(&pool.name_any()), "authorized-keys"),
        data: Some(BTreeMap::from([(
            paths::AUTHORIZED_KEYS_FILE.to_string(),
            keys.render(),
        )])),
        ..ConfigMap::default()
    }
}
