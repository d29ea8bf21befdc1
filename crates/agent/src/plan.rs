//! What `run` does to the root, computed first so that `check` can print it and `run` can apply
//! it. Reading the config, the mounts and the machine happens here; writing in [`apply`].

use std::fs;
use std::path::PathBuf;

use nixpool_api::AgentConfig;
use nixpool_api::agent::PushTarget;

use crate::accounts::{self, Accounts, Wanted};
use crate::error::{ConfigError, FsError};
use crate::fhs::{self, Link, Source};
use crate::layout::{Binaries, Layout, is_executable};
use crate::nixconf::{self, Host};
use crate::ssh::{self, BadLine, SshdSettings};

/// Choices that are the image's or the operator's, not the pool's.
#[derive(Clone, Debug)]
pub struct Options {
    /// nix.conf `sandbox`.
    pub sandbox: String,
}

/// A directory the agent creates.
#[derive(Clone, Debug)]
pub struct Dir {
    pub path: PathBuf,
    pub mode: u32,
    /// Owner uid and gid (root's unless a session must write in it).
    pub owner: (u32, u32),
}

/// A file the agent writes.
#[derive(Clone, Debug)]
pub struct File {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    /// Never printed.
    pub secret: bool,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub config: AgentConfig,
    pub links: Vec<Link>,
    pub dirs: Vec<Dir>,
    pub files: Vec<File>,
    /// What the agent found (logged by `run`, printed by `check`).
    pub notes: Vec<String>,
    /// Lines of the authorized-keys ConfigMap that are not keys (skipped).
    pub bad_keys: Vec<BadLine>,
    pub key_count: usize,
    pub build_uids: Vec<u32>,
    pub host_public_key: String,
    pub forced_command: String,
    /// The builder's `authorized_keys` as written for sshd: the key reload's baseline, so that a
    /// key removed after this was read (during start-up) is still removed.
    pub authorized_keys: String,
    /// CA bundle for substituters (given to nix-daemon as NIX_SSL_CERT_FILE).
    pub ca_bundle: Option<PathBuf>,
}

/// Reads and parses the config document.
pub fn load_config(layout: &Layout) -> Result<AgentConfig, ConfigError> {
    let path = layout.config_file();
    let text = fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    AgentConfig::from_json(&text).map_err(|source| ConfigError::Parse { path, source })
}

/// Checks the document beyond its shape (the rules live in `nixpool_api`, shared with the CRD
/// and the operator), plus what only the agent knows.
pub fn validate(c: &AgentConfig) -> Vec<ConfigError> {
    let mut errs: Vec<ConfigError> = c
        .problems()
        .into_iter()
        .map(|(field, problem)| ConfigError::Field { field, problem })
        .collect();
    let mut bad = |field: &'static str, problem: String| errs.push(ConfigError::Field { field, problem });
    for t in &c.push {
        match t {
            PushTarget::NixCopy { uri, .. } if uri.is_empty() => {
                bad("push[].uri", "is empty: set a Nix store URI".into())
            }
            PushTarget::Attic { endpoint, cache, .. } if endpoint.is_empty() || cache.is_empty() => {
                bad("push[].attic", "needs both `endpoint` and `cache`".into())
            }
            PushTarget::Cachix { cache, .. } if cache.is_empty() => {
                bad("push[].cache", "is empty: name the Cachix cache".into())
            }
            _ => {}
        }
    }
    errs
}

/// Secret files a push target needs.
pub fn push_secret(t: &PushTarget) -> &str {
    match t {
        PushTarget::NixCopy { signing_key_file, .. } => signing_key_file,
        PushTarget::Attic { token_file, .. } | PushTarget::Cachix { token_file, .. } => token_file,
    }
}

/// Reads and checks the mounted host key: (the private key's text, its public half), or what is
/// wrong with it and the fix.
pub fn read_host_key(layout: &Layout) -> Result<(String, String), String> {
    let path = layout.host_key_secret();
    let text = fs::read_to_string(&path).map_err(|e| {
        format!(
            "host key {}: {e}; mount the pool's host-key Secret at {}",
            path.display(),
            nixpool_api::paths::HOST_KEY_DIR
        )
    })?;
    let public = ssh::check_host_key(&text).map_err(|e| format!("host key {}: {e}", path.display()))?;
    Ok((text, public))
}

