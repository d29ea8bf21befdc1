//! Cache push. The post-build hook (`nixpool-agent enqueue`) only writes the built paths into a
//! queue directory and returns at once, so a slow or down cache never fails or slows a build.
//! The pusher moves each queued path into one queue per target and pushes it there on its own:
//! a path that fails is retried alone, with backoff, so neither a failing path nor a down cache
//! holds back the others.
//!
//! On disk, under `/nix` (a restarted pod with the same store goes on where it stopped):
//! - `push-queue/<enqueued ns>-<pid>.paths`: the hook's entries, one per build;
//! - `push-queue/targets/<key>/.target`: the target's name, without credentials;
//! - `push-queue/targets/<key>/<enqueued ns>-<pid>-<i>`: one queued path each.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use nixpool_api::agent::PushTarget;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::health::{Metrics, TargetLabel};
use crate::layout::{Binaries, Layout};
use crate::procs;

/// Writes one queue entry for `out_paths` (the hook's space-separated `OUT_PATHS`).
pub fn enqueue(queue: &Path, out_paths: &str) -> std::io::Result<Option<PathBuf>> {
    let paths: Vec<&str> = out_paths.split_whitespace().collect();
    if paths.is_empty() {
        return Ok(None);
    }
    fs::create_dir_all(queue)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!("{:020}-{}", now.as_nanos(), std::process::id());
    let tmp = queue.join(format!(".{name}.tmp"));
    fs::write(&tmp, paths.join("\n") + "\n")?;
    let dest = queue.join(format!("{name}.paths"));
    fs::rename(&tmp, &dest)?;
    Ok(Some(dest))
}

/// The outputs of `drv_path` found in the store: the paths named like the derivation whose
/// deriver is `drv_path`. For Nix versions (such as 2.8) that give the post-build hook an empty
/// `OUT_PATHS`; the derivation itself is not in the builder's store for remote builds, so its
/// outputs cannot be asked for directly.
pub fn outputs_of(store: &Path, drv_path: &str, nix_store: &Path) -> Vec<String> {
    let Some(base) = drv_path.rsplit('/').next().and_then(|b| b.strip_suffix(".drv")) else {
        return Vec::new();
    };
    let Some((_, name)) = base.split_once('-') else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir(store) else {
        return Vec::new();
    };
    let candidates = dir.filter_map(Result::ok).filter_map(|e| {
        let file = e.file_name().to_string_lossy().into_owned();
        let (_, pname) = file.split_once('-')?;
        let matches = pname == name || pname.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'));
        (matches && !file.ends_with(".drv")).then(|| format!("/nix/store/{file}"))
    });
    candidates
        .filter(|p| {
            std::process::Command::new(nix_store)
                .args(["--query", "--deriver", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == drv_path)
        })
        .collect()
}

/// The hook's entries not yet taken into the targets' queues, oldest first.
pub fn queued(queue: &Path) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(queue) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "paths"))
        .collect();
    v.sort();
    v
}

/// One push, ready to run. Tokens travel in the environment or a 0600 file, never in argv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Files to write (0600) before running.
    pub files: Vec<(PathBuf, String)>,
    /// What must not reach a log: the token, a store URI's user info and query. Scrubbed from
    /// the command's error output.
    pub secrets: Vec<String>,
}

fn read_secret(layout: &Layout, file: &str) -> Result<String, String> {
    let path = layout.path(file);
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A short name for logs and metric labels, without credentials: a store URI loses its user
/// info and query (`https://user:token@host/c?x=y` is named `nix-copy:https://host/c`).
pub fn target_name(t: &PushTarget) -> String {
    match t {
        PushTarget::NixCopy { uri, .. } => format!("nix-copy:{}", uri_parts(uri).0),
        PushTarget::Attic { cache, .. } => format!("attic:{cache}"),
        PushTarget::Cachix { cache, .. } => format!("cachix:{cache}"),
    }
}

/// A store URI split into what may be shown (scheme, host, path) and what may not (the user
/// info and the query or fragment, either of which can carry a credential).
fn uri_parts(uri: &str) -> (String, Vec<String>) {
    let (base, query) = match uri.find(['?', '#']) {
        Some(i) => (&uri[..i], Some(&uri[i + 1..])),
        None => (uri, None),
    };
    let mut hidden: Vec<String> = query.into_iter().map(str::to_string).collect();
    let shown = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = match authority.rsplit_once('@') {
                Some((user_info, host)) => {
                    hidden.push(user_info.to_string());
                    host
                }
                None => authority,
            };
            format!("{scheme}://{host}{path}")
        }
        None => base.to_string(),
    };
    hidden.retain(|h| !h.is_empty());
    (shown, hidden)
}

