//! The controller against a real kube-apiserver and kube-controller-manager (1.20, from Debian)
//! on loopback, with the operator as a real process.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, ResourceQuota, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use nixpool_api::{MachinesEntry, NixBuilderPool, labels, paths};

const MIN: Duration = Duration::from_secs(60);

fn apply_example(cp: &nixpool_testenv::ControlPlane, ns: &str, example: &str) {
    run(cp
        .kubectl()
        .args(["apply", "-n", ns, "-f", &format!("{REPO}/examples/{example}")]));
}

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, pool: &NixBuilderPool) -> bool {
    meta.owner_references.iter().flatten().any(|o| {
        o.kind == "NixBuilderPool"
            && o.name == pool.name_any()
            && Some(&o.uid) == pool.metadata.uid.as_ref()
            && o.controller == Some(true)
    })
}

fn secret_text(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// How many objects of kind `K` in `ns` the pool controls.
async fn owned_children<K>(client: &kube::Client, ns: &str, pool: &NixBuilderPool) -> usize
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items.iter().filter(|o| owned_by(o.meta(), pool)).count()
}

async fn events_for(client: &kube::Client, ns: &str, pool: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pool))
        .collect()
}

#[tokio::test]
async fn every_example_pool_gets_its_children_and_a_status() {
    let cp = control_plane();
    let ns = cp.namespace("examples").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    for e in ["minimal.yaml", "caches.yaml", "team-keys.yaml"] {
        apply_example(cp, &ns, e);
    }
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    for name in ["builders", "cached", "teams"] {
        let pool = observed(&pools, name).await;
        let st = pool.status.clone().unwrap();
        let host_key = st.host_public_key.clone().expect("status.hostPublicKey");
        assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");
        assert_eq!(
            st.selector.as_deref(),
            Some(format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=nixpool-builder").as_str())
        );
        // No kubelet: nothing is ready yet, and the status says so.
        assert_eq!(condition(&pool, "Ready").status, "False");
        assert_eq!(condition(&pool, "Ready").reason, "NoReadyBuilders");
        assert_eq!(condition(&pool, "Progressing").status, "True");
        // kstatus: still working toward the spec, nothing blocks it.
        assert_eq!(condition(&pool, "Reconciling").status, "True");
        assert_eq!(condition(&pool, "Stalled").status, "False");

        let hk = secrets.get(&format!("{name}-host-key")).await.unwrap();
        assert!(owned_by(&hk.metadata, &pool));
        assert_eq!(secret_text(&hk, paths::HOST_PUBLIC_KEY_FILE).trim(), host_key);
        let ak = config_maps.get(&format!("{name}-authorized-keys")).await.unwrap();
        assert!(owned_by(&ak.metadata, &pool));
        assert!(ak.data.as_ref().unwrap()[paths::AUTHORIZED_KEYS_FILE].contains("alice@laptop"));
        let cm = config_maps.get(&format!("{name}-config")).await.unwrap();
        assert!(owned_by(&cm.metadata, &pool));
        let agent = nixpool_api::AgentConfig::from_json(&cm.data.as_ref().unwrap()[paths::AGENT_CONFIG_KEY]).unwrap();
        assert_eq!(agent.pool, name);
        assert_eq!(agent.max_jobs as i32, pool.spec.max_jobs);

        let d = deployments.get(name).await.unwrap();
        assert!(owned_by(&d.metadata, &pool));
        for k in [
            labels::NAME,
            labels::INSTANCE,
            labels::MANAGED_BY,
            labels::PART_OF,
            labels::COMPONENT,
        ] {
            assert!(d.labels().contains_key(k), "Deployment {name} lacks label {k}");
        }
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(pool.spec.replicas));
        let ru = spec.strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
        assert_eq!(
            ru.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
        );
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(pool.spec.termination_grace_period_seconds)
        );
        let c = &pod.containers[0];
        assert_eq!(c.command.as_ref().unwrap()[0], paths::AGENT_BINARY);
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
        // Ready within a second of starting; liveness restarts only after a minute of silence.
        assert_eq!(c.readiness_probe.as_ref().unwrap().period_seconds, Some(1));
        let live = c.liveness_probe.as_ref().unwrap();
        assert!(live.period_seconds.unwrap() * live.failure_threshold.unwrap() >= 60);
        let host_key_volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "host-key")
            .unwrap();
        assert_eq!(host_key_volume.secret.as_ref().unwrap().default_mode, Some(0o400));
        assert!(
            spec.template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(nixpool_api::annotations::CONFIG_HASH)
        );

        let svc = services.get(name).await.unwrap();
        assert!(owned_by(&svc.metadata, &pool));
    }

    // The caches pool projects both tokens into the builder and uses a LoadBalancer.
    let cached = deployments.get("cached").await.unwrap();
    let vols = cached.spec.unwrap().template.spec.unwrap().volumes.unwrap();
    let projected = vols
        .iter()
        .find(|v| v.name == "cache-secrets")
        .expect("cache-secrets volume")
        .projected
        .clone()
        .unwrap();
    assert_eq!(projected.sources.unwrap().len(), 2);
    assert!(vols.iter().any(|v| v.name == "nix" && v.ephemeral.is_some()));

    // ClusterIP pool: the in-cluster DNS name is the endpoint.
    let teams = pools.get("teams").await.unwrap();
    let ep = teams.status.as_ref().unwrap().endpoint.clone().unwrap();
    assert_eq!((ep.host.as_str(), ep.port), (format!("teams.{ns}.svc").as_str(), 22));

    // The minimal example's ClusterIP pool: once the builders are ready (play the kubelet), it is
    // Ready with a machines line on its in-cluster name whose max jobs is ready builders x jobs
    // per builder.
    eventually(MIN, "2 builder pods from the real ReplicaSet controller", || async {
        (make_pods_ready(&client, &ns, "builders").await == 2).then_some(())
    })
    .await;
    let ready = eventually(MIN, "pool builders Ready", || async {
        let p = pools.get("builders").await.ok()?;
        (p.status.as_ref()?.ready_replicas == 2 && condition(&p, "Ready").status == "True").then_some(p)
    })
    .await;
    let st = ready.status.clone().unwrap();
    let line = MachinesEntry::parse(st.machines_entry.as_deref().unwrap()).unwrap();
    assert_eq!(line.uri, format!("ssh-ng://builder@builders.{ns}.svc"));
    assert_eq!(line.max_jobs, 2 * 4);
    assert_eq!(line.systems, vec!["x86_64-linux"]);
    assert_eq!(line.host_public_key.as_deref(), st.host_public_key.as_deref());
    assert_eq!(st.ready.as_deref(), Some("2/2"));
    // Every builder runs the current spec: nothing left to reconcile (kstatus Current).
    eventually(MIN, "pool builders no longer Reconciling", || async {
        let p = pools.get("builders").await.ok()?;
        (condition(&p, "Reconciling").status == "False").then_some(p)
    })
    .await;
    let done = pools.get("builders").await.unwrap();
    assert_eq!(condition(&done, "Reconciling").reason, "UpToDate");
    assert_eq!(condition(&done, "Stalled").status, "False");
    assert_eq!(condition(&done, "Ready").status, "True");
    run(cp.kubectl().args([
        "wait",
        "-n",
        &ns,
        "nbp/builders",
        "--for=condition=Ready",
        "--timeout=10s",
    ]));

    // LoadBalancer pool: no endpoint until the cloud publishes an address.
    let cached = pools.get("cached").await.unwrap();
    assert!(cached.status.as_ref().unwrap().endpoint.is_none());
    let lb = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}});
    services
        .patch_status("cached", &PatchParams::default(), &Patch::Merge(&lb))
        .await
        .unwrap();
    eventually(MIN, "the load balancer address in status.endpoint", || async {
        let p = pools.get("cached").await.ok()?;
        (p.status?.endpoint?.host == "192.0.2.10").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_spec_change_rolls_the_deployment_and_a_team_key_does_not() {
    let cp = control_plane();
    let ns = cp.namespace("rollout").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "team-keys.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    observed(&pools, "teams").await;
    let before = deployments.get("teams").await.unwrap();
    let hash_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[nixpool_api::annotations::CONFIG_HASH]
            .clone()
    };

    // A new key in a team ConfigMap reaches the authorized-keys ConfigMap within seconds...
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let team_text = |cm: &ConfigMap| cm.data.as_ref().unwrap()["authorized_keys"].clone();
    let dave = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBtqZ2mhd1zVQ2b0mZ7oN5pX0y8rC1qWmQ3y6c2dE9fG dave@laptop";
    let mut keys = team_text(&config_maps.get("team-mobile-keys").await.unwrap());
    keys.push_str(dave);
    keys.push('\n');
    let patch = serde_json::json!({"data": {"authorized_keys": keys}});
    let sent = std::time::Instant::now();
    config_maps
        .patch("team-mobile-keys", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "dave's key in teams-authorized-keys",
        || async {
            let cm = config_maps.get("teams-authorized-keys").await.ok()?;
            cm.data?[paths::AUTHORIZED_KEYS_FILE]
                .contains("dave@laptop")
                .then_some(())
        },
    )
    .await;
    eprintln!("team key reached the authorized-keys ConfigMap in {:?}", sent.elapsed());
    // ...without touching the pod template: no restart.
    let after_key = deployments.get("teams").await.unwrap();
    assert_eq!(after_key.metadata.generation, before.metadata.generation);
    assert_eq!(hash_of(&after_key), hash_of(&before));

    // A bad line is reported with its ConfigMap and line, not dropped silently.
    let bad = format!(
        "{}not-a-key at all\n",
        team_text(&config_maps.get("team-mobile-keys").await.unwrap())
    );
    let patch = serde_json::json!({"data": {"authorized_keys": bad}});
    config_maps
        .patch("team-mobile-keys", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let degraded = eventually(
        Duration::from_secs(15),
        "Degraded=True for the bad key line",
        || async {
            let p = pools.get("teams").await.ok()?;
            (condition(&p, "Degraded").reason == "BadAuthorizedKeys").then_some(p)
        },
    )
    .await;
    let msg = &condition(&degraded, "Degraded").message;
    assert!(
        msg.contains("ConfigMap team-mobile-keys key authorized_keys line 3"),
        "{msg}"
    );
    assert!(
        events_for(&client, &ns, "teams")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("BadAuthorizedKeys") && e.type_.as_deref() == Some("Warning"))
    );

    // A nix setting changes the agent config: the template's hash changes and the real
    // Deployment controller starts a new ReplicaSet.
    let patch = serde_json::json!({"spec": {"nixConfig": {"keep-outputs": "true"}}});
    pools
        .patch("teams", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let rolled = eventually(MIN, "a new pod template", || async {
        let d = deployments.get("teams").await.ok()?;
        (hash_of(&d) != hash_of(&before)).then_some(d)
    })
    .await;
    assert!(rolled.metadata.generation > before.metadata.generation);
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    eventually(MIN, "two ReplicaSets (old and new)", || async {
        (rs.list(&ListParams::default().labels("app.kubernetes.io/instance=teams"))
            .await
            .ok()?
            .items
            .len()
            >= 2)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_changes_nothing() {
    let cp = control_plane();
    let ns = cp.namespace("invalid").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "minimal.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    observed(&pools, "builders").await;
    let before = deployments.get("builders").await.unwrap();

    // 1.20 does not enforce CEL, so the server takes this; the operator must refuse it.
    let patch = serde_json::json!({"spec": {"replicas": 5, "nixConfig": {"trusted-users": "*"}}});
    pools
        .patch("builders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let pool = observed(&pools, "builders").await;
    let ready = condition(&pool, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
    assert!(
        ready.message.contains("spec.nixConfig: this setting is set by nixpool"),
        "{}",
        ready.message
    );
    // kstatus: Stalled, so `kubectl wait` and Flux stop waiting for Ready at once.
    let stalled = condition(&pool, "Stalled");
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert_eq!(condition(&pool, "Reconciling").status, "False");
    run(cp.kubectl().args([
        "wait",
        "-n",
        &ns,
        "nbp/builders",
        "--for=condition=Stalled",
        "--timeout=5s",
    ]));
    let waited = cp
        .kubectl()
        .args([
            "wait",
            "-n",
            &ns,
            "nbp/builders",
            "--for=condition=Ready",
            "--timeout=2s",
        ])
        .output()
        .unwrap();
    assert!(!waited.status.success(), "a stalled pool never turns Ready");
    // `kubectl get` shows why it is not Ready.
    let table = run(cp.kubectl().args(["get", "-n", &ns, "nbp/builders"]));
    let mut rows = table.lines().map(|l| l.split_whitespace().collect::<Vec<_>>());
    let (head, row) = (rows.next().unwrap(), rows.next().unwrap());
    let reason_col = head.iter().position(|h| *h == "REASON").expect("a REASON column");
    assert_eq!(row[reason_col], "InvalidSpec", "{table}");
    let events = events_for(&client, &ns, "builders").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec") && e.type_.as_deref() == Some("Warning")),
        "{events:?}"
    );
    // The Deployment controller keeps writing the Deployment's status, so its resourceVersion
    // moves; what the operator owns (the spec and its own managed fields) must not.
    let after = deployments.get("builders").await.unwrap();
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "an invalid spec must not touch children"
    );
    assert_eq!(
        operator_fields(&after),
        operator_fields(&before),
        "an invalid spec must not touch children"
    );
    assert_eq!(after.spec.unwrap().replicas, Some(2));

    // One broken pool stalls no other: a pool with an unusable host-key Secret reports it,
    // and a healthy pool next to both converges.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let garbage: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bad-host-key", "labels": {"nixpool.dev/use": "true"}}, "stringData": {"key": "not a private key"}
    }))
    .unwrap();
    secrets.create(&Default::default(), &garbage).await.unwrap();
    let broken: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "broken"},
        "spec": {"ssh": {"hostKeySecret": {"name": "bad-host-key", "key": "key"}}}
    }))
    .unwrap();
    pools.create(&Default::default(), &broken).await.unwrap();
    let reported = eventually(MIN, "BadHostKey in the broken pool's status", || async {
        let p = pools.get("broken").await.ok()?;
        let c = p.status.as_ref()?.condition("Degraded")?.clone();
        (c.reason == "BadHostKey").then_some(c)
    })
    .await;
    assert!(
        reported
            .message
            .contains("Secret bad-host-key key key: not an OpenSSH private key"),
        "{}",
        reported.message
    );
    // A failed reconcile still says Ready=False, and Stalled: only a new Secret helps.
    let broken = pools.get("broken").await.unwrap();
    for type_ in ["Ready", "Stalled"] {
        let c = condition(&broken, type_);
        let want = if type_ == "Ready" { "False" } else { "True" };
        assert_eq!((c.status.as_str(), c.reason.as_str()), (want, "BadHostKey"), "{type_}");
    }
    let mut healthy: NixBuilderPool = serde_norway::from_str(include_str!("../../../examples/minimal.yaml")).unwrap();
    healthy.metadata.name = Some("healthy".into());
    pools.create(&Default::default(), &healthy).await.unwrap();
    let healthy = observed(&pools, "healthy").await;
    assert!(healthy.status.unwrap().host_public_key.is_some());

    // Fixing it resumes reconciling.
    let patch = serde_json::json!({"spec": {"nixConfig": null}});
    pools
        .patch("builders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(MIN, "replicas 5 after the fix", || async {
        (deployments.get("builders").await.ok()?.spec?.replicas == Some(5)).then_some(())
    })
    .await;
    let pool = observed(&pools, "builders").await;
    assert_ne!(condition(&pool, "Ready").reason, "InvalidSpec");
}

