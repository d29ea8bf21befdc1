//! Benchmark of the whole flow on one machine (run as root):
//!
//! `cargo bench -p nixpool-e2e --bench flow` prints a Markdown table: time from `kubectl apply`
//! to the pool Ready and to the first successful remote build (fresh pools on a warm node: the
//! builder image is already imported), and the latency of a trivial remote build through a pool
//! (operator-made config, the agent in a real pod, the load-balancer address through kube-proxy),
//! in turns with the same build straight to the builder pod's IP (the load-balancer hop apart),
//! against a builder configured by hand (plain sshd + nix-daemon in a network namespace),
//! measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use nixpool_api::{MachinesEntry, NixBuilderPool};
use nixpool_testenv::flow::{ClientKey, binary, make_traversable, median, ms, timed_build};
use nixpool_testenv::harness::*;
use nixpool_testenv::node::Node;

const FRESH_POOLS: usize = 5;
const BUILDS: usize = 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let cp = control_plane();
    let ns = cp.namespace("bench").await.unwrap();
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
    let builderctl = binary("builderctl").unwrap();

    let mut to_ready = Vec::new();
    let mut to_build = Vec::new();
    let mut last_machines = PathBuf::new();
    for i in 0..FRESH_POOLS {
        let name = format!("pool-{i}");
        let mut pool: NixBuilderPool =
            serde_norway::from_str(&std::fs::read_to_string(format!("{REPO}/examples/minimal.yaml")).unwrap()).unwrap();
        pool.metadata.name = Some(name.clone());
        pool.spec.replicas = 1;
        pool.spec.ssh.authorized_keys = vec![key.public.clone()];
        pool.spec.cache.nixos_cache = false;
        pool.spec.image = Some(node.builder_image().into());
        pool.spec.image_pull_policy = Some(nixpool_api::v1alpha1::ImagePullPolicy::Never);
        let t = Instant::now();
        pools.create(&PostParams::default(), &pool).await.unwrap();
        let ready = eventually(Duration::from_secs(120), "pool Ready", || async {
            let p = pools.get(&name).await.ok()?;
            p.status.as_ref()?.is_ready().then_some(p)
        })
        .await;
        to_ready.push(t.elapsed());
        let machines = dir.join(format!("machines-{i}"));
        run(Command::new(&builderctl)
            .args(["machines-file", &name, "-n", &ns, "--kubeconfig"])
            .arg(cp.kubeconfig())
            .arg("--machines-file")
            .arg(&machines)
            .arg("--key")
            .arg(&key.path)
            .args(["--etc-static", "/nonexistent"]));
        timed_build(&machines, &dir, &format!("first-{i}"));
        to_build.push(t.elapsed());
        let _ = ready;
        if i + 1 < FRESH_POOLS {
            pools.delete(&name, &DeleteParams::default()).await.unwrap();
        }
        last_machines = machines;
    }

    // Latency of a trivial build through the last pool (its Service address, through
    // kube-proxy), and, in turns, straight to its builder pod's IP: the load-balancer hop apart.
    let pool = pools.get(&format!("pool-{}", FRESH_POOLS - 1)).await.unwrap();
    let status = pool.status.clone().unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_ip = pods
        .list(&ListParams::default().labels(status.selector.as_deref().unwrap()))
        .await
        .unwrap()
        .items
        .into_iter()
        .find_map(|p| p.status?.pod_ip)
        .expect("the pool's builder pod has an IP");
    let direct_machines = machines_file(
        &dir.join("machines-direct"),
        MachinesEntry::ssh_ng_uri(&pool.spec.ssh.user, &pod_ip, nixpool_api::ports::SSH),
        &key.path,
        status.host_public_key.clone(),
    );
    let (mut through_pool, mut straight_to_pod) = (Vec::new(), Vec::new());
    for i in 0..BUILDS {
        through_pool.push(timed_build(&last_machines, &dir, &format!("pool-{i}")));
        straight_to_pod.push(timed_build(&direct_machines, &dir, &format!("direct-{i}")));
    }

    // The same builds on a builder configured by hand, in the same run.
    let hand = HandMadeBuilder::start(&dir.join("hand"), &key.public);
    let hand_machines = machines_file(
        &dir.join("machines-hand"),
        "ssh-ng://builder@10.150.0.2".into(),
        &key.path,
        Some(hand.host_public.clone()),
    );
    let by_hand: Vec<Duration> = (0..BUILDS)
        .map(|i| timed_build(&hand_machines, &dir, &format!("hand-{i}")))
        .collect();
    drop(hand);

    let (p, d, h) = (median(through_pool), median(straight_to_pod), median(by_hand));
    println!(
        "| Measure (Kubernetes 1.20.2 control plane + real node: containerd, kubelet, kube-proxy; 2 cores) | Value |"
    );
    println!("| --- | --- |");
    println!(
        "| `kubectl apply` to pool Ready, median of {FRESH_POOLS} fresh pools | {} |",
        ms(median(to_ready))
    );
    println!(
        "| `kubectl apply` to first successful remote build, median of {FRESH_POOLS} | {} |",
        ms(median(to_build))
    );
    println!(
        "| Trivial remote build through a pool, median of {BUILDS} | {} |",
        ms(p)
    );
    println!(
        "| Same build straight to the builder pod's IP (no Service, no kube-proxy), in turns with the above, median of {BUILDS} | {} |",
        ms(d)
    );
    println!(
        "| Load-balancer hop (difference of medians) | {:+.0} ms |",
        (p.as_secs_f64() - d.as_secs_f64()) * 1000.0
    );
    println!(
        "| Same build on a hand-configured sshd + nix-daemon builder, median of {BUILDS} | {} |",
        ms(h)
    );
    println!(
        "| Ratio pool / hand-configured (goal ≤ 1.05) | {:.2} |",
        p.as_secs_f64() / h.as_secs_f64()
    );
    println!(
        "| Ratio builder pod without the hop / hand-configured | {:.2} |",
        d.as_secs_f64() / h.as_secs_f64()
    );
}