/// `text` with every secret replaced by `<redacted>`.
fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "<redacted>"))
}

/// The command line pushing `paths` to `target`.
pub fn command(target: &PushTarget, bins: &Binaries, layout: &Layout, paths: &[String]) -> Result<PushCommand, String> {
    let conf = ("NIX_CONF_DIR".to_string(), layout.nix_conf_dir().display().to_string());
    Ok(match target {
        PushTarget::NixCopy { uri, signing_key_file } => {
            let key = layout.path(signing_key_file);
            if !key.is_file() {
                return Err(format!("signing key {} is missing", key.display()));
            }
            let sep = if uri.contains('?') { '&' } else { '?' };
            let mut args = vec![
                "--extra-experimental-features".into(),
                "nix-command".into(),
                "copy".into(),
                "--to".into(),
            ];
            args.push(format!("{uri}{sep}secret-key={}", key.display()));
            args.extend(paths.iter().cloned());
            PushCommand {
                program: bins.nix.clone(),
                args,
                env: vec![conf],
                files: vec![],
                secrets: uri_parts(uri).1,
            }
        }
        PushTarget::Attic {
            endpoint,
            cache,
            token_file,
        } => {
            let token = read_secret(layout, token_file)?;
            let home = layout.agent_run_dir().join("attic");
            let config = format!(
                "default-server = \"nixpool\"\n\n[servers.nixpool]\nendpoint = {}\ntoken = {}\n",
                toml_str(endpoint),
                toml_str(&token)
            );
            let mut args = vec!["push".to_string(), format!("nixpool:{cache}")];
            args.extend(paths.iter().cloned());
            PushCommand {
                program: bins.attic.clone(),
                args,
                env: vec![conf, ("XDG_CONFIG_HOME".into(), home.display().to_string())],
                files: vec![(home.join("attic/config.toml"), config)],
                secrets: vec![token],
            }
        }
        PushTarget::Cachix { cache, token_file } => {
            let token = read_secret(layout, token_file)?;
            let mut args = vec!["push".to_string(), cache.clone()];
            args.extend(paths.iter().cloned());
            PushCommand {
                program: bins.cachix.clone(),
                args,
                env: vec![conf, ("CACHIX_AUTH_TOKEN".into(), token.clone())],
                files: vec![],
                secrets: vec![token],
            }
        }
    })
}

