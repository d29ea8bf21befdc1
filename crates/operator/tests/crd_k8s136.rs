//! The CRD against Kubernetes 1.36's CRD engine (`apiextensions-apiserver`, built by
//! `hack/build-apiextensions-apiserver.sh`) next to the 1.20 test control plane.
//!
//! 1.20 ignores CEL, so only a 1.36 engine tells whether the CRD installs at all (structural
//! schema, CEL compilation, the estimated cost budget) and whether its rules refuse what they
//! should. Every spec of [`corpus`] must be refused by the engine (422, naming the field) *and* by
//! the operator's own validation; every example under `examples/` must be accepted by both.
//! Extend the corpus when a spec field or rule is added.

use std::time::{Duration, Instant};

use nixpool_operator::reconcile::validate::Images;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, CustomResourceExt};
use nixpool_api::NixBuilderPool;
use nixpool_operator::reconcile::validate::validate;
use nixpool_testenv::ControlPlane;
use nixpool_testenv::crd_engine::CrdEngine;
use serde_json::{Value, json};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// One spec both the engine and the operator must refuse.
struct Case {
    /// What is wrong, for failure messages.
    what: &'static str,
    /// The spec (every other field defaulted).
    spec: Value,
    /// The field the refusal must name, as the API server spells it (`spec.systems[0]`,
    /// `spec.nixConfig.keep-outputs`).
    field: &'static str,
    /// `metadata.name`, when the name itself is the problem.
    name: Option<String>,
}

fn case(what: &'static str, field: &'static str, spec: Value) -> Case {
    Case {
        what,
        spec,
        field,
        name: None,
    }
}

/// `n` characters.
fn long(n: usize) -> String {
    "a".repeat(n)
}

