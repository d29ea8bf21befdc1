//! The builder Deployment.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EphemeralVolumeSource, HTTPGetAction,
    KeyToPath, PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SecretProjection, SecretVolumeSource, SecurityContext, TopologySpreadConstraint, Volume,
    VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use nixpool_api::v1alpha1::SecretKeyRef;
use nixpool_api::{NixBuilderPool, labels, names, paths, ports};

use super::{host_key_ref, meta, selector_labels, spread};
use crate::reconcile::validate::ValidatedSpec;

const STORE_VOLUME: &str = "nix";

/// The builder Deployment: the pool's builder pods, rolled out without dropping capacity.
pub fn deployment(pool: &NixBuilderPool, valid: &ValidatedSpec, config_hash: &str, replicas: i32) -> Deployment {
    Deployment {
        metadata: meta(pool, names::workload(&pool.name_any()), "builder"),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(pool)),
                ..LabelSelector::default()
            },
            strategy: Some(surge_first()),
            template: pod_template(pool, valid, config_hash),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Never drop capacity during a rollout: a new builder is Ready before an old one drains.
fn surge_first() -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_unavailable: Some(IntOrString::Int(0)),
            max_surge: Some(IntOrString::Int(1)),
        }),
    }
}

fn pod_template(pool: &NixBuilderPool, valid: &ValidatedSpec, config_hash: &str) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels(pool)),
            annotations: Some(pod_annotations(pool, config_hash)),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec(pool, valid)),
    }
}

/// The pool's pod labels, then nixpool's (the rules on spec.pod.labels keep them off nixpool's).
fn pod_labels(pool: &NixBuilderPool) -> BTreeMap<String, String> {
    let mut labels = pool.spec.pod.labels.clone();
    labels.extend(selector_labels(pool));
    labels.insert(labels::COMPONENT.into(), "builder".into());
    labels.insert(labels::PART_OF.into(), labels::PART_OF_VALUE.into());
    labels
}

fn pod_spec(pool: &NixBuilderPool, valid: &ValidatedSpec) -> PodSpec {
    let spec = &pool.spec;
    let (volumes, mounts) = volumes(pool).into_iter().unzip();
    PodSpec {
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        // Prefer one builder per node, so a node loss takes out as few as possible.
        affinity: Some(spec.affinity.clone().unwrap_or_else(|| spread(selector_labels(pool)))),
        topology_spread_constraints: topology_spread(pool),
        priority_class_name: spec.pod.priority_class_name.clone(),
        runtime_class_name: spec.pod.runtime_class_name.clone(),
        image_pull_secrets: (!valid.image_pull_secrets.is_empty()).then(|| valid.image_pull_secrets.clone()),
        containers: vec![builder_container(pool, valid, mounts)],
        volumes: Some(volumes),
        ..PodSpec::default()
    }
}