async fn run_push(cmd: &PushCommand) -> Result<(), String> {
    for (path, content) in &cmd.files {
        crate::fhs::write_file(path, content.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    }
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, OsString::from(v))));
    let out = tokio::time::timeout(Duration::from_secs(1800), procs::output(&mut c))
        .await
        .map_err(|_| "timed out after 30 minutes".to_string())?
        .map_err(|e| format!("cannot run {}: {e}", cmd.program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = scrub(&String::from_utf8_lossy(&out.stderr), &cmd.secrets);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        Err(format!(
            "{}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// Delays between the retries of a failing push: `base` doubling to `max`, each plus up to as
/// much again at random, so that agents that failed together do not retry in step.
pub fn retry_delays(base: Duration, max: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::new()
        .with_min_delay(base)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Settings of the pusher.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often the queues are looked at.
    pub poll: Duration,
    /// First delay before a failed path is tried again; doubles up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts per path and target; then the path is dropped for that target.
    pub max_attempts: u32,
    /// Most paths queued per target; more are dropped for that target.
    pub max_queued: usize,
}

/// Why a path was given up on for one target (the `reason` label).
pub const QUEUE_FULL: &str = "queue_full";
pub const GAVE_UP: &str = "gave_up";
pub const NOT_IN_STORE: &str = "not_in_store";
pub const CANNOT_QUEUE: &str = "cannot_queue";
pub const TARGET_REMOVED: &str = "target_removed";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabel {
    pub target: String,
    pub reason: &'static str,
}

/// The pusher's metrics, each by target (its [`target_name`], which has no credentials).
#[derive(Default)]
pub struct PushMetrics {
    pub queue_length: Family<TargetLabel, Gauge>,
    pub lag_seconds: Family<TargetLabel, Gauge<f64, AtomicU64>>,
    pub pushed: Family<TargetLabel, Counter>,
    pub failures: Family<TargetLabel, Counter>,
    pub dropped: Family<DropLabel, Counter>,
}

impl PushMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "push_queue_length",
            "Paths waiting to be pushed, by target",
            self.queue_length.clone(),
        );
        r.register(
            "push_lag_seconds",
            "Age of the oldest path waiting to be pushed, by target",
            self.lag_seconds.clone(),
        );
        r.register("pushed_paths", "Paths pushed, by target", self.pushed.clone());
        r.register(
            "push_failures",
            "Failed push attempts (one path each), by target",
            self.failures.clone(),
        );
        r.register(
            "push_dropped_paths",
            "Paths given up on, by target and reason (queue_full, gave_up, not_in_store, cannot_queue, target_removed)",
            self.dropped.clone(),
        );
    }

    fn drop_paths(&self, target: &str, reason: &'static str, paths: u64) {
        let label = DropLabel {
            target: target.to_string(),
            reason,
        };
        self.dropped.get_or_create(&label).inc_by(paths);
    }
}

/// Sets the queue-length and lag gauges from the queues on disk. Called at each scrape, so the
/// lag is current even while a long push runs.
pub fn refresh_metrics(queue: &Path, metrics: &PushMetrics) {
    let now = SystemTime::now();
    for q in TargetQueue::all(queue) {
        let names = q.names();
        let label = TargetLabel { target: q.name.clone() };
        let lag = names
            .first()
            .and_then(|n| now.duration_since(enqueued_at(n)?).ok())
            .unwrap_or_default();
        metrics.queue_length.get_or_create(&label).set(names.len() as i64);
        metrics.lag_seconds.get_or_create(&label).set(lag.as_secs_f64());
    }
}

/// When a queued path was enqueued, from its file name (`<ns since the epoch>-…`).
fn enqueued_at(name: &str) -> Option<SystemTime> {
    let nanos: u64 = name.split('-').next()?.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// Paths not yet pushed (or given up on) for some target, the hook's entries included.
pub fn pending(queue: &Path) -> usize {
    let in_entries: usize = queued(queue)
        .iter()
        .filter_map(|e| fs::read_to_string(e).ok())
        .map(|t| t.lines().filter(|l| !l.is_empty()).count())
        .sum();
    in_entries + TargetQueue::all(queue).iter().map(|q| q.names().len()).sum::<usize>()
}

/// The drain's part: waits until nothing is left to push, or until `deadline`. What is left
/// stays queued on `/nix` for the next start. Returns the paths left.
pub async fn wait_until_pushed(queue: &Path, deadline: Instant) -> usize {
    loop {
        let left = pending(queue);
        if left == 0 {
            return 0;
        }
        let now = Instant::now();
        if now >= deadline {
            warn!(
                paths = left,
                "drain budget spent with paths still queued for push; they stay queued on /nix"
            );
            return left;
        }
        tokio::time::sleep(Duration::from_millis(200).min(deadline - now)).await;
    }
}

/// One target's queue: a directory with one file per queued path.
#[derive(Clone, Debug)]
struct TargetQueue {
    name: String,
    dir: PathBuf,
}

impl TargetQueue {
    /// The queue of the target named `name`, created if missing. Its directory is named by a
    /// hash of the name: stable across restarts and agent versions, and credential-free since
    /// the name is.
    fn open(queue: &Path, name: &str) -> std::io::Result<Self> {
        let key = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let q = Self {
            name: name.to_string(),
            dir: queue.join("targets").join(format!("{key:016x}")),
        };
        fs::create_dir_all(&q.dir)?;
        crate::fhs::write_file(&q.dir.join(".target"), format!("{name}\n").as_bytes(), 0o600)
            .map_err(std::io::Error::other)?;
        Ok(q)
    }

    /// Every target queue on disk, configured or not.
    fn all(queue: &Path) -> Vec<Self> {
        let Ok(dir) = fs::read_dir(queue.join("targets")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                let name = fs::read_to_string(e.path().join(".target")).ok()?;
                Some(Self {
                    name: name.trim().to_string(),
                    dir: e.path(),
                })
            })
            .collect()
    }

    /// Queued paths' file names, oldest first.
    fn names(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = dir
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }

    /// Writes and renames into place, without the fsync of [`crate::fhs::write_file`]: like the
    /// hook's entries, a queued path is worth less than the time 2 fsyncs per path and target
    /// take on a busy disk.
    fn add(&self, name: &str, store_path: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(format!("{store_path}\n").as_bytes())?;
        fs::rename(&tmp, self.dir.join(name))
    }

    fn read(&self, name: &str) -> Option<String> {
        Some(fs::read_to_string(self.dir.join(name)).ok()?.trim().to_string())
    }

    fn remove(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join(name));
    }
}

