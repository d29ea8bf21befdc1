//! Pure status computation (every status body the operator writes is made here), and the
//! status write (skipped when nothing changed, held back while a rollout it just started is
//! unobserved).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use nixpool_api::conditions::*;
use nixpool_api::v1alpha1::{Endpoint, ServiceType};
use nixpool_api::{FIELD_MANAGER, MachinesEntry, NixBuilderPool, NixBuilderPoolStatus, names};
use tracing::debug;

use super::apply::Applied;
use super::build::{gateway_selector_labels, labels_string, selector_string};
use crate::authorized_keys::BadKey;
use crate::context::Context;
use crate::error::{Error, Result};

/// What the reconcile saw, as input to the status.
pub struct Observed<'a> {
    pub deployment: &'a Deployment,
    /// The gateway's Deployment, when the pool has one.
    pub gateway: Option<&'a Deployment>,
    /// Builders asked for: `spec.replicas`, or the autoscaler's decision.
    pub desired_builders: i32,
    pub service: &'a Service,
    /// `None` while the pool's own host-key Secret is missing.
    pub host_public_key: Option<&'a str>,
    pub bad_keys: &'a [BadKey],
    /// Referenced Secrets that do not exist (`spec.ssh.hostKeySecret` / authorized keys).
    pub missing_secrets: &'a [String],
    /// Referenced Secrets without the `nixpool.dev/use: "true"` label, so not used.
    pub refused_secrets: &'a [String],
}

pub fn compute(pool: &NixBuilderPool, seen: &Observed<'_>, now: Timestamp) -> NixBuilderPoolStatus {
    let spec = &pool.spec;
    let generation = pool.metadata.generation;
    let d = seen.deployment.status.clone().unwrap_or_default();
    let desired = seen.desired_builders;
    let ready = d.ready_replicas.unwrap_or(0);
    let gateway_ready = seen
        .gateway
        .map(|g| g.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0));
    let updated = d.updated_replicas.unwrap_or(0);
    let endpoint = endpoint(pool, seen.service);
    let prev = pool.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };

    let secrets = secrets_problem(seen.missing_secrets, seen.refused_secrets, pool);
    let ns = pool.namespace().unwrap_or_default();
    let pods_refused = std::iter::once(seen.deployment)
        .chain(seen.gateway)
        .find_map(|d| pods_refused(d, &ns));
    let ready_cond = if let (Some((reason, message)), None) = (&secrets, seen.host_public_key) {
        cond(READY, false, reason, message.clone())
    } else if let (Some(message), true) = (&pods_refused, ready == 0 || gateway_ready == Some(0)) {
        cond(READY, false, REASON_PODS_REFUSED, message.clone())
    } else if gateway_ready == Some(0) {
        cond(
            READY,
            false,
            REASON_NO_READY_GATEWAY,
            format!(
                "no gateway pod is ready; see `kubectl describe pod -l {}`",
                labels_string(&gateway_selector_labels(pool))
            ),
        )
    } else if let (Some(n), Some(e), true) = (gateway_ready, &endpoint, spec.autoscaling.is_some()) {
        // Builders start on demand: the gateway holds a session while one does.
        cond(
            READY,
            true,
            REASON_GATEWAY_READY,
            format!(
                "{n} gateway pods ready at {}:{}; {ready} of {desired} builders ready, more start on demand",
                e.host, e.port
            ),
        )
    } else if desired == 0 {
        cond(
            READY,
            false,
            REASON_SCALED_TO_ZERO,
            "spec.replicas is 0: scale the pool up to build".into(),
        )
    } else if ready == 0 {
        cond(
            READY,
            false,
            REASON_NO_READY_BUILDERS,
            format!(
                "0 of {desired} builders ready; see `kubectl describe pod -l {}`",
                selector_string(pool)
            ),
        )
    } else if let Some(e) = &endpoint {
        cond(
            READY,
            true,
            REASON_BUILDERS_READY,
            format!("{ready} of {desired} builders ready at {}:{}", e.host, e.port),
        )
    } else {
        cond(READY, false, REASON_ENDPOINT_PENDING, endpoint_pending_message(pool))
    };

    let deployment_generation = seen.deployment.metadata.generation;
    let rolled = d.observed_generation.is_some() && d.observed_generation >= deployment_generation;
    let stuck = d.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let progressing = if rolled && updated >= desired && ready >= desired && d.replicas.unwrap_or(0) <= desired {
        cond(
            PROGRESSING,
            false,
            REASON_UP_TO_DATE,
            format!("all {desired} builders run the current spec"),
        )
    } else {
        cond(
            PROGRESSING,
            true,
            REASON_ROLLING_OUT,
            format!("{updated} of {desired} builders updated, {ready} ready"),
        )
    };

    // Refused pods first: a quota that refuses them also lets the rollout pass its deadline,
    // and the refusal says why.
    let degraded = if let Some(message) = &pods_refused {
        cond(DEGRADED, true, REASON_PODS_REFUSED, message.clone())
    } else if let Some(s) = stuck {
        cond(DEGRADED, true, REASON_ROLLOUT_STUCK, stuck_message(s, pool))
    } else if let Some((reason, message)) = secrets.clone() {
        cond(DEGRADED, true, reason, message)
    } else if !seen.bad_keys.is_empty() {
        cond(
            DEGRADED,
            true,
            REASON_BAD_AUTHORIZED_KEYS,
            bad_keys_message(seen.bad_keys),
        )
    } else {
        cond(DEGRADED, false, REASON_AS_EXPECTED, "no problems found".into())
    };

    let machines_entry = match (&endpoint, seen.host_public_key) {
        (Some(e), Some(key)) => Some(
            MachinesEntry {
                uri: MachinesEntry::ssh_ng_uri(&spec.ssh.user, &e.host, e.port as u16),
                systems: spec.systems.clone(),
                ssh_key: None,
                max_jobs: spec.advertised_jobs(ready),
                speed_factor: spec.speed_factor.max(1) as u32,
                supported_features: spec.supported_features.clone(),
                mandatory_features: spec.mandatory_features.clone(),
                host_public_key: Some(key.to_string()),
            }
            .to_string(),
        ),
        _ => None,
    };

    let mut conditions = vec![ready_cond, progressing, degraded];
    let stalled = stalled(
        pool,
        stuck,
        pods_refused.as_deref(),
        secrets.as_ref(),
        seen.host_public_key,
    );
    conditions.extend(kstatus(prev, &conditions, stalled, generation, now));

    NixBuilderPoolStatus {
        observed_generation: generation,
        replicas: d.replicas.unwrap_or(0),
        ready_replicas: ready,
        ready: Some(format!("{ready}/{desired}")),
        selector: Some(selector_string(pool)),
        conditions,
        endpoint,
        host_public_key: seen.host_public_key.map(str::to_string),
        machines_entry,
        desired_replicas: spec.autoscaling.is_some().then_some(desired),
    }
}

