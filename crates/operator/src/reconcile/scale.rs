//! The I/O around the gateway and the autoscaler: the builder count for one reconcile (from the
//! demand reports the gateway pods write), the pod-deletion costs that make a scale-down take
//! idle builders first, and the clean-up when a pool drops its gateway. (The gateway's key is
//! read or generated with the host key, in `dereference.rs`.)

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use nixpool_api::demand::GatewayReport;
use nixpool_api::{NixBuilderPool, names};
use tracing::{info, warn};

use super::apply::controlled_by;
use super::autoscale::{self, Decision, parse_reports};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::metrics::DirectionLabels;

/// How many builders this reconcile asks for.
pub struct Scaling {
    /// What the operator asked for last time (see [`asked_before`]).
    pub asked_before: i32,
    /// The autoscaler's decision, with `spec.autoscaling`.
    pub decision: Option<Decision>,
    /// Builders to run: `spec.replicas`, or the autoscaler's decision.
    pub builders: i32,
}

impl Scaling {
    /// The autoscaler's decision, if it changes the builder count.
    pub fn change(&self) -> Option<&Decision> {
        self.decision.as_ref().filter(|d| d.replicas != self.asked_before)
    }
}

/// The builder count for this reconcile. With `spec.autoscaling`, the autoscaler decides from
/// the gateways' demand reports, and before a scale-down the idle builders are marked to go
/// first.
pub async fn scaling(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<Scaling> {
    let asked_before = asked_before(pool);
    let decision = match &pool.spec.autoscaling {
        Some(a) => {
            let reports = demand(ctx, pool, ns).await?;
            Some(autoscale::decide(
                a,
                pool.spec.max_jobs,
                asked_before,
                &reports,
                ctx.now().as_second(),
            ))
        }
        None => None,
    };
    if let Some(d) = decision.as_ref().filter(|d| d.replicas < asked_before) {
        prefer_idle(ctx, ns, d).await;
    }
    let builders = decision.as_ref().map_or(pool.spec.replicas, |d| d.replicas);
    Ok(Scaling {
        asked_before,
        decision,
        builders,
    })
}

/// With autoscaling the operator owns the builder count; it starts from what it asked for last
/// time. A new pool starts at minReplicas; a pool that turns autoscaling on keeps its builders
/// until they are idle.
fn asked_before(pool: &NixBuilderPool) -> i32 {
    match (&pool.status, &pool.spec.autoscaling) {
        (Some(s), _) if s.desired_replicas.is_some() => s.desired_replicas.unwrap_or_default(),
        (None, Some(a)) => a.min_replicas,
        _ => pool.spec.replicas,
    }
}

/// Logs and counts a change of the builder count (its Event is in `events.rs`).
pub fn record(ctx: &Context, scaling: &Scaling) {
    let Some(d) = scaling.change() else { return };
    let from = scaling.asked_before;
    let (reason, direction) = if d.replicas > from {
        ("ScaledUp", "up")
    } else {
        ("ScaledDown", "down")
    };
    info!(
        from,
        to = d.replicas,
        sessions = d.sessions,
        waiting = d.waiting,
        "{reason}"
    );
    ctx.metrics
        .scale_decisions
        .get_or_create(&DirectionLabels {
            direction: direction.into(),
        })
        .inc();
}

/// The reports the pool's gateway pods wrote. None yet (no ConfigMap, or an empty one) is no
/// demand.
async fn demand(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<Vec<GatewayReport>> {
    let name = names::gateway_demand(&pool.name_any());
    // The operator owns the ConfigMap, so its watch has it (and wakes the pool when it changes).
    let found = match ctx.stores().and_then(|s| s.get::<ConfigMap>(ns, &name)) {
        Some(cm) => Some(cm),
        None => {
            let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
            api.get_opt(&name).await.map_err(|source| Error::Read {
                kind: "ConfigMap".into(),
                name: name.clone(),
                source,
            })?
        }
    };
    let data = found.and_then(|cm| cm.data).unwrap_or_default();
    let (reports, bad) = parse_reports(&data);
    if !bad.is_empty() {
        warn!(configmap = name, gateways = ?bad, "demand reports that do not parse are ignored");
    }
    Ok(reports)
}

/// Before a scale-down: idle builders get the lowest pod-deletion cost and busy ones a high
/// one, so the ReplicaSet controller (Kubernetes 1.22 and later) removes idle ones first. A
/// pod that is gone already is skipped. Failures are logged: the scale-down goes on (a busy
/// builder that is picked anyway drains its builds before it stops).
async fn prefer_idle(ctx: &Context, ns: &str, decision: &Decision) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let costs = decision
        .idle
        .iter()
        .map(|p| (p, "-1000"))
        .chain(decision.busy.iter().map(|p| (p, "1000")));
    for (pod, cost) in costs {
        let patch =
            serde_json::json!({"metadata": {"annotations": {nixpool_api::annotations::POD_DELETION_COST: cost}}});
        match api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => warn!(pod, error = %e, "cannot set the pod-deletion cost"),
        }
    }
}

/// A pool without a gateway: removes the gateway children a former spec made, if any. Reads
/// one object when there is nothing to remove.
pub async fn remove_gateway(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<Vec<String>> {
    let name = names::gateway(&pool.name_any());
    // Most pools never had a gateway: the watched Deployments say so without a request.
    if ctx.stores().is_some_and(|s| s.lacks::<Deployment>(ns, &name)) {
        return Ok(Vec::new());
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let Some(d) = deployments.get_opt(&name).await.map_err(|source| Error::Read {
        kind: "Deployment".into(),
        name: name.clone(),
        source,
    })?
    else {
        return Ok(Vec::new());
    };
    if !controlled_by(&d.metadata, pool.metadata.uid.as_deref()) {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    delete::<Deployment>(ctx, ns, &name, &mut removed).await?;
    if ctx.with_pdb {
        delete::<PodDisruptionBudget>(ctx, ns, &name, &mut removed).await?;
    }
    delete::<RoleBinding>(ctx, ns, &name, &mut removed).await?;
    delete::<Role>(ctx, ns, &name, &mut removed).await?;
    delete::<ServiceAccount>(ctx, ns, &name, &mut removed).await?;
    delete::<ConfigMap>(ctx, ns, &names::gateway_demand(&pool.name_any()), &mut removed).await?;
    Ok(removed)
}

async fn delete<K>(ctx: &Context, ns: &str, name: &str, removed: &mut Vec<String>) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            removed.push(format!("{kind}/{name}"));
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Apply {
            kind,
            name: name.to_string(),
            source,
        }),
    }
}
