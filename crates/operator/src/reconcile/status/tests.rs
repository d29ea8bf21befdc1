//! Pure tests of status computation with a fixed clock.

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};
use nixpool_api::{MachinesEntry, NixBuilderPool};

use super::*;
use crate::authorized_keys::{BadKey, Origin};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0";

fn pool(spec: serde_json::Value) -> NixBuilderPool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "b", "namespace": "ci", "generation": 3},
        "spec": spec
    }))
    .unwrap()
}

fn deployment(replicas: i32, ready: i32, updated: i32) -> Deployment {
    Deployment {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            generation: Some(7),
            ..Default::default()
        },
        status: Some(DeploymentStatus {
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            observed_generation: Some(7),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn compute_with(
    p: &NixBuilderPool,
    d: &Deployment,
    svc: &Service,
    bad: &[BadKey],
    now: Timestamp,
) -> NixBuilderPoolStatus {
    compute(
        p,
        &Observed {
            deployment: d,
            gateway: None,
            desired_builders: p.spec.replicas,
            service: svc,
            host_public_key: Some(KEY),
            bad_keys: bad,
            missing_secrets: &[],
            refused_secrets: &[],
        },
        now,
    )
}

fn cond<'a>(s: &'a NixBuilderPoolStatus, type_: &str) -> &'a Condition {
    s.condition(type_).unwrap()
}

#[test]
fn ready_pool_reports_endpoint_key_and_a_machines_line() {
    let p = pool(serde_json::json!({"replicas": 3, "maxJobs": 8, "speedFactor": 2, "supportedFeatures": ["kvm"]}));
    let s = compute_with(
        &p,
        &deployment(3, 2, 3),
        &Service::default(),
        &[],
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!((s.replicas, s.ready_replicas, s.ready.as_deref()), (3, 2, Some("2/3")));
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(cond(&s, "Ready").message, "2 of 3 builders ready at b.ci.svc:22");
    assert_eq!(cond(&s, "Progressing").status, "True", "one builder is not ready yet");
    assert_eq!(cond(&s, "Degraded").status, "False");
    let e = MachinesEntry::parse(s.machines_entry.as_deref().unwrap()).unwrap();
    assert_eq!(e.uri, "ssh-ng://builder@b.ci.svc");
    assert_eq!(e.max_jobs, 16, "ready builders x jobs per builder");
    assert_eq!(e.speed_factor, 2);
    assert_eq!(e.supported_features, vec!["kvm"]);
    assert_eq!(e.ssh_key, None, "the client fills in its own key");
    assert_eq!(e.host_public_key.as_deref(), Some(KEY));
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=b,app.kubernetes.io/name=nixpool-builder")
    );
}

#[test]
fn last_transition_time_moves_only_when_the_status_flips() {
    let mut p = pool(serde_json::json!({"replicas": 1}));
    let t0 = t("2026-01-01T00:00:00Z");
    let s0 = compute_with(&p, &deployment(1, 0, 1), &Service::default(), &[], t0);
    assert_eq!(cond(&s0, "Ready").status, "False");
    p.status = Some(s0);
    // Same status later: the time stays.
    let s1 = compute_with(
        &p,
        &deployment(1, 0, 1),
        &Service::default(),
        &[],
        t("2026-01-01T00:05:00Z"),
    );
    assert_eq!(cond(&s1, "Ready").last_transition_time.0, t0);
    p.status = Some(s1);
    // It flips: the time moves.
    let t2 = t("2026-01-01T00:09:00Z");
    let s2 = compute_with(&p, &deployment(1, 1, 1), &Service::default(), &[], t2);
    assert_eq!(cond(&s2, "Ready").status, "True");
    assert_eq!(cond(&s2, "Ready").last_transition_time.0, t2);
    assert_eq!(cond(&s2, "Progressing").status, "False");
    assert_eq!(cond(&s2, "Progressing").reason, "UpToDate");
    assert_eq!(
        cond(&s2, "Degraded").last_transition_time.0,
        t0,
        "Degraded never flipped"
    );
    assert_eq!(cond(&s2, "Ready").observed_generation, Some(3));
}

#[test]
fn load_balancer_endpoint_comes_from_ingress_or_the_advertised_host() {
    let p = pool(serde_json::json!({"service": {"type": "LoadBalancer", "port": 2222}}));
    let pending = compute_with(
        &p,
        &deployment(1, 1, 1),
        &Service::default(),
        &[],
        t("2026-01-01T00:00:00Z"),
    );
    assert!(pending.endpoint.is_none() && pending.machines_entry.is_none());
    assert_eq!(cond(&pending, "Ready").reason, "EndpointPending");
    let svc = Service {
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    hostname: Some("lb.example.com".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = compute_with(&p, &deployment(1, 1, 1), &svc, &[], t("2026-01-01T00:00:00Z"));
    let e = s.endpoint.unwrap();
    assert_eq!((e.host.as_str(), e.port), ("lb.example.com", 2222));
    assert!(
        s.machines_entry
            .unwrap()
            .starts_with("ssh-ng://builder@lb.example.com:2222 ")
    );

    let p = pool(serde_json::json!({"service": {"type": "LoadBalancer", "externalHost": "builders.example.com"}}));
    let s = compute_with(&p, &deployment(1, 1, 1), &svc, &[], t("2026-01-01T00:00:00Z"));
    assert_eq!(s.endpoint.unwrap().host, "builders.example.com");
}

#[test]
fn bad_keys_and_missing_secrets_degrade_and_name_the_source() {
    let p = pool(serde_json::json!({}));
    let bad = vec![BadKey {
        origin: Origin("Secret team key keys line 2".into()),
        reason: "not a key".into(),
    }];
    let s = compute_with(
        &p,
        &deployment(1, 1, 1),
        &Service::default(),
        &bad,
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(cond(&s, "Degraded").status, "True");
    assert_eq!(
        cond(&s, "Degraded").message,
        "1 authorized key line(s) skipped: Secret team key keys line 2: not a key"
    );
    assert_eq!(cond(&s, "Ready").status, "True", "the other keys still work");

    let missing = vec!["my-host-key".to_string()];
    let s = compute(
        &p,
        &Observed {
            deployment: &deployment(1, 0, 1),
            gateway: None,
            desired_builders: p.spec.replicas,
            service: &Service::default(),
            host_public_key: None,
            bad_keys: &[],
            missing_secrets: &missing,
            refused_secrets: &[],
        },
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(cond(&s, "Ready").reason, "MissingSecret");
    assert!(cond(&s, "Ready").message.contains("my-host-key"));
    assert!(s.machines_entry.is_none());
}

#[test]
fn a_secret_not_opted_in_is_named_with_the_label_command() {
    let p = pool(serde_json::json!({}));
    let refused = vec!["secret/other-team-keys".to_string()];
    let s = compute(
        &p,
        &Observed {
            deployment: &deployment(1, 1, 1),
            gateway: None,
            desired_builders: p.spec.replicas,
            service: &Service::default(),
            host_public_key: Some("ssh-ed25519 AAAA"),
            bad_keys: &[],
            missing_secrets: &[],
            refused_secrets: &refused,
        },
        t("2026-01-01T00:00:00Z"),
    );
    let d = cond(&s, "Degraded");
    assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "NotOptedIn"));
    assert!(
        d.message.contains("kubectl label -n") && d.message.contains("secret/other-team-keys nixpool.dev/use=true"),
        "{}",
        d.message
    );
}

#[test]
fn invalid_spec_keeps_what_was_known_and_says_how_to_fix() {
    let mut p = pool(serde_json::json!({}));
    let good = compute_with(
        &p,
        &deployment(1, 1, 1),
        &Service::default(),
        &[],
        t("2026-01-01T00:00:00Z"),
    );
    p.status = Some(good.clone());
    let s = invalid(
        &p,
        "spec.gc: minFree must be smaller than maxFree",
        t("2026-01-02T00:00:00Z"),
    );
    assert_eq!(cond(&s, "Ready").reason, "InvalidSpec");
    assert_eq!(cond(&s, "Ready").status, "False");
    assert!(
        cond(&s, "Ready")
            .message
            .starts_with("spec.gc: minFree must be smaller than maxFree. Fix the spec")
    );
    assert_eq!(s.host_public_key, good.host_public_key);
    assert_eq!(s.endpoint, good.endpoint);
}

#[test]
fn scaled_to_zero_is_not_ready_and_says_why() {
    let p = pool(serde_json::json!({"replicas": 0}));
    let s = compute_with(
        &p,
        &deployment(0, 0, 0),
        &Service::default(),
        &[],
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(cond(&s, "Ready").reason, "ScaledToZero");
    assert_eq!(cond(&s, "Progressing").status, "False");
}

/// `(status, reason)` of a condition.
fn said<'a>(s: &'a NixBuilderPoolStatus, type_: &str) -> (&'a str, &'a str) {
    let c = cond(s, type_);
    (c.status.as_str(), c.reason.as_str())
}

/// A Deployment whose ReplicaSet the API server refused pods, as the Deployment controller
/// reports it.
fn refused(ready: i32, message: &str) -> Deployment {
    let mut d = deployment(1, ready, 1);
    d.metadata.name = Some("b".into());
    d.status.as_mut().unwrap().conditions = Some(vec![k8s_openapi::api::apps::v1::DeploymentCondition {
        type_: "ReplicaFailure".into(),
        status: "True".into(),
        reason: Some("FailedCreate".into()),
        message: Some(message.into()),
        ..Default::default()
    }]);
    d
}

const QUOTA: &str = r#"pods "b-5f7d8c9b6d-x2k4q" is forbidden: exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0"#;

#[test]
fn every_status_carries_all_five_conditions() {
    let p = pool(serde_json::json!({"replicas": 1}));
    let now = t("2026-01-01T00:00:00Z");
    let statuses = [
        compute_with(&p, &deployment(1, 0, 1), &Service::default(), &[], now),
        compute_with(&p, &refused(0, QUOTA), &Service::default(), &[], now),
        invalid(&p, "spec.x: bad", now),
        failed(&p, "ApplyFailed", "applying Service b: no", true, now),
        failed(&p, "ApplyFailed", "applying Service b: timed out", false, now),
    ];
    for s in &statuses {
        let mut types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        types.sort();
        assert_eq!(
            types,
            ["Degraded", "Progressing", "Ready", "Reconciling", "Stalled"],
            "{s:?}"
        );
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3)), "{s:?}");
    }
}