/// kstatus's two "abnormal-true" conditions, both always present so that `kubectl wait
/// --for=condition=Stalled=false` works too: `Stalled` True when the pool cannot progress until
/// a person changes something; otherwise `Reconciling` True while Ready or Progressing says the
/// pool is still catching up with its spec. A healthy pool, or one scaled to zero on purpose,
/// has both False.
fn kstatus(
    prev: &[Condition],
    conditions: &[Condition],
    stalled: Option<(&str, String)>,
    generation: Option<i64>,
    now: Timestamp,
) -> [Condition; 2] {
    /// Ready=False reasons that pass without a person: pods starting, an address or a Secret
    /// on its way.
    const CATCHING_UP: [&str; 4] = [
        REASON_NO_READY_BUILDERS,
        REASON_NO_READY_GATEWAY,
        REASON_ENDPOINT_PENDING,
        REASON_MISSING_SECRET,
    ];
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };
    if let Some((reason, message)) = stalled {
        return [
            cond(
                RECONCILING,
                false,
                reason,
                "stopped until something changes; see the Stalled condition".into(),
            ),
            cond(STALLED, true, reason, message),
        ];
    }
    let find = |type_: &str| conditions.iter().find(|c| c.type_ == type_);
    let catching_up = find(READY)
        .filter(|r| r.status == "False" && CATCHING_UP.contains(&r.reason.as_str()))
        .or_else(|| find(PROGRESSING).filter(|p| p.status == "True"));
    let reconciling = match catching_up {
        Some(c) => cond(RECONCILING, true, &c.reason, c.message.clone()),
        None => cond(
            RECONCILING,
            false,
            REASON_UP_TO_DATE,
            "the pool matches its spec".into(),
        ),
    };
    [reconciling, not_stalled(&cond)]
}

