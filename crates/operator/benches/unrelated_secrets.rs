//! Benchmark: the operator's memory does not grow with Secrets it was not told about.
//!
//! `cargo bench -p nixpool-operator --bench unrelated_secrets` runs 10 pools on a real control
//! plane. It measures the operator's peak RSS, then adds 1000 Secrets of 100 KiB each to the
//! pools' namespace (`NIXPOOL_BENCH_SECRETS`, `NIXPOOL_BENCH_SECRET_KIB`) and makes every pool
//! reconcile again. Then it measures again. Both sides are in the same run, and it prints a
//! Markdown table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use nixpool_api::NixBuilderPool;
use nixpool_testenv::ControlPlane;

const POOLS: usize = 10;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Row {
    rss_before: u64,
    rss_after: u64,
    /// A fresh operator process started with the Secrets already there (its first list of
    /// whatever it watches happens with them).
    rss_restarted: u64,
}

/// One operator (`binary`; `None`: this checkout's) over 10 pools in a namespace of its own,
/// before and after `n_secrets` Secrets of `kib` KiB land in that namespace.
async fn measure(cp: &ControlPlane, binary: Option<&std::path::Path>, n_secrets: usize, kib: usize) -> (Row, Duration) {
    let ns = cp.namespace("secrets").await.unwrap();
    let client = cp.client().await.unwrap();
    let args = ["--resync-seconds", "3600"];
    let start = |name: &str| match binary {
        Some(b) => Operator::start_in(b, cp, &ns, name, &args),
        None => Operator::start_with(cp, &ns, name, &args),
    };
    let mut op = start("bench");
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let template: NixBuilderPool = serde_norway::from_str(include_str!("../../../examples/minimal.yaml")).unwrap();
    for i in 0..POOLS {
        let mut p = template.clone();
        p.metadata.name = Some(format!("pool-{i:02}"));
        pools.create(&PostParams::default(), &p).await.unwrap();
    }
    for i in 0..POOLS {
        observed(&pools, &format!("pool-{i:02}")).await;
    }
    op.settle(Duration::from_secs(2)).await;
    let rss_before = op.peak_rss();
    let reconciles_before = op.reconciles().await;

    // Secrets no pool names, as other teams and tools keep them.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let payload = ByteString(vec![b'x'; kib * 1024]);
    let started = Instant::now();
    for chunk in (0..n_secrets).collect::<Vec<_>>().chunks(20) {
        let creates = chunk.iter().map(|i| {
            let s = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("unrelated-{i:05}")),
                    ..Default::default()
                },
                data: Some([("blob".to_string(), payload.clone())].into()),
                ..Default::default()
            };
            let secrets = secrets.clone();
            async move { secrets.create(&PostParams::default(), &s).await.unwrap() }
        });
        futures::future::join_all(creates).await;
    }
    let created_in = started.elapsed();
    // Every pool reconciles once more with the Secrets present.
    for i in 0..POOLS {
        let touch = serde_json::json!({"metadata": {"annotations": {"bench/touch": "1"}}});
        pools
            .patch(&format!("pool-{i:02}"), &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(60), "every pool reconciled again", || async {
        (op.reconciles().await >= reconciles_before + POOLS as f64).then_some(())
    })
    .await;
    op.settle(Duration::from_secs(3)).await;
    let rss_after = op.peak_rss();
    op.kill();
    let fresh = start("bench-restarted");
    eventually(
        Duration::from_secs(120),
        "the restarted operator reconciled every pool",
        || async { (fresh.reconciles().await >= POOLS as f64).then_some(()) },
    )
    .await;
    fresh.settle(Duration::from_secs(3)).await;
    (
        Row {
            rss_before,
            rss_after,
            rss_restarted: fresh.peak_rss(),
        },
        created_in,
    )
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n_secrets = env("NIXPOOL_BENCH_SECRETS", 1000);
    let kib = env("NIXPOOL_BENCH_SECRET_KIB", 100);
    // An older operator binary to compare with, in the same run (e.g. one built from a commit
    // that still watched Secrets).
    let baseline = std::env::var_os("NIXPOOL_BENCH_BASELINE_OPERATOR").map(std::path::PathBuf::from);
    let cp = ControlPlane::start().expect("start the control plane");
    install_crd(&cp).expect("install the CRD");
    let mut rows = vec![("this checkout".to_string(), measure(&cp, None, n_secrets, kib).await)];
    if let Some(b) = &baseline {
        rows.push((
            format!("baseline {}", b.display()),
            measure(&cp, Some(b), n_secrets, kib).await,
        ));
    }

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{POOLS} pools; then {n_secrets} unrelated Secrets × {kib} KiB = {:.0} MiB in the pools' namespace; kube-apiserver 1.20 on loopback, 2 cores\n",
        (n_secrets * kib) as f64 / 1024.0
    );
    println!(
        "| Operator | Peak RSS before | After (every pool reconciled again) | Restarted with the Secrets there | Secrets created in |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (name, (row, created_in)) in &rows {
        println!(
            "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s |",
            mib(row.rss_before),
            mib(row.rss_after),
            mib(row.rss_restarted),
            created_in.as_secs_f64()
        );
    }
}
