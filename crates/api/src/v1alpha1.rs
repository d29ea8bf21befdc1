//! `nixpool.dev/v1alpha1`: the `NixBuilderPool` custom resource.
//!
//! Every field's doc comment becomes its description in the CRD, so `kubectl explain
//! nixbuilderpool.spec.<field>` teaches it. CEL rules (`x_kube(validation)`) go into the schema for
//! servers that enforce them, and the operator evaluates the very same rules itself for servers
//! that do not (see `nixpool-operator`'s `validate`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Nix public key as nix.conf's `trusted-public-keys` takes it: `name:base64`, the name printable
/// ASCII without ':' or spaces. (`[^: ]` would also match a newline, which would end the nix.conf
/// line and start a setting of the user's choosing.)
/// `#` is left out of every string that reaches nix.conf: Nix cuts a line there as a comment.
const PUBLIC_KEY_RULE: &str = "self.matches('^[!-\"$-9;-~]+:[A-Za-z0-9+/=]+$')";

/// A pool of x86_64-linux (or other) Nix remote builders reachable over SSH.
///
/// The operator turns it into a Deployment of builder pods, a Service, the SSH host-key Secret,
/// the authorized-keys and agent ConfigMaps, and reports in `status` everything a client
/// needs: the endpoint, the pinned host key and a ready-made `/etc/nix/machines` line.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nixpool.dev",
    version = "v1alpha1",
    kind = "NixBuilderPool",
    plural = "nixbuilderpools",
    singular = "nixbuilderpool",
    shortname = "nbp",
    category = "nixpool",
    doc = "A pool of Nix remote builders reachable over SSH: the operator runs it as a Deployment of builder pods behind a Service and reports the endpoint, the pinned host key and a ready-made /etc/nix/machines line in status.",
    namespaced,
    status = "NixBuilderPoolStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "Ready builders / desired builders"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", description = "Why the pool is or is not Ready (the Ready condition's reason)"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint.host", description = "Host clients connect to"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.endpoint.port", description = "SSH port clients connect to"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 47 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name: a pool name must be a DNS label of at most 47 characters starting with a letter (its Service and Secrets are named after it); rename the pool")
)]
#[serde(rename_all = "camelCase")]
pub struct NixBuilderPoolSpec {
    /// Number of builder pods. Each runs `maxJobs` builds at once. Works with `kubectl scale`
    /// and autoscalers through the scale subresource. 0 keeps the pool (keys, Service) but no
    /// builders.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Builder image (the Nix-built nixpool builder image, whose entrypoint is nixpool-agent).
    /// Empty: the operator's `--default-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// When the kubelet pulls the image: Always, IfNotPresent or Never. Empty: the Kubernetes
    /// default for the tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pull_policy_schema")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Secrets with registry credentials for pulling the image. Empty: the operator's
    /// `--default-image-pull-secret`s, if it has any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Nix system types the builders build for, as in a machines line (e.g. `x86_64-linux`;
    /// add `i686-linux` if the builders can run it).
    #[serde(default = "default_systems")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.all(s, s.matches('^[a-z0-9_]+-[a-z0-9_]+$'))")
        .message("spec.systems: list at least one Nix system such as x86_64-linux (form <arch>-<os>)"))]
    pub systems: Vec<String>,

    /// System features the builders offer (Nix `system-features`, the machines line's 6th
    /// column), e.g. `big-parallel`, `benchmark`. `kvm` and `nixos-test` only where the nodes
    /// expose /dev/kvm; the agent logs whether it does.
    #[serde(default = "default_supported_features")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(f, f.matches('^[A-Za-z0-9_.+-]+$'))")
        .message("spec.supportedFeatures: a feature is one word without spaces or commas, e.g. big-parallel"))]
    pub supported_features: Vec<String>,

    /// Features a derivation must require to be built here (the machines line's 7th column).
    /// Usually empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(f, f.matches('^[A-Za-z0-9_.+-]+$'))")
        .message("spec.mandatoryFeatures: a feature is one word without spaces or commas"))]
    pub mandatory_features: Vec<String>,

    /// Builds each builder pod runs at once (its nix.conf `max-jobs`).
    #[serde(default = "default_max_jobs")]
    #[schemars(range(min = 1, max = 256))]
    pub max_jobs: i32,

    /// CPU cores each build may use (nix.conf `cores`); 0 means all cores of the pod.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub cores: i32,

    /// Relative speed of these builders against a client's other builders (machines line
    /// column 5); higher is preferred.
    #[serde(default = "default_speed_factor")]
    #[schemars(range(min = 1, max = 1000))]
    pub speed_factor: i32,

    /// CPU and memory requests and limits of each builder container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels builder pods must match. Defaults to amd64 nodes: an x86_64-linux builder
    /// on another architecture would need emulation.
    #[serde(default = "default_node_selector")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of builder pods, e.g. for a dedicated build node pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity rules of builder pods (the operator already spreads them across nodes where
    /// it can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// More of the builder pods: labels, annotations, priority, topology spread and runtime
    /// class. Labels, annotations and priorityClassName go on the gateway pods too.
    #[serde(default)]
    pub pod: BuilderPodSpec,

    /// The `/nix` volume of each builder: its store and build directories.
    #[serde(default)]
    pub store: StoreSpec,

    /// SSH access: the builder user, who may log in, and the host key clients pin.
    #[serde(default)]
    pub ssh: SshSpec,

    /// The Service clients reach the builders through.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Binary caches the builders substitute from and push results to.
    #[serde(default)]
    pub cache: CacheSpec,

    /// Extra nix.conf settings (name to value). Refused, with their `extra-` forms: the settings
    /// nixpool sets from pool fields (build-users-group, trusted-users, allowed-users, max-jobs,
    /// cores, sandbox, system-features, platforms, substituters, trusted-public-keys, min-free,
    /// max-free, post-build-hook, ssl-cert-file, builders, secret-key-files), those that make
    /// nix-daemon run a program (pre-build-hook, build-hook, diff-hook, plugin-files), the old
    /// names Nix still reads for those (build-max-jobs, build-cores, build-use-sandbox,
    /// build-use-chroot, binary-caches, binary-cache-public-keys), and `include` (a nix.conf
    /// directive: `include = x` is a line Nix refuses). A value may not hold `#` (nix.conf cuts a
    /// line there). Nix's Boolean settings (keep-outputs, …) take true or false, its whole-number
    /// settings (max-silent-time, timeout, …) 1 to 9 digits: Nix refuses nix.conf otherwise.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    #[x_kube(validation = Rule::new(crate::rules::NIX_SETTINGS_RULE).message(crate::rules::NIX_SETTINGS_MESSAGE))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[a-z][a-z0-9-]*$'))")
        .message("spec.nixConfig: a setting name is lower-case words joined by '-', e.g. keep-outputs"))]
    #[x_kube(validation = Rule::new("self.all(k, !self[k].matches('[[:cntrl:]]'))")
        .message("spec.nixConfig: a value is one line without control characters (nix.conf has one setting per line)"))]
    #[x_kube(validation = Rule::new(crate::rules::NIX_BOOLEAN_RULE).message(crate::rules::NIX_BOOLEAN_MESSAGE))]
    #[x_kube(validation = Rule::new(crate::rules::NIX_INTEGER_RULE).message(crate::rules::NIX_INTEGER_MESSAGE))]
    #[x_kube(validation = Rule::new("self.all(k, !self[k].contains('#'))")
        .message("spec.nixConfig: a value may not hold `#`: nix.conf cuts the line there as a comment"))]
    pub nix_config: BTreeMap<String, String>,

    /// Store garbage collection during builds (nix.conf min-free / max-free).
    #[serde(default)]
    pub gc: GcSpec,

    /// A gateway in front of the builders: an SSH front door that presents the pool's host key,
    /// sends each Nix session to the builder with the most free slots, and holds a session while
    /// no slot is free. With it the Service points at the gateway, not at the builders. Needed by
    /// `autoscaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,

    /// Builders on demand: the gateway reports sessions waiting and running, and the operator
    /// sets the number of builders between `minReplicas` and `maxReplicas`. With it,
    /// `spec.replicas` (and `kubectl scale`) is not used: the operator owns the builder count.
    /// Implies a gateway (`spec.gateway` defaults apply if it is not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Drain budget: seconds a builder pod being stopped (rollout, scale-down, node drain) waits
    /// for running builds to finish before it is killed.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: i64,
}

