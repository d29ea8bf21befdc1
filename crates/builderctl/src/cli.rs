//! The command line: clap definitions and what each command does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use nixpool_api::NixBuilderPool;

use crate::merge::{self, Change};
use crate::render::{self, RenderOptions};
use crate::source::{self, ClusterOptions, Selection};
use crate::{asuser, darwin, defaults, diff, doctor, fsio, keygen, nixsetup, sshconfig, status, tunnel};

const ABOUT: &str = "Puts a nixpool builder pool into your Nix (/etc/nix/machines, an ssh drop-in, a key) and says what is wrong when builds do not reach it.";

const EXAMPLES: &str = "\
Examples:
  sudo builderctl keygen                            # /etc/nix/nixpool_ed25519, prints what to authorize
  sudo builderctl machines-file linux               # pool `linux` of the current namespace into /etc/nix/machines
  builderctl machines-file --from pool.yaml --dry-run
  builderctl machines-file -A --check               # exit 1 when /etc/nix/machines is out of date
  sudo builderctl machines-file --remove linux
  sudo builderctl doctor linux
  builderctl tunnel linux                           # a pool with no outside address, through the API server
  builderctl status -A
  builderctl completions zsh > ~/.zfunc/_builderctl";

/// Exit codes.
pub mod exit {
    /// `--check` found the file out of date; `doctor` found a failure.
    pub const FAILED: u8 = 1;
    /// Bad input, unreachable cluster, refused pool, unwritable file.
    pub const ERROR: u8 = 2;
}

#[derive(Parser, Debug)]
#[command(name = "builderctl", version, about = ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write pools' lines into /etc/nix/machines (or show, check or remove them).
    #[command(after_help = MACHINES_EXAMPLES)]
    MachinesFile(MachinesFileArgs),
    /// Write an /etc/ssh/ssh_config.d drop-in (or print it) that reaches a pool by a Host alias.
    #[command(after_help = SSH_EXAMPLES)]
    SshConfig(SshConfigArgs),
    /// Make a passphrase-less ed25519 client key the Nix daemon (root) can use.
    #[command(after_help = KEYGEN_EXAMPLES)]
    Keygen(KeygenArgs),
    /// Check, in order, everything between `nix build` and a pool; print each finding and its fix.
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(DoctorArgs),
    /// Reach a pool through the Kubernetes API (port-forward) on a local port, for pools with no
    /// address outside the cluster; `--install` writes the ssh drop-in and machines line for it.
    #[command(after_help = TUNNEL_EXAMPLES)]
    Tunnel(TunnelArgs),
    /// A table of pools: ready, endpoint, jobs, systems, features.
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  builderctl completions bash | sudo tee /etc/bash_completion.d/builderctl\n  builderctl completions zsh > ~/.zfunc/_builderctl\n  builderctl completions fish > ~/.config/fish/completions/builderctl.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the pools as a JSON List (what `sudo builderctl` runs as the invoking user to read
    /// the cluster with that user's kubeconfig).
    #[command(hide = true, after_help = "Examples:\n  builderctl read-pools -A")]
    ReadPools(SourceArgs),
}

const MACHINES_EXAMPLES: &str = "\
Each pool gets a block between `# BEGIN nixpool <ns>/<name>` and `# END nixpool <ns>/<name>`;
every other line of the file is kept byte for byte. The write is atomic and keeps a backup
(<file>.builderctl-backup). When /etc is managed by nix-darwin, a nix.buildMachines snippet is
printed instead (a module file). With nix-darwin's `nix.enable = false` (Determinate Nix) /etc/nix
is not nix-darwin's, and the file is written. --configure-nix also puts `builders` and
`builders-use-substitutes` where the daemon reads them: nix.custom.conf under Determinate Nix.
Under sudo the cluster is read as the user who ran sudo (their kubeconfig and credential
plugins), the file written as root.

Examples:
  sudo builderctl machines-file linux                    # one pool, current namespace
  sudo builderctl machines-file -n builds -l team=web    # pools matching a label selector
  sudo builderctl machines-file -A                       # every pool in every namespace
  kubectl get nbp linux -o yaml > pool.yaml && sudo builderctl machines-file --from pool.yaml
  builderctl machines-file linux --dry-run               # show the diff, write nothing
  builderctl machines-file -A --check                    # exit 1 when the file is out of date
  sudo builderctl machines-file --remove builds/linux
  sudo builderctl machines-file linux --via-ssh-config   # after `builderctl ssh-config linux`
  sudo builderctl machines-file linux --configure-nix    # and nix.conf (nix.custom.conf on Determinate)";

const SSH_EXAMPLES: &str = "\
The drop-in defines `Host nixpool-<ns>-<name>` with HostName, Port, User, IdentityFile, the pinned
host key (HostKeyAlias + a known_hosts file) and multiplexing off. Use it for a port other than 22
with Nix versions that take no port in the URI, then write the machines file with
--via-ssh-config.