/// Issue 14, goal 6 (operator side): while a pool's spec is invalid, a key removed from a team
/// source still leaves the builders' authorized keys, within 10 s; nothing is added, and no other
/// child changes.
#[tokio::test]
async fn a_revocation_flows_while_the_spec_is_invalid_and_nothing_is_added() {
    let cp = control_plane();
    let ns = cp.namespace("revoke").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "team-keys.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let trusted = || async {
        let cm = config_maps.get("teams-authorized-keys").await.unwrap();
        cm.data.unwrap()[paths::AUTHORIZED_KEYS_FILE].clone()
    };
    observed(&pools, "teams").await;
    assert!(trusted().await.contains("bob@laptop"));

    let patch = serde_json::json!({"spec": {"replicas": 3, "nixConfig": {"trusted-users": "*"}}});
    pools
        .patch("teams", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    once_reason(&pools, "teams", "Stalled", "InvalidSpec").await;
    let before = deployments.get("teams").await.unwrap();

    // Bob's key leaves the team; Dave's joins. Only the removal may reach the builders.
    let alice = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice@laptop";
    let dave = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBtqZ2mhd1zVQ2b0mZ7oN5pX0y8rC1qWmQ3y6c2dE9fG dave@laptop";
    let patch = serde_json::json!({"data": {"keys": format!("{alice}\n{dave}\n")}});
    let sent = std::time::Instant::now();
    config_maps
        .patch("team-platform-keys", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let narrowed = eventually(
        Duration::from_secs(10),
        "bob's key gone from teams-authorized-keys",
        || async {
            let text = trusted().await;
            (!text.contains("bob@laptop")).then_some(text)
        },
    )
    .await;
    eprintln!("revocation with an invalid spec took {:?}", sent.elapsed());
    assert!(
        narrowed.contains("alice@laptop") && narrowed.contains("carol@laptop"),
        "{narrowed}"
    );
    assert!(
        !narrowed.contains("dave@laptop"),
        "an invalid spec added a key:\n{narrowed}"
    );
    // Still nothing added a moment later, and the status still says why nothing else moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(trusted().await, narrowed);
    let pool = pools.get("teams").await.unwrap();
    let stalled = condition(&pool, "Stalled");
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        stalled
            .message
            .contains("spec.nixConfig: this setting is set by nixpool"),
        "{}",
        stalled.message
    );
    let after = deployments.get("teams").await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(operator_fields(&after), operator_fields(&before));
    assert_eq!(after.spec.unwrap().replicas, Some(2));
    assert!(
        events_for(&client, &ns, "teams")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("KeysRevoked"))
    );

    // A valid spec again: what the sources give, Dave included, and the new replicas.
    let patch = serde_json::json!({"spec": {"nixConfig": null}});
    pools
        .patch("teams", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(MIN, "dave's key once the spec is valid", || async {
        trusted().await.contains("dave@laptop").then_some(())
    })
    .await;
    eventually(MIN, "replicas 3 once the spec is valid", || async {
        (deployments.get("teams").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
}

/// Issue 14, goal 6, for the deprecated team-key Secrets, which the operator may not watch: a key
/// removed from one leaves the builders' authorized keys within 10 s, with an invalid spec and
/// with a valid one (they are polled every 5 s).
#[tokio::test]
async fn a_revocation_from_a_deprecated_team_key_secret_flows_within_10_s() {
    let cp = control_plane();
    let ns = cp.namespace("revoke-secret").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    let erin = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 erin@laptop";
    let frank = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qB frank@laptop";
    let gus = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM0sK4zR4S0vLbV0qW8x2oYb1F0bJdQy8b4xGq8p0HqZ gus@laptop";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let team: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "team-keys", "labels": {"nixpool.dev/use": "true"}},
        "stringData": {"keys": format!("{erin}\n{frank}\n{gus}\n")}
    }))
    .unwrap();
    secrets.create(&Default::default(), &team).await.unwrap();
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let pool: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "old-style"},
        "spec": {"replicas": 0, "ssh": {"authorizedKeysSecrets": [{"name": "team-keys"}]}}
    }))
    .unwrap();
    pools.create(&Default::default(), &pool).await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let trusted = || async {
        let cm = config_maps.get_opt("old-style-authorized-keys").await.ok()??;
        Some(cm.data?.get(paths::AUTHORIZED_KEYS_FILE)?.clone())
    };
    eventually(MIN, "the Secret's three keys trusted", || async {
        let t = trusted().await?;
        (t.contains("erin@laptop") && t.contains("frank@laptop") && t.contains("gus@laptop")).then_some(())
    })
    .await;
    observed(&pools, "old-style").await;

    // With a valid spec, then with an invalid one: each removal must be gone within 10 s.
    let mut took = Vec::new();
    for (gone, left, invalid) in [
        ("gus@laptop", vec![erin, frank], false),
        ("frank@laptop", vec![erin], true),
    ] {
        if invalid {
            let patch = serde_json::json!({"spec": {"nixConfig": {"trusted-users": "*"}}});
            pools
                .patch("old-style", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            once_reason(&pools, "old-style", "Stalled", "InvalidSpec").await;
        }
        let patch = serde_json::json!({"stringData": {"keys": format!("{}\n", left.join("\n"))}});
        let sent = std::time::Instant::now();
        secrets
            .patch("team-keys", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let narrowed = eventually(
            Duration::from_secs(10),
            &format!("{gone} gone from the trusted keys"),
            || async {
                let t = trusted().await?;
                (!t.contains(gone)).then_some(t)
            },
        )
        .await;
        took.push((invalid, sent.elapsed()));
        assert!(narrowed.contains("erin@laptop"), "{narrowed}");
    }
    eprintln!("revocations from a deprecated team-key Secret (invalid spec?, time): {took:?}");
}

#[tokio::test]
async fn a_pool_scales_with_kubectl_and_deleting_it_garbage_collects_its_children() {
    let cp = control_plane();
    let ns = cp.namespace("gc").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "minimal.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    observed(&pools, "builders").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(deployments.get_opt("builders").await.unwrap().is_some());
    // The scale subresource: `kubectl scale` reaches the Deployment.
    run(cp.kubectl().args(["scale", "-n", &ns, "nbp/builders", "--replicas=3"]));
    eventually(MIN, "kubectl scale reaches the Deployment", || async {
        (deployments.get("builders").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    let scale = run(cp.kubectl().args([
        "get",
        "--raw",
        &format!("/apis/nixpool.dev/v1alpha1/namespaces/{ns}/nixbuilderpools/builders/scale"),
    ]));
    assert!(
        scale.contains("app.kubernetes.io/instance=builders"),
        "the scale subresource reports the pod selector: {scale}"
    );
    pools.delete("builders", &DeleteParams::background()).await.unwrap();
    eventually(MIN, "every child gone", || async {
        let gone = deployments.get_opt("builders").await.ok()?.is_none()
            && services.get_opt("builders").await.ok()?.is_none()
            && cms.get_opt("builders-config").await.ok()?.is_none()
            && secrets.get_opt("builders-host-key").await.ok()?.is_none()
            && cms.get_opt("builders-authorized-keys").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_new_pool_costs_one_write_per_child_and_one_status_write() {
    let cp = control_plane();
    let ns = cp.namespace("writes").await.unwrap();
    let client = cp.client().await.unwrap();
    let op = Operator::start(cp, &ns);
    // The example's 2 builders: their pods are created (no node runs them here), which the
    // Deployment controller reports; the status is written once, after that.
    run(cp
        .kubectl()
        .args(["apply", "-n", &ns, "-f"])
        .arg(format!("{REPO}/examples/minimal.yaml")));
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let pool = eventually(MIN, "the pool's status counts its 2 pods", || async {
        let p = pools.get("builders").await.ok()?;
        let st = p.status.as_ref()?;
        (st.replicas == 2 && st.observed_generation == p.metadata.generation).then_some(p)
    })
    .await;
    op.settle(Duration::from_secs(3)).await;

    let children = owned_children::<Secret>(&client, &ns, &pool).await
        + owned_children::<ConfigMap>(&client, &ns, &pool).await
        + owned_children::<Deployment>(&client, &ns, &pool).await
        + owned_children::<Service>(&client, &ns, &pool).await;
    // No PodDisruptionBudget: Kubernetes 1.20 serves no policy/v1, and the operator makes none there.
    assert!(children >= 5, "{children} children");
    let metrics = op.metrics().await;
    let status_writes = op
        .counter(
            "nixpool_operator_api_requests_total",
            "resource=\"nixbuilderpools/status\"",
        )
        .await;
    let event_writes = op
        .counter("nixpool_operator_api_requests_total", "resource=\"events\"")
        .await;
    // The status waits at most STATUS_WAIT (5 s) for the pods; a controller-manager slower
    // than that (a loaded machine) makes a second, real progress write.
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("builders")
        .await
        .unwrap();
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let created = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or_default()
    };
    let pods_after = pods
        .items
        .iter()
        .map(|p| created(&p.metadata))
        .max()
        .unwrap_or_default()
        - created(&deployment.metadata);
    assert_eq!(pods.items.len(), 2, "the Deployment controller created the 2 pods");
    if pods_after <= 3 {
        assert_eq!(
            status_writes,
            1.0,
            "the status is written once, after the Deployment controller created the pods ({pods_after} s after the Deployment):\n{metrics}\n{}",
            op.log_text()
        );
    } else {
        eprintln!(
            "NOTE: the pods came {pods_after} s after the Deployment (more than the status waits), so 2 status writes are allowed"
        );
        assert!(status_writes <= 2.0, "{status_writes} status writes:\n{metrics}");
    }
    assert_eq!(
        op.writes().await - event_writes - status_writes,
        children as f64,
        "one write per child ({children}):\n{metrics}"
    );
    assert_eq!(
        event_writes, 1.0,
        "one Event (Created) says what a new pool got:\n{metrics}"
    );
    let created = events_for(&client, &ns, "builders").await;
    assert!(
        created.iter().any(|e| e.reason.as_deref() == Some("Created")
            && e.note
                .as_deref()
                .is_some_and(|n| n.contains("host key ssh-ed25519 ") && n.contains("Deployment/builders"))),
        "{created:?}"
    );
    // Discovery at start-up (resource="other") is not the pool's.
    let reads = ["configmaps", "deployments", "services", "secrets"]
        .iter()
        .map(|r| {
            sum_counter(
                &metrics,
                "nixpool_operator_api_requests_total",
                &format!("verb=\"GET\",resource=\"{r}\""),
            )
        })
        .sum::<f64>();
    assert!(
        reads <= children as f64 - 1.0,
        "at most one read per child, none for the host-key Secret, which is created without one: {reads} reads:\n{metrics}"
    );
}

#[tokio::test]
async fn the_host_key_survives_reconciles_and_an_operator_restart_and_no_op_reconciles_send_no_request() {
    let cp = control_plane();
    let ns = cp.namespace("hostkey").await.unwrap();
    let client = cp.client().await.unwrap();
    let mut op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "minimal.yaml");
    // A pool with a gateway too: its ServiceAccount, Role and RoleBinding come from stores.
    apply_example(cp, &ns, "autoscaling.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    observed(&pools, "builders-on-demand").await;
    let first = observed(&pools, "builders").await;
    let key = first.status.as_ref().unwrap().host_public_key.clone().unwrap();
    let secret = secrets.get("builders-host-key").await.unwrap();

    // No-op reconciles: nudge the pool (an annotation does not change its spec) and count.
    op.settle(Duration::from_secs(2)).await;
    let writes = op.writes().await;
    let gets = op.gets().await;
    let reconciles = op.reconciles().await;
    assert!(writes > 0.0, "the operator's request counter must see its own writes");
    assert!(gets > 0.0, "the operator's request counter must see its own reads");
    for i in 0..3 {
        let patch = serde_json::json!({"metadata": {"annotations": {"test/nudge": i.to_string()}}});
        for name in ["builders", "builders-on-demand"] {
            pools
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        eventually(
            Duration::from_secs(20),
            "a reconcile of each pool after the nudge",
            || async { (op.reconciles().await >= reconciles + 2.0 * (i + 1) as f64).then_some(()) },
        )
        .await;
    }
    op.settle(Duration::from_secs(1)).await;
    assert_eq!(
        op.writes().await,
        writes,
        "a reconcile of an unchanged pool must not write:\n{}",
        op.metrics().await
    );
    assert_eq!(
        op.gets().await,
        gets,
        "a reconcile of an unchanged pool must read nothing from the API server (its children come from the watches' stores, its host key from memory):\n{}",
        op.metrics().await
    );

    // Restart the operator: same key, same Secret.
    op.kill();
    let op2 = Operator::start(cp, &ns);
    eventually(MIN, "the restarted operator reconciles", || async {
        (op2.reconciles().await >= 1.0).then_some(())
    })
    .await;
    op2.settle(Duration::from_secs(2)).await;
    let again = pools.get("builders").await.unwrap();
    assert_eq!(again.status.unwrap().host_public_key.unwrap(), key);
    let secret2 = secrets.get("builders-host-key").await.unwrap();
    assert_eq!(secret2.data, secret.data);
    assert_eq!(secret2.metadata.resource_version, secret.metadata.resource_version);
    assert_eq!(
        op2.writes().await,
        0.0,
        "a restarted operator must find everything in place:\n{}",
        op2.log_text()
    );
}

/// The operator replicas (by the identity in their user agent) that the API server's audit log
/// shows writing in `ns` (the log keeps writes to pools, their status, Events and Secrets).
fn writers(cp: &nixpool_testenv::ControlPlane, ns: &str) -> BTreeMap<String, usize> {
    let log = std::fs::read_to_string(cp.audit_log()).expect("the API server's audit log");
    let mut writers = BTreeMap::new();
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let agent = event["userAgent"].as_str().unwrap_or_default();
        if event["objectRef"]["namespace"] == ns
            && let Some(identity) = agent
                .strip_prefix("nixpool-operator/")
                .and_then(|a| a.split_once(" ("))
                .map(|(_, id)| id.trim_end_matches(')'))
        {
            *writers.entry(identity.to_string()).or_default() += 1;
        }
    }
    writers
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_frozen_leader_is_replaced_and_stops() {
    use nix::sys::signal::Signal;
    let cp = control_plane();
    let ns = cp.namespace("leader").await.unwrap();
    let client = cp.client().await.unwrap();
    let mut a = Operator::start_named(cp, &ns, "a");
    eventually(MIN, "replica a leads", || async {
        (a.counter("nixpool_operator_leader", "").await == 1.0).then_some(())
    })
    .await;
    let b = Operator::start_named(cp, &ns, "b");
    apply_example(cp, &ns, "minimal.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    observed(&pools, "builders").await;
    a.settle(Duration::from_secs(2)).await;
    eventually(MIN, "replica b stands by", || async {
        b.log_text()
            .contains("another replica leads; standing by")
            .then_some(())
    })
    .await;
    assert_eq!(b.reconciles().await, 0.0, "the standby must not reconcile");
    assert_eq!(b.writes().await, 0.0, "the standby must not write");
    assert_eq!(b.counter("nixpool_operator_leader", "").await, 0.0);
    let before = writers(cp, &ns);
    assert!(
        before.get("a").is_some_and(|&n| n > 0),
        "a's writes are in the audit log: {before:?}"
    );
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["a"],
        "only the leader writes: {before:?}"
    );

    // Frozen, a neither renews nor releases the Lease: b takes over once the record has not
    // changed for the lease's 15 s, as b's own clock measures it.
    a.signal(Signal::SIGSTOP);
    let frozen = std::time::Instant::now();
    eventually(Duration::from_secs(40), "replica b leads", || async {
        (b.counter("nixpool_operator_leader", "").await == 1.0).then_some(())
    })
    .await;
    assert!(
        frozen.elapsed() >= Duration::from_secs(12),
        "b took over {:?} after a froze, before a's last renewal (at most 2 s before) could expire",
        frozen.elapsed()
    );
    assert_eq!(
        b.log_text().matches("another replica leads; standing by").count(),
        1,
        "a standby says so once"
    );
    let frozen_writes = writers(cp, &ns).get("a").copied();
    let patch = serde_json::json!({"spec": {"replicas": 3}});
    pools
        .patch("builders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually(MIN, "the new leader applies replicas 3", || async {
        (deployments.get("builders").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    b.settle(Duration::from_secs(2)).await;

    // Resumed long past its deadline, a sees the pool's change but sends nothing: it exits
    // non-zero so that Kubernetes restarts it as a standby.
    a.signal(Signal::SIGCONT);
    let status = a
        .exit_status(Duration::from_secs(30))
        .expect("a resumed leader past its deadline exits");
    assert!(!status.success(), "{status}: {}", a.log_text());
    assert!(a.log_text().contains("lost leadership"), "{}", a.log_text());
    b.settle(Duration::from_secs(2)).await;
    let after = writers(cp, &ns);
    assert_eq!(
        after.get("a").copied(),
        frozen_writes,
        "a wrote after it was frozen: {after:?}\n{}",
        a.log_text()
    );
    assert!(
        after.get("b").is_some_and(|&n| n > 0),
        "b's writes are in the audit log: {after:?}"
    );
    assert_eq!(b.counter("nixpool_operator_leader", "").await, 1.0);
}

/// The Degraded condition's reason and message, once there is one.
fn degraded(pool: &NixBuilderPool) -> Option<(String, String)> {
    let c = pool.status.as_ref()?.condition("Degraded")?;
    (c.status == "True").then(|| (c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn an_object_under_a_childs_name_is_not_taken_over_and_outlives_the_pool() {
    let cp = control_plane();
    let ns = cp.namespace("taken").await.unwrap();
    let client = cp.client().await.unwrap();
    // Another team's ConfigMap under the name pool `builders` would give its config, and another
    // team's Secret under the name pool `second` would give its generated host key.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let theirs: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "builders-config"}, "data": {"owner": "another team"}
    }))
    .unwrap();
    cms.create(&Default::default(), &theirs).await.unwrap();
    let their_secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "second-host-key"}, "stringData": {"ssh_host_ed25519_key": "theirs"}
    }))
    .unwrap();
    secrets.create(&Default::default(), &their_secret).await.unwrap();

    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "minimal.yaml");
    let mut second: NixBuilderPool =
        serde_norway::from_str(&std::fs::read_to_string(format!("{REPO}/examples/minimal.yaml")).unwrap()).unwrap();
    second.metadata.name = Some("second".into());
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    pools.create(&Default::default(), &second).await.unwrap();
    for (pool, object) in [
        ("builders", "ConfigMap builders-config"),
        ("second", "Secret second-host-key"),
    ] {
        let (reason, message) = eventually(MIN, &format!("{pool} is Degraded naming {object}"), || async {
            degraded(&pools.get(pool).await.ok()?)
        })
        .await;
        assert_eq!(reason, "NameTaken", "{message}");
        assert!(
            message.contains(object) && message.contains("leaves it alone"),
            "{message}"
        );
    }
    let untouched = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.owner_references.as_ref().is_none_or(|o| o.is_empty())
    };
    let cm = cms.get("builders-config").await.unwrap();
    assert!(untouched(&cm.metadata), "{cm:?}");
    assert_eq!(cm.data.unwrap()["owner"], "another team");
    let s = secrets.get("second-host-key").await.unwrap();
    assert!(untouched(&s.metadata));
    assert_eq!(secret_text(&s, "ssh_host_ed25519_key"), "theirs");

    // Deleting the pools garbage-collects what they own, never what they found.
    for pool in ["builders", "second"] {
        pools.delete(pool, &DeleteParams::background()).await.unwrap();
    }
    eventually(MIN, "the pools' own children gone", || async {
        let gone = secrets.get_opt("builders-host-key").await.ok()?.is_none()
            && cms.get_opt("builders-authorized-keys").await.ok()?.is_none()
            && cms.get_opt("second-authorized-keys").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    assert!(cms.get_opt("builders-config").await.unwrap().is_some());
    assert!(secrets.get_opt("second-host-key").await.unwrap().is_some());
}

#[tokio::test]
async fn a_pool_uses_only_opted_in_key_sources_and_allowed_images() {
    let cp = control_plane();
    let ns = cp.namespace("optin").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    const ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice@laptop";
    const BOB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qB bob@laptop";
    const CAROL: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM0sK4zR4S0vLbV0qW8x2oYb1F0bJdQy8b4xGq8p0HqZ carol@laptop";
    let create_cm = serde_json::json!({"metadata": {"name": "unlabelled-keys"}, "data": {"keys": ALICE}});
    cms.create(&Default::default(), &serde_json::from_value(create_cm).unwrap())
        .await
        .unwrap();
    for (name, key, labelled) in [("old-team-keys", BOB, true), ("someone-elses", CAROL, false)] {
        let mut meta = serde_json::json!({"name": name});
        if labelled {
            meta["labels"] = serde_json::json!({"nixpool.dev/use": "true"});
        }
        let s = serde_json::json!({"metadata": meta, "stringData": {"keys": key}});
        secrets
            .create(&Default::default(), &serde_json::from_value(s).unwrap())
            .await
            .unwrap();
    }
    let pool: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "teams"},
        "spec": {"ssh": {
            "authorizedKeysConfigMaps": [{"name": "unlabelled-keys"}],
            "authorizedKeysSecrets": [{"name": "old-team-keys"}, {"name": "someone-elses"}]
        }}
    }))
    .unwrap();
    pools.create(&Default::default(), &pool).await.unwrap();

    // The labelled (deprecated) Secret is used; the unlabelled ConfigMap and Secret are not, and
    // the status names both with the command that opts them in.
    let refused = eventually(MIN, "Degraded NotOptedIn", || async {
        let p = pools.get("teams").await.ok()?;
        let found = p.status.as_ref()?.conditions.iter().any(|c| c.reason == "NotOptedIn");
        found.then_some(p)
    })
    .await;
    let msg = &condition(&refused, "Degraded").message;
    assert!(
        msg.contains(&format!(
            "kubectl label -n {ns} configmap/unlabelled-keys secret/someone-elses nixpool.dev/use=true"
        )),
        "{msg}"
    );
    let keys =
        || async { cms.get("teams-authorized-keys").await.unwrap().data.unwrap()[paths::AUTHORIZED_KEYS_FILE].clone() };
    let text = keys().await;
    assert!(text.contains("bob@laptop"), "{text}");
    assert!(
        !text.contains("alice@laptop") && !text.contains("carol@laptop"),
        "{text}"
    );

    // Labelling the ConfigMap opts it in: the label-selected watch brings it within seconds.
    let label = serde_json::json!({"metadata": {"labels": {"nixpool.dev/use": "true"}}});
    cms.patch("unlabelled-keys", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "alice's key once her ConfigMap opts in",
        || async { keys().await.contains("alice@laptop").then_some(()) },
    )
    .await;
    assert!(!keys().await.contains("carol@laptop"));

    // A cache token Secret without the label is not mounted, and its push is left out (the
    // builder starts, it just does not push there).
    let token =
        serde_json::json!({"metadata": {"name": "attic-token"}, "stringData": {"token": "not-opted-in-token-123"}});
    secrets
        .create(&Default::default(), &serde_json::from_value(token).unwrap())
        .await
        .unwrap();
    let pushing: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "pushing"},
        "spec": {"cache": {"attic": {"endpoint": "https://attic.example", "cache": "main", "push": true,
                                     "tokenSecret": {"name": "attic-token", "key": "token"}}}}
    }))
    .unwrap();
    pools.create(&Default::default(), &pushing).await.unwrap();
    let refused = eventually(MIN, "the cache Secret refused", || async {
        let p = pools.get("pushing").await.ok()?;
        let found = p.status.as_ref()?.conditions.iter().any(|c| c.reason == "NotOptedIn");
        found.then_some(p)
    })
    .await;
    assert!(condition(&refused, "Degraded").message.contains("secret/attic-token"));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = eventually(MIN, "the pushing pool's Deployment", || async {
        deployments.get("pushing").await.ok()
    })
    .await;
    let volumes = d.spec.unwrap().template.spec.unwrap().volumes.unwrap_or_default();
    assert!(
        volumes.iter().all(|v| v.name != "cache-secrets"),
        "an unlabelled cache Secret is mounted"
    );
    let config = cms.get("pushing-config").await.unwrap().data.unwrap()[paths::AGENT_CONFIG_KEY].clone();
    let config = nixpool_api::AgentConfig::from_json(&config).unwrap();
    assert!(config.push.is_empty(), "a push without its token: {:?}", config.push);
    assert!(config.problems().is_empty(), "{:?}", config.problems());

    // An image outside the operator's allowed prefixes is an invalid spec naming the field.
    let evil: NixBuilderPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "metadata": {"name": "miner"}, "spec": {"image": "evil.example/miner:1"}
    }))
    .unwrap();
    pools.create(&Default::default(), &evil).await.unwrap();
    let invalid = eventually(MIN, "the foreign image refused", || async {
        let p = pools.get("miner").await.ok()?;
        let found = p.status.as_ref()?.conditions.iter().any(|c| c.reason == "InvalidSpec");
        found.then_some(p)
    })
    .await;
    let msg = &condition(&invalid, "Ready").message;
    assert!(
        msg.contains("spec.image") && msg.contains("--allowed-image-prefix"),
        "{msg}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        deployments.get_opt("miner").await.unwrap().is_none(),
        "no pod runs the image"
    );
}