/// A plain string enum: the derived schema of an optional enum lists `null` among its values,
/// which Kubernetes before 1.22 refuses.
fn pull_policy_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["Always", "IfNotPresent", "Never"],
        "description": "When the kubelet pulls the image: Always, IfNotPresent or Never. Empty: the Kubernetes default for the tag."
    })
}

/// Image pull policy of the builder container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// The `/nix` volume. Set at most one of `emptyDir` and `ephemeral`; neither means an emptyDir
/// without a size limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.emptyDir) && has(self.ephemeral))")
    .message("spec.store: set either emptyDir or ephemeral, not both"))]
pub struct StoreSpec {
    /// Node-local scratch space, lost when the pod goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirStore>,
    /// A generic ephemeral volume: a PersistentVolumeClaim made for each pod and deleted with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<EphemeralStore>,
}

/// An emptyDir `/nix`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirStore {
    /// Largest size before the kubelet evicts the pod, e.g. `100Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

/// A generic ephemeral volume `/nix`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EphemeralStore {
    /// StorageClass of the claim; empty means the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Requested size, e.g. `200Gi`.
    pub size: Quantity,
}

/// Labels, annotations and scheduling of the builder pods, beside `nodeSelector`,
/// `tolerations` and `affinity`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuilderPodSpec {
    /// Labels of the builder and gateway pods, e.g. for cost allocation or a NetworkPolicy.
    /// nixpool's own (`app.kubernetes.io/name`, `instance`, `component`, `part-of`,
    /// `nixpool.dev/*`) and `pod-template-hash` are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = Rule::new(crate::rules::POD_LABELS_RULE).message(crate::rules::POD_LABELS_MESSAGE))]
    #[x_kube(validation = Rule::new(crate::rules::KEY_RULE)
        .message("spec.pod.labels: a label key is [prefix/]name: a name of at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit, after an optional DNS-subdomain prefix of at most 253 characters, e.g. example.com/team"))]
    #[x_kube(validation = Rule::new(crate::rules::LABEL_VALUE_RULE)
        .message("spec.pod.labels: a label value is empty or at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit, e.g. ci; quote numbers and booleans in YAML (\"true\")"))]
    pub labels: BTreeMap<String, String>,

    /// Annotations of the builder and gateway pods, e.g. `karpenter.sh/do-not-disrupt: "true"`
    /// or `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"` so that node consolidation
    /// does not stop running builds. nixpool's own (`nixpool.dev/*`,
    /// `controller.kubernetes.io/pod-deletion-cost`) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    #[x_kube(validation = Rule::new(crate::rules::POD_ANNOTATIONS_RULE).message(crate::rules::POD_ANNOTATIONS_MESSAGE))]
    #[x_kube(validation = Rule::new(crate::rules::KEY_RULE)
        .message("spec.pod.annotations: an annotation key is [prefix/]name: a name of at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit, after an optional DNS-subdomain prefix of at most 253 characters, e.g. karpenter.sh/do-not-disrupt"))]
    pub annotations: BTreeMap<String, String>,

    /// PriorityClass of the builder and gateway pods (it must exist), e.g. to keep builders from
    /// being preempted by batch work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(crate::rules::DNS_SUBDOMAIN_RULE)
        .message("spec.pod.priorityClassName: give the name of a PriorityClass (lower-case letters, digits, '-' and '.'), as `kubectl get priorityclass` lists it"))]
    pub priority_class_name: Option<String>,

    /// How builder pods spread across zones or nodes. A constraint without `labelSelector`
    /// counts this pool's builders. The operator's default anti-affinity (one builder per node
    /// where it can) stays unless `affinity` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(c, c.maxSkew > 0 && c.topologyKey != '' && c.whenUnsatisfiable in ['DoNotSchedule', 'ScheduleAnyway'])")
        .message("spec.pod.topologySpreadConstraints: each needs maxSkew of at least 1, a topologyKey (e.g. topology.kubernetes.io/zone) and whenUnsatisfiable DoNotSchedule or ScheduleAnyway"))]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,

    /// RuntimeClass of the builder pods (it must exist), e.g. one whose handler lets the
    /// Nix sandbox run. Not set on the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(crate::rules::DNS_SUBDOMAIN_RULE)
        .message("spec.pod.runtimeClassName: give the name of a RuntimeClass (lower-case letters, digits, '-' and '.'), as `kubectl get runtimeclass` lists it"))]
    pub runtime_class_name: Option<String>,
}

