//! Command line. Every setting is a flag with an environment variable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Parser};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use nixpool_api::ports;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::health::{self, Http, Metrics, Readiness};
use crate::route::Slots;
use crate::server::{self, Gateway, Settings, now_unix};
use crate::{demand, discover, peers};

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::GATEWAY_SSH);
const DEFAULT_HTTP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::GATEWAY_HTTP);
/// After SIGTERM the listener keeps accepting this long, while the Service's endpoints drop it.
const LINGER: Duration = Duration::from_secs(5);

/// The pool's SSH front door. It presents the pool's host key, so clients' pinned machines lines
/// keep working. It lets in the pool's authorized keys (read at every login, so a revoked key
/// stops at once), and runs each Nix session (`nix-daemon --stdio`, `nix-store --serve`) on the
/// builder with the most free slots, with a key of its own. With every slot taken it holds the
/// session until one frees up.
///
/// Builders are either a fixed list (`--builder`, outside Kubernetes) or the Ready pods that
/// `--builders-selector` matches; exactly one of the two is required.
#[derive(Parser, Debug)]
#[command(name = "nixpool-gateway", version)]
#[command(group(ArgGroup::new("builder_source").required(true).args(["builders", "builders_selector"])))]
pub struct Cli {
    /// Address the SSH server listens on.
    #[arg(long, env = "NIXPOOL_GATEWAY_LISTEN", default_value_t = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address of the HTTP server: /healthz (200 while the process runs), /readyz (200 once the
    /// SSH port is bound and the builder pods were listed; 503 after SIGTERM) and /metrics
    /// (OpenMetrics).
    #[arg(long, env = "NIXPOOL_GATEWAY_HTTP_ADDR", default_value_t = DEFAULT_HTTP)]
    http_addr: SocketAddr,
    /// The pool's host key (OpenSSH private key file, the pool's host-key Secret).
    #[arg(long, env = "NIXPOOL_GATEWAY_HOST_KEY")]
    host_key: PathBuf,
    /// The pool's authorized keys (the file of the `<pool>-authorized-keys` ConfigMap), read at
    /// every login.
    #[arg(long, env = "NIXPOOL_GATEWAY_AUTHORIZED_KEYS")]
    authorized_keys: PathBuf,
    /// The gateway's own private key, which it logs in to builders with. Its public half must be
    /// one of the pool's authorized keys; a client that logs in with it is refused.
    #[arg(long, env = "NIXPOOL_GATEWAY_BUILDER_KEY")]
    builder_key: PathBuf,
    /// The user clients log in as, and the gateway logs in to builders as.
    #[arg(long, env = "NIXPOOL_GATEWAY_USER", default_value = "builder")]
    user: String,
    /// A fixed builder, as HOST:PORT=SLOTS (SLOTS is its maxJobs); its name in logs and metrics
    /// is HOST:PORT. Repeat for each builder (or separate them with commas). For use outside
    /// Kubernetes; exactly one of --builder and --builders-selector is required.
    #[arg(
        long = "builder",
        env = "NIXPOOL_GATEWAY_BUILDERS",
        value_delimiter = ',',
        value_name = "HOST:PORT=SLOTS"
    )]
    builders: Vec<String>,
    /// Discover the builders: the Ready, non-terminating pods in --namespace that match this
    /// label selector (e.g. `app.kubernetes.io/name=nixpool-builder,app.kubernetes.io/instance=POOL`),
    /// watched through the Kubernetes API (in-cluster credentials, or KUBECONFIG). Exactly one of
    /// --builder and --builders-selector is required.
    #[arg(long, env = "NIXPOOL_GATEWAY_BUILDERS_SELECTOR", value_name = "SELECTOR")]
    builders_selector: Option<String>,
    /// The SSH port of discovered builder pods.
    #[arg(long, env = "NIXPOOL_GATEWAY_BUILDER_PORT", default_value_t = ports::SSH)]
    builder_port: u16,
    /// Sessions each discovered builder takes at once (the pool's maxJobs).
    #[arg(long, env = "NIXPOOL_GATEWAY_SLOTS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    slots: u32,
    /// The namespace of the builder pods and the demand ConfigMap. Default: the namespace of the
    /// gateway's ServiceAccount in a pod, or the current context's with KUBECONFIG.
    #[arg(long, env = "NIXPOOL_GATEWAY_NAMESPACE")]
    namespace: Option<String>,
    /// This gateway pod's name: its key in the demand ConfigMap.
    #[arg(long, env = "NIXPOOL_GATEWAY_POD_NAME")]
    pod_name: Option<String>,
    /// The ConfigMap to write this gateway's demand report to (sessions waiting and active, and
    /// how each builder is used), under --pod-name, for the operator to scale the pool by.
    /// Needs --pod-name.
    #[arg(
        long,
        env = "NIXPOOL_GATEWAY_DEMAND_CONFIG_MAP",
        requires = "pod_name",
        value_name = "NAME"
    )]
    demand_config_map: Option<String>,
    /// The pool's gateway pods in --namespace (e.g.
    /// `app.kubernetes.io/instance=POOL,app.kubernetes.io/name=nixpool-gateway`), this one
    /// included. The gateway counts the other gateways' sessions on each builder, from their
    /// reports in --demand-config-map, against the builders' slots; with this selector only the
    /// reports of live gateway pods count, the keys of gateway pods that are gone are removed,
    /// and simultaneous sessions at two gateways are spread by the gateways' order by name.
    /// Needs --demand-config-map.
    #[arg(
        long,
        env = "NIXPOOL_GATEWAY_GATEWAYS_SELECTOR",
        requires = "demand_config_map",
        value_name = "SELECTOR"
    )]
    gateways_selector: Option<String>,
    /// How long a session waits for a free builder slot before it is refused.
    #[arg(long, env = "NIXPOOL_GATEWAY_HOLD_SECONDS", default_value_t = 300)]
    hold_seconds: u64,
    /// TCP connections open at once; beyond it a new connection is closed at once. Each takes
    /// about 1.5 MiB at most with one session (see the server module's docs).
    #[arg(long, env = "NIXPOOL_GATEWAY_MAX_CONNECTIONS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
}