/// Moves the hook's entries into every target's queue, one file per path. A target whose queue
/// already holds `max_queued` paths drops the rest, counted.
fn intake(queue: &Path, targets: &[TargetQueue], max_queued: usize, metrics: &PushMetrics) {
    let entries = queued(queue);
    if entries.is_empty() {
        return;
    }
    let mut lengths: Vec<usize> = targets.iter().map(|q| q.names().len()).collect();
    let mut full = vec![0_u64; targets.len()];
    for entry in entries {
        let stem = entry
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = fs::read_to_string(&entry).unwrap_or_else(|e| {
            warn!(entry = %entry.display(), error = %e, "cannot read a push queue entry; removing it");
            String::new()
        });
        for (i, store_path) in text.lines().filter(|l| !l.is_empty()).enumerate() {
            for (t, q) in targets.iter().enumerate() {
                if lengths[t] >= max_queued {
                    full[t] += 1;
                    continue;
                }
                match q.add(&format!("{stem}-{i}"), store_path) {
                    Ok(()) => lengths[t] += 1,
                    Err(e) => {
                        warn!(target = %q.name, path = store_path, error = %e, "cannot queue a path for push; dropping it for this target");
                        metrics.drop_paths(&q.name, CANNOT_QUEUE, 1);
                    }
                }
            }
        }
        let _ = fs::remove_file(&entry);
    }
    for (q, dropped) in targets.iter().zip(full).filter(|(_, d)| *d > 0) {
        warn!(target = %q.name, dropped, max_queued, "push queue full: dropping new paths for this target");
        metrics.drop_paths(&q.name, QUEUE_FULL, dropped);
    }
}

/// Drops the queues of targets that are no longer configured (the pool's caches changed).
fn remove_unconfigured(queue: &Path, configured: &[TargetQueue], metrics: &PushMetrics) {
    for q in TargetQueue::all(queue) {
        if configured.iter().any(|c| c.dir == q.dir) {
            continue;
        }
        let paths = q.names().len();
        warn!(target = %q.name, paths, "no longer a push target: dropping its queue");
        metrics.drop_paths(&q.name, TARGET_REMOVED, paths as u64);
        let _ = fs::remove_dir_all(&q.dir);
    }
}

/// A path that failed: how often, and when to try it again.
struct Retry {
    attempts: u32,
    next: Instant,
    delays: backon::ExponentialBackoff,
}

/// Most paths in one push command. A batch that fails is split: each of its paths is tried
/// alone at once, so that one bad path holds back no other.
const BATCH: usize = 32;

/// One target's worker.
struct Worker {
    target: PushTarget,
    queue: TargetQueue,
    settings: Settings,
    layout: Layout,
    bins: Binaries,
    metrics: Arc<Metrics>,
    /// Queued paths (by file name) that failed.
    retries: HashMap<String, Retry>,
    /// Whether the last attempt failed (to log a streak of failures once).
    failing: bool,
}

