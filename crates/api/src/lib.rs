//! The `NixBuilderPool` API (`nixpool.dev/v1alpha1`) and every fact that more than one nixpool
//! binary must agree on: label and annotation names, the paths where a builder pod mounts its
//! config and Secrets, the agent's config document, and the `/etc/nix/machines` line model. With
//! the `ssh-keys` feature, also how SSH keys are read (`ssh_keys`).
//!
//! This crate does no I/O and depends on no runtime.

pub mod agent;
pub mod bounds;
pub mod demand;
pub mod machines;
pub mod quantity;
pub mod rules;
#[cfg(feature = "ssh-keys")]
pub mod ssh_keys;
pub mod v1alpha1;

pub use agent::AgentConfig;
pub use machines::MachinesEntry;
pub use v1alpha1::{NixBuilderPool, NixBuilderPoolSpec, NixBuilderPoolStatus};

/// The API group of every nixpool resource.
pub const GROUP: &str = "nixpool.dev";
/// The one server-side-apply field manager the operator writes with.
pub const FIELD_MANAGER: &str = "nixpool-operator";
/// The name the operator reports Events and holds its Lease under.
pub const OPERATOR_NAME: &str = "nixpool-operator";

/// Standard `app.kubernetes.io/*` labels and nixpool's own annotations.
pub mod labels {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const PART_OF: &str = "app.kubernetes.io/part-of";

    /// Value of [`NAME`] on every builder pod and child of a pool.
    pub const NAME_VALUE: &str = "nixpool-builder";
    /// Value of [`PART_OF`].
    pub const PART_OF_VALUE: &str = "nixpool";
    /// Value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = crate::FIELD_MANAGER;

    /// A Secret a pool names (team keys, its own host key) is used only with this label set to
    /// `"true"`: whoever can create a pool in a namespace cannot mount or read the namespace's
    /// other Secrets by naming them.
    pub const USE: &str = "nixpool.dev/use";
    /// Value of [`NAME`] on a pool's gateway pods (kept apart from the builders' selector).
    pub const GATEWAY_NAME_VALUE: &str = "nixpool-gateway";
    /// Label selector (string form) matching every child of every pool.
    pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=nixpool-operator";
}

/// Annotations nixpool sets and reads.
pub mod annotations {
    /// Pod-template annotation: a hash of everything that needs a pod restart to take effect
    /// (nix.conf, caches, image). Authorized keys are not in it: the agent reloads them live.
    pub const CONFIG_HASH: &str = "nixpool.dev/config-hash";
    /// Annotation on every child: a hash of what the operator last applied. A reconcile applies
    /// a child only when the live object lacks this hash or differs from what it would apply,
    /// so an unchanged pool costs no writes.
    pub const APPLIED_HASH: &str = "nixpool.dev/applied-hash";
    /// Pod annotation the ReplicaSet controller (Kubernetes 1.22 and later) reads to pick which
    /// pods go first on a scale-down: the lowest cost goes first.
    pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
}

/// Condition types and reasons in `status.conditions`.
pub mod conditions {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    /// kstatus (abnormal-true, always present): True while the operator or the Deployment
    /// controller is still catching up with the spec (rolling out, waiting for pods, an address
    /// or a Secret, retrying a failed request); False once the pool matches its spec or stalls.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus (abnormal-true, always present): True while the pool cannot make progress until
    /// a person changes something (an invalid spec, a name taken, a request or pods the API
    /// server refuses, a stuck rollout). `kubectl wait` and Flux's health checks fail on it.
    pub const STALLED: &str = "Stalled";

    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
    pub const REASON_BAD_AUTHORIZED_KEYS: &str = "BadAuthorizedKeys";
    pub const REASON_MISSING_SECRET: &str = "MissingSecret";
    pub const REASON_NOT_OPTED_IN: &str = "NotOptedIn";
    pub const REASON_BUILDERS_READY: &str = "BuildersReady";
    pub const REASON_NO_READY_BUILDERS: &str = "NoReadyBuilders";
    pub const REASON_ENDPOINT_PENDING: &str = "EndpointPending";
    pub const REASON_ROLLING_OUT: &str = "RollingOut";
    pub const REASON_UP_TO_DATE: &str = "UpToDate";
    pub const REASON_SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const REASON_AS_EXPECTED: &str = "AsExpected";
    pub const REASON_ROLLOUT_STUCK: &str = "RolloutStuck";
    pub const REASON_GATEWAY_READY: &str = "GatewayReady";
    pub const REASON_NO_READY_GATEWAY: &str = "NoReadyGateway";
    /// The API server refused the builder (or gateway) pods: the Deployment's ReplicaFailure.
    pub const REASON_PODS_REFUSED: &str = "PodsRefused";
    /// An object under a child's name belongs to something else.
    pub const REASON_NAME_TAKEN: &str = "NameTaken";
    /// The API server refused, or did not answer, an apply of a child.
    pub const REASON_APPLY_FAILED: &str = "ApplyFailed";
    /// The API server refused a read (RBAC), so the pool cannot be reconciled.
    pub const REASON_READ_FAILED: &str = "ReadFailed";
    /// The host-key Secret holds no usable key.
    pub const REASON_BAD_HOST_KEY: &str = "BadHostKey";
}

