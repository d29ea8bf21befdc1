//! The gateway as a process: its probes and metrics, its limits, its refusal of its own key,
//! SIGTERM; and, against a real API server on loopback, builders discovered from pods, a held
//! session woken by the first Ready builder, the demand report in the ConfigMap, and another
//! gateway's sessions (its report) counted against the builders' slots; and, against fake
//! builders, a session a builder refuses as full going to the next one unseen by the client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use nixpool_api::demand::{BuilderUse, GatewayReport};
use nixpool_testenv::{ControlPlane, free_port};

const GATEWAY: &str = env!("CARGO_BIN_EXE_nixpool-gateway");

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "{out:?}");
    path
}

/// Keys and files of one gateway.
struct Keys {
    dir: tempfile::TempDir,
    host: PathBuf,
    client: PathBuf,
    gateway: PathBuf,
    authorized: PathBuf,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = keygen(dir.path(), "host");
        let client = keygen(dir.path(), "client");
        let gateway = keygen(dir.path(), "gateway");
        let authorized = dir.path().join("authorized_keys");
        let public = |k: &Path| std::fs::read_to_string(k.with_extension("pub")).unwrap();
        std::fs::write(&authorized, public(&client) + &public(&gateway)).unwrap();
        Self {
            dir,
            host,
            client,
            gateway,
            authorized,
        }
    }
}

/// A running gateway, killed when dropped; its log goes to a file.
struct Gateway {
    child: Child,
    log: PathBuf,
    ssh: u16,
    http: u16,
}

