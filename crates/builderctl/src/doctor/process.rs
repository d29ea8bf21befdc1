//! Running a command (ssh, nix, ps, launchctl) within what is left of doctor's `--timeout`.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

/// Why a command gave no output.
pub(super) enum RunError {
    Spawn(std::io::Error),
    TimedOut,
}

/// Runs `cmd` (stdin from /dev/null unless set) and collects its output, killing it (and what
/// it started: it runs in a process group of its own) when `time_left` has passed.
pub(super) fn output_within(cmd: &mut Command, time_left: Duration) -> Result<std::process::Output, RunError> {
    use std::os::unix::process::CommandExt;
    let deadline = Instant::now() + time_left;
    let stdout = tempfile::tempfile().map_err(RunError::Spawn)?;
    let stderr = tempfile::tempfile().map_err(RunError::Spawn)?;
    let (mut out_r, mut err_r) = (
        stdout.try_clone().map_err(RunError::Spawn)?,
        stderr.try_clone().map_err(RunError::Spawn)?,
    );
    cmd.stdout(stdout).stderr(stderr).process_group(0);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::TimedOut);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(RunError::Spawn(e)),
        }
    };
    let read = |f: &mut std::fs::File| {
        use std::io::Seek;
        let mut v = Vec::new();
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.read_to_end(&mut v);
        v
    };
    Ok(std::process::Output {
        status,
        stdout: read(&mut out_r),
        stderr: read(&mut err_r),
    })
}

/// The last `n` non-empty lines of `s`, trimmed, joined with ` / ` (for one-line findings).
pub(super) fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_skips_blank_lines_and_keeps_the_end() {
        let stderr = "warning: x\n\n  error: a\nerror: b  \n\n";
        assert_eq!(last_lines(stderr, 2), "error: a / error: b");
        assert_eq!(last_lines(stderr, 9), "warning: x / error: a / error: b");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn a_command_past_its_time_is_stopped_and_one_in_time_gives_its_output() {
        let started = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        assert!(matches!(
            output_within(&mut cmd, Duration::from_millis(300)),
            Err(RunError::TimedOut)
        ));
        assert!(started.elapsed() < Duration::from_secs(10));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let Ok(out) = output_within(&mut cmd, Duration::from_secs(20)) else {
            panic!("sh did not run")
        };
        assert_eq!(
            (out.status.code(), &out.stdout[..], &out.stderr[..]),
            (Some(3), &b"out\n"[..], &b"err\n"[..])
        );
    }
}
