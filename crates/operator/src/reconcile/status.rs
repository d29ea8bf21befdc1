//! Pure status computation, and the one status write (skipped when nothing changed).

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use nixpool_api::conditions::*;
use nixpool_api::v1alpha1::{Endpoint, ServiceType};
use nixpool_api::{FIELD_MANAGER, MachinesEntry, NixBuilderPool, NixBuilderPoolStatus, names};

use super::build::{gateway_selector_labels, labels_string, selector_string};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::keys::BadKey;

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
    let ready_cond = if let (Some((reason, message)), None) = (&secrets, seen.host_public_key) {
        cond(READY, false, reason, message.clone())
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

    let degraded = if let Some(s) = stuck {
        cond(
            DEGRADED,
            true,
            REASON_ROLLOUT_STUCK,
            s.message
                .clone()
                .unwrap_or_else(|| "the rollout is not progressing".into()),
        )
    } else if let Some((reason, message)) = secrets {
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

    NixBuilderPoolStatus {
        observed_generation: generation,
        replicas: d.replicas.unwrap_or(0),
        ready_replicas: ready,
        ready: Some(format!("{ready}/{desired}")),
        selector: Some(selector_string(pool)),
        conditions: vec![ready_cond, progressing, degraded],
        endpoint,
        host_public_key: seen.host_public_key.map(str::to_string),
        machines_entry,
        desired_replicas: spec.autoscaling.is_some().then_some(desired),
    }
}

/// The status of a pool whose spec is refused: Ready=False/InvalidSpec, the rest kept.
pub fn invalid(pool: &NixBuilderPool, message: &str, now: Timestamp) -> NixBuilderPoolStatus {
    let prev_status = pool.status.clone().unwrap_or_default();
    let prev = prev_status.conditions.as_slice();
    let generation = pool.metadata.generation;
    let message = format!("{message}. Fix the spec; nothing is changed until then");
    NixBuilderPoolStatus {
        observed_generation: generation,
        conditions: vec![
            condition(
                prev,
                READY,
                false,
                REASON_INVALID_SPEC,
                message.clone(),
                generation,
                now,
            ),
            condition(
                prev,
                PROGRESSING,
                false,
                REASON_INVALID_SPEC,
                "waiting for a valid spec".into(),
                generation,
                now,
            ),
            condition(prev, DEGRADED, true, REASON_INVALID_SPEC, message, generation, now),
        ],
        ..prev_status
    }
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