impl Gateway {
    fn start(keys: &Keys, args: &[&str], env: &[(&str, &Path)]) -> Self {
        let (ssh, http) = (free_port(), free_port());
        let log = keys.dir.path().join(format!("gateway-{ssh}.log"));
        let mut cmd = Command::new(GATEWAY);
        cmd.arg(format!("--listen=127.0.0.1:{ssh}"))
            .arg(format!("--http-addr=127.0.0.1:{http}"))
            .arg("--host-key")
            .arg(&keys.host)
            .arg("--authorized-keys")
            .arg(&keys.authorized)
            .arg("--builder-key")
            .arg(&keys.gateway)
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Self { child, log, ssh, http }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    fn wait_ready(&self) {
        wait_for(Duration::from_secs(20), "/readyz 200", || {
            (self.get("/readyz").0 == 200).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// A running `ssh` client as `key`, running `command`, with its stdin, stdout and stderr
    /// piped.
    fn client(&self, key: &Path, command: &str) -> Child {
        self.ssh(key, command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `ssh` as `key`, running `command` through the gateway.
    fn ssh(&self, key: &Path, command: &str) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.arg("-i")
            .arg(key)
            .args(["-p", &self.ssh.to_string(), "-F", "/dev/null"])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg("builder@127.0.0.1")
            .arg(command)
            .stdin(Stdio::null());
        ssh
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback: status and body ("" and 0 when nothing answers).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return Ok(t);
        }
        if start.elapsed() > limit {
            return Err(format!("no {what} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the server sends first on a new connection: its banner, or nothing when it is closed.
fn first_bytes(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    buf[..n].to_vec()
}

#[test]
fn probes_limits_its_own_key_and_sigterm() {
    let keys = Keys::new();
    let gw = Gateway::start(&keys, &["--builder=127.0.0.1:1=2", "--max-connections=1"], &[]);
    gw.wait_ready();
    assert_eq!(gw.get("/healthz").0, 200);
    let (status, metrics) = gw.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("application/openmetrics-text"), "{metrics}");
    for line in [
        "nixpool_gateway_builders 1",
        "nixpool_gateway_builder_slots_used{builder=\"127.0.0.1:1\"} 0",
        "nixpool_gateway_sessions_open{state=\"waiting\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }

    // The gateway's own key is one of the pool's authorized keys, but not a client's.
    let out = gw.ssh(&keys.gateway, "nix-store --serve").output().unwrap();
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(gw.log().contains("the gateway's own key"), "{}", gw.log());
    assert!(gw.get("/metrics").1.contains("nixpool_gateway_logins_refused_total 1"));

    // One connection open: the next one is closed before the banner.
    let mut first = TcpStream::connect(("127.0.0.1", gw.ssh)).unwrap();
    let mut banner = [0u8; 8];
    first.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    assert_eq!(first_bytes(gw.ssh), b"", "over --max-connections: closed at once");
    wait_for(Duration::from_secs(2), "a log line", || {
        gw.log().contains("--max-connections").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    drop(first);
    wait_for(Duration::from_secs(5), "the first connection's end", || {
        first_bytes(gw.ssh).starts_with(b"SSH-2.0-").then_some(())
    })
    .unwrap();

    // SIGTERM: not ready at once, still accepting for a few seconds, then gone (no session open).
    let mut gw = gw;
    let signalled = Instant::now();
    gw.signal("TERM");
    wait_for(Duration::from_millis(500), "/readyz 503", || {
        (gw.get("/readyz").0 == 503).then_some(())
    })
    .unwrap();
    assert!(
        first_bytes(gw.ssh).starts_with(b"SSH-2.0-"),
        "still accepting right after SIGTERM"
    );
    let status = wait_for(Duration::from_secs(10), "exit", || gw.child.try_wait().unwrap()).unwrap();
    assert!(status.success(), "{status:?}\n{}", gw.log());
    assert!(
        signalled.elapsed() >= Duration::from_secs(5),
        "left before the endpoints could update"
    );
    let log = gw.log();
    assert!(
        log.contains("draining") && log.contains("no session open; exiting"),
        "{log}"
    );
}

fn output_text(out: &Output) -> String {
    format!(
        "{:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn report(cms: &Api<ConfigMap>, key: &str) -> Option<GatewayReport> {
    let cm = cms.get("pool-gateway-demand").await.ok()?;
    serde_json::from_str(cm.data?.get(key)?).ok()
}

async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no {what} within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_session_starts_when_the_first_builder_is_ready_and_demand_is_reported() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("gateway").await.unwrap();
    let client = cp.client().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let empty: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "pool-gateway-demand"}})).unwrap();
    cms.create(&PostParams::default(), &empty).await.unwrap();

    let keys = Keys::new();
    // Every builder pod is at 127.0.0.1: one echoing builder serves them all, and the log says
    // which one a session went to.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let builder_port = listener.local_addr().unwrap().port().to_string();
    FakeBuilder::start(&keys, listener, Mode::Echo);
    let kubeconfig = cp.kubeconfig();
    let gw = Gateway::start(
        &keys,
        &[
            "--namespace",
            &ns,
            "--pod-name=gw-0",
            "--builders-selector=app=builder,pool=p",
            "--builder-port",
            &builder_port,
            "--slots=2",
            "--demand-config-map=pool-gateway-demand",
            "--hold-seconds=60",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    gw.wait_ready();
    let idle = eventually("an idle report", || report(&cms, "gw-0")).await;
    assert_eq!((idle.waiting, idle.active, idle.builders.len()), (0, 0, 0), "{idle:?}");

    // No builder: the session is held, and the report says so at once.
    let held = gw
        .ssh(&keys.client, "nix-store --serve --write")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = eventually("a report of the held session", || async {
        report(&cms, "gw-0").await.filter(|r| r.waiting == 1)
    })
    .await;
    assert!(waiting.builders.is_empty());

    // The first builder turns Ready: the held session goes to it at once.
    create_pod(
        &pods,
        "builder-0",
        serde_json::json!({"app": "builder", "pool": "p"}),
        false,
    )
    .await;
    let ready = serde_json::json!({"status": {
        "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    let readied = Instant::now();
    pods.patch_status("builder-0", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || held.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let woke = readied.elapsed();
    assert!(out.status.success(), "{}\n{}", output_text(&out), gw.log());
    assert_session_done(&gw, 1, "builder-0", 1);
    assert!(
        woke < Duration::from_secs(2),
        "the held session waited {woke:?} after Ready"
    );

    let listed = eventually("builder-0 idle in the report", || async {
        report(&cms, "gw-0")
            .await
            .filter(|r| r.waiting == 0 && r.active == 0 && r.builders.contains_key("builder-0"))
    })
    .await;
    assert_eq!(listed.builders["builder-0"].used, 0);
    assert!(listed.builders["builder-0"].idle_since.is_some(), "{listed:?}");
    let metrics = gw.get("/metrics").1;
    for line in [
        "nixpool_gateway_builders 1",
        "nixpool_gateway_builder_slots_used{builder=\"builder-0\"} 0",
        "nixpool_gateway_sessions_total{outcome=\"done\"} 1",
        "nixpool_gateway_queue_wait_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(gw.log().contains("the builders changed"), "{}", gw.log());

    // It leaves: out of the report and the metrics.
    pods.delete("builder-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("builder-0 gone from the report", || async {
        report(&cms, "gw-0").await.filter(|r| r.builders.is_empty())
    })
    .await;
    let metrics = gw.get("/metrics").1;
    assert!(
        metrics.contains("nixpool_gateway_builders 0") && !metrics.contains("builder=\"builder-0\""),
        "{metrics}"
    );

    // SIGTERM with a session open (held: no builder): the process stays until it ends.
    let mut held = gw.ssh(&keys.client, "nix-daemon --stdio").spawn().unwrap();
    eventually("a report of the held session", || async {
        report(&cms, "gw-0").await.filter(|r| r.waiting == 1)
    })
    .await;
    let mut gw = gw;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(gw.child.try_wait().unwrap().is_none(), "it left with a session open");
    assert!(gw.log().contains("no longer accepting connections"), "{}", gw.log());
    held.kill().unwrap();
    let _ = held.wait();
    let start = Instant::now();
    while gw.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still running after the last session\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    assert!(
        log.contains("session abandoned") && log.contains("no session open; exiting"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_removed_while_its_session_is_held_is_refused_when_the_slot_comes() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("gateway").await.unwrap();
    let client = cp.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let keys = Keys::new();
    let builder_port = free_port().to_string();
    let kubeconfig = cp.kubeconfig();
    let gw = Gateway::start(
        &keys,
        &[
            "--namespace",
            &ns,
            "--builders-selector=app=builder,pool=revoked",
            "--builder-port",
            &builder_port,
            "--slots=1",
            "--hold-seconds=60",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    gw.wait_ready();
    // No builder yet: the session is held.
    let held = gw
        .ssh(&keys.client, "nix-daemon --stdio")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the session held", || async {
        gw.get("/metrics")
            .1
            .contains("nixpool_gateway_sessions_open{state=\"waiting\"} 1")
            .then_some(())
    })
    .await;
    // The pool drops the client's key (only the gateway's own stays), then a builder is Ready.
    let gateway_public = std::fs::read_to_string(keys.gateway.with_extension("pub")).unwrap();
    std::fs::write(&keys.authorized, gateway_public).unwrap();
    create_pod(
        &pods,
        "builder-0",
        serde_json::json!({"app": "builder", "pool": "revoked"}),
        true,
    )
    .await;
    let out = tokio::task::spawn_blocking(move || held.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("your key was removed"),
        "{}\n{}",
        output_text(&out),
        gw.log()
    );
    let log = gw.log();
    assert!(
        log.contains("the key was removed from the pool while the session was held"),
        "{log}"
    );
    assert!(
        gw.get("/metrics").1.contains("outcome=\"key_revoked\"} 1"),
        "{}",
        gw.get("/metrics").1
    );
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A report of another gateway, written `age` seconds ago, using `used` slots per builder.
fn other_report(age: i64, used: &[(&str, u32)]) -> String {
    let r = GatewayReport {
        at: unix_now() - age,
        waiting: 0,
        active: used.iter().map(|(_, n)| n).sum(),
        builders: used
            .iter()
            .map(|(b, n)| {
                let u = BuilderUse {
                    used: *n,
                    idle_since: (*n == 0).then_some(0),
                };
                (b.to_string(), u)
            })
            .collect(),
    };
    serde_json::to_string(&r).unwrap()
}

/// The gateway's `nth` session (from 1) ended done on `builder`, on try number `tries`. The
/// client may see its session end before the gateway has logged it: the line is waited for.
fn assert_session_done(gw: &Gateway, nth: usize, builder: &str, tries: u32) {
    let done = wait_for(
        Duration::from_secs(5),
        &format!("log line of session {nth} done"),
        || {
            gw.log()
                .lines()
                .filter(|l| l.contains("session done"))
                .nth(nth - 1)
                .map(str::to_string)
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.log()));
    assert!(
        done.contains(&format!("builder={builder} ")) && done.contains(&format!("tries={tries} ")),
        "session {nth} did not end on {builder} at try {tries}: {done}"
    );
}

/// The client sent `hello` to an echoing builder and got it back, with nothing on stderr.
fn assert_echoed_hello(out: &Output, gw: &Gateway) {
    assert_eq!(
        (out.status.code(), &out.stdout[..], &out.stderr[..]),
        (Some(0), &b"hello"[..], &b""[..]),
        "{}\n{}",
        output_text(out),
        gw.log()
    );
}

/// Creates pod `name` with `labels`, and marks it Ready at 127.0.0.1 when `ready`.
async fn create_pod(pods: &Api<Pod>, name: &str, labels: serde_json::Value, ready: bool) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "c"}], "automountServiceAccountToken": false}
    }))
    .unwrap();
    // A new namespace's ServiceAccount token may not exist yet: the API server says to retry.
    let mut tries = 0;
    while let Err(e) = pods.create(&PostParams::default(), &pod).await {
        tries += 1;
        assert!(tries < 60, "cannot create pod {name}: {e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if ready {
        let status = serde_json::json!({"status": {
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_gateways_sessions_count_against_the_builders_slots() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("gateway-peers").await.unwrap();
    let client = cp.client().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let builder = serde_json::json!({"app": "builder", "pool": "p"});
    create_pod(&pods, "builder-a", builder.clone(), true).await;
    create_pod(&pods, "builder-b", builder, true).await;
    let gateway = serde_json::json!({"app": "gateway", "pool": "p"});
    create_pod(&pods, "gw-0", gateway.clone(), false).await;
    create_pod(&pods, "gw-1", gateway, false).await;
    // gw-1 runs a session on builder-a; gw-old's pod is gone and its report old.
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pool-gateway-demand"},
        "data": {
            "gw-1": other_report(0, &[("builder-a", 1), ("builder-b", 0)]),
            "gw-old": other_report(100, &[("builder-a", 0)]),
        }
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();

    let keys = Keys::new();
    // One echoing builder serves both pods (both at 127.0.0.1); the log names the one chosen.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let builder_port = listener.local_addr().unwrap().port().to_string();
    FakeBuilder::start(&keys, listener, Mode::Echo);
    let kubeconfig = cp.kubeconfig();
    let gw = Gateway::start(
        &keys,
        &[
            "--namespace",
            &ns,
            "--pod-name=gw-0",
            "--builders-selector=app=builder,pool=p",
            "--gateways-selector=app=gateway,pool=p",
            "--builder-port",
            &builder_port,
            "--slots=1",
            "--demand-config-map=pool-gateway-demand",
            "--hold-seconds=60",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    gw.wait_ready();
    let elsewhere = |b: &str, n: u32| format!("nixpool_gateway_builder_slots_used_elsewhere{{builder=\"{b}\"}} {n}");
    wait_for(Duration::from_secs(20), "gw-1's session in the metrics", || {
        let m = gw.get("/metrics").1;
        (m.contains(&elsewhere("builder-a", 1)) && m.contains(&elsewhere("builder-b", 0))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));

    // builder-a has the most free slots by this gateway's count alone (and is the first by
    // name), but gw-1 uses its only one: the session goes to builder-b.
    let out = gw.ssh(&keys.client, "nix-store --serve --write").output().unwrap();
    assert!(out.status.success(), "{}\n{}", output_text(&out), gw.log());
    assert_session_done(&gw, 1, "builder-b", 1);

    // The dead gateway's key is removed; the live ones stay.
    let data = eventually("gw-old's key removed", || async {
        let data = cms.get("pool-gateway-demand").await.ok()?.data?;
        (!data.contains_key("gw-old")).then_some(data)
    })
    .await;
    assert!(data.contains_key("gw-1") && data.contains_key("gw-0"), "{data:?}");
    assert!(gw.log().contains("removed the demand reports"), "{}", gw.log());

    // gw-1 takes builder-b too: a new session is held, until gw-1's session on b ends.
    let set_gw1 = |used: &[(&str, u32)]| {
        let patch = serde_json::json!({"data": {"gw-1": other_report(0, used)}});
        let cms = cms.clone();
        async move {
            cms.patch("pool-gateway-demand", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    set_gw1(&[("builder-a", 1), ("builder-b", 1)]).await;
    wait_for(Duration::from_secs(10), "gw-1's second session in the metrics", || {
        gw.get("/metrics").1.contains(&elsewhere("builder-b", 1)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let held = gw
        .ssh(&keys.client, "nix-store --serve --write")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("a report of the held session", || async {
        report(&cms, "gw-0").await.filter(|r| r.waiting == 1)
    })
    .await;
    let freed = Instant::now();
    set_gw1(&[("builder-a", 1), ("builder-b", 0)]).await;
    let out = tokio::task::spawn_blocking(move || held.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let woke = freed.elapsed();
    assert!(out.status.success(), "{}\n{}", output_text(&out), gw.log());
    assert_session_done(&gw, 2, "builder-b", 1);
    assert!(
        woke < Duration::from_secs(2),
        "the held session waited {woke:?} after the slot freed up"
    );
}

/// How a [`FakeBuilder`] answers every `exec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// As the builder's gate with all its slots in use: one stderr line, exit status 75,
    /// before reading stdin.
    Busy,
    /// Echoes stdin to stdout, exits 0 at EOF.
    Echo,
    /// As Nix's protocols move bulk data: one way at a time. Answers the first byte at once
    /// (as a daemon answers the client's hello), takes the rest of stdin, and at EOF sends that
    /// back [`REPLY_TIMES`] times (build outputs outweigh inputs), then exits 0.
    Reply,
    /// A genuine failure: a stderr line and exit status 3, no stdout.
    Fail,
    /// Stuck: takes the command and never answers or closes.
    Silent,
}

/// How many times a [`Mode::Reply`] builder sends back what it took.
const REPLY_TIMES: usize = 4;

/// A builder on loopback: a russh server that presents the pool's host key, lets any key in,
/// records the `env` requests it gets, and answers as its [`Mode`] says.
struct FakeBuilder {
    name: String,
    envs: Arc<Mutex<Vec<(String, String)>>>,
}

struct Fake {
    mode: Mode,
    /// What a [`Mode::Reply`] builder has taken so far, after the first packet it answered.
    taken: Vec<u8>,
    answered: bool,
    envs: Arc<Mutex<Vec<(String, String)>>>,
}

impl russh::server::Handler for Fake {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: &russh::keys::PublicKey,
    ) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        mut channel: russh::Channel<russh::server::Msg>,
        _session: &mut russh::server::Session,
    ) -> Result<bool, Self::Error> {
        // The handler's callbacks answer; the channel's own queue must still be read, or russh
        // stops reading the connection once it is full.
        tokio::spawn(async move { while channel.wait().await.is_some() {} });
        Ok(true)
    }

    async fn env_request(
        &mut self,
        _channel: russh::ChannelId,
        name: &str,
        value: &str,
        _session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        self.envs.lock().unwrap().push((name.into(), value.into()));
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: russh::ChannelId,
        _command: &[u8],
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let (line, status) = match self.mode {
            Mode::Echo | Mode::Reply | Mode::Silent => return Ok(()),
            Mode::Busy => ("nixpool: all 1 build slots of this builder are in use\n", 75),
            Mode::Fail => ("error: the fake builder failed\n", 3),
        };
        session.extended_data(channel, 1, russh::CryptoVec::from_slice(line.as_bytes()))?;
        session.exit_status_request(channel, status)?;
        session.eof(channel)?;
        session.close(channel)
    }

    async fn data(
        &mut self,
        channel: russh::ChannelId,
        data: &[u8],
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        match self.mode {
            Mode::Echo => session.data(channel, russh::CryptoVec::from_slice(data))?,
            Mode::Reply if !self.answered => {
                self.answered = true;
                session.data(channel, russh::CryptoVec::from_slice(&data[..1]))?;
                self.taken.extend_from_slice(&data[1..]);
            }
            Mode::Reply => self.taken.extend_from_slice(data),
            _ => {}
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: russh::ChannelId,
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        if self.mode == Mode::Reply {
            let taken = std::mem::take(&mut self.taken);
            for _ in 0..REPLY_TIMES {
                session.data(channel, russh::CryptoVec::from_slice(&taken))?;
            }
        }
        if matches!(self.mode, Mode::Echo | Mode::Reply) {
            session.exit_status_request(channel, 0)?;
            session.eof(channel)?;
            session.close(channel)?;
        }
        Ok(())
    }
}

impl FakeBuilder {
    /// Serves on `listener` (its name is its `HOST:PORT`, as the gateway names a `--builder`).
    fn start(keys: &Keys, listener: tokio::net::TcpListener, mode: Mode) -> Self {
        let name = listener.local_addr().unwrap().to_string();
        let key = russh::keys::load_secret_key(&keys.host, None).unwrap();
        let config = Arc::new(russh::server::Config {
            keys: vec![key],
            ..Default::default()
        });
        let envs = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&envs);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let config = Arc::clone(&config);
                let handler = Fake {
                    mode,
                    taken: Vec::new(),
                    answered: false,
                    envs: Arc::clone(&recorded),
                };
                tokio::spawn(async move {
                    if let Ok(session) = russh::server::run_stream(config, tcp, handler).await {
                        let _ = session.await;
                    }
                });
            }
        });
        Self { name, envs }
    }

    fn envs(&self) -> Vec<(String, String)> {
        self.envs.lock().unwrap().clone()
    }
}

/// Two loopback listeners, the first by name first.
async fn two_listeners() -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let name = |l: &tokio::net::TcpListener| l.local_addr().unwrap().to_string();
    if name(&a) < name(&b) { (a, b) } else { (b, a) }
}

/// Runs `command` through the gateway as the client, with `input` on stdin.
async fn run(gw: &Gateway, keys: &Keys, command: &str, input: &'static [u8]) -> Output {
    let mut child = gw.client(&keys.client, command);
    let mut stdin = child.stdin.take().unwrap();
    // Written while the output is read: a session may answer before it has read everything.
    std::thread::spawn(move || {
        let _ = stdin.write_all(input);
    });
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_that_says_all_its_slots_are_in_use_is_passed_over_unseen_by_the_client() {
    let keys = Keys::new();
    // By this gateway's count both have a free slot, and the busy one is the first by name:
    // the session goes to it first, as when another gateway's report has not arrived yet.
    let (first, second) = two_listeners().await;
    let busy = FakeBuilder::start(&keys, first, Mode::Busy);
    let echo = FakeBuilder::start(&keys, second, Mode::Echo);
    let gw = Gateway::start(
        &keys,
        &[
            &format!("--builder={}=1", busy.name),
            &format!("--builder={}=1", echo.name),
            "--hold-seconds=10",
        ],
        &[],
    );
    gw.wait_ready();
    let out = run(&gw, &keys, "nix-store --serve --write", b"hello").await;
    assert_echoed_hello(&out, &gw);
    let log = gw.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("all its slots are in use"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(refusal.contains(&busy.name), "{refusal}");
    assert_session_done(&gw, 1, &echo.name, 2);
    let metrics = gw.get("/metrics").1;
    let counted = format!("nixpool_gateway_builder_busy_total{{builder=\"{}\"}} 1", busy.name);
    assert!(metrics.contains(&counted), "{counted} missing:\n{metrics}");
    assert!(
        metrics.contains("nixpool_gateway_sessions_open{state=\"active\"} 0"),
        "the refused slot is given back:\n{metrics}"
    );
    let asked = vec![("NIXPOOL_GATE_SLOTS".to_string(), "1".to_string())];
    assert_eq!((busy.envs(), echo.envs()), (asked.clone(), asked));

    // With only a busy builder the session is held (the builder tried again after a while)
    // until --hold-seconds, and the client sees the hold's refusal, not the builder's line.
    let (only_busy, failing) = two_listeners().await;
    let only_busy = FakeBuilder::start(&keys, only_busy, Mode::Busy);
    let gw = Gateway::start(
        &keys,
        &[&format!("--builder={}=1", only_busy.name), "--hold-seconds=3"],
        &[],
    );
    gw.wait_ready();
    let asked_at = Instant::now();
    let out = run(&gw, &keys, "nix-daemon --stdio", b"").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("no builder was free within 3 s") && !stderr.contains("in use"),
        "{}\n{}",
        output_text(&out),
        gw.log()
    );
    assert!(asked_at.elapsed() >= Duration::from_secs(3));
    assert!(
        only_busy.envs().len() >= 2,
        "tried again within the hold: {:?}\n{}",
        only_busy.envs(),
        gw.log()
    );

    // A genuine failure (another exit status, no stdout) is the client's, with no retry.
    let failing = FakeBuilder::start(&keys, failing, Mode::Fail);
    let gw = Gateway::start(
        &keys,
        &[&format!("--builder={}=1", failing.name), "--hold-seconds=10"],
        &[],
    );
    gw.wait_ready();
    let out = run(&gw, &keys, "nix-store --serve", b"").await;
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr).as_ref()),
        (Some(3), "error: the fake builder failed\n"),
        "{}\n{}",
        output_text(&out),
        gw.log()
    );
    // The client may see its session end before the gateway logs it: the line is waited for.
    let log = wait_for(Duration::from_secs(5), "the failed session's log line", || {
        let log = gw.log();
        log.contains("tries=").then_some(log)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.log()));
    assert!(
        log.contains("tries=1") && !log.contains("all its slots are in use"),
        "{log}"
    );
    assert_eq!(failing.envs().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_that_never_answers_is_passed_over_after_30_s() {
    let keys = Keys::new();
    let (first, second) = two_listeners().await;
    let silent = FakeBuilder::start(&keys, first, Mode::Silent);
    let echo = FakeBuilder::start(&keys, second, Mode::Echo);
    let gw = Gateway::start(
        &keys,
        &[
            &format!("--builder={}=1", silent.name),
            &format!("--builder={}=1", echo.name),
            "--hold-seconds=60",
        ],
        &[],
    );
    gw.wait_ready();
    let asked_at = Instant::now();
    let out = run(&gw, &keys, "nix-daemon --stdio", b"hello").await;
    let took = asked_at.elapsed();
    assert_eq!(
        (out.status.code(), &out.stdout[..]),
        (Some(0), &b"hello"[..]),
        "{}\n{}",
        output_text(&out),
        gw.log()
    );
    assert!(
        took >= Duration::from_secs(30),
        "answered after {took:?}, before the bound"
    );
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("did not answer within 30 s") && l.contains(&silent.name)),
        "{log}"
    );
    assert_session_done(&gw, 1, &echo.name, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_that_refuses_the_connection_is_passed_over_unseen_by_the_client() {
    let keys = Keys::new();
    // The first by name gets the session first; nothing listens on it any more, as on a builder
    // whose sshd stopped accepting at SIGTERM before its pod was seen terminating.
    let (first, second) = two_listeners().await;
    let gone = first.local_addr().unwrap().to_string();
    drop(first);
    let echo = FakeBuilder::start(&keys, second, Mode::Echo);
    let gw = Gateway::start(
        &keys,
        &[
            &format!("--builder={gone}=1"),
            &format!("--builder={}=1", echo.name),
            "--hold-seconds=10",
        ],
        &[],
    );
    gw.wait_ready();
    let out = run(&gw, &keys, "nix-daemon --stdio", b"hello").await;
    assert_echoed_hello(&out, &gw);
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("did not take the session") && l.contains(&gone) && l.contains("Connection refused")),
        "{log}"
    );
    assert_session_done(&gw, 1, &echo.name, 2);
    let metrics = gw.get("/metrics").1;
    let counted = format!("nixpool_gateway_builder_unreachable_total{{builder=\"{gone}\"}} 1");
    assert!(metrics.contains(&counted), "{counted} missing:\n{metrics}");

    // With no other builder, the session is held and tried again until --hold-seconds; the
    // client is told why the builder could not be reached.
    let gw = Gateway::start(&keys, &[&format!("--builder={gone}=1"), "--hold-seconds=3"], &[]);
    gw.wait_ready();
    let out = run(&gw, &keys, "nix-daemon --stdio", b"hello").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && stderr.contains("no builder was free within 3 s")
            && stderr.contains("could not be reached")
            && stderr.contains("Connection refused"),
        "{}\n{}",
        output_text(&out),
        gw.log()
    );
    let tries = gw
        .log()
        .lines()
        .filter(|l| l.contains("did not take the session"))
        .count();
    assert!(tries >= 2, "tried {tries} times within the hold:\n{}", gw.log());
}

#[test]
fn a_hundred_silent_connections_are_closed_after_20_s_and_memory_stays_bounded() {
    let keys = Keys::new();
    let gw = Gateway::start(&keys, &["--builder=127.0.0.1:1=1"], &[]);
    gw.wait_ready();
    let rss_idle = rss_kib(gw.child.id());
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", gw.ssh)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let rss_open = rss_kib(gw.child.id());
    let mut closed_after = Vec::new();
    for conn in &mut silent {
        conn.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let mut buf = [0u8; 256];
        // The banner, then nothing until the gateway closes the connection.
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        closed_after.push(opened.elapsed());
    }
    let last = *closed_after.iter().max().unwrap();
    let first = *closed_after.iter().min().unwrap();
    assert!(
        first >= Duration::from_secs(19) && last < Duration::from_secs(30),
        "closed between {first:?} and {last:?}"
    );
    assert_eq!(gw.log().matches("no login within 20 s").count(), 100, "{}", gw.log());
    // The bound (server.rs): about 100 KiB per connection before login.
    eprintln!("gateway RSS: {rss_idle} KiB idle, {rss_open} KiB with 100 silent connections");
    assert!(
        rss_open < rss_idle + 100 * 100,
        "100 silent connections took {} KiB, above 100 KiB each",
        rss_open - rss_idle
    );
}

#[test]
fn ten_sessions_sending_4_mib_up_and_16_mib_down_to_slow_readers_stay_within_the_memory_bound() {
    const SESSIONS: usize = 10;
    const BYTES: usize = 4 << 20;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _entered = runtime.enter();
    let keys = Keys::new();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let builder = FakeBuilder::start(&keys, listener, Mode::Reply);
    let slots = format!("--builder={}={SESSIONS}", builder.name);
    let gw = Gateway::start(&keys, &[&slots, "--hold-seconds=60"], &[]);
    gw.wait_ready();
    let idle = rss_kib(gw.child.id());
    let input: Arc<Vec<u8>> = Arc::new((0..BYTES).map(|i| (i % 251) as u8).collect());
    // Each client uploads 4 MiB; the builder sends them back 4 times at EOF, and the client
    // starts reading only 10 s later (the uploads take a few seconds here): meanwhile the
    // builder's output must wait at the builder, not in the gateway.
    let clients: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let mut child = gw.client(&keys.client, "nix-daemon --stdio");
            let mut stdin = child.stdin.take().unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let sent = Arc::clone(&input);
            std::thread::spawn(move || {
                stdin.write_all(&sent).unwrap();
                drop(stdin);
                std::thread::sleep(Duration::from_secs(10));
                let mut back = Vec::new();
                stdout.read_to_end(&mut back).unwrap();
                (back, child.wait_with_output().unwrap())
            })
        })
        .collect();
    let mut expected = input[..1].to_vec();
    for _ in 0..REPLY_TIMES {
        expected.extend_from_slice(&input[1..]);
    }
    for client in clients {
        let (back, out) = client.join().unwrap();
        assert!(
            out.status.success() && back == expected,
            "{} bytes back\n{}\n{}",
            back.len(),
            output_text(&out),
            gw.log()
        );
    }
    let peak = peak_rss_kib(gw.child.id());
    // The bound (server.rs), per session: four queues of 16 x 32 KiB, 256 KiB of early bytes,
    // and the client's window of output in flight (OpenSSH's is 2 MiB).
    let bound = SESSIONS as u64 * (2048 + 256 + 2048);
    eprintln!(
        "gateway RSS: {idle} KiB idle, {peak} KiB at peak with {SESSIONS} sessions of 4 MiB up and 16 MiB down (bound +{bound} KiB)"
    );
    assert!(
        peak < idle + bound,
        "{SESSIONS} sessions took {} KiB, above the {bound} KiB bound\n{}",
        peak - idle,
        gw.log()
    );
    assert_eq!(gw.log().matches("session done").count(), SESSIONS, "{}", gw.log());
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory a process has had, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}
