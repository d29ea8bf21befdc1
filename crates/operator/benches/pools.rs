//! Benchmark: N pools (default 100, `NIXPOOL_BENCH_POOLS`) on a real control plane.
//!
//! `cargo bench -p nixpool-operator --bench pools` prints a Markdown table: time until every
//! pool has all its children and a status, API requests per pool while creating, API requests
//! per pool in a no-op resync (writes must be 0), the operator's peak RSS, how soon one more
//! pool's children exist, and, in the same run, one sequential `kubectl apply --server-side` of
//! the same children rendered by `nixpool-operator render`.
//!
//! `NIXPOOL_BENCH_REPLICAS` sets the pools' builders (default: the minimal example's 2; their
//! pods are created, none runs), `NIXPOOL_BENCH_RESYNC_SECONDS` the operator's resync (default
//! N/5 s, at least 20: creation must settle before the measured no-op resync), and
//! `NIXPOOL_BENCH_SKIP_RESYNC` skips that resync (and reads the counters at convergence),
//! `NIXPOOL_BENCH_SERVICE_TYPE` sets the pools' Service type (10,000 LoadBalancer pools do not fit
//! the default node-port range).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use nixpool_api::NixBuilderPool;
use nixpool_testenv::ControlPlane;

/// CPU seconds etcd, kube-apiserver and kube-controller-manager have used so far.
fn control_plane_cpu(cp: &ControlPlane) -> f64 {
    cp.cpu_seconds().iter().map(|(_, s)| s).sum()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: only run for real
    // when asked to bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: usize = std::env::var("NIXPOOL_BENCH_POOLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // Long enough that creation settles before the first resync (1000 pools: 200 s).
    let resync_seconds = std::env::var("NIXPOOL_BENCH_RESYNC_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((n as u64 / 5).max(20));
    // The example's 2 builders unless told otherwise (their pods are created, none runs).
    let replicas: Option<i32> = std::env::var("NIXPOOL_BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok());
    let cp = ControlPlane::start().expect("start the control plane");
    install_crd(&cp).expect("install the CRD");
    let ns = cp.namespace("bench").await.unwrap();
    let client = cp.client().await.unwrap();
    let op = Operator::start_with(&cp, &ns, "bench", &["--resync-seconds", &resync_seconds.to_string()]);
    eventually(Duration::from_secs(30), "the operator leads", || async {
        (op.counter("nixpool_operator_leader", "").await == 1.0).then_some(())
    })
    .await;

    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let mut template: NixBuilderPool = serde_norway::from_str(include_str!("../../../examples/minimal.yaml")).unwrap();
    if let Some(r) = replicas {
        template.spec.replicas = r;
    }
    // The example's LoadBalancer Service takes a node port: past about 2700 pools the default
    // range (30000-32767) is full, so 10,000 pools need ClusterIP.
    if let Ok(t) = std::env::var("NIXPOOL_BENCH_SERVICE_TYPE") {
        template.spec.service.type_ = serde_json::from_value(serde_json::Value::String(t))
            .expect("NIXPOOL_BENCH_SERVICE_TYPE: ClusterIP, NodePort or LoadBalancer");
    }
    let cpu_before = (op.cpu_seconds(), control_plane_cpu(&cp));
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        let creates = chunk.iter().map(|i| {
            let mut p = template.clone();
            p.metadata.name = Some(format!("pool-{i:04}"));
            let pools = pools.clone();
            async move { pools.create(&PostParams::default(), &p).await.unwrap() }
        });
        futures::future::join_all(creates).await;
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let managed = ListParams::default().labels(nixpool_api::labels::MANAGED_SELECTOR);
    // One watch, not polled lists: 1000 pools' lists every 200 ms would load the API server the
    // operator is measured on. The status is written after the children, so a pool with a status
    // for its generation has them; they are counted once below.
    let mut converged = std::collections::HashSet::new();
    let mut stream = std::pin::pin!(watcher(pools.clone(), watcher::Config::default()).applied_objects());
    tokio::time::timeout(Duration::from_secs(600), async {
        while converged.len() < n {
            let p = stream
                .try_next()
                .await
                .expect("watch the pools")
                .expect("the watch goes on");
            let done = p
                .status
                .as_ref()
                .is_some_and(|s| s.host_public_key.is_some() && s.observed_generation == p.metadata.generation);
            if done {
                converged.insert(p.metadata.name.clone());
            }
        }
    })
    .await
    .expect("every pool converged within 600 s");
    let converge = started.elapsed();
    let (operator_cpu, converge_control_plane_cpu) =
        (op.cpu_seconds() - cpu_before.0, control_plane_cpu(&cp) - cpu_before.1);
    assert_eq!(
        deployments.list(&managed).await.unwrap().items.len(),
        n,
        "a Deployment per pool"
    );
    assert_eq!(
        services.list(&managed).await.unwrap().items.len(),
        n,
        "a Service per pool"
    );
    assert_eq!(
        cms.list(&managed).await.unwrap().items.len(),
        2 * n,
        "2 ConfigMaps per pool"
    );
    assert_eq!(
        secrets.list(&managed).await.unwrap().items.len(),
        n,
        "a host-key Secret per pool"
    );
    // NIXPOOL_BENCH_SKIP_RESYNC skips the resync below (10,000 pools: it would wait out a long
    // resync), and the wait for quiet here too: at that size the controller-manager keeps
    // updating Deployments, each one more reconcile, for longer than any wait. The counters are
    // then read at convergence, without the writes that follow the Deployments' progress.
    let measure_resync = std::env::var_os("NIXPOOL_BENCH_SKIP_RESYNC").is_none();
    if measure_resync {
        op.settle(Duration::from_secs(2)).await;
    }
    let m = op.metrics().await;
    let verb = |m: &str, v: &str| sum_counter(m, "nixpool_operator_api_requests_total", &format!("verb=\"{v}\""));
    // Events are writes too; they are counted apart.
    let events = |m: &str| sum_counter(m, "nixpool_operator_api_requests_total", "resource=\"events\"");
    let create_total: f64 = ["GET", "LIST", "WATCH", "POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|v| verb(&m, v))
        .sum();
    let create_writes: f64 = ["POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|v| verb(&m, v))
        .sum::<f64>()
        - events(&m);
    let create_reads = verb(&m, "GET");
    let create_events = events(&m);

    // A no-op resync: every pool is reconciled again by the resync timer, nothing changed.
    let r0 = op.reconciles().await;
    let before = op.metrics().await;
    if measure_resync {
        eventually(Duration::from_secs(resync_seconds * 4), "a full resync", || async {
            let r = op.reconciles().await;
            (r >= r0 + n as f64).then_some(())
        })
        .await;
        op.settle(Duration::from_secs(2)).await;
    }
    let after = op.metrics().await;
    let resynced = op.reconciles().await - r0;
    let delta = |v: &str| verb(&after, v) - verb(&before, v);
    let resync_reads = delta("GET");
    let resync_lists = delta("LIST") + delta("WATCH");
    let resync_writes: f64 = ["POST", "PUT", "PATCH", "DELETE"].iter().map(|v| delta(v)).sum();
    let rss = op.peak_rss();

    // One more pool, with N already there: how soon do its children exist?
    let mut extra = template.clone();
    extra.metadata.name = Some("pool-extra".into());
    let asked = Instant::now();
    pools.create(&PostParams::default(), &extra).await.unwrap();
    let children_of_one = eventually(Duration::from_secs(60), "the extra pool's children", || async {
        let have = deployments.get_opt("pool-extra").await.ok()?.is_some()
            && services.get_opt("pool-extra").await.ok()?.is_some()
            && cms.get_opt("pool-extra-config").await.ok()?.is_some()
            && cms.get_opt("pool-extra-authorized-keys").await.ok()?.is_some()
            && secrets.get_opt("pool-extra-host-key").await.ok()?.is_some();
        have.then(|| asked.elapsed())
    })
    .await;

    // The same children, rendered by `nixpool-operator render` and applied by one client in
    // one sequential `kubectl apply --server-side`, into a namespace no operator watches.
    let by_hand = cp.namespace("bench-kubectl").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pools_file = dir.path().join("pools.yaml");
    let docs: Vec<String> = (0..n)
        .map(|i| {
            let mut p = template.clone();
            p.metadata.name = Some(format!("pool-{i:04}"));
            serde_norway::to_string(&p).unwrap()
        })
        .collect();
    std::fs::write(&pools_file, docs.join("---\n")).unwrap();
    let rendered = std::process::Command::new(OPERATOR)
        .args(["render", "--pdb=false", "-f"])
        .arg(&pools_file)
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let children_file = dir.path().join("children.yaml");
    let text = String::from_utf8(rendered.stdout)
        .unwrap()
        .replace("namespace: default", &format!("namespace: {by_hand}"));
    let objects = text.lines().filter(|l| l.starts_with("kind: ")).count();
    assert_eq!(objects, 5 * n, "render gives 5 children per pool");
    std::fs::write(&children_file, text).unwrap();
    let kubectl_cpu_before = control_plane_cpu(&cp);
    let applying = Instant::now();
    let applied = cp
        .kubectl()
        .args(["apply", "--server-side", "--field-manager=bench", "-f"])
        .arg(&children_file)
        .output()
        .unwrap();
    let kubectl_apply = applying.elapsed();
    let kubectl_control_plane_cpu = control_plane_cpu(&cp) - kubectl_cpu_before;
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    println!(
        "| Measure ({n} pools of {} builders, kube-apiserver 1.20 on loopback, 2 cores) | Value |",
        template.spec.replicas
    );
    println!("| --- | --- |");
    println!(
        "| Time until every pool has all children and a status | {:.1} s |",
        converge.as_secs_f64()
    );
    println!(
        "| API requests per pool while creating (all verbs) | {:.1} |",
        create_total / n as f64
    );
    println!(
        "| of which single-object reads (GET) per pool | {:.1} |",
        create_reads / n as f64
    );
    println!(
        "| of which writes per pool, Events apart (goal: at most the children + 1 status write) | {:.1} |",
        create_writes / n as f64
    );
    println!("| Events written per pool | {:.1} |", create_events / n as f64);
    if measure_resync {
        println!("| Reconciles in the measured no-op resync | {resynced} |");
        println!(
            "| API reads per pool per no-op reconcile | {:.1} |",
            resync_reads / resynced.max(1.0)
        );
        println!("| API writes in the no-op resync (must be 0) | {resync_writes} |");
        println!("| Lists and watches (re)started during the no-op resync, for all pools | {resync_lists} |");
    } else {
        println!("| No-op resync | not measured (NIXPOOL_BENCH_SKIP_RESYNC) |");
        println!("| Requests above | counted at convergence, without waiting for quiet (NIXPOOL_BENCH_SKIP_RESYNC) |");
    }
    println!(
        "| CPU while converging: control plane (etcd, kube-apiserver, kube-controller-manager) / operator | {converge_control_plane_cpu:.1} s / {operator_cpu:.1} s |"
    );
    println!("| CPU while kubectl applies: control plane | {kubectl_control_plane_cpu:.1} s |");
    println!("| Operator peak RSS | {:.1} MiB |", rss as f64 / (1024.0 * 1024.0));
    println!(
        "| One more pool with {n} there: its 5 children exist after | {} ms |",
        children_of_one.as_millis()
    );
    println!(
        "| One sequential `kubectl apply --server-side` of the same {} children (rendered) | {:.1} s |",
        5 * n,
        kubectl_apply.as_secs_f64()
    );
    println!(
        "| Ratio operator (all children and a status) / kubectl (children only) (goal ≤ 0.5) | {:.2} |",
        converge.as_secs_f64() / kubectl_apply.as_secs_f64()
    );
    assert_eq!(resync_writes, 0.0, "a no-op resync wrote to the API");
}
