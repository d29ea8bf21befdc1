//! Pure builders: from a validated pool and what was read from the cluster, the typed children
//! the operator applies. No I/O, no clock.

mod authorized_keys;
mod config;
mod deployment;
mod gateway;
mod secrets;
mod service;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Affinity, PodAffinityTerm, PodAntiAffinity, WeightedPodAffinityTerm};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use nixpool_api::{NixBuilderPool, labels, names, paths};
use sha2::{Digest, Sha256};

pub use authorized_keys::authorized_keys;
pub use gateway::{GatewayChildren, gateway_selector_labels};
pub use secrets::{gateway_key as gateway_key_secret, host_key as host_key_secret};

use super::validate::ValidatedSpec;
use crate::authorized_keys::AuthorizedKeys;

/// Everything a pool consists of. `apply` destructures it without `..`, so a child added here
/// and never applied does not compile.
#[derive(Clone, Debug)]
pub struct Children {
    /// The host-key Secret is not here: it is created once, by the reconcile's host-key step.
    pub authorized_keys: ConfigMap,
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// `None` where the server does not serve policy/v1.
    pub pdb: Option<PodDisruptionBudget>,
    /// `None` without `spec.gateway` or `spec.autoscaling`.
    pub gateway: Option<GatewayChildren>,
}

/// What `build` needs besides the pool.
pub struct BuildInputs<'a> {
    pub valid: &'a ValidatedSpec,
    pub authorized_keys: &'a AuthorizedKeys,
    pub with_pdb: bool,
    /// Builders to run: `spec.replicas`, or the autoscaler's decision.
    pub builder_replicas: i32,
}

pub fn build(pool: &NixBuilderPool, inputs: &BuildInputs<'_>) -> Children {
    let config_map = config::config_map(pool, inputs.valid);
    let config_hash = hash(&config_map.data);
    Children {
        authorized_keys: authorized_keys::authorized_keys(pool, inputs.authorized_keys),
        deployment: deployment::deployment(pool, inputs.valid, &config_hash, inputs.builder_replicas),
        config_map,
        service: service::service(pool),
        pdb: inputs.with_pdb.then(|| service::pdb(pool)),
        gateway: pool
            .spec
            .effective_gateway()
            .map(|g| gateway::gateway(pool, inputs.valid, &g, inputs.with_pdb)),
    }
}

/// Labels that select a pool's builder pods.
pub fn selector_labels(pool: &NixBuilderPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::NAME_VALUE.to_string()),
        (labels::INSTANCE.to_string(), pool.name_any()),
    ])
}

/// The selector in its string form, for `status.selector`.
pub fn selector_string(pool: &NixBuilderPool) -> String {
    labels_string(&selector_labels(pool))
}

/// Labels as a label selector string (`k=v,k2=v2`).
pub fn labels_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Secret and key holding the pool's host key: the user's `spec.ssh.hostKeySecret`, or the
/// one the operator generates.
pub fn host_key_ref(pool: &NixBuilderPool) -> (String, String) {
    match &pool.spec.ssh.host_key_secret {
        Some(r) => (r.name.clone(), r.key.clone()),
        None => (
            names::host_key_secret(&pool.name_any()),
            paths::HOST_KEY_FILE.to_string(),
        ),
    }
}

/// Prefers one pod per node for the pods `selector` matches, so a node loss takes out as few
/// as possible.
fn spread(selector: BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    topology_key: "kubernetes.io/hostname".into(),
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Affinity::default()
    }
}

/// All `app.kubernetes.io/*` labels of a child.
fn labels(pool: &NixBuilderPool, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(pool);
    l.insert(labels::COMPONENT.into(), component.into());
    l.insert(labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into());
    l.insert(labels::PART_OF.into(), labels::PART_OF_VALUE.into());
    l
}

/// Metadata of a child: name, namespace, labels and the controller ownerReference (without
/// blockOwnerDeletion, which would need update rights on pools/finalizers).
fn meta(pool: &NixBuilderPool, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(labels(pool, component)),
        owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// A short, stable hash of anything serializable.
pub fn hash<T: serde::Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).expect("children serialize");
    let digest = Sha256::digest(&bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Sets the applied-hash annotation of a child to the hash of the child without it.
pub fn with_applied_hash<K: Resource + serde::Serialize>(mut obj: K) -> K {
    obj.annotations_mut().remove(nixpool_api::annotations::APPLIED_HASH);
    let h = hash(&obj);
    obj.annotations_mut()
        .insert(nixpool_api::annotations::APPLIED_HASH.into(), h);
    obj
}

#[cfg(test)]
mod tests;