fn not_stalled(cond: &impl Fn(&str, bool, &str, String) -> Condition) -> Condition {
    cond(STALLED, false, REASON_AS_EXPECTED, "nothing blocks progress".into())
}

/// Why the pool cannot progress until a person acts, if it cannot: pods the API server
/// refuses, a rollout past its deadline, a host-key Secret not opted in, a NodePort Service
/// without `spec.service.externalHost`.
fn stalled(
    pool: &NixBuilderPool,
    stuck: Option<&k8s_openapi::api::apps::v1::DeploymentCondition>,
    pods_refused: Option<&str>,
    secrets: Option<&(&'static str, String)>,
    host_public_key: Option<&str>,
) -> Option<(&'static str, String)> {
    if let Some(message) = pods_refused {
        return Some((REASON_PODS_REFUSED, message.to_string()));
    }
    if let Some(s) = stuck {
        return Some((REASON_ROLLOUT_STUCK, stuck_message(s, pool)));
    }
    if let (Some((REASON_NOT_OPTED_IN, message)), None) = (secrets, host_public_key) {
        return Some((REASON_NOT_OPTED_IN, message.clone()));
    }
    let s = &pool.spec.service;
    if s.type_ == ServiceType::NodePort && s.external_host.is_none() {
        return Some((REASON_ENDPOINT_PENDING, endpoint_pending_message(pool)));
    }
    None
}

fn stuck_message(s: &k8s_openapi::api::apps::v1::DeploymentCondition, pool: &NixBuilderPool) -> String {
    let said = s.message.as_deref().unwrap_or("the rollout is not progressing");
    format!("{said}; see `kubectl describe pod -l {}`", selector_string(pool))
}

/// The API server's refusal of a Deployment's pods, with the fix: the ReplicaSet controller's
/// FailedCreate, which the Deployment controller copies into the Deployment's `ReplicaFailure`
/// condition. Such pods never exist, so `kubectl describe pod` finds nothing to describe.
pub fn pods_refused(d: &Deployment, ns: &str) -> Option<String> {
    let c = d
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")?;
    let said = c
        .message
        .as_deref()
        .filter(|m| !m.is_empty())
        .unwrap_or("the API server refused to create them");
    let fix = if said.contains("PodSecurity") {
        format!(
            "builder pods run privileged (Nix's build sandbox needs its own namespaces), so the namespace's Pod Security level must allow it: kubectl label namespace {ns} pod-security.kubernetes.io/enforce=privileged"
        )
    } else if said.contains("exceeded quota") {
        format!(
            "raise the namespace's ResourceQuota (kubectl describe resourcequota -n {ns}) or ask for less (spec.replicas, spec.resources)"
        )
    } else if said.contains("per Container") || said.contains("per Pod") || said.contains("LimitRange") {
        format!("fit spec.resources within the namespace's LimitRange (kubectl describe limitrange -n {ns})")
    } else {
        format!("see kubectl get events -n {ns} --field-selector reason=FailedCreate")
    };
    Some(format!(
        "the API server refuses to create the pods of Deployment {}: {said}; {fix}",
        d.name_any()
    ))
}

/// The status of a pool whose reconcile failed: Ready=False and Degraded=True with the failure's
/// reason and message, `Stalled` when only a person can fix it (else `Reconciling`: it is
/// retried), for the pool's current generation; Progressing and the rest as they were.
pub fn failed(
    pool: &NixBuilderPool,
    reason: &str,
    message: &str,
    needs_a_person: bool,
    now: Timestamp,
) -> NixBuilderPoolStatus {
    let prev_status = pool.status.clone().unwrap_or_default();
    let prev = prev_status.conditions.as_slice();
    let generation = pool.metadata.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };
    let mut conditions = vec![cond(READY, false, reason, message.to_string())];
    // Progressing as it was; a pool that never got that far progresses only if it is retried.
    let progressing = prev_status.condition(PROGRESSING).cloned();
    conditions.push(progressing.unwrap_or_else(|| cond(PROGRESSING, !needs_a_person, reason, message.to_string())));
    conditions.push(cond(DEGRADED, true, reason, message.to_string()));
    if needs_a_person {
        conditions.push(cond(
            RECONCILING,
            false,
            reason,
            "stopped until something changes; see the Stalled condition".into(),
        ));
        conditions.push(cond(STALLED, true, reason, message.to_string()));
    } else {
        conditions.push(cond(RECONCILING, true, reason, format!("retrying: {message}")));
        conditions.push(not_stalled(&cond));
    }
    NixBuilderPoolStatus {
        observed_generation: generation,
        conditions,
        ..prev_status
    }
}