/// SSH access to the builders.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshSpec {
    /// The user clients log in as. It is a Nix trusted user on the builder (needed to build
    /// input-addressed derivations) and may run only the Nix remote-build commands.
    #[serde(default = "default_user")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::rules::USER_RULE).message(crate::rules::USER_MESSAGE))]
    pub user: String,

    /// Public keys (OpenSSH `authorized_keys` lines) allowed to log in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 16384)))]
    #[x_kube(validation = Rule::new("self.all(k, !k.matches('[[:cntrl:]]'))")
        .message("spec.ssh.authorizedKeys: each entry is one authorized_keys line, without newlines or other control characters"))]
    pub authorized_keys: Vec<String>,

    /// ConfigMaps in the pool's namespace holding more `authorized_keys` lines, e.g. one per
    /// team. Public keys are not secrets. Each ConfigMap must carry the label
    /// `nixpool.dev/use: "true"`. A change reaches the builders within seconds, without a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub authorized_keys_config_maps: Vec<AuthorizedKeysRef>,

    /// Deprecated: use authorizedKeysConfigMaps. Secrets in the pool's namespace holding more
    /// `authorized_keys` lines, each labelled `nixpool.dev/use: "true"`. The operator reads them
    /// by name every 5 s (it may not watch Secrets), so a change takes up to 5 s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub authorized_keys_secrets: Vec<AuthorizedKeysRef>,

    /// An existing Secret holding the host's OpenSSH private key: ed25519, without a passphrase
    /// (another key is reported as BadHostKey). Empty: the operator generates one ed25519 key for
    /// the pool once and keeps it for the pool's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_secret: Option<SecretKeyRef>,
}

