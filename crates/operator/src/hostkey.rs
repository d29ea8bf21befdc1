//! The pool's SSH host key: one ed25519 key per pool, generated once.

use nixpool_api::ssh_keys::{self, HostKeyError};
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
        let key = ssh_keys::parse_host_key(openssh).map_err(|e| match e {
            HostKeyError::NotOpenSsh(_) => e.to_string(),
            HostKeyError::NotEd25519(_) => format!(
                "{e}; builders take only an ed25519 host key: store one made with `ssh-keygen -t ed25519 -N ''`, or name no hostKeySecret and the operator generates one"
            ),
            HostKeyError::Encrypted => {
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

    /// An ECDSA key (made with `ssh-keygen -t ecdsa -b 256 -N ''`): every builder would refuse it.
    const ECDSA: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAaAAAABNlY2RzYS
1zaGEyLW5pc3RwMjU2AAAACG5pc3RwMjU2AAAAQQRdT14sv2SxoXioBOoA0LFd0IsL2C+b
ZIfb0NR33moY/BMuzDBPIK3U7AhtQMK3CJS2TESLxpMFNhpmNp11R+TgAAAAoAHqE9gB6h
PYAAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBF1PXiy/ZLGheKgE
6gDQsV3QiwvYL5tkh9vQ1Hfeahj8Ey7MME8grdTsCG1AwrcIlLZMRIvGkwU2GmY2nXVH5O
AAAAAgOEQ1o37wSUc64iqVBOMX0MDwQUbujDBlilTvpbIQB9gAAAAHcm9vdEB2bQE=
-----END OPENSSH PRIVATE KEY-----
";

    #[test]
    fn a_host_key_other_than_ed25519_is_refused_with_the_fix() {
        let err = HostKey::parse(ECDSA.as_bytes()).unwrap_err();
        assert!(err.contains("not ssh-ed25519"), "{err}");
        assert!(err.contains("ssh-keygen -t ed25519"), "{err}");
    }

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
