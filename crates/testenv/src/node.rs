//! A node stand-in for tests and the demo only, never part of the product: it does for builder
//! pods what a kubelet and a cloud load balancer would, so the real operator, the real
//! Deployment/ReplicaSet/Endpoints/garbage-collection controllers and the real agent run a pool
//! end to end on one machine.
//!
//! For each builder pod of a namespace it materializes the pod's ConfigMap, Secret and projected
//! volumes as files (Secrets the kubelet way: a `..data` symlink swapped on change), runs the
//! pod's container command (the agent, from a local binary) in its own mount, PID and UTS
//! namespace and in a network namespace it creates (a veth pair, the pod IP inside), and patches
//! the pod's status (Running, Ready from the agent's `/readyz`, podIP) as a kubelet would. A pod
//! that goes away gets SIGTERM and its drain budget. For each LoadBalancer Service of a pool it
//! runs a TCP relay on an address inside a network namespace of its own and publishes that
//! address as the Service's load-balancer ingress, as a cloud provider would.
//!
//! Known differences from a real node: pods are not bound to a Node (the API server then
//! deletes them at once instead of gracefully; the stand-in still drains them), init containers
//! do not run (the host's Nix lives in /usr, so there is no image store to seed), and the image
//! is not pulled: the local agent binary stands in for it.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, Volume};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

/// What the stand-in needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Namespace whose builder pods and Services it serves.
    pub namespace: String,
    /// The local `nixpool-agent` that stands in for the image's `/bin/nixpool-agent`.
    pub agent: PathBuf,
    /// Extra arguments of `nixpool-agent run` (e.g. where sshd and nix-daemon are).
    pub agent_run_args: Vec<String>,
    /// Pod roots and logs go here.
    pub workdir: PathBuf,
    /// Second octet of the pod network `10.<net>.<pod>.0/30` and the LB network `10.<net+1>.0.0/16`.
    pub net: u8,
}

impl NodeConfig {
    pub fn new(namespace: &str, agent: &Path, workdir: &Path) -> Self {
        Self {
            namespace: namespace.into(),
            agent: agent.into(),
            agent_run_args: [
                "--sshd",
                "/usr/sbin/sshd",
                "--nix-daemon",
                "/usr/bin/nix-daemon",
                "--nix-store",
                "/usr/bin/nix-store",
                "--nix",
                "/usr/bin/nix",
            ]
            .map(String::from)
            .to_vec(),
            workdir: workdir.into(),
            net: 213,
        }
    }
}

/// sshd's StrictModes refuses an authorized-keys file below a directory that others can write
/// (like /tmp): make `dir` and its parents 0755 where they are not sticky-world-writable system
/// directories, and refuse when one is.
pub fn make_traversable(dir: &Path) -> anyhow::Result<()> {
    for d in dir.ancestors() {
        let meta = std::fs::metadata(d)?;
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            if mode & 0o1000 != 0 {
                bail!(
                    "{} is world-writable (like /tmp or /dev/shm): put pod roots elsewhere, sshd refuses keys below it",
                    d.display()
                );
            }
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode & !0o022))?;
        }
    }
    Ok(())
}

const BUILDER_SELECTOR: &str = "app.kubernetes.io/name=nixpool-builder";

/// One running pod.
struct PodRuntime {
    name: String,
    uid: String,
    ip: Ipv4Addr,
    netns: String,
    host_veth: String,
    root: PathBuf,
    holder: Child,
    started: jiff::Timestamp,
    ready: Option<bool>,
    /// Set once the pod is gone or deleting: the agent got SIGTERM at this time.
    draining: Option<(Instant, Duration)>,
    volumes: Vec<Volume>,
    mounts: Vec<(String, String)>,
}

/// The stand-in. `run` loops until the future given to it resolves, then stops every pod.
pub struct Node {
    config: NodeConfig,
    client: kube::Client,
    pods: HashMap<String, PodRuntime>,
    next_index: u32,
    lb: Option<LoadBalancers>,
}

