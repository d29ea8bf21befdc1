//! Build slots counted by the builder itself, when the pool's gateway asks for it.
//!
//! Gateway replicas share their slot counts only eventually, so two sessions may briefly be sent
//! to one builder that has room for one. The gateway therefore sends `NIXPOOL_GATE_SLOTS=<N>`
//! (the builder's maxJobs) with each session; the gate then holds one of N lock files for the
//! whole session, or refuses at once with exit status 75 so that the gateway tries another
//! builder. Without the variable (a direct client) nothing is counted. A client may set it too;
//! it only limits its own sessions.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, Flock, FlockArg, fcntl};

use crate::error::FsError;

/// The environment variable (an SSH `env` request, accepted by sshd's `AcceptEnv`) the gateway
/// sets to the builder's maxJobs.
pub const SLOTS_ENV: &str = "NIXPOOL_GATE_SLOTS";
/// The largest slot count honoured; larger values are ignored.
pub const MAX_SLOTS: u32 = 1024;
/// The exit status of a session refused for want of a slot (sysexits' `EX_TEMPFAIL`).
pub const EX_TEMPFAIL: u8 = 75;

/// The slot count asked for: `Ok(None)` when the variable is absent, `Err` (the line to print)
/// when it is not a number from 1 to [`MAX_SLOTS`].
pub fn parse(value: Option<&OsStr>) -> Result<Option<u32>, String> {
    let Some(value) = value else { return Ok(None) };
    match value.to_str().and_then(|v| v.parse::<u32>().ok()) {
        Some(n) if (1..=MAX_SLOTS).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "nixpool: ignoring {SLOTS_ENV}={}: not a number from 1 to {MAX_SLOTS}; the session is not counted",
            value.to_string_lossy()
        )),
    }
}

/// The line a refused session gets on stderr.
pub fn full(slots: u32) -> String {
    format!("nixpool: all {slots} build slots of this builder are in use")
}

/// One slot, held (an exclusive `flock` on its file) until this value is dropped or, after
/// [`Slot::keep_across_exec`], until the program the gate execs exits.
#[derive(Debug)]
pub struct Slot {
    pub index: u32,
    lock: Flock<File>,
}

impl Slot {
    /// Clears `FD_CLOEXEC` on the lock's descriptor, so that the lock passes to the program the
    /// gate replaces itself with.
    pub fn keep_across_exec(&self) -> nix::Result<()> {
        fcntl(&*self.lock, FcntlArg::F_SETFD(FdFlag::empty())).map(drop)
    }
}

/// Takes the first free slot of `0..slots` in `dir` (files created 0600 when missing).
/// `Ok(None)` when all are taken; `Err` when some slot file could not be opened or locked and
/// none was free, so the slots cannot be counted.
pub fn take(dir: &Path, slots: u32) -> Result<Option<Slot>, FsError> {
    let mut failed = None;
    for index in 0..slots {
        let path = dir.join(index.to_string());
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(source) => {
                failed.get_or_insert(FsError {
                    action: "open build slot",
                    path,
                    source,
                });
                continue;
            }
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(Slot { index, lock })),
            Err((_, Errno::EWOULDBLOCK)) => {}
            Err((_, e)) => {
                failed.get_or_insert(FsError {
                    action: "lock build slot",
                    path,
                    source: e.into(),
                });
            }
        }
    }
    failed.map_or(Ok(None), Err)
}