#[tokio::test]
async fn a_gateways_demand_scales_builders_up_at_once_and_down_when_idle_and_dropping_the_gateway_removes_it() {
    use nixpool_api::demand::{BuilderUse, GatewayReport};
    let cp = control_plane();
    let ns = cp.namespace("autoscale").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "autoscaling.yaml");
    let name = "builders-on-demand";
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pool = observed(&pools, name).await;
    let st = pool.status.clone().unwrap();
    assert_eq!(st.desired_replicas, Some(0));
    let builder_replicas = || async { deployments.get(name).await.ok().and_then(|d| d.spec?.replicas) };
    assert_eq!(builder_replicas().await, Some(0));
    let gateway = deployments.get(&format!("{name}-gateway")).await.unwrap();
    assert!(owned_by(&gateway.metadata, &pool));
    assert_eq!(gateway.spec.unwrap().replicas, Some(2));
    let svc = services.get(name).await.unwrap();
    assert_eq!(
        svc.spec.unwrap().selector.unwrap()[labels::NAME],
        labels::GATEWAY_NAME_VALUE
    );
    let keys = config_maps.get(&format!("{name}-authorized-keys")).await.unwrap();
    assert!(keys.data.unwrap()[paths::AUTHORIZED_KEYS_FILE].contains("nixpool-gateway"));

    // A gateway reports 5 sessions (3 waiting): 5 / maxJobs 2 = 3 builders, at once.
    let demand = format!("{name}-gateway-demand");
    let write = |report: GatewayReport| {
        let config_maps = config_maps.clone();
        let demand = demand.clone();
        async move {
            let body = serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": demand},
                "data": {"gw-0": serde_json::to_string(&report).unwrap()}
            });
            config_maps
                .patch(&demand, &PatchParams::apply("test-gateway-gw-0"), &Patch::Apply(&body))
                .await
                .unwrap();
        }
    };
    let now = jiff::Timestamp::now().as_second();
    write(GatewayReport {
        at: now,
        waiting: 3,
        active: 2,
        builders: Default::default(),
    })
    .await;
    eventually(MIN, "3 builders for 5 sessions", || async {
        (builder_replicas().await == Some(3)).then_some(())
    })
    .await;
    let scaled_up = eventually(MIN, "a ScaledUp Event", || async {
        events_for(&client, &ns, name)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ScaledUp"))
    })
    .await;
    assert!(
        scaled_up.note.as_deref().unwrap_or_default().contains("0 → 3"),
        "{scaled_up:?}"
    );
    assert_eq!(observed(&pools, name).await.status.unwrap().desired_replicas, Some(3));

    // Two of three builders idle for longer than idleSeconds (600), one still busy: down to 1.
    let long_ago = now - 3600;
    let idle = |used: u32| BuilderUse {
        used,
        idle_since: (used == 0).then_some(long_ago),
    };
    write(GatewayReport {
        at: now,
        waiting: 0,
        active: 1,
        builders: [("b-0", idle(1)), ("b-1", idle(0)), ("b-2", idle(0))]
            .into_iter()
            .map(|(n, u)| (n.to_string(), u))
            .collect(),
    })
    .await;
    eventually(MIN, "1 builder once 2 are idle", || async {
        (builder_replicas().await == Some(1)).then_some(())
    })
    .await;
    eventually(MIN, "a ScaledDown Event", || async {
        events_for(&client, &ns, name)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ScaledDown"))
    })
    .await;

    // Without autoscaling and gateway: the gateway goes, the Service points at the builders.
    let patch = serde_json::json!({"spec": {"autoscaling": null, "gateway": null, "replicas": 2}});
    pools
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(MIN, "the gateway removed", || async {
        let gone = deployments.get_opt(&format!("{name}-gateway")).await.ok()?.is_none()
            && config_maps.get_opt(&demand).await.ok()?.is_none();
        let selector = services.get(name).await.ok()?.spec?.selector?;
        (gone && selector[labels::NAME] == labels::NAME_VALUE && builder_replicas().await == Some(2)).then_some(())
    })
    .await;
    let st = observed(&pools, name).await.status.unwrap();
    assert_eq!(st.desired_replicas, None);
}