#[test]
fn a_healthy_pool_reconciles_then_settles_and_never_stalls() {
    let mut p = pool(serde_json::json!({"replicas": 2}));
    let t0 = t("2026-01-01T00:00:00Z");
    let starting = compute_with(&p, &deployment(2, 0, 2), &Service::default(), &[], t0);
    assert_eq!(said(&starting, "Ready"), ("False", "NoReadyBuilders"));
    assert_eq!(said(&starting, "Reconciling"), ("True", "NoReadyBuilders"));
    assert_eq!(said(&starting, "Stalled"), ("False", "AsExpected"));
    p.status = Some(starting);
    let half = compute_with(&p, &deployment(2, 1, 2), &Service::default(), &[], t0);
    assert_eq!(said(&half, "Ready"), ("True", "BuildersReady"));
    assert_eq!(
        said(&half, "Reconciling"),
        ("True", "RollingOut"),
        "one builder still starting"
    );
    p.status = Some(half);
    let t1 = t("2026-01-01T00:01:00Z");
    let done = compute_with(&p, &deployment(2, 2, 2), &Service::default(), &[], t1);
    assert_eq!(said(&done, "Ready"), ("True", "BuildersReady"));
    assert_eq!(said(&done, "Reconciling"), ("False", "UpToDate"));
    assert_eq!(cond(&done, "Reconciling").last_transition_time.0, t1, "it flipped");
    assert_eq!(said(&done, "Stalled"), ("False", "AsExpected"));
    assert_eq!(cond(&done, "Stalled").last_transition_time.0, t0, "it never flipped");

    let zero = compute_with(
        &pool(serde_json::json!({"replicas": 0})),
        &deployment(0, 0, 0),
        &Service::default(),
        &[],
        t0,
    );
    assert_eq!(said(&zero, "Reconciling").0, "False", "scaled to zero on purpose");
    assert_eq!(said(&zero, "Stalled").0, "False");
}