impl Default for SshSpec {
    fn default() -> Self {
        Self {
            user: default_user(),
            authorized_keys: Vec::new(),
            authorized_keys_config_maps: Vec::new(),
            authorized_keys_secrets: Vec::new(),
            host_key_secret: None,
        }
    }
}

/// A ConfigMap or Secret whose values are `authorized_keys` lines.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizedKeysRef {
    /// Name of the object, in the pool's namespace.
    pub name: String,
    /// The one key of the object to read. Empty: every key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// One key of a Secret in the pool's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// How clients reach the builders.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.nodePort) || self.type != 'ClusterIP'")
    .message("spec.service.nodePort: a nodePort needs service.type NodePort or LoadBalancer"))]
#[x_kube(validation = Rule::new("!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || self.type == 'LoadBalancer'")
    .message("spec.service.loadBalancerSourceRanges: source ranges need service.type LoadBalancer"))]
pub struct ServiceSpec {
    /// ClusterIP (reachable inside the cluster or over a VPN), NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// SSH port of the Service.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Fixed node port for NodePort/LoadBalancer; empty lets Kubernetes pick one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,
    /// Annotations on the Service, e.g. for a cloud load balancer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// CIDRs allowed to reach a LoadBalancer Service, e.g. your office and VPN ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
    /// Host name clients should use (a DNS name pointing at the load balancer or nodes). When
    /// set it becomes `status.endpoint.host` and the machines line's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$')")
        .message("spec.service.externalHost: give a bare DNS name or IP address, without scheme, user or port"))]
    pub external_host: Option<String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_ssh_port(),
            node_port: None,
            annotations: BTreeMap::new(),
            load_balancer_source_ranges: Vec::new(),
            external_host: None,
        }
    }
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Binary caches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Substitute from cache.nixos.org. Turn it off where builders cannot reach the internet
    /// (air-gapped clusters): every build would first wait for it to time out.
    #[serde(default = "default_true")]
    pub nixos_cache: bool,
    /// Extra substituters the builders fetch from, each with the public key its paths are
    /// signed with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub substituters: Vec<Substituter>,
    /// An Attic cache to substitute from and, optionally, push build results to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attic: Option<AtticCache>,
    /// A Cachix cache to substitute from and, optionally, push build results to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cachix: Option<CachixCache>,
    /// Any Nix store (e.g. `s3://bucket?region=eu-west-1`, `file:///cache`) to push build
    /// results to with `nix copy`, signed with a key from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreCache>,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            nixos_cache: true,
            substituters: Vec::new(),
            attic: None,
            cachix: None,
            store: None,
        }
    }
}

