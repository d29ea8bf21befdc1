//! Benchmark of the gateway on one machine (run as root):
//!
//! `cargo bench -p nixpool-e2e --bench gateway` prints a Markdown table:
//! - **first build from zero**: a pool with `autoscaling.minReplicas: 0` and no builder pod; a
//!   trivial `nix-build --max-jobs 0` through the gateway, timed from the build's start to its
//!   success (the session is held while the operator starts a builder). 5 times, each after the
//!   pool went back to zero builders, on a warm node (the image is imported).
//! - **warm path**: a trivial build through the gateway (load-balancer address, kube-proxy, a
//!   gateway pod, then the builder pod) against the same build straight to the builder pod's IP,
//!   alternating, in the same run: 20 of each.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use nixpool_api::{MachinesEntry, NixBuilderPool};
use nixpool_testenv::flow::{ClientKey, binary, make_traversable, median, ms, timed_build};
use nixpool_testenv::harness::*;
use nixpool_testenv::node::Node;

const FROM_ZERO: usize = 5;
const WARM: usize = 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let cp = control_plane();
    let ns = cp.namespace("gwbench").await.unwrap();
    let client = cp.client().await.unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    make_traversable(&dir).unwrap();
    let _operator = Operator::start_in(
        &binary("nixpool-operator").unwrap(),
        cp,
        &ns,
        "bench",
        &["--resync-seconds", "3600"],
    );
    let node = Node::shared();
    let key = ClientKey::new(&dir, "client_ed25519").unwrap();
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let builderctl = binary("builderctl").unwrap();
    let create = |name: &str, change: &dyn Fn(&mut NixBuilderPool)| {
        let mut pool: NixBuilderPool =
            serde_norway::from_str(&std::fs::read_to_string(format!("{REPO}/examples/minimal.yaml")).unwrap()).unwrap();
        pool.metadata.name = Some(name.into());
        pool.spec.max_jobs = 1;
        pool.spec.ssh.authorized_keys = vec![key.public.clone()];
        pool.spec.cache.nixos_cache = false;
        pool.spec.termination_grace_period_seconds = 30;
        pool.spec.image = Some(node.builder_image().into());
        pool.spec.image_pull_policy = Some(nixpool_api::v1alpha1::ImagePullPolicy::Never);
        change(&mut pool);
        pool
    };
    let machines_file = |name: &str| {
        let file = dir.join(format!("machines-{name}"));
        run(Command::new(&builderctl)
            .args(["machines-file", name, "-n", &ns, "--kubeconfig"])
            .arg(cp.kubeconfig())
            .arg("--machines-file")
            .arg(&file)
            .arg("--key")
            .arg(&key.path)
            .args(["--etc-static", "/nonexistent"]));
        file
    };
    let builder_pods = |pool: &str| {
        let pods = pods.clone();
        let selector = format!("app.kubernetes.io/name=nixpool-builder,app.kubernetes.io/instance={pool}");
        async move { pods.list(&ListParams::default().labels(&selector)).await.unwrap().items }
    };
    let ready = |name: &str| {
        let pools = pools.clone();
        let name = name.to_string();
        async move {
            eventually(Duration::from_secs(120), "pool Ready", || async {
                let p = pools.get(&name).await.ok()?;
                let st = p.status.as_ref()?;
                (st.is_ready() && st.machines_entry.is_some()).then_some(p)
            })
            .await
        }
    };

    // First build from zero builders.
    let zero = create("zero", &|p| {
        p.spec.autoscaling = Some(nixpool_api::v1alpha1::AutoscalingSpec {
            min_replicas: 0,
            max_replicas: 1,
            idle_seconds: 1,
        });
    });
    pools.create(&PostParams::default(), &zero).await.unwrap();
    ready("zero").await;
    let zero_machines = machines_file("zero");
    let mut from_zero = Vec::new();
    for i in 0..FROM_ZERO {
        eventually(Duration::from_secs(120), "no builder pod left", || async {
            builder_pods("zero").await.is_empty().then_some(())
        })
        .await;
        from_zero.push(timed_build(&zero_machines, &dir, &format!("zero-{i}")));
    }

    // Warm path: through the gateway against straight to the builder pod, alternating.
    let warm = create("warm", &|p| {
        p.spec.replicas = 1;
        p.spec.gateway = Some(Default::default());
    });
    pools.create(&PostParams::default(), &warm).await.unwrap();
    let warm_pool = ready("warm").await;
    let via_gateway = machines_file("warm");
    let pod = builder_pods("warm").await.remove(0);
    let direct_line = MachinesEntry {
        uri: MachinesEntry::ssh_ng_uri("builder", pod.status.unwrap().pod_ip.as_deref().unwrap(), 22),
        systems: vec!["x86_64-linux".into()],
        ssh_key: Some(key.path.display().to_string()),
        max_jobs: 1,
        speed_factor: 1,
        supported_features: vec![],
        mandatory_features: vec![],
        host_public_key: warm_pool.status.unwrap().host_public_key,
    };
    let direct = dir.join("machines-direct");
    std::fs::write(&direct, format!("{direct_line}\n")).unwrap();
    timed_build(&via_gateway, &dir, "warm-up-gateway");
    timed_build(&direct, &dir, "warm-up-direct");
    let mut through = Vec::new();
    let mut straight = Vec::new();
    for i in 0..WARM {
        through.push(timed_build(&via_gateway, &dir, &format!("gw-{i}")));
        straight.push(timed_build(&direct, &dir, &format!("direct-{i}")));
    }

    let worst = *from_zero.iter().max().unwrap();
    let (g, d) = (median(through), median(straight));
    println!(
        "| Measure (Kubernetes 1.20.2 control plane + real node: containerd, kubelet, kube-proxy; 2 cores; Nix 2.8 client) | Value |"
    );
    println!("| --- | --- |");
    println!(
        "| First build from zero builders (held at the gateway), median of {FROM_ZERO} | {} |",
        ms(median(from_zero))
    );
    println!(
        "| First build from zero builders, worst of {FROM_ZERO} | {} |",
        ms(worst)
    );
    println!("| Trivial build through the gateway, median of {WARM} | {} |", ms(g));
    println!(
        "| Same build straight to the builder pod, median of {WARM} | {} |",
        ms(d)
    );
    println!(
        "| Added by the gateway (difference of medians) | {:.0} ms |",
        (g.as_secs_f64() - d.as_secs_f64()) * 1000.0
    );
}