/// What the gate does with `NIXPOOL_GATE_SLOTS` before it reads anything from the client:
/// `Ok(Some(slot))` to hold for the session, `Ok(None)` to go on uncounted (no variable, a bad
/// value, or slots that cannot be counted: the builder fails open, with a line on stderr), or
/// `Err(75)` after the refusal line when every slot is taken.
pub fn claim(dir: &Path, value: Option<&OsStr>) -> Result<Option<Slot>, ExitCode> {
    let slots = match parse(value) {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(None),
        Err(line) => {
            eprintln!("{line}");
            return Ok(None);
        }
    };
    match take(dir, slots) {
        Ok(Some(slot)) => Ok(Some(slot)),
        Ok(None) => {
            eprintln!("{}", full(slots));
            Err(ExitCode::from(EX_TEMPFAIL))
        }
        Err(e) => {
            eprintln!("nixpool: cannot count build slots ({e}); the session is not counted");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    #[test]
    fn the_variable_is_a_count_from_1_to_1024_or_ignored() {
        let p = |s: &str| parse(Some(OsStr::new(s)));
        assert_eq!(parse(None), Ok(None));
        assert_eq!(p("1"), Ok(Some(1)));
        assert_eq!(p("1024"), Ok(Some(1024)));
        for bad in ["0", "1025", "-1", "", "two", " 2", "4294967296"] {
            let line = p(bad).unwrap_err();
            assert!(
                line.contains(SLOTS_ENV) && line.contains("not a number from 1 to 1024"),
                "{line}"
            );
        }
        assert_eq!(full(4), "nixpool: all 4 build slots of this builder are in use");
    }

    #[test]
    fn n_holders_take_n_slots_and_the_next_is_refused_until_one_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let held: Vec<Slot> = (0..3)
            .map(|_| take(dir.path(), 3).unwrap().expect("a free slot"))
            .collect();
        assert_eq!(held.iter().map(|s| s.index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(take(dir.path(), 3).unwrap().is_none(), "a fourth session got a slot");
        assert!(
            claim(dir.path(), Some(OsStr::new("3"))).is_err(),
            "claim lets a fourth session in"
        );
        let mode = std::fs::metadata(dir.path().join("1")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut held = held;
        let released = held.remove(1);
        drop(released);
        let again = take(dir.path(), 3).unwrap().expect("the released slot");
        assert_eq!(again.index, 1);
        assert!(take(dir.path(), 3).unwrap().is_none());
        // A larger count offers more slots; the variable being absent or bad counts nothing.
        assert_eq!(take(dir.path(), 4).unwrap().expect("a fourth slot").index, 3);
        assert!(claim(dir.path(), None).unwrap().is_none());
        assert!(claim(dir.path(), Some(OsStr::new("0"))).unwrap().is_none());
    }

    #[test]
    fn slots_that_cannot_be_counted_fail_open() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let e = take(&missing, 2).unwrap_err();
        assert_eq!(e.action, "open build slot");
        assert!(claim(&missing, Some(OsStr::new("2"))).unwrap().is_none());
    }

    const HELPER_ENV: &str = "NIXPOOL_TEST_SLOT_HELPER";

    /// Run by [`a_slot_kept_across_exec_is_held_by_the_new_program`] in a child process: takes
    /// slot 0 of 1 as the gate does and replaces itself with `sleep`.
    #[test]
    #[ignore = "a helper process of a_slot_kept_across_exec_is_held_by_the_new_program"]
    fn slot_exec_helper() {
        let dir = std::env::var_os(HELPER_ENV).expect("run only by the exec test");
        let slot = take(Path::new(&dir), 1).unwrap().expect("slot 0 is free");
        if std::env::var_os("NIXPOOL_TEST_SLOT_KEEP").is_some() {
            slot.keep_across_exec().unwrap();
        }
        let err = Command::new("sleep").arg("30").exec();
        panic!("exec sleep: {err}");
    }

    fn exec_helper(dir: &Path, keep: bool) -> std::process::Child {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "gate::slots::tests::slot_exec_helper",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, dir)
        .stdout(Stdio::null());
        if keep {
            c.env("NIXPOOL_TEST_SLOT_KEEP", "1");
        }
        let mut child = c.spawn().unwrap();
        let comm = format!("/proc/{}/comm", child.id());
        let t0 = Instant::now();
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the helper exited ({status}) before it ran sleep");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the helper never ran sleep");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn a_slot_kept_across_exec_is_held_by_the_new_program() {
        let dir = tempfile::tempdir().unwrap();
        let mut sleep = exec_helper(dir.path(), true);
        // A descriptor closed by exec may be released a moment later: look for a while.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(500) {
            assert!(
                take(dir.path(), 1).unwrap().is_none(),
                "the slot was released when the gate exec'd"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sleep.kill().unwrap();
        sleep.wait().unwrap();
        let slot = take(dir.path(), 1)
            .unwrap()
            .expect("the slot is free once the program exits");
        drop(slot);

        // Without it, the descriptor closes at exec and the slot is free while the program runs.
        let mut sleep = exec_helper(dir.path(), false);
        let t0 = Instant::now();
        while take(dir.path(), 1).unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "a close-on-exec lock outlived exec"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sleep.kill().unwrap();
        sleep.wait().unwrap();
    }
}