impl Node {
    pub fn new(client: kube::Client, config: NodeConfig) -> anyhow::Result<Self> {
        for tool in ["ip", "unshare", "mount"] {
            crate::need_tool(tool, "apt-get install iproute2 util-linux")?;
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the node stand-in needs root (network namespaces, bind mounts)");
        }
        if !config.agent.is_file() {
            bail!(
                "{} is missing; build it with cargo build -p nixpool-agent",
                config.agent.display()
            );
        }
        std::fs::create_dir_all(&config.workdir)?;
        // sshd's StrictModes checks every directory up to the authorized-keys file.
        std::fs::set_permissions(&config.workdir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            config,
            client,
            pods: HashMap::new(),
            next_index: 1,
            lb: None,
        })
    }

    /// Serves pods until `stop` resolves, then drains and removes every pod and relay.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %format!("{e:#}"), "node sync failed; retrying");
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
        self.shutdown().await;
        Ok(())
    }

    async fn sync(&mut self) -> anyhow::Result<()> {
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let pods = pods_api
            .list(&ListParams::default().labels(BUILDER_SELECTOR))
            .await?
            .items;
        let live: HashMap<String, &Pod> = pods.iter().filter_map(|p| Some((p.metadata.uid.clone()?, p))).collect();

        // Start new pods.
        for pod in &pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_none() && !self.pods.contains_key(&uid) {
                match self.start_pod(pod).await {
                    Ok(rt) => {
                        tracing::info!(pod = %rt.name, ip = %rt.ip, "started");
                        self.pods.insert(uid, rt);
                    }
                    Err(e) => tracing::warn!(pod = ?pod.metadata.name, error = %format!("{e:#}"), "cannot start pod"),
                }
            }
        }

        // Drain pods that are gone or deleting; refresh volumes and readiness of the others.
        let mut finished = Vec::new();
        for (uid, rt) in self.pods.iter_mut() {
            let pod = live.get(uid);
            let deleting = pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some());
            if deleting && rt.draining.is_none() {
                let grace = pod
                    .and_then(|p| p.spec.as_ref()?.termination_grace_period_seconds)
                    .map(|s| Duration::from_secs(s.max(0) as u64))
                    .unwrap_or(Duration::from_secs(3600));
                tracing::info!(pod = %rt.name, "pod deleted: SIGTERM, draining");
                signal_agent(rt, nix::sys::signal::Signal::SIGTERM);
                rt.draining = Some((Instant::now(), grace));
            }
            if let Some((since, grace)) = rt.draining {
                let exited = rt.holder.try_wait()?.is_some();
                if exited || since.elapsed() > grace {
                    if !exited {
                        tracing::warn!(pod = %rt.name, "drain budget spent: SIGKILL");
                    }
                    finished.push(uid.clone());
                }
                continue;
            }
            if let Some(status) = rt.holder.try_wait()? {
                tracing::warn!(pod = %rt.name, %status, "the agent exited; the pod fails");
                finished.push(uid.clone());
                continue;
            }
            if let Err(e) = materialize(&self.client, &self.config.namespace, &rt.root, &rt.volumes, &rt.mounts).await {
                tracing::warn!(pod = %rt.name, error = %format!("{e:#}"), "cannot refresh volumes");
            }
            let ready = http_ok(SocketAddr::from((rt.ip, nixpool_api::ports::AGENT_HEALTH)), "/readyz").await;
            if rt.ready != Some(ready) {
                patch_status(&pods_api, rt, ready).await?;
                rt.ready = Some(ready);
            }
        }
        for uid in finished {
            if let Some(mut rt) = self.pods.remove(&uid) {
                teardown(&mut rt);
                // A failed pod is deleted so that its ReplicaSet makes a new one.
                if live.contains_key(&uid) {
                    let _ = pods_api
                        .delete(
                            &rt.name,
                            &DeleteParams {
                                grace_period_seconds: Some(0),
                                ..Default::default()
                            },
                        )
                        .await;
                }
            }
        }

        // Load balancers for the pools' LoadBalancer Services.
        let backends: Vec<(BTreeMap<String, String>, Ipv4Addr)> = self
            .pods
            .values()
            .filter(|rt| rt.ready == Some(true) && rt.draining.is_none())
            .filter_map(|rt| {
                let p = live.get(&rt.uid)?;
                Some((p.metadata.labels.clone().unwrap_or_default(), rt.ip))
            })
            .collect();
        self.sync_load_balancers(&backends).await
    }

    async fn start_pod(&mut self, pod: &Pod) -> anyhow::Result<PodRuntime> {
        let name = pod.metadata.name.clone().context("pod without a name")?;
        let uid = pod.metadata.uid.clone().context("pod without a uid")?;
        let spec = pod.spec.as_ref().context("pod without a spec")?;
        let container = spec.containers.first().context("pod without containers")?;
        let index = self.next_index;
        self.next_index += 1;
        let net = self.config.net;
        let (host_ip, ip) = (
            Ipv4Addr::new(10, net, index as u8, 1),
            Ipv4Addr::new(10, net, index as u8, 2),
        );
        let netns = format!("nbp-{net}-{index}");
        let host_veth = format!("nbh{net}x{index}");
        let pod_veth = format!("nbp{net}x{index}");

        let dir = self.config.workdir.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        for d in ["nix", "run", "dev", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        run(Command::new("cp").arg("-a").arg("/etc").arg(root.join("etc")))?;
        let _ = std::fs::remove_dir_all(root.join("etc/nixpool"));
        // No cluster DNS here: fail name lookups at once instead of timing out.
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 127.0.0.1\n")?;

        let mounts: Vec<(String, String)> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect();
        let volumes = spec.volumes.clone().unwrap_or_default();
        materialize(&self.client, &self.config.namespace, &root, &volumes, &mounts).await?;

        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_veth]).output();
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        run(Command::new("ip").args(["link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth]))?;
        run(Command::new("ip").args(["link", "set", &pod_veth, "netns", &netns]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth]))?;
        run(Command::new("ip").args(["link", "set", &host_veth, "up"]))?;
        for args in [
            vec!["addr", "add", &format!("{ip}/30"), "dev", &pod_veth],
            vec!["link", "set", &pod_veth, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            run(Command::new("ip").args(["netns", "exec", &netns, "ip"]).args(args))?;
        }

        // The container command, with the local agent for the image's binary.
        let mut command: Vec<String> = container.command.clone().unwrap_or_default();
        command.extend(container.args.clone().unwrap_or_default());
        if command.first().map(String::as_str) != Some(nixpool_api::paths::AGENT_BINARY) {
            bail!(
                "the builder container runs {command:?}, not {}",
                nixpool_api::paths::AGENT_BINARY
            );
        }
        let sub = command.get(1).cloned().unwrap_or_else(|| "run".into());
        let mut agent = vec![
            self.config.agent.display().to_string(),
            "--root".into(),
            root.display().to_string(),
            sub,
        ];
        agent.extend(command.iter().skip(2).cloned());
        agent.extend(self.config.agent_run_args.iter().cloned());
        let r = root.display();
        let script = format!(
            "set -e; mount --bind {r}/etc /etc; mount --bind {r}/nix /nix; mount --bind {r}/run /run; hostname {name}; exec {}",
            agent.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
        );
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let holder = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start the pod's agent")?;
        Ok(PodRuntime {
            name,
            uid,
            ip,
            netns,
            host_veth,
            root,
            holder,
            started: jiff::Timestamp::now(),
            ready: None,
            draining: None,
            volumes,
            mounts,
        })
    }

    async fn sync_load_balancers(&mut self, backends: &[(BTreeMap<String, String>, Ipv4Addr)]) -> anyhow::Result<()> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let list = services
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=nixpool-operator"))
            .await?
            .items;
        let wanted: Vec<&Service> = list
            .iter()
            .filter(|s| s.spec.as_ref().and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer"))
            .collect();
        let names: Vec<String> = wanted.iter().filter_map(|s| s.metadata.name.clone()).collect();
        if let Some(lb) = self.lb.as_mut() {
            lb.retain(&names);
        }
        if wanted.is_empty() {
            return Ok(());
        }
        if self.lb.is_none() {
            self.lb = Some(LoadBalancers::new(self.config.net.wrapping_add(1))?);
        }
        let lb = self.lb.as_mut().expect("created above");
        for svc in wanted {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let spec = svc.spec.as_ref().expect("filtered on spec");
            let port = spec.ports.iter().flatten().next().map(|p| p.port as u16).unwrap_or(22);
            let selector = spec.selector.clone().unwrap_or_default();
            let ips: Vec<SocketAddr> = backends
                .iter()
                .filter(|(labels, _)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
                .map(|(_, ip)| SocketAddr::from((*ip, nixpool_api::ports::SSH)))
                .collect();
            let address = lb.ensure(&name, port, ips)?;
            let published = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref()?.first()?.ip.clone());
            if published.as_deref() != Some(&address.ip().to_string()) {
                let body =
                    serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": address.ip().to_string()}]}}});
                services
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
                tracing::info!(service = %name, %address, "published the load balancer");
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        for rt in self.pods.values_mut() {
            signal_agent(rt, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for rt in self.pods.values_mut() {
            while Instant::now() < deadline && matches!(rt.holder.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            teardown(rt);
        }
        self.pods.clear();
        // Dropping the load balancers removes their relays and namespace.
        self.lb = None;
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The agent is the child of `unshare --fork` (the holder).
fn signal_agent(rt: &PodRuntime, sig: nix::sys::signal::Signal) {
    let holder = rt.holder.id();
    let children = std::fs::read_to_string(format!("/proc/{holder}/task/{holder}/children")).unwrap_or_default();
    if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

fn teardown(rt: &mut PodRuntime) {
    // --kill-child: killing unshare kills the pod's PID namespace.
    let _ = rt.holder.kill();
    let _ = rt.holder.wait();
    let _ = Command::new("ip").args(["netns", "del", &rt.netns]).output();
    let _ = Command::new("ip").args(["link", "del", &rt.host_veth]).output();
    tracing::info!(pod = %rt.name, "stopped");
}

/// A node dropped without `run` finishing (a panicking test) still removes its pods' processes
/// and namespaces.
impl Drop for PodRuntime {
    fn drop(&mut self) {
        if matches!(self.holder.try_wait(), Ok(None)) {
            teardown(self);
        }
    }
}

async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf);
        Some(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn patch_status(pods: &Api<Pod>, rt: &PodRuntime, ready: bool) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now().to_string();
    let started = rt.started.to_string();
    let r = if ready { "True" } else { "False" };
    let body = serde_json::json!({"status": {
        "phase": "Running", "podIP": rt.ip.to_string(), "podIPs": [{"ip": rt.ip.to_string()}],
        "hostIP": "127.0.0.1", "startTime": started,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
            {"type": "Initialized", "status": "True", "lastTransitionTime": started},
            {"type": "ContainersReady", "status": r, "lastTransitionTime": now},
            {"type": "Ready", "status": r, "lastTransitionTime": now}
        ],
        "containerStatuses": [{"name": "builder", "ready": ready, "restartCount": 0, "started": true,
            "image": "nixpool-builder", "imageID": "", "state": {"running": {"startedAt": started}}}]
    }});
    pods.patch_status(&rt.name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    tracing::info!(pod = %rt.name, ready, "status");
    Ok(())
}

/// Writes the pod's ConfigMap, Secret and projected volumes under its root, the kubelet way:
/// files in a fresh `..<n>` directory, `..data` swapped to it atomically, each key a symlink
/// through `..data`. Rewrites only what changed.
async fn materialize(
    client: &kube::Client,
    ns: &str,
    root: &Path,
    volumes: &[Volume],
    mounts: &[(String, String)],
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for (volume_name, mount_path) in mounts {
        let Some(volume) = volumes.iter().find(|v| &v.name == volume_name) else {
            continue;
        };
        let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
        if let Some(s) = &volume.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let Some(secret) = secrets.get_opt(&name).await? else {
                bail!("Secret {name} (volume {volume_name}) not found")
            };
            let data = secret.data.unwrap_or_default();
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            match &s.items {
                Some(items) => {
                    for item in items {
                        let v = data
                            .get(&item.key)
                            .with_context(|| format!("Secret {name} has no key {}", item.key))?;
                        files.push((
                            item.path.clone(),
                            v.0.clone(),
                            item.mode.map(|m| m as u32).unwrap_or(mode),
                        ));
                    }
                }
                None => files.extend(data.into_iter().map(|(k, v)| (k, v.0, mode))),
            }
        } else if let Some(c) = &volume.config_map {
            let cm = config_maps.get(&c.name).await?;
            let mode = c.default_mode.unwrap_or(0o644) as u32;
            files.extend(
                cm.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes(), mode)),
            );
        } else if let Some(p) = &volume.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            for source in p.sources.iter().flatten() {
                let Some(s) = &source.secret else { continue };
                let Some(secret) = secrets.get_opt(&s.name).await? else {
                    bail!("Secret {} (volume {volume_name}) not found", s.name)
                };
                let data = secret.data.unwrap_or_default();
                for item in s.items.iter().flatten() {
                    if let Some(v) = data.get(&item.key) {
                        files.push((
                            item.path.clone(),
                            v.0.clone(),
                            item.mode.map(|m| m as u32).unwrap_or(mode),
                        ));
                    }
                }
            }
        } else {
            // emptyDir / ephemeral: the pod root's own directory (the /nix store).
            continue;
        }
        write_volume(&root.join(mount_path.trim_start_matches('/')), &files)?;
    }
    Ok(())
}

fn write_volume(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let current = dir.join("..data");
    let unchanged = files
        .iter()
        .all(|(name, content, _)| std::fs::read(current.join(name)).ok().as_deref() == Some(content.as_slice()));
    if unchanged && current.exists() {
        return Ok(());
    }
    let stamp = format!("..{}", jiff::Timestamp::now().as_nanosecond());
    let data = dir.join(&stamp);
    std::fs::create_dir_all(&data)?;
    for (name, content, mode) in files {
        let path = data.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link)?;
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp)?;
    let old = std::fs::read_link(&current).ok();
    std::fs::rename(&tmp, &current)?;
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// TCP relays, one per Service, listening on addresses inside a network namespace of their own
/// (so port 22 is free even when the host runs sshd) and connecting to pods from the host.
struct LoadBalancers {
    netns: String,
    host_veth: String,
    net: u8,
    /// Last octet of the next relay address (addresses are not reused).
    next_host: u8,
    relays: HashMap<String, Relay>,
}

struct Relay {
    address: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LoadBalancers {
    fn new(net: u8) -> anyhow::Result<Self> {
        let netns = format!("nbp-lb-{net}");
        let host_veth = format!("nblh{net}");
        let lb_veth = format!("nblb{net}");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_veth]).output();
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        run(Command::new("ip").args(["link", "add", &host_veth, "type", "veth", "peer", "name", &lb_veth]))?;
        run(Command::new("ip").args(["link", "set", &lb_veth, "netns", &netns]))?;
        run(Command::new("ip").args(["addr", "add", &format!("10.{net}.0.1/16"), "dev", &host_veth]))?;
        run(Command::new("ip").args(["link", "set", &host_veth, "up"]))?;
        run(Command::new("ip").args(["netns", "exec", &netns, "ip", "link", "set", &lb_veth, "up"]))?;
        run(Command::new("ip").args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]))?;
        Ok(Self {
            netns,
            host_veth,
            net,
            next_host: 1,
            relays: HashMap::new(),
        })
    }

    /// Removes the relays of Services that are gone, as a cloud deletes their load balancers.
    /// Connections already open keep going.
    fn retain(&mut self, services: &[String]) {
        let gone: Vec<String> = self.relays.keys().filter(|k| !services.contains(k)).cloned().collect();
        for name in gone {
            if let Some(r) = self.relays.remove(&name) {
                // The address stays (unused, never handed out again): connections to it are
                // refused at once instead of timing out.
                r.task.abort();
                tracing::info!(service = %name, address = %r.address, "removed the load balancer");
            }
        }
    }

    fn ensure(&mut self, service: &str, port: u16, backends: Vec<SocketAddr>) -> anyhow::Result<SocketAddr> {
        if let Some(r) = self.relays.get(service) {
            *r.backends.lock().expect("never poisoned") = backends;
            return Ok(r.address);
        }
        let ip = Ipv4Addr::new(10, self.net, 1, self.next_host);
        self.next_host = self.next_host.wrapping_add(1).max(1);
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "ip",
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            &format!("nblb{}", self.net),
        ]))?;
        let address = SocketAddr::from((ip, port));
        let listener = listen_in_netns(&self.netns, address)?;
        let backends = Arc::new(Mutex::new(backends));
        let task = tokio::spawn(relay(listener, backends.clone()));
        self.relays.insert(
            service.into(),
            Relay {
                address,
                backends,
                task,
            },
        );
        Ok(address)
    }
}

impl Drop for LoadBalancers {
    fn drop(&mut self) {
        for r in self.relays.values() {
            r.task.abort();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_veth]).output();
    }
}

/// Binds a listener inside `netns`: a thread enters it, binds, and hands the socket back (a
/// socket stays in the namespace it was made in).
fn listen_in_netns(netns: &str, address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let path = format!("/run/netns/{netns}");
    let std_listener = std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(std::net::TcpListener::bind(address)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns thread panicked"))??;
    std_listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std_listener)?)
}

async fn relay(listener: tokio::net::TcpListener, backends: Arc<Mutex<Vec<SocketAddr>>>) {
    let mut next = 0usize;
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let target = {
            let b = backends.lock().expect("never poisoned");
            if b.is_empty() {
                None
            } else {
                next = next.wrapping_add(1);
                Some(b[next % b.len()])
            }
        };
        let Some(target) = target else { continue };
        tokio::spawn(async move {
            if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}
