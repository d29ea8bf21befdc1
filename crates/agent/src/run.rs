//! `run`: prepare the root, then supervise nix-daemon and sshd until SIGTERM (drain, exit 0) or
//! until a child will not stay up (termination log, exit 1).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::health::{self, ChildLabel, Health, Metrics};
use crate::layout::{Binaries, Layout};
use crate::plan::{self, Options, Plan};
use crate::procs;
use crate::push::Pusher;
use crate::ssh;
use crate::store;
use crate::supervise::{self, Policy, Running, Spec};

/// Settings of `run` beyond the plan.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub policy: Policy,
    pub key_reload_interval: Duration,
    pub daemon_start_timeout: Duration,
    pub health_address: String,
    pub push: crate::push::Settings,
    /// The pod's store volume (see [`crate::store`]); `None`: `/nix` is used as it is.
    pub store_volume: Option<PathBuf>,
}

/// Writes the reason to the termination log (Kubernetes shows it in the pod status) and logs it.
fn terminate(layout: &Layout, reason: &str) -> ExitCode {
    error!(reason, "giving up");
    let path = layout.termination_log();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, format!("{reason}\n")) {
        error!(path = %path.display(), error = %e, "cannot write the termination log");
    }
    ExitCode::from(1)
}

pub async fn run(layout: Layout, bins: Binaries, opts: Options, settings: RunSettings) -> ExitCode {
    let started = Instant::now();
    // First of all: everything after this reads or writes /nix.
    if let Some(volume) = &settings.store_volume
        && let Err(reason) = prepare_store(&layout, volume, &settings.health_address).await
    {
        return terminate(&layout, &reason);
    }
    let plan = match plan::build(&layout, &bins, &opts) {
        Ok(p) => p,
        Err(problems) => return terminate(&layout, &format!("cannot start: {}", problems.join("; "))),
    };
    log_plan(&plan);
    match plan::apply(&plan) {
        Ok(changed) => info!(changed = changed.len(), "root prepared"),
        Err(e) => return terminate(&layout, &format!("cannot prepare the root: {e}")),
    }
    procs::become_subreaper();

    // sshd -t before anything starts.
    let sshd_config = layout.sshd_config();
    let test = procs::output(
        tokio::process::Command::new(&bins.sshd)
            .arg("-t")
            .arg("-f")
            .arg(&sshd_config),
    )
    .await;
    match test {
        Ok(out) if out.status.success() => info!(config = %sshd_config.display(), "sshd -t accepted the config"),
        Ok(out) => {
            return terminate(
                &layout,
                &format!(
                    "sshd -t rejected {}: {}",
                    sshd_config.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
        }
        Err(e) => return terminate(&layout, &format!("cannot run {} -t: {e}", bins.sshd.display())),
    }

    let config = plan.config.clone();
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let sshd_running = Arc::new(Running::default());
    let daemon_running = Arc::new(Running::default());
    let health = Arc::new(Health {
        draining: AtomicBool::new(false),
        ssh_port: config.ssh_port,
        daemon_socket: layout.daemon_socket(),
        store: layout.store(),
        build_uids: plan.build_uids.clone(),
        sshd: sshd_running.clone(),
        metrics,
        registry,
        push_queue: layout.push_queue(),
    });

    let addr = format!("{}:{}", settings.health_address, config.health_port);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => return terminate(&layout, &format!("cannot listen on {addr} for health: {e}")),
    };
    info!(%addr, "health endpoint listening");
    tokio::spawn(axum::serve(listener, health::router(health.clone())).into_future());

    // PID 1 duty: reap orphans.
    tokio::spawn(async {
        let mut sigchld = signal(SignalKind::child()).ok();
        loop {
            match sigchld.as_mut() {
                Some(s) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.recv()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            procs::reap_orphans();
        }
    });

    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(4);
    let restart_counter = |name: &'static str| {
        let h = health.clone();
        move || {
            h.metrics
                .child_restarts
                .get_or_create(&ChildLabel { child: name.into() })
                .inc();
        }
    };

    // nix-daemon, then wait for it to answer.
    let (daemon_stop, daemon_stop_rx) = watch::channel(false);
    let daemon = Spec {
        name: "nix-daemon",
        program: bins.nix_daemon.clone(),
        args: vec![],
        env: [("NIX_CONF_DIR".to_string(), OsString::from(layout.nix_conf_dir()))]
            .into_iter()
            .chain(
                plan.ca_bundle
                    .iter()
                    .map(|ca| ("NIX_SSL_CERT_FILE".to_string(), OsString::from(ca))),
            )
            .collect(),
    };
    let daemon_task = tokio::spawn(supervise::supervise(
        daemon,
        settings.policy,
        daemon_stop_rx,
        fatal_tx.clone(),
        daemon_running.clone(),
        restart_counter("nix-daemon"),
    ));
    let deadline = Instant::now() + settings.daemon_start_timeout;
    loop {
        if health::daemon_answers(&layout.daemon_socket()).await.is_ok() {
            info!(socket = %layout.daemon_socket().display(), "nix-daemon answers");
            break;
        }
        if let Ok(reason) = fatal_rx.try_recv() {
            let _ = daemon_stop.send(true);
            let _ = daemon_task.await;
            return terminate(&layout, &reason);
        }
        if Instant::now() > deadline {
            let _ = daemon_stop.send(true);
            let _ = daemon_task.await;
            return terminate(
                &layout,
                &format!(
                    "nix-daemon did not answer on {} within {:?}",
                    layout.daemon_socket().display(),
                    settings.daemon_start_timeout
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // sshd.
    let (sshd_stop, sshd_stop_rx) = watch::channel(false);
    let sshd = Spec {
        name: "sshd",
        program: bins.sshd.clone(),
        args: vec!["-D".into(), "-e".into(), "-f".into(), sshd_config.display().to_string()],
        env: vec![],
    };
    let sshd_task = tokio::spawn(supervise::supervise(
        sshd,
        settings.policy,
        sshd_stop_rx,
        fatal_tx.clone(),
        sshd_running.clone(),
        restart_counter("sshd"),
    ));

    // Live key reload and the pusher.
    let (aux_stop, aux_stop_rx) = watch::channel(false);
    tokio::spawn(reload_keys(
        layout.clone(),
        config.builder_user.clone(),
        plan.forced_command.clone(),
        settings.key_reload_interval,
        aux_stop_rx.clone(),
    ));
    let pusher = (!config.push.is_empty()).then(|| {
        let p = Pusher {
            targets: config.push.clone(),
            settings: settings.push.clone(),
        };
        tokio::spawn(p.run(
            layout.clone(),
            bins.clone(),
            health.metrics.clone(),
            aux_stop_rx.clone(),
        ))
    });

    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    // Ready as soon as sshd answers; log the time it took.
    {
        let h = health.clone();
        tokio::spawn(async move {
            for _ in 0..600 {
                if h.ready().await.is_ok() {
                    info!(seconds = started.elapsed().as_secs_f64(), "ready");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    let outcome = tokio::select! {
        _ = sigterm.recv() => None,
        _ = sigint.recv() => None,
        reason = fatal_rx.recv() => reason,
    };

    if let Some(reason) = outcome {
        let _ = aux_stop.send(true);
        let _ = sshd_stop.send(true);
        let _ = daemon_stop.send(true);
        let _ = tokio::join!(sshd_task, daemon_task);
        return terminate(&layout, &reason);
    }

    // Drain.
    health.draining.store(true, Ordering::SeqCst);
    info!(
        budget_seconds = config.drain_timeout_seconds,
        "SIGTERM: not ready any more, refusing new SSH connections, letting builds finish"
    );
    let _ = sshd_stop.send(true);
    let _ = sshd_task.await;
    let deadline = Instant::now() + Duration::from_secs(config.drain_timeout_seconds);
    loop {
        let sessions = procs::ssh_sessions(&procs::scan(), None);
        if sessions.is_empty() {
            info!("no SSH session left");
            break;
        }
        if Instant::now() > deadline {
            warn!(
                sessions = sessions.len(),
                "drain budget spent; ending the remaining sessions"
            );
            for pid in sessions {
                procs::signal(pid as u32, Signal::SIGTERM);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the pusher what is left of the budget to send what was built here.
    if pusher.is_some() {
        crate::push::wait_until_pushed(&layout.push_queue(), deadline).await;
    }
    let _ = aux_stop.send(true);
    if let Some(p) = pusher {
        let _ = p.await;
    }
    let _ = daemon_stop.send(true);
    let _ = daemon_task.await;
    procs::reap_orphans();
    info!("drained; exiting");
    ExitCode::SUCCESS
}

/// Sets up `/nix` on the store volume: the overlay, else the copy (see [`crate::store`]).
async fn prepare_store(layout: &Layout, volume: &Path, health_address: &str) -> Result<(), String> {
    let started = Instant::now();
    let why = match store::overlay(layout, volume) {
        Ok(store::Outcome::Overlay { reused }) => {
            info!(
                volume = %volume.display(),
                reused,
                ms = started.elapsed().as_millis() as u64,
                "store: /nix is the image's /nix under a writable overlay layer on the store volume; nothing copied"
            );
            return Ok(());
        }
        Ok(outcome) => {
            info!(volume = %volume.display(), ?outcome, "store: /nix is already set up on the store volume");
            return Ok(());
        }
        Err(e) => e,
    };
    warn!(
        volume = %volume.display(),
        reason = %why,
        "store: no overlay on the store volume; falling back to copying the image's /nix into it \
         (or reusing this pod's earlier copy). A copy makes start time grow with the image's store \
         and holds it twice; use a volume whose file system can be an overlay upper layer \
         (a local ext4 or xfs one) to avoid it"
    );
    // A long copy must not look dead to the liveness probe.
    let seeding = match plan::load_config(layout) {
        Ok(c) => {
            let addr = format!("{health_address}:{}", c.health_port);
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => Some(tokio::spawn(axum::serve(l, health::seeding_router()).into_future())),
                Err(e) => {
                    warn!(%addr, error = %e, "cannot serve health while copying the store");
                    None
                }
            }
        }
        Err(_) => None,
    };
    let (l, v) = (layout.clone(), volume.to_path_buf());
    let copied = tokio::task::spawn_blocking(move || store::copy(&l, &v, &crate::layout::which(Path::new("cp")))).await;
    if let Some(task) = seeding {
        task.abort();
        let _ = task.await;
    }
    match copied {
        Ok(Ok(store::Outcome::Copied { copied: Some(c) })) => {
            warn!(
                bytes = c.bytes,
                seconds = c.elapsed.as_secs_f64(),
                "store: copied the image's /nix into the store volume; this start waited for the copy"
            );
            Ok(())
        }
        Ok(Ok(_)) => {
            info!("store: reusing this pod's earlier copy of the image's /nix on the store volume");
            Ok(())
        }
        Ok(Err(e)) => Err(format!(
            "cannot set up /nix on the store volume: no overlay ({why}), and no copy either ({e})"
        )),
        Err(e) => Err(format!("the store copy panicked: {e}")),
    }
}

fn log_plan(plan: &Plan) {
    for note in &plan.notes {
        info!("{note}");
    }
    info!(keys = plan.key_count, host_key = %plan.host_public_key, "authorized keys and host key read");
    for b in &plan.bad_keys {
        warn!(line = b.line, reason = %b.reason, "authorized-keys ConfigMap: line skipped");
    }
}

/// Rewrites the builder's `authorized_keys` whenever the mounted Secret changes (Kubernetes swaps
/// a symlink; reading through it sees the new content). Nothing restarts: sshd reads the file
/// at each login.
async fn reload_keys(layout: Layout, user: String, command: String, every: Duration, mut stop: watch::Receiver<bool>) {
    let secret = layout.authorized_keys_secret();
    let dest = layout.authorized_keys_dir().join(&user);
    let mut last = std::fs::read_to_string(&secret).ok();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::supervise::stopped(&mut stop) => return,
        }
        match std::fs::read_to_string(&secret) {
            Err(e) => {
                if !failing {
                    warn!(path = %secret.display(), error = %e, "cannot read the authorized-keys ConfigMap; keeping the current keys");
                    failing = true;
                }
            }
            Ok(text) => {
                failing = false;
                if last.as_deref() == Some(text.as_str()) {
                    continue;
                }
                let (out, bad) = ssh::render_authorized_keys(&text, &command);
                for b in &bad {
                    warn!(line = b.line, reason = %b.reason, "authorized-keys ConfigMap: line skipped");
                }
                match crate::fhs::write_file(&dest, out.as_bytes(), 0o644) {
                    Ok(_) => {
                        let keys = out.lines().filter(|l| !l.starts_with('#')).count();
                        info!(keys, "authorized keys reloaded");
                        last = Some(text);
                    }
                    Err(e) => warn!(error = %e, "cannot write authorized_keys; will retry"),
                }
            }
        }
    }
}
