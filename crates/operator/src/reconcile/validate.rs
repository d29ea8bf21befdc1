//! Pure spec validation. The CRD schema's size bounds and CEL rules are evaluated here too (API
//! servers before 1.25 ignore CEL; a spec may come from `render` without any server), followed
//! by what CEL cannot say (quantities, SSH key syntax).

use k8s_openapi::api::core::v1::LocalObjectReference;
use kube::core::cel;
use kube::{CustomResourceExt, ResourceExt};
use nixpool_api::NixBuilderPool;
use nixpool_api::quantity;

use crate::authorized_keys;

/// What validation derives from a valid spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedSpec {
    /// `spec.image`, or the operator's default.
    pub image: String,
    /// `spec.imagePullSecrets`, or the operator's default pull secrets when it names none.
    pub image_pull_secrets: Vec<LocalObjectReference>,
    pub min_free_bytes: Option<u64>,
    pub max_free_bytes: Option<u64>,
}

/// Why a spec is refused: one message per problem, each naming the field and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct InvalidSpec(pub Vec<String>);

/// Which builder images pools may run: the operator's `--default-image` for pools that name none,
/// and `--allowed-image-prefix` for those that do. A pool creator can run a privileged pod with
/// the image, so the cluster admin decides which.
#[derive(Clone, Debug)]
pub struct Images {
    pub default: String,
    /// Registry/repository prefixes; a prefix ending in `/` allows everything below it, one that
    /// does not allows that repository (any tag or digest).
    pub allowed_prefixes: Vec<String>,
    /// Image pull Secrets (by name, in the pool's namespace) for pools that name none.
    pub default_pull_secrets: Vec<String>,
}

impl Images {
    /// With no prefixes given, only the default image's repository is allowed.
    pub fn new(default: &str, allowed_prefixes: Vec<String>) -> Self {
        let allowed_prefixes = if allowed_prefixes.is_empty() {
            vec![repository(default).to_string()]
        } else {
            allowed_prefixes
        };
        Self {
            default: default.to_string(),
            allowed_prefixes,
            default_pull_secrets: Vec::new(),
        }
    }

    /// With these pull Secrets for pools whose `spec.imagePullSecrets` is empty.
    pub fn with_default_pull_secrets(mut self, names: Vec<String>) -> Self {
        self.default_pull_secrets = names;
        self
    }

    pub fn permits(&self, image: &str) -> bool {
        self.allowed_prefixes.iter().any(|p| {
            !p.is_empty()
                && (image == p
                    || image.strip_prefix(p.as_str()).is_some_and(|rest| {
                        p.ends_with('/') || rest.starts_with(':') || rest.starts_with('@') || rest.starts_with('/')
                    }))
        })
    }
}

impl From<&str> for Images {
    fn from(default: &str) -> Self {
        Images::new(default, Vec::new())
    }
}

/// An image reference without its tag or digest.
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// The CRD's CEL rules (`x-kubernetes-validations`) on `pool`, as the API server runs them. The
/// rules are compiled once per process: kube's `validate_cel` compiles them at every call (18 ms
/// a call in a release build here, against 0.5 ms compiled once), and that was most of the
/// operator's CPU while 1000 pools were created. The evaluator is made once per thread.
fn cel_rules(pool: &NixBuilderPool) -> Result<(), cel::ValidationErrors> {
    static COMPILED: std::sync::OnceLock<cel::CompiledSchema> = std::sync::OnceLock::new();
    thread_local! {
        static VALIDATOR: cel::Validator = cel::Validator::new();
    }
    let compiled = COMPILED.get_or_init(|| {
        let crd = NixBuilderPool::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("the derived CRD has an openAPIV3Schema");
        cel::compile_schema(&serde_json::to_value(schema).expect("the schema serializes"))
    });
    let object = serde_json::to_value(pool).expect("the pool serializes");
    VALIDATOR.with(|v| v.validate_compiled(compiled, &object, None))
}

