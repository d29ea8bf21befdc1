//! SSH keys as every nixpool binary reads them: the operator (the pool's host key, the
//! authorized keys it merges), the agent (the mounted host key, the keys it writes for sshd) and
//! builderctl (`keygen`, `doctor`). Behind the `ssh-keys` feature, so a crate that handles no
//! key does not build `ssh-key`. Each caller words its own errors (they say what to do there);
//! this module only says what is wrong.

use ssh_key::authorized_keys::Entry;
use ssh_key::{Algorithm, HashAlg, PrivateKey, PublicKey};

/// Why a private key file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrivateKeyError {
    /// The text is no OpenSSH private key; the parser's reason.
    #[error("not an OpenSSH private key ({0})")]
    NotOpenSsh(String),
    /// Passphrase-protected: neither sshd nor the Nix daemon can type the passphrase.
    #[error("the key has a passphrase")]
    Encrypted,
}

/// A fresh ed25519 key from the OS random source.
pub fn generate_ed25519() -> Result<PrivateKey, ssh_key::Error> {
    PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519)
}

/// An OpenSSH private key file's content, passphrase or not; `Err` holds the parser's reason.
pub fn parse_private_key(openssh: impl AsRef<[u8]>) -> Result<PrivateKey, String> {
    PrivateKey::from_openssh(openssh).map_err(|e| e.to_string())
}

/// An OpenSSH private key file's content that a daemon can use unattended: no passphrase.
pub fn parse_unencrypted_private_key(openssh: impl AsRef<[u8]>) -> Result<PrivateKey, PrivateKeyError> {
    let key = parse_private_key(openssh).map_err(PrivateKeyError::NotOpenSsh)?;
    if key.is_encrypted() {
        return Err(PrivateKeyError::Encrypted);
    }
    Ok(key)
}

/// Why a private key cannot be a pool's host key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostKeyError {
    #[error("not an OpenSSH private key ({0})")]
    NotOpenSsh(String),
    /// nixpool pins one ed25519 host key per pool: builders, clients' known_hosts and the
    /// machines line all carry that one key type.
    #[error("the key is {0}, not ssh-ed25519")]
    NotEd25519(String),
    #[error("the key has a passphrase")]
    Encrypted,
}

/// A pool's host key: an OpenSSH ed25519 private key without a passphrase. The operator checks
/// a Secret the pool names with it, the agent the key it mounts, so the operator never accepts a
/// key every builder would refuse.
pub fn parse_host_key(openssh: impl AsRef<[u8]>) -> Result<PrivateKey, HostKeyError> {
    let key = parse_private_key(openssh).map_err(HostKeyError::NotOpenSsh)?;
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(HostKeyError::NotEd25519(key.algorithm().to_string()));
    }
    if key.is_encrypted() {
        return Err(HostKeyError::Encrypted);
    }
    Ok(key)
}

/// The public key line nixpool pins and compares: `ssh-ed25519 AAAA...`, without a comment, so
/// one key has one line.
pub fn public_line_without_comment(key: &PublicKey) -> Result<String, ssh_key::Error> {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh()
}

/// A public key line (`ssh-ed25519 AAAA... comment`); `Err` holds the parser's reason.
pub fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(line.trim()).map_err(|e| e.to_string())
}

/// `SHA256:...` of a public key line, as ssh prints it; `None` when it is no public key.
pub fn fingerprint(line: &str) -> Option<String> {
    parse_public_key(line)
        .ok()
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
}

/// One `authorized_keys` line: the key with its options (`from="10.0.0.0/8" ssh-ed25519 ...`)
/// or without. A line read as a bare key first, so a comment with spaces is not taken for
/// options. `Err` holds the parser's reason.
pub fn parse_authorized_line(line: &str) -> Result<Entry, String> {
    line.parse::<Entry>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 dev@laptop";
    /// `ssh-keygen -t ed25519 -N nixpool-test`: a key with a passphrase.
    const ENCRYPTED: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABBF7dReRT
giJeO5ZO6qFGLLAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIIr4dnzb+yldDcuJ
vVRdoQEiOoeaSS52ADo8RhnaTYG2AAAAkJBYz8LSu//L5FbyQuuOQPph4+rHWoK9LdcGLt
rjz/V5oelwQ8rb69mBFFiwUYKYFNkp+L3Ks8cUFBZY14Gl4Ao+vRgG0DOUoetejKFXT2KR
rXgEhDS5//oKL1TUgu/qxwi/ZQ/z387tYuE3+SOnwastL9tu/xsVouYD57mk+kArw69Q1Y
jP27/IV/GADcOXbg==
-----END OPENSSH PRIVATE KEY-----
";

    #[test]
    fn a_generated_key_reads_back_and_pins_one_line() {
        let key = generate_ed25519().unwrap();
        let text = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let again = parse_unencrypted_private_key(text.as_bytes()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let line = public_line_without_comment(key.public_key()).unwrap();
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert_eq!(line.split(' ').count(), 2, "no comment: {line}");
    }

    #[test]
    fn a_passphrase_is_read_but_refused_for_unattended_use() {
        let key = parse_private_key(ENCRYPTED).unwrap();
        assert!(key.is_encrypted());
        assert_eq!(
            parse_unencrypted_private_key(ENCRYPTED),
            Err(PrivateKeyError::Encrypted)
        );
        let err = parse_unencrypted_private_key("hello").unwrap_err();
        assert!(err.to_string().starts_with("not an OpenSSH private key ("), "{err}");
    }

    #[test]
    fn public_lines_fingerprints_and_authorized_lines() {
        let key = parse_public_key(PUBLIC).unwrap();
        assert_eq!(
            public_line_without_comment(&key).unwrap(),
            PUBLIC.trim_end_matches(" dev@laptop")
        );
        let fp = fingerprint(PUBLIC).unwrap();
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(fingerprint(&PUBLIC.replace("dev@laptop", "other")), Some(fp));
        assert_eq!(fingerprint("not a key"), None);

        let with_options = parse_authorized_line(&format!("from=\"10.0.0.0/8\",no-pty {PUBLIC}")).unwrap();
        assert_eq!(with_options.public_key(), &key);
        assert_eq!(with_options.config_opts().iter().count(), 2);
        // A comment with spaces is a comment, not options.
        let spaced = parse_authorized_line(&format!("{PUBLIC} on my laptop")).unwrap();
        assert_eq!(spaced.config_opts().iter().count(), 0);
        assert!(parse_authorized_line("not a key").is_err());
    }
}