/// Computes everything; returns every problem at once when something is wrong.
pub fn build(layout: &Layout, bins: &Binaries, opts: &Options) -> Result<Plan, Vec<String>> {
    let config = load_config(layout).map_err(|e| vec![e.to_string()])?;
    let mut problems: Vec<String> = validate(&config).iter().map(ToString::to_string).collect();
    problems.extend(missing_binaries(&config, bins));
    problems.extend(missing_push_secrets(layout, &config));
    let (host_key_text, host_public_key) = read_host_key(layout).unwrap_or_else(|e| {
        problems.push(e);
        Default::default()
    });
    let forced_command = ssh::forced_command(
        &bins.agent,
        &layout.daemon_socket(),
        &bins.nix_store,
        &layout.gate_slots_dir(),
    );
    let keys = read_authorized_keys(layout, &forced_command).unwrap_or_else(|e| {
        problems.push(e);
        AuthorizedKeys::default()
    });
    let (mut links, link_problems) = find_tools(layout, bins);
    problems.extend(link_problems);
    let ca = fhs::find_ca_bundle(layout);
    links.extend(ca.clone());
    let kvm = fhs::kvm_usable(layout);
    let notes = notes(layout, &links, ca.is_some(), kvm);
    if !problems.is_empty() {
        return Err(problems);
    }

    let shell = layout.path("/bin/sh").display().to_string();
    let accounts = merge_accounts(layout, &config, &shell);
    let dirs = dirs(layout, &accounts);
    let post_build_hook = (!config.push.is_empty()).then(|| layout.post_build_hook());
    let host = Host {
        kvm,
        system: nixconf::native_system(),
        sandbox: opts.sandbox.clone(),
        post_build_hook: post_build_hook.as_ref().map(|p| p.display().to_string()),
    };
    let mut files = account_files(layout, &accounts);
    files.push(File::text(layout.nix_conf(), nixconf::render(&config, &host), 0o644));
    files.extend(host_key_files(layout, host_key_text, &host_public_key));
    files.push(File::text(
        layout.sshd_config(),
        ssh::render_sshd_config(&sshd_settings(layout, &config)),
        0o644,
    ));
    files.push(File::text(
        layout.authorized_keys_dir().join(&config.builder_user),
        keys.text.clone(),
        0o644,
    ));
    files.extend(post_build_hook.map(|hook| File::text(hook, post_build_hook_script(layout, bins, &shell), 0o755)));

    Ok(Plan {
        config,
        links,
        dirs,
        files,
        notes,
        bad_keys: keys.bad,
        key_count: keys.count,
        build_uids: accounts.build_uids,
        host_public_key,
        forced_command,
        authorized_keys: keys.text,
        ca_bundle: ca.map(|l| l.link),
    })
}

impl File {
    fn text(path: PathBuf, content: String, mode: u32) -> Self {
        Self {
            path,
            content: content.into_bytes(),
            mode,
            secret: false,
        }
    }

    /// Readable by root only, and never printed.
    fn secret(path: PathBuf, content: String) -> Self {
        Self {
            path,
            content: content.into_bytes(),
            mode: 0o600,
            secret: true,
        }
    }
}

/// The programs the config needs that are not executable files, each with the flag that names it.
fn missing_binaries(config: &AgentConfig, bins: &Binaries) -> Vec<String> {
    let mut needed = vec![
        ("--sshd", &bins.sshd),
        ("--nix-daemon", &bins.nix_daemon),
        ("--nix-store", &bins.nix_store),
        ("--agent-binary", &bins.agent),
    ];
    if !config.push.is_empty() {
        needed.push(("--nix", &bins.nix));
    }
    if config.push.iter().any(|t| matches!(t, PushTarget::Attic { .. })) {
        needed.push(("--attic", &bins.attic));
    }
    if config.push.iter().any(|t| matches!(t, PushTarget::Cachix { .. })) {
        needed.push(("--cachix", &bins.cachix));
    }
    needed
        .into_iter()
        .filter(|(_, path)| !is_executable(path))
        .map(|(flag, path)| {
            format!(
                "{} is not an executable file: install it in the image or pass {flag}",
                path.display()
            )
        })
        .collect()
}