impl Worker {
    /// Pushes this target's queue, oldest first: the paths due (new ones, and failed ones whose
    /// backoff is over) in batches; a failed path waits for its own next try while the ones
    /// behind it go on. Runs until `stop`, which also ends a push under way (killing it).
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll) => {}
                _ = crate::supervise::stopped(&mut stop) => return,
            }
            let names = self.queue.names();
            let present: HashSet<&String> = names.iter().collect();
            self.retries.retain(|n, _| present.contains(n));
            let now = Instant::now();
            let mut due: Vec<(String, String)> = Vec::new();
            for file in names {
                if self.retries.get(&file).is_some_and(|r| r.next > now) {
                    continue;
                }
                let Some(path) = self.queue.read(&file) else { continue };
                if self.layout.path(&path).exists() {
                    due.push((file, path));
                    continue;
                }
                info!(target = %self.queue.name, path, "queued path is no longer in the store; dropping it");
                self.metrics.push.drop_paths(&self.queue.name, NOT_IN_STORE, 1);
                self.queue.remove(&file);
            }
            for batch in due.chunks(BATCH) {
                if batch.len() > 1 {
                    let paths: Vec<String> = batch.iter().map(|(_, p)| p.clone()).collect();
                    match self.push(&paths, &mut stop).await {
                        None => return,
                        Some(Ok(())) => {
                            batch.iter().for_each(|(file, path)| self.pushed(file, path));
                            continue;
                        }
                        Some(Err(error)) => {
                            debug!(target = %self.queue.name, paths = batch.len(), %error, "batch push failed; trying each path alone")
                        }
                    }
                }
                for (file, path) in batch {
                    match self.push(std::slice::from_ref(path), &mut stop).await {
                        None => return,
                        Some(Ok(())) => self.pushed(file, path),
                        Some(Err(error)) => self.failed(file, path, &error),
                    }
                }
            }
        }
    }

    /// One push command; `None` when `stop` came first (the command is killed).
    async fn push(&self, paths: &[String], stop: &mut watch::Receiver<bool>) -> Option<Result<(), String>> {
        let push = async {
            let cmd = command(&self.target, &self.bins, &self.layout, paths)?;
            run_push(&cmd).await
        };
        tokio::select! {
            r = push => Some(r),
            _ = crate::supervise::stopped(stop) => None,
        }
    }

    fn label(&self) -> TargetLabel {
        TargetLabel {
            target: self.queue.name.clone(),
        }
    }

    fn pushed(&mut self, file: &str, path: &str) {
        let name = &self.queue.name;
        info!(target = %name, path, "pushed");
        if std::mem::take(&mut self.failing) {
            info!(target = %name, "pushes succeed again");
        }
        self.metrics.push.pushed.get_or_create(&self.label()).inc();
        self.queue.remove(file);
        self.retries.remove(file);
    }

    /// Counts a failed attempt of one path; schedules its next one, or gives up on it.
    fn failed(&mut self, file: &str, path: &str, error: &str) {
        self.metrics.push.failures.get_or_create(&self.label()).inc();
        let (name, s) = (&self.queue.name, &self.settings);
        let retry = self.retries.entry(file.to_string()).or_insert_with(|| Retry {
            attempts: 0,
            next: Instant::now(),
            delays: retry_delays(s.base_backoff, s.max_backoff),
        });
        retry.attempts += 1;
        let attempts = retry.attempts;
        if attempts >= s.max_attempts {
            warn!(target = %name, path, attempts, error, "push failed too often; giving up on this path for this target");
            self.metrics.push.drop_paths(name, GAVE_UP, 1);
            self.queue.remove(file);
            self.retries.remove(file);
            return;
        }
        let delay = retry.delays.next().unwrap_or(s.max_backoff);
        retry.next = Instant::now() + delay;
        // One warning when a target starts failing; each retry at debug.
        if !std::mem::replace(&mut self.failing, true) {
            warn!(target = %name, path, error, "push failed; will retry each path with backoff");
        } else {
            debug!(target = %name, path, attempts, ?delay, error, "push failed; will retry");
        }
    }
}

/// The pusher: one intake loop and one worker per target.
#[derive(Clone, Debug)]
pub struct Pusher {
    pub targets: Vec<PushTarget>,
    pub settings: Settings,
}

