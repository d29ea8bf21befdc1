//! The drain after SIGTERM, bounded by one deadline: the config's `drainTimeoutSeconds` from the
//! signal. The operator sets it 10 s below the pod's `terminationGracePeriodSeconds`, the margin
//! for the kubelet's SIGKILL, so the agent exits on its own within the grace period.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::procs;

/// Kept at the end of the budget to end sessions and stop sshd and nix-daemon.
const STOP_RESERVE: Duration = Duration::from_secs(2);

/// The drain's deadline. Sessions and the pusher's flush may run until [`Deadline::work_until`];
/// what is left, up to [`Deadline::end`], stops the rest.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub start: Instant,
    pub end: Instant,
    reserve: Duration,
}

impl Deadline {
    pub fn new(start: Instant, budget: Duration) -> Self {
        Self {
            start,
            end: start + budget,
            reserve: STOP_RESERVE.min(budget / 2),
        }
    }

    /// Until when builds and pushes may go on (the pusher takes it as its flush deadline).
    pub fn work_until(&self) -> Instant {
        self.end - self.reserve
    }

    pub fn left(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Waits for the SSH sessions to end until [`Deadline::work_until`], then ends those left:
/// SIGTERM, and SIGKILL half-way to the end. Returns how many were cut.
pub async fn sessions(deadline: &Deadline) -> usize {
    loop {
        let open = procs::ssh_sessions(&procs::scan(), None);
        if open.is_empty() {
            info!("no SSH session left");
            return 0;
        }
        if Instant::now() >= deadline.work_until() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut = procs::ssh_sessions(&procs::scan(), None);
    warn!(
        sessions = cut.len(),
        "drain budget spent; ending the remaining SSH sessions"
    );
    for pid in &cut {
        procs::signal(*pid as u32, Signal::SIGTERM);
    }
    let kill_at = Instant::now() + deadline.left() / 2;
    loop {
        let open = procs::ssh_sessions(&procs::scan(), None);
        if open.is_empty() {
            break;
        }
        if Instant::now() >= kill_at {
            warn!(
                sessions = open.len(),
                "SSH sessions still open after SIGTERM; killing them"
            );
            for pid in open {
                procs::signal(pid as u32, Signal::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        procs::reap_orphans();
    }
    cut.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_reserve_fits_any_budget() {
        let t0 = Instant::now();
        let long = Deadline::new(t0, Duration::from_secs(3590));
        assert_eq!(long.end - long.work_until(), STOP_RESERVE);
        let short = Deadline::new(t0, Duration::from_secs(3));
        assert_eq!(short.work_until() - t0, Duration::from_millis(1500));
        let none = Deadline::new(t0, Duration::ZERO);
        assert_eq!((none.work_until(), none.end), (t0, t0));
    }
}
