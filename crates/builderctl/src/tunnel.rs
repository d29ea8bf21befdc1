//! `builderctl tunnel`: a local port that reaches a pool through the Kubernetes API
//! (`pods/portforward`, the websocket protocol), for pools with no address outside the cluster.
//!
//! Each accepted local connection gets its own port-forward to a Ready pod of the pool's
//! Service (builders, or the gateway pods of an autoscaling pool), so a pod that goes away
//! costs only the connections it carried: the next one goes to another Ready pod. A forward is
//! good once sshd's version banner came back through it (the server speaks first in SSH); until
//! then it is retried, with jittered exponential backoff, on the next Ready pod.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::ListParams;
use nixpool_api::{MachinesEntry, NixBuilderPool, names, ports};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::sshconfig::{self, SshConfig};

/// The local port when `--port` is not given: fixed, so that the ssh_config drop-in written
/// once with `--install` stays right across restarts of the tunnel.
pub const DEFAULT_PORT: u16 = 22122;

/// How long a new forward may take to bring back sshd's banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "Service {ns}/{name} of the pool: {source}. Is the pool applied and the operator running (`kubectl get nbp -n {ns}`)? You need `get` on services"
    )]
    Service {
        ns: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Service {ns}/{name} has no pod selector; it is not a nixpool pool's Service")]
    NoSelector { ns: String, name: String },
    #[error("listing pods ({selector}) in {ns}: {source}. You need `list` on pods")]
    Pods {
        ns: String,
        selector: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "no Ready pod with an `ssh` port matches the pool's Service ({selector}) in {ns}; `kubectl get pods -n {ns} -l {selector}` shows them"
    )]
    NoReadyPod { ns: String, selector: String },
    #[error("port-forward to pod {pod}: {source}. You need `create` (and `get`) on pods/portforward")]
    Forward {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("port-forward to pod {pod} port {port}: {message}")]
    Refused { pod: String, port: u16, message: String },
    #[error("pod {pod} closed the forward before sshd said hello (is it shutting down?)")]
    NoBanner { pod: String },
    #[error("pod {pod}: no sshd banner within {}s", BANNER_TIMEOUT.as_secs())]
    Timeout { pod: String },
    #[error("pod {pod}: reading the forward: {source}")]
    Read {
        pod: String,
        #[source]
        source: std::io::Error,
    },
}

/// A pod to forward to and its sshd port (the container port named `ssh`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub pod: String,
    pub port: u16,
}

