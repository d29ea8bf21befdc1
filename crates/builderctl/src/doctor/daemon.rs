//! The running Nix daemon (`daemon`): on macOS the launchd job this Nix installs, and whether
//! the daemon started after nix.conf last changed (else it still uses the old settings).

use std::process::{Command, Stdio};
use std::time::SystemTime;

use super::nixconf::NixConf;
use super::process::output_within;
use super::{Check, CheckId, Options};
use crate::nixsetup::Os;

/// `[[dd-]hh:]mm:ss` (as `ps -o etime` prints it) → seconds.
pub fn parse_etime(s: &str) -> Option<u64> {
    let (days, rest) = match s.trim().split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s.trim()),
    };
    let parts: Vec<u64> = rest.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let secs = match parts.as_slice() {
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(days * 86400 + secs)
}

/// macOS: whether launchd has the daemon job builderctl expects (`systems.determinate.nix-daemon`
/// for Determinate Nix, `org.nixos.nix-daemon` otherwise). `None` when it has, or when launchctl
/// cannot tell.
fn check_launchd(opts: &Options) -> Option<Check> {
    use crate::nixsetup::{DETERMINATE_LABEL, UPSTREAM_LABEL};
    let loaded = |label: &str| {
        let mut cmd = Command::new(&opts.launchctl);
        cmd.args(["print", &format!("system/{label}")]).stdin(Stdio::null());
        output_within(&mut cmd, opts.remaining())
            .ok()
            .map(|o| o.status.success())
    };
    let ours = opts.setup.launchd_label();
    let other = if ours == DETERMINATE_LABEL {
        UPSTREAM_LABEL
    } else {
        DETERMINATE_LABEL
    };
    match (loaded(ours)?, loaded(other)) {
        (true, _) => None,
        (false, Some(true)) => Some(
            Check::warn(
                CheckId::Daemon,
                None,
                format!(
                    "this looks like {} ({}), but launchd runs {other}, not {ours}: the daemon is not the one this Nix installs",
                    opts.setup.name(),
                    opts.setup.evidence
                ),
            )
            .with_fix(format!(
                "restart the daemon that runs: sudo launchctl kickstart -k system/{other}; if you moved between Determinate Nix and the upstream installer, finish that (reinstall one of them) so that one daemon reads {}",
                opts.setup.settings_file.display()
            )),
        ),
        (false, _) => Some(
            Check::warn(
                CheckId::Daemon,
                None,
                format!("launchd has no {ours} job (nor {other}): no Nix daemon is loaded"),
            )
            .with_fix(format!(
                "load it: sudo launchctl bootstrap system /Library/LaunchDaemons/{ours}.plist"
            )),
        ),
    }
}

/// Seconds the longest-running Nix daemon has been up: `nix-daemon`, or Determinate's
/// `determinate-nixd` when no `nix-daemon` process shows.
fn daemon_uptime(opts: &Options) -> Option<u64> {
    let mut cmd = Command::new("ps");
    cmd.args(["-A", "-o", "etime=", "-o", "comm="]).stdin(Stdio::null());
    let out = output_within(&mut cmd, opts.remaining()).ok()?;
    daemon_uptime_in(&String::from_utf8_lossy(&out.stdout))
}

/// [`daemon_uptime`] from `ps -A -o etime= -o comm=` output.
fn daemon_uptime_in(ps: &str) -> Option<u64> {
    let uptime = |name: &str| {
        ps.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let etime = it.next()?;
                let comm = it.collect::<Vec<_>>().join(" ");
                comm.rsplit('/').next().filter(|c| *c == name)?;
                parse_etime(etime)
            })
            .max()
    };
    uptime("nix-daemon").or_else(|| uptime("determinate-nixd"))
}

pub(super) fn check_daemon(opts: &Options, conf: &NixConf) -> Check {
    let id = CheckId::Daemon;
    let files = conf
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let files = if files.is_empty() {
        opts.nix_conf.display().to_string()
    } else {
        files
    };
    let restart = opts.setup.restart_command();
    if opts.setup.os == Os::MacOs
        && let Some(c) = check_launchd(opts)
    {
        return c;
    }
    let Some(up) = daemon_uptime(opts) else {
        return Check::warn(
            id,
            None,
            "no nix-daemon is running: a single-user Nix, or the daemon is down",
        )
        .with_fix(format!("start it: {restart}"));
    };
    let age = conf
        .modified()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .map(|d| d.as_secs());
    let who = format!(
        "the {} daemon{}",
        opts.setup.name(),
        match opts.setup.os {
            Os::MacOs => format!(" (launchd: {})", opts.setup.launchd_label()),
            Os::Linux => String::new(),
        }
    );
    match age {
        Some(age) if age < up => Check::fail(
            id,
            None,
            format!("{files} changed {age}s ago but {who} has run for {up}s: it still uses the old settings"),
        )
        .with_fix(restart),
        _ => Check::pass(id, None, format!("{who} (up {up}s) started after {files} last changed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etime_in_every_form_ps_prints() {
        assert_eq!(parse_etime("00:07"), Some(7));
        assert_eq!(parse_etime("  12:34"), Some(12 * 60 + 34));
        assert_eq!(parse_etime("01:02:03"), Some(3600 + 2 * 60 + 3));
        assert_eq!(parse_etime("3-04:05:06"), Some(3 * 86400 + 4 * 3600 + 5 * 60 + 6));
        assert_eq!(parse_etime("10-00:00"), Some(10 * 86400));
        for bad in ["", "7", "1:2:3:4", "a:b", "-1:00", "x-01:00", "01:-2"] {
            assert_eq!(parse_etime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_uptime_is_the_oldest_nix_daemons_and_determinate_only_without_one() {
        let ps = "    00:03 /nix/var/nix/profiles/default/bin/nix-daemon\n 1-00:00:00 nix-daemon\n 2-00:00:00 determinate-nixd\n 3-00:00:00 nix-daemon-helper\n    05:00 bash\n";
        assert_eq!(daemon_uptime_in(ps), Some(86400));
        let determinate = " 2-00:00:00 /usr/local/bin/determinate-nixd\n    01:00 sshd\n";
        assert_eq!(daemon_uptime_in(determinate), Some(2 * 86400));
        assert_eq!(daemon_uptime_in("    01:00 sshd\n"), None);
        assert_eq!(daemon_uptime_in(""), None);
    }
}