/// The agent as PID 1, with its SSH and health ports and probes.
fn builder_container(pool: &NixBuilderPool, valid: &ValidatedSpec, mounts: Vec<VolumeMount>) -> Container {
    let spec = &pool.spec;
    Container {
        name: "builder".into(),
        image: Some(valid.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![
            paths::AGENT_BINARY.into(),
            "run".into(),
            "--store-volume".into(),
            paths::STORE_VOLUME.into(),
        ]),
        ports: Some(vec![
            tcp_port(ports::SSH_NAME, ports::SSH),
            tcp_port(ports::HEALTH_NAME, ports::AGENT_HEALTH),
        ]),
        // Ready within a second of the agent being ready, and out of the Service within a few
        // seconds of a drain starting: `/readyz` is a local read, cheap to ask every second.
        readiness_probe: Some(http_probe("/readyz", 1, 2)),
        // Only a builder whose agent stops answering for a minute is restarted. No startup
        // probe: `/healthz` answers from the agent's first milliseconds (the overlay takes
        // milliseconds; a fallback copy of the store answers it too), and a startup probe holds
        // readiness back by up to one more period.
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        resources: spec.resources.clone(),
        security_context: Some(sandbox_security()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

fn tcp_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port.into(),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// An HTTP GET on the agent's health port.
fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ports::HEALTH_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

/// Nix's build sandbox creates mount, PID and network namespaces: that needs a privileged
/// container on stock Kubernetes.
fn sandbox_security() -> SecurityContext {
    SecurityContext {
        privileged: Some(true),
        ..SecurityContext::default()
    }
}

/// The pod's volumes, each with where the builder mounts it.
///
/// The store volume is not mounted at /nix: it would hide the image's own store (nix, sshd, the
/// agent). The agent mounts the image's /nix under a writable overlay layer kept on it, so
/// nothing is copied and start time does not grow with the image.
fn volumes(pool: &NixBuilderPool) -> Vec<(Volume, VolumeMount)> {
    let name = pool.name_any();
    let mut volumes = vec![
        mounted_at(store_volume(pool), paths::STORE_VOLUME, false),
        mounted_at(
            config_map_volume("config", names::config_map(&name), None),
            paths::CONFIG_DIR,
            true,
        ),
        mounted_at(host_key_volume(pool), paths::HOST_KEY_DIR, true),
        mounted_at(
            config_map_volume("authorized-keys", names::authorized_keys(&name), Some(0o444)),
            paths::AUTHORIZED_KEYS_DIR,
            true,
        ),
    ];
    volumes.extend(cache_secrets_volume(pool).map(|v| mounted_at(v, paths::CACHE_SECRETS_DIR, true)));
    volumes
}

/// `volume` and its mount at `path` (the mount takes the volume's name).
fn mounted_at(volume: Volume, path: &str, read_only: bool) -> (Volume, VolumeMount) {
    let mount = VolumeMount {
        name: volume.name.clone(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    (volume, mount)
}

fn config_map_volume(volume: &str, config_map: String, default_mode: Option<i32>) -> Volume {
    Volume {
        name: volume.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            default_mode,
            ..Default::default()
        }),
        ..Volume::default()
    }
}

/// The pool's pod annotations and the config hash (the rules on spec.pod.annotations keep them
/// off nixpool's).
fn pod_annotations(pool: &NixBuilderPool, config_hash: &str) -> BTreeMap<String, String> {
    let mut annotations = pool.spec.pod.annotations.clone();
    annotations.insert(
        nixpool_api::annotations::CONFIG_HASH.to_string(),
        config_hash.to_string(),
    );
    annotations
}

/// `spec.pod.topologySpreadConstraints`, a constraint without a label selector counting this
/// pool's builders (without one it would count no pod and spread nothing).
fn topology_spread(pool: &NixBuilderPool) -> Option<Vec<TopologySpreadConstraint>> {
    let constraints = &pool.spec.pod.topology_spread_constraints;
    (!constraints.is_empty()).then(|| {
        constraints
            .iter()
            .cloned()
            .map(|mut c| {
                c.label_selector.get_or_insert_with(|| LabelSelector {
                    match_labels: Some(selector_labels(pool)),
                    ..LabelSelector::default()
                });
                c
            })
            .collect()
    })
}

fn store_volume(pool: &NixBuilderPool) -> Volume {
    let store = &pool.spec.store;
    let mut v = Volume {
        name: STORE_VOLUME.into(),
        ..Volume::default()
    };
    match &store.ephemeral {
        Some(e) => {
            v.ephemeral = Some(EphemeralVolumeSource {
                volume_claim_template: Some(PersistentVolumeClaimTemplate {
                    metadata: Some(ObjectMeta {
                        labels: Some(selector_labels(pool)),
                        ..Default::default()
                    }),
                    spec: PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        storage_class_name: e.storage_class_name.clone(),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(BTreeMap::from([("storage".to_string(), e.size.clone())])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                }),
            })
        }
        None => {
            v.empty_dir = Some(EmptyDirVolumeSource {
                size_limit: store.empty_dir.as_ref().and_then(|e| e.size_limit.clone()),
                ..Default::default()
            })
        }
    }
    v
}

fn host_key_volume(pool: &NixBuilderPool) -> Volume {
    let (secret, key) = host_key_ref(pool);
    Volume {
        name: "host-key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o400),
            items: Some(vec![KeyToPath {
                key,
                path: paths::HOST_KEY_FILE.into(),
                mode: Some(0o400),
            }]),
            ..Default::default()
        }),
        ..Volume::default()
    }
}

/// Tokens and signing keys of the caches the pool pushes to, projected into one directory.
fn cache_secrets_volume(pool: &NixBuilderPool) -> Option<Volume> {
    let cache = &pool.spec.cache;
    let wanted: [(Option<&SecretKeyRef>, &str); 3] = [
        (
            cache.attic.as_ref().and_then(|a| a.token_secret.as_ref()),
            paths::ATTIC_TOKEN_FILE,
        ),
        (
            cache.cachix.as_ref().and_then(|c| c.token_secret.as_ref()),
            paths::CACHIX_TOKEN_FILE,
        ),
        (
            cache.store.as_ref().and_then(|s| s.signing_key_secret.as_ref()),
            paths::STORE_SIGNING_KEY_FILE,
        ),
    ];
    let sources: Vec<VolumeProjection> = wanted
        .into_iter()
        .filter_map(|(r, file)| {
            let r = r?;
            Some(VolumeProjection {
                secret: Some(SecretProjection {
                    name: r.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: r.key.clone(),
                        path: file.into(),
                        mode: None,
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect();
    (!sources.is_empty()).then(|| Volume {
        name: "cache-secrets".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: Some(0o400),
        }),
        ..Volume::default()
    })
}