/// Where a builder pod finds what the operator gives it. The operator mounts these; the agent
/// reads them. Relative to the container's root.
pub mod paths {
    /// The pool ConfigMap is mounted here.
    pub const CONFIG_DIR: &str = "/etc/nixpool";
    /// ConfigMap key (and file name under [`CONFIG_DIR`]) of the agent config document.
    pub const AGENT_CONFIG_KEY: &str = "agent.json";
    /// The host-key Secret is mounted here (mode 0400).
    pub const HOST_KEY_DIR: &str = "/run/nixpool/host-key";
    /// Key, in the operator-made host-key Secret and as a file under [`HOST_KEY_DIR`], of the
    /// OpenSSH ed25519 private key.
    pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
    /// Key of the public half, next to [`HOST_KEY_FILE`].
    pub const HOST_PUBLIC_KEY_FILE: &str = "ssh_host_ed25519_key.pub";
    /// The authorized-keys ConfigMap is mounted here; the agent watches it for changes.
    pub const AUTHORIZED_KEYS_DIR: &str = "/run/nixpool/authorized-keys";
    /// Key, in the authorized-keys ConfigMap and as a file under [`AUTHORIZED_KEYS_DIR`].
    pub const AUTHORIZED_KEYS_FILE: &str = "authorized_keys";
    /// Cache tokens and signing keys are projected into this directory.
    pub const CACHE_SECRETS_DIR: &str = "/run/nixpool/cache";
    /// File names under [`CACHE_SECRETS_DIR`].
    pub const ATTIC_TOKEN_FILE: &str = "attic-token";
    pub const CACHIX_TOKEN_FILE: &str = "cachix-token";
    pub const STORE_SIGNING_KEY_FILE: &str = "store-signing-key";
    /// Where builds see the store: the image's `/nix` under a writable layer on the store volume.
    pub const STORE_MOUNT: &str = "/nix";
    /// Where the builder pod's store volume is mounted; the agent (`run --store-volume`) keeps
    /// the writable layer of [`STORE_MOUNT`] there.
    pub const STORE_VOLUME: &str = "/nix-volume";
    /// The agent's binary inside the builder image.
    pub const AGENT_BINARY: &str = "/bin/nixpool-agent";
    /// The gateway's binary, in the same image.
    pub const GATEWAY_BINARY: &str = "/bin/nixpool-gateway";
    /// The gateway's own key Secret is mounted here in gateway pods.
    pub const GATEWAY_KEY_DIR: &str = "/run/nixpool/gateway-key";
    /// Key, in the gateway-key Secret and as a file under [`GATEWAY_KEY_DIR`], of the gateway's
    /// OpenSSH ed25519 private key (it logs in to builders with it).
    pub const GATEWAY_KEY_FILE: &str = "id_ed25519";
}

/// Ports a builder pod listens on.
pub mod ports {
    /// sshd inside the builder container.
    pub const SSH: u16 = 22;
    /// The agent's `/healthz`, `/readyz` and `/metrics`.
    pub const AGENT_HEALTH: u16 = 8090;
    pub const SSH_NAME: &str = "ssh";
    pub const HEALTH_NAME: &str = "health";
    /// The gateway's SSH port inside its pod (unprivileged: the gateway runs as a plain user).
    pub const GATEWAY_SSH: u16 = 2222;
    /// The gateway's `/healthz`, `/readyz` and `/metrics`.
    pub const GATEWAY_HTTP: u16 = 8091;
}

/// Deterministic names of a pool's children.
pub mod names {
    pub fn host_key_secret(pool: &str) -> String {
        format!("{pool}-host-key")
    }
    /// The ConfigMap of every key allowed to log in (public keys are not secrets).
    pub fn authorized_keys(pool: &str) -> String {
        format!("{pool}-authorized-keys")
    }
    pub fn config_map(pool: &str) -> String {
        format!("{pool}-config")
    }
    /// The Deployment, Service and PodDisruptionBudget share the pool's name.
    pub fn workload(pool: &str) -> String {
        pool.to_string()
    }
    /// The gateway's Deployment, ServiceAccount, Role and RoleBinding.
    pub fn gateway(pool: &str) -> String {
        format!("{pool}-gateway")
    }
    /// The Secret of the gateway's own SSH key (builders trust its public half).
    pub fn gateway_key_secret(pool: &str) -> String {
        format!("{pool}-gateway-key")
    }
    /// The ConfigMap the gateway pods write their demand reports to.
    pub fn gateway_demand(pool: &str) -> String {
        format!("{pool}-gateway-demand")
    }
}
