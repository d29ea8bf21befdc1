//! Command line: `run`, `crd`, `render`.

use crate::reconcile::validate::Images;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kube::CustomResourceExt;
use kube::runtime::events::{Recorder, Reporter};
use nixpool_api::NixBuilderPool;

use crate::context::Context;
use crate::leader::{Elector, Leading};
use crate::metrics::{Metrics, VerbLabels};
use crate::telemetry::{self, LogFormat};
use crate::{http, reconcile};

/// The builder image pools use when they name none: the release pushes it at the version of this
/// workspace, which is the chart's `appVersion` (a chart test checks they agree), never `latest`.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/nixpool/nixpool-builder:", env!("CARGO_PKG_VERSION"));

#[derive(Parser, Debug)]
#[command(
    name = "nixpool-operator",
    version,
    about = "Runs pools of Nix remote builders on Kubernetes from NixBuilderPool resources",
    long_about = "Runs pools of Nix remote builders on Kubernetes.\n\n\
        Each NixBuilderPool (nixpool.dev/v1alpha1, short name nbp) becomes a Deployment of builder pods, \
        a Service, an SSH host-key Secret, an authorized-keys ConfigMap and the agent's ConfigMap; its status \
        carries the endpoint, the pinned host key and a ready-made /etc/nix/machines line.",
    after_help = "Examples:\n  nixpool-operator crd | kubectl apply -f -\n  nixpool-operator run --namespace ci\n  nixpool-operator render -f examples/minimal.yaml"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster of KUBECONFIG (or the in-cluster service account).
    Run(RunArgs),
    /// Print the NixBuilderPool CustomResourceDefinition (YAML) to install with kubectl apply,
    /// or its field reference (Markdown).
    Crd {
        /// yaml: the CRD; markdown: the field reference (docs/crd-reference.md).
        #[arg(long, value_enum, default_value = "yaml")]
        format: CrdFormat,
    },
    /// Print, without a cluster, the objects the operator would apply for a pool (YAML), for
    /// review in GitOps. The host key is freshly generated and its private half redacted.
    Render(RenderArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CrdFormat {
    Yaml,
    Markdown,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "NIXPOOL_NAMESPACE")]
    namespace: Option<String>,
    #[command(flatten)]
    images: ImageArgs,
    /// Log format.
    #[arg(long, env = "NIXPOOL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "NIXPOOL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Elect a leader on a Lease so that only one replica reconciles (keep on with more than one replica).
    #[arg(long, env = "NIXPOOL_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "NIXPOOL_LEASE_NAME", default_value = "nixpool-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (default: the operator's own, from POD_NAMESPACE, else "default").
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: POD_NAME, else host name and PID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds between looks at an unchanged pool (changes are seen at once through watches).
    #[arg(long, env = "NIXPOOL_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Pools reconciled at once: bounds the operator's memory when many pools change at once
    /// (1000 new pools peaked at 77 MiB with 16, 217 MiB unbounded).
    #[arg(long, env = "NIXPOOL_MAX_CONCURRENT_RECONCILES", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_reconciles: u16,
}

/// Which images pools may run, and how they pull them: the same for `run` and `render`.
#[derive(Args, Debug)]
struct ImageArgs {
    /// Builder image for pools whose spec.image is empty.
    #[arg(long, env = "NIXPOOL_DEFAULT_IMAGE", default_value = DEFAULT_IMAGE)]
    default_image: String,
    /// Registry/repository prefixes pools may take spec.image from (repeat, or comma-separate);
    /// a prefix ending in `/` allows everything below it. Default: only the default image's
    /// repository. A pool runs its image as a privileged pod, so keep this to images you trust.
    #[arg(
        long = "allowed-image-prefix",
        env = "NIXPOOL_ALLOWED_IMAGE_PREFIXES",
        value_delimiter = ','
    )]
    allowed_image_prefixes: Vec<String>,
    /// Image pull Secret (by name, in the pool's namespace) for builder and gateway pods of pools
    /// whose spec.imagePullSecrets is empty (repeat, or comma-separate). A pool's own list wins.
    #[arg(
        long = "default-image-pull-secret",
        env = "NIXPOOL_DEFAULT_IMAGE_PULL_SECRETS",
        value_name = "NAME",
        value_delimiter = ',',
        value_parser = secret_name
    )]
    default_image_pull_secrets: Vec<String>,
}

