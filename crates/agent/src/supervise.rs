//! Keeping nix-daemon and sshd up: restart a crashed child with backoff, give up (and let the
//! agent exit non-zero) after repeated crashes. The restart policy is a pure state machine.
//! [`Supervised`] and [`Stoppable`] own a task together with the signal that stops it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::procs;

/// When to restart and when to give up.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Crashes tolerated within `window`; one more and the agent gives up.
    pub max_restarts: u32,
    pub window: Duration,
    /// First backoff; doubled per crash in the window, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Restart { after: Duration, crashes: u32 },
    GiveUp { crashes: u32 },
}

/// Crash history of one child.
#[derive(Debug, Default)]
pub struct CrashHistory {
    exits: VecDeque<Instant>,
}

impl CrashHistory {
    pub fn on_exit(&mut self, policy: &Policy, now: Instant) -> Decision {
        while self
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.exits.pop_front();
        }
        self.exits.push_back(now);
        let crashes = self.exits.len() as u32;
        if crashes > policy.max_restarts {
            return Decision::GiveUp { crashes };
        }
        // The first crash in the window is restarted at once: while sshd or nix-daemon is down
        // every new connection to this builder is refused, a lost build. Repeats back off.
        let after = match crashes {
            1 => Duration::ZERO,
            n => policy
                .backoff
                .saturating_mul(2u32.saturating_pow(n - 2))
                .min(policy.max_backoff),
        };
        Decision::Restart { after, crashes }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A supervised program.
#[derive(Clone, Debug)]
pub struct ChildCommand {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, OsString)>,
}

impl ChildCommand {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null());
        c
    }
}

/// The running child's pid (0: none), for metrics, readiness and the drain.
#[derive(Debug, Default)]
pub struct ChildState {
    pid: AtomicU32,
    pub restarts: AtomicU32,
}

impl ChildState {
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }
}

/// Supervises `spec` until `stop` turns true (then SIGTERM, then SIGKILL after `grace`), or
/// until it crashes too often (then sends the reason on `fatal`).
pub async fn supervise(
    spec: ChildCommand,
    policy: Policy,
    mut stop: watch::Receiver<bool>,
    fatal: mpsc::Sender<String>,
    running: Arc<ChildState>,
    on_restart: impl Fn() + Send + 'static,
) {
    let mut tracker = CrashHistory::default();
    let grace = Duration::from_secs(10);
    loop {
        let status = match procs::spawn(&mut spec.command()) {
            Err(e) => format!("could not start {}: {e}", spec.program.display()),
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                running.pid.store(pid, Ordering::SeqCst);
                info!(child = spec.name, pid, "started");
                let status = tokio::select! {
                    s = child.wait() => s,
                    _ = stopped(&mut stop) => {
                        procs::signal(pid, Signal::SIGTERM);
                        let s = match tokio::time::timeout(grace, child.wait()).await {
                            Ok(s) => s,
                            Err(_) => {
                                warn!(child = spec.name, pid, "did not stop within {grace:?}; killing");
                                let _ = child.start_kill();
                                child.wait().await
                            }
                        };
                        procs::forget(pid);
                        running.pid.store(0, Ordering::SeqCst);
                        info!(child = spec.name, pid, status = ?s, "stopped");
                        return;
                    }
                };
                procs::forget(pid);
                running.pid.store(0, Ordering::SeqCst);
                match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                }
            }
        };
        if *stop.borrow() {
            return;
        }
        match tracker.on_exit(&policy, Instant::now()) {
            Decision::Restart { after, crashes } => {
                warn!(child = spec.name, %status, crashes, backoff = ?after, "crashed; restarting");
                running.restarts.fetch_add(1, Ordering::SeqCst);
                on_restart();
                tokio::select! {
                    _ = tokio::time::sleep(after) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
            Decision::GiveUp { crashes } => {
                let reason = format!(
                    "{} crashed {crashes} times within {}s (last: {status}); giving up",
                    spec.name,
                    policy.window.as_secs()
                );
                let _ = fatal.send(reason).await;
                return;
            }
        }
    }
}

/// A task that runs until told to stop: its handle and the signal it watches.
pub struct Stoppable {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Stoppable {
    /// Spawns `task`, handing it the receiving end of its stop signal.
    pub fn spawn<Task, Run>(task: Task) -> Self
    where
        Task: FnOnce(watch::Receiver<bool>) -> Run,
        Run: Future<Output = ()> + Send + 'static,
    {
        let (stop, stop_rx) = watch::channel(false);
        Self {
            stop,
            task: tokio::spawn(task(stop_rx)),
        }
    }

    /// Tells the task to stop, without waiting for it.
    pub fn signal(&self) {
        let _ = self.stop.send(true);
    }

