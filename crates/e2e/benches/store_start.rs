//! Benchmark of builder start against the size of the image's store (run as root):
//!
//! `cargo build --release --workspace --bins && cargo bench -p nixpool-e2e --bench store_start`
//! prints a Markdown table: the time from creating a builder pod to its agent answering
//! `/readyz` 200 and to the pod's Ready condition, on the real node, for the builder test image
//! with a small (10 MiB) and a big (500 MiB) filler of registered store paths in `/nix/store`,
//! each with `/nix` set up two ways, interleaved in the same run:
//! - `overlay` (the operator's pod as it is): the agent mounts the image's `/nix` under a
//!   writable overlay layer kept on the store volume;
//! - `copy` (what the operator made before): an init container copies the image's `/nix` into
//!   the store volume (`cp -a`), which the builder then mounts at `/nix`.
//!
//! The filler layers are made once and cached (`nixpool_testenv::store_filler`).
//! `NIXPOOL_BENCH_RUNS` (default 5) starts per row.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use nixpool_api::{NixBuilderPool, names, paths, ports};
use nixpool_testenv::flow::{ClientKey, binary, make_traversable, median, ms};
use nixpool_testenv::harness::*;
use nixpool_testenv::node::Node;
use nixpool_testenv::store_filler;

const SIZES: [(usize, &str); 2] = [(10, "10 MiB"), (500, "500 MiB")];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Design {
    Copy,
    Overlay,
}