Examples:
  sudo builderctl ssh-config linux
  builderctl ssh-config --from pool.yaml --print";

const TUNNEL_EXAMPLES: &str = "\
The tunnel listens on 127.0.0.1:--port and carries each connection to a Ready pod of the pool's
Service (its builders, or its gateway pods with spec.gateway/autoscaling) over the API server
(`pods/portforward`, as `kubectl port-forward` does), with your kubeconfig: you need get on
services and nixbuilderpools, list on pods, create and get on pods/portforward. Each connection
has its own forward: when a pod goes away the next connection goes to another Ready pod, and a
forward that fails (no Ready pod yet, the pod went away, sshd not answering) is retried with
jittered backoff for about 25 s.

Nix reaches it through the pool's ssh Host alias nixpool-<ns>-<name>: the drop-in says HostName
127.0.0.1, Port <port>, and HostKeyAlias, so the pool's host key from its status still
verifies. nix-daemon runs ssh as root, so the drop-in must be where root's ssh reads it
(/etc/ssh/ssh_config.d, not ~/.ssh/config): `sudo builderctl tunnel POOL --install` writes it,
its known_hosts file and the pool's block in /etc/nix/machines (merged as `machines-file` does,
ssh-ng://<user>@nixpool-<ns>-<name>) and exits; it replaces a drop-in of `builderctl
ssh-config` for the same pool. Then run the tunnel itself as you, with the same --port, and
keep it running while Nix builds. Without --install it prints what it would write.

Examples:
  sudo builderctl tunnel linux --install            # once: drop-in, known_hosts, /etc/nix/machines
  builderctl tunnel linux                           # then, as you: 127.0.0.1:22122 -> pool linux
  builderctl tunnel builds/linux --port 22123       # another pool, another port";

const KEYGEN_EXAMPLES: &str = "\
Examples:
  sudo builderctl keygen                          # /etc/nix/nixpool_ed25519 (+ .pub), mode 0600, root's
  sudo builderctl keygen --out /etc/nix/ci_ed25519 --pool linux";

const DOCTOR_EXAMPLES: &str = "\
Checks: builders (nix.conf reaches the machines file), machines-file (parses), key (exists, 0600,
no passphrase, root's), host-key (pinned), tcp, ssh-auth (as the daemon: key + pinned host key),
store-ping (ssh-ng), trusted-user (a probe build), builders-use-substitutes, daemon (restarted
since nix.conf changed). Each check is printed as it finishes. Nix's settings are read from
`nix config show` (or `nix show-config`), else from the files. Determinate Nix is recognized
(nix.custom.conf, launchd label systems.determinate.nix-daemon). The whole run stops after
--timeout: a check still running is killed and shown as TIME. Exit 1 when one fails or times out.

Examples:
  sudo builderctl doctor                  # every nixpool pool in /etc/nix/machines
  sudo builderctl doctor linux --json
  sudo builderctl doctor linux --timeout 20 --connect-timeout 3
  sudo builderctl doctor --from pool.yaml --skip trusted-user";

const STATUS_EXAMPLES: &str = "\
The JSON form (-o json) is `{\"pools\": [{namespace, name, ready, reason, readyBuilders, replicas,
endpoint: {host, port}, maxJobs, systems, supportedFeatures, mandatoryFeatures, hostPublicKey}]}`;
those names are stable.

Examples:
  builderctl status
  builderctl status -A
  builderctl status -A -o json | jq '.pools[] | select(.ready) | .name'
  builderctl status --from pools.yaml";

/// Which cluster, as kubectl takes it.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Kubeconfig file. Default: $KUBECONFIG, then ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context. Default: the current context.
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace. Default: the context's namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

impl ClusterArgs {
    pub fn options(&self, all_namespaces: bool) -> ClusterOptions {
        // Every field named, so a flag that is never used fails to compile.
        let ClusterArgs {
            kubeconfig,
            context,
            namespace,
        } = self;
        ClusterOptions {
            kubeconfig: kubeconfig.clone(),
            context: context.clone(),
            namespace: namespace.clone(),
            all_namespaces,
        }
    }
}

/// Which pools, from where.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Pools, by name (current namespace) or namespace/name. None: every pool (matching --selector).
    pub pools: Vec<String>,
    /// Read pools from this file (`kubectl get nbp -o yaml` output: a pool, a List, or several
    /// documents) instead of the cluster.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Pools of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Label selector, e.g. `team=web,tier!=canary`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Under sudo, read the cluster as root (root's kubeconfig and credentials) instead of as the
    /// user who ran sudo (SUDO_USER), which is the default.
    #[arg(long)]
    pub read_as_root: bool,
}

impl SourceArgs {
    pub async fn load(&self) -> anyhow::Result<Vec<NixBuilderPool>> {
        // Every field named, so a flag that is never used fails to compile.
        let SourceArgs {
            pools,
            from,
            cluster,
            all_namespaces,
            selector,
            read_as_root,
        } = self;
        let sel = Selection {
            names: pools.clone(),
            selector: selector.clone(),
        };
        Ok(match from {
            Some(path) => source::from_file(path, &sel)?,
            None if !read_as_root && let Some(who) = asuser::sudo_invoker()? => {
                asuser::read_pools(&who, &self.child_args())?
            }
            None => source::from_cluster(&cluster.options(*all_namespaces), &sel).await?,
        })
    }

    /// The same selection as arguments of `builderctl read-pools`.
    fn child_args(&self) -> Vec<std::ffi::OsString> {
        let SourceArgs {
            pools,
            // Only called without --from, and the child reads as the user it runs as.
            from: _,
            cluster:
                ClusterArgs {
                    kubeconfig,
                    context,
                    namespace,
                },
            all_namespaces,
            selector,
            read_as_root: _,
        } = self;
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        if let Some(k) = kubeconfig {
            v.push("--kubeconfig".into());
            v.push(k.into());
        }
        for (flag, value) in [
            ("--context", context),
            ("--namespace", namespace),
            ("--selector", selector),
        ] {
            if let Some(value) = value {
                v.push(flag.into());
                v.push(value.into());
            }
        }
        if *all_namespaces {
            v.push("--all-namespaces".into());
        }
        v.push("--".into());
        v.extend(pools.iter().map(Into::into));
        v
    }
}

#[derive(Args, Debug)]
pub struct MachinesFileArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The machines file to merge into.
    #[arg(long, value_name = "FILE", default_value = defaults::MACHINES_FILE)]
    pub machines_file: PathBuf,
    /// Path of the client private key on this machine (the line's key column).
    #[arg(long, value_name = "FILE", default_value = defaults::KEY)]
    pub key: PathBuf,
    /// Show the diff; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Exit 1 (and show the diff) when the file is out of date; write nothing.
    #[arg(long, conflicts_with = "dry_run")]
    pub check: bool,
    /// Take the named pools' blocks out (name, namespace/name, or -n namespace name). Reads no
    /// pool and needs no cluster access, so the flags that choose, read or render pools are
    /// refused with it.
    #[arg(long)]
    pub remove: bool,
    /// Write pools that are not Ready too.
    #[arg(long)]
    pub allow_unready: bool,
    /// Write pools whose status is older than their spec (the operator has not caught up).
    #[arg(long)]
    pub allow_stale: bool,
    /// Reach the pool as ssh-ng://user@nixpool-<ns>-<name>, the Host alias of `builderctl ssh-config`.
    #[arg(long)]
    pub via_ssh_config: bool,
    /// Do not keep <file>.builderctl-backup.
    #[arg(long)]
    pub no_backup: bool,
    /// nix-darwin's /etc/static: when it exists, print a nix.buildMachines snippet instead of writing.
    #[arg(long, value_name = "DIR", default_value = defaults::ETC_STATIC)]
    pub etc_static: PathBuf,
    /// Write the file even when /etc looks managed by nix-darwin.
    #[arg(long)]
    pub ignore_nix_darwin: bool,
    /// Also make the Nix daemon read the machines file: a managed block with `builders = @FILE`
    /// (unless nix.conf already reads it) and `builders-use-substitutes = true`, in
    /// nix.custom.conf under Determinate Nix (which rewrites nix.conf), in nix.conf otherwise.
    /// Prints the daemon restart it needs.
    #[arg(long)]
    pub configure_nix: bool,
    /// nix.conf (with --configure-nix).
    #[arg(long, value_name = "FILE", default_value = defaults::NIX_CONF)]
    pub nix_conf: PathBuf,
    /// Where launchd's system daemons are (Determinate Nix is told by its plist there).
    #[arg(long, value_name = "DIR", default_value = defaults::LAUNCH_DAEMONS, hide = true)]
    pub launch_daemons_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Path of the client private key on this machine.
    #[arg(long, value_name = "FILE", default_value = defaults::KEY)]
    pub key: PathBuf,
    /// Where the drop-in goes (`nixpool-<ns>-<name>.conf`).
    #[arg(long, value_name = "DIR", default_value = defaults::SSH_CONFIG_DIR)]
    pub ssh_config_dir: PathBuf,
    /// Where the pinned host key goes (`nixpool-<ns>-<name>.known_hosts`).
    #[arg(long, value_name = "DIR", default_value = defaults::KNOWN_HOSTS_DIR)]
    pub known_hosts_dir: PathBuf,
    /// Print the drop-in and the known_hosts line; write nothing.
    #[arg(long)]
    pub print: bool,
    /// Use pools that are not Ready too.
    #[arg(long)]
    pub allow_unready: bool,
    /// Use pools whose status is older than their spec (the operator has not caught up).
    #[arg(long)]
    pub allow_stale: bool,
}

#[derive(Args, Debug)]
pub struct TunnelArgs {
    /// The pool: a name (the context's namespace, or -n) or namespace/name.
    pub pool: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The local port, on 127.0.0.1 only. 0: a free one (printed; not with --install).
    #[arg(long, default_value_t = tunnel::DEFAULT_PORT)]
    pub port: u16,
    /// Path of the client private key on this machine (IdentityFile, and the machines line's key).
    #[arg(long, value_name = "FILE", default_value = defaults::KEY)]
    pub key: PathBuf,
    /// Write the drop-in, its known_hosts file and the machines line for the tunnel on --port,
    /// then exit (needs root: `sudo`; the pool is read as the user who ran sudo).
    #[arg(long)]
    pub install: bool,
    /// Where the drop-in goes (`nixpool-<ns>-<name>.conf`).
    #[arg(long, value_name = "DIR", default_value = defaults::SSH_CONFIG_DIR)]
    pub ssh_config_dir: PathBuf,
    /// Where the pinned host key goes (`nixpool-<ns>-<name>.known_hosts`).
    #[arg(long, value_name = "DIR", default_value = defaults::KNOWN_HOSTS_DIR)]
    pub known_hosts_dir: PathBuf,
    /// The machines file to merge the pool's line into.
    #[arg(long, value_name = "FILE", default_value = defaults::MACHINES_FILE)]
    pub machines_file: PathBuf,
    /// Do not keep <file>.builderctl-backup of the machines file (with --install).
    #[arg(long, requires = "install")]
    pub no_backup: bool,
    /// Write the line of a pool that is not Ready too.
    #[arg(long)]
    pub allow_unready: bool,
    /// Under sudo, read the pool as root instead of as the user who ran sudo (with --install;
    /// the tunnel itself runs as you).
    #[arg(long, requires = "install")]
    pub read_as_root: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The private key file (the public one gets `.pub`).
    #[arg(long, value_name = "FILE", default_value = defaults::KEY)]
    pub out: PathBuf,
    /// The key's comment. Default: nixpool@<hostname>.
    #[arg(long)]
    pub comment: Option<String>,
    /// Replace an existing key.
    #[arg(long)]
    pub force: bool,
    /// Pool name used in the printed snippet.
    #[arg(long, default_value = "<pool>")]
    pub pool: String,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The pool to check (name or namespace/name). None: every nixpool pool in the machines file.
    pub pool: Option<String>,
    /// The machines file.
    #[arg(long, value_name = "FILE", default_value = defaults::MACHINES_FILE)]
    pub machines_file: PathBuf,
    /// nix.conf.
    #[arg(long, value_name = "FILE", default_value = defaults::NIX_CONF)]
    pub nix_conf: PathBuf,
    /// The pool as `kubectl get -o yaml` prints it: its host key is compared with the pinned one.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Checks to leave out of the report. `tcp` is then not tried at all, so the SSH checks run
    /// even where it would fail.
    #[arg(long, value_name = "CHECK", value_enum)]
    pub skip: Vec<doctor::CheckId>,
    /// Seconds to wait for a connection.
    #[arg(long, default_value_t = 5)]
    pub connect_timeout: u64,
    /// Seconds for all checks together; a check still running then is stopped and reported as
    /// timed out (TIME), and so are the checks not started yet.
    #[arg(long, value_name = "SECONDS", default_value_t = defaults::DOCTOR_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Where launchd's system daemons are (Determinate Nix is told by its plist there).
    #[arg(long, value_name = "DIR", default_value = defaults::LAUNCH_DAEMONS, hide = true)]
    pub launch_daemons_dir: PathBuf,
    /// The ssh client.
    #[arg(long, default_value = "ssh", hide = true)]
    pub ssh: String,
    /// The nix command.
    #[arg(long, default_value = "nix", hide = true)]
    pub nix: String,
    /// nix-build.
    #[arg(long, default_value = "nix-build", hide = true)]
    pub nix_build: String,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output format: a table, or JSON with stable field names (see below).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `status` output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::MachinesFile(a) => machines_file(a).await,
            Command::SshConfig(a) => ssh_config(a).await,
            Command::Keygen(a) => keygen_cmd(a),
            Command::Tunnel(a) if a.install => tunnel_install(a).await,
            Command::Tunnel(a) => tunnel_cmd(a).await,
            Command::Doctor(a) => doctor_cmd(a),
            Command::Status(StatusArgs { source, output }) => {
                let pools = source.load().await?;
                if output == Output::Json {
                    print!("{}", status::json(&pools));
                    return Ok(ExitCode::SUCCESS);
                }
                print!("{}", status::table(&pools));
                for r in status::reasons(&pools) {
                    println!("not ready: {r}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::ReadPools(a) => {
                let pools = a.load().await?;
                println!("{}", asuser::list_json(&pools)?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "builderctl", &mut std::io::stdout());
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// `--remove` works on the file alone: a flag about reading pools or writing their lines would
/// be ignored, so it is refused, named.
fn refuse_flags_remove_ignores<const N: usize>(source: &SourceArgs, others: [(&str, bool); N]) -> anyhow::Result<()> {
    let SourceArgs {
        pools: _,
        from,
        cluster:
            ClusterArgs {
                kubeconfig,
                context,
                // Used: it qualifies the pools' names.
                namespace: _,
            },
        all_namespaces,
        selector,
        read_as_root,
    } = source;
    let ignored: Vec<&str> = [
        ("--from", from.is_some()),
        ("--kubeconfig", kubeconfig.is_some()),
        ("--context", context.is_some()),
        ("--all-namespaces", *all_namespaces),
        ("--selector", selector.is_some()),
        ("--read-as-root", *read_as_root),
    ]
    .into_iter()
    .chain(others)
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    if !ignored.is_empty() {
        bail!(
            "--remove takes pools' blocks out of the file by name (as name, namespace/name, or -n namespace name) and reads no pool: drop {}",
            ignored.join(", ")
        );
    }
    Ok(())
}

fn sudo_hint() -> String {
    std::env::args().skip(1).collect::<Vec<_>>().join(" ")
}

async fn machines_file(a: MachinesFileArgs) -> anyhow::Result<ExitCode> {
    // Every field named, so a flag that is never used fails to compile.
    let MachinesFileArgs {
        source,
        machines_file,
        key,
        dry_run,
        check,
        remove,
        allow_unready,
        allow_stale,
        via_ssh_config,
        no_backup,
        etc_static,
        ignore_nix_darwin,
        configure_nix,
        nix_conf,
        launch_daemons_dir,
    } = a;
    let path = &machines_file;
    let existing = fsio::read_or_empty(path)?;
    let mut changes = Vec::new();
    let mut rendered: Vec<(String, nixpool_api::MachinesEntry, NixBuilderPool)> = Vec::new();
    if remove {
        if source.pools.is_empty() {
            bail!("--remove needs the pools to take out, e.g. `builderctl machines-file --remove builds/linux`");
        }
        refuse_flags_remove_ignores(
            &source,
            [
                ("--allow-unready", allow_unready),
                ("--allow-stale", allow_stale),
                ("--via-ssh-config", via_ssh_config),
                ("--configure-nix", configure_nix),
            ],
        )?;
        for p in &source.pools {
            // `-n builds linux` names the same pool as `builds/linux`.
            let p = match &source.cluster.namespace {
                Some(ns) if !p.contains('/') => format!("{ns}/{p}"),
                _ => p.clone(),
            };
            let p = &p;
            let id = merge::resolve_id(&existing, p).map_err(|ids| {
                anyhow::anyhow!(
                    "{}: several pools are called {p}: {}; name one as namespace/name",
                    path.display(),
                    ids.join(", ")
                )
            })?;
            changes.push(Change::Remove { id });
        }
    } else {
        let pools = source.load().await?;
        let opts = RenderOptions {
            key_path: key.display().to_string(),
            allow_unready,
            via_ssh_config,
            allow_stale,
        };
        let mut refused = Vec::new();
        for p in pools {
            match render::entry(&p, &opts) {
                Ok(e) => rendered.push((render::pool_id(&p), e, p)),
                Err(e) => refused.push(e.to_string()),
            }
        }
        if !refused.is_empty() {
            for r in &refused {
                eprintln!("error: {r}");
            }
            eprintln!("nothing written to {}", path.display());
            return Ok(ExitCode::from(exit::ERROR));
        }
        for (id, e, _) in &rendered {
            changes.push(Change::Set {
                id: id.clone(),
                line: e.to_string(),
            });
        }
    }

    if !ignore_nix_darwin && let Some(why) = darwin::managed_reason(&etc_static, path) {
        eprintln!("{why}.\nAdd this module to your nix-darwin configuration instead (builderctl wrote nothing):\n");
        if remove {
            println!(
                "# Remove the nix.buildMachines entries of {} from your configuration.",
                source.pools.join(", ")
            );
        } else {
            let snippets: Vec<(String, Option<(String, String)>)> = rendered
                .iter()
                .map(|(_, e, p)| {
                    let port = p
                        .status
                        .as_ref()
                        .and_then(|s| s.endpoint.as_ref())
                        .map(|e| e.port)
                        .unwrap_or(22);
                    let cfg = (port != 22 || via_ssh_config).then(|| {
                        let c = sshconfig::for_pool(p, &key, &PathBuf::from(defaults::KNOWN_HOSTS_DIR), e);
                        (c.alias.clone(), c.render())
                    });
                    (render::pool_id(p), cfg)
                })
                .collect();
            let pools: Vec<darwin::SnippetPool> = rendered
                .iter()
                .zip(&snippets)
                .map(|((_, e, _), (id, cfg))| darwin::SnippetPool {
                    id,
                    entry: e,
                    ssh_config: cfg.clone(),
                })
                .collect();
            print!("{}", darwin::snippet(&pools));
        }
        return Ok(ExitCode::SUCCESS);
    }

    if !ignore_nix_darwin && darwin::nix_darwin_without_nix(&etc_static) {
        eprintln!(
            "note: nix-darwin is installed ({}) but does not manage Nix (nix.enable = false, as with Determinate Nix): writing {} directly",
            etc_static.display(),
            path.display()
        );
    }
    let merged = merge::merge(&existing, &changes).with_context(|| format!("{}: nothing written", path.display()))?;
    for u in &merged.unparsable {
        eprintln!(
            "warning: {} line {}: {} ({}); kept as it is — Nix will reject it too, fix it by hand",
            path.display(),
            u.line_no,
            u.text,
            u.error
        );
    }
    for id in &merged.not_found {
        eprintln!("note: {} has no block for pool {id}; nothing to remove", path.display());
    }
    let shown = path.display().to_string();
    let d = diff::unified(&shown, &existing, &merged.text);
    let settings = if configure_nix && !remove {
        nix_settings(
            &nix_conf,
            &launch_daemons_dir,
            &machines_file,
            &etc_static,
            ignore_nix_darwin,
        )?
    } else {
        None
    };
    let settings_diff = settings
        .as_ref()
        .map(|s| diff::unified(&s.setup.settings_file.display().to_string(), &s.existing, &s.text))
        .unwrap_or_default();
    if check {
        if d.is_empty() && settings_diff.is_empty() {
            println!("{shown} is up to date");
            return Ok(ExitCode::SUCCESS);
        }
        print!("{d}{settings_diff}");
        let what = if d.is_empty() {
            "builderctl's nix.conf settings".to_string()
        } else {
            merged.changed.join(", ")
        };
        eprintln!("{shown} is out of date for {what}; run `sudo builderctl machines-file` with the same arguments");
        return Ok(ExitCode::from(exit::FAILED));
    }
    if dry_run {
        if d.is_empty() && settings_diff.is_empty() {
            println!("{shown} is up to date; nothing would change");
        } else {
            print!("{d}{settings_diff}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if d.is_empty() {
        println!("{shown} is up to date; nothing written");
    } else {
        let written = fsio::write_atomic(path, merged.text.as_bytes(), 0o644, !no_backup, &sudo_hint())?;
        let verb = if remove { "removed" } else { "wrote" };
        println!("{verb} {} in {shown}", merged.changed.join(", "));
        if let Some(b) = written.backup {
            println!("previous version: {}", b.display());
        }
    }
    if let Some(s) = settings {
        let f = s.setup.settings_file.display();
        if settings_diff.is_empty() {
            println!("{f} is up to date; nothing written");
        } else {
            fsio::write_atomic(
                &s.setup.settings_file,
                s.text.as_bytes(),
                0o644,
                !no_backup,
                &sudo_hint(),
            )?;
            println!(
                "wrote builderctl's settings in {f} ({}, {})",
                s.setup.name(),
                s.setup.evidence
            );
            println!("the daemon reads them after a restart: {}", s.setup.restart_command());
        }
    }
    if !remove && !d.is_empty() {
        println!("Nix reads it at the next build; `sudo builderctl doctor` checks the rest of the way.");
    }
    Ok(ExitCode::SUCCESS)
}

/// builderctl's settings block, merged into the file the daemon reads them from.
struct NixSettings {
    setup: nixsetup::NixSetup,
    existing: String,
    text: String,
}

fn nix_settings(
    nix_conf: &Path,
    launch_daemons_dir: &Path,
    machines_file: &Path,
    etc_static: &Path,
    ignore_nix_darwin: bool,
) -> anyhow::Result<Option<NixSettings>> {
    let setup = nixsetup::detect(nix_conf, launch_daemons_dir, doctor::Os::current());
    let conf = doctor::NixConf::from_files_but(nix_conf, Some(nixsetup::SETTINGS_ID));
    let reaches = conf
        .get("builders")
        .is_some_and(|v| doctor::builders_reach(&v, machines_file));
    let lines = nixsetup::settings_lines(machines_file, reaches);
    if !ignore_nix_darwin && let Some(why) = darwin::managed_reason(etc_static, &setup.settings_file) {
        eprintln!(
            "{why}.\nbuilderctl wrote no nix settings; put these in your nix-darwin configuration (determinateNix.customSettings with the determinate module, else nix.settings):\n{lines}"
        );
        return Ok(None);
    }
    let existing = fsio::read_or_empty(&setup.settings_file)?;
    let change = Change::Set {
        id: nixsetup::SETTINGS_ID.into(),
        line: lines,
    };
    let merged = merge::merge(&existing, &[change])
        .with_context(|| format!("{}: nothing written", setup.settings_file.display()))?;
    Ok(Some(NixSettings {
        setup,
        existing,
        text: merged.text,
    }))
}

async fn ssh_config(a: SshConfigArgs) -> anyhow::Result<ExitCode> {
    // Every field named, so a flag that is never used fails to compile.
    let SshConfigArgs {
        source,
        key,
        ssh_config_dir,
        known_hosts_dir,
        print,
        allow_unready,
        allow_stale,
    } = a;
    let pools = source.load().await?;
    let opts = RenderOptions {
        key_path: key.display().to_string(),
        allow_unready,
        via_ssh_config: true,
        allow_stale,
    };
    let mut configs = Vec::new();
    for p in &pools {
        let e = render::entry(p, &opts)?;
        configs.push(sshconfig::for_pool(p, &key, &known_hosts_dir, &e));
    }
    for c in &configs {
        if print {
            println!("# {}", ssh_config_dir.join(c.file_name()).display());
            print!("{}", c.render());
            println!("# {}", c.known_hosts.display());
            print!("{}", c.known_hosts_line());
            continue;
        }
        write_ssh_config(c, &ssh_config_dir)?;
        println!(
            "reach it as ssh-ng://{}@{}: `sudo builderctl machines-file {} --via-ssh-config`",
            c.user, c.alias, c.pool_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a drop-in into `dir` and its known_hosts file.
fn write_ssh_config(c: &sshconfig::SshConfig, dir: &std::path::Path) -> anyhow::Result<()> {
    let conf = dir.join(c.file_name());
    fsio::write_atomic(
        &c.known_hosts,
        c.known_hosts_line().as_bytes(),
        0o644,
        false,
        &sudo_hint(),
    )?;
    fsio::write_atomic(&conf, c.render().as_bytes(), 0o644, false, &sudo_hint())?;
    println!("wrote {} and {}", conf.display(), c.known_hosts.display());
    Ok(())
}

/// How `tunnel` renders the pool's machines line: through its ssh Host alias.
fn tunnel_render_options(key: &Path, allow_unready: bool) -> RenderOptions {
    RenderOptions {
        key_path: key.display().to_string(),
        allow_unready,
        via_ssh_config: true,
        allow_stale: false,
    }
}

/// `tunnel --install`: the drop-in, its known_hosts and the machines block; no forwarding.
async fn tunnel_install(a: TunnelArgs) -> anyhow::Result<ExitCode> {
    // Every field named, so a flag that is never used fails to compile.
    let TunnelArgs {
        pool,
        cluster,
        port,
        key,
        // True: this is the --install half.
        install: _,
        ssh_config_dir,
        known_hosts_dir,
        machines_file,
        no_backup,
        allow_unready,
        read_as_root,
    } = a;
    if port == 0 {
        bail!("--install needs the fixed --port the tunnel will listen on (0 picks a new one each run)");
    }
    let source = SourceArgs {
        pools: vec![pool.clone()],
        from: None,
        cluster,
        all_namespaces: false,
        selector: None,
        read_as_root,
    };
    let pools = source.load().await?;
    let Some(p) = pools.first() else {
        bail!("pool {pool} was not found");
    };
    let e = render::entry(p, &tunnel_render_options(&key, allow_unready))?;
    let c = tunnel::ssh_config(p, &key, &known_hosts_dir, &e, port);
    write_ssh_config(&c, &ssh_config_dir)?;
    let path = &machines_file;
    let existing = fsio::read_or_empty(path)?;
    let change = Change::Set {
        id: render::pool_id(p),
        line: e.to_string(),
    };
    let merged = merge::merge(&existing, &[change]).with_context(|| format!("{}: nothing written", path.display()))?;
    if merged.changed.is_empty() {
        println!("{} is up to date", path.display());
    } else {
        fsio::write_atomic(path, merged.text.as_bytes(), 0o644, !no_backup, &sudo_hint())?;
        println!("wrote {} in {} ({})", render::pool_id(p), path.display(), e.uri);
    }
    println!(
        "now run the tunnel as yourself and keep it running while Nix builds: builderctl tunnel {} --port {}",
        render::pool_id(p),
        port
    );
    Ok(ExitCode::SUCCESS)
}

/// `tunnel`: listen on 127.0.0.1 and forward each connection to a Ready pod of the pool.
async fn tunnel_cmd(a: TunnelArgs) -> anyhow::Result<ExitCode> {
    // Every field named, so a flag that is never used fails to compile.
    let TunnelArgs {
        pool,
        cluster,
        port,
        key,
        // False: this is the forwarding half.
        install: _,
        ssh_config_dir,
        known_hosts_dir,
        machines_file,
        // Only --install writes the machines file (clap refuses the flag without it).
        no_backup: _,
        allow_unready,
        // Without --install the pool is read in this process, as whoever runs it (clap refuses
        // the flag without --install).
        read_as_root: _,
    } = a;
    let sel = Selection {
        names: vec![pool.clone()],
        selector: None,
    };
    let pools = source::from_cluster(&cluster.options(false), &sel).await?;
    let Some(p) = pools.first() else {
        bail!("pool {pool} was not found");
    };
    let listener = tokio::net::TcpListener::bind((tunnel::LOCALHOST, port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}:{}: is a tunnel already running there? Choose another --port (and --install it)",
                tunnel::LOCALHOST,
                port
            )
        })?;
    let port = listener.local_addr()?.port();
    match render::entry(p, &tunnel_render_options(&key, allow_unready)) {
        Ok(e) => {
            let c = tunnel::ssh_config(p, &key, &known_hosts_dir, &e, port);
            println!(
                "# Nix reaches the pool through this tunnel with these (`sudo builderctl tunnel {} --port {port} --install` writes them):",
                render::pool_id(p)
            );
            println!("# {}", ssh_config_dir.join(c.file_name()).display());
            print!("{}", c.render());
            println!("# {}", c.known_hosts.display());
            print!("{}", c.known_hosts_line());
            println!("# {}", machines_file.display());
            println!("{e}");
        }
        Err(e) => eprintln!("warning: no machines line for it yet: {e}"),
    }
    let (client, _) = source::client(&cluster.options(false)).await?;
    let t = std::sync::Arc::new(tunnel::Tunnel::new(client, render::namespace(p), render::name(p)));
    match t.targets().await {
        Ok(pods) => println!("{} Ready pod(s) now", pods.len()),
        Err(e) => eprintln!("warning: {e}; connections are retried until one is Ready"),
    }
    println!(
        "forwarding {}:{port} to pool {}; Ctrl-C stops it",
        tunnel::LOCALHOST,
        render::pool_id(p)
    );
    std::io::stdout().flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = t.serve(listener) => r.context("accepting a connection")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn keygen_cmd(a: KeygenArgs) -> anyhow::Result<ExitCode> {
    // Every field named, so a flag that is never used fails to compile.
    let KeygenArgs {
        out: private_path,
        comment,
        force,
        pool,
    } = a;
    let comment = comment.unwrap_or_else(|| format!("nixpool@{}", hostname()));
    let g = keygen::generate(&private_path, &comment, force)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "private key: {} (mode 0600, no passphrase)",
        g.private_path.display()
    )?;
    writeln!(out, "public key:  {}", g.public_path.display())?;
    writeln!(out, "{}\n", g.public_line)?;
    write!(
        out,
        "{}",
        keygen::authorize_snippet(
            &g.public_line,
            &pool,
            &format!("{}-keys-{}", pool.trim_matches(['<', '>']), hostname())
        )
    )?;
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "warning: the key belongs to you, not root; the Nix daemon runs as root. Run `sudo builderctl keygen` (or `sudo chown root {}`)",
            g.private_path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor_cmd(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    // Every field named, so a flag that is never used fails to compile.
    let DoctorArgs {
        pool,
        machines_file,
        nix_conf,
        from,
        json,
        skip,
        connect_timeout,
        timeout,
        launch_daemons_dir,
        ssh,
        nix,
        nix_build,
    } = a;
    let expected_host_key = match &from {
        None => None,
        Some(path) => {
            let sel = Selection {
                names: pool.iter().cloned().collect(),
                selector: None,
            };
            let pools = source::from_file(path, &sel)?;
            pools
                .first()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.host_public_key.clone())
        }
    };
    let opts = doctor::Options {
        pool,
        setup: nixsetup::detect(&nix_conf, &launch_daemons_dir, doctor::Os::current()),
        machines_file,
        nix_conf,
        expected_host_key,
        connect_timeout: Duration::from_secs(connect_timeout),
        timeout: Duration::from_secs(timeout),
        skip,
        ssh,
        ssh_keyscan: "ssh-keyscan".into(),
        launchctl: "launchctl".into(),
        nix,
        nix_build,
        deadline: None,
    };
    let checks = doctor::run(&opts, &mut |c| {
        if !json {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(doctor::report_line(c).as_bytes());
            let _ = out.flush();
        }
    });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "passed": doctor::passed(&checks),
                "checks": checks,
            }))?
        );
    } else {
        print!("{}", doctor::summary(&checks));
    }
    Ok(if doctor::passed(&checks) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::FAILED)
    })
}
