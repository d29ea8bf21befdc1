//! Error types, one per stage.

use std::path::PathBuf;

/// Why the config or a mount is unusable. Each message names the file or field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent config {path}: {source} (the pool ConfigMap must be mounted at {dir})", dir = nixpool_api::paths::CONFIG_DIR)]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config field `{field}`: {problem}")]
    Field { field: &'static str, problem: String },
}

/// A problem with a key Secret.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "the host key is not an OpenSSH private key ({0}); the host-key Secret must hold the key the operator generated"
    )]
    Parse(String),
    #[error("the host key is {0}, not ssh-ed25519; nixpool pins an ed25519 host key")]
    Algorithm(String),
    #[error("the host key is passphrase-protected; sshd cannot use it")]
    Encrypted,
}

/// A file-system step failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub fn fs_err(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FsError {
    let path = path.into();
    move |source| FsError { action, path, source }
}
