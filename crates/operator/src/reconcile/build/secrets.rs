//! The host-key and authorized-keys Secrets.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use nixpool_api::{NixBuilderPool, names, paths};

use super::meta;
use crate::hostkey::HostKey;
use crate::keys::AuthorizedKeys;

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

pub fn authorized_keys(pool: &NixBuilderPool, keys: &AuthorizedKeys) -> Secret {
    Secret {
        metadata: meta(pool, names::authorized_keys_secret(&pool.name_any()), "authorized-keys"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            paths::AUTHORIZED_KEYS_FILE.to_string(),
            ByteString(keys.render().into_bytes()),
        )])),
        ..Secret::default()
    }
}