/// The status of a pool whose spec is refused: Ready=False/InvalidSpec, Stalled, the rest kept.
pub fn invalid(pool: &NixBuilderPool, message: &str, now: Timestamp) -> NixBuilderPoolStatus {
    let prev_status = pool.status.clone().unwrap_or_default();
    let prev = prev_status.conditions.as_slice();
    let generation = pool.metadata.generation;
    let message = format!("{message}. Fix the spec; nothing is changed until then");
    let cond = |type_: &str, ok: bool, message: String| {
        condition(prev, type_, ok, REASON_INVALID_SPEC, message, generation, now)
    };
    NixBuilderPoolStatus {
        observed_generation: generation,
        conditions: vec![
            cond(READY, false, message.clone()),
            cond(PROGRESSING, false, "waiting for a valid spec".into()),
            cond(DEGRADED, true, message.clone()),
            cond(RECONCILING, false, "waiting for a valid spec".into()),
            cond(STALLED, true, message),
        ],
        ..prev_status
    }
}

/// The status patch of a pool whose stored form does not decode (`error` says why), so there is
/// no status to start from: Ready=False and Stalled with the error, Reconciling=False. Only
/// `observedGeneration` and the conditions: what else the pool reports is left as it is.
pub fn undecodable(error: &str, generation: Option<i64>, now: Timestamp) -> serde_json::Value {
    let message = format!("the pool does not match the NixBuilderPool schema: {error}; fix the spec");
    let cond = |type_: &str, ok: bool, message: &str| {
        condition(
            &[],
            type_,
            ok,
            REASON_INVALID_SPEC,
            message.to_string(),
            generation,
            now,
        )
    };
    let conditions = [
        cond(READY, false, &message),
        cond(RECONCILING, false, "waiting for a spec that decodes"),
        cond(STALLED, true, &message),
    ];
    serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "status": {"observedGeneration": generation, "conditions": conditions},
    })
}

/// A condition whose lastTransitionTime moves only when its status flips.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn endpoint(pool: &NixBuilderPool, service: &Service) -> Option<Endpoint> {
    let s = &pool.spec.service;
    let spec_port = service
        .spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref())
        .and_then(|p| p.first());
    let port = match s.type_ {
        ServiceType::NodePort => spec_port.and_then(|p| p.node_port)?,
        _ => s.port,
    };
    let host = if let Some(h) = &s.external_host {
        h.clone()
    } else {
        match s.type_ {
            ServiceType::ClusterIP => format!(
                "{}.{}.svc",
                names::workload(&pool.name_any()),
                pool.namespace().unwrap_or_default()
            ),
            ServiceType::NodePort => return None,
            ServiceType::LoadBalancer => {
                let ingress = service
                    .status
                    .as_ref()?
                    .load_balancer
                    .as_ref()?
                    .ingress
                    .as_ref()?
                    .first()?;
                ingress.hostname.clone().or_else(|| ingress.ip.clone())?
            }
        }
    };
    Some(Endpoint { host, port })
}

fn endpoint_pending_message(pool: &NixBuilderPool) -> String {
    match pool.spec.service.type_ {
        ServiceType::NodePort => {
            "a NodePort Service has no single address: set spec.service.externalHost to a node's DNS name or IP".into()
        }
        _ => "waiting for the load balancer to publish an address (or set spec.service.externalHost)".into(),
    }
}

