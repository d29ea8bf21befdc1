//! Pure tests of which Events are news.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nixpool_api::conditions::{REASON_AS_EXPECTED, REASON_BUILDERS_READY};

use super::*;
use crate::reconcile::autoscale::Decision;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0";
const GATEWAY_NOTE: &str = "generated the gateway's ed25519 key; builders trust it, clients cannot log in with it";

fn pool(status: Option<NixBuilderPoolStatus>) -> NixBuilderPool {
    let mut p: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "b", "namespace": "ci", "generation": 3},
        "spec": {"autoscaling": {"minReplicas": 0, "maxReplicas": 4, "idleSeconds": 60}}
    }))
    .unwrap();
    p.status = status;
    p
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(3),
        last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
    }
}

/// A status with these Ready and Degraded conditions.
fn status(ready: Condition, degraded: Condition) -> NixBuilderPoolStatus {
    NixBuilderPoolStatus {
        conditions: vec![ready, degraded],
        ..NixBuilderPoolStatus::default()
    }
}

fn healthy() -> NixBuilderPoolStatus {
    status(
        condition(READY, "True", REASON_BUILDERS_READY, "1 of 1 builders ready"),
        condition(DEGRADED, "False", REASON_AS_EXPECTED, "no problems found"),
    )
}

fn bad_keys(message: &str) -> NixBuilderPoolStatus {
    status(
        condition(READY, "True", REASON_BUILDERS_READY, "1 of 1 builders ready"),
        condition(DEGRADED, "True", REASON_BAD_AUTHORIZED_KEYS, message),
    )
}

fn unchanged_scale() -> Scaling {
    Scaling {
        asked_before: 1,
        decision: None,
        builders: 1,
    }
}

fn decision(replicas: i32, idle: &[&str]) -> Decision {
    Decision {
        replicas,
        sessions: 5,
        waiting: 2,
        idle: idle.iter().map(|s| s.to_string()).collect(),
        busy: Vec::new(),
        recheck: None,
    }
}

/// The news of a reconcile of `pool` that computed `status` and did what the rest says.
fn news(
    pool: &NixBuilderPool,
    status: &NixBuilderPoolStatus,
    host_key: HostKeyState,
    gateway_key_generated: bool,
    changed: &[&str],
    scaling: &Scaling,
) -> Vec<News> {
    let changed: Vec<String> = changed.iter().map(|s| s.to_string()).collect();
    reconciled(&Reconciled {
        pool,
        status,
        host_key: &host_key,
        gateway_key_generated,
        changed: &changed,
        scaling,
    })
}

fn reasons(news: &[News]) -> Vec<&str> {
    news.iter().map(|n| n.reason).collect()
}

#[test]
fn a_new_pool_gets_one_created_event_with_all_its_news() {
    let p = pool(None);
    let got = news(
        &p,
        &healthy(),
        HostKeyState::Generated(KEY.into()),
        true,
        &["ConfigMap/b-authorized-keys", "Deployment/b"],
        &unchanged_scale(),
    );
    assert_eq!(
        got,
        [News {
            type_: EventType::Normal,
            reason: "Created",
            action: "Create",
            note: format!(
                "generated the pool's ed25519 host key {KEY} (Secret b-host-key); {GATEWAY_NOTE}; applied ConfigMap/b-authorized-keys, Deployment/b"
            ),
        }]
    );
}

#[test]
fn a_new_pool_with_the_users_host_key_reports_only_what_it_applied() {
    let p = pool(None);
    let got = news(
        &p,
        &healthy(),
        HostKeyState::Existing(KEY.into()),
        false,
        &["Deployment/b"],
        &unchanged_scale(),
    );
    assert_eq!(reasons(&got), ["Applied"]);
    assert_eq!(got[0].note, "applied Deployment/b");
    assert_eq!(got[0].action, "Apply");
}

#[test]
fn later_changes_are_one_event_each() {
    let p = pool(Some(healthy()));
    let got = news(
        &p,
        &healthy(),
        HostKeyState::Generated(KEY.into()),
        true,
        &["Service/b"],
        &unchanged_scale(),
    );
    assert_eq!(reasons(&got), ["HostKeyGenerated", "GatewayKeyGenerated", "Applied"]);
    assert!(got.iter().all(|n| n.type_ == EventType::Normal));
    assert_eq!(
        got[0].note,
        format!("generated the pool's ed25519 host key {KEY} (Secret b-host-key)")
    );
    assert_eq!(got[1].note, GATEWAY_NOTE);
    assert_eq!(got[2].note, "applied Service/b");
}

#[test]
fn nothing_new_is_no_event() {
    let p = pool(Some(healthy()));
    let got = news(
        &p,
        &healthy(),
        HostKeyState::Existing(KEY.into()),
        false,
        &[],
        &unchanged_scale(),
    );
    assert_eq!(got, []);
    let missing = news(&p, &healthy(), HostKeyState::Missing, false, &[], &unchanged_scale());
    assert_eq!(missing, [], "a missing host key is in the status, not news");
}

#[test]
fn scaling_up_says_which_sessions_need_the_builders() {
    let p = pool(Some(healthy()));
    let scaling = Scaling {
        asked_before: 1,
        decision: Some(decision(3, &[])),
        builders: 3,
    };
    let got = news(&p, &healthy(), HostKeyState::Existing(KEY.into()), false, &[], &scaling);
    assert_eq!(reasons(&got), ["ScaledUp"]);
    assert_eq!(got[0].note, "builders 1 → 3: 5 sessions (2 waiting) need them");
    assert_eq!(got[0].action, "Scale");
}

