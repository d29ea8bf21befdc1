//! A real Kubernetes node for the tests and the demo (test tooling, never part of the product):
//! Debian's containerd, runc and CNI plugins, and kubelet, kube-proxy and kube-scheduler built
//! from the same Debian `kubernetes` source package as the control plane.
//!
//! Layout on this machine, one node at a time (a lock file says so loudly):
//! - a Linux bridge `nixpool0` holding the node IP `10.244.0.1/16`. The CNI bridge plugin puts
//!   pods on it (`10.244.1.0`–`10.244.255.254`), the test load-balancer publisher hands out
//!   `10.244.0.16`–`10.244.0.254`, and the Service range is routed to it. An address that no rule
//!   rewrites ends on this port-less bridge: nothing a test sends leaves the machine.
//! - containerd and kubelet run in a PID and mount namespace of their own: when the test process
//!   dies, its init dies, and with it every shim, container and mount the node made.
//! - pods have a route to the Service range only (no default route). The `kubernetes` Service
//!   points at the node IP, where the test forwards to the API server's loopback listener, so a
//!   pod with a ServiceAccount token (the gateway) reaches the API as in any cluster.
//! - kube-proxy (iptables mode) rewrites Service ClusterIPs and load-balancer addresses to pod IPs
//!   in this machine's network namespace, so host processes (nix-build, ssh) reach pools as a
//!   user's laptop reaches a cluster.
//! - Images are imported, never pulled: the pause image (the control-plane build's static
//!   `pause`), and the builder test image, Debian trixie's Nix and OpenSSH
//!   (`hack/build-node-images.sh`) plus this checkout's `nixpool-agent` as `/bin/nixpool-agent`.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{
    ControlPlane, KUBE_PROXY_TOKEN, NODE_TOKEN, SCHEDULER_TOKEN, SERVICE_CIDR, cache_dir, free_port, need_tool,
};

/// The node's name (its kubelet's `--hostname-override`).
pub const NODE_NAME: &str = "nixpool-node";
/// The bridge that holds the node IP and the pods.
pub const BRIDGE: &str = "nixpool0";
/// The node's InternalIP: the bridge's address and the pods' gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The network of the bridge: node, load-balancer addresses and pods.
pub const NODE_NET: &str = "10.244.0.0/16";
/// The sandbox image containerd and kubelet use (kubelet 1.20's default name).
pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
/// The Debian suite and package list of the builder test image (keep in sync with
/// `hack/build-node-images.sh`, which keys its cache by them).
const BUILDER_SUITE: &str = "trixie";
/// Where the node lives: one node per machine, so one fixed place, emptied at each start.
const NODE_DIR: &str = "/var/tmp/nixpool-node";
const LOCK_FILE: &str = "/run/nixpool-test-node.lock";
/// Paths containerd and kubelet write whatever their configuration says: each gets a tmpfs of
/// the node's mount namespace, so nothing of a node outlives it...
const PRIVATE_DIRS: [&str; 4] = ["/run/containerd", "/run/netns", "/var/lib/cni", "/var/log/containers"];
/// ...but the pods' logs, kept in the control plane's directory for the suite's secret-leak
/// scan.
const POD_LOGS: &str = "/var/log/pods";

/// This checkout's binaries that go into the builder test image.
pub struct Binaries {
    pub agent: PathBuf,
    pub gateway: PathBuf,
}

impl Binaries {
    /// The workspace's debug builds (`cargo build --workspace --bins`).
    pub fn of_workspace() -> anyhow::Result<Binaries> {
        Ok(Binaries {
            agent: crate::flow::binary("nixpool-agent")?,
            gateway: crate::flow::binary("nixpool-gateway")?,
        })
    }
}

/// A running node. Everything it started stops when the test process ends.
pub struct Node {
    dir: PathBuf,
    builder_image: String,
    /// PID of the init of the node's PID and mount namespaces (where containerd runs).
    init: String,
    cp: &'static ControlPlane,
    _lock: std::fs::File,
}