/// A machines file of one x86_64-linux builder at `uri` (4 jobs, no features), for the builds
/// that bypass builderctl.
fn machines_file(path: &Path, uri: String, key: &Path, host_public_key: Option<String>) -> PathBuf {
    let line = MachinesEntry {
        uri,
        systems: vec!["x86_64-linux".into()],
        ssh_key: Some(key.display().to_string()),
        max_jobs: 4,
        speed_factor: 1,
        supported_features: vec![],
        mandatory_features: vec![],
        host_public_key,
    };
    std::fs::write(path, format!("{line}\n")).unwrap();
    path.to_path_buf()
}

/// A builder the way people make one by hand: a `builder` user in trusted-users, a plain
/// sshd_config, nix-daemon, in a network namespace at 10.150.0.2.
struct HandMadeBuilder {
    holder: std::process::Child,
    host_public: String,
}

impl HandMadeBuilder {
    fn start(dir: &Path, client_public: &str) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        let root = dir.join("root");
        for d in ["nix", "run", "var/empty"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        run(Command::new("cp").arg("-a").arg("/etc").arg(root.join("etc")));
        let etc = root.join("etc");
        let mut passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
        passwd.push_str("builder:x:1500:1500::/var/empty:/bin/sh\n");
        // Build users, as a hand-made builder's setup makes them (the host may have none).
        passwd.push_str("nixbld1:x:30001:30000::/var/empty:/bin/false\n");
        std::fs::write(etc.join("passwd"), passwd).unwrap();
        let mut group: String = std::fs::read_to_string(etc.join("group"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("nixbld:"))
            .map(|l| format!("{l}\n"))
            .collect();
        group.push_str("nixbld:x:30000:nixbld1\n");
        std::fs::write(etc.join("group"), group).unwrap();
        let mut shadow = std::fs::read_to_string(etc.join("shadow")).unwrap_or_default();
        shadow.push_str("builder:*:19000:0:99999:7:::\n");
        std::fs::write(etc.join("shadow"), shadow).unwrap();
        std::fs::create_dir_all(etc.join("nix")).unwrap();
        std::fs::write(
            etc.join("nix/nix.conf"),
            "build-users-group = nixbld\ntrusted-users = root builder\nsubstituters =\n",
        )
        .unwrap();
        let ssh = etc.join("ssh");
        std::fs::create_dir_all(ssh.join("authorized_keys")).unwrap();
        std::fs::write(ssh.join("authorized_keys/builder"), format!("{client_public}\n")).unwrap();
        let host_key = ssh.join("hand_host_ed25519_key");
        let _ = std::fs::remove_file(&host_key);
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key));
        let host_public = std::fs::read_to_string(host_key.with_extension("pub"))
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(
            ssh.join("hand_sshd_config"),
            "Port 22\nHostKey /etc/ssh/hand_host_ed25519_key\nAuthorizedKeysFile /etc/ssh/authorized_keys/%u\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile none\n",
        )
        .unwrap();
        let _ = Command::new("ip").args(["netns", "del", "nbp-hand"]).output();
        let _ = Command::new("ip").args(["link", "del", "nbhand0"]).output();
        run(Command::new("ip").args(["netns", "add", "nbp-hand"]));
        run(Command::new("ip").args(["link", "add", "nbhand0", "type", "veth", "peer", "name", "nbhand1"]));
        run(Command::new("ip").args(["link", "set", "nbhand1", "netns", "nbp-hand"]));
        run(Command::new("ip").args(["addr", "add", "10.150.0.1/30", "dev", "nbhand0"]));
        run(Command::new("ip").args(["link", "set", "nbhand0", "up"]));
        for args in [
            ["addr", "add", "10.150.0.2/30", "dev", "nbhand1"],
            ["link", "set", "nbhand1", "up", ""],
            ["link", "set", "lo", "up", ""],
        ] {
            let args: Vec<&str> = args.iter().copied().filter(|a| !a.is_empty()).collect();
            run(Command::new("ip").args(["netns", "exec", "nbp-hand", "ip"]).args(args));
        }
        let r = root.display();
        let script = format!(
            "set -e; mkdir -p /nix; mount --bind {r}/etc /etc; mount --bind {r}/nix /nix; mount --bind {r}/run /run; mkdir -p /run/sshd; \
             /usr/bin/nix-daemon & sleep 0.5; exec /usr/sbin/sshd -D -e -f /etc/ssh/hand_sshd_config"
        );
        let log = std::fs::File::create(dir.join("hand.log")).unwrap();
        let holder = Command::new("ip")
            .args([
                "netns",
                "exec",
                "nbp-hand",
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect_timeout(&"10.150.0.2:22".parse().unwrap(), Duration::from_millis(200))
            .is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the hand-made builder did not come up; see {}",
                dir.join("hand.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { holder, host_public }
    }
}

impl Drop for HandMadeBuilder {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("ip").args(["netns", "del", "nbp-hand"]).output();
        let _ = Command::new("ip").args(["link", "del", "nbhand0"]).output();
    }
}