impl ImageArgs {
    fn images(&self) -> Images {
        let ImageArgs {
            default_image,
            allowed_image_prefixes,
            default_image_pull_secrets,
        } = self;
        Images::new(default_image, allowed_image_prefixes.clone())
            .with_default_pull_secrets(default_image_pull_secrets.clone())
    }
}

#[derive(Args, Debug)]
struct RenderArgs {
    /// The pool's YAML file (`-` for stdin), as you would `kubectl apply` it.
    #[arg(short = 'f', long)]
    file: PathBuf,
    #[command(flatten)]
    images: ImageArgs,
    /// Render as if the server served policy/v1 PodDisruptionBudgets.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pdb: bool,
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Crd {
                format: CrdFormat::Yaml,
            } => {
                print!("{}", crd_yaml());
                Ok(())
            }
            Command::Crd {
                format: CrdFormat::Markdown,
            } => {
                print!("{}", crate::crd_reference::markdown());
                Ok(())
            }
            // Every field named, so a flag that is never used fails to compile.
            Command::Render(RenderArgs { file, images, pdb }) => {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin()).context("reading the pool from stdin")?
                } else {
                    std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
                };
                print!("{}", crate::render::render(&text, &images.images(), pdb)?);
                Ok(())
            }
            Command::Run(args) => run(args).await,
        }
    }
}

/// A Secret's name, as `--default-image-pull-secret` takes it.
fn secret_name(name: &str) -> Result<String, String> {
    if nixpool_api::rules::is_dns_subdomain(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?} is not a Secret name: give the name of a Secret (lower-case letters, digits, '-' and '.'), as `kubectl get secret` lists it"
        ))
    }
}

