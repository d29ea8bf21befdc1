//! `run`: prepare the root, then supervise nix-daemon and sshd until SIGTERM (drain, exit 0) or
//! until a child will not stay up (termination log, exit 1).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixpool_api::AgentConfig;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::drain;
use crate::health::{self, ChildLabel, HttpState, Metrics};
use crate::layout::{Binaries, Layout};
use crate::plan::{self, Options, Plan};
use crate::procs;
use crate::push::Pusher;
use crate::ssh;
use crate::store;
use crate::supervise::{ChildCommand, ChildState, Policy, Stoppable, Supervised};

/// Settings of `run` beyond the plan.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub policy: Policy,
    pub key_reload_interval: Duration,
    pub daemon_start_timeout: Duration,
    pub health_address: String,
    pub push: crate::push::Settings,
    /// `/readyz` fails while the store has fewer free bytes.
    pub ready_min_free_bytes: u64,
    /// After SIGTERM, how long sshd keeps accepting while endpoints drop the pod.
    pub drain_accept: Duration,
    /// The pod's store volume (see [`crate::store`]); `None`: `/nix` is used as it is.
    pub store_volume: Option<PathBuf>,
}

/// Writes `message` to the termination log (Kubernetes shows it in the pod's status).
fn write_termination_log(layout: &Layout, message: &str) {
    let path = layout.termination_log();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, format!("{message}\n")) {
        error!(path = %path.display(), error = %e, "cannot write the termination log");
    }
}

/// Logs the reason, writes it to the termination log, exits 1.
fn terminate(layout: &Layout, reason: &str) -> ExitCode {
    error!(reason, "giving up");
    write_termination_log(layout, reason);
    ExitCode::from(1)
}

/// What start-up has started, stopped in reverse order (sshd before nix-daemon).
#[derive(Default)]
struct Children(Mutex<Vec<Supervised>>);

impl Children {
    fn add(&self, child: Supervised) {
        self.0.lock().expect("children lock").push(child);
    }

    fn take(&self, name: &str) -> Option<Supervised> {
        let mut all = self.0.lock().expect("children lock");
        let i = all.iter().position(|c| c.name == name)?;
        Some(all.remove(i))
    }

    async fn stop_all(&self, until: Instant) {
        let all = std::mem::take(&mut *self.0.lock().expect("children lock"));
        for child in all.into_iter().rev() {
            child.stop(until).await;
        }
    }
}

/// How long start-up, cut short by SIGTERM, gives its children to exit before SIGKILL: the
/// whole exit must stay under a second.
const START_STOP_GRACE: Duration = Duration::from_millis(500);

/// How long a child that will not stay up leaves the others to stop before the agent gives up.
const GIVE_UP_GRACE: Duration = Duration::from_secs(10);

/// Where start-up is, for the log of a SIGTERM that interrupts it.
struct Phase(Mutex<&'static str>);

impl Phase {
    fn set(&self, phase: &'static str) {
        *self.0.lock().expect("phase lock") = phase;
    }

    fn get(&self) -> &'static str {
        *self.0.lock().expect("phase lock")
    }
}

/// SIGTERM and SIGINT, which both stop the agent.
struct StopSignals {
    sigterm: Signal,
    sigint: Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            sigterm: signal(SignalKind::terminate())?,
            sigint: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.sigterm.recv() => {}
            _ = self.sigint.recv() => {}
        }
    }
}

pub async fn run(layout: Layout, bins: Binaries, opts: Options, settings: RunSettings) -> ExitCode {
    let started = Instant::now();
    // First of all: PID 1 ignores a signal it has no handler for, so a pod deleted while starting
    // would wait out its whole terminationGracePeriodSeconds.
    let mut stop_signals = match StopSignals::install() {
        Ok(s) => s,
        Err(e) => return terminate(&layout, &format!("cannot handle SIGTERM: {e}")),
    };
    let children = Children::default();
    let phase = Phase(Mutex::new("starting"));
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(4);
    let setup = Setup {
        layout: &layout,
        bins: &bins,
        opts: &opts,
        settings: &settings,
    };
    let start_up = start(&setup, &children, &phase, fatal_tx, &mut fatal_rx);
    let outcome = tokio::select! {
        s = start_up => s,
        _ = stop_signals.recv() => return stop_during_start_up(&children, &phase, started).await,
    };
    let Started { plan, health } = match outcome {
        Ok(s) => s,
        Err(reason) => return give_up(&layout, &children, &reason).await,
    };
    let helpers = Helpers::start(&layout, &bins, &settings, &plan, &health);
    log_when_ready(health.clone(), started);

    let fatal = tokio::select! {
        _ = stop_signals.recv() => None,
        reason = fatal_rx.recv() => reason,
    };
    if let Some(reason) = fatal {
        helpers.signal();
        return give_up(&layout, &children, &reason).await;
    }
    drain(
        &layout,
        &plan.config,
        settings.drain_accept,
        &health,
        &children,
        helpers,
    )
    .await
}