impl Design {
    fn name(self) -> &'static str {
        match self {
            Design::Copy => "copy (init container `cp -a`, before)",
            Design::Overlay => "overlay (agent, now)",
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("NIXPOOL_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let cp = control_plane();
    let ns = cp.namespace("store").await.unwrap();
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
    let node = tokio::task::spawn_blocking(Node::shared).await.unwrap();

    // The images: the builder test image plus a filler layer of each size.
    let mut images = Vec::new();
    for (mib, _) in SIZES {
        let t = Instant::now();
        let filler = tokio::task::spawn_blocking(move || store_filler::filler(mib))
            .await
            .unwrap()
            .unwrap();
        let image = node
            .import_builder_variant(&format!("builder-store-{mib}m"), &filler.layer, &filler.sha256)
            .unwrap();
        eprintln!("store_start: {image} ready in {:?}", t.elapsed());
        images.push((image, filler.paths));
    }

    // A pool with no builder gives the pod template, its ConfigMaps and Secrets.
    let key = ClientKey::new(&dir, "client_ed25519").unwrap();
    let mut pool: NixBuilderPool =
        serde_norway::from_str(&std::fs::read_to_string(format!("{REPO}/examples/minimal.yaml")).unwrap()).unwrap();
    let name = "store".to_string();
    pool.metadata.name = Some(name.clone());
    pool.spec.replicas = 0;
    pool.spec.ssh.authorized_keys = vec![key.public.clone()];
    pool.spec.cache.nixos_cache = false;
    pool.spec.image = Some(node.builder_image().into());
    pool.spec.image_pull_policy = Some(nixpool_api::v1alpha1::ImagePullPolicy::Never);
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = eventually(Duration::from_secs(60), "the pool's Deployment", || async {
        deployments.get(&names::workload(&name)).await.ok()
    })
    .await;
    let template = deployment.spec.unwrap().template.spec.unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let designs = [Design::Copy, Design::Overlay];
    // (size index, design) -> (to agent ready, to pod Ready) per run.
    let mut results: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); SIZES.len() * designs.len()];
    for run in 0..runs {
        for (s, (image, store_paths)) in images.iter().enumerate() {
            for (d, design) in designs.iter().enumerate() {
                let pod_name = format!(
                    "start-{}-{}m-{run}",
                    if *design == Design::Copy { "copy" } else { "overlay" },
                    SIZES[s].0
                );
                let pod = Pod {
                    metadata: ObjectMeta {
                        name: Some(pod_name.clone()),
                        // Not the Deployment's labels: its ReplicaSet (0 replicas) would adopt it.
                        labels: Some([("nixpool.dev/bench".to_string(), "store-start".to_string())].into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(variant(&template, image, *design)),
                    ..Pod::default()
                };
                let timing = start(&pods, pod).await;
                eprintln!(
                    "store_start: {pod_name}: agent ready {}, pod Ready {}",
                    ms(timing.0),
                    ms(timing.1)
                );
                results[s * designs.len() + d].push(timing);
                if run == 0 {
                    check_store(node, &ns, &pod_name, store_paths, *design);
                }
                pods.delete(&pod_name, &DeleteParams::default()).await.unwrap();
                eventually(Duration::from_secs(60), "the pod to go", || async {
                    matches!(pods.get(&pod_name).await, Err(kube::Error::Api(e)) if e.code == 404).then_some(())
                })
                .await;
            }
        }
    }
    let _ = pools.delete(&name, &DeleteParams::default()).await;

    println!(
        "| store in the image | `/nix` set up by | create → agent `/readyz` 200, median (min–max) of {runs} | create → pod Ready, median (min–max) of {runs} |"
    );
    println!("| --- | --- | ---: | ---: |");
    let span = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        format!("{} ({}–{})", ms(median(v.clone())), ms(v[0]), ms(v[v.len() - 1]))
    };
    for (s, (_, size)) in SIZES.iter().enumerate() {
        for (d, design) in designs.iter().enumerate() {
            let r = &results[s * designs.len() + d];
            let agent: Vec<Duration> = r.iter().map(|t| t.0).collect();
            let ready: Vec<Duration> = r.iter().map(|t| t.1).collect();
            println!("| {size} | {} | {} | {} |", design.name(), span(&agent), span(&ready));
        }
    }
    for (d, design) in designs.iter().enumerate() {
        let med = |s: usize, f: fn(&(Duration, Duration)) -> Duration| {
            median(results[s * designs.len() + d].iter().map(f).collect()).as_secs_f64() * 1000.0
        };
        println!(
            "| 500 MiB − 10 MiB | {} | {:+.0} ms | {:+.0} ms |",
            design.name(),
            med(1, |t| t.0) - med(0, |t| t.0),
            med(1, |t| t.1) - med(0, |t| t.1)
        );
    }
}

/// The operator's pod template with `image`, as it is (`Overlay`) or as the operator made it
/// before (`Copy`: the store volume at `/nix`, seeded by an init container).
fn variant(template: &PodSpec, image: &str, design: Design) -> PodSpec {
    let mut spec = template.clone();
    let builder = &mut spec.containers[0];
    builder.image = Some(image.into());
    if design == Design::Copy {
        builder.command = Some(vec![paths::AGENT_BINARY.into(), "run".into()]);
        let store = builder
            .volume_mounts
            .iter_mut()
            .flatten()
            .find(|m| m.mount_path == paths::STORE_VOLUME)
            .expect("the store volume mount");
        store.mount_path = paths::STORE_MOUNT.into();
        let volume = store.name.clone();
        spec.init_containers = Some(vec![Container {
            name: "seed-store".into(),
            image: Some(image.into()),
            image_pull_policy: builder.image_pull_policy.clone(),
            command: Some(vec!["/bin/sh".into(), "-c".into(), "cp -a /nix/. /nix-volume/".into()]),
            resources: builder.resources.clone(),
            volume_mounts: Some(vec![VolumeMount {
                name: volume,
                mount_path: "/nix-volume".into(),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        }]);
    }
    spec
}

/// Creates the pod; returns the time to its agent's `/readyz` 200 (polled every 20 ms from
/// here) and to its Ready condition.
async fn start(pods: &Api<Pod>, pod: Pod) -> (Duration, Duration) {
    let name = pod.metadata.name.clone().unwrap();
    let t = Instant::now();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let (mut agent, mut ready) = (None, None);
    while agent.is_none() || ready.is_none() {
        let p = pods.get(&name).await.unwrap();
        let status = p.status.clone().unwrap_or_default();
        if agent.is_none()
            && let Some(ip) = status.pod_ip.as_deref()
            && readyz(ip)
        {
            agent = Some(t.elapsed());
        }
        let is_ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready.is_none() && is_ready {
            ready = Some(t.elapsed());
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "{name} did not become ready within 180 s: {:?}",
            status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (agent.unwrap(), ready.unwrap())
}

fn readyz(ip: &str) -> bool {
    let addr = format!("{ip}:{}", ports::AGENT_HEALTH);
    let Ok(addr) = addr.parse() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// The filler's paths are valid in the builder's store (its database came with the image), the
/// overlay was used where asked (the agent's log says so, and no fallback), and garbage
/// collection deletes a path of the image's store.
fn check_store(node: &Node, ns: &str, pod: &str, store_paths: &[String], design: Design) {
    let exec = |args: &[&str]| {
        let mut c = node.kubectl();
        c.args(["-n", ns, "exec", pod, "-c", "builder", "--"]).args(args);
        c
    };
    let mut validity = vec!["nix-store", "--check-validity"];
    validity.extend(store_paths.iter().map(String::as_str));
    run(&mut exec(&validity));
    if design == Design::Overlay {
        let logs = run(node.kubectl().args(["-n", ns, "logs", pod, "-c", "builder"]));
        assert!(
            logs.contains("nothing copied"),
            "{pod} did not mount the overlay:\n{logs}"
        );
        assert!(!logs.contains("falling back"), "{pod} fell back to a copy:\n{logs}");
        let victim = store_paths.last().unwrap();
        run(&mut exec(&["nix-store", "--delete", victim]));
        let fails = |args: &[&str]| {
            !exec(args)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success()
        };
        let gone = fails(&["test", "-e", victim]) && fails(&["nix-store", "--check-validity", victim]);
        assert!(gone, "{victim} is still in {pod}'s store after nix-store --delete");
    }
}