impl Node {
    /// The node of this test binary's shared control plane, started on first use with the
    /// workspace's `nixpool-agent` and `nixpool-gateway` in its builder image.
    pub fn shared() -> &'static Node {
        static SHARED: std::sync::OnceLock<Node> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let ours = Binaries::of_workspace().unwrap_or_else(|e| panic!("{e:#}"));
            Node::start(crate::harness::control_plane(), &ours)
                .unwrap_or_else(|e| panic!("cannot start the test node: {e:#}"))
        })
    }

    /// Starts containerd, kubelet, kube-proxy and kube-scheduler for `cp`, imports the images,
    /// starts the test load-balancer publisher, and waits until the node is Ready.
    pub fn start(cp: &'static ControlPlane, ours: &Binaries) -> anyhow::Result<Node> {
        let started = Instant::now();
        preflight(cp)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)?;
        if lock.try_lock().is_err() {
            bail!(
                "another test node runs on this machine (it holds {LOCK_FILE}): one node at a time. \
                 Stop the other test run or `hack/demo.sh down`, then retry"
            );
        }
        let dir = PathBuf::from(NODE_DIR);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove the last node's {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("cni"))?;
        network()?;
        forward_api_server(cp)?;
        write_configs(cp, &dir)?;

        // The namespace holder: PID 1 of the node's PID namespace, in its mount namespace.
        let pod_logs = cp.dir().join("pod-logs");
        std::fs::create_dir_all(&pod_logs)?;
        let mut mounts: String = PRIVATE_DIRS
            .iter()
            .map(|d| format!("mkdir -p {d} && mount -t tmpfs -o mode=0755 nixpool-node {d} && "))
            .collect();
        mounts.push_str(&format!(
            "mkdir -p {POD_LOGS} && mount --bind {} {POD_LOGS} && ",
            pod_logs.display()
        ));
        for d in PRIVATE_DIRS.iter().chain([&POD_LOGS]) {
            std::fs::create_dir_all(d)?;
        }
        let ready_file = dir.join("namespace-ready");
        let mut holder = Command::new("unshare");
        holder
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--propagation",
                "private",
                "--mount-proc",
                "--",
            ])
            .args(["sh", "-c"])
            .arg(format!("{mounts}touch {} && exec sleep infinity", ready_file.display()));
        let unshare_pid = cp.spawn("node-namespace", holder)?;
        wait_for(Duration::from_secs(10), "the node's namespaces", || ready_file.exists())?;
        let init = std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))?
            .split_whitespace()
            .next()
            .context("the node's namespace holder has no child")?
            .to_string();
        let inside = |program: &Path| {
            let mut c = Command::new("nsenter");
            c.args(["--target", &init, "--mount", "--pid", "--"]).arg(program);
            c
        };

        let mut containerd = inside(Path::new("/usr/bin/containerd"));
        containerd.arg(format!("--config={}", dir.join("containerd.toml").display()));
        cp.spawn("containerd", containerd)?;
        let socket = dir.join("containerd.sock");
        let ctr = || {
            let mut c = inside(Path::new("/usr/bin/ctr"));
            c.arg(format!("--address={}", socket.display()))
                .args(["--namespace", "k8s.io"]);
            c
        };
        wait_for(Duration::from_secs(30), "containerd", || {
            ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;

        let images = dir.join("images");
        std::fs::create_dir_all(&images)?;
        let pause = pause_image(cp, &images)?;
        let builder_tag = builder_image_tag(ours)?;
        let builder = builder_image(&images, ours, &builder_tag)?;
        for archive in [&pause, &builder] {
            let out = ctr().args(["images", "import"]).arg(archive).output()?;
            if !out.status.success() {
                bail!(
                    "ctr images import {}: {}",
                    archive.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let _ = std::fs::remove_dir_all(&images);

        let bin = cp.bin_dir();
        let mut kubelet = inside(&bin.join("kubelet"));
        kubelet
            .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", dir.join("kubelet.kubeconfig").display()))
            .args(["--container-runtime=remote"])
            .arg(format!("--container-runtime-endpoint=unix://{}", socket.display()))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("kubelet-pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg(format!("--pod-infra-container-image={PAUSE_IMAGE}"))
            .arg("--v=1");
        cp.spawn("kubelet", kubelet)?;

        let mut proxy = Command::new(bin.join("kube-proxy"));
        proxy
            .arg(format!("--kubeconfig={}", dir.join("kube-proxy.kubeconfig").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .args(["--proxy-mode=iptables", "--iptables-min-sync-period=0s"])
            .arg(format!("--cluster-cidr={NODE_NET}"))
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
            .arg(format!("--healthz-bind-address=127.0.0.1:{}", free_port()))
            // Leave the machine's conntrack sysctls as they are (they are not the node's to set).
            .args([
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--v=1",
            ]);
        cp.spawn("kube-proxy", proxy)?;

        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler
            .arg(format!(
                "--kubeconfig={}",
                dir.join("kube-scheduler.kubeconfig").display()
            ))
            .args(["--leader-elect=false", "--port=0", "--secure-port=0", "--v=0"]);
        cp.spawn("kube-scheduler", scheduler)?;

        let node = Node {
            dir,
            builder_image: builder_tag,
            init,
            cp,
            _lock: lock,
        };
        node.wait_ready(cp, Duration::from_secs(120))?;
        crate::load_balancer::start(cp)?;
        tracing::info!(elapsed = ?started.elapsed(), "test node {NODE_NAME} is Ready");
        Ok(node)
    }

    /// The builder test image (`imagePullPolicy: Never`): Debian's Nix and OpenSSH plus this
    /// checkout's agent.
    pub fn builder_image(&self) -> &str {
        &self.builder_image
    }

    /// Imports a variant of the builder test image with one more layer on top (`layer`, a tar,
    /// and its sha256), tagged `nixpool.test/<name>:<the builder image's tag>`. For benches
    /// that need a bigger image, such as one with more in its `/nix/store`.
    pub fn import_builder_variant(&self, name: &str, layer: &Path, layer_sha: &str) -> anyhow::Result<String> {
        let ours = Binaries::of_workspace()?;
        let tag = self
            .builder_image
            .replace("nixpool.test/builder:", &format!("nixpool.test/{name}:"));
        let images = self.dir.join(format!("images-{name}"));
        let _ = std::fs::remove_dir_all(&images);
        std::fs::create_dir_all(&images)?;
        let (rootfs, rootfs_sha) = builder_rootfs()?;
        let agent_layer = agent_layer(&images, &ours)?;
        let agent_sha = sha256_file(&agent_layer)?;
        let archive = image_archive(
            &images,
            name,
            &tag,
            &[
                (&rootfs, rootfs_sha),
                (&agent_layer, agent_sha),
                (layer, layer_sha.to_string()),
            ],
            builder_config(),
        )?;
        let out = Command::new("nsenter")
            .args(["--target", &self.init, "--mount", "--pid", "--", "/usr/bin/ctr"])
            .arg(format!("--address={}", self.dir.join("containerd.sock").display()))
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(&archive)
            .output()?;
        let _ = std::fs::remove_dir_all(&images);
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(tag)
    }

    /// The node's working directory (configs; the control plane's directory has the logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// kubectl with the admin kubeconfig of the node's control plane.
    pub fn kubectl(&self) -> Command {
        self.cp.kubectl()
    }

    fn wait_ready(&self, cp: &ControlPlane, timeout: Duration) -> anyhow::Result<()> {
        let jsonpath = "--output=jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
        wait_for(timeout, "the node to be Ready", || {
            self.kubectl()
                .args(["get", "node", NODE_NAME, jsonpath])
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| o.stdout == b"True")
        })
        .with_context(|| format!("see kubelet.log and containerd.log in {}", cp.dir().display()))
    }
}

fn preflight(cp: &ControlPlane) -> anyhow::Result<()> {
    need_tool("containerd", "apt-get install containerd")?;
    need_tool("containerd-shim-runc-v2", "apt-get install containerd")?;
    need_tool("runc", "apt-get install runc")?;
    need_tool("iptables", "apt-get install iptables")?;
    need_tool("unshare", "apt-get install util-linux")?;
    need_tool("nsenter", "apt-get install util-linux")?;
    need_tool("ip", "apt-get install iproute2")?;
    need_tool("tar", "apt-get install tar")?;
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !Path::new("/usr/lib/cni").join(plugin).is_file() {
            bail!("/usr/lib/cni/{plugin} is missing: apt-get install containernetworking-plugins");
        }
    }
    for bin in ["kubelet", "kube-proxy", "kube-scheduler", "pause"] {
        if !cp.bin_dir().join(bin).is_file() {
            bail!(
                "{} is missing: the test node needs it. Build it once with `sudo hack/build-control-plane.sh`",
                cp.bin_dir().join(bin).display()
            );
        }
    }
    builder_rootfs()?;
    Ok(())
}

/// The API server listens on loopback; pods reach it at the node IP (the `kubernetes` Service's
/// endpoint, its `--advertise-address`). A thread per connection copies bytes both ways; TLS
/// stays end to end. It lives as long as the test process.
fn forward_api_server(cp: &ControlPlane) -> anyhow::Result<()> {
    use std::net::{TcpListener, TcpStream};
    let port = cp.port();
    let listener = TcpListener::bind((NODE_IP, port))
        .with_context(|| format!("listen on {NODE_IP}:{port} to forward the API server to pods"))?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            let (mut c1, mut s1) = (client, server);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c1, &mut s1);
                let _ = s1.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(())
}

/// The bridge, its address and the Service route. Idempotent: a killed run's bridge is replaced.
fn network() -> anyhow::Result<()> {
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip").args(args).output()?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    let _ = Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(Stdio::null())
        .status();
    ip(&["link", "add", BRIDGE, "type", "bridge"])
        .context("the test node needs a Linux bridge (kernel module `bridge`)")?;
    ip(&["addr", "add", &format!("{NODE_IP}/16"), "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    ip(&["route", "replace", SERVICE_CIDR, "dev", BRIDGE])?;
    Ok(())
}

fn write_configs(cp: &ControlPlane, dir: &Path) -> anyhow::Result<()> {
    let d = dir.display();
    std::fs::write(
        dir.join("containerd.toml"),
        format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE on these machines: runc must not lower a container's oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
        ),
    )?;
    std::fs::write(
        dir.join("cni/10-nixpool.conflist"),
        serde_json::to_string_pretty(&serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "nixpool-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": NODE_NET,
                            "rangeStart": "10.244.1.1",
                            "rangeEnd": "10.244.255.254",
                            "gateway": NODE_IP.to_string(),
                        }]],
                        // Pods reach Services (the API server's among them) through the node,
                        // and nothing else: there is no default route.
                        "routes": [{ "dst": SERVICE_CIDR }],
                        "dataDir": format!("{d}/cni-ipam"),
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        }))?,
    )?;
    std::fs::write(
        dir.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{NODE_IP}"
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
# These machines: cgroup v1 without systemd, swap allowed.
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
# The API server reaches this kubelet (logs, exec) without a client certificate.
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
resolvConf: /etc/resolv.conf
# How often kubelet re-syncs a pod, and so how soon a changed Secret reaches its volume
# (default 1m): shorter, so the key tests wait seconds rather than a minute.
syncFrequency: 10s
"#,
            port = free_port(),
            healthz = free_port()
        ),
    )?;
    for (file, token) in [
        ("kubelet.kubeconfig", NODE_TOKEN),
        ("kube-proxy.kubeconfig", KUBE_PROXY_TOKEN),
        ("kube-scheduler.kubeconfig", SCHEDULER_TOKEN),
    ] {
        std::fs::write(dir.join(file), cp.kubeconfig_yaml(token, "default"))?;
    }
    Ok(())
}

