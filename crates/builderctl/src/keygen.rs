//! A client key the Nix daemon can use: ed25519, no passphrase, mode 0600, owned by whoever runs
//! `builderctl keygen` (root, with sudo, as the daemon is root).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nixpool_api::ssh_keys;
use ssh_key::LineEnding;

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{0}: a key is already there; keep it (authorize {0}.pub) or pass --force to replace it")]
    Exists(PathBuf),
    #[error("{path}: {what}: {source}{hint}")]
    Io {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("generating the key: {0}")]
    Key(String),
}

/// The generated key's public half.
pub struct Generated {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    pub public_line: String,
}

fn io(path: &Path, what: &'static str, source: std::io::Error) -> KeygenError {
    let hint = if source.kind() == std::io::ErrorKind::PermissionDenied {
        ". The Nix daemon runs as root and so should the key: run it with sudo (`sudo builderctl keygen`)"
    } else {
        ""
    };
    KeygenError::Io {
        path: path.into(),
        what,
        hint,
        source,
    }
}

/// Writes a new key to `path` (0600) and `path.pub` (0644).
pub fn generate(path: &Path, comment: &str, force: bool) -> Result<Generated, KeygenError> {
    if path.exists() && !force {
        return Err(KeygenError::Exists(path.into()));
    }
    let mut key = ssh_keys::generate_ed25519().map_err(|e| KeygenError::Key(e.to_string()))?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeygenError::Key(e.to_string()))?;
    let public_line = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeygenError::Key(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "creating the directory", e))?;
    }
    if force {
        let _ = std::fs::remove_file(path);
    }
    // create_new + mode 0600: the private key is never readable by anyone else, not even briefly.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, "creating the key file", e))?;
    f.write_all(private.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io(path, "writing the key", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io(path, "setting mode 0600", e))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let public_path = PathBuf::from(pub_path);
    std::fs::write(&public_path, format!("{public_line}\n"))
        .map_err(|e| io(&public_path, "writing the public key", e))?;
    Ok(Generated {
        private_path: path.into(),
        public_path,
        public_line,
    })
}

/// What to put in the cluster to authorize `public_line`.
pub fn authorize_snippet(public_line: &str, pool: &str, config_map: &str) -> String {
    format!(
        "# Either list the key in the pool's spec:\n\
         #   kubectl edit nbp {pool}\n\
         spec:\n  ssh:\n    authorizedKeys:\n      - {public_line}\n\
         ---\n\
         # or keep it in a team ConfigMap the pool names (spec.ssh.authorizedKeysConfigMaps:\n\
         # [{{name: {config_map}}}]); builders pick a change up within seconds, without a restart:\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {config_map}\n  labels:\n    nixpool.dev/use: \"true\" # lets pools of this namespace use it\ndata:\n  authorized_keys: |\n    {public_line}\n"
    )
}