    /// Tells the task to stop and waits for it up to `within`: whether it ended. Call again only
    /// after `false`.
    pub async fn stop(&mut self, within: Duration) -> bool {
        self.signal();
        tokio::time::timeout(within, &mut self.task).await.is_ok()
    }
}

/// A supervised child: its supervisor's task and stop signal, and its pid for a SIGKILL.
pub struct Supervised {
    pub name: &'static str,
    supervisor: Stoppable,
    running: Arc<ChildState>,
}

impl Supervised {
    /// Starts supervising `spec` (see [`supervise`]).
    pub fn start(
        spec: ChildCommand,
        policy: Policy,
        fatal: mpsc::Sender<String>,
        running: Arc<ChildState>,
        on_restart: impl Fn() + Send + 'static,
    ) -> Self {
        let name = spec.name;
        let watched = running.clone();
        let supervisor = Stoppable::spawn(move |stop| supervise(spec, policy, stop, fatal, watched, on_restart));
        Self {
            name,
            supervisor,
            running,
        }
    }

    /// SIGTERM (its supervisor sends it), then SIGKILL once `until` has passed.
    pub async fn stop(mut self, until: Instant) {
        let left = until.saturating_duration_since(Instant::now());
        if self.supervisor.stop(left).await {
            return;
        }
        if let Some(pid) = self.running.pid() {
            warn!(child = self.name, pid, "did not stop in time; killing");
            procs::signal(pid, Signal::SIGKILL);
        }
        self.supervisor.stop(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3),
        }
    }

    fn policy_of_five() -> Policy {
        Policy {
            max_restarts: 5,
            ..policy()
        }
    }

    #[test]
    fn restarts_at_once_then_backs_off_then_gives_up() {
        let mut t = CrashHistory::default();
        let now = Instant::now();
        let afters: Vec<Decision> = (0..6).map(|_| t.on_exit(&policy_of_five(), now)).collect();
        let restart = |secs, crashes| Decision::Restart {
            after: Duration::from_secs(secs),
            crashes,
        };
        assert_eq!(
            afters,
            [
                restart(0, 1),
                restart(1, 2),
                restart(2, 3),
                restart(3, 4),
                restart(3, 5),
                Decision::GiveUp { crashes: 6 }
            ]
        );
    }

    #[test]
    fn crashes_outside_the_window_are_forgotten() {
        let mut t = CrashHistory::default();
        let start = Instant::now();
        for i in 0..3 {
            t.on_exit(&policy(), start + Duration::from_secs(i));
        }
        let later = start + Duration::from_secs(120);
        assert_eq!(
            t.on_exit(&policy(), later),
            Decision::Restart {
                after: Duration::ZERO,
                crashes: 1
            }
        );
    }

    #[tokio::test]
    async fn a_crash_looping_child_is_reported() {
        let (_stop_tx, stop) = watch::channel(false);
        let (fatal_tx, mut fatal) = mpsc::channel(1);
        let running = Arc::new(ChildState::default());
        let spec = ChildCommand {
            name: "false",
            program: "/bin/false".into(),
            args: vec![],
            env: vec![],
        };
        let p = Policy {
            max_restarts: 2,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        };
        supervise(spec, p, stop, fatal_tx, running.clone(), || {}).await;
        let reason = fatal.recv().await.unwrap();
        assert!(
            reason.starts_with("false crashed 3 times within 60s (last: exit status: 1)"),
            "{reason}"
        );
        assert_eq!(running.restarts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn stop_terminates_the_child() {
        let (stop_tx, stop) = watch::channel(false);
        let (fatal_tx, mut fatal) = mpsc::channel(1);
        let running = Arc::new(ChildState::default());
        let spec = ChildCommand {
            name: "sleep",
            program: "/bin/sleep".into(),
            args: vec!["30".into()],
            env: vec![],
        };
        let task = tokio::spawn(supervise(spec, policy(), stop, fatal_tx, running.clone(), || {}));
        while running.pid().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t0 = Instant::now();
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(running.pid().is_none());
        assert!(fatal.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_is_killed_when_its_time_is_up() {
        let (fatal_tx, mut fatal) = mpsc::channel(1);
        let running = Arc::new(ChildState::default());
        // The ignored SIGTERM survives the exec: sleep itself ignores it.
        let spec = ChildCommand {
            name: "stubborn",
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "trap '' TERM; exec sleep 30".into()],
            env: vec![],
        };
        let child = Supervised::start(spec, policy(), fatal_tx, running.clone(), || {});
        // Until the shell has set its trap and become sleep.
        let is_sleep = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == "sleep\n");
        while !running.pid().is_some_and(is_sleep) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t0 = Instant::now();
        child.stop(t0 + Duration::from_millis(300)).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(300), "stopped before its time: {took:?}");
        assert!(took < Duration::from_secs(2), "not killed at its time: {took:?}");
        assert!(running.pid().is_none(), "the child is gone");
        assert!(fatal.try_recv().is_err(), "a stop is not a crash");
    }
}
