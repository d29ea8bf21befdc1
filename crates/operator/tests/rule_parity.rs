//! One rule set: every spec rule lives in `nixpool_api` and reaches the CRD's CEL, the operator
//! and the agent. This test feeds one corpus to the operator's validation, which runs the CRD's
//! own CEL and the Rust checks (the CRD test against Kubernetes 1.36's engine shows the API
//! server refuses what it refuses), and to the agent's check of the config the operator writes
//! (`AgentConfig::problems`, which the agent refuses to start on). Whatever the operator
//! accepts, the agent accepts: no spec the API server takes can crash-loop a builder.

use nixpool_api::{AgentConfig, NixBuilderPool, paths, rules};
use nixpool_operator::authorized_keys::{AuthorizedKeys, Origin};
use nixpool_operator::reconcile::build::{BuildInputs, build};
use nixpool_operator::reconcile::validate::{Images, validate};
use proptest::prelude::*;
use serde_json::{Value, json};

fn pool(spec: Value) -> NixBuilderPool {
    let mut p: NixBuilderPool = serde_json::from_value(json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "p", "namespace": "ns", "uid": "00000000-0000-4000-8000-000000000000"},
        "spec": {}
    }))
    .unwrap();
    let mut s = serde_json::to_value(&p.spec).unwrap();
    merge(&mut s, spec);
    p.spec = serde_json::from_value(s).unwrap();
    p
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// What the operator says of a spec, and, when it accepts, what the agent says of the config it
/// writes (empty: the builder starts).
fn judge(spec: Value) -> Result<Vec<String>, String> {
    let p = pool(spec);
    let valid = validate(&p, &Images::from("img:1")).map_err(|e| e.to_string())?;
    let mut keys = AuthorizedKeys::default();
    for (i, line) in p.spec.ssh.authorized_keys.iter().enumerate() {
        keys.add(line, || Origin(format!("spec.ssh.authorizedKeys[{i}]")));
    }
    let children = build(
        &p,
        &BuildInputs {
            valid: &valid,
            authorized_keys: &keys,
            with_pdb: true,
            builder_replicas: p.spec.replicas,
        },
    );
    let config = AgentConfig::from_json(&children.config_map.data.unwrap()[paths::AGENT_CONFIG_KEY]).unwrap();
    let mut problems: Vec<String> = config
        .problems()
        .into_iter()
        .map(|(f, p)| format!("{f}: {p}"))
        .collect();
    // The agent renders each key line the operator wrote with the same option rule.
    for line in keys.lines {
        if let Err(e) = rules::kept_key_options(&line) {
            problems.push(format!("key {line}: {e}"));
        }
    }
    Ok(problems)
}

fn accepted_everywhere(spec: Value) {
    match judge(spec.clone()) {
        Ok(problems) => assert!(
            problems.is_empty(),
            "{spec}: the operator accepts it, the agent would not start: {problems:?}"
        ),
        Err(e) => panic!("{spec}: the operator refuses it: {e}"),
    }
}

fn refused_by_the_operator(spec: Value, field: &str) {
    match judge(spec.clone()) {
        Ok(problems) => panic!("{spec}: accepted (agent problems: {problems:?})"),
        Err(e) => assert!(e.contains(field), "{spec}: refused without naming {field}: {e}"),
    }
}

#[test]
fn every_refused_nix_setting_is_refused_in_both_forms() {
    for s in rules::REFUSED_NIX_SETTINGS {
        for name in [s.to_string(), format!("extra-{s}")] {
            refused_by_the_operator(json!({"nixConfig": {name: "x"}}), "spec.nixConfig");
        }
    }
}

/// Nix refuses nix.conf with a Boolean or whole-number setting it cannot read: the operator
/// (the CRD's CEL) refuses those values, and what it accepts the agent starts on.
#[test]
fn typed_nix_settings_take_only_what_nix_reads() {
    for s in rules::BOOLEAN_NIX_SETTINGS {
        refused_by_the_operator(json!({"nixConfig": {*s: "maybe"}}), "spec.nixConfig");
        for v in rules::BOOLEAN_NIX_VALUES {
            accepted_everywhere(json!({"nixConfig": {*s: v}}));
        }
    }
    for s in rules::INTEGER_NIX_SETTINGS {
        for bad in ["1h", "", "-1", "1234567890", "1K"] {
            refused_by_the_operator(json!({"nixConfig": {*s: bad}}), "spec.nixConfig");
        }
        for good in ["0", "30", "123456789"] {
            accepted_everywhere(json!({"nixConfig": {*s: good}}));
        }
    }
}

#[test]
fn a_corpus_the_operator_accepts_starts_a_builder() {
    for spec in [
        json!({}),
        json!({"nixConfig": {"keep-outputs": "true", "extra-experimental-features": "nix-command flakes", "connect-timeout": "5"}}),
        json!({"nixConfig": {"extra-sandbox-paths": "/dev/kvm", "narinfo-cache-negative-ttl": "0"}}),
        json!({"ssh": {"user": "ci-builder"}}),
        json!({"ssh": {"user": "_b"}}),
        json!({"ssh": {"authorizedKeys": ["from=\"10.0.0.0/8\",expiry-time=\"20270101\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice"]}}),
        json!({"systems": ["x86_64-linux", "i686-linux"], "supportedFeatures": ["big-parallel", "kvm"], "mandatoryFeatures": ["benchmark"]}),
        json!({"cache": {"nixosCache": false}}),
        json!({"pod": {
            "labels": {"team": "ci", "example.com/cost-center": "", "app.kubernetes.io/version": "1.2"},
            "annotations": {"karpenter.sh/do-not-disrupt": "true", "note": "any text: even\nlines"},
            "priorityClassName": "nix-builders",
            "runtimeClassName": "runc.privileged",
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]
        }}),
    ] {
        accepted_everywhere(spec);
    }
}

