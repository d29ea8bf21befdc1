//! `/healthz`, `/readyz` and `/metrics`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procs;
use crate::supervise::ChildState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChildLabel {
    pub child: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

/// Everything the agent exports.
#[derive(Default)]
pub struct Metrics {
    pub ssh_sessions: Gauge,
    pub builds_running: Gauge,
    pub store_free_bytes: Gauge,
    pub child_restarts: Family<ChildLabel, Counter>,
    pub push: crate::push::PushMetrics,
    pub ready: Gauge,
    pub draining: Gauge,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("nixpool_agent");
        r.register("ssh_sessions", "SSH connections open now", self.ssh_sessions.clone());
        r.register(
            "builds_running",
            "Builds running now (build users with a process)",
            self.builds_running.clone(),
        );
        r.register(
            "store_free_bytes",
            "Free bytes on the file system of /nix/store",
            self.store_free_bytes.clone(),
        );
        r.register(
            "child_restarts",
            "Restarts of a supervised child after a crash",
            self.child_restarts.clone(),
        );
        self.push.register(r);
        r.register("ready", "1 when /readyz answers 200", self.ready.clone());
        r.register("draining", "1 after SIGTERM", self.draining.clone());
    }
}

/// How long a successful probe of sshd and nix-daemon answers `/readyz`: a flood of probes must
/// not become a flood of SSH connections (sshd's `MaxStartups` would drop real clients).
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// What the endpoints look at.
pub struct HttpState {
    pub draining: AtomicBool,
    /// `/readyz` fails while the store's file system has fewer free bytes.
    pub min_free_bytes: u64,
    /// The last probe of sshd and nix-daemon; held while probing, so concurrent requests share one.
    pub probed: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// The last `/readyz` verdict, to log its changes.
    pub verdict: std::sync::Mutex<Option<Result<(), String>>>,
    pub ssh_port: u16,
    pub daemon_socket: PathBuf,
    pub store: PathBuf,
    pub build_uids: Vec<u32>,
    pub sshd: Arc<ChildState>,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub push_queue: PathBuf,
}

/// sshd answers with its banner on loopback.
pub async fn sshd_answers(port: u16) -> Result<(), String> {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if buf[..n].starts_with(b"SSH-") {
            Ok(())
        } else {
            Err("no SSH banner".to_string())
        }
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Connects to a Unix socket whatever the length of its path: a path longer than `sun_path`
/// (108 bytes, easily reached under a deep `--root`) is reached through `/proc/self/fd/<dir>`.
async fn connect_unix(socket: &std::path::Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    const SUN_PATH_MAX: usize = 100;
    if socket.as_os_str().len() < SUN_PATH_MAX {
        return tokio::net::UnixStream::connect(socket).await;
    }
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return tokio::net::UnixStream::connect(socket).await;
    };
    let dir = std::fs::File::open(dir)?;
    let short = std::path::Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    let stream = tokio::net::UnixStream::connect(&short).await;
    drop(dir);
    stream
}

const WORKER_MAGIC_1: u64 = 0x6e697863;
const WORKER_MAGIC_2: u64 = 0x6478696f;
const STDERR_LAST: u64 = 0x616c7473;
/// Protocol 1.21: old enough that every Nix since 2.0 speaks it.
const CLIENT_VERSION: u64 = 0x115;

