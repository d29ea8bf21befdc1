//! The ssh_config drop-in for a pool: one `Host` alias carrying host, port, user, key and the
//! pinned host key, with connection multiplexing off.

use std::path::{Path, PathBuf};

use nixpool_api::{MachinesEntry, NixBuilderPool};

use crate::render;

/// What the drop-in says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshConfig {
    pub pool_id: String,
    /// The command that wrote it (`builderctl ssh-config`, `builderctl tunnel --install`).
    pub written_by: &'static str,
    /// The command that writes the machines line that names the alias.
    pub machines_line_by: &'static str,
    pub alias: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: String,
    pub host_public_key: String,
    /// The known_hosts file holding `<alias> <host key>`.
    pub known_hosts: PathBuf,
}

impl SshConfig {
    /// The drop-in's file name in `ssh_config.d`.
    pub fn file_name(&self) -> String {
        format!("{}.conf", self.alias)
    }

    /// The known_hosts line that pins the builder under the alias.
    pub fn known_hosts_line(&self) -> String {
        format!("{} {}\n", self.alias, self.host_public_key.trim())
    }

    /// The drop-in text.
    pub fn render(&self) -> String {
        format!(
            "# nixpool pool {id}, written by `{written_by}`; it is replaced on the next run.\n\
             # /etc/nix/machines reaches it as ssh-ng://{user}@{alias} (`{machines_line_by}`).\n\
             Host {alias}\n\
             \x20   HostName {host}\n\
             \x20   Port {port}\n\
             \x20   User {user}\n\
             \x20   IdentityFile {key}\n\
             \x20   IdentitiesOnly yes\n\
             \x20   # The pinned host key is looked up under the alias, in this file and in the one Nix\n\
             \x20   # writes from the machines line's host-key column.\n\
             \x20   HostKeyAlias {alias}\n\
             \x20   GlobalKnownHostsFile {known}\n\
             \x20   StrictHostKeyChecking yes\n\
             \x20   ServerAliveInterval 30\n\
             \x20   ServerAliveCountMax 4\n\
             \x20   ConnectTimeout 10\n\
             \x20   # A refused connection (a builder restarting its sshd, or leaving the pool) is\n\
             \x20   # tried again a second later, by ssh: Nix would fail the build.\n\
             \x20   ConnectionAttempts 3\n\
             \x20   # Multiplexing breaks ssh-ng and would pin every build to one builder pod.\n\
             \x20   ControlMaster no\n\
             \x20   ControlPath none\n",
            id = self.pool_id,
            written_by = self.written_by,
            machines_line_by = self.machines_line_by,
            alias = self.alias,
            host = self.host,
            port = self.port,
            user = self.user,
            key = self.key,
            known = self.known_hosts.display(),
        )
    }
}

/// Where the known_hosts file of a pool goes.
pub fn known_hosts_path(dir: &Path, alias: &str) -> PathBuf {
    dir.join(format!("{alias}.known_hosts"))
}

/// The drop-in of `builderctl ssh-config` for a pool: its status endpoint, the host key of its
/// machines line `e`, the client key `key`.
pub fn for_pool(p: &NixBuilderPool, key: &Path, known_dir: &Path, e: &MachinesEntry) -> SshConfig {
    let alias = render::ssh_alias(p);
    let endpoint = p.status.as_ref().and_then(|s| s.endpoint.clone());
    SshConfig {
        pool_id: render::pool_id(p),
        written_by: "builderctl ssh-config",
        machines_line_by: "builderctl machines-file --via-ssh-config",
        alias: alias.clone(),
        host: endpoint.as_ref().map(|e| e.host.clone()).unwrap_or_default(),
        port: endpoint.map(|e| e.port as u16).unwrap_or(22),
        user: p.spec.ssh.user.clone(),
        key: key.display().to_string(),
        host_public_key: e.host_public_key.clone().unwrap_or_default(),
        known_hosts: known_hosts_path(known_dir, &alias),
    }
}