#[test]
fn user_names_follow_one_rule() {
    for user in [
        "builder",
        "root",
        "sshd",
        "nobody",
        "nixbld",
        "nixbld1",
        "nixbldx",
        "Builder",
        "1b",
        "a-b",
        "_",
        &"a".repeat(31),
        &"a".repeat(32),
    ] {
        let rust = rules::builder_user_problem(user);
        match judge(json!({"ssh": {"user": user}})) {
            Ok(problems) => {
                assert!(
                    rust.is_none(),
                    "{user}: the CRD accepts it, the Rust rule refuses it: {rust:?}"
                );
                assert!(problems.is_empty(), "{user}: {problems:?}");
            }
            Err(e) => {
                assert!(
                    rust.is_some(),
                    "{user}: the CRD refuses it ({e}), the Rust rule accepts it"
                );
                assert!(e.contains("spec.ssh.user"), "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any nix.conf setting name and value: refused by the operator, or written so the agent
    /// starts. Names are drawn near the refused ones on purpose.
    #[test]
    fn any_nix_setting_is_refused_or_starts_the_builder(
        base in prop_oneof![
            proptest::sample::select(rules::REFUSED_NIX_SETTINGS.to_vec()).prop_map(String::from),
            "[a-z][a-z0-9-]{0,20}",
        ],
        extra in any::<bool>(),
        value in prop_oneof!["[ -~]{0,40}", "[a-z]{0,5}[\\n\\t\\r\\x07][a-z]{0,5}"],
    ) {
        let name = if extra { format!("extra-{base}") } else { base };
        if let Ok(problems) = judge(json!({"nixConfig": {name.clone(): value.clone()}})) {
            prop_assert!(problems.is_empty(), "nixConfig {name:?}={value:?}: the operator accepts it, the agent would not start: {problems:?}");
            prop_assert!(!rules::refused_nix_setting(&name));
        }
    }

    /// Any class name: the CRD's DNS-subdomain rule and the Rust one (which checks the
    /// operator's --default-image-pull-secret) agree.
    #[test]
    fn any_class_name_is_judged_the_same_by_cel_and_rust(name in "[a-zA-Z0-9_.-]{1,12}") {
        let cel = judge(json!({"pod": {"priorityClassName": name.clone()}}));
        prop_assert_eq!(cel.is_ok(), rules::is_dns_subdomain(&name), "{:?}: CEL {:?}", name, cel);
    }

    /// Any user name: the CRD's rule and the Rust rule agree.
    #[test]
    fn any_user_name_is_judged_the_same_by_cel_and_rust(user in "[a-zA-Z0-9_ -]{0,34}") {
        let cel = judge(json!({"ssh": {"user": user.clone()}}));
        let rust = rules::builder_user_problem(&user);
        prop_assert_eq!(cel.is_ok(), rust.is_none(), "{:?}: CEL {:?}, Rust {:?}", user, cel, rust);
    }
}

/// Every spec string that reaches nix.conf, sshd_config, the agent's push config or a machines
/// line: a line break in it is refused, naming the field.
#[test]
fn a_control_character_is_refused_in_every_string_that_reaches_a_config_file() {
    let attic = |f: &str, v: &str| {
        let mut a = json!({"endpoint": "https://attic.example", "cache": "main", "push": false});
        a[f] = json!(v);
        json!({"cache": {"attic": a}})
    };
    let cachix = |f: &str, v: &str| {
        let mut c = json!({"cache": "main", "push": false});
        c[f] = json!(v);
        json!({"cache": {"cachix": c}})
    };
    let store = |f: &str, v: &str| {
        let mut s = json!({"uri": "s3://bucket", "push": false});
        s[f] = json!(v);
        json!({"cache": {"store": s}})
    };
    let bad = "a\nb";
    let key = "cache.example-1:AAAA\nb";
    for (spec, field) in [
        (json!({"systems": [bad]}), "spec.systems"),
        (json!({"supportedFeatures": [bad]}), "spec.supportedFeatures"),
        (json!({"mandatoryFeatures": [bad]}), "spec.mandatoryFeatures"),
        (json!({"ssh": {"user": bad}}), "spec.ssh.user"),
        (json!({"ssh": {"authorizedKeys": [bad]}}), "spec.ssh.authorizedKeys"),
        (json!({"nixConfig": {"keep-outputs": bad}}), "spec.nixConfig"),
        (json!({"service": {"externalHost": bad}}), "spec.service.externalHost"),
        (
            json!({"cache": {"substituters": [{"url": bad}]}}),
            "spec.cache.substituters",
        ),
        (
            json!({"cache": {"substituters": [{"url": "https://c.example", "publicKey": key}]}}),
            "spec.cache.substituters",
        ),
        (attic("endpoint", bad), "spec.cache.attic"),
        (attic("cache", bad), "spec.cache.attic"),
        (attic("publicKey", key), "spec.cache.attic"),
        (cachix("cache", bad), "spec.cache.cachix"),
        (cachix("publicKey", key), "spec.cache.cachix"),
        (store("uri", bad), "spec.cache.store"),
        (store("publicKey", key), "spec.cache.store"),
    ] {
        refused_by_the_operator(spec, field);
    }
}
