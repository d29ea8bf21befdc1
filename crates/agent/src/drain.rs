//! The drain after SIGTERM, bounded by one deadline: the config's `drainTimeoutSeconds` from the
//! signal. The operator sets it 10 s below the pod's `terminationGracePeriodSeconds`, the margin
//! for the kubelet's SIGKILL, so the agent exits on its own within the grace period.
//!
//! When each step happens is decided by pure code, [`Schedule`] and [`Schedule::session_step`],
//! given the clock; [`sessions`] only scans and signals.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::procs;

/// Kept at the end of the budget to end sessions and stop sshd and nix-daemon.
const STOP_RESERVE: Duration = Duration::from_secs(2);

/// How long the sshd listener gets to exit on SIGTERM before SIGKILL (less if the work window
/// ends sooner).
const LISTENER_STOP_GRACE: Duration = Duration::from_secs(10);

/// How often open sessions are counted while builds go on, and after they got SIGTERM.
const SESSION_POLL: Duration = Duration::from_millis(100);
const TERMINATED_POLL: Duration = Duration::from_millis(50);

/// When each step of the drain happens, fixed at SIGTERM:
/// `start ≤ accept_until ≤ work_until ≤ end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub start: Instant,
    /// Until when sshd still accepts new connections: until the Service's endpoints and
    /// kube-proxy drop this pod, a connection may still be sent here, and a refused one is a
    /// lost build.
    pub accept_until: Instant,
    /// Until when builds and pushes may go on (the pusher takes it as its flush deadline); then
    /// the remaining sessions are ended.
    pub work_until: Instant,
    /// The end of the budget: sshd and nix-daemon are killed if still up.
    pub end: Instant,
}

impl Schedule {
    /// `budget` from `start`, less a stop reserve (2 s, or half of a shorter budget); sshd
    /// accepts for `accept`, at most half of what is left for work.
    pub fn new(start: Instant, budget: Duration, accept: Duration) -> Self {
        let end = start + budget;
        let work_until = end - STOP_RESERVE.min(budget / 2);
        let accept_until = start + accept.min((work_until - start) / 2);
        Self {
            start,
            accept_until,
            work_until,
            end,
        }
    }

    /// By when the sshd listener, told to stop at `now`, must be gone (else SIGKILL).
    pub fn listener_stop_by(&self, now: Instant) -> Instant {
        self.work_until.min(now + LISTENER_STOP_GRACE)
    }

    /// When sessions sent SIGTERM at `terminated_at` get SIGKILL: half-way to the end.
    pub fn kill_sessions_at(&self, terminated_at: Instant) -> Instant {
        terminated_at + self.end.saturating_duration_since(terminated_at) / 2
    }

    /// What is left of the budget at `now`.
    pub fn left(&self, now: Instant) -> Duration {
        self.end.saturating_duration_since(now)
    }

    /// What to do about `open` SSH sessions at `now`, given when they were sent SIGTERM (if
    /// they were).
    pub fn session_step(&self, open: usize, terminated_at: Option<Instant>, now: Instant) -> SessionStep {
        if open == 0 {
            return SessionStep::Done;
        }
        match terminated_at {
            None if now < self.work_until => SessionStep::Wait(SESSION_POLL),
            None => SessionStep::Terminate,
            Some(at) if now < self.kill_sessions_at(at) => SessionStep::Wait(TERMINATED_POLL),
            Some(_) => SessionStep::Kill,
        }
    }
}

/// The next step of the wait for SSH sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStep {
    /// No session left.
    Done,
    /// Count again after this.
    Wait(Duration),
    /// The work window is over: SIGTERM to those open.
    Terminate,
    /// Still open half-way through what was left after SIGTERM: SIGKILL, and stop waiting.
    Kill,
}

