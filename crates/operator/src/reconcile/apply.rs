//! The one I/O stage for children: server-side apply, in a fixed order, only where the live
//! object differs from the desired one.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use nixpool_api::FIELD_MANAGER;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::build::{Children, GatewayChildren, with_applied_hash};
use crate::cache::Cached;
use crate::context::Context;
use crate::error::{Error, Result};

/// The live objects after apply, and what had to change.
pub struct Applied {
    pub deployment: Deployment,
    pub service: Service,
    /// The gateway's Deployment, with `spec.gateway` or `spec.autoscaling`.
    pub gateway: Option<Deployment>,
    /// `Kind/name` of each child that was created or updated.
    pub changed: Vec<String>,
}

pub async fn apply(ctx: &Context, ns: &str, children: Children) -> Result<Applied> {
    let Children {
        authorized_keys,
        config_map,
        deployment,
        service,
        pdb,
        gateway,
    } = children;
    let mut changed = Vec::new();
    // The ConfigMaps first, so new pods find everything they mount (the host-key Secret was
    // created before, once).
    apply_if_changed(ctx, ns, authorized_keys, &mut changed).await?;
    apply_if_changed(ctx, ns, config_map, &mut changed).await?;
    let deployment = apply_deployment_if_changed(ctx, ns, deployment, &mut changed).await?;
    let gateway = match gateway {
        Some(GatewayChildren {
            service_account,
            role,
            role_binding,
            demand,
            deployment,
            pdb,
        }) => {
            // Its identity and rights before its pods, which need them to start.
            apply_if_changed(ctx, ns, service_account, &mut changed).await?;
            apply_if_changed(ctx, ns, role, &mut changed).await?;
            apply_if_changed(ctx, ns, role_binding, &mut changed).await?;
            apply_if_changed(ctx, ns, demand, &mut changed).await?;
            let live = apply_deployment_if_changed(ctx, ns, deployment, &mut changed).await?;
            if let Some(pdb) = pdb {
                apply_if_changed(ctx, ns, pdb, &mut changed).await?;
            }
            Some(live)
        }
        None => None,
    };
    let service = apply_if_changed(ctx, ns, service, &mut changed).await?;
    if let Some(pdb) = pdb {
        apply_if_changed(ctx, ns, pdb, &mut changed).await?;
    }
    Ok(Applied {
        deployment,
        service,
        gateway,
        changed,
    })
}

/// [`apply_if_changed`] for a Deployment; one it writes is remembered until its controller observes it
/// (the pool's status waits for that, see `reconcile`).
async fn apply_deployment_if_changed(
    ctx: &Context,
    ns: &str,
    desired: Deployment,
    changed: &mut Vec<String>,
) -> Result<Deployment> {
    let before = changed.len();
    let live = apply_if_changed(ctx, ns, desired, changed).await?;
    if changed.len() > before {
        ctx.rollouts.written(&live);
    }
    Ok(live)
}

/// Applies `desired` only if the live object lacks any of it (which includes the applied-hash
/// annotation, so a field dropped from the desired object counts as a change too). The live
/// object comes from the watch's store when it has it and it already holds `desired` (no
/// request at all); otherwise it is read from the API server.
pub(super) async fn apply_if_changed<K>(ctx: &Context, ns: &str, desired: K, changed: &mut Vec<String>) -> Result<K>
where
    K: Cached + Resource<Scope = NamespaceResourceScope> + Debug + Serialize + DeserializeOwned,
{
    let desired = with_applied_hash(desired);
    let name = desired.name_any();
    let kind = K::kind(&()).to_string();
    let pool_uid = desired
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone());
    let wanted = to_value(&desired);
    let cached = ctx.stores().and_then(|s| s.get::<K>(ns, &name));
    if let Some(cached) = cached
        && controlled_by(cached.meta(), pool_uid.as_deref())
        && is_subset(&wanted, &to_value(&cached))
    {
        return Ok(cached);
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        kind: kind.clone(),
        name: name.clone(),
        source,
    })?;
    if let Some(live) = live {
        // Never take over an object by name: only one this pool controls is updated.
        if !controlled_by(live.meta(), pool_uid.as_deref()) {
            return Err(Error::NotOwned { kind, name });
        }
        if is_subset(&wanted, &to_value(&live)) {
            return Ok(live);
        }
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    changed.push(format!("{kind}/{name}"));
    Ok(applied)
}

fn to_value<K: Serialize>(object: &K) -> Value {
    serde_json::to_value(object).expect("Kubernetes objects serialize")
}

/// Whether `meta`'s controller is the pool with `pool_uid`.
pub fn controlled_by(meta: &ObjectMeta, pool_uid: Option<&str>) -> bool {
    let Some(uid) = pool_uid else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Whether every field of `desired` is in `live` with the same value. Quantities compare by
/// value, because the API server rewrites them in canonical form (`1024Mi` becomes `1Gi`).
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Null, _) => true,
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_subset(dv, lv),
            None => is_empty(dv),
        }),
        (Value::Object(d), Value::Null) => d.values().all(is_empty),
        (Value::Array(d), Value::Array(l)) => d.len() == l.len() && d.iter().zip(l).all(|(d, l)| is_subset(d, l)),
        (Value::Array(d), Value::Null) => d.is_empty(),
        (Value::String(d), Value::String(l)) => d == l || same_quantity(d, l),
        (d, l) => d == l,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.values().all(is_empty),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn same_quantity(a: &str, b: &str) -> bool {
    let starts_numeric = |s: &str| s.starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if !starts_numeric(a) || !starts_numeric(b) {
        return false;
    }
    match (nixpool_api::quantity::parse(a), nixpool_api::quantity::parse(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_and_extra_fields_are_not_a_difference() {
        let desired = json!({"spec": {"ports": [{"port": 22, "name": "ssh"}], "selector": {"a": "b"}}, "status": null});
        let live = json!({"spec": {"ports": [{"port": 22, "name": "ssh", "protocol": "TCP"}], "selector": {"a": "b"}, "clusterIP": "10.0.0.1"}});
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn changed_missing_or_resized_values_are_a_difference() {
        let live = json!({"a": {"b": [1, 2]}, "c": "x"});
        assert!(!is_subset(&json!({"a": {"b": [1, 3]}}), &live));
        assert!(!is_subset(&json!({"a": {"b": [1]}}), &live));
        assert!(!is_subset(&json!({"d": "new"}), &live));
        assert!(!is_subset(&json!({"c": "y"}), &live));
        assert!(
            is_subset(&json!({"e": {}}), &live),
            "an empty object the server drops is no difference"
        );
    }

    #[test]
    fn quantities_compare_by_value() {
        assert!(is_subset(&json!({"m": "1024Mi"}), &json!({"m": "1Gi"})));
        assert!(!is_subset(&json!({"m": "1000Mi"}), &json!({"m": "1Gi"})));
        assert!(!is_subset(&json!({"image": "a:1"}), &json!({"image": "a:01"})));
    }
}
