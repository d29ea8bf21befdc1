//! What a check reports: its id, verdict, finding and fix ([`Check`]), and the human report
//! doctor prints line by line as each check finishes.

use serde::{Serialize, Serializer};

/// Which check, as `--skip` takes it and `--json` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckId {
    Builders,
    MachinesFile,
    Key,
    HostKey,
    Tcp,
    SshAuth,
    StorePing,
    TrustedUser,
    BuildersUseSubstitutes,
    Daemon,
}

impl CheckId {
    /// Every check, in the order a build meets them.
    pub const ALL: [CheckId; 10] = [
        CheckId::Builders,
        CheckId::MachinesFile,
        CheckId::Key,
        CheckId::HostKey,
        CheckId::Tcp,
        CheckId::SshAuth,
        CheckId::StorePing,
        CheckId::TrustedUser,
        CheckId::BuildersUseSubstitutes,
        CheckId::Daemon,
    ];

    /// The stable name (the one place it is written).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckId::Builders => "builders",
            CheckId::MachinesFile => "machines-file",
            CheckId::Key => "key",
            CheckId::HostKey => "host-key",
            CheckId::Tcp => "tcp",
            CheckId::SshAuth => "ssh-auth",
            CheckId::StorePing => "store-ping",
            CheckId::TrustedUser => "trusted-user",
            CheckId::BuildersUseSubstitutes => "builders-use-substitutes",
            CheckId::Daemon => "daemon",
        }
    }
}

impl std::fmt::Display for CheckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CheckId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `--skip` parses through this, so a misspelt id is an error that lists the valid ones.
impl clap::ValueEnum for CheckId {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
    /// The check did not finish before doctor's `--timeout` ran out (counts as a failure).
    Timeout,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
            Status::Timeout => "TIME",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub id: CheckId,
    /// What the check is about when there are several: a pool's block id, or a machines line.
    /// (`target` in JSON, as documented.)
    #[serde(rename = "target", skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(id: CheckId, subject: Option<&str>, status: Status, found: impl Into<String>) -> Check {
        Check {
            id,
            subject: subject.map(str::to_string),
            status,
            found: found.into(),
            fix: None,
        }
    }

    pub fn pass(id: CheckId, subject: Option<&str>, found: impl Into<String>) -> Check {
        Check::new(id, subject, Status::Pass, found)
    }

    pub fn warn(id: CheckId, subject: Option<&str>, found: impl Into<String>) -> Check {
        Check::new(id, subject, Status::Warn, found)
    }

    pub fn fail(id: CheckId, subject: Option<&str>, found: impl Into<String>) -> Check {
        Check::new(id, subject, Status::Fail, found)
    }

    /// Not tried, because of `found`.
    pub fn skip(id: CheckId, subject: Option<&str>, found: impl Into<String>) -> Check {
        Check::new(id, subject, Status::Skip, found)
    }

    pub fn timed_out(id: CheckId, subject: Option<&str>, found: impl Into<String>) -> Check {
        Check::new(id, subject, Status::Timeout, found)
    }

    pub fn with_fix(self, fix: impl Into<String>) -> Check {
        Check {
            fix: Some(fix.into()),
            ..self
        }
    }
}

/// Exit status: failure when any check failed or timed out.
pub fn passed(checks: &[Check]) -> bool {
    checks
        .iter()
        .all(|c| !matches!(c.status, Status::Fail | Status::Timeout))
}

/// One check as the human report prints it.
pub fn report_line(c: &Check) -> String {
    let mut s = String::new();
    let what = match &c.subject {
        Some(subject) => format!("{} ({subject})", c.id),
        None => c.id.to_string(),
    };
    s.push_str(&format!("{}  {what}: {}\n", c.status.label(), c.found));
    if let Some(fix) = &c.fix {
        for (i, l) in fix.lines().enumerate() {
            s.push_str(if i == 0 { "      fix: " } else { "           " });
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// The last line of the human report.
pub fn summary(checks: &[Check]) -> String {
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let timeouts = checks.iter().filter(|c| c.status == Status::Timeout).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    let timed = if timeouts > 0 {
        format!(", {timeouts} timed out")
    } else {
        String::new()
    };
    format!(
        "\n{} checks: {} failed{timed}, {} warnings\n",
        checks.len(),
        fails,
        warns
    )
}

/// The human report, all at once.
pub fn report(checks: &[Check]) -> String {
    let mut s: String = checks.iter().map(report_line).collect();
    s.push_str(&summary(checks));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_id_parses_back_from_its_name_and_a_typo_does_not() {
        for id in CheckId::ALL {
            assert_eq!(CheckId::from_str(id.as_str(), false), Ok(id));
        }
        assert!(CheckId::from_str("tpc", false).is_err());
        assert!(CheckId::from_str("TCP", false).is_err());
    }

    #[test]
    fn the_report_names_subject_and_indents_every_fix_line() {
        let c = Check::fail(CheckId::Key, Some("builds/linux"), "/k has mode 0644").with_fix("one\ntwo");
        assert_eq!(
            report_line(&c),
            "FAIL  key (builds/linux): /k has mode 0644\n      fix: one\n           two\n"
        );
        assert_eq!(
            report_line(&Check::pass(CheckId::Daemon, None, "up")),
            "PASS  daemon: up\n"
        );
    }

    #[test]
    fn a_timeout_fails_the_run_and_a_warning_does_not() {
        let warn = Check::warn(CheckId::Daemon, None, "w");
        let skip = Check::skip(CheckId::Tcp, None, "s");
        assert!(passed(&[warn.clone(), skip.clone()]));
        let timeout = Check::timed_out(CheckId::Tcp, None, "t");
        assert!(!passed(&[warn.clone(), timeout.clone()]));
        assert!(!passed(&[Check::fail(CheckId::Key, None, "f")]));
        assert_eq!(
            summary(&[warn, timeout]),
            "\n2 checks: 0 failed, 1 timed out, 1 warnings\n"
        );
    }

    #[test]
    fn json_keeps_the_documented_field_names() {
        let c = Check::fail(CheckId::SshAuth, Some("line 1: ssh://h"), "refused").with_fix("authorize");
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"id": "ssh-auth", "target": "line 1: ssh://h", "status": "fail", "found": "refused", "fix": "authorize"})
        );
        let bare = serde_json::to_value(Check::pass(CheckId::Builders, None, "ok")).unwrap();
        assert_eq!(
            bare,
            serde_json::json!({"id": "builders", "status": "pass", "found": "ok"})
        );
    }
}