/// A substituter and its signing key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Substituter {
    /// Store URL, e.g. `https://cache.example.com`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9+]+://[!-\"$-~]+$')")
        .message("spec.cache.substituters[].url: give a store URL such as https://cache.example.com, without spaces or `#` (nix.conf cuts a line at `#`)"))]
    pub url: String,
    /// Public key (`name:base64`) the cache signs with; paths without a trusted signature are
    /// not substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(PUBLIC_KEY_RULE)
        .message("spec.cache.substituters[].publicKey: give the key as name:base64, e.g. cache.example.com-1:AbC..="))]
    pub public_key: Option<String>,
}

/// An Attic cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.push || has(self.tokenSecret)")
    .message("spec.cache.attic.tokenSecret: pushing to Attic needs a token; set tokenSecret or push: false"))]
pub struct AtticCache {
    /// Attic server URL, e.g. `https://attic.example.com`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[!-\"$-~]+$')")
        .message("spec.cache.attic.endpoint: give the server URL, e.g. https://attic.example.com, without spaces or `#` (nix.conf cuts a line at `#`)"))]
    pub endpoint: String,
    /// Cache name on the server.
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[!-\"$-~]+$')")
        .message("spec.cache.attic.cache: give the cache name, one word without spaces, `#` or control characters"))]
    pub cache: String,
    /// The cache's public key (`attic cache info` shows it), to substitute from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(PUBLIC_KEY_RULE)
        .message("spec.cache.attic.publicKey: give the key as name:base64, as `attic cache info` prints it"))]
    pub public_key: Option<String>,
    /// Secret key holding an Attic token (needs push permission to push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
    /// Push every path a builder builds.
    #[serde(default)]
    pub push: bool,
}

/// A Cachix cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.push || has(self.tokenSecret)")
    .message("spec.cache.cachix.tokenSecret: pushing to Cachix needs an auth token; set tokenSecret or push: false"))]
pub struct CachixCache {
    /// Cache name (`<name>.cachix.org`).
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9-]*$')")
        .message("spec.cache.cachix.cache: give the bare cache name, e.g. my-team (not the URL)"))]
    pub cache: String,
    /// The cache's public key (`<name>.cachix.org-1:...`), to substitute from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(PUBLIC_KEY_RULE)
        .message("spec.cache.cachix.publicKey: give the key as name:base64, e.g. my-team.cachix.org-1:AbC..="))]
    pub public_key: Option<String>,
    /// Secret key holding a Cachix auth token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
    /// Push every path a builder builds.
    #[serde(default)]
    pub push: bool,
}

/// A Nix store that builds are copied to with `nix copy --to`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.push || has(self.signingKeySecret)")
    .message("spec.cache.store.signingKeySecret: pushed paths must be signed; set signingKeySecret or push: false"))]