/// The push targets' secret files that are not mounted.
fn missing_push_secrets(layout: &Layout, config: &AgentConfig) -> Vec<String> {
    config
        .push
        .iter()
        .map(|t| layout.path(push_secret(t)))
        .filter(|f| !f.is_file())
        .map(|f| {
            format!(
                "push secret {} is missing: mount the cache Secret at {}",
                f.display(),
                nixpool_api::paths::CACHE_SECRETS_DIR
            )
        })
        .collect()
}

/// The builder's `authorized_keys`, rendered from the mounted ConfigMap.
#[derive(Default)]
struct AuthorizedKeys {
    text: String,
    /// Lines that are not keys (skipped).
    bad: Vec<BadLine>,
    count: usize,
}

/// Reads the authorized-keys ConfigMap and renders it with the forced command, or says how to
/// mount it.
fn read_authorized_keys(layout: &Layout, forced_command: &str) -> Result<AuthorizedKeys, String> {
    let path = layout.authorized_keys_secret();
    let text = fs::read_to_string(&path).map_err(|e| {
        format!(
            "authorized keys {}: {e}; mount the pool's authorized-keys ConfigMap at {}",
            path.display(),
            nixpool_api::paths::AUTHORIZED_KEYS_DIR
        )
    })?;
    let (text, bad) = ssh::render_authorized_keys(&text, forced_command);
    let count = text.lines().filter(|l| !l.starts_with('#')).count();
    Ok(AuthorizedKeys { text, bad, count })
}

/// The links the root needs: the loader, `/bin/sh` and `/usr/bin/env`; a problem for each not
/// found.
fn find_tools(layout: &Layout, bins: &Binaries) -> (Vec<Link>, Vec<String>) {
    let mut links = Vec::new();
    let mut problems = Vec::new();
    for found in [
        fhs::find_loader(layout, &bins.nix_daemon),
        fhs::find_tool(layout, "/bin/sh", &[("bin/sh", "bash"), ("bin/bash", "bash")]),
        fhs::find_tool(layout, "/usr/bin/env", &[("bin/env", "coreutils")]),
    ] {
        match found {
            Ok(l) => links.push(l),
            Err(e) => problems.push(e),
        }
    }
    (links, problems)
}

/// What the agent found in the image and the machine, for `run`'s log and `check`.
fn notes(layout: &Layout, links: &[Link], ca_bundle: bool, kvm: bool) -> Vec<String> {
    let mut notes = Vec::new();
    if !ca_bundle {
        notes.push("no CA bundle in the image or its store: https substituters will fail".into());
    }
    for l in links {
        let how = match l.source {
            Source::Interpreter => "the nix-daemon's own interpreter",
            Source::Store => "found in the store",
            Source::Existing => "already present, kept",
            Source::Host => "the host's (the root has none)",
        };
        notes.push(format!("{} -> {} ({how})", l.link.display(), l.target.display()));
    }
    notes.push(if kvm {
        format!("{} is usable: advertising kvm and nixos-test", layout.kvm().display())
    } else {
        format!(
            "{} is not usable: not advertising kvm or nixos-test",
            layout.kvm().display()
        )
    });
    notes
}

/// The image's accounts plus the builder user, the build users and sshd's.
fn merge_accounts(layout: &Layout, config: &AgentConfig, shell: &str) -> Accounts {
    let read = |p: &str| fs::read_to_string(layout.path(p)).unwrap_or_default();
    accounts::merge(
        &read("/etc/passwd"),
        &read("/etc/group"),
        &read("/etc/shadow"),
        &Wanted {
            builder_user: config.builder_user.clone(),
            build_users: config.max_jobs.max(1),
            empty_home: layout.path("/var/empty").display().to_string(),
            sshd_home: layout.path("/run/sshd").display().to_string(),
            shell: shell.to_string(),
            nologin: "/bin/false".into(),
        },
    )
}