#[test]
fn scaling_down_names_the_idle_builders() {
    let p = pool(Some(healthy()));
    let scaling = |idle: &[&str]| Scaling {
        asked_before: 3,
        decision: Some(decision(3 - idle.len() as i32, idle)),
        builders: 3 - idle.len() as i32,
    };
    let one = news(
        &p,
        &healthy(),
        HostKeyState::Existing(KEY.into()),
        false,
        &[],
        &scaling(&["b-x"]),
    );
    assert_eq!(reasons(&one), ["ScaledDown"]);
    assert_eq!(one[0].note, "builders 3 → 2: 1 builder was idle for 60 s: b-x");
    let two = news(
        &p,
        &healthy(),
        HostKeyState::Existing(KEY.into()),
        false,
        &[],
        &scaling(&["b-x", "b-y"]),
    );
    assert_eq!(two[0].note, "builders 3 → 1: builders were idle for 60 s: b-x, b-y");
}

#[test]
fn a_decision_that_keeps_the_count_is_no_event() {
    let p = pool(Some(healthy()));
    let scaling = Scaling {
        asked_before: 2,
        decision: Some(decision(2, &[])),
        builders: 2,
    };
    let got = news(&p, &healthy(), HostKeyState::Existing(KEY.into()), false, &[], &scaling);
    assert_eq!(got, []);
}

#[test]
fn bad_key_lines_are_news_once_per_wording() {
    let first = bad_keys("1 authorized key line(s) skipped: spec.ssh.authorizedKeys[0]: not a key");
    let p = pool(Some(healthy()));
    let got = news(
        &p,
        &first,
        HostKeyState::Existing(KEY.into()),
        false,
        &[],
        &unchanged_scale(),
    );
    assert_eq!(reasons(&got), ["BadAuthorizedKeys"]);
    assert_eq!(got[0].type_, EventType::Warning);
    assert_eq!(got[0].note, first.condition(DEGRADED).unwrap().message);

    let reported = pool(Some(first.clone()));
    assert_eq!(bad_authorized_keys(&reported, &first), None, "already reported");
    let second = bad_keys("2 authorized key line(s) skipped: ...");
    assert!(bad_authorized_keys(&reported, &second).is_some(), "other lines");
    assert_eq!(bad_authorized_keys(&reported, &healthy()), None, "fixed");
}

#[test]
fn news_come_in_order_keys_changes_scaling_then_problems() {
    let p = pool(Some(healthy()));
    let scaling = Scaling {
        asked_before: 1,
        decision: Some(decision(2, &[])),
        builders: 2,
    };
    let got = news(
        &p,
        &bad_keys("1 authorized key line(s) skipped: x"),
        HostKeyState::Generated(KEY.into()),
        false,
        &["Deployment/b"],
        &scaling,
    );
    assert_eq!(
        reasons(&got),
        ["HostKeyGenerated", "Applied", "ScaledUp", "BadAuthorizedKeys"]
    );
}

#[test]
fn a_refused_spec_is_news_when_first_refused_and_when_the_refusal_changes() {
    let invalid = |message: &str| {
        status(
            condition(READY, "False", REASON_INVALID_SPEC, message),
            condition(DEGRADED, "True", REASON_INVALID_SPEC, message),
        )
    };
    let p = pool(Some(healthy()));
    let got = invalid_spec(&p, &invalid("spec.x: bad. Fix the spec"), "spec.x: bad");
    assert_eq!(
        got,
        Some(News {
            type_: EventType::Warning,
            reason: REASON_INVALID_SPEC,
            action: "Validate",
            note: "spec.x: bad".into(),
        })
    );
    assert!(invalid_spec(&pool(None), &invalid("m"), "m").is_some(), "a new pool");

    let refused = pool(Some(invalid("spec.x: bad. Fix the spec")));
    assert_eq!(
        invalid_spec(&refused, &invalid("spec.x: bad. Fix the spec"), "spec.x: bad"),
        None,
        "the same refusal"
    );
    assert!(
        invalid_spec(&refused, &invalid("spec.y: bad. Fix the spec"), "spec.y: bad").is_some(),
        "another problem"
    );
}

#[test]
fn revoked_keys_say_how_many_and_where() {
    let n = keys_revoked(2, "b-authorized-keys");
    assert_eq!(
        (n.type_, n.reason, n.action),
        (EventType::Normal, "KeysRevoked", "Apply")
    );
    assert_eq!(
        n.note,
        "the spec is invalid, so only revocations are applied: removed 2 key(s) their sources no longer give from ConfigMap b-authorized-keys"
    );
}

#[test]
fn a_failure_is_news_only_when_it_changes_the_status() {
    let error = Error::HostKey("Secret k has no key \"ssh_host_ed25519_key\"".into());
    let failed = status(
        condition(READY, "False", "BadHostKey", &error.to_string()),
        condition(DEGRADED, "True", "BadHostKey", &error.to_string()),
    );
    let got = failure(&pool(Some(healthy())), &failed, &error).unwrap();
    assert_eq!(
        (got.type_, got.reason, got.action),
        (EventType::Warning, "BadHostKey", "Reconcile")
    );
    assert_eq!(got.note, error.to_string());
    assert_eq!(failure(&pool(Some(failed.clone())), &failed, &error), None);
}

#[test]
fn long_notes_are_cut_at_a_character_boundary() {
    let note = "é".repeat(600); // 1,200 bytes
    let n = News::normal("Applied", "Apply", note);
    assert!(n.note.ends_with('…'));
    assert_eq!(n.note.len(), MAX_NOTE + '…'.len_utf8());
    let short = News::normal("Applied", "Apply", "applied Service/b".into());
    assert_eq!(short.note, "applied Service/b");
}
