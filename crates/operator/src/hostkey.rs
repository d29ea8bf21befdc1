//! The pool's SSH host key: one ed25519 key per pool, generated once.

use nixpool_api::ssh_keys::{self, PrivateKeyError};
use ssh_key::{LineEnding, PrivateKey};

/// A host key pair. `Debug` never prints the private half.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// OpenSSH private key file content.
    private_openssh: String,
    /// `ssh-ed25519 AAAA...` without a comment.
    pub public: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// A fresh ed25519 key from the OS random source.
    pub fn generate() -> Self {
        let key = ssh_keys::generate_ed25519().expect("ed25519 key generation does not fail with the OS RNG");
        Self::from_key(&key)
    }

    /// Reads an OpenSSH private key (as stored in a Secret).
    pub fn parse(openssh: &[u8]) -> Result<Self, String> {
        let key = ssh_keys::parse_unencrypted_private_key(openssh).map_err(|e| match e {
            PrivateKeyError::NotOpenSsh(_) => e.to_string(),
            PrivateKeyError::Encrypted => {
                "the key has a passphrase; sshd cannot use it unattended: store a key without one".to_string()
            }
        })?;
        Ok(Self::from_key(&key))
    }

    fn from_key(key: &PrivateKey) -> Self {
        let private_openssh = key
            .to_openssh(LineEnding::LF)
            .expect("an in-memory key encodes")
            .to_string();
        Self {
            private_openssh,
            public: ssh_keys::public_line_without_comment(key.public_key()).expect("a public key encodes"),
        }
    }

    pub fn private_openssh(&self) -> &str {
        &self.private_openssh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_debug_hides_the_private_half() {
        let key = HostKey::generate();
        assert!(key.public.starts_with("ssh-ed25519 AAAA"));
        assert_eq!(key.public.split(' ').count(), 2, "no comment in the pinned key");
        let again = HostKey::parse(key.private_openssh().as_bytes()).unwrap();
        assert_eq!(again, key);
        let shown = format!("{key:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert_ne!(HostKey::generate().public, key.public);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = HostKey::parse(b"hello").unwrap_err();
        assert!(err.contains("not an OpenSSH private key"), "{err}");
    }
}