/// The operator's own managed-fields entries of an object: they change exactly when it writes.
fn operator_fields(o: &impl ResourceExt) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry> {
    o.managed_fields()
        .iter()
        .filter(|f| f.manager.as_deref() == Some(nixpool_api::FIELD_MANAGER))
        .cloned()
        .collect()
}

#[tokio::test]
async fn spec_pod_and_the_default_pull_secret_land_on_the_builder_pods_and_bad_ones_are_refused() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::node::v1::RuntimeClass;
    use k8s_openapi::api::scheduling::v1::PriorityClass;

    let cp = control_plane();
    let ns = cp.namespace("podspec").await.unwrap();
    let client = cp.client().await.unwrap();
    let _op = Operator::start_with(
        cp,
        &ns,
        "op",
        &["--resync-seconds", "3600", "--default-image-pull-secret", "regcred"],
    );
    // Cluster-wide classes, named after this test's namespace; the API server's admission
    // resolves a pod's priority from its class, so the pods show the class was taken.
    let priority = format!("{ns}-builders");
    let runtime = format!("{ns}-runtime");
    let priorities: Api<PriorityClass> = Api::all(client.clone());
    let runtimes: Api<RuntimeClass> = Api::all(client.clone());
    priorities
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": priority}, "value": 4242})).unwrap(),
        )
        .await
        .unwrap();
    runtimes
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": runtime}, "handler": "runc"})).unwrap(),
        )
        .await
        .unwrap();

    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pod_fields = serde_json::json!({
        "labels": {"team": "ci", "example.com/cost-center": "c42"},
        "annotations": {"karpenter.sh/do-not-disrupt": "true", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "priorityClassName": priority,
        "runtimeClassName": runtime,
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]
    });
    for (name, extra) in [
        ("fitted", serde_json::json!({"pod": pod_fields})),
        ("own-secret", serde_json::json!({"imagePullSecrets": [{"name": "own"}]})),
    ] {
        let mut spec = serde_json::json!({"ssh": {"authorizedKeys": [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice@laptop"
        ]}});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let pool: NixBuilderPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
            "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        pools.create(&Default::default(), &pool).await.unwrap();
    }

    let fitted = eventually(MIN, "the fitted pool's Deployment", || async {
        deployments.get("fitted").await.ok()
    })
    .await;
    let template = fitted.spec.unwrap().template;
    let meta = template.metadata.unwrap();
    let pod = template.spec.unwrap();
    let pod_labels = meta.labels.unwrap();
    assert_eq!(pod_labels["team"], "ci");
    assert_eq!(pod_labels["example.com/cost-center"], "c42");
    assert_eq!(pod_labels[labels::INSTANCE], "fitted");
    let annotations = meta.annotations.unwrap();
    assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
    assert_eq!(annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"], "false");
    assert!(annotations.contains_key(nixpool_api::annotations::CONFIG_HASH));
    assert_eq!(pod.priority_class_name.as_deref(), Some(priority.as_str()));
    assert_eq!(pod.runtime_class_name.as_deref(), Some(runtime.as_str()));
    let spread = pod.topology_spread_constraints.unwrap();
    assert_eq!(spread[0].topology_key, "topology.kubernetes.io/zone");
    assert_eq!(
        spread[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[labels::INSTANCE],
        "fitted",
        "the constraint counts this pool's builders"
    );
    let secrets: Vec<String> = pod.image_pull_secrets.into_iter().flatten().map(|s| s.name).collect();
    assert_eq!(secrets, ["regcred"], "a pool without pull secrets gets the operator's");

    let own = eventually(MIN, "the own-secret pool's Deployment", || async {
        deployments.get("own-secret").await.ok()
    })
    .await;
    let own_pod = own.spec.unwrap().template.spec.unwrap();
    let secrets: Vec<String> = own_pod
        .image_pull_secrets
        .into_iter()
        .flatten()
        .map(|s| s.name)
        .collect();
    assert_eq!(secrets, ["own"], "a pool's own pull secrets replace the operator's");
    assert_eq!(own_pod.priority_class_name, None);

    // The API server admits the pods: their priority comes from the class.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let admitted = eventually(MIN, "a builder pod of the fitted pool", || async {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/instance=fitted"))
            .await
            .ok()?;
        list.items.into_iter().next()
    })
    .await;
    assert_eq!(admitted.spec.as_ref().unwrap().priority, Some(4242));
    assert_eq!(admitted.labels()["team"], "ci");
    assert_eq!(admitted.annotations()["karpenter.sh/do-not-disrupt"], "true");

    // nixpool's own label, a bad label value and a bad class name (1.20 ignores the CRD's CEL,
    // so the server takes them): refused, each naming its field, and the Deployment untouched.
    observed(&pools, "fitted").await;
    let before = deployments.get("fitted").await.unwrap();
    let patch = serde_json::json!({"spec": {"pod": {
        "labels": {"app.kubernetes.io/instance": "other", "team": "c i"},
        "priorityClassName": "High"
    }}});
    pools
        .patch("fitted", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let pool = observed(&pools, "fitted").await;
    let ready = condition(&pool, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
    for expected in [
        "spec.pod.labels: app.kubernetes.io/name, app.kubernetes.io/instance",
        "remove them and use a label of your own",
        "spec.pod.labels: a label value is empty or at most 63",
        "spec.pod.priorityClassName: give the name of a PriorityClass",
    ] {
        assert!(
            ready.message.contains(expected),
            "{expected:?} not in {}",
            ready.message
        );
    }
    let after = deployments.get("fitted").await.unwrap();
    assert_eq!(
        operator_fields(&after),
        operator_fields(&before),
        "an invalid spec must not touch the Deployment"
    );

    priorities.delete(&priority, &DeleteParams::default()).await.unwrap();
    runtimes.delete(&runtime, &DeleteParams::default()).await.unwrap();
}

/// The pool once its `type_` condition has `reason` (within 2 minutes: a failing reconcile is
/// retried with a backoff that grows to tens of seconds by then).
async fn once_reason(pools: &Api<NixBuilderPool>, name: &str, type_: &str, reason: &str) -> NixBuilderPool {
    eventually(2 * MIN, &format!("{name}: {type_} {reason}"), || async {
        let p = pools.get(name).await.ok()?;
        let c = p.status.as_ref()?.condition(type_)?;
        (c.reason == reason).then_some(p)
    })
    .await
}

#[tokio::test]
async fn what_the_api_server_refuses_is_in_the_status_in_its_own_words_with_the_fix() {
    let cp = control_plane();
    let ns = cp.namespace("refused").await.unwrap();
    let client = cp.client().await.unwrap();
    // The real ResourceQuota admission: no Services, no pods in this namespace.
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tight"}, "spec": {"hard": {"pods": "0", "services": "0"}}
    }))
    .unwrap();
    quotas.create(&Default::default(), &quota).await.unwrap();
    // Until the quota controller has counted what the namespace uses, admission refuses
    // everything with "status unknown for quota"; the test wants the steady refusal.
    eventually(MIN, "the quota controller counts the namespace", || async {
        let q = quotas.get("tight").await.ok()?;
        q.status?.hard?.contains_key("services").then_some(())
    })
    .await;
    let _op = Operator::start(cp, &ns);
    apply_example(cp, &ns, "minimal.yaml");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);

    // The Service's apply is refused: the pool says so in the API server's words, not Rust's.
    let pool = once_reason(&pools, "builders", "Degraded", "ApplyFailed").await;
    let degraded = condition(&pool, "Degraded");
    assert_eq!(degraded.status, "True");
    assert!(
        degraded
            .message
            .starts_with(r#"applying Service builders: services "builders" is forbidden: exceeded quota: tight"#),
        "{}",
        degraded.message
    );
    for debug_text in ["ErrorResponse", "Status {", "Api(", "ApiError"] {
        assert!(!degraded.message.contains(debug_text), "{}", degraded.message);
    }
    for (type_, status) in [("Ready", "False"), ("Stalled", "True")] {
        let c = condition(&pool, type_);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, "ApplyFailed"),
            "{type_}"
        );
        assert_eq!(c.message, degraded.message, "{type_}");
    }
    assert_eq!(condition(&pool, "Reconciling").status, "False");
    run(cp.kubectl().args([
        "wait",
        "-n",
        &ns,
        "nbp/builders",
        "--for=condition=Stalled",
        "--timeout=5s",
    ]));

    // Services allowed, pods still not: the ReplicaSet's FailedCreate reaches the pool through
    // the Deployment's ReplicaFailure condition, with the quota's message and the fix.
    let patch = serde_json::json!({"spec": {"hard": {"services": null}}});
    quotas
        .patch("tight", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let pool = once_reason(&pools, "builders", "Degraded", "PodsRefused").await;
    for (type_, status) in [("Ready", "False"), ("Degraded", "True"), ("Stalled", "True")] {
        let c = condition(&pool, type_);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, "PodsRefused"),
            "{type_}"
        );
        assert!(
            c.message
                .starts_with("the API server refuses to create the pods of Deployment builders: pods ")
                && c.message.contains("is forbidden: exceeded quota: tight")
                && c.message.contains(&format!("kubectl describe resourcequota -n {ns}")),
            "{type_}: {}",
            c.message
        );
    }
    let table = run(cp.kubectl().args(["get", "-n", &ns, "nbp/builders"]));
    assert!(table.contains("PodsRefused"), "{table}");

    // The quota lifted (and the ReplicaSet woken by a scale, rather than its retry backoff):
    // pods are created, the pool is no longer stalled and waits for them to start.
    quotas.delete("tight", &DeleteParams::default()).await.unwrap();
    run(cp.kubectl().args(["scale", "-n", &ns, "nbp/builders", "--replicas=1"]));
    let pool = once_reason(&pools, "builders", "Ready", "NoReadyBuilders").await;
    assert_eq!(condition(&pool, "Stalled").status, "False");
    assert_eq!(condition(&pool, "Degraded").status, "False");
    assert_eq!(
        (
            condition(&pool, "Reconciling").status.as_str(),
            condition(&pool, "Reconciling").reason.as_str()
        ),
        ("True", "NoReadyBuilders")
    );
}
