//! The I/O around the gateway and the autoscaler: the demand reports its pods write, the
//! pod-deletion costs that make a scale-down take idle builders first, and the clean-up when a
//! pool drops its gateway. (The gateway's key is generated like the host key: `generated_key`.)

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use nixpool_api::demand::GatewayReport;
use nixpool_api::{NixBuilderPool, labels, names};
use tracing::warn;

use super::apply::controlled_by;
use super::autoscale::{Decision, parse_reports};
use crate::context::Context;
use crate::error::{Error, Result};

/// The reports the pool's gateway pods wrote. None yet (no ConfigMap, or an empty one) is no
/// demand.
pub async fn demand(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<Vec<GatewayReport>> {
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
pub async fn prefer_idle(ctx: &Context, ns: &str, decision: &Decision) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let costs = decision
        .idle
        .iter()
        .map(|p| (p, "-1000"))
        .chain(decision.busy.iter().map(|p| (p, "1000")));
    for (pod, cost) in costs {
        let patch = serde_json::json!({"metadata": {"annotations": {labels::POD_DELETION_COST: cost}}});
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