/// The cached root file system of the builder test image and its sha256.
fn builder_rootfs() -> anyhow::Result<(PathBuf, String)> {
    let prefix = format!("builder-image-{BUILDER_SUITE}-");
    let missing = || {
        anyhow::anyhow!(
            "the builder test image's root file system is missing from {}: build it once with \
             `sudo hack/build-node-images.sh`",
            cache_dir().display()
        )
    };
    let dir = std::fs::read_dir(cache_dir())
        .map_err(|_| missing())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .find(|p| p.join("builder-rootfs.tar.sha256").is_file())
        .ok_or_else(missing)?;
    let sha = std::fs::read_to_string(dir.join("builder-rootfs.tar.sha256"))?
        .trim()
        .to_string();
    Ok((dir.join("builder-rootfs.tar"), sha))
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!("sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// `nixpool.test/builder:<digest of the agent and gateway>`: a new build is a new image.
fn builder_image_tag(ours: &Binaries) -> anyhow::Result<String> {
    Ok(format!(
        "nixpool.test/builder:{}{}",
        &sha256_file(&ours.agent)?[..8],
        &sha256_file(&ours.gateway)?[..8]
    ))
}

/// A one-layer tar of `files` (path in the image, source, mode), with their parent directories.
fn layer(dir: &Path, name: &str, files: &[(&str, &Path, u32)]) -> anyhow::Result<PathBuf> {
    let stage = dir.join(format!("{name}-stage"));
    for (in_image, source, mode) in files {
        let target = stage.join(in_image);
        std::fs::create_dir_all(target.parent().unwrap())?;
        std::fs::copy(source, &target).with_context(|| format!("copy {}", source.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
    }
    let tar = dir.join(format!("{name}.tar"));
    let out = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&stage)
        .arg(".")
        .output()?;
    if !out.status.success() {
        bail!("tar: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(tar)
}

/// A `docker save`-style archive (what `ctr images import` reads) of `layers` under `tag`.
fn image_archive(
    dir: &Path,
    name: &str,
    tag: &str,
    layers: &[(&Path, String)],
    config: serde_json::Value,
) -> anyhow::Result<PathBuf> {
    let stage = dir.join(format!("{name}-image"));
    std::fs::create_dir_all(&stage)?;
    let mut names = Vec::new();
    for (i, (path, _)) in layers.iter().enumerate() {
        let n = format!("layer{i}.tar");
        // A symlink, followed by `tar -h`: a cached layer is read, never copied first.
        std::os::unix::fs::symlink(path, stage.join(&n))?;
        names.push(n);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|(_, sha)| format!("sha256:{sha}")).collect::<Vec<_>>(),
        },
    });
    std::fs::write(stage.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!([{ "Config": "config.json", "RepoTags": [tag], "Layers": names }]);
    std::fs::File::create(stage.join("manifest.json"))?.write_all(&serde_json::to_vec(&manifest)?)?;
    let archive = dir.join(format!("{name}-image.tar"));
    // Named members, not `.`: the manifest's names must match exactly (no `./`).
    let out = Command::new("tar")
        .arg("-chf")
        .arg(&archive)
        .arg("-C")
        .arg(&stage)
        .args(["manifest.json", "config.json"])
        .args(&names)
        .output()?;
    if !out.status.success() {
        bail!("tar: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(archive)
}

fn pause_image(cp: &ControlPlane, dir: &Path) -> anyhow::Result<PathBuf> {
    let layer = layer(dir, "pause", &[("pause", &cp.bin_dir().join("pause"), 0o755)])?;
    let sha = sha256_file(&layer)?;
    image_archive(
        dir,
        "pause",
        PAUSE_IMAGE,
        &[(&layer, sha)],
        serde_json::json!({ "Entrypoint": ["/pause"] }),
    )
}

/// The second layer of the builder test image: this checkout's agent and gateway.
fn agent_layer(dir: &Path, ours: &Binaries) -> anyhow::Result<PathBuf> {
    // In /usr/bin: trixie's /bin is a symlink to it, which a `bin/` directory in a layer would hide.
    layer(
        dir,
        "agent",
        &[
            ("usr/bin/nixpool-agent", &ours.agent, 0o755),
            ("usr/bin/nixpool-gateway", &ours.gateway, 0o755),
        ],
    )
}

fn builder_config() -> serde_json::Value {
    serde_json::json!({ "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] })
}

fn builder_image(dir: &Path, ours: &Binaries, tag: &str) -> anyhow::Result<PathBuf> {
    let (rootfs, rootfs_sha) = builder_rootfs()?;
    let agent_layer = agent_layer(dir, ours)?;
    let agent_sha = sha256_file(&agent_layer)?;
    image_archive(
        dir,
        "builder",
        tag,
        &[(&rootfs, rootfs_sha), (&agent_layer, agent_sha)],
        builder_config(),
    )
}

fn wait_for(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what} did not come up within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Stops what a killed node left (its processes, found by the node's directory in their command
/// line), and removes its bridge and directory. For `hack/demo.sh down`; tests need none of it.
pub fn down() -> anyhow::Result<()> {
    for entry in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmdline).contains(NODE_DIR) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    // The namespaces (and their mounts) go with their last process.
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(Stdio::null())
        .status();
    if Path::new(NODE_DIR).exists() {
        std::fs::remove_dir_all(NODE_DIR).with_context(|| format!("remove {NODE_DIR}"))?;
    }
    Ok(())
}