/// Waits for the SSH sessions to end until [`Schedule::work_until`], then ends those left:
/// SIGTERM, and SIGKILL half-way to the end. Returns how many were cut.
pub async fn sessions(schedule: &Schedule) -> usize {
    let mut terminated: Option<(Instant, usize)> = None;
    loop {
        let open = procs::ssh_sessions(&procs::scan(), None);
        let now = Instant::now();
        match schedule.session_step(open.len(), terminated.map(|(at, _)| at), now) {
            SessionStep::Done => {
                if terminated.is_none() {
                    info!("no SSH session left");
                }
                break;
            }
            SessionStep::Wait(pause) => {
                tokio::time::sleep(pause).await;
                if terminated.is_some() {
                    procs::reap_orphans();
                }
            }
            SessionStep::Terminate => {
                warn!(
                    sessions = open.len(),
                    "drain budget spent; ending the remaining SSH sessions"
                );
                for pid in &open {
                    procs::signal(*pid as u32, Signal::SIGTERM);
                }
                terminated = Some((now, open.len()));
            }
            SessionStep::Kill => {
                warn!(
                    sessions = open.len(),
                    "SSH sessions still open after SIGTERM; killing them"
                );
                for pid in open {
                    procs::signal(pid as u32, Signal::SIGKILL);
                }
                break;
            }
        }
    }
    terminated.map_or(0, |(_, cut)| cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn the_stop_reserve_fits_any_budget() {
        let t0 = Instant::now();
        let long = Schedule::new(t0, secs(3590), secs(5));
        assert_eq!(long.end - long.work_until, STOP_RESERVE);
        let short = Schedule::new(t0, secs(3), secs(5));
        assert_eq!(short.work_until - t0, ms(1500));
        assert_eq!(short.end - t0, secs(3));
    }

    #[test]
    fn a_zero_budget_does_every_step_at_once() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, Duration::ZERO, secs(5));
        assert_eq!((s.accept_until, s.work_until, s.end), (t0, t0, t0));
        assert_eq!(s.listener_stop_by(t0), t0);
        assert_eq!(s.session_step(2, None, t0), SessionStep::Terminate);
        assert_eq!(s.kill_sessions_at(t0), t0);
        assert_eq!(s.session_step(2, Some(t0), t0), SessionStep::Kill);
        assert_eq!(s.session_step(0, None, t0), SessionStep::Done);
        assert_eq!(s.left(t0 + secs(1)), Duration::ZERO);
    }

    #[test]
    fn sshd_accepts_for_the_window_when_it_fits() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, secs(60), secs(5));
        assert_eq!(s.accept_until - t0, secs(5));
        assert_eq!(s.work_until - t0, secs(58));
        let none = Schedule::new(t0, secs(60), Duration::ZERO);
        assert_eq!(none.accept_until, t0, "--drain-accept-ms 0 closes the port at once");
    }

    #[test]
    fn an_accept_window_longer_than_half_the_work_is_cut_to_half() {
        let t0 = Instant::now();
        // 10 s budget: work until 8 s; accepting 30 s would leave none, so 4 s.
        let s = Schedule::new(t0, secs(10), secs(30));
        assert_eq!(s.accept_until - t0, secs(4));
        // Exactly half is kept as asked.
        assert_eq!(Schedule::new(t0, secs(10), secs(4)).accept_until - t0, secs(4));
    }

    #[test]
    fn the_listener_gets_ten_seconds_or_what_is_left_of_the_work() {
        let t0 = Instant::now();
        let long = Schedule::new(t0, secs(600), secs(5));
        assert_eq!(long.listener_stop_by(t0 + secs(5)), t0 + secs(15));
        let short = Schedule::new(t0, secs(8), secs(5));
        assert_eq!(short.listener_stop_by(t0 + secs(3)), short.work_until);
        // Told to stop after the work window (a slow accept step): already due.
        assert_eq!(short.listener_stop_by(t0 + secs(7)), short.work_until);
    }

    #[test]
    fn sessions_ending_early_end_the_wait_early() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, secs(60), secs(5));
        assert_eq!(s.session_step(3, None, t0 + secs(1)), SessionStep::Wait(SESSION_POLL));
        assert_eq!(s.session_step(1, None, t0 + secs(20)), SessionStep::Wait(SESSION_POLL));
        assert_eq!(s.session_step(0, None, t0 + secs(21)), SessionStep::Done);
    }

    #[test]
    fn sessions_open_at_the_end_of_the_work_get_sigterm_then_sigkill_half_way() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, secs(60), secs(5));
        let cut = s.work_until;
        assert_eq!(s.session_step(2, None, cut - ms(1)), SessionStep::Wait(SESSION_POLL));
        assert_eq!(s.session_step(2, None, cut), SessionStep::Terminate);
        // 2 s reserve: SIGKILL 1 s after SIGTERM.
        assert_eq!(s.kill_sessions_at(cut), cut + secs(1));
        assert_eq!(
            s.session_step(2, Some(cut), cut + ms(999)),
            SessionStep::Wait(TERMINATED_POLL)
        );
        assert_eq!(s.session_step(1, Some(cut), cut + secs(1)), SessionStep::Kill);
        assert_eq!(
            s.session_step(0, Some(cut), cut + ms(10)),
            SessionStep::Done,
            "SIGTERM sufficed"
        );
    }

    #[test]
    fn sigterm_sent_late_still_kills_before_the_end() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, secs(60), secs(5));
        // The sessions were reached after the work window (the listener took long to stop).
        let late = s.end - ms(400);
        assert_eq!(s.session_step(1, None, late), SessionStep::Terminate);
        assert_eq!(s.kill_sessions_at(late), s.end - ms(200));
        let after_end = s.end + secs(1);
        assert_eq!(s.kill_sessions_at(after_end), after_end, "past the end: kill at once");
        assert_eq!(s.session_step(1, Some(after_end), after_end), SessionStep::Kill);
    }
}
