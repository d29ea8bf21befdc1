//! nix.conf as the daemon reads it, and the two checks on it: `builders` reaches the machines
//! file, `builders-use-substitutes` is on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use super::process::output_within;
use super::{Check, CheckId, Options};
use crate::merge;
use crate::nixsetup::{Flavor, NixSetup};

/// Nix's settings as the daemon reads them from nix.conf: from Nix itself (`nix config show`,
/// Nix 2.19 and later, or `nix show-config` before), else from the files (includes followed,
/// last one wins, `extra-` appends).
#[derive(Default, Debug)]
pub struct NixConf {
    pub path: PathBuf,
    pub exists: bool,
    /// The effective settings: from Nix when it answered, else from the files.
    pub settings: Vec<(String, String)>,
    /// The settings the files set (to tell "not set" from Nix's default).
    pub file_settings: Vec<(String, String)>,
    /// nix.conf and the files it includes that exist (their change times matter to the daemon).
    pub files: Vec<PathBuf>,
    /// Where `settings` came from: `nix config show`, `nix show-config` or `the files`.
    pub source: &'static str,
}

impl NixConf {
    /// From the files only.
    pub fn from_files(path: &Path) -> Self {
        Self::from_files_but(path, None)
    }

    /// From the files only, leaving out the lines of builderctl's own block `block_id` (what
    /// the user set, to decide what builderctl's block has to add).
    pub fn from_files_but(path: &Path, block_id: Option<&str>) -> Self {
        let mut conf = NixConf {
            path: path.into(),
            source: "the files",
            ..Default::default()
        };
        conf.exists = conf.read(path, 0, block_id);
        conf.settings = conf.file_settings.clone();
        conf
    }

    /// From Nix (`nix` is the command) when it answers within doctor's time, else the files.
    pub(super) fn load(path: &Path, opts: &Options) -> Self {
        let mut conf = Self::from_files(path);
        if conf.exists
            && let Some((settings, source)) = from_nix(&opts.nix, path, opts)
        {
            conf.settings = settings;
            conf.source = source;
        }
        conf
    }

    fn read(&mut self, path: &Path, depth: usize, block_id: Option<&str>) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        self.files.push(path.to_path_buf());
        let mut in_block = false;
        for line in text.lines() {
            if let Some(id) = block_id {
                let marker = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|rest| rest.split_whitespace().next())
                        == Some(id)
                };
                if marker(merge::BEGIN) {
                    in_block = true;
                } else if marker(merge::END) {
                    in_block = false;
                    continue;
                }
                if in_block {
                    continue;
                }
            }
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(inc) = line.strip_prefix("include ").or_else(|| line.strip_prefix("!include ")) {
                let p = path.parent().unwrap_or(Path::new("/")).join(inc.trim());
                if depth < 8 {
                    self.read(&p, depth + 1, block_id);
                }
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                self.file_settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        true
    }

    /// The value of a setting with its `extra-` additions; `None` when never set.
    pub fn get(&self, name: &str) -> Option<String> {
        lookup(&self.settings, name)
    }

    /// Whether the files set `name` (or `extra-name`) at all.
    pub fn set_in_files(&self, name: &str) -> bool {
        lookup(&self.file_settings, name).is_some()
    }

    /// When the newest of the files changed.
    pub fn modified(&self) -> Option<SystemTime> {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .max()
    }
}

/// A setting's value as Nix sees it: the last `name` line, with the `extra-name` lines after it
/// appended.
fn lookup(settings: &[(String, String)], name: &str) -> Option<String> {
    let extra = format!("extra-{name}");
    let mut value: Option<String> = None;
    for (k, v) in settings {
        if k == name {
            value = Some(v.clone());
        } else if *k == extra {
            value = Some(match value {
                Some(old) if !old.is_empty() => format!("{old} {v}"),
                _ => v.clone(),
            });
        }
    }
    value
}

/// `key = value` lines as `nix config show` prints them.
pub fn parse_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(" = ").or_else(|| l.split_once('=')))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty() && !k.contains(' '))
        .collect()
}

