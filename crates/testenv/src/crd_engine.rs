//! Kubernetes 1.36's CRD engine next to the 1.20 test control plane.
//!
//! `apiextensions-apiserver` is the part of kube-apiserver that accepts CustomResourceDefinitions
//! (structural schema, CEL compilation and its cost budget) and serves custom resources (OpenAPI
//! validation, defaulting, CEL rules). Built from Debian sid's Go package by
//! `hack/build-apiextensions-apiserver.sh`, it runs here as a standalone server: against the
//! control plane's etcd under its own key prefix, delegating authentication and authorization
//! to the 1.20 kube-apiserver, on a free loopback port. It serves only
//! `apiextensions.k8s.io` and the custom resources of the CRDs it was given (`/api` is 404), so
//! talk to it with a kube client's typed or dynamic `Api`s, not kubectl.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cp = nixpool_testenv::ControlPlane::shared();
//! let engine = nixpool_testenv::crd_engine::CrdEngine::start(cp).await?;
//! let client = engine.client().await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::{ADMIN_TOKEN, ControlPlane, cache_dir, free_port};

/// The Debian package (`golang-k8s-apiextensions-apiserver-dev`, sid) the engine is built from;
/// keep in sync with `hack/build-apiextensions-apiserver.sh`.
pub const APIEXTENSIONS_VERSION: &str = "0.36.4-1";

/// Admission plugins the 1.36 engine enables by default that watch resources a 1.20 control
/// plane does not serve (admission policies, webhooks configurations) or that need the core
/// API (namespaces), which the engine does not serve itself.
const DISABLED_ADMISSION: &str = "NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,\
                                  ValidatingAdmissionPolicy,MutatingAdmissionPolicy";

/// The `apiextensions-apiserver` binary: `NIXPOOL_APIEXTENSIONS_APISERVER`, else the one
/// `hack/build-apiextensions-apiserver.sh` put in the cache.
pub fn binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("NIXPOOL_APIEXTENSIONS_APISERVER") {
        Some(p) => PathBuf::from(p),
        None => cache_dir()
            .join(format!("apiextensions-apiserver-{APIEXTENSIONS_VERSION}"))
            .join("apiextensions-apiserver"),
    };
    if !path.is_file() {
        bail!(
            "{} is missing: the CRD tests need Kubernetes 1.36's CRD engine. Build it once with \
             `sudo hack/build-apiextensions-apiserver.sh` (or set NIXPOOL_APIEXTENSIONS_APISERVER)",
            path.display()
        );
    }
    Ok(path)
}

/// A running 1.36 CRD engine. Killed on drop.
pub struct CrdEngine {
    pid: u32,
    port: u16,
    dir: PathBuf,
    kubeconfig: String,
}

impl CrdEngine {
    /// Starts the engine against `cp`'s etcd and waits until it serves
    /// `apiextensions.k8s.io/v1` to the admin.
    pub async fn start(cp: &ControlPlane) -> anyhow::Result<CrdEngine> {
        let bin = binary()?;
        let etcd = cp.etcd_url();
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("crd-engine-")
            .tempdir_in(cp.dir())?
            .keep();
        // Its own prefix per engine: CRDs and custom resources here never meet the 1.20 ones.
        let prefix = format!(
            "/nixpool-crd-engine/{}",
            dir.file_name().unwrap_or_default().to_string_lossy()
        );
        let name = format!("apiextensions-apiserver-{port}");
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--etcd-servers={etcd}"))
            .arg(format!("--etcd-prefix={prefix}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            // The core API (informers for namespaces, webhooks...) and the delegated
            // authentication and authorization: the 1.20 control plane's admin.
            .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .arg(format!("--authentication-kubeconfig={}", cp.kubeconfig().display()))
            .arg(format!("--authorization-kubeconfig={}", cp.kubeconfig().display()))
            .arg(format!(
                "--disable-admission-plugins={}",
                DISABLED_ADMISSION.replace(' ', "")
            ))
            .arg("--enable-priority-and-fairness=false")
            .arg("--v=0");
        let pid = cp.spawn(&name, cmd)?;
        let server = format!("https://127.0.0.1:{port}");
        let engine = CrdEngine {
            pid,
            port,
            dir: cp.dir().join(format!("{name}.log")),
            kubeconfig: cp
                .kubeconfig_yaml(ADMIN_TOKEN, "default")
                .replace(&cp.server(), &server),
        };
        engine.wait_ready(Duration::from_secs(90)).await?;
        Ok(engine)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The engine's log file.
    pub fn log(&self) -> &std::path::Path {
        &self.dir
    }

    /// The last `lines` lines of the engine's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.dir).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A client with the admin's token (the engine asks the 1.20 control plane who that is).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let client = self.client().await?;
        let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client);
        loop {
            let err = match crds.list(&Default::default()).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let exited = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .map(|stat| stat.rsplit(") ").next().unwrap_or("").starts_with('Z'))
                .unwrap_or(true);
            if exited || Instant::now() > deadline {
                bail!(
                    "the 1.36 CRD engine does not serve CRDs ({err}; exited: {exited}); its log {}:\n{}",
                    self.log().display(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for CrdEngine {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }
}