/// nix-daemon completes the worker-protocol handshake on its socket (a store ping without
/// running `nix`).
pub async fn daemon_answers(socket: &std::path::Path) -> Result<(), String> {
    let probe = async {
        let mut s = connect_unix(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let io = |e: std::io::Error| format!("handshake: {e}");
        s.write_all(&WORKER_MAGIC_1.to_le_bytes()).await.map_err(io)?;
        let magic = s.read_u64_le().await.map_err(io)?;
        if magic != WORKER_MAGIC_2 {
            return Err(format!("handshake: bad magic {magic:#x}"));
        }
        let _daemon_version = s.read_u64_le().await.map_err(io)?;
        let mut hello = Vec::new();
        for word in [CLIENT_VERSION, 0, 0] {
            hello.extend_from_slice(&word.to_le_bytes());
        }
        s.write_all(&hello).await.map_err(io)?;
        match s.read_u64_le().await.map_err(io)? {
            STDERR_LAST => Ok(()),
            other => Err(format!("handshake: unexpected reply {other:#x}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), probe)
        .await
        .map_err(|_| "timed out".to_string())?
}

impl HttpState {
    /// Ready: not draining, room in the store, sshd accepts, nix-daemon answers.
    pub async fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining".into());
        }
        let free = self.store_free_bytes();
        if let Some(free) = free.filter(|f| *f < self.min_free_bytes) {
            return Err(format!(
                "store: {free} bytes free on {}, below {} (--ready-min-free-bytes); builds would fail \
                 with \"No space left on device\": free space (nix-collect-garbage) or give the pool a \
                 bigger store volume",
                self.store.display(),
                self.min_free_bytes
            ));
        }
        // One probe at a time; a request reuses a success younger than PROBE_REUSE, or any result
        // of a probe that ran while it waited.
        let asked = std::time::Instant::now();
        let mut probed = self.probed.lock().await;
        if let Some((at, result)) = &*probed
            && (*at >= asked || (result.is_ok() && at.elapsed() < PROBE_REUSE))
        {
            return result.clone();
        }
        let result = self.probe().await;
        *probed = Some((std::time::Instant::now(), result.clone()));
        result
    }

    async fn probe(&self) -> Result<(), String> {
        sshd_answers(self.ssh_port).await.map_err(|e| format!("sshd: {e}"))?;
        daemon_answers(&self.daemon_socket)
            .await
            .map_err(|e| format!("nix-daemon: {e}"))
    }

    /// Free bytes on the file system of the store (or of its parent before it exists).
    pub fn store_free_bytes(&self) -> Option<u64> {
        let fs = if self.store.exists() {
            self.store.as_path()
        } else {
            self.store.parent().unwrap_or(&self.store)
        };
        let st = nix::sys::statvfs::statvfs(fs).ok()?;
        Some(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    /// Refreshes the gauges that are read from the machine.
    pub fn refresh(&self) {
        let procs = procs::scan();
        self.metrics
            .ssh_sessions
            .set(procs::ssh_sessions(&procs, self.sshd.pid()).len() as i64);
        self.metrics
            .builds_running
            .set(procs::builds_running(&procs, &self.build_uids) as i64);
        if let Some(free) = self.store_free_bytes() {
            self.metrics.store_free_bytes.set(free as i64);
        }
        crate::push::refresh_metrics(&self.push_queue, &self.metrics.push);
        self.metrics.draining.set(self.draining.load(Ordering::SeqCst) as i64);
    }
}

pub fn router(health: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// What the health port answers while the agent waits before it can start (the store being
/// copied, the host key missing): alive, so that the liveness probe does not restart it, and
/// not ready, with the reason (the kubelet puts it in the pod's "Readiness probe failed" Event).
pub fn waiting_router(reason: Arc<std::sync::Mutex<String>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok: starting\n" }))
        .route(
            "/readyz",
            get(move || async move {
                let reason = reason.lock().expect("reason lock").clone();
                (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"))
            }),
        )
}

async fn readyz(State(h): State<Arc<HttpState>>) -> impl IntoResponse {
    let verdict = h.ready().await;
    h.metrics.ready.set(verdict.is_ok() as i64);
    {
        // Log each change, so the log tells when and why readiness flipped.
        let mut last = h.verdict.lock().expect("verdict lock");
        if last.as_ref() != Some(&verdict) {
            match &verdict {
                Ok(()) => tracing::info!("readiness: ready"),
                Err(reason) => tracing::warn!(%reason, "readiness: not ready"),
            }
            *last = Some(verdict.clone());
        }
    }
    match verdict {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn metrics(State(h): State<Arc<HttpState>>) -> impl IntoResponse {
    let h2 = h.clone();
    let _ = tokio::task::spawn_blocking(move || h2.refresh()).await;
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &h.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    /// Deep `--root`s make the daemon socket's path longer than `sun_path` (108 bytes).
    #[tokio::test]
    async fn a_socket_path_longer_than_sun_path_still_connects() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("a".repeat(60)).join("b".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let socket = deep.join("socket");
        assert!(socket.as_os_str().len() > 108);
        // Bind through the same /proc/self/fd trick (bind has the same limit).
        let dir = std::fs::File::open(&deep).unwrap();
        let short = format!("/proc/self/fd/{}/socket", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let _listener = std::os::unix::net::UnixListener::bind(&short).unwrap();
        assert!(super::connect_unix(&socket).await.is_ok());
        assert!(
            tokio::net::UnixStream::connect(&socket).await.is_err(),
            "the plain connect must hit the limit, or this test proves nothing"
        );
    }
}