/// The CRD as YAML: what `crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    format!(
        "# Generated by `nixpool-operator crd`; do not edit.\n{}",
        serde_norway::to_string(&NixBuilderPool::crd()).expect("the CRD serializes")
    )
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Every field named, so a flag that is never used fails to compile.
    let RunArgs {
        namespace,
        images,
        log_format,
        http_addr,
        leader_elect,
        lease_name,
        lease_namespace,
        identity,
        resync_seconds,
        max_concurrent_reconciles,
    } = args;
    telemetry::init(log_format);
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let health = http::HttpState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = http::serve(http_addr, health).await {
            tracing::error!(error = %e, "health server stopped");
            std::process::exit(1);
        }
    });

    let config = kube::Config::infer().await.context(
        "no Kubernetes configuration found: set KUBECONFIG (or ~/.kube/config), or run in a pod with a service account",
    )?;
    let identity = identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    // Count every request the controller sends (the Lease's renewals go through their own
    // client), name this replica in its user agent (audit logs tell replicas apart by it), and,
    // once an elector leads, send requests only while this replica leads.
    let leading = Leading::default();
    let guard = leading.clone();
    let counted = metrics.api_requests.clone();
    let user_agent =
        ::http::HeaderValue::from_str(&format!("nixpool-operator/{} ({identity})", env!("CARGO_PKG_VERSION"))).ok();
    let client = kube::client::ClientBuilder::try_from(config.clone())?
        .with_layer(&tower::util::MapRequestLayer::new(
            move |mut req: ::http::Request<kube::client::Body>| {
                counted
                    .get_or_create(&VerbLabels::of(req.method().as_str(), req.uri()))
                    .inc();
                if let Some(agent) = &user_agent {
                    req.headers_mut().insert(::http::header::USER_AGENT, agent.clone());
                }
                req
            },
        ))
        .with_layer(&tower::util::MapFutureLayer::new(move |request| {
            let guard = guard.clone();
            async move { guard.guard(request).await }
        }))
        .build();
    let lease_client = kube::Client::try_from(config)?;
    let version = client
        .apiserver_version()
        .await
        .context("the Kubernetes API did not answer; check KUBECONFIG and the network")?;
    tracing::info!(server = %version.git_version, "connected");
    ready.store(true, Ordering::Relaxed);

    let with_pdb = serves_policy_v1(&client).await?;
    if !with_pdb {
        tracing::info!("the server does not serve policy/v1: pools get no PodDisruptionBudget");
    }

    let elector = leader_elect.then(|| Elector::new(lease_client, &lease_namespace, &lease_name, &identity, leading));
    if let Some(e) = &elector {
        e.acquire().await?;
        metrics.leader.set(1);
    }

    let reporter = Reporter {
        controller: nixpool_api::OPERATOR_NAME.into(),
        instance: Some(identity),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
        recorder: Recorder::new(client, reporter.clone()),
        reporter,
        images: images.images(),
        with_pdb,
        resync: Duration::from_secs(resync_seconds),
        failures: Default::default(),
        stores: Default::default(),
        keys: Default::default(),
        rollouts: Default::default(),
        statuses: Default::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(reconcile::run(ctx, namespace, max_concurrent_reconciles, async move {
        let _ = stop_rx.await;
    }));
    let lost = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        err = lost => {
            tracing::error!(error = %err, "lost leadership; exiting so that a restart re-elects");
            std::process::exit(1);
        }
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
        }
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), controller).await;
    if let Some(e) = &elector {
        e.release().await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Whether the API server serves PodDisruptionBudgets at policy/v1 (1.21+).
async fn serves_policy_v1(client: &kube::Client) -> anyhow::Result<bool> {
    let groups = client.list_api_groups().await.context("listing API groups")?;
    Ok(groups
        .groups
        .iter()
        .any(|g| g.name == "policy" && g.versions.iter().any(|v| v.version == "v1")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn default_image_pull_secrets_repeat_or_comma_separate_and_must_be_secret_names() {
        let cli = Cli::try_parse_from([
            "nixpool-operator",
            "run",
            "--default-image-pull-secret",
            "regcred,mirror",
            "--default-image-pull-secret=other",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run: {cli:?}")
        };
        assert_eq!(args.images.default_image_pull_secrets, ["regcred", "mirror", "other"]);

        let err = Cli::try_parse_from(["nixpool-operator", "run", "--default-image-pull-secret", "Reg_Cred"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--default-image-pull-secret") && err.contains("\"Reg_Cred\" is not a Secret name"),
            "{err}"
        );
    }

    #[test]
    fn the_crd_reference_in_docs_matches_the_schema() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/crd-reference.md");
        let checked_in = std::fs::read_to_string(path).expect("docs/crd-reference.md exists");
        assert!(
            checked_in == crate::crd_reference::markdown(),
            "docs/crd-reference.md is out of date: run `cargo run -p nixpool-operator -- crd --format markdown > docs/crd-reference.md`"
        );
    }

    /// `crds/` is what users install; it must be exactly what the Rust types generate.
    #[test]
    fn the_checked_in_crd_matches_the_rust_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../crds/nixbuilderpools.nixpool.dev.yaml"
        );
        let checked_in = std::fs::read_to_string(path).expect("crds/nixbuilderpools.nixpool.dev.yaml exists");
        assert!(
            checked_in == crd_yaml(),
            "crds/nixbuilderpools.nixpool.dev.yaml is out of date: run `cargo run -p nixpool-operator -- crd > crds/nixbuilderpools.nixpool.dev.yaml`"
        );
    }
}
