//! Which Nix this machine runs, where builderctl's nix.conf settings go, and which daemon has to
//! be restarted to read them.
//!
//! Determinate Nix writes `/etc/nix/nix.conf` itself (and rewrites it on upgrades) and includes
//! `/etc/nix/nix.custom.conf` for the user's settings; its daemon's launchd label is
//! `systems.determinate.nix-daemon`. The upstream installer's is `org.nixos.nix-daemon`, and its
//! nix.conf is the user's. See docs/mac.md for the sources.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// launchd label of the upstream (and nix-darwin) nix-daemon.
pub const UPSTREAM_LABEL: &str = "org.nixos.nix-daemon";
/// launchd label of Determinate Nix's daemon.
pub const DETERMINATE_LABEL: &str = "systems.determinate.nix-daemon";
/// The file Determinate's nix.conf includes for the user's settings.
pub const CUSTOM_CONF: &str = "nix.custom.conf";
/// Where launchd reads system daemons from.
pub const LAUNCH_DAEMONS: &str = "/Library/LaunchDaemons";

/// The operating system, for the right restart command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
}

impl Os {
    pub fn current() -> Self {
        if cfg!(target_os = "macos") {
            Os::MacOs
        } else {
            Os::Linux
        }
    }
}

/// Whose Nix this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// The upstream installer, a distribution's package, or nix-darwin.
    Upstream,
    /// Determinate Nix: nix.conf is Determinate's, the user's settings go in nix.custom.conf.
    Determinate,
}

/// What builderctl found about the local Nix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixSetup {
    pub flavor: Flavor,
    pub os: Os,
    pub nix_conf: PathBuf,
    /// Where builderctl puts its settings: the nix.custom.conf that nix.conf includes under
    /// Determinate Nix, nix.conf itself otherwise.
    pub settings_file: PathBuf,
    /// How the flavor was told, for messages.
    pub evidence: String,
}

/// The files a nix.conf includes (`include` and `!include`), resolved against its directory.
pub fn includes(nix_conf: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(nix_conf) else {
        return Vec::new();
    };
    let dir = nix_conf.parent().unwrap_or(Path::new("/"));
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.strip_prefix("!include").or_else(|| l.strip_prefix("include")))
        .filter(|rest| rest.starts_with([' ', '\t']))
        .map(|rest| dir.join(rest.trim()))
        .collect()
}

/// Looks at nix.conf (does it include a `nix.custom.conf`?) and at launchd's daemons (is
/// `systems.determinate.nix-daemon.plist` there?).
pub fn detect(nix_conf: &Path, launch_daemons: &Path, os: Os) -> NixSetup {
    let custom = includes(nix_conf)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == CUSTOM_CONF));
    let plist = launch_daemons.join(format!("{DETERMINATE_LABEL}.plist"));
    let (flavor, settings_file, evidence) = match custom {
        Some(c) => (
            Flavor::Determinate,
            c.clone(),
            format!("{} includes {}", nix_conf.display(), c.display()),
        ),
        None if plist.exists() => (
            Flavor::Determinate,
            // Determinate's daemon runs, but this nix.conf includes no nix.custom.conf: settings
            // put there would never be read, so they go in nix.conf (which a Determinate upgrade
            // may rewrite; doctor says so).
            nix_conf.to_path_buf(),
            format!(
                "{} exists, but {} includes no {CUSTOM_CONF}",
                plist.display(),
                nix_conf.display()
            ),
        ),
        None => (
            Flavor::Upstream,
            nix_conf.to_path_buf(),
            "no Determinate Nix found".into(),
        ),
    };
    NixSetup {
        flavor,
        os,
        nix_conf: nix_conf.to_path_buf(),
        settings_file,
        evidence,
    }
}

impl NixSetup {
    /// The launchd label of the daemon (macOS).
    pub fn launchd_label(&self) -> &'static str {
        match self.flavor {
            Flavor::Determinate => DETERMINATE_LABEL,
            Flavor::Upstream => UPSTREAM_LABEL,
        }
    }

    /// The command that restarts the daemon so that it reads changed settings.
    pub fn restart_command(&self) -> String {
        match self.os {
            Os::MacOs => format!("sudo launchctl kickstart -k system/{}", self.launchd_label()),
            // Determinate's Linux installer also runs the daemon as nix-daemon.service.
            Os::Linux => "sudo systemctl restart nix-daemon".into(),
        }
    }

    /// A name for messages: "Determinate Nix" or "Nix".
    pub fn name(&self) -> &'static str {
        match self.flavor {
            Flavor::Determinate => "Determinate Nix",
            Flavor::Upstream => "Nix",
        }
    }
}

/// The managed block of builderctl's settings: `builders = @<machines>` unless nix.conf's
/// `builders` already reaches the machines file, and `builders-use-substitutes = true`.
pub fn settings_lines(machines_file: &Path, builders_reaches: bool) -> String {
    let mut lines = Vec::new();
    if !builders_reaches {
        lines.push(format!("builders = @{}", machines_file.display()));
    }
    lines.push("builders-use-substitutes = true".to_string());
    lines.join("\n")
}

/// The block id of builderctl's settings in nix.conf or nix.custom.conf (a pool id always has
/// a `/`, so this never names a pool).
pub const SETTINGS_ID: &str = "settings";