/// Asks Nix for the settings a daemon reading `nix_conf` has: `NIX_CONF_DIR` is its directory,
/// and no user file or `NIX_CONFIG` is mixed in (the daemon reads neither). Only for a file
/// called nix.conf (that is the only name Nix reads from a directory).
pub fn from_nix(nix: &str, nix_conf: &Path, opts: &Options) -> Option<(Vec<(String, String)>, &'static str)> {
    if nix_conf.file_name()? != "nix.conf" {
        return None;
    }
    let dir = nix_conf.parent()?;
    let ways: [(&[&str], &'static str); 2] = [
        (&["config", "show"], "nix config show"),
        (&["show-config"], "nix show-config"),
    ];
    for (args, source) in ways {
        let mut cmd = Command::new(nix);
        cmd.args(["--extra-experimental-features", "nix-command"])
            .args(args)
            .env("NIX_CONF_DIR", dir)
            .env("NIX_USER_CONF_FILES", "")
            .env_remove("NIX_CONFIG")
            .stdin(Stdio::null());
        if let Ok(out) = output_within(&mut cmd, opts.remaining())
            && out.status.success()
        {
            let settings = parse_settings(&String::from_utf8_lossy(&out.stdout));
            if !settings.is_empty() {
                return Some((settings, source));
            }
        }
    }
    None
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Whether a `builders` value reads `machines_file` (`@file` items).
pub fn builders_reach(value: &str, machines_file: &Path) -> bool {
    value
        .split([';', ' ', '\n'])
        .filter_map(|item| item.strip_prefix('@'))
        .any(|p| same_file(Path::new(p), machines_file))
}

/// Where the fix goes, and what kind of Nix this is, for messages.
fn settings_note(setup: &NixSetup) -> String {
    match setup.flavor {
        Flavor::Determinate => format!(
            " (Determinate Nix: {}; your settings go in {}, never in the nix.conf it rewrites)",
            setup.evidence,
            setup.settings_file.display()
        ),
        Flavor::Upstream => String::new(),
    }
}

pub(super) fn check_builders(opts: &Options, conf: &NixConf) -> Check {
    let id = CheckId::Builders;
    let m = opts.machines_file.display();
    let c = opts.nix_conf.display();
    let s = opts.setup.settings_file.display();
    let restart = opts.setup.restart_command();
    let note = settings_note(&opts.setup);
    let fix = format!(
        "add `builders = @{m}` to {s}, then restart the daemon ({restart}); `sudo builderctl machines-file --configure-nix` does both but the restart"
    );
    if !conf.exists {
        return Check::fail(id, None, format!("{c} does not exist or cannot be read")).with_fix(fix);
    }
    let default_path = opts.nix_conf.parent().unwrap_or(Path::new("/etc/nix")).join("machines");
    let value = if conf.set_in_files("builders") {
        conf.get("builders")
    } else {
        None
    };
    match value {
        None if same_file(&default_path, &opts.machines_file) => Check::warn(
            id,
            None,
            format!(
                "{c} has no `builders` line; Nix's built-in default (@{}) happens to be {m}, but nix-darwin and other installers write their own{note}",
                default_path.display()
            ),
        )
        .with_fix(fix),
        None => Check::fail(
            id,
            None,
            format!(
                "{c} has no `builders` line, so Nix never reads {m} (its default is @{}){note}",
                default_path.display()
            ),
        )
        .with_fix(fix),
        Some(v) if v.trim().is_empty() => Check::fail(
            id,
            None,
            format!(
                "{c} sets `builders =` (empty): remote builds are off (nix-darwin writes this when nix.distributedBuilds is false){note}"
            ),
        )
        .with_fix(fix),
        Some(v) => {
            let from = conf.source;
            if builders_reach(&v, &opts.machines_file) {
                Check::pass(id, None, format!("{c}: builders = {v} (as {from} reads it){note}"))
            } else {
                Check::fail(
                    id,
                    None,
                    format!("{c}: builders = {v} (as {from} reads it) does not read {m}{note}"),
                )
                .with_fix(format!(
                    "change it to `builders = @{m}` in {s} (keep other builders in {m}), then {restart}"
                ))
            }
        }
    }
}

pub(super) fn check_substitutes(opts: &Options, conf: &NixConf) -> Check {
    let id = CheckId::BuildersUseSubstitutes;
    let c = conf.path.display();
    let from = conf.source;
    match conf.get("builders-use-substitutes").as_deref().map(str::trim) {
        Some("true") => Check::pass(
            id,
            None,
            format!("{c}: builders-use-substitutes = true (as {from} reads it)"),
        ),
        other => Check::warn(
            id,
            None,
            format!(
                "{c}: builders-use-substitutes is {} (as {from} reads it): every dependency a build needs is uploaded from this machine instead of fetched by the builder from the cache",
                other.unwrap_or("not set (false)")
            ),
        )
        .with_fix(format!(
            "add `builders-use-substitutes = true` to {} and restart the daemon ({})",
            opts.setup.settings_file.display(),
            opts.setup.restart_command()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn lookup_takes_the_last_value_and_appends_extra_after_it() {
        let s = pairs(&[
            ("builders", "@/a"),
            ("extra-builders", "@/b"),
            ("builders", "@/c"),
            ("extra-builders", "@/d"),
            ("extra-builders", "@/e"),
        ]);
        assert_eq!(lookup(&s, "builders").as_deref(), Some("@/c @/d @/e"));
        assert_eq!(lookup(&s, "substituters"), None);
        // extra- alone sets it; an empty value does not leave a leading space.
        let s = pairs(&[("builders", ""), ("extra-builders", "@/b")]);
        assert_eq!(lookup(&s, "builders").as_deref(), Some("@/b"));
        assert_eq!(lookup(&pairs(&[("extra-x", "1")]), "x").as_deref(), Some("1"));
        // A setting whose name ends like another's is not it.
        assert_eq!(lookup(&pairs(&[("max-builders", "1")]), "builders"), None);
    }

    #[test]
    fn nix_config_show_output_parses_and_headings_are_left_out() {
        let text = "builders = @/etc/nix/machines\nbuilders-use-substitutes = true\ncores = 0\nextra-platforms = \nsome heading line\nx=y\n";
        assert_eq!(
            parse_settings(text),
            pairs(&[
                ("builders", "@/etc/nix/machines"),
                ("builders-use-substitutes", "true"),
                ("cores", "0"),
                ("extra-platforms", ""),
                ("x", "y"),
            ])
        );
        // A value may hold " = " itself; the first one splits.
        assert_eq!(parse_settings("a = b = c"), pairs(&[("a", "b = c")]));
    }

    #[test]
    fn the_files_follow_includes_drop_comments_and_skip_builderctls_own_block() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nix.conf");
        std::fs::write(
            &conf,
            format!(
                "builders = @/x # old\ninclude extra.conf\n!include missing.conf\n{} settings\nbuilders-use-substitutes = true\n{} settings\n",
                merge::BEGIN,
                merge::END
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("extra.conf"), "extra-builders = @/y\n").unwrap();
        let all = NixConf::from_files(&conf);
        assert!(all.exists);
        assert_eq!(all.files.len(), 2);
        assert_eq!(all.get("builders").as_deref(), Some("@/x @/y"));
        assert_eq!(all.get("builders-use-substitutes").as_deref(), Some("true"));
        let user_only = NixConf::from_files_but(&conf, Some("settings"));
        assert_eq!(user_only.get("builders-use-substitutes"), None);
        assert!(user_only.set_in_files("builders"));
        assert!(!NixConf::from_files(&dir.path().join("none.conf")).exists);
    }

    #[test]
    fn builders_reach_the_file_by_any_item_and_only_by_at_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("machines");
        std::fs::write(&m, "").unwrap();
        let at = format!("@{}", m.display());
        assert!(builders_reach(&at, &m));
        assert!(builders_reach(&format!("ssh://a x86_64-linux ; {at}"), &m));
        assert!(builders_reach(&format!("@/other\n{at}"), &m));
        // The same file by another path still counts.
        let other_path = format!("@{}/./machines", dir.path().display());
        assert!(builders_reach(&other_path, &m));
        assert!(!builders_reach(&m.display().to_string(), &m));
        assert!(!builders_reach("@/etc/nix/other", &m));
        assert!(!builders_reach("", &m));
    }
}
