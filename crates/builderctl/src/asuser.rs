//! `sudo builderctl ...`: the cluster is read as the user who ran sudo, the files are written as
//! root.
//!
//! sudo resets the environment: `KUBECONFIG` is gone, `HOME` is root's, and a kubeconfig's exec
//! credential plugin (gcloud, aws, kubelogin) would run as root with root's HOME, without the
//! user's login. So when builderctl runs as root with `SUDO_USER` naming another user, it reads
//! the pools by running itself (`builderctl read-pools`, hidden) as that user: that user's uid
//! and primary gid (no supplementary group: std clears them when it sets the uid), `HOME`,
//! `USER` and `LOGNAME` that user's, the working directory that user's home. Everything else of
//! the environment is kept, so `sudo KUBECONFIG=... builderctl` and `sudo -E` work as expected.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use nixpool_api::NixBuilderPool;

use crate::source;

/// The user behind sudo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoker {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The user who ran sudo, when this process is root and `SUDO_USER` names another user.
pub fn sudo_invoker() -> anyhow::Result<Option<Invoker>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let Some(name) = std::env::var_os("SUDO_USER") else {
        return Ok(None);
    };
    let name = name.to_string_lossy().into_owned();
    if name.is_empty() || name == "root" {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(&name)
        .ok()
        .flatten()
        .with_context(|| {
            format!(
                "SUDO_USER is {name:?}, which is no user here, so builderctl cannot read the cluster as that user. Pass --read-as-root to read it as root (with root's kubeconfig), or unset SUDO_USER"
            )
        })?;
    if user.uid.is_root() {
        // Reading "as that user" would be reading as root again.
        return Ok(None);
    }
    Ok(Some(Invoker {
        name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    }))
}

/// Reads pools by running `builderctl read-pools <args>` as `who`.
pub fn read_pools(who: &Invoker, args: &[OsString]) -> anyhow::Result<Vec<NixBuilderPool>> {
    let exe = std::env::current_exe().context("finding the builderctl binary to run as the sudo user")?;
    let dir = if who.home.is_dir() {
        who.home.clone()
    } else {
        PathBuf::from("/")
    };
    let out = Command::new(&exe)
        .arg("read-pools")
        .args(args)
        .uid(who.uid)
        .gid(who.gid)
        .env("HOME", &who.home)
        .env("USER", &who.name)
        .env("LOGNAME", &who.name)
        .env_remove("SUDO_USER")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} as {} (the user who ran sudo) to read the cluster with their kubeconfig. Make the binary executable by {}, or pass --read-as-root to read the cluster as root",
                exe.display(),
                who.name,
                who.name
            )
        })?;
    if !out.status.success() {
        bail!(
            "reading the pools as {} (the user who ran sudo, with their kubeconfig) failed, as said above. Fix that kubeconfig (`builderctl status` without sudo shows the same error), point --kubeconfig at one {} can read, or pass --read-as-root to read the cluster as root",
            who.name,
            who.name
        );
    }
    let text = String::from_utf8(out.stdout).context("the pools read as the sudo user are not UTF-8")?;
    source::parse(&text)
        .map_err(|(doc, message)| anyhow::anyhow!("the pools read as {}: document {doc}: {message}", who.name))
}

/// Pools as `read-pools` prints them: a `List`, JSON.
pub fn list_json(pools: &[NixBuilderPool]) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": pools,
    }))?)
}
