//! Shared pieces of the tests that drive the whole product: the control plane with the CRD, a
//! real operator process, and waiting for things.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ControlPlane, free_port};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use nixpool_api::NixBuilderPool;

/// The repository checkout.
pub const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The shared control plane, with the checked-in CRD installed and Established.
pub fn control_plane() -> &'static ControlPlane {
    static CRD: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let cp = ControlPlane::shared();
    CRD.get_or_init(|| install_crd(cp).unwrap_or_else(|e| panic!("{e:#}")));
    cp
}

/// Installs the checked-in CRD (`crds/` of the repository at `repo`) and waits until it is
/// Established, so that kubectl and clients can use `nbp` at once.
pub fn install_crd_from(cp: &ControlPlane, repo: &std::path::Path) -> anyhow::Result<()> {
    let crd = repo.join("crds/nixbuilderpools.nixpool.dev.yaml");
    // --validate=false: kubectl validates against the server's OpenAPI, and a 1.20 server does
    // not know x-kubernetes-validations (it drops them; the operator checks the rules).
    let apply = ["apply", "--validate=false", "-f"];
    let out = cp.kubectl().args(apply).arg(&crd).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {} {}: {}",
            apply.join(" "),
            crd.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_established(cp, "nixbuilderpools.nixpool.dev")?;
    cp.forget_discovery();
    Ok(())
}

/// Waits until the CRD `name` is Established. kubectl 1.20's wait fails at once ("status.conditions
/// accessor error: <nil>") when it reads the CRD before the API server has given it any condition,
/// so it is asked again until its own 60 s are up.
pub fn wait_established(cp: &ControlPlane, name: &str) -> anyhow::Result<()> {
    let crd = format!("crd/{name}");
    let wait = ["wait", "--for=condition=Established", "--timeout=60s", crd.as_str()];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cp.kubectl().args(wait).output()?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("accessor error") || Instant::now() > deadline {
            anyhow::bail!("kubectl {}: {err}", wait.join(" "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `install_crd_from` this checkout.
pub fn install_crd(cp: &ControlPlane) -> anyhow::Result<()> {
    install_crd_from(cp, std::path::Path::new(REPO))
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real `nixpool-operator run` process, watching one namespace, killed on drop.
pub struct Operator {
    child: Child,
    pub port: u16,
    pub log: std::path::PathBuf,
}

impl Operator {
    /// An operator watching (and leading in) one namespace of the control plane.
    pub fn start_in(binary: &std::path::Path, cp: &ControlPlane, ns: &str, name: &str, extra: &[&str]) -> Operator {
        let mut args = vec!["--namespace", ns, "--lease-namespace", ns, "--identity", name];
        args.extend_from_slice(extra);
        Self::spawn(
            binary,
            &cp.kubeconfig(),
            &cp.dir().join(format!("operator-{ns}-{name}")),
            &args,
        )
    }

    /// `nixpool-operator run <args>` with the given kubeconfig; its log goes to `<log_prefix>-<port>.log`.
    pub fn spawn(
        binary: &std::path::Path,
        kubeconfig: &std::path::Path,
        log_prefix: &std::path::Path,
        args: &[&str],
    ) -> Operator {
        let port = free_port();
        let log = std::path::PathBuf::from(format!("{}-{port}.log", log_prefix.display()));
        let file = std::fs::File::create(&log).unwrap();
        // A profiler in front of the operator, e.g. `heaptrack -o /tmp/operator` (for profiling
        // runs only: the peak RSS and CPU figures are then the wrapper's).
        let mut command = match std::env::var("NIXPOOL_OPERATOR_WRAPPER") {
            Ok(wrapper) if !wrapper.trim().is_empty() => {
                let mut words = wrapper.split_whitespace();
                let mut c = Command::new(words.next().expect("not empty"));
                c.args(words).arg(binary);
                c
            }
            _ => Command::new(binary),
        };
        let child = command
            .args([
                "run",
                "--default-image",
                "nixpool-builder:test",
                // The real node's builder image (crate::node).
                "--allowed-image-prefix",
                "nixpool-builder,nixpool.test/",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("NIXPOOL_OPERATOR_LOG").unwrap_or_else(|_| "info,kube_client=error".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start nixpool-operator");
        Operator { child, port, log }
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> String {
        http_get(self.port, "/metrics").await.unwrap_or_default()
    }

    /// Sum of a counter over the label sets that contain `label` (e.g. `verb="PATCH"`).
    pub async fn counter(&self, name: &str, label: &str) -> f64 {
        sum_counter(&self.metrics().await, name, label)
    }

    /// API write requests (POST, PUT, PATCH, DELETE) the controller has sent.
    pub async fn writes(&self) -> f64 {
        let m = self.metrics().await;
        ["POST", "PUT", "PATCH", "DELETE"]
            .iter()
            .map(|v| sum_counter(&m, "nixpool_operator_api_requests_total", &format!("verb=\"{v}\"")))
            .sum()
    }

    /// Single-object reads (`GET` of one object; lists and watches are counted apart) the
    /// controller has sent.
    pub async fn gets(&self) -> f64 {
        self.counter("nixpool_operator_api_requests_total", "verb=\"GET\"")
            .await
    }

    pub async fn reconciles(&self) -> f64 {
        self.counter("nixpool_operator_reconciles_total", "").await
    }

    /// Waits until no reconcile has run for `quiet`.
    pub async fn settle(&self, quiet: Duration) {
        // Generous: with many pools the Deployment controller keeps the operator busy for minutes.
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut last = self.reconciles().await;
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            assert!(Instant::now() < deadline, "the operator never settled");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.reconciles().await;
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
    }

    /// Peak resident memory of the operator process, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }

    /// The operator's CPU time (user + system) so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        crate::process_cpu_seconds(self.child.id())
    }

    /// The operator's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the operator process (e.g. SIGSTOP to freeze it, SIGCONT to resume it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("cannot send {signal} to the operator: {e}"));
    }

    /// The operator's exit status once it has exited, waiting for it up to `timeout`.
    pub fn exit_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the operator") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn sum_counter(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    http_get_at(&format!("127.0.0.1:{port}"), path).await
}

/// The body of `GET path` from `addr` (`HOST:PORT`), HTTP/1.0.
pub async fn http_get_at(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the operator has written a status for the pool's current generation.
pub async fn observed(pools: &Api<NixBuilderPool>, name: &str) -> NixBuilderPool {
    eventually(Duration::from_secs(60), &format!("status of pool {name}"), || async {
        let p = pools.get_opt(name).await.ok()??;
        let st = p.status.as_ref()?;
        (st.observed_generation == p.metadata.generation && !st.conditions.is_empty()).then_some(p)
    })
    .await
}

pub fn condition<'a>(
    pool: &'a NixBuilderPool,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    pool.status
        .as_ref()
        .and_then(|s| s.condition(type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", pool.status))
}

/// Plays the kubelet: marks every pod of the pool Running and Ready.
pub async fn make_pods_ready(client: &kube::Client, ns: &str, pool: &str) -> usize {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={pool}")))
        .await
        .unwrap();
    for (i, p) in list.items.iter().enumerate() {
        let now = jiff::Timestamp::now().to_string();
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": format!("10.244.0.{}", i + 10), "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                           {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]
        }});
        pods.patch_status(
            &p.metadata.name.clone().unwrap(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    }
    list.items.len()
}