/// Missing Secrets first (nothing else works without them), then Secrets not opted in.
fn secrets_problem(missing: &[String], refused: &[String], pool: &NixBuilderPool) -> Option<(&'static str, String)> {
    let ns = pool.metadata.namespace.as_deref().unwrap_or("default");
    let refused_message = || {
        format!(
            "{} lack(s) the label {label}=true, so the pool does not use it (a pool uses only objects their owner opted in); if meant for this pool: kubectl label -n {ns} {} {label}=true",
            refused.join(", "),
            refused
                .iter()
                .map(|r| r.split(' ').next().unwrap_or(r))
                .collect::<Vec<_>>()
                .join(" "),
            label = nixpool_api::labels::USE,
        )
    };
    match (missing.is_empty(), refused.is_empty()) {
        (true, true) => None,
        (true, false) => Some((REASON_NOT_OPTED_IN, refused_message())),
        (false, true) => Some((REASON_MISSING_SECRET, missing_message(missing))),
        (false, false) => Some((
            REASON_MISSING_SECRET,
            format!("{}; {}", missing_message(missing), refused_message()),
        )),
    }
}

fn missing_message(missing: &[String]) -> String {
    format!(
        "not found: {}; create them in the pool's namespace or fix the names in spec.ssh or spec.cache",
        missing.join(", ")
    )
}

fn bad_keys_message(bad: &[BadKey]) -> String {
    const SHOWN: usize = 5;
    let mut parts: Vec<String> = bad.iter().take(SHOWN).map(ToString::to_string).collect();
    if bad.len() > SHOWN {
        parts.push(format!("and {} more", bad.len() - SHOWN));
    }
    format!("{} authorized key line(s) skipped: {}", bad.len(), parts.join("; "))
}

/// Writes the status with server-side apply, unless it is what the pool already reports, or
/// what this operator already wrote from the same copy of the pool.
pub async fn patch(ctx: &Context, pool: &NixBuilderPool, status: NixBuilderPoolStatus) -> Result<bool> {
    if pool.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let uid = pool.metadata.uid.clone().unwrap_or_default();
    let version = pool.metadata.resource_version.clone().unwrap_or_default();
    let status_hash = fingerprint(&status);
    if ctx.statuses.already_written(&uid, &version, &status_hash) {
        return Ok(false);
    }
    let api: Api<NixBuilderPool> = Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1",
        "kind": "NixBuilderPool",
        "status": status,
    });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Status {
        name: pool.name_any(),
        source,
    })?;
    ctx.statuses.remember(&uid, &version, &status_hash);
    Ok(true)
}

/// Writes the status of a reconcile that applied `applied`, unless a Deployment written just now
/// has yet to be observed by its controller: it still reports on the spec before, its
/// controller catches up within milliseconds, and that watch event brings the pool back here.
/// The status is written then, once, rather than now and again then (other children's events
/// may bring the pool back before that: they wait too). `write_now`: the status must remember
/// something at once (a scale decision, news of bad keys). Returns how long the status waits, at
/// most [`crate::cache::STATUS_WAIT`], if it was not written.
pub async fn write_unless_rollout_pending(
    ctx: &Context,
    pool: &NixBuilderPool,
    status: NixBuilderPoolStatus,
    applied: &Applied,
    write_now: bool,
) -> Result<Option<Duration>> {
    let wait = std::iter::once(&applied.deployment)
        .chain(applied.gateway.as_ref())
        .filter_map(|d| ctx.rollouts.wait_for(d))
        .max()
        .filter(|_| !write_now);
    if wait.is_some() {
        debug!("status waits for the Deployment controller to observe what was applied");
    } else {
        patch(ctx, pool, status).await?;
    }
    Ok(wait)
}

/// A hash of what a status says, without its conditions' transition times: two reconciles of
/// the same stale copy of a pool compute the same status at different instants.
fn fingerprint(status: &NixBuilderPoolStatus) -> String {
    let mut value = serde_json::to_value(status).expect("a status serializes");
    if let Some(conditions) = value.get_mut("conditions").and_then(|c| c.as_array_mut()) {
        for c in conditions.iter_mut().filter_map(|c| c.as_object_mut()) {
            c.remove("lastTransitionTime");
        }
    }
    crate::reconcile::build::hash(&value)
}

#[cfg(test)]
mod tests;
