//! The harness itself works: the API serves, the controller-manager runs real controllers.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{Api, ListParams, PostParams};
use nixpool_testenv::ControlPlane;

#[tokio::test]
async fn a_deployment_gets_a_replicaset_from_the_real_controller_manager() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("smoke").await.unwrap();
    let client = cp.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "c", "image": "example.invalid/none"}]}}
        }
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &d).await.unwrap();
    let rs: Api<ReplicaSet> = Api::namespaced(client, &ns);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let list = rs.list(&ListParams::default()).await.unwrap();
        if let Some(r) = list.items.first() {
            let owner = &r.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.kind, "Deployment");
            assert_eq!(owner.name, "web");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ReplicaSet within 60s: is kube-controller-manager running?"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