pub fn validate(pool: &NixBuilderPool, images: &Images) -> Result<ValidatedSpec, InvalidSpec> {
    // The schema's size bounds first (an API server checks them before any CEL rule), then the
    // CEL rules: both straight from the CRD the types generate.
    let mut problems = nixpool_api::bounds::check(pool);
    if let Err(errors) = cel_rules(pool) {
        for e in errors.as_slice() {
            // Our rule messages already start with the field they are about.
            problems.push(
                if e.message.starts_with("spec.") || e.message.starts_with("metadata.") {
                    e.message.clone()
                } else {
                    e.to_string()
                },
            );
        }
    }
    let spec = &pool.spec;

    let image = spec
        .image
        .clone()
        .filter(|i| !i.trim().is_empty())
        .unwrap_or_else(|| images.default.clone());
    if image.trim().is_empty() {
        problems.push("spec.image: no image given and the operator has no --default-image; set spec.image to the nixpool builder image".into());
    } else if !images.permits(&image) {
        problems.push(format!(
            "spec.image: {image:?} is not an image this operator runs (allowed: {}); use an image under one of those, or have the cluster admin add its registry/repository with the operator's --allowed-image-prefix",
            images.allowed_prefixes.join(", ")
        ));
    }

    let mut bytes = |field: &str, q: Option<&str>| -> Option<u64> {
        let q = q?;
        match quantity::to_bytes(q) {
            Ok(b) => Some(b),
            Err(e) => {
                problems.push(format!("{field}: {e}"));
                None
            }
        }
    };
    let min_free_bytes = bytes("spec.gc.minFree", spec.gc.min_free.as_ref().map(|q| q.0.as_str()));
    let max_free_bytes = bytes("spec.gc.maxFree", spec.gc.max_free.as_ref().map(|q| q.0.as_str()));
    bytes(
        "spec.store.emptyDir.sizeLimit",
        spec.store
            .empty_dir
            .as_ref()
            .and_then(|e| e.size_limit.as_ref())
            .map(|q| q.0.as_str()),
    );
    bytes(
        "spec.store.ephemeral.size",
        spec.store.ephemeral.as_ref().map(|e| e.size.0.as_str()),
    );
    if let (Some(min), Some(max)) = (min_free_bytes, max_free_bytes)
        && min >= max
    {
        problems.push("spec.gc: minFree must be smaller than maxFree (Nix collects from minFree up to maxFree); raise maxFree or lower minFree".into());
    }

    for (i, line) in spec.ssh.authorized_keys.iter().enumerate() {
        if let Err(reason) = authorized_keys::check(line) {
            problems.push(format!("spec.ssh.authorizedKeys[{i}]: {reason}"));
        }
    }
    for (i, r) in spec.ssh.authorized_keys_secrets.iter().enumerate() {
        if r.name.trim().is_empty() {
            problems.push(format!(
                "spec.ssh.authorizedKeysSecrets[{i}].name: give the name of a Secret in namespace {}",
                pool.namespace().unwrap_or_default()
            ));
        }
    }
    if let Some(r) = &spec.ssh.host_key_secret
        && (r.name.trim().is_empty() || r.key.trim().is_empty())
    {
        problems.push("spec.ssh.hostKeySecret: give both name and key of the Secret holding the OpenSSH private host key, or leave hostKeySecret out to let the operator generate one".into());
    }

    let image_pull_secrets = if spec.image_pull_secrets.is_empty() {
        images
            .default_pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() })
            .collect()
    } else {
        spec.image_pull_secrets.clone()
    };

    if problems.is_empty() {
        Ok(ValidatedSpec {
            image,
            image_pull_secrets,
            min_free_bytes,
            max_free_bytes,
        })
    } else {
        Err(InvalidSpec(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(spec: serde_json::Value) -> NixBuilderPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
            "metadata": {"name": "builders", "namespace": "ci"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn the_defaults_are_valid() {
        let v = validate(&pool(serde_json::json!({})), &Images::from("img:1")).unwrap();
        assert_eq!(v.image, "img:1");
        assert_eq!(v.min_free_bytes, Some(5 << 30));
        assert_eq!(v.max_free_bytes, Some(20 << 30));
    }

    #[test]
    fn cel_rules_are_enforced_with_their_messages() {
        let cases = [
            (
                serde_json::json!({"nixConfig": {"trusted-users": "everyone"}}),
                "spec.nixConfig: this setting is set by nixpool",
            ),
            (
                serde_json::json!({"systems": []}),
                "spec.systems: list at least one Nix system",
            ),
            (serde_json::json!({"ssh": {"user": "root"}}), "spec.ssh.user:"),
            (
                serde_json::json!({"store": {"emptyDir": {}, "ephemeral": {"size": "1Gi"}}}),
                "spec.store: set either emptyDir or ephemeral",
            ),
            (
                serde_json::json!({"cache": {"attic": {"endpoint": "https://a", "cache": "c", "push": true}}}),
                "spec.cache.attic.tokenSecret",
            ),
            (
                serde_json::json!({"service": {"nodePort": 30022}}),
                "spec.service.nodePort",
            ),
            (
                serde_json::json!({"service": {"type": "LoadBalancer", "externalHost": "ssh://x:22"}}),
                "spec.service.externalHost",
            ),
        ];
        for (spec, expected) in cases {
            let err = validate(&pool(spec.clone()), &Images::from("img")).unwrap_err();
            assert!(
                err.0.iter().any(|m| m.starts_with(expected)),
                "{spec}: expected {expected:?}, got {err}"
            );
        }
    }

    #[test]
    fn a_bad_pool_name_is_refused() {
        let mut p = pool(serde_json::json!({}));
        p.metadata.name = Some("x".repeat(48));
        let err = validate(&p, &Images::from("img")).unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }

    #[test]
    fn rust_side_checks_name_the_field() {
        let err = validate(
            &pool(serde_json::json!({
                "gc": {"minFree": "10 GB", "maxFree": "1Gi"},
                "ssh": {"authorizedKeys": ["ssh-ed25519 nonsense"]}
            })),
            &Images::from("img"),
        )
        .unwrap_err();
        assert!(
            err.0
                .iter()
                .any(|m| m.starts_with("spec.gc.minFree: \"10 GB\" is not a Kubernetes quantity")),
            "{err}"
        );
        assert!(
            err.0
                .iter()
                .any(|m| m.starts_with("spec.ssh.authorizedKeys[0]: not an OpenSSH public key line")),
            "{err}"
        );

        let err = validate(
            &pool(serde_json::json!({"gc": {"minFree": "30Gi", "maxFree": "20Gi"}})),
            &Images::from("img"),
        )
        .unwrap_err();
        assert!(
            err.0[0].starts_with("spec.gc: minFree must be smaller than maxFree"),
            "{err}"
        );
        let err = validate(&pool(serde_json::json!({})), &Images::from("")).unwrap_err();
        assert!(err.0[0].starts_with("spec.image:"), "{err}");
    }

    #[test]
    fn the_default_pull_secrets_serve_pools_that_name_none() {
        let images = Images::from("img:1").with_default_pull_secrets(vec!["regcred".into(), "mirror".into()]);
        let v = validate(&pool(serde_json::json!({})), &images).unwrap();
        let names: Vec<&str> = v.image_pull_secrets.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["regcred", "mirror"]);
        let v = validate(
            &pool(serde_json::json!({"imagePullSecrets": [{"name": "own"}]})),
            &images,
        )
        .unwrap();
        let names: Vec<&str> = v.image_pull_secrets.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["own"], "a pool's own pull secrets replace the defaults");
        let v = validate(&pool(serde_json::json!({})), &Images::from("img:1")).unwrap();
        assert!(v.image_pull_secrets.is_empty());
    }

    #[test]
    fn pod_labels_and_annotations_of_nixpool_are_refused_naming_the_field() {
        let cases = [
            (
                serde_json::json!({"pod": {"labels": {"app.kubernetes.io/instance": "other"}}}),
                "spec.pod.labels: app.kubernetes.io/name",
            ),
            (
                serde_json::json!({"pod": {"labels": {"nixpool.dev/x": "y"}}}),
                "spec.pod.labels: app.kubernetes.io/name",
            ),
            (
                serde_json::json!({"pod": {"labels": {"team": "has space"}}}),
                "spec.pod.labels: a label value",
            ),
            (
                serde_json::json!({"pod": {"labels": {"-team": "ci"}}}),
                "spec.pod.labels: a label key",
            ),
            (
                serde_json::json!({"pod": {"annotations": {"nixpool.dev/config-hash": "x"}}}),
                "spec.pod.annotations: controller.kubernetes.io/pod-deletion-cost and nixpool.dev/*",
            ),
            (
                serde_json::json!({"pod": {"annotations": {"a/b/c": "x"}}}),
                "spec.pod.annotations: an annotation key",
            ),
            (
                serde_json::json!({"pod": {"priorityClassName": "High"}}),
                "spec.pod.priorityClassName",
            ),
            (
                serde_json::json!({"pod": {"runtimeClassName": "a_b"}}),
                "spec.pod.runtimeClassName",
            ),
            (
                serde_json::json!({"pod": {"topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]}}),
                "spec.pod.topologySpreadConstraints",
            ),
        ];
        for (spec, expected) in cases {
            let err = validate(&pool(spec.clone()), &Images::from("img")).unwrap_err();
            assert!(
                err.0.iter().any(|m| m.starts_with(expected)),
                "{spec}: expected {expected:?}, got {err}"
            );
        }
        validate(
            &pool(serde_json::json!({"pod": {
                "labels": {"team": "ci", "example.com/cost-center": "", "app.kubernetes.io/version": "1.2"},
                "annotations": {"karpenter.sh/do-not-disrupt": "true", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                "priorityClassName": "nix-builders",
                "runtimeClassName": "runc.privileged",
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]
            }})),
            &Images::from("img"),
        )
        .expect("valid pod fields are accepted");
    }

    #[test]
    fn images_come_from_the_allowed_prefixes_only() {
        let default_only = Images::from("ghcr.io/nixpool/nixpool-builder:latest");
        assert_eq!(default_only.allowed_prefixes, ["ghcr.io/nixpool/nixpool-builder"]);
        for ok in [
            "ghcr.io/nixpool/nixpool-builder",
            "ghcr.io/nixpool/nixpool-builder:0.2.0",
            "ghcr.io/nixpool/nixpool-builder@sha256:abc",
        ] {
            assert!(default_only.permits(ok), "{ok}");
        }
        for refused in [
            "ghcr.io/nixpool/nixpool-builder-evil:1",
            "docker.io/library/alpine",
            "ghcr.io/nixpool",
            "",
        ] {
            assert!(!default_only.permits(refused), "{refused}");
        }
        let registry = Images::new("x", vec!["registry.corp/".into(), "localhost:5000/nix".into()]);
        assert!(registry.permits("registry.corp/team/builder:1"));
        assert!(registry.permits("localhost:5000/nix:2"));
        assert!(!registry.permits("localhost:5000/nixevil"));
        assert_eq!(repository("localhost:5000/builder"), "localhost:5000/builder");
    }

    #[test]
    fn an_image_outside_the_prefixes_is_refused_naming_the_field_and_the_fix() {
        let err = validate(
            &pool(serde_json::json!({"image": "evil.example/miner:1"})),
            &Images::from("img:1"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("spec.image") && err.contains("evil.example/miner:1"),
            "{err}"
        );
        assert!(
            err.contains("--allowed-image-prefix") && err.contains("allowed: img"),
            "{err}"
        );
    }
}
