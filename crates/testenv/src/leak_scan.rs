//! The suite's secret-leak scan. After every test has run, `nixpool-leak-scan` reads what the
//! suite left behind and fails if a secret appears where it must not.
//!
//! Where it learns what is secret:
//! - every Secret the API servers saw (their audit logs keep the bodies);
//! - every private key file, and every file under a `run/nixpool/` directory of a builder's
//!   scratch root (host keys, cache tokens).
//!
//! Where a secret must never appear:
//! - every log: the control plane's, the operator's, the agents' and the pods';
//! - every Event, ConfigMap, Pod and pool (status included) the API servers saw;
//! - every `render` output the tests kept.
//!
//! It names the place and the kind of secret, never the secret itself. Only files changed since
//! the `--since` marker count, so earlier runs do not.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use serde_json::Value;

/// A secret value, as the substrings that would give it away.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Needle {
    /// Where it came from (for the report; never the value).
    pub origin: String,
    pub text: String,
}

/// One secret found where it must not be.
#[derive(Debug, PartialEq, Eq)]
pub struct Leak {
    pub place: String,
    pub origin: String,
}

/// The substrings of a secret value worth looking for. The body lines of a PEM or OpenSSH
/// private key (except the first, a header shared by every key of a kind); any other one-line
/// value of 16 characters or more. Public keys and certificates are not secret.
pub fn needles(origin: &str, value: &str) -> Vec<Needle> {
    let value = value.trim();
    let public = value.starts_with("ssh-")
        || value.starts_with("ecdsa-")
        || value.starts_with("sk-")
        || value.contains("BEGIN CERTIFICATE")
        || value.contains("PUBLIC KEY-----");
    if public {
        return Vec::new();
    }
    let needle = |text: &str| Needle {
        origin: origin.to_string(),
        text: text.to_string(),
    };
    if value.contains("PRIVATE KEY-----") {
        return value
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .skip(1)
            .map(str::trim)
            .filter(|l| l.len() >= 20)
            .map(needle)
            .collect();
    }
    if value.len() >= 16 && !value.contains('\n') {
        return vec![needle(value)];
    }
    Vec::new()
}

/// The secrets of one audit-log line, if it is about a Secret.
pub fn audit_secrets(line: &str) -> Vec<Needle> {
    let Ok(entry) = serde_json::from_str::<Value>(line) else {
        return Vec::new();
    };
    if entry["objectRef"]["resource"] != "secrets" {
        return Vec::new();
    }
    let name = entry["objectRef"]["name"]
        .as_str()
        .or_else(|| entry["responseObject"]["metadata"]["name"].as_str())
        .unwrap_or("?");
    let origin = format!(
        "Secret {}/{name}",
        entry["objectRef"]["namespace"].as_str().unwrap_or("")
    );
    let mut out = Vec::new();
    for body in [&entry["requestObject"], &entry["responseObject"]] {
        for (field, decode) in [("data", true), ("stringData", false)] {
            let Some(map) = body[field].as_object() else { continue };
            // A service-account token Secret also holds its namespace's name, which is public.
            let values = map
                .iter()
                .filter(|(k, _)| *k != "namespace")
                .filter_map(|(_, v)| v.as_str());
            for v in values {
                let text = if decode {
                    match base64::engine::general_purpose::STANDARD.decode(v) {
                        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                        Err(_) => continue,
                    }
                } else {
                    v.to_string()
                };
                out.extend(needles(&origin, &text));
            }
        }
    }
    out
}

/// The text of one audit-log line that must hold no secret: the bodies of anything but a
/// Secret. `None` for Secrets and unreadable lines.
pub fn audit_target(line: &str) -> Option<(String, String)> {
    let entry: Value = serde_json::from_str(line).ok()?;
    let resource = entry["objectRef"]["resource"].as_str()?;
    if resource == "secrets" {
        return None;
    }
    let place = format!(
        "{} {}/{}{}",
        resource,
        entry["objectRef"]["namespace"].as_str().unwrap_or(""),
        entry["objectRef"]["name"].as_str().unwrap_or(""),
        entry["objectRef"]["subresource"]
            .as_str()
            .map(|s| format!("/{s}"))
            .unwrap_or_default()
    );
    let text = format!("{}\n{}", entry["requestObject"], entry["responseObject"]);
    Some((place, text))
}

/// The secrets found in `text`.
pub fn find(place: &str, text: &str, secrets: &BTreeSet<Needle>) -> Vec<Leak> {
    secrets
        .iter()
        .filter(|n| text.contains(&n.text))
        .map(|n| Leak {
            place: place.to_string(),
            origin: n.origin.clone(),
        })
        .collect()
}

/// Files below `root` changed after `since`.
pub fn files_since(root: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() && meta.modified().is_ok_and(|m| m >= since) {
                out.push(e.path());
            }
        }
    }
    out
}

/// What a scan saw.
#[derive(Debug, Default)]
pub struct Report {
    pub secrets: usize,
    pub secret_sources: usize,
    pub files_scanned: usize,
    pub audit_objects_scanned: usize,
    pub leaks: Vec<Leak>,
}

fn is_log(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.ends_with(".log") && name != crate::AUDIT_LOG || name.starts_with("render-")
}