/// The container port named [`ports::SSH_NAME`] of a pod: sshd of a builder, or the gateway's.
pub fn ssh_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(ports::SSH_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Whether a pod takes new connections: Ready, and not being deleted (a draining builder
/// keeps running its builds but takes no new ones).
pub fn takes_connections(pod: &Pod) -> bool {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && pod.metadata.deletion_timestamp.is_none()
}

/// The pods a connection may go to, in name order.
pub fn targets(pods: &[Pod]) -> Vec<Target> {
    let mut t: Vec<Target> = pods
        .iter()
        .filter(|p| takes_connections(p))
        .filter_map(|p| {
            Some(Target {
                pod: p.metadata.name.clone()?,
                port: ssh_port(p)?,
            })
        })
        .collect();
    t.sort_by(|a, b| a.pod.cmp(&b.pod));
    t
}

/// The `n`th connection's pod: round robin over the candidates, so connections spread over the
/// builders as the Service would spread them.
pub fn pick(targets: &[Target], n: usize) -> Option<&Target> {
    (!targets.is_empty()).then(|| &targets[n % targets.len()])
}

/// A Service's selector as a label selector string (`k=v,k2=v2`).
pub fn selector_of(svc: &Service) -> Option<String> {
    let sel = svc.spec.as_ref()?.selector.as_ref().filter(|s| !s.is_empty())?;
    Some(
        sel.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// The drop-in that reaches pool `p` through a tunnel on `port`: the pool's own Host alias,
/// user and pinned host key (of its machines line `e`), at 127.0.0.1. `HostKeyAlias` makes ssh
/// check the pool's host key, not whatever key 127.0.0.1 had before.
pub fn ssh_config(p: &NixBuilderPool, key: &Path, known_dir: &Path, e: &MachinesEntry, port: u16) -> SshConfig {
    SshConfig {
        written_by: "builderctl tunnel --install",
        machines_line_by: "builderctl tunnel --install",
        host: LOCALHOST.into(),
        port,
        ..sshconfig::for_pool(p, key, known_dir, e)
    }
}

/// Where the tunnel listens: loopback only, so that it lets in nobody the pool would not.
pub const LOCALHOST: &str = "127.0.0.1";

/// The backoff between attempts to open a forward: jittered, 250 ms doubling to 5 s, 8 times
/// (about 25 s in all, the time a replaced builder takes to become Ready).
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(8)
}

/// An open forward: its first bytes (sshd's banner) already read.
struct Forward {
    target: Target,
    forwarder: kube::api::Portforwarder,
    stream: tokio::io::DuplexStream,
    first: Vec<u8>,
}

/// Forwards connections to one pool.
pub struct Tunnel {
    pods: Api<Pod>,
    services: Api<Service>,
    ns: String,
    service: String,
    /// Connections so far: which pod the next one goes to.
    count: AtomicUsize,
}

impl Tunnel {
    pub fn new(client: kube::Client, ns: &str, pool: &str) -> Self {
        Self {
            pods: Api::namespaced(client.clone(), ns),
            services: Api::namespaced(client, ns),
            ns: ns.into(),
            service: names::workload(pool),
            count: AtomicUsize::new(0),
        }
    }

    /// The pool's Ready pods now (read through its Service's selector, as the Service routes).
    pub async fn targets(&self) -> Result<Vec<Target>, TunnelError> {
        let svc = self
            .services
            .get(&self.service)
            .await
            .map_err(|source| TunnelError::Service {
                ns: self.ns.clone(),
                name: self.service.clone(),
                source,
            })?;
        let selector = selector_of(&svc).ok_or_else(|| TunnelError::NoSelector {
            ns: self.ns.clone(),
            name: self.service.clone(),
        })?;
        let pods = self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| TunnelError::Pods {
                ns: self.ns.clone(),
                selector: selector.clone(),
                source,
            })?;
        let t = targets(&pods.items);
        if t.is_empty() {
            return Err(TunnelError::NoReadyPod {
                ns: self.ns.clone(),
                selector,
            });
        }
        Ok(t)
    }

    /// One attempt: a Ready pod, a forward to its sshd, and sshd's first bytes through it.
    async fn open_once(&self, n: usize) -> Result<Forward, TunnelError> {
        let all = self.targets().await?;
        let target = pick(&all, n).cloned().expect("targets() returns at least one");
        let mut forwarder = self
            .pods
            .portforward(&target.pod, &[target.port])
            .await
            .map_err(|source| TunnelError::Forward {
                pod: target.pod.clone(),
                source,
            })?;
        let (Some(mut stream), Some(error)) = (forwarder.take_stream(target.port), forwarder.take_error(target.port))
        else {
            unreachable!("a forward of one port has that port's stream and error channel")
        };
        let mut buf = vec![0u8; 4096];
        let read = tokio::time::timeout(BANNER_TIMEOUT, async {
            tokio::select! {
                r = stream.read(&mut buf) => Ok(r),
                e = error => Err(e),
            }
        })
        .await;
        let pod = target.pod.clone();
        let failed = |e: TunnelError| -> Result<Forward, TunnelError> {
            forwarder.abort();
            Err(e)
        };
        match read {
            Err(_) => failed(TunnelError::Timeout { pod }),
            Ok(Err(message)) => failed(match message {
                Some(message) => TunnelError::Refused {
                    pod,
                    port: target.port,
                    message,
                },
                None => TunnelError::NoBanner { pod },
            }),
            Ok(Ok(Err(source))) => failed(TunnelError::Read { pod, source }),
            Ok(Ok(Ok(0))) => failed(TunnelError::NoBanner { pod }),
            Ok(Ok(Ok(len))) => {
                buf.truncate(len);
                Ok(Forward {
                    target,
                    forwarder,
                    stream,
                    first: buf,
                })
            }
        }
    }

    /// A forward for connection `id`, retried with [`backoff`] on the next pod each time.
    async fn open(&self, id: usize) -> Result<Forward, TunnelError> {
        (|| self.open_once(self.count.fetch_add(1, Ordering::Relaxed)))
            .retry(backoff())
            .notify(|e, wait| eprintln!("connection {id}: {e}; retrying in {:.1}s", wait.as_secs_f32()))
            .await
    }

    /// Serves `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut id = 0usize;
        loop {
            let (conn, _) = listener.accept().await?;
            id += 1;
            let tunnel = self.clone();
            tokio::spawn(async move { tunnel.carry(id, conn).await });
        }
    }

    /// Carries one local connection to a pod and back, until either side closes.
    async fn carry(&self, id: usize, mut conn: TcpStream) {
        let mut fwd = match self.open(id).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("connection {id}: given up: {e}");
                return;
            }
        };
        eprintln!("connection {id}: pod {} port {}", fwd.target.pod, fwd.target.port);
        if conn.write_all(&fwd.first).await.is_ok() {
            let (mut local_r, mut local_w) = conn.split();
            let (mut pod_r, mut pod_w) = tokio::io::split(&mut fwd.stream);
            // SSH needs no half-closed connection: the session ends when either side closes.
            tokio::select! {
                _ = tokio::io::copy(&mut local_r, &mut pod_w) => {}
                _ = tokio::io::copy(&mut pod_r, &mut local_w) => {}
            }
        }
        fwd.forwarder.abort();
        eprintln!("connection {id}: closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, deleting: bool, port: Option<(&str, i32)>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "deletionTimestamp": deleting.then_some("2026-01-01T00:00:00Z"),
            },
            "spec": {"containers": [{
                "name": "builder",
                "ports": port.map(|(n, p)| vec![serde_json::json!({"name": n, "containerPort": p})]),
            }]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_pods_that_are_not_deleted_and_have_an_ssh_port_are_targets() {
        let pods = vec![
            pod("b", true, false, Some(("ssh", 22))),
            pod("a", true, false, Some(("ssh", 2222))),
            pod("unready", false, false, Some(("ssh", 22))),
            pod("draining", true, true, Some(("ssh", 22))),
            pod("noport", true, false, Some(("health", 8090))),
            pod("noports", true, false, None),
        ];
        assert_eq!(
            targets(&pods),
            vec![
                Target {
                    pod: "a".into(),
                    port: 2222
                },
                Target {
                    pod: "b".into(),
                    port: 22
                },
            ]
        );
    }

    #[test]
    fn connections_go_round_robin_and_none_when_no_pod_is_ready() {
        let t = targets(&[
            pod("a", true, false, Some(("ssh", 22))),
            pod("b", true, false, Some(("ssh", 22))),
        ]);
        let picked: Vec<&str> = (0..4).map(|n| pick(&t, n).unwrap().pod.as_str()).collect();
        assert_eq!(picked, ["a", "b", "a", "b"]);
        assert_eq!(pick(&[], 3), None);
    }

    #[test]
    fn the_services_selector_becomes_a_label_selector() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "spec": {"selector": {"app.kubernetes.io/name": "nixpool-gateway", "app.kubernetes.io/instance": "p"}}
        }))
        .unwrap();
        assert_eq!(
            selector_of(&svc).as_deref(),
            Some("app.kubernetes.io/instance=p,app.kubernetes.io/name=nixpool-gateway")
        );
        let empty: Service = serde_json::from_value(serde_json::json!({"spec": {"selector": {}}})).unwrap();
        assert_eq!(selector_of(&empty), None);
    }
}
