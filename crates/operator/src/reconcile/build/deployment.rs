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
use crate::reconcile::validate::Valid;

const STORE_VOLUME: &str = "nix";

pub fn deployment(pool: &NixBuilderPool, valid: &Valid, config_hash: &str, replicas: i32) -> Deployment {
    let spec = &pool.spec;
    let name = pool.name_any();
    // The pool's own labels first: the rules on spec.pod.labels keep them off nixpool's.
    let mut template_labels = spec.pod.labels.clone();
    template_labels.extend(selector_labels(pool));
    template_labels.insert(labels::COMPONENT.into(), "builder".into());
    template_labels.insert(labels::PART_OF.into(), labels::PART_OF_VALUE.into());

    // The store volume is not mounted at /nix: it would hide the image's own store (nix, sshd,
    // the agent). The agent mounts the image's /nix under a writable overlay layer kept on it,
    // so nothing is copied and start time does not grow with the image.
    let mut mounts = vec![
        VolumeMount {
            name: STORE_VOLUME.into(),
            mount_path: paths::STORE_VOLUME.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "config".into(),
            mount_path: paths::CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "host-key".into(),
            mount_path: paths::HOST_KEY_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "authorized-keys".into(),
            mount_path: paths::AUTHORIZED_KEYS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        store_volume(pool),
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config_map(&name),
                ..Default::default()
            }),
            ..Volume::default()
        },
        host_key_volume(pool),
        Volume {
            name: "authorized-keys".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::authorized_keys(&name),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Volume::default()
        },
    ];
    if let Some(cache) = cache_secrets_volume(pool) {
        mounts.push(VolumeMount {
            name: "cache-secrets".into(),
            mount_path: paths::CACHE_SECRETS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(cache);
    }

    let http_probe = |path: &str, period, failures| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ports::HEALTH_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    };
    // Nix's build sandbox creates mount, PID and network namespaces: that needs a privileged
    // container on stock Kubernetes.
    let security = SecurityContext {
        privileged: Some(true),
        ..SecurityContext::default()
    };
    let builder = Container {
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
            ContainerPort {
                name: Some(ports::SSH_NAME.into()),
                container_port: ports::SSH.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ports::HEALTH_NAME.into()),
                container_port: ports::AGENT_HEALTH.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
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
        security_context: Some(security.clone()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    Deployment {
        metadata: meta(pool, names::workload(&name), "builder"),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(pool)),
                ..LabelSelector::default()
            },
            // Never drop capacity during a rollout: a new builder is Ready before an old one drains.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    annotations: Some(pod_annotations(pool, config_hash)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
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
                    image_pull_secrets: (!valid.image_pull_secrets.is_empty())
                        .then(|| valid.image_pull_secrets.clone()),
                    containers: vec![builder],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The pool's pod annotations and the config hash (the rules on spec.pod.annotations keep them
/// off nixpool's).
fn pod_annotations(pool: &NixBuilderPool, config_hash: &str) -> BTreeMap<String, String> {
    let mut annotations = pool.spec.pod.annotations.clone();
    annotations.insert(labels::CONFIG_HASH.to_string(), config_hash.to_string());
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