/// A valid name:base64 key.
const KEY: &str = "cache.example.com-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// The corpus of invalid specs: at least one per CEL rule, one per size bound, and a newline
/// (or other control character) in every string that reaches nix.conf, sshd_config,
/// authorized_keys or a machines line.
fn corpus() -> Vec<Case> {
    let mut cases = vec![
        // CEL rules.
        Case {
            name: Some(long(48)),
            ..case("a pool name longer than 47 characters", "metadata.name", json!({}))
        },
        case("no systems", "spec.systems", json!({"systems": []})),
        case(
            "a system without its OS",
            "spec.systems",
            json!({"systems": ["x86_64"]}),
        ),
        case(
            "a feature with a space",
            "spec.supportedFeatures",
            json!({"supportedFeatures": ["big parallel"]}),
        ),
        case(
            "a mandatory feature with a comma",
            "spec.mandatoryFeatures",
            json!({"mandatoryFeatures": ["kvm,nixos-test"]}),
        ),
        case(
            "an operator-owned nix.conf setting",
            "spec.nixConfig",
            json!({"nixConfig": {"trusted-users": "*"}}),
        ),
        case(
            "a daemon plugin in nix.conf",
            "spec.nixConfig",
            json!({"nixConfig": {"plugin-files": "/nix/store/x-plugin/lib/p.so"}}),
        ),
        case(
            "a root pre-build hook in nix.conf",
            "spec.nixConfig",
            json!({"nixConfig": {"pre-build-hook": "/nix/store/x-hook"}}),
        ),
        case(
            "the extra- form of an owned setting",
            "spec.nixConfig",
            json!({"nixConfig": {"extra-trusted-users": "eve"}}),
        ),
        case(
            "extra-platforms, which spec.systems sets",
            "spec.nixConfig",
            json!({"nixConfig": {"extra-platforms": "aarch64-linux"}}),
        ),
        case(
            "builders on a builder",
            "spec.nixConfig",
            json!({"nixConfig": {"builders": "ssh://elsewhere"}}),
        ),
        case(
            "a build user as the SSH user",
            "spec.ssh.user",
            json!({"ssh": {"user": "nixbld1"}}),
        ),
        // Found by the nix.conf property test (crates/agent/src/props.rs): Nix refuses an
        // `include = x` line and cuts a line at `#`.
        case(
            "include, a nix.conf directive that Nix refuses as a setting",
            "spec.nixConfig",
            json!({"nixConfig": {"include": "/etc/nix/other.conf"}}),
        ),
        case(
            "a Boolean setting that is not true or false (Nix refuses nix.conf)",
            "spec.nixConfig",
            json!({"nixConfig": {"keep-outputs": "maybe"}}),
        ),
        case(
            "a whole-number setting with a unit (Nix 2.8 refuses nix.conf)",
            "spec.nixConfig",
            json!({"nixConfig": {"max-silent-time": "1h"}}),
        ),
        case(
            "an old name of sandbox, which would turn off the sandbox nixpool sets",
            "spec.nixConfig",
            json!({"nixConfig": {"build-use-sandbox": "false"}}),
        ),
        case(
            "an old name of substituters",
            "spec.nixConfig",
            json!({"nixConfig": {"binary-caches": "http://evil.example"}}),
        ),
        case(
            "`#` in a nix.conf value",
            "spec.nixConfig",
            json!({"nixConfig": {"allowed-uris": "github:a/b#c"}}),
        ),
        case(
            "`#` in a substituter URL",
            "spec.cache.substituters[0].url",
            json!({"cache": {"substituters": [{"url": "https://cache.example.com/#x"}]}}),
        ),
        case(
            "`#` in a substituter key",
            "spec.cache.substituters[0].publicKey",
            json!({"cache": {"substituters": [{"url": "https://c", "publicKey": "c#1:AAAA"}]}}),
        ),
        case(
            "`#` in a store URI",
            "spec.cache.store.uri",
            json!({"cache": {"store": {"uri": "s3://bucket#x", "push": false}}}),
        ),
        case(
            "an upper-case nix.conf setting name",
            "spec.nixConfig",
            json!({"nixConfig": {"Keep_Outputs": "true"}}),
        ),
        case(
            "a store with both emptyDir and ephemeral",
            "spec.store",
            json!({"store": {"emptyDir": {}, "ephemeral": {"size": "1Gi"}}}),
        ),
        case(
            "root as the SSH user",
            "spec.ssh.user",
            json!({"ssh": {"user": "root"}}),
        ),
        case(
            "a nodePort on a ClusterIP Service",
            "spec.service",
            json!({"service": {"nodePort": 30022}}),
        ),
        case(
            "source ranges on a ClusterIP Service",
            "spec.service",
            json!({"service": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}}),
        ),
        case(
            "an external host with scheme and port",
            "spec.service.externalHost",
            json!({"service": {"type": "LoadBalancer", "externalHost": "ssh://x:22"}}),
        ),
        case(
            "autoscaling with minReplicas above maxReplicas",
            "spec.autoscaling",
            json!({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}),
        ),
        case(
            "a gateway of 0 pods",
            "spec.gateway.replicas",
            json!({"gateway": {"replicas": 0}}),
        ),
        case(
            "a substituter URL without scheme",
            "spec.cache.substituters[0].url",
            json!({"cache": {"substituters": [{"url": "cache.example.com"}]}}),
        ),
        case(
            "a substituter key without name",
            "spec.cache.substituters[0].publicKey",
            json!({"cache": {"substituters": [{"url": "https://c", "publicKey": "AAAA"}]}}),
        ),
        case(
            "an Attic push without token",
            "spec.cache.attic",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": "c", "push": true}}}),
        ),
        case(
            "an Attic endpoint that is not http(s)",
            "spec.cache.attic.endpoint",
            json!({"cache": {"attic": {"endpoint": "ftp://a", "cache": "c"}}}),
        ),
        case(
            "an Attic cache name with a space",
            "spec.cache.attic.cache",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": "my cache"}}}),
        ),
        case(
            "an Attic key without name",
            "spec.cache.attic.publicKey",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": "c", "publicKey": "AAAA"}}}),
        ),
        case(
            "a Cachix push without token",
            "spec.cache.cachix",
            json!({"cache": {"cachix": {"cache": "c", "push": true}}}),
        ),
        case(
            "a Cachix URL instead of its name",
            "spec.cache.cachix.cache",
            json!({"cache": {"cachix": {"cache": "https://c.cachix.org"}}}),
        ),
        case(
            "a Cachix key without name",
            "spec.cache.cachix.publicKey",
            json!({"cache": {"cachix": {"cache": "c", "publicKey": "AAAA"}}}),
        ),
        case(
            "a store push without signing key",
            "spec.cache.store",
            json!({"cache": {"store": {"uri": "s3://b", "push": true}}}),
        ),
        case(
            "a store URI without scheme",
            "spec.cache.store.uri",
            json!({"cache": {"store": {"uri": "/cache"}}}),
        ),
        case(
            "a store key without name",
            "spec.cache.store.publicKey",
            json!({"cache": {"store": {"uri": "s3://b", "publicKey": "AAAA"}}}),
        ),
        // Size bounds.
        case(
            "17 systems",
            "spec.systems",
            json!({"systems": vec!["x86_64-linux"; 17]}),
        ),
        case(
            "a 65-character system",
            "spec.systems[0]",
            json!({"systems": [format!("{}-linux", long(59))]}),
        ),
        case(
            "65 features",
            "spec.supportedFeatures",
            json!({"supportedFeatures": vec!["f"; 65]}),
        ),
        case(
            "a 65-character feature",
            "spec.supportedFeatures[0]",
            json!({"supportedFeatures": [long(65)]}),
        ),
        case(
            "65 mandatory features",
            "spec.mandatoryFeatures",
            json!({"mandatoryFeatures": vec!["f"; 65]}),
        ),
        case(
            "a 65-character mandatory feature",
            "spec.mandatoryFeatures[0]",
            json!({"mandatoryFeatures": [long(65)]}),
        ),
        case(
            "65 nix.conf settings",
            "spec.nixConfig",
            json!({"nixConfig": (0..65).map(|i| (format!("setting-{i}"), json!("1"))).collect::<serde_json::Map<_, _>>()}),
        ),
        case(
            "a 4097-character nix.conf value",
            "spec.nixConfig.keep-outputs",
            json!({"nixConfig": {"keep-outputs": long(4097)}}),
        ),
        case(
            "a 33-character user",
            "spec.ssh.user",
            json!({"ssh": {"user": long(33)}}),
        ),
        case(
            "257 authorized keys",
            "spec.ssh.authorizedKeys",
            json!({"ssh": {"authorizedKeys": vec!["ssh-ed25519 AAAA"; 257]}}),
        ),
        case(
            "a 16385-character authorized key",
            "spec.ssh.authorizedKeys[0]",
            json!({"ssh": {"authorizedKeys": [long(16385)]}}),
        ),
        case(
            "a 254-character external host",
            "spec.service.externalHost",
            json!({"service": {"type": "LoadBalancer", "externalHost": long(254)}}),
        ),
        case(
            "33 substituters",
            "spec.cache.substituters",
            json!({"cache": {"substituters": vec![json!({"url": "https://c"}); 33]}}),
        ),
        case(
            "a 2049-character substituter URL",
            "spec.cache.substituters[0].url",
            json!({"cache": {"substituters": [{"url": format!("https://{}", long(2041))}]}}),
        ),
        case(
            "a 1025-character substituter key",
            "spec.cache.substituters[0].publicKey",
            json!({"cache": {"substituters": [{"url": "https://c", "publicKey": format!("n:{}", long(1023))}]}}),
        ),
        case(
            "a 2049-character Attic endpoint",
            "spec.cache.attic.endpoint",
            json!({"cache": {"attic": {"endpoint": format!("https://{}", long(2041)), "cache": "c"}}}),
        ),
        case(
            "a 129-character Attic cache",
            "spec.cache.attic.cache",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": long(129)}}}),
        ),
        case(
            "a 1025-character Attic key",
            "spec.cache.attic.publicKey",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": "c", "publicKey": format!("n:{}", long(1023))}}}),
        ),
        case(
            "a 129-character Cachix cache",
            "spec.cache.cachix.cache",
            json!({"cache": {"cachix": {"cache": long(129)}}}),
        ),
        case(
            "a 1025-character Cachix key",
            "spec.cache.cachix.publicKey",
            json!({"cache": {"cachix": {"cache": "c", "publicKey": format!("n:{}", long(1023))}}}),
        ),
        case(
            "a 2049-character store URI",
            "spec.cache.store.uri",
            json!({"cache": {"store": {"uri": format!("s3://{}", long(2044))}}}),
        ),
        case(
            "a 1025-character store key",
            "spec.cache.store.publicKey",
            json!({"cache": {"store": {"uri": "s3://b", "publicKey": format!("n:{}", long(1023))}}}),
        ),
        // spec.pod: nixpool's own labels and annotations, Kubernetes' key and value syntax,
        // class names, spread constraints, and the bounds.
        case(
            "a pod label the Deployment selects by",
            "spec.pod.labels",
            json!({"pod": {"labels": {"app.kubernetes.io/instance": "other"}}}),
        ),
        case(
            "a pod label under nixpool.dev/",
            "spec.pod.labels",
            json!({"pod": {"labels": {"nixpool.dev/pool": "x"}}}),
        ),
        case(
            "pod-template-hash as a pod label",
            "spec.pod.labels",
            json!({"pod": {"labels": {"pod-template-hash": "x"}}}),
        ),
        case(
            "a pod label key starting with '-'",
            "spec.pod.labels",
            json!({"pod": {"labels": {"-team": "ci"}}}),
        ),
        case(
            "a pod label key with two slashes",
            "spec.pod.labels",
            json!({"pod": {"labels": {"a/b/c": "ci"}}}),
        ),
        case(
            "a pod label key with a 64-character name",
            "spec.pod.labels",
            json!({"pod": {"labels": {long(64): "ci"}}}),
        ),
        case(
            "a pod label key with a 254-character prefix",
            "spec.pod.labels",
            json!({"pod": {"labels": {format!("{}/team", long(254)): "ci"}}}),
        ),
        case(
            "a pod label key with an upper-case prefix",
            "spec.pod.labels",
            json!({"pod": {"labels": {"Example.com/team": "ci"}}}),
        ),
        case(
            "a pod label value with a space",
            "spec.pod.labels",
            json!({"pod": {"labels": {"team": "c i"}}}),
        ),
        case(
            "a pod label value ending in '-'",
            "spec.pod.labels",
            json!({"pod": {"labels": {"team": "ci-"}}}),
        ),
        case(
            "a 64-character pod label value",
            "spec.pod.labels.team",
            json!({"pod": {"labels": {"team": long(64)}}}),
        ),
        case(
            "65 pod labels",
            "spec.pod.labels",
            json!({"pod": {"labels": (0..65).map(|i| (format!("l{i}"), json!("x"))).collect::<serde_json::Map<_, _>>()}}),
        ),
        case(
            "the pod-deletion cost as a pod annotation",
            "spec.pod.annotations",
            json!({"pod": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "0"}}}),
        ),
        case(
            "a pod annotation under nixpool.dev/",
            "spec.pod.annotations",
            json!({"pod": {"annotations": {"nixpool.dev/config-hash": "x"}}}),
        ),
        case(
            "a pod annotation key with a space",
            "spec.pod.annotations",
            json!({"pod": {"annotations": {"do not disrupt": "true"}}}),
        ),
        case(
            "a 4097-character pod annotation",
            "spec.pod.annotations.note",
            json!({"pod": {"annotations": {"note": long(4097)}}}),
        ),
        case(
            "33 pod annotations",
            "spec.pod.annotations",
            json!({"pod": {"annotations": (0..33).map(|i| (format!("a{i}"), json!("x"))).collect::<serde_json::Map<_, _>>()}}),
        ),
        case(
            "an upper-case priority class",
            "spec.pod.priorityClassName",
            json!({"pod": {"priorityClassName": "High"}}),
        ),
        case(
            "a 254-character priority class",
            "spec.pod.priorityClassName",
            json!({"pod": {"priorityClassName": long(254)}}),
        ),
        case(
            "a runtime class with '_'",
            "spec.pod.runtimeClassName",
            json!({"pod": {"runtimeClassName": "run_c"}}),
        ),
        case(
            "a spread constraint with maxSkew 0",
            "spec.pod.topologySpreadConstraints",
            json!({"pod": {"topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}]}}),
        ),
        case(
            "a spread constraint without a topology key",
            "spec.pod.topologySpreadConstraints",
            json!({"pod": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "", "whenUnsatisfiable": "DoNotSchedule"}]}}),
        ),
        case(
            "a spread constraint with an unknown whenUnsatisfiable",
            "spec.pod.topologySpreadConstraints",
            json!({"pod": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "Never"}]}}),
        ),
        case(
            "9 spread constraints",
            "spec.pod.topologySpreadConstraints",
            json!({"pod": {"topologySpreadConstraints": (0..9).map(|i| json!({"maxSkew": 1, "topologyKey": format!("k{i}"), "whenUnsatisfiable": "ScheduleAnyway"})).collect::<Vec<_>>()}}),
        ),
    ];

    // Control characters in every string that reaches a config file or the machines line: a
    // newline would end the line and start one of the writer's choosing.
    for (what, bad) in [
        ("a newline", "\n"),
        ("a carriage return", "\r"),
        ("a tab", "\t"),
        ("a NUL", "\u{0}"),
    ] {
        let v = |good: &str| format!("{good}{bad}trusted-users = *");
        let mut add = |field: &'static str, spec: Value| {
            cases.push(Case {
                what,
                spec,
                field,
                name: None,
            })
        };
        add("spec.systems", json!({"systems": [v("x86_64-linux")]}));
        add("spec.supportedFeatures", json!({"supportedFeatures": [v("kvm")]}));
        add("spec.mandatoryFeatures", json!({"mandatoryFeatures": [v("kvm")]}));
        add("spec.nixConfig", json!({"nixConfig": {"keep-outputs": v("true")}}));
        add("spec.nixConfig", json!({"nixConfig": {v("keep-outputs"): "true"}}));
        add("spec.ssh.user", json!({"ssh": {"user": v("builder")}}));
        add(
            "spec.ssh.authorizedKeys",
            json!({"ssh": {"authorizedKeys": [format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 a{bad}ssh-ed25519 AAAA evil")]}}),
        );
        add(
            "spec.service.externalHost",
            json!({"service": {"type": "LoadBalancer", "externalHost": v("builders.example.com")}}),
        );
        add(
            "spec.cache.substituters[0].url",
            json!({"cache": {"substituters": [{"url": v("https://c")}]}}),
        );
        add(
            "spec.cache.substituters[0].publicKey",
            json!({"cache": {"substituters": [{"url": "https://c", "publicKey": format!("a{bad}{KEY}")}]}}),
        );
        add(
            "spec.cache.attic.endpoint",
            json!({"cache": {"attic": {"endpoint": v("https://a"), "cache": "c"}}}),
        );
        add(
            "spec.cache.attic.cache",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": v("c")}}}),
        );
        add(
            "spec.cache.attic.publicKey",
            json!({"cache": {"attic": {"endpoint": "https://a", "cache": "c", "publicKey": format!("a{bad}{KEY}")}}}),
        );
        add(
            "spec.cache.cachix.cache",
            json!({"cache": {"cachix": {"cache": v("c")}}}),
        );
        add(
            "spec.cache.cachix.publicKey",
            json!({"cache": {"cachix": {"cache": "c", "publicKey": format!("a{bad}{KEY}")}}}),
        );
        add(
            "spec.cache.store.uri",
            json!({"cache": {"store": {"uri": v("s3://b")}}}),
        );
        add(
            "spec.cache.store.publicKey",
            json!({"cache": {"store": {"uri": "s3://b", "publicKey": format!("a{bad}{KEY}")}}}),
        );
    }
    cases
}

/// The server's own words for an API error (kube's `Display` adds the whole `Status` again).
fn said(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

fn object(name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "nixpool.dev/v1alpha1",
        "kind": "NixBuilderPool",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

/// `spec.cache.substituters[0].url` → `spec.cache.substituters[].url`: the operator's CEL
/// messages name a rule's field without the index.
fn without_indices(path: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '[' => {
                inside = true;
                out.push(c);
            }
            ']' => {
                inside = false;
                out.push(c);
            }
            _ if inside => {}
            _ => out.push(c),
        }
    }
    out
}

fn examples() -> Vec<(String, Value)> {
    let mut found = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(format!("{REPO}/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] == "NixBuilderPool" {
                found.push((file.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    found
}

/// `kubectl get nbp` (a Table from the server) shows the Ready condition's reason in REASON: the
/// column's JSONPath filter as Kubernetes 1.36 evaluates it.
async fn reason_column_shows_the_ready_reason(client: &kube::Client, pools: &Api<DynamicObject>, name: &str) {
    use nixpool_api::conditions::{DEGRADED, READY, REASON_AS_EXPECTED, REASON_NO_READY_BUILDERS};
    let condition = |type_: &str, status: &str, reason: &str| json!({"type": type_, "status": status, "reason": reason, "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"});
    let status = json!({"status": {"conditions": [
        condition(DEGRADED, "False", REASON_AS_EXPECTED),
        condition(READY, "False", REASON_NO_READY_BUILDERS),
    ]}});
    pools
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let request = http::Request::get(format!(
        "/apis/nixpool.dev/v1alpha1/namespaces/default/nixbuilderpools/{name}"
    ))
    .header(http::header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: Value = serde_json::from_str(&client.request_text(request).await.unwrap()).unwrap();
    let column = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["name"] == "Reason")
        .unwrap_or_else(|| panic!("no Reason column: {table}"));
    assert_eq!(table["rows"][0]["cells"][column], REASON_NO_READY_BUILDERS, "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_crd_installs_on_kubernetes_1_36_and_refuses_what_the_operator_refuses() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let engine = CrdEngine::start(cp).await.expect("start the 1.36 CRD engine");
    let client = engine.client().await.unwrap();

    // Install the checked-in CRD, exactly what users install.
    let crd: CustomResourceDefinition = serde_norway::from_str(
        &std::fs::read_to_string(format!("{REPO}/crds/nixbuilderpools.nixpool.dev.yaml")).unwrap(),
    )
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    if let Err(e) = crds.create(&PostParams::default(), &crd).await {
        panic!("Kubernetes 1.36 refuses the CRD:\n{}", said(&e).replace(", ", ",\n"));
    }
    let name = NixBuilderPool::crd_name();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = crds.get(name).await.unwrap();
        let established = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            break;
        }
        assert!(Instant::now() < deadline, "the CRD was not Established after 60s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let ar = ApiResource::erase::<NixBuilderPool>(&());
    let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let create = |v: Value| {
        let pools = pools.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(v).unwrap();
            // Right after Established the resource's handler may still be starting: retry a 404.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match pools.create(&PostParams::default(), &obj).await {
                    Err(kube::Error::Api(s)) if s.code == 404 && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    other => return other,
                }
            }
        }
    };

    let examples = examples();
    assert!(!examples.is_empty(), "no NixBuilderPool under examples/");
    let first_example = examples[0].1["metadata"]["name"].as_str().unwrap().to_string();
    for (file, mut example) in examples {
        example["metadata"]["namespace"] = json!("default");
        let pool: NixBuilderPool = serde_json::from_value(example.clone()).unwrap();
        if let Err(e) = validate(&pool, &Images::from("img")) {
            panic!("the operator refuses examples/{file}: {e}");
        }
        if let Err(e) = create(example).await {
            panic!("Kubernetes 1.36 refuses examples/{file}: {}", said(&e));
        }
    }

    reason_column_shows_the_ready_reason(&client, &pools, &first_example).await;

    let corpus = corpus();
    let mut failures = Vec::new();
    for (i, case) in corpus.iter().enumerate() {
        let name = case.name.clone().unwrap_or_else(|| format!("invalid-{i}"));
        let obj = object(&name, &case.spec);

        let pool: NixBuilderPool = serde_json::from_value(obj.clone()).unwrap();
        let expected = without_indices(case.field);
        match validate(&pool, &Images::from("img")) {
            Ok(_) => failures.push(format!("{}: the operator accepts it", case.what)),
            Err(e) if !e.0.iter().any(|m| without_indices(m).starts_with(&expected)) => failures.push(format!(
                "{}: the operator's refusal does not name {}: {e}",
                case.what, case.field
            )),
            Err(_) => {}
        }

        match create(obj).await {
            Ok(_) => failures.push(format!("{} ({}): Kubernetes 1.36 accepts it", case.what, case.field)),
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(case.field) => {}
            Err(e) => failures.push(format!(
                "{}: Kubernetes 1.36 should refuse it with 422 naming {}, got: {}",
                case.what,
                case.field,
                said(&e)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid specs were not refused as expected:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    eprintln!(
        "crd_k8s136: {} invalid specs refused by both, in {:?}",
        corpus.len(),
        started.elapsed()
    );
}
