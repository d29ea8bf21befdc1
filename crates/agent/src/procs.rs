//! Processes: spawning through one registry so that the PID-1 reaper never steals the exit
//! status of a child the agent waits for itself, and `/proc` scans for metrics and draining.

use std::collections::BTreeSet;
use std::io;
use std::process::Output;
use std::sync::{LazyLock, Mutex};

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

static KNOWN: LazyLock<Mutex<BTreeSet<i32>>> = LazyLock::new(|| Mutex::new(BTreeSet::new()));

/// Spawns and registers the child; the caller waits for it and then calls [`forget`].
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut known = KNOWN.lock().expect("registry lock");
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        known.insert(pid as i32);
    }
    Ok(child)
}

pub fn forget(pid: u32) {
    KNOWN.lock().expect("registry lock").remove(&(pid as i32));
}

/// Runs a command to completion, capturing its output.
pub async fn output(cmd: &mut Command) -> io::Result<Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.kill_on_drop(true);
    let child = spawn(cmd)?;
    // Forgotten however this ends, also when the caller drops the future (a push cut short at
    // stop): the child is killed then, and a pid left in the registry would keep the reaper off
    // whatever process gets that pid next.
    let _registered = child.id().map(Registered);
    child.wait_with_output().await
}

/// A registered pid, forgotten on drop.
struct Registered(u32);

impl Drop for Registered {
    fn drop(&mut self) {
        forget(self.0);
    }
}

/// Reaps exited children the agent did not start itself (orphans re-parented to PID 1 or to
/// the agent as subreaper). Returns the pids reaped.
pub fn reap_orphans() -> Vec<i32> {
    let known = KNOWN.lock().expect("registry lock");
    let mut reaped = Vec::new();
    loop {
        let peek = waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        let pid = match peek {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => break,
            },
        };
        if known.contains(&pid.as_raw()) {
            // Ours: its waiter reaps it. Orphans behind it are reaped on the next round.
            break;
        }
        if waitpid(pid, Some(WaitPidFlag::WNOHANG)).is_ok() {
            reaped.push(pid.as_raw());
        }
    }
    reaped
}

/// Makes the agent the reaper of its orphaned descendants even when it is not PID 1 (so sshd
/// sessions that outlive the sshd listener stay visible to the drain).
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
}

/// One `/proc` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub uid: u32,
}

/// Parses `/proc/PID/stat` (comm may hold spaces and parentheses) and the `Uid:` of status.
pub fn parse(stat: &str, status: &str) -> Option<ProcInfo> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let pid = stat[..open].trim().parse().ok()?;
    let comm = stat[open + 1..close].to_string();
    let mut rest = stat[close + 1..].split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcInfo { pid, ppid, comm, uid })
}

pub fn scan() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            parse(&stat, &status)
        })
        .collect()
}

/// SSH connections: sshd processes forked by the listener, or orphaned to the agent after the
/// listener stopped.
pub fn ssh_sessions(procs: &[ProcInfo], listener: Option<u32>) -> Vec<i32> {
    let me = std::process::id() as i32;
    procs
        .iter()
        .filter(|p| {
            p.comm.starts_with("sshd")
                && (Some(p.ppid as u32) == listener || (p.ppid == me && Some(p.pid as u32) != listener))
        })
        .map(|p| p.pid)
        .collect()
}

/// Builds running: distinct build users with a process.
pub fn builds_running(procs: &[ProcInfo], build_uids: &[u32]) -> usize {
    procs
        .iter()
        .filter(|p| build_uids.contains(&p.uid))
        .map(|p| p.uid)
        .collect::<BTreeSet<_>>()
        .len()
}

/// Sends a signal, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_command_cut_short_is_forgotten() {
        let task = tokio::spawn(async {
            let mut cmd = tokio::process::Command::new("sleep");
            cmd.arg("30.4711");
            super::output(&mut cmd).await
        });
        let ours =
            |pid: &i32| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x0030.4711\x00");
        let mut pid = None;
        for _ in 0..100 {
            pid = super::KNOWN.lock().unwrap().iter().copied().find(ours);
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let pid = pid.expect("the running command is registered");
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(!super::KNOWN.lock().unwrap().contains(&pid), "{pid} still registered");
    }

    use super::*;

    #[test]
    fn parses_proc_entries_with_odd_names() {
        let p = parse(
            "42 (sshd: a) b) S 7 42 42 0",
            "Name:\tx\nUid:\t30001\t30001\t30001\t30001\n",
        )
        .unwrap();
        assert_eq!(
            p,
            ProcInfo {
                pid: 42,
                ppid: 7,
                comm: "sshd: a) b".into(),
                uid: 30001
            }
        );
        assert_eq!(parse("garbage", ""), None);
    }

    #[test]
    fn counts_sessions_and_builds() {
        let me = std::process::id() as i32;
        let p = |pid, ppid, comm: &str, uid| ProcInfo {
            pid,
            ppid,
            comm: comm.into(),
            uid,
        };
        let procs = vec![
            p(10, me, "sshd", 0),
            p(11, 10, "sshd", 0),
            p(12, 11, "sshd", 1000),
            p(13, me, "sshd-session", 0),
            p(20, 5, "bash", 30001),
            p(21, 20, "make", 30001),
            p(22, 5, "sh", 30002),
        ];
        assert_eq!(ssh_sessions(&procs, Some(10)), vec![11, 13]);
        assert_eq!(ssh_sessions(&procs, None), vec![10, 13]);
        assert_eq!(builds_running(&procs, &[30001, 30002, 30003]), 2);
    }

    #[test]
    fn scan_sees_this_process() {
        let me = std::process::id() as i32;
        assert!(scan().iter().any(|p| p.pid == me));
    }
}