pub struct StoreCache {
    /// Store URI, e.g. `s3://nix-cache?region=eu-west-1`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9+]+://[!-\"$-~]+$')")
        .message("spec.cache.store.uri: give a Nix store URI such as s3://bucket or file:///path, without spaces or `#` (nix.conf cuts a line at `#`)"))]
    pub uri: String,
    /// Public key of the signing key, to substitute from the store as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(PUBLIC_KEY_RULE)
        .message("spec.cache.store.publicKey: give the key as name:base64, e.g. cache.example.com-1:AbC..="))]
    pub public_key: Option<String>,
    /// Secret key holding the Nix signing key (`nix key generate-secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_secret: Option<SecretKeyRef>,
    /// Push every path a builder builds.
    #[serde(default)]
    pub push: bool,
}

/// The pool's gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Gateway pods. Two keep the pool reachable while one restarts or its node goes.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: i32,
    /// Seconds a session waits for a free builder slot (a builder starting, or one finishing a
    /// build) before it is refused. The client's nix waits that long too.
    #[serde(default = "default_hold_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub hold_seconds: i32,
    /// CPU and memory requests and limits of each gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            replicas: default_gateway_replicas(),
            hold_seconds: default_hold_seconds(),
            resources: None,
        }
    }
}

/// Builders on demand.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("spec.autoscaling: minReplicas must not be above maxReplicas"))]
pub struct AutoscalingSpec {
    /// Fewest builders. 0 lets an idle pool cost nothing: the first build then waits, held at
    /// the gateway, while a builder starts.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most builders. The machines line advertises `maxReplicas × maxJobs`, so clients' machines
    /// files do not change as the pool scales.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Seconds a builder must be without a session before it is removed.
    #[serde(default = "default_idle_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub idle_seconds: i32,
}

/// Store garbage collection thresholds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcSpec {
    /// When free space in /nix falls below this during a build, Nix collects garbage
    /// (nix.conf `min-free`), e.g. `10Gi`.
    #[serde(default = "default_min_free", skip_serializing_if = "Option::is_none")]
    pub min_free: Option<Quantity>,
    /// Collection stops once this much is free (nix.conf `max-free`), e.g. `50Gi`.
    #[serde(default = "default_max_free", skip_serializing_if = "Option::is_none")]
    pub max_free: Option<Quantity>,
}

impl Default for GcSpec {
    fn default() -> Self {
        Self {
            min_free: default_min_free(),
            max_free: default_max_free(),
        }
    }
}

/// What the operator observed. Written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NixBuilderPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Builder pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Builder pods ready to take builds.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Label selector of the builder pods (for the scale subresource and autoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Ready, Progressing and Degraded, and kstatus's Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Where clients connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// The pool's SSH host public key (`ssh-ed25519 AAAA...`). Pin it; it never changes for the
    /// pool's life unless you replace the host-key Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_public_key: Option<String>,
    /// Builders the operator wants now, with `spec.autoscaling` (between minReplicas and
    /// maxReplicas, from the sessions the gateway reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// A complete `/etc/nix/machines` line for this pool. Its SSH key column is `-`: put the
    /// path of your client key there (`builderctl machines-file` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines_entry: Option<String>,
}

/// A network endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// DNS name or IP address.
    pub host: String,
    /// TCP port of sshd.
    pub port: i32,
}

fn default_gateway_replicas() -> i32 {
    2
}
fn default_hold_seconds() -> i32 {
    300
}
fn default_idle_seconds() -> i32 {
    600
}
fn default_true() -> bool {
    true
}
fn default_replicas() -> i32 {
    1
}
fn default_systems() -> Vec<String> {
    vec!["x86_64-linux".into()]
}
fn default_supported_features() -> Vec<String> {
    vec!["benchmark".into(), "big-parallel".into()]
}
fn default_max_jobs() -> i32 {
    4
}
fn default_speed_factor() -> i32 {
    1
}
fn default_node_selector() -> BTreeMap<String, String> {
    BTreeMap::from([("kubernetes.io/arch".to_string(), "amd64".to_string())])
}
fn default_user() -> String {
    "builder".into()
}
fn default_ssh_port() -> i32 {
    22
}
fn default_grace() -> i64 {
    3600
}
fn default_min_free() -> Option<Quantity> {
    Some(Quantity("5Gi".into()))
}
fn default_max_free() -> Option<Quantity> {
    Some(Quantity("20Gi".into()))
}

