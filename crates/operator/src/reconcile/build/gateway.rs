//! The gateway: its Deployment (2 pods by default, unprivileged), the ServiceAccount, Role and
//! RoleBinding that let it watch the pool's pods and write its demand reports, and the demand
//! ConfigMap those reports go to. The Service points at the gateway when there is one.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SecretVolumeSource,
    SecurityContext, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use nixpool_api::v1alpha1::GatewaySpec;
use nixpool_api::{NixBuilderPool, labels, names, paths, ports};

use super::{host_key_ref, labels_string, meta, selector_string, spread};
use crate::reconcile::validate::ValidatedSpec;

/// The gateway runs as this unprivileged user (`nobody`).
const GATEWAY_UID: i64 = 65534;

/// Everything a pool's gateway consists of.
#[derive(Clone, Debug)]
pub struct GatewayChildren {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub demand: ConfigMap,
    pub deployment: Deployment,
    /// A node drain takes one gateway pod at a time. `None` where the server does not serve
    /// policy/v1.
    pub pdb: Option<PodDisruptionBudget>,
}

/// Labels that select a pool's gateway pods (apart from its builders').
pub fn gateway_selector_labels(pool: &NixBuilderPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::GATEWAY_NAME_VALUE.to_string()),
        (labels::INSTANCE.to_string(), pool.name_any()),
    ])
}

pub fn gateway(pool: &NixBuilderPool, valid: &ValidatedSpec, g: &GatewaySpec, with_pdb: bool) -> GatewayChildren {
    let name = names::gateway(&pool.name_any());
    let demand = names::gateway_demand(&pool.name_any());
    let service_account = ServiceAccount {
        metadata: meta(pool, name.clone(), "gateway"),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(pool, name.clone(), "gateway"),
        rules: Some(vec![
            // Which builders are Ready, and which are terminating.
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..PolicyRule::default()
            },
            // Its demand report, and the other gateways' (which slots they use), in one
            // ConfigMap and no other.
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                resource_names: Some(vec![demand.clone()]),
                verbs: vec!["get".into(), "list".into(), "watch".into(), "patch".into()],
                ..PolicyRule::default()
            },
        ]),
    };
    let role_binding = RoleBinding {
        metadata: meta(pool, name.clone(), "gateway"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.clone(),
            namespace: pool.namespace(),
            ..Subject::default()
        }]),
    };
    let demand_map = ConfigMap {
        metadata: meta(pool, demand.clone(), "gateway-demand"),
        ..ConfigMap::default()
    };
    GatewayChildren {
        service_account,
        role,
        role_binding,
        demand: demand_map,
        deployment: deployment(pool, valid, g, &name, &demand),
        pdb: with_pdb.then(|| PodDisruptionBudget {
            metadata: meta(pool, name.clone(), "gateway"),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(gateway_selector_labels(pool)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..PodDisruptionBudget::default()
        }),
    }
}

fn deployment(pool: &NixBuilderPool, valid: &ValidatedSpec, g: &GatewaySpec, name: &str, demand: &str) -> Deployment {
    let spec = &pool.spec;
    let selector = gateway_selector_labels(pool);
    // The pool's pod labels, annotations and priority go on its gateway too: a gateway carries
    // the sessions of running builds. The rules on spec.pod keep them off nixpool's own.
    let mut template_labels = spec.pod.labels.clone();
    template_labels.extend(selector.clone());
    template_labels.insert(labels::COMPONENT.into(), "gateway".into());
    template_labels.insert(labels::PART_OF.into(), labels::PART_OF_VALUE.into());
    let field_env = |env: &str, path: &str| EnvVar {
        name: env.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..EnvVar::default()
    };
    let mount = |volume: &str, path: &str| VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let args = vec![
        format!("--listen=0.0.0.0:{}", ports::GATEWAY_SSH),
        format!("--http-addr=0.0.0.0:{}", ports::GATEWAY_HTTP),
        format!("--host-key={}/{}", paths::HOST_KEY_DIR, paths::HOST_KEY_FILE),
        format!(
            "--authorized-keys={}/{}",
            paths::AUTHORIZED_KEYS_DIR,
            paths::AUTHORIZED_KEYS_FILE
        ),
        format!("--builder-key={}/{}", paths::GATEWAY_KEY_DIR, paths::GATEWAY_KEY_FILE),
        format!("--user={}", spec.ssh.user),
        format!("--hold-seconds={}", g.hold_seconds),
        "--namespace=$(POD_NAMESPACE)".into(),
        "--pod-name=$(POD_NAME)".into(),
        format!("--builders-selector={}", selector_string(pool)),
        format!("--gateways-selector={}", labels_string(&gateway_selector_labels(pool))),
        format!("--builder-port={}", ports::SSH),
        format!("--slots={}", spec.max_jobs),
        format!("--demand-config-map={demand}"),
    ];
    let probe = |path: &str, period, failures| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    };
    let container = Container {
        name: "gateway".into(),
        image: Some(valid.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![paths::GATEWAY_BINARY.into()]),
        args: Some(args),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some(ports::SSH_NAME.into()),
                container_port: ports::GATEWAY_SSH.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("http".into()),
                container_port: ports::GATEWAY_HTTP.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 1, 2)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        resources: g.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("host-key", paths::HOST_KEY_DIR),
            mount("authorized-keys", paths::AUTHORIZED_KEYS_DIR),
            mount("gateway-key", paths::GATEWAY_KEY_DIR),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    let secret_volume = |volume: &str, secret: String, key: String, file: &str| Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            // Readable by the gateway's group (fsGroup), nobody else.
            default_mode: Some(0o440),
            items: Some(vec![KeyToPath {
                key,
                path: file.into(),
                mode: Some(0o440),
            }]),
            ..Default::default()
        }),
        ..Volume::default()
    };
    let (host_secret, host_key) = host_key_ref(pool);
    let volumes = vec![
        secret_volume("host-key", host_secret, host_key, paths::HOST_KEY_FILE),
        Volume {
            name: "authorized-keys".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::authorized_keys(&pool.name_any()),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Volume::default()
        },
        secret_volume(
            "gateway-key",
            names::gateway_key_secret(&pool.name_any()),
            paths::GATEWAY_KEY_FILE.into(),
            paths::GATEWAY_KEY_FILE,
        ),
    ];

    Deployment {
        metadata: meta(pool, name.to_string(), "gateway"),
        spec: Some(DeploymentSpec {
            replicas: Some(g.replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            // A new gateway is Ready before an old one stops taking sessions.
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
                    annotations: (!spec.pod.annotations.is_empty()).then(|| spec.pod.annotations.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.to_string()),
                    enable_service_links: Some(false),
                    // Sessions spliced through a stopping gateway run to their end, as long as
                    // the builds they carry may.
                    termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(GATEWAY_UID),
                        run_as_group: Some(GATEWAY_UID),
                        fs_group: Some(GATEWAY_UID),
                        run_as_non_root: Some(true),
                        ..PodSecurityContext::default()
                    }),
                    node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    // One gateway per node where possible, so a node loss leaves the other one.
                    affinity: Some(spread(selector)),
                    priority_class_name: spec.pod.priority_class_name.clone(),
                    image_pull_secrets: (!valid.image_pull_secrets.is_empty())
                        .then(|| valid.image_pull_secrets.clone()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}