impl Pusher {
    /// Runs until `stop`; what is still queued stays queued for the next start.
    pub async fn run(self, layout: Layout, bins: Binaries, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
        let queue = layout.push_queue();
        let mut queues: Vec<TargetQueue> = Vec::new();
        let mut workers = Vec::new();
        for target in self.targets {
            let name = target_name(&target);
            if queues.iter().any(|q| q.name == name) {
                warn!(target = %name, "push target named twice; pushing there once");
                continue;
            }
            let queue = match TargetQueue::open(&queue, &name) {
                Ok(q) => q,
                Err(e) => {
                    warn!(target = %name, error = %e, "cannot make this target's push queue; not pushing there");
                    continue;
                }
            };
            queues.push(queue.clone());
            let worker = Worker {
                target,
                queue,
                settings: self.settings.clone(),
                layout: layout.clone(),
                bins: bins.clone(),
                metrics: metrics.clone(),
                retries: HashMap::new(),
                failing: false,
            };
            workers.push(tokio::spawn(worker.run(stop.clone())));
        }
        remove_unconfigured(&queue, &queues, &metrics.push);
        loop {
            intake(&queue, &queues, self.settings.max_queued, &metrics.push);
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll) => {}
                _ = crate::supervise::stopped(&mut stop) => break,
            }
        }
        for w in workers {
            let _ = w.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins() -> Binaries {
        Binaries {
            sshd: "sshd".into(),
            nix_daemon: "nix-daemon".into(),
            nix_store: "nix-store".into(),
            nix: "/bin/nix".into(),
            attic: "/bin/attic".into(),
            cachix: "/bin/cachix".into(),
            agent: "/bin/nixpool-agent".into(),
        }
    }

    fn root_with(file: &str, content: &str) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let p = layout.path(file);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
        (dir, layout)
    }

    #[test]
    fn enqueue_writes_one_entry_per_build_and_stats_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        assert_eq!(enqueue(&q, "  ").unwrap(), None);
        let e = enqueue(&q, "/nix/store/a-x /nix/store/b-y").unwrap().unwrap();
        assert_eq!(fs::read_to_string(e).unwrap(), "/nix/store/a-x\n/nix/store/b-y\n");
        enqueue(&q, "/nix/store/c-z").unwrap();
        assert_eq!(queued(&q).len(), 2);
        assert!(queued(&q)[0] < queued(&q)[1]);
        assert_eq!(pending(&q), 3);
    }

    fn label(target: &str) -> TargetLabel {
        TargetLabel { target: target.into() }
    }

    fn dropped(m: &PushMetrics, target: &str, reason: &'static str) -> u64 {
        m.dropped
            .get_or_create(&DropLabel {
                target: target.into(),
                reason,
            })
            .get()
    }

    #[test]
    fn intake_gives_every_target_its_own_queue_and_drops_beyond_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        let small = TargetQueue::open(&q, "nix-copy:file:///small").unwrap();
        let big = TargetQueue::open(&q, "nix-copy:file:///big").unwrap();
        assert_ne!(small.dir, big.dir);
        enqueue(&q, "/nix/store/a-x /nix/store/b-y").unwrap();
        enqueue(&q, "/nix/store/c-z").unwrap();
        let m = PushMetrics::default();
        let targets = [small.clone(), big.clone()];
        // The small queue takes 2 paths; the big one 10.
        intake(&q, &targets[..1], 2, &m);
        assert_eq!(dropped(&m, "nix-copy:file:///small", QUEUE_FULL), 1);
        assert!(queued(&q).is_empty(), "entries are consumed");
        assert_eq!(small.names().len(), 2);
        enqueue(&q, "/nix/store/d-w").unwrap();
        intake(&q, &targets, 10, &m);
        assert_eq!(small.names().len(), 3, "within the cap of 10");
        assert_eq!(big.names(), vec![small.names()[2].clone()]);
        assert_eq!(big.read(&big.names()[0]).as_deref(), Some("/nix/store/d-w"));
        assert_eq!(pending(&q), 4);
        // Reopening finds the same queue (a restarted agent goes on).
        assert_eq!(
            TargetQueue::open(&q, "nix-copy:file:///big").unwrap().names(),
            big.names()
        );
    }

    #[test]
    fn gauges_show_each_targets_length_and_oldest_age() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        let a = TargetQueue::open(&q, "cachix:a").unwrap();
        let b = TargetQueue::open(&q, "cachix:b").unwrap();
        let ns = |ago: Duration| {
            (SystemTime::now() - ago)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        };
        a.add(&format!("{:020}-1-0", ns(Duration::from_secs(30))), "/nix/store/a-x")
            .unwrap();
        a.add(&format!("{:020}-1-1", ns(Duration::from_secs(5))), "/nix/store/b-y")
            .unwrap();
        let m = PushMetrics::default();
        refresh_metrics(&q, &m);
        assert_eq!(m.queue_length.get_or_create(&label("cachix:a")).get(), 2);
        let lag = m.lag_seconds.get_or_create(&label("cachix:a")).get();
        assert!((30.0..35.0).contains(&lag), "{lag}");
        assert_eq!(m.queue_length.get_or_create(&label("cachix:b")).get(), 0);
        assert_eq!(m.lag_seconds.get_or_create(&label("cachix:b")).get(), 0.0);
        // Emptied: the lag falls back to 0.
        for n in a.names() {
            a.remove(&n);
        }
        refresh_metrics(&q, &m);
        assert_eq!(m.lag_seconds.get_or_create(&label("cachix:a")).get(), 0.0);
        drop(b);
    }

    #[test]
    fn a_target_no_longer_configured_loses_its_queue_counted() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        let kept = TargetQueue::open(&q, "cachix:kept").unwrap();
        let gone = TargetQueue::open(&q, "cachix:gone").unwrap();
        kept.add("00000000000000000001-1-0", "/nix/store/a-x").unwrap();
        gone.add("00000000000000000001-1-0", "/nix/store/a-x").unwrap();
        gone.add("00000000000000000001-1-1", "/nix/store/b-y").unwrap();
        let m = PushMetrics::default();
        remove_unconfigured(&q, std::slice::from_ref(&kept), &m);
        assert_eq!(dropped(&m, "cachix:gone", TARGET_REMOVED), 2);
        assert!(!gone.dir.exists());
        assert_eq!(kept.names().len(), 1);
        assert_eq!(pending(&q), 1);
    }

    #[test]
    fn names_and_logs_carry_no_credentials() {
        let copy = |uri: &str| PushTarget::NixCopy {
            uri: uri.into(),
            signing_key_file: "/k".into(),
        };
        let cases = [
            (
                "s3://bucket?region=eu&profile=p",
                "nix-copy:s3://bucket",
                vec!["region=eu&profile=p"],
            ),
            (
                "https://user:tok3n@cache.example/c?x=y",
                "nix-copy:https://cache.example/c",
                vec!["x=y", "user:tok3n"],
            ),
            ("ssh://me@host", "nix-copy:ssh://host", vec!["me"]),
            ("file:///var/cache#frag", "nix-copy:file:///var/cache", vec!["frag"]),
            ("file:///var/cache", "nix-copy:file:///var/cache", vec![]),
        ];
        for (uri, name, hidden) in cases {
            assert_eq!(target_name(&copy(uri)), name, "{uri}");
            assert_eq!(uri_parts(uri).1, hidden, "{uri}");
        }
        let (_d, layout) = root_with("/k", "k:secret");
        let c = command(&copy("https://user:tok3n@cache.example/c"), &bins(), &layout, &[]).unwrap();
        let said = "error: cannot open 'https://user:tok3n@cache.example/c?secret-key=/k'";
        let scrubbed = scrub(said, &c.secrets);
        assert!(!scrubbed.contains("tok3n"), "{scrubbed}");
        assert!(scrubbed.contains("https://<redacted>@cache.example/c"), "{scrubbed}");
    }

    #[test]
    fn outputs_are_found_by_name_and_deriver() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "aaa-hello-1.0",
            "bbb-hello-1.0-dev",
            "ccc-hello-1.0.drv",
            "ddd-hello-10",
            "eee-other",
        ] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        // A fake nix-store that names the deriver of the first two.
        let fake = dir.path().join("fake-nix-store");
        fs::write(&fake, "#!/bin/sh\ncase \"$3\" in */aaa-*|*/bbb-*) echo /nix/store/zzz-hello-1.0.drv;; *) echo unknown-deriver;; esac\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let mut found = outputs_of(dir.path(), "/nix/store/zzz-hello-1.0.drv", &fake);
        found.sort();
        assert_eq!(found, ["/nix/store/aaa-hello-1.0", "/nix/store/bbb-hello-1.0-dev"]);
        assert!(outputs_of(dir.path(), "not-a-drv", &fake).is_empty());
    }

    #[test]
    fn nix_copy_signs_with_the_key_file() {
        let (_d, layout) = root_with("/run/nixpool/cache/store-signing-key", "k:secret");
        let t = PushTarget::NixCopy {
            uri: "s3://b?region=x".into(),
            signing_key_file: "/run/nixpool/cache/store-signing-key".into(),
        };
        let c = command(&t, &bins(), &layout, &["/nix/store/a-x".into()]).unwrap();
        assert_eq!(c.program, PathBuf::from("/bin/nix"));
        assert_eq!(&c.args[2..4], ["copy", "--to"]);
        assert_eq!(
            c.args[4],
            format!(
                "s3://b?region=x&secret-key={}",
                layout.path("/run/nixpool/cache/store-signing-key").display()
            )
        );
        assert_eq!(c.args[5], "/nix/store/a-x");
        assert!(!c.args.iter().any(|a| a.contains("k:secret")));
    }

    #[test]
    fn attic_gets_its_token_through_a_config_file() {
        let (_d, layout) = root_with("/run/nixpool/cache/attic-token", "tok-123\n");
        let t = PushTarget::Attic {
            endpoint: "https://attic.example".into(),
            cache: "main".into(),
            token_file: "/run/nixpool/cache/attic-token".into(),
        };
        let c = command(
            &t,
            &bins(),
            &layout,
            &["/nix/store/a-x".into(), "/nix/store/b-y".into()],
        )
        .unwrap();
        assert_eq!(c.program, PathBuf::from("/bin/attic"));
        assert_eq!(c.args, ["push", "nixpool:main", "/nix/store/a-x", "/nix/store/b-y"]);
        assert!(!c.args.iter().any(|a| a.contains("tok-123")));
        let (path, config) = &c.files[0];
        assert!(path.ends_with("attic/attic/config.toml"));
        assert!(config.contains("endpoint = \"https://attic.example\"") && config.contains("token = \"tok-123\""));
        let xdg = c.env.iter().find(|(k, _)| k == "XDG_CONFIG_HOME").unwrap();
        assert!(path.starts_with(&xdg.1));
    }

    #[test]
    fn cachix_gets_its_token_in_the_environment() {
        let (_d, layout) = root_with("/run/nixpool/cache/cachix-token", "ctok\n");
        let t = PushTarget::Cachix {
            cache: "mycache".into(),
            token_file: "/run/nixpool/cache/cachix-token".into(),
        };
        let c = command(&t, &bins(), &layout, &["/nix/store/a-x".into()]).unwrap();
        assert_eq!(c.args, ["push", "mycache", "/nix/store/a-x"]);
        assert!(c.env.contains(&("CACHIX_AUTH_TOKEN".into(), "ctok".into())));
        let missing = PushTarget::Cachix {
            cache: "c".into(),
            token_file: "/nope".into(),
        };
        assert!(command(&missing, &bins(), &layout, &[]).unwrap_err().contains("/nope"));
    }

    #[test]
    fn retry_delays_double_up_to_the_cap_plus_jitter() {
        let delays: Vec<Duration> = retry_delays(Duration::from_secs(1), Duration::from_secs(60))
            .take(10)
            .collect();
        // Without jitter: 1, 2, 4, ... 32, then 60 s; jitter adds less than as much again.
        let plain = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60].map(Duration::from_secs);
        for (delay, plain) in delays.iter().zip(plain) {
            assert!(*delay >= plain && *delay < plain * 2, "{delay:?} for {plain:?}");
        }
        assert_ne!(delays[6..], plain[6..], "jittered, capped delays are not all equal");
    }
}
