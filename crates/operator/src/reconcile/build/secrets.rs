//! The Secrets the operator makes, each created once and never updated: the pool's host key,
//! and the gateway's own key.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use nixpool_api::{NixBuilderPool, names, paths};

use super::meta;
use crate::hostkey::HostKey;

pub fn host_key(pool: &NixBuilderPool, key: &HostKey) -> Secret {
    Secret {
        metadata: meta(pool, names::host_key_secret(&pool.name_any()), "host-key"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                paths::HOST_KEY_FILE.to_string(),
                ByteString(key.private_openssh().as_bytes().to_vec()),
            ),
            (
                paths::HOST_PUBLIC_KEY_FILE.to_string(),
                ByteString(format!("{}\n", key.public).into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

/// The gateway's own key: it logs in to the builders with it.
pub fn gateway_key(pool: &NixBuilderPool, key: &HostKey) -> Secret {
    Secret {
        metadata: meta(pool, names::gateway_key_secret(&pool.name_any()), "gateway-key"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                paths::GATEWAY_KEY_FILE.to_string(),
                ByteString(key.private_openssh().as_bytes().to_vec()),
            ),
            (
                format!("{}.pub", paths::GATEWAY_KEY_FILE),
                ByteString(format!("{}\n", key.public).into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}
