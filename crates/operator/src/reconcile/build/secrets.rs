//! The host-key Secret: the one Secret the operator makes (created once, never updated).

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
