//! Issue 14, goal 2 (docs/reliability.md, section 2): control-plane faults while pools are
//! created, scaled and deleted. kube-apiserver restarted, etcd restarted (its data kept), a 30 s
//! apiserver outage: the same operator process recovers its watches and converges after each.
//! Then another field manager takes fields the operator owns on a pool's children: the operator
//! takes them back and no pool is wedged.
//!
//! This test binary has its control plane to itself (it stops and starts it), and one test.

mod common;
mod fleet;

use std::time::{Duration, Instant};

use common::*;
use fleet::Fleet;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use nixpool_api::{names, paths};

const POOLS: usize = 8;
/// The operator's watches back off up to 30 s (kube's default) while the API server is away, so
/// convergence may take that long after a fault; more means a wedged watch.
const CONVERGE: Duration = Duration::from_secs(90);

/// Two random changes to the fleet (they are seen only through the watches: the operator's
/// resync is an hour).
async fn changes(fleet: &mut Fleet) -> String {
    let mut done = Vec::new();
    for _ in 0..2 {
        done.push(fleet.change(POOLS - 1).await);
    }
    done.join(", ")
}

fn assert_same_process(op: &mut Operator, pid: u32, when: &str) {
    assert_eq!(
        op.exit_status(Duration::ZERO),
        None,
        "{when}: the operator exited; log:\n{}",
        op.log_text()
    );
    assert_eq!(op.pid(), pid, "{when}");
}

#[tokio::test]
async fn the_operator_rides_out_control_plane_restarts_an_outage_and_conflicts_without_a_restart() {
    let cp = control_plane();
    let ns = cp.namespace("faults").await.unwrap();
    let client = cp.client().await.unwrap();
    let seed = fleet::seed();
    let mut fleet = Fleet::new(&client, &ns, seed);
    // One replica without leader election: a leader that cannot renew its Lease for 10 s exits
    // on purpose (docs/operator.md, "Leader election"), and that restart is section 1's case.
    // Here the question is whether one process's watches recover.
    let mut op = Operator::start_with(cp, &ns, "op", &["--resync-seconds", "3600", "--leader-elect", "false"]);
    let pid = op.pid();
    for _ in 0..POOLS {
        fleet.create().await;
    }
    fleet.wait_converged(CONVERGE, "before the faults").await;

    let mut figures = Vec::new();
    for (fault, outage) in [
        ("kube-apiserver restarted", None),
        ("etcd restarted (data kept)", Some("etcd")),
        ("kube-apiserver away for 30 s", Some("kube-apiserver")),
    ] {
        let before = changes(&mut fleet).await;
        match outage {
            None => {
                cp.stop("kube-apiserver").unwrap();
                cp.start_again("kube-apiserver").unwrap();
            }
            Some("etcd") => {
                cp.stop("etcd").unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
                cp.start_again("etcd").unwrap();
                cp.wait_ready(Duration::from_secs(90)).unwrap();
            }
            Some(name) => {
                cp.stop(name).unwrap();
                tokio::time::sleep(Duration::from_secs(30)).await;
                cp.start_again(name).unwrap();
            }
        }
        let back = Instant::now();
        let after = changes(&mut fleet).await;
        let when = format!("{fault} (seed {seed}; before: [{before}], after: [{after}])");
        fleet.wait_converged(CONVERGE, &when).await;
        let took = back.elapsed();
        assert_same_process(&mut op, pid, &when);
        eprintln!(
            "{when}: converged {:.1} s after the API served again",
            took.as_secs_f64()
        );
        figures.push((fault, took));
    }

    // Another field manager takes fields the operator owns: a Deployment's replicas (forced
    // server-side apply) and a pool's authorized keys (an update, which also makes it the
    // owner). The operator takes both back.
    let pool = fleet.pools.list(&Default::default()).await.unwrap().items[0].clone();
    let name = pool.name_any();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let keys_name = names::authorized_keys(&name);
    let keys_before = config_maps.get(&keys_name).await.unwrap().data.unwrap()[paths::AUTHORIZED_KEYS_FILE].clone();
    let failures_before = op.counter("nixpool_operator_reconcile_failures_total", "").await;
    let taken = Instant::now();
    let intruder = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name}, "spec": {"replicas": 7},
    });
    deployments
        .patch(&name, &PatchParams::apply("intruder").force(), &Patch::Apply(&intruder))
        .await
        .unwrap();
    let mut cm = config_maps.get(&keys_name).await.unwrap();
    let mallory = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qM mallory";
    cm.data
        .as_mut()
        .unwrap()
        .insert(paths::AUTHORIZED_KEYS_FILE.into(), format!("{mallory}\n"));
    cm.metadata.managed_fields = None;
    config_maps
        .replace(
            &keys_name,
            &PostParams {
                field_manager: Some("intruder".into()),
                ..PostParams::default()
            },
            &cm,
        )
        .await
        .unwrap();
    fleet.wait_converged(CONVERGE, "after the conflicts").await;
    let keys_after = eventually(CONVERGE, "the pool's own authorized keys back", || async {
        let text = config_maps.get(&keys_name).await.ok()?.data?[paths::AUTHORIZED_KEYS_FILE].clone();
        (text == keys_before).then_some(text)
    })
    .await;
    let took_back = taken.elapsed();
    assert!(!keys_after.contains("mallory"));
    let replicas = deployments.get(&name).await.unwrap().spec.unwrap().replicas;
    assert_eq!(replicas, Some(pool.spec.replicas));
    assert_eq!(
        op.counter("nixpool_operator_reconcile_failures_total", "").await,
        failures_before,
        "a conflict made a reconcile fail"
    );
    assert_same_process(&mut op, pid, "after the conflicts");
    eprintln!(
        "another field manager's writes taken back in {:.1} s",
        took_back.as_secs_f64()
    );
    for (fault, took) in figures {
        eprintln!("{fault}: converged {:.1} s after", took.as_secs_f64());
    }
}