fn is_secret_file(p: &Path, text: &str) -> bool {
    p.to_string_lossy().contains("/run/nixpool/") || text.contains("PRIVATE KEY-----")
}

/// Scans the files below `roots` changed since `since`.
pub fn scan(roots: &[PathBuf], since: SystemTime) -> Report {
    let files: Vec<PathBuf> = roots.iter().flat_map(|r| files_since(r, since)).collect();
    let audit_logs: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == crate::AUDIT_LOG))
        .collect();
    let mut report = Report::default();
    let mut secrets = BTreeSet::new();
    for log in &audit_logs {
        let Ok(f) = std::fs::File::open(log) else { continue };
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            let found = audit_secrets(&line);
            report.secret_sources += usize::from(!found.is_empty());
            secrets.extend(found);
        }
    }
    for p in &files {
        if is_log(p) || std::fs::metadata(p).map_or(true, |m| m.len() > 1 << 20) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(p) else { continue };
        if is_secret_file(p, &text) {
            report.secret_sources += 1;
            secrets.extend(needles(&format!("file {}", p.display()), &text));
        }
    }
    report.secrets = secrets.len();
    for log in &audit_logs {
        let Ok(f) = std::fs::File::open(log) else { continue };
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if let Some((place, text)) = audit_target(&line) {
                report.audit_objects_scanned += 1;
                report
                    .leaks
                    .extend(find(&format!("{place} (in {})", log.display()), &text, &secrets));
            }
        }
    }
    for p in files.iter().filter(|p| is_log(p)) {
        let Ok(bytes) = std::fs::read(p) else { continue };
        report.files_scanned += 1;
        report.leaks.extend(find(
            &p.display().to_string(),
            &String::from_utf8_lossy(&bytes),
            &secrets,
        ));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACBZ0A1Tyl5vYqjS1d1E3kOx2Kq0l6w9V1cOrnhH2oE0hAAAAJh3sXJid7Fy
YgAAAAtzc2gtZWQyNTUxOQAAACBZ0A1Tyl5vYqjS1d1E3kOx2Kq0l6w9V1cOrnhH2oE0hA
-----END OPENSSH PRIVATE KEY-----
";

    #[test]
    fn private_keys_and_tokens_are_secrets_public_keys_are_not() {
        let n = needles("k", KEY);
        assert_eq!(n.len(), 2, "the body lines but the shared header");
        assert!(needles("t", "a-long-enough-token-123").len() == 1);
        assert!(needles("t", "short").is_empty());
        assert!(needles("p", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFnQDVPKXm9iqNLV alice").is_empty());
    }

    #[test]
    fn a_secret_in_an_event_or_a_status_is_found_and_named_without_its_value() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(KEY);
        let secret = format!(
            r#"{{"objectRef":{{"resource":"secrets","namespace":"ns","name":"p-host-key"}},"requestObject":{{"data":{{"k":"{b64}"}}}}}}"#
        );
        let secrets: BTreeSet<Needle> = audit_secrets(&secret).into_iter().collect();
        assert_eq!(secrets.len(), 2);
        assert!(audit_target(&secret).is_none(), "a Secret is where secrets belong");
        let body_line = KEY.lines().nth(2).unwrap();
        let event = format!(
            r#"{{"objectRef":{{"resource":"events","namespace":"ns","name":"e1"}},"requestObject":{{"note":"oops {body_line}"}}}}"#
        );
        let (place, text) = audit_target(&event).unwrap();
        let leaks = find(&place, &text, &secrets);
        assert_eq!(leaks.len(), 1);
        assert_eq!(leaks[0].origin, "Secret ns/p-host-key");
        assert!(
            !format!("{leaks:?}").contains(body_line),
            "the report never holds the secret"
        );
        let status = r#"{"objectRef":{"resource":"nixbuilderpools","namespace":"ns","name":"p","subresource":"status"},"requestObject":{"status":{"hostPublicKey":"ssh-ed25519 AAAA"}}}"#;
        let (place, text) = audit_target(status).unwrap();
        assert_eq!(place, "nixbuilderpools ns/p/status");
        assert!(find(&place, &text, &secrets).is_empty());
    }

    #[test]
    fn a_scan_of_files_finds_a_key_in_a_log_and_ignores_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let since = SystemTime::now() - std::time::Duration::from_secs(1);
        std::fs::create_dir_all(dir.path().join("root/run/nixpool")).unwrap();
        std::fs::write(dir.path().join("root/run/nixpool/token"), "cachix-token-0123456789").unwrap();
        std::fs::write(dir.path().join("id_ed25519"), KEY).unwrap();
        std::fs::write(dir.path().join("agent.log"), "pushing with cachix-token-0123456789\n").unwrap();
        std::fs::write(dir.path().join("operator.log"), "all fine\n").unwrap();
        let report = scan(&[dir.path().to_path_buf()], since);
        assert_eq!(report.secret_sources, 2);
        assert_eq!(report.files_scanned, 2);
        assert_eq!(report.leaks.len(), 1);
        assert!(report.leaks[0].place.ends_with("agent.log"));
        let later = scan(
            &[dir.path().to_path_buf()],
            SystemTime::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!((later.secrets, later.files_scanned), (0, 0));
    }
}