/// The directories the root needs, root's but for the gate's.
fn dirs(layout: &Layout, accounts: &Accounts) -> Vec<Dir> {
    let root_dir = |path: PathBuf, mode: u32| Dir {
        path,
        mode,
        owner: (0, 0),
    };
    vec![
        root_dir(layout.path("/tmp"), 0o1777),
        root_dir(layout.path("/var/empty"), 0o755),
        root_dir(layout.path("/run/sshd"), 0o755),
        root_dir(layout.path("/root"), 0o700),
        root_dir(layout.ssh_dir(), 0o755),
        root_dir(layout.authorized_keys_dir(), 0o755),
        root_dir(layout.nix_conf_dir(), 0o755),
        root_dir(layout.agent_run_dir(), 0o755),
        root_dir(layout.push_queue(), 0o700),
        // The gate runs as the builder user and creates its slot files here.
        Dir {
            path: layout.gate_slots_dir(),
            mode: 0o700,
            owner: (accounts.builder_uid, accounts.builder_gid),
        },
    ]
}

/// passwd, group, shadow and the nsswitch.conf that reads them.
fn account_files(layout: &Layout, accounts: &Accounts) -> Vec<File> {
    vec![
        File::text(layout.path("/etc/passwd"), accounts.passwd.clone(), 0o644),
        File::text(layout.path("/etc/group"), accounts.group.clone(), 0o644),
        File::secret(layout.path("/etc/shadow"), accounts.shadow.clone()),
        File::text(
            layout.path("/etc/nsswitch.conf"),
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n".into(),
            0o644,
        ),
    ]
}

/// The host key sshd reads, and its public half.
fn host_key_files(layout: &Layout, private: String, public: &str) -> Vec<File> {
    vec![
        File::secret(layout.host_key(), private),
        File::text(layout.host_key().with_extension("pub"), format!("{public}\n"), 0o644),
    ]
}

fn sshd_settings(layout: &Layout, config: &AgentConfig) -> SshdSettings {
    SshdSettings {
        port: config.ssh_port,
        host_key: layout.host_key().display().to_string(),
        authorized_keys_dir: layout.authorized_keys_dir().display().to_string(),
        pid_file: layout.path("/run/sshd.pid").display().to_string(),
        builder_user: config.builder_user.clone(),
        max_jobs: config.max_jobs,
    }
}

/// nix.conf's post-build-hook when the pool pushes: it queues what was built for the pusher.
fn post_build_hook_script(layout: &Layout, bins: &Binaries, shell: &str) -> String {
    format!(
        "#!{shell}\n# Written by nixpool-agent: queues what this builder built for the cache pusher; never fails a build.\n{} --root {} enqueue --nix-store {}\nexit 0\n",
        bins.agent.display(),
        layout.root.display(),
        bins.nix_store.display()
    )
}

/// Applies the plan; idempotent. Returns the paths it changed.
pub fn apply(plan: &Plan) -> Result<Vec<PathBuf>, FsError> {
    let mut changed = Vec::new();
    for d in &plan.dirs {
        fhs::ensure_dir(&d.path, d.mode, d.owner)?;
    }
    for l in &plan.links {
        if fhs::ensure_link(l)? {
            changed.push(l.link.clone());
        }
    }
    for f in &plan.files {
        if fhs::write_file(&f.path, &f.content, f.mode)? {
            changed.push(f.path.clone());
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixconf::tests::config;

    #[test]
    fn validation_names_the_field_and_the_fix() {
        let mut c = config();
        c.builder_user = "root".into();
        c.max_jobs = 0;
        c.health_port = 22;
        c.extra_nix_config.insert("trusted-users".into(), "eve".into());
        let errs: Vec<String> = validate(&c).iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].contains("builderUser") && errs[0].contains("reserved"));
        assert!(errs[1].contains("maxJobs") && errs[1].contains("at least 1"));
        assert!(errs[2].contains("healthPort"));
        assert!(errs[3].contains("extraNixConfig") && errs[3].contains("trusted-users"));
        assert!(validate(&config()).is_empty());
    }
}