/// `HOST:PORT=SLOTS`.
fn parse_builder(s: &str) -> anyhow::Result<(String, u32)> {
    let (address, slots) = s
        .rsplit_once('=')
        .with_context(|| format!("--builder {s:?}: write HOST:PORT=SLOTS, e.g. 10.244.1.5:22=2"))?;
    let slots: u32 = slots
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("--builder {s:?}: SLOTS must be a positive number (the builder's maxJobs)"))?;
    if !address.contains(':') {
        anyhow::bail!("--builder {s:?}: give the port too, e.g. {address}:22={slots}");
    }
    Ok((address.to_string(), slots))
}

fn load_key(flag: &str, path: &std::path::Path) -> anyhow::Result<russh::keys::PrivateKey> {
    russh::keys::load_secret_key(path, None)
        .with_context(|| format!("{flag} {}: not an unencrypted OpenSSH private key", path.display()))
}

/// A Kubernetes client: in-cluster credentials, or else KUBECONFIG (so it runs on a laptop).
async fn kube_client() -> anyhow::Result<kube::Client> {
    let config = match kube::Config::incluster() {
        Ok(c) => c,
        Err(_) => kube::Config::infer()
            .await
            .context("no Kubernetes API: not in a pod, and no usable KUBECONFIG")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

impl Cli {
    pub fn run(self) -> ExitCode {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,russh=warn".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("nixpool-gateway: starting the runtime: {e}");
                return ExitCode::from(1);
            }
        };
        let result = runtime.block_on(self.start());
        runtime.shutdown_timeout(Duration::from_secs(1));
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nixpool-gateway: {e:#}");
                ExitCode::from(1)
            }
        }
    }

    async fn start(self) -> anyhow::Result<()> {
        // Every field named, so a flag that is never used fails to compile.
        let Cli {
            listen,
            http_addr,
            host_key,
            authorized_keys,
            builder_key,
            user,
            builders,
            builders_selector,
            builder_port,
            slots: slots_per_builder,
            namespace,
            pod_name,
            demand_config_map,
            gateways_selector,
            hold_seconds,
            max_connections,
        } = self;
        let fixed = builders
            .iter()
            .map(|b| parse_builder(b))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let host_key = load_key("--host-key", &host_key)?;
        let builder_key = load_key("--builder-key", &builder_key)?;
        std::fs::metadata(&authorized_keys)
            .with_context(|| format!("--authorized-keys {}: cannot read it", authorized_keys.display()))?;
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;

        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let readiness = Arc::new(Readiness::new(builders_selector.is_none()));
        let settings = Settings {
            authorized_keys,
            builder_key: Arc::new(builder_key),
            host_public: host_key.public_key().clone(),
            builder_user: user,
            hold: Duration::from_secs(hold_seconds),
            slots_per_builder,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        };
        let slots = Slots::new(fixed.into_iter().map(|(a, n)| (a.clone(), a, n)), now_unix());
        let gw = Arc::new(Gateway::new(settings, slots, metrics, Arc::clone(&readiness)));

        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen {listen}: cannot bind"))?;
        let http = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("--http-addr {http_addr}: cannot bind"))?;
        let router = health::router(Arc::new(Http {
            readiness: Arc::clone(&readiness),
            registry,
        }));
        tokio::spawn(axum::serve(http, router).into_future());

        if builders_selector.is_some() || demand_config_map.is_some() {
            let client = kube_client().await?;
            let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
            if let Some(selector) = builders_selector {
                info!(
                    namespace,
                    selector,
                    port = builder_port,
                    slots = slots_per_builder,
                    "watching builder pods"
                );
                let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
                tokio::spawn(discover::run(Arc::clone(&gw), api, selector, builder_port));
            }
            if let (Some(config_map), Some(pod)) = (demand_config_map, pod_name) {
                info!(namespace, config_map, key = pod, "writing demand reports");
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
                tokio::spawn(demand::run(
                    Arc::clone(&gw),
                    api.clone(),
                    config_map.clone(),
                    pod.clone(),
                ));
                info!(
                    namespace,
                    config_map,
                    gateways = ?gateways_selector,
                    "counting the other gateways' sessions"
                );
                let gateways = gateways_selector.map(|selector| (Api::<Pod>::namespaced(client, &namespace), selector));
                tokio::spawn(peers::run(Arc::clone(&gw), api, config_map, gateways, pod));
            }
        }

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async {
            let _ = stop_rx.await;
        };
        let config = server::ssh_config(host_key);
        tokio::spawn(server::accept(Arc::clone(&gw), config, listener, stop));
        readiness.listening();
        info!(listen = %listen, http = %http_addr, "listening");

        let first = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        readiness.drain();
        info!(
            signal = first,
            "draining: /readyz answers 503; new connections are still taken for {} s",
            LINGER.as_secs()
        );
        let second = tokio::select! {
            () = tokio::time::sleep(LINGER) => None,
            _ = sigterm.recv() => Some("SIGTERM"),
            _ = sigint.recv() => Some("SIGINT"),
        };
        let _ = stop_tx.send(());
        let mut sessions = gw.sessions.subscribe();
        let second = match second {
            Some(s) => Some(s),
            None => {
                info!(
                    sessions = *sessions.borrow(),
                    "no longer accepting connections; exiting once the open sessions end (send SIGTERM again to exit now)"
                );
                tokio::select! {
                    _ = sessions.wait_for(|n| *n == 0) => None,
                    _ = sigterm.recv() => Some("SIGTERM"),
                    _ = sigint.recv() => Some("SIGINT"),
                }
            }
        };
        match second {
            None => info!("no session open; exiting"),
            Some(signal) => info!(signal, sessions = *sessions.borrow(), "second signal: exiting now"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn builders_are_host_port_and_slots() {
        assert_eq!(parse_builder("10.0.0.1:22=2").unwrap(), ("10.0.0.1:22".into(), 2));
        assert_eq!(parse_builder("[::1]:2222=1").unwrap(), ("[::1]:2222".into(), 1));
        for bad in ["10.0.0.1:22", "10.0.0.1=2", "10.0.0.1:22=0", "10.0.0.1:22=x"] {
            let e = parse_builder(bad).unwrap_err().to_string();
            assert!(e.contains("--builder"), "{e}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_operators_command_line_parses() {
        let cli = Cli::try_parse_from([
            "nixpool-gateway",
            "--listen=0.0.0.0:2222",
            "--http-addr=0.0.0.0:8091",
            "--host-key=/k",
            "--authorized-keys=/a",
            "--builder-key=/g",
            "--user=builder",
            "--hold-seconds=300",
            "--namespace=ns",
            "--pod-name=pool-gateway-abc",
            "--builders-selector=app.kubernetes.io/name=nixpool-builder,app.kubernetes.io/instance=pool",
            "--builder-port=22",
            "--slots=4",
            "--demand-config-map=pool-gateway-demand",
            "--gateways-selector=app.kubernetes.io/instance=pool,app.kubernetes.io/name=nixpool-gateway",
        ])
        .unwrap();
        assert_eq!(
            cli.gateways_selector.as_deref(),
            Some("app.kubernetes.io/instance=pool,app.kubernetes.io/name=nixpool-gateway")
        );
        assert_eq!(
            cli.builders_selector.as_deref(),
            Some("app.kubernetes.io/name=nixpool-builder,app.kubernetes.io/instance=pool"),
            "a selector's commas are not split"
        );
        assert_eq!((cli.slots, cli.max_connections), (4, 1000));
        let base = [
            "nixpool-gateway",
            "--host-key=/k",
            "--authorized-keys=/a",
            "--builder-key=/g",
        ];
        let defaults = Cli::try_parse_from(base.iter().chain(&["--builder=10.0.0.1:22=1"])).unwrap();
        assert_eq!(defaults.listen.port(), ports::GATEWAY_SSH);
        assert_eq!(defaults.http_addr.port(), ports::GATEWAY_HTTP);
        let both = Cli::try_parse_from(
            base.iter()
                .chain(&["--builder=10.0.0.1:22=1", "--builders-selector=a=b"]),
        );
        assert!(both.is_err(), "--builder and --builders-selector together");
        let no_pod = Cli::try_parse_from(base.iter().chain(&["--builders-selector=a=b", "--demand-config-map=d"]));
        assert!(no_pod.unwrap_err().to_string().contains("--pod-name"));
        let no_map = Cli::try_parse_from(
            base.iter()
                .chain(&["--builders-selector=a=b", "--gateways-selector=g=w"]),
        );
        assert!(no_map.unwrap_err().to_string().contains("--demand-config-map"));
    }
}