#[test]
fn pods_the_api_server_refuses_stall_the_pool_with_its_message_and_the_fix() {
    let p = pool(serde_json::json!({"replicas": 1}));
    let s = compute_with(
        &p,
        &refused(0, QUOTA),
        &Service::default(),
        &[],
        t("2026-01-01T00:00:00Z"),
    );
    for type_ in ["Ready", "Degraded", "Stalled"] {
        let c = cond(&s, type_);
        assert_eq!(c.reason, "PodsRefused", "{type_}");
        assert!(c.message.contains(QUOTA), "{type_}: {}", c.message);
        assert!(
            c.message.contains("kubectl describe resourcequota -n ci"),
            "{type_}: {}",
            c.message
        );
        assert!(!c.message.contains("describe pod"), "no pod to describe: {}", c.message);
    }
    assert_eq!(said(&s, "Ready").0, "False");
    assert_eq!(said(&s, "Degraded").0, "True");
    assert_eq!(said(&s, "Stalled").0, "True");
    assert_eq!(said(&s, "Reconciling").0, "False");

    // Some builders run, more are refused: still Ready, but Degraded and Stalled say why the
    // rest never come.
    let s = compute_with(
        &p,
        &refused(1, QUOTA),
        &Service::default(),
        &[],
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(said(&s, "Ready"), ("True", "BuildersReady"));
    assert_eq!(said(&s, "Degraded"), ("True", "PodsRefused"));
    assert_eq!(said(&s, "Stalled"), ("True", "PodsRefused"));
}

#[test]
fn a_refusal_outranks_the_rollout_deadline_it_causes() {
    let p = pool(serde_json::json!({"replicas": 1}));
    let mut d = refused(0, QUOTA);
    d.status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()
        .push(k8s_openapi::api::apps::v1::DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some(r#"ReplicaSet "b-5f7d8c9b6d" has timed out progressing."#.into()),
            ..Default::default()
        });
    let s = compute_with(&p, &d, &Service::default(), &[], t("2026-01-01T00:00:00Z"));
    assert_eq!(said(&s, "Degraded"), ("True", "PodsRefused"));
    assert_eq!(said(&s, "Stalled"), ("True", "PodsRefused"));

    d.status.as_mut().unwrap().conditions.as_mut().unwrap().remove(0);
    let s = compute_with(&p, &d, &Service::default(), &[], t("2026-01-01T00:00:00Z"));
    assert_eq!(said(&s, "Degraded"), ("True", "RolloutStuck"));
    assert_eq!(said(&s, "Stalled"), ("True", "RolloutStuck"));
    assert!(
        cond(&s, "Stalled")
            .message
            .contains("has timed out progressing.; see `kubectl describe pod -l app.kubernetes.io/instance=b"),
        "{}",
        cond(&s, "Stalled").message
    );
}

#[test]
fn a_pod_security_refusal_names_the_namespace_label_to_set() {
    let message = pods_refused(
        &refused(
            0,
            r#"pods "b-5f7d8c9b6d-x2k4q" is forbidden: violates PodSecurity "baseline:latest": privileged (container "agent" must not set securityContext.privileged=true)"#,
        ),
        "ci",
    )
    .unwrap();
    assert!(
        message.starts_with(r#"the API server refuses to create the pods of Deployment b: pods "b-5f7d8c9b6d-x2k4q" is forbidden: violates PodSecurity"#),
        "{message}"
    );
    assert!(
        message.ends_with("kubectl label namespace ci pod-security.kubernetes.io/enforce=privileged"),
        "{message}"
    );
    let limit = pods_refused(
        &refused(
            0,
            r#"pods "b-x" is forbidden: maximum memory usage per Container is 1Gi, but limit is 4Gi"#,
        ),
        "ci",
    )
    .unwrap();
    assert!(limit.contains("kubectl describe limitrange -n ci"), "{limit}");
    let other = pods_refused(
        &refused(0, r#"pods "b-x" is forbidden: error looking up service account ci/x"#),
        "ci",
    )
    .unwrap();
    assert!(
        other.ends_with("kubectl get events -n ci --field-selector reason=FailedCreate"),
        "{other}"
    );
    assert_eq!(
        pods_refused(&deployment(1, 0, 1), "ci"),
        None,
        "no ReplicaFailure, no refusal"
    );
}

#[test]
fn a_failed_reconcile_is_not_ready_and_stalls_only_when_a_person_must_act() {
    let mut p = pool(serde_json::json!({}));
    let t0 = t("2026-01-01T00:00:00Z");
    p.status = Some(compute_with(&p, &deployment(1, 1, 1), &Service::default(), &[], t0));
    let t1 = t("2026-01-01T00:01:00Z");
    let refused = failed(&p, "ApplyFailed", "applying Service b: forbidden", true, t1);
    assert_eq!(said(&refused, "Ready"), ("False", "ApplyFailed"));
    assert_eq!(cond(&refused, "Ready").message, "applying Service b: forbidden");
    assert_eq!(cond(&refused, "Ready").last_transition_time.0, t1);
    assert_eq!(said(&refused, "Degraded"), ("True", "ApplyFailed"));
    assert_eq!(said(&refused, "Stalled"), ("True", "ApplyFailed"));
    assert_eq!(said(&refused, "Reconciling").0, "False");
    assert_eq!(said(&refused, "Progressing"), ("False", "UpToDate"), "kept as it was");
    assert!(refused.host_public_key.is_some(), "the rest kept");

    let transient = failed(&p, "ApplyFailed", "applying Service b: timed out", false, t1);
    assert_eq!(said(&transient, "Ready"), ("False", "ApplyFailed"));
    assert_eq!(said(&transient, "Reconciling"), ("True", "ApplyFailed"));
    assert_eq!(
        cond(&transient, "Reconciling").message,
        "retrying: applying Service b: timed out"
    );
    assert_eq!(said(&transient, "Stalled").0, "False");
}

#[test]
fn an_invalid_spec_stalls() {
    let p = pool(serde_json::json!({}));
    let s = invalid(&p, "spec.x: bad", t("2026-01-01T00:00:00Z"));
    assert_eq!(said(&s, "Stalled"), ("True", "InvalidSpec"));
    assert!(cond(&s, "Stalled").message.starts_with("spec.x: bad. Fix the spec"));
    assert_eq!(said(&s, "Reconciling"), ("False", "InvalidSpec"));
    assert_eq!(said(&s, "Degraded"), ("True", "InvalidSpec"));
}

#[test]
fn a_pool_that_does_not_decode_stalls_and_keeps_the_rest_of_its_status() {
    let now = t("2026-01-01T00:00:00Z");
    let body = undecodable("spec.replicas: invalid type: string \"two\"", Some(4), now);
    assert_eq!(body["apiVersion"], "nixpool.dev/v1alpha1");
    assert_eq!(body["kind"], "NixBuilderPool");
    let status = body["status"].as_object().unwrap();
    assert_eq!(
        status.keys().collect::<Vec<_>>(),
        ["conditions", "observedGeneration"],
        "nothing else, so the apply leaves the pool's other fields alone"
    );
    assert_eq!(status["observedGeneration"], 4);
    let s: NixBuilderPoolStatus = serde_json::from_value(body["status"].clone()).unwrap();
    let message =
        "the pool does not match the NixBuilderPool schema: spec.replicas: invalid type: string \"two\"; fix the spec";
    assert_eq!(said(&s, "Ready"), ("False", "InvalidSpec"));
    assert_eq!(cond(&s, "Ready").message, message);
    assert_eq!(said(&s, "Stalled"), ("True", "InvalidSpec"));
    assert_eq!(cond(&s, "Stalled").message, message);
    assert_eq!(said(&s, "Reconciling"), ("False", "InvalidSpec"));
    assert_eq!(cond(&s, "Reconciling").message, "waiting for a spec that decodes");
    for c in &s.conditions {
        assert_eq!(c.last_transition_time.0, now, "{}: the injected clock", c.type_);
        assert_eq!(c.observed_generation, Some(4), "{}", c.type_);
    }
    assert_eq!(s.conditions.len(), 3);
}