/// SIGTERM before start-up finished: stop what has started and exit 0 at once.
async fn stop_during_start_up(children: &Children, phase: &Phase, started: Instant) -> ExitCode {
    info!(
        phase = phase.get(),
        "SIGTERM during start-up: stopping what has started and exiting"
    );
    children.stop_all(Instant::now() + START_STOP_GRACE).await;
    info!(
        seconds = started.elapsed().as_secs_f64(),
        "stopped during start-up; exiting"
    );
    ExitCode::SUCCESS
}

/// Stops the children, then exits 1 with `reason` in the termination log.
async fn give_up(layout: &Layout, children: &Children, reason: &str) -> ExitCode {
    children.stop_all(Instant::now() + GIVE_UP_GRACE).await;
    terminate(layout, reason)
}

/// Ready as soon as sshd answers; logs the time it took.
fn log_when_ready(health: Arc<HttpState>, started: Instant) {
    tokio::spawn(async move {
        for _ in 0..600 {
            if health.ready().await.is_ok() {
                info!(seconds = started.elapsed().as_secs_f64(), "ready");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// What runs beside the children once started: the live key reload and, when the pool pushes,
/// the pusher.
struct Helpers {
    key_reload: Stoppable,
    pusher: Option<Stoppable>,
}

impl Helpers {
    fn start(layout: &Layout, bins: &Binaries, settings: &RunSettings, plan: &Plan, health: &HttpState) -> Self {
        let key_reload = Stoppable::spawn(|stop| {
            reload_keys(
                layout.clone(),
                plan.config.builder_user.clone(),
                plan.forced_command.clone(),
                plan.authorized_keys.clone(),
                settings.key_reload_interval,
                stop,
            )
        });
        let pusher = (!plan.config.push.is_empty()).then(|| {
            let p = Pusher {
                targets: plan.config.push.clone(),
                settings: settings.push.clone(),
            };
            Stoppable::spawn(|stop| p.run(layout.clone(), bins.clone(), health.metrics.clone(), stop))
        });
        Self { key_reload, pusher }
    }

    /// Tells both to stop, without waiting (the agent is giving up).
    fn signal(&self) {
        self.key_reload.signal();
        if let Some(p) = &self.pusher {
            p.signal();
        }
    }

    /// Lets the pusher send what was built here until the work window ends, then stops both.
    /// Returns how many paths are left queued.
    async fn flush(self, layout: &Layout, schedule: &drain::Schedule) -> usize {
        let mut push_left = 0;
        if self.pusher.is_some() {
            push_left = crate::push::wait_until_pushed(&layout.push_queue(), schedule.work_until).await;
        }
        self.signal();
        if let Some(mut p) = self.pusher {
            p.stop(schedule.left(Instant::now())).await;
        }
        push_left
    }
}

/// SIGTERM once serving: the steps of [`drain::Schedule`], then exit 0.
async fn drain(
    layout: &Layout,
    config: &AgentConfig,
    accept: Duration,
    health: &HttpState,
    children: &Children,
    helpers: Helpers,
) -> ExitCode {
    let budget = Duration::from_secs(config.drain_timeout_seconds);
    let schedule = drain::Schedule::new(Instant::now(), budget, accept);
    health.draining.store(true, Ordering::SeqCst);
    info!(
        budget_seconds = config.drain_timeout_seconds,
        accept_ms = accept.as_millis() as u64,
        "SIGTERM: not ready any more; accepting SSH connections a moment longer, then refusing them and letting builds finish"
    );
    tokio::time::sleep_until(schedule.accept_until.into()).await;
    stop_listener(children, &schedule).await;
    let sessions_cut = drain::sessions(&schedule).await;
    let push_left = helpers.flush(layout, &schedule).await;
    children.stop_all(schedule.end).await;
    procs::reap_orphans();
    report_drain(layout, config, &schedule, sessions_cut, push_left);
    ExitCode::SUCCESS
}

/// Stops sshd, the listener: its port closes; sessions are processes of their own and go on.
async fn stop_listener(children: &Children, schedule: &drain::Schedule) {
    if let Some(sshd) = children.take("sshd") {
        sshd.stop(schedule.listener_stop_by(Instant::now())).await;
    }
}

/// Logs how the drain went; what it cut or left goes to the termination log too.
fn report_drain(
    layout: &Layout,
    config: &AgentConfig,
    schedule: &drain::Schedule,
    sessions_cut: usize,
    push_left: usize,
) {
    let seconds = schedule.start.elapsed().as_secs_f64();
    info!(seconds, sessions_cut, push_paths_left = push_left, "drained; exiting");
    if sessions_cut > 0 || push_left > 0 {
        write_termination_log(
            layout,
            &format!(
                "drained in {seconds:.1}s (budget {}s, drainTimeoutSeconds): cut {sessions_cut} SSH session(s) still open, \
                 left {push_left} path(s) queued for push",
                config.drain_timeout_seconds
            ),
        );
    }
}

/// What start-up hands to the serving agent.
struct Started {
    plan: Plan,
    health: Arc<HttpState>,
}

/// What the agent starts from: where things are, its binaries, its options and settings.
struct Setup<'a> {
    layout: &'a Layout,
    bins: &'a Binaries,
    opts: &'a Options,
    settings: &'a RunSettings,
}

/// Prepares the root and starts nix-daemon, then sshd. `Err` is the reason to give up.
async fn start(
    setup: &Setup<'_>,
    children: &Children,
    phase: &Phase,
    fatal_tx: mpsc::Sender<String>,
    fatal_rx: &mut mpsc::Receiver<String>,
) -> Result<Started, String> {
    let &Setup {
        layout,
        bins,
        opts,
        settings,
    } = setup;
    // First of all: everything after this reads or writes /nix.
    if let Some(volume) = &settings.store_volume {
        phase.set("setting up the store");
        prepare_store(layout, volume, &settings.health_address).await?;
    }
    phase.set("waiting for the host key");
    wait_for_host_key(layout, &settings.health_address).await;
    phase.set("preparing the root");
    let plan = prepare_root(layout, bins, opts)?;
    phase.set("checking the sshd config (sshd -t)");
    preflight_sshd(layout, bins).await?;
    let health = serve_health(layout, settings, &plan).await?;
    reap_orphans_forever();
    let launcher = Launcher {
        children,
        policy: settings.policy,
        fatal: fatal_tx,
        health: health.clone(),
    };
    phase.set("waiting for nix-daemon");
    start_daemon(&launcher, layout, bins, &plan, settings.daemon_start_timeout, fatal_rx).await?;
    phase.set("starting sshd");
    start_sshd(&launcher, layout, bins);
    Ok(Started { plan, health })
}

/// Computes the plan (every problem at once) and applies it to the root.
fn prepare_root(layout: &Layout, bins: &Binaries, opts: &Options) -> Result<Plan, String> {
    let plan = plan::build(layout, bins, opts).map_err(|problems| format!("cannot start: {}", problems.join("; ")))?;
    log_plan(&plan);
    let changed = plan::apply(&plan).map_err(|e| format!("cannot prepare the root: {e}"))?;
    info!(changed = changed.len(), "root prepared");
    procs::become_subreaper();
    Ok(plan)
}

/// `sshd -t`, before anything starts: a config sshd rejects is a reason to give up.
async fn preflight_sshd(layout: &Layout, bins: &Binaries) -> Result<(), String> {
    let sshd_config = layout.sshd_config();
    let test = procs::output(
        tokio::process::Command::new(&bins.sshd)
            .arg("-t")
            .arg("-f")
            .arg(&sshd_config),
    )
    .await;
    match test {
        Ok(out) if out.status.success() => {
            info!(config = %sshd_config.display(), "sshd -t accepted the config");
            Ok(())
        }
        Ok(out) => Err(format!(
            "sshd -t rejected {}: {}",
            sshd_config.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {} -t: {e}", bins.sshd.display())),
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on the config's health port.
async fn serve_health(layout: &Layout, settings: &RunSettings, plan: &Plan) -> Result<Arc<HttpState>, String> {
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let health = Arc::new(HttpState {
        draining: AtomicBool::new(false),
        min_free_bytes: settings.ready_min_free_bytes,
        probed: tokio::sync::Mutex::new(None),
        verdict: Mutex::new(None),
        ssh_port: plan.config.ssh_port,
        daemon_socket: layout.daemon_socket(),
        store: layout.store(),
        build_uids: plan.build_uids.clone(),
        sshd: Arc::new(ChildState::default()),
        metrics,
        registry,
        push_queue: layout.push_queue(),
    });
    let addr = format!("{}:{}", settings.health_address, plan.config.health_port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for health: {e}"))?;
    info!(%addr, "health endpoint listening");
    tokio::spawn(axum::serve(listener, health::router(health.clone())).into_future());
    Ok(health)
}

/// PID 1 duty: reap orphans, on SIGCHLD and at least every second.
fn reap_orphans_forever() {
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
}

/// Starts children under supervision, each counted in the restart metric, and keeps them in
/// [`Children`].
struct Launcher<'a> {
    children: &'a Children,
    policy: Policy,
    fatal: mpsc::Sender<String>,
    health: Arc<HttpState>,
}

impl Launcher<'_> {
    fn launch(&self, spec: ChildCommand, running: Arc<ChildState>) {
        let name = spec.name;
        let health = self.health.clone();
        let count_restart = move || {
            health
                .metrics
                .child_restarts
                .get_or_create(&ChildLabel { child: name.into() })
                .inc();
        };
        self.children.add(Supervised::start(
            spec,
            self.policy,
            self.fatal.clone(),
            running,
            count_restart,
        ));
    }
}

/// Starts nix-daemon and waits until it answers on its socket.
async fn start_daemon(
    launcher: &Launcher<'_>,
    layout: &Layout,
    bins: &Binaries,
    plan: &Plan,
    timeout: Duration,
    fatal_rx: &mut mpsc::Receiver<String>,
) -> Result<(), String> {
    let daemon = ChildCommand {
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
    launcher.launch(daemon, Arc::new(ChildState::default()));
    let deadline = Instant::now() + timeout;
    loop {
        if health::daemon_answers(&layout.daemon_socket()).await.is_ok() {
            info!(socket = %layout.daemon_socket().display(), "nix-daemon answers");
            return Ok(());
        }
        if let Ok(reason) = fatal_rx.try_recv() {
            return Err(reason);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nix-daemon did not answer on {} within {timeout:?}",
                layout.daemon_socket().display(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts sshd; readiness tells when it answers.
fn start_sshd(launcher: &Launcher<'_>, layout: &Layout, bins: &Binaries) {
    let sshd = ChildCommand {
        name: "sshd",
        program: bins.sshd.clone(),
        args: vec![
            "-D".into(),
            "-e".into(),
            "-f".into(),
            layout.sshd_config().display().to_string(),
        ],
        env: vec![],
    };
    launcher.launch(sshd, launcher.health.sshd.clone());
}

/// A missing or unusable host key is a fault of the mounts that may still be fixed (a Secret
/// created or corrected late): wait for it, alive and not ready with the reason, rather than
/// crash-loop. A config that cannot be read is left to `plan::build`, which names it.
async fn wait_for_host_key(layout: &Layout, health_address: &str) {
    let Err(first) = plan::read_host_key(layout) else {
        return;
    };
    warn!(reason = %first, "waiting for a usable host key; not ready until then");
    let reason = Arc::new(Mutex::new(first));
    let server = match plan::load_config(layout) {
        Ok(c) => serve_while_waiting(&format!("{health_address}:{}", c.health_port), reason.clone()).await,
        Err(_) => None,
    };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match plan::read_host_key(layout) {
            Ok(_) => break,
            Err(now) => {
                let mut r = reason.lock().expect("reason lock");
                if *r != now {
                    warn!(reason = %now, "waiting for a usable host key; not ready until then");
                    *r = now;
                }
            }
        }
    }
    info!("the host key is usable; starting");
    if let Some(task) = server {
        task.abort();
        let _ = task.await;
    }
}

/// Serves the waiting health endpoints (see [`health::waiting_router`]) until aborted.
async fn serve_while_waiting(addr: &str, reason: Arc<Mutex<String>>) -> Option<JoinHandle<std::io::Result<()>>> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Some(tokio::spawn(
            axum::serve(l, health::waiting_router(reason)).into_future(),
        )),
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve health while waiting");
            None
        }
    }
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
            let reason = Arc::new(Mutex::new("copying the image's store".to_string()));
            serve_while_waiting(&format!("{health_address}:{}", c.health_port), reason).await
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

/// Rewrites the builder's `authorized_keys` whenever what the mounted ConfigMap gives differs
/// from what was last written for sshd (Kubernetes swaps a symlink; one read through it sees
/// one whole version). The baseline is what start-up wrote, not a later read: a key removed
/// in between is removed too. Nothing restarts: sshd reads the file at each login.
async fn reload_keys(
    layout: Layout,
    user: String,
    command: String,
    written: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let secret = layout.authorized_keys_secret();
    let dest = layout.authorized_keys_dir().join(&user);
    let mut written = written;
    let mut failing = false;
    loop {
        match std::fs::read_to_string(&secret) {
            Err(e) => {
                if !failing {
                    warn!(path = %secret.display(), error = %e, "cannot read the authorized-keys ConfigMap; keeping the current keys");
                    failing = true;
                }
            }
            Ok(text) => {
                failing = false;
                let (out, bad) = ssh::render_authorized_keys(&text, &command);
                if out != written {
                    for b in &bad {
                        warn!(line = b.line, reason = %b.reason, "authorized-keys ConfigMap: line skipped");
                    }
                    match crate::fhs::write_file(&dest, out.as_bytes(), 0o644) {
                        Ok(_) => {
                            let keys = out.lines().filter(|l| !l.starts_with('#')).count();
                            info!(keys, "authorized keys reloaded");
                            written = out;
                        }
                        Err(e) => warn!(error = %e, "cannot write authorized_keys; will retry"),
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::supervise::stopped(&mut stop) => return,
        }
    }
}
