//! The shared test control plane with the CRD installed, and pools with a status written the
//! way the operator writes it (a status patch; no operator needed).
#![allow(dead_code)]

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use nixpool_api::NixBuilderPool;
use nixpool_testenv::ControlPlane;

#[allow(unused_imports)]
pub use nixpool_testenv::harness::{REPO, control_plane, run};

pub const HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0";

/// Creates a pool and writes its status as the operator would: `ready` of `replicas` builders
/// ready, Ready=True when at least one is.
#[allow(clippy::too_many_arguments)]
pub async fn pool(
    client: &kube::Client,
    ns: &str,
    name: &str,
    labels: serde_json::Value,
    replicas: i32,
    ready: i32,
    endpoint: (&str, u16),
    host_key: &str,
) -> NixBuilderPool {
    let api: Api<NixBuilderPool> = Api::namespaced(client.clone(), ns);
    let p: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": replicas, "maxJobs": 2, "systems": ["x86_64-linux"],
                 "supportedFeatures": ["big-parallel"], "ssh": {"user": "builder"}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
    let ok = ready > 0;
    let status = serde_json::json!({"status": {
        "observedGeneration": 1,
        "replicas": replicas, "readyReplicas": ready, "ready": format!("{ready}/{replicas}"),
        "endpoint": {"host": endpoint.0, "port": endpoint.1},
        "hostPublicKey": host_key,
        "machinesEntry": "-",
        "conditions": [{"type": "Ready", "status": if ok {"True"} else {"False"},
                        "reason": if ok {"BuildersReady"} else {"NoReadyBuilders"},
                        "message": format!("{ready} of {replicas} builders ready"),
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap()
}

/// Namespaced requests the API server has served for pools, by verb (`LIST`, `GET`), from its
/// /metrics. (The controller-manager's garbage collector lists pools cluster-wide; those are not
/// counted.)
pub fn pool_requests(cp: &ControlPlane, verb: &str) -> f64 {
    let metrics = run(cp.kubectl().args(["get", "--raw", "/metrics"]));
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"nixbuilderpools\"") && l.contains(&format!("verb=\"{verb}\"")))
        .filter(|l| l.contains("subresource=\"\"") && l.contains("scope=\"namespace\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