impl NixBuilderPoolSpec {
    /// The gateway the pool runs: `spec.gateway`, or its defaults when only `spec.autoscaling`
    /// is set.
    pub fn effective_gateway(&self) -> Option<GatewaySpec> {
        match (&self.gateway, &self.autoscaling) {
            (Some(g), _) => Some(g.clone()),
            (None, Some(_)) => Some(GatewaySpec::default()),
            (None, None) => None,
        }
    }

    /// The jobs a pool's machines line offers, with `ready_builders` builders Ready. With a
    /// gateway it is the capacity the gateway serves (`maxReplicas`, or `replicas`, × maxJobs),
    /// so clients' machines files do not change as the pool scales; without one, the builders
    /// ready now × maxJobs.
    pub fn advertised_jobs(&self, ready_builders: i32) -> u32 {
        let builders = match (&self.autoscaling, self.effective_gateway()) {
            (Some(a), _) => a.max_replicas,
            (None, Some(_)) => self.replicas,
            (None, None) => ready_builders,
        };
        builders.max(0) as u32 * self.max_jobs.max(0) as u32
    }

    /// The spec as the API server fills it in: every default applied. Deserializing `{}`
    /// gives the same.
    pub fn defaults() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every spec field has a default")
    }
}

impl NixBuilderPoolStatus {
    /// The condition of this type (`Ready`, `Degraded`, ...), if the status has it.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether its `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.condition(crate::conditions::READY)
            .is_some_and(|c| c.status == "True")
    }
}

#[cfg(test)]
mod advertised_jobs_tests {
    use super::*;

    #[test]
    fn with_a_gateway_the_machines_line_offers_capacity_not_the_pods_of_the_moment() {
        let mut spec = NixBuilderPoolSpec::defaults();
        spec.max_jobs = 2;
        spec.replicas = 3;
        assert_eq!(spec.advertised_jobs(1), 2, "no gateway: ready builders × maxJobs");
        spec.gateway = Some(GatewaySpec::default());
        assert_eq!(spec.advertised_jobs(1), 6, "a gateway: replicas × maxJobs");
        spec.autoscaling = Some(AutoscalingSpec {
            min_replicas: 0,
            max_replicas: 4,
            idle_seconds: 60,
        });
        assert_eq!(spec.advertised_jobs(0), 8, "autoscaling: maxReplicas × maxJobs");
        spec.gateway = None;
        assert!(spec.effective_gateway().is_some(), "autoscaling implies a gateway");
        assert_eq!(spec.advertised_jobs(0), 8);
    }
}

#[cfg(test)]
mod condition_tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn condition(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: format!("{type_}Reason"),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_condition_is_found_by_its_type_and_only_by_it() {
        let status = NixBuilderPoolStatus {
            conditions: vec![condition("Ready", "False"), condition("Degraded", "True")],
            ..NixBuilderPoolStatus::default()
        };
        assert_eq!(
            status.condition("Degraded").map(|c| c.reason.as_str()),
            Some("DegradedReason")
        );
        assert_eq!(status.condition("Ready").map(|c| c.status.as_str()), Some("False"));
        assert_eq!(status.condition("Stalled"), None, "a type the status lacks");
        assert_eq!(status.condition("ready"), None, "types are case-sensitive");
        assert_eq!(NixBuilderPoolStatus::default().condition("Ready"), None);
        assert!(!status.is_ready() && !NixBuilderPoolStatus::default().is_ready());
        let ready = NixBuilderPoolStatus {
            conditions: vec![condition("Ready", "True")],
            ..NixBuilderPoolStatus::default()
        };
        assert!(ready.is_ready());
    }
}
