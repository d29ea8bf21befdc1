//! Which client keys may log in: the pool's authorized-keys file (the `<pool>-authorized-keys`
//! ConfigMap the operator keeps), read at every login, so a revoked key stops at once.

use nixpool_api::ssh_keys;
use russh::keys::PublicKey;

/// Whether `key` is the key of a line of `authorized_keys`, read as sshd reads it (options
/// before the key allowed; a comment, or a key's text inside one, is not a key). Lines that do
/// not parse authorize nobody.
pub fn authorized(authorized_keys: &str, key: &PublicKey) -> bool {
    // russh has its own copy of the ssh-key crate: compare the keys' one-line forms.
    let Ok(wanted) = key.to_openssh() else {
        return false;
    };
    let Ok(wanted) = ssh_keys::parse_public_key(&wanted) else {
        return false;
    };
    authorized_keys
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| ssh_keys::parse_authorized_line(l).ok())
        .any(|entry| entry.public_key().key_data() == wanted.key_data())
}

/// What the logs call a client: its key's SHA-256 fingerprint and comment-free algorithm.
pub fn label(key: &PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0 alice";
    const BOB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qB bob";

    #[test]
    fn a_key_logs_in_only_while_it_is_listed() {
        let alice = PublicKey::from_openssh(ALICE).unwrap();
        let bob = PublicKey::from_openssh(BOB).unwrap();
        let file = format!("# team\nfrom=\"10.0.0.0/8\" {ALICE}\n");
        assert!(authorized(&file, &alice));
        assert!(!authorized(&file, &bob));
        assert!(!authorized("", &alice));
        assert!(!authorized(&format!("# {ALICE}\n"), &alice), "a comment is not a key");
        assert!(label(&alice).starts_with("SHA256:"));
    }

    #[test]
    fn a_key_quoted_in_another_lines_comment_does_not_log_in() {
        let alice = PublicKey::from_openssh(ALICE).unwrap();
        let bob_says_alice = format!("{BOB} was {ALICE}\n");
        assert!(!authorized(&bob_says_alice, &alice));
        assert!(authorized(&bob_says_alice, &PublicKey::from_openssh(BOB).unwrap()));
        assert!(
            !authorized("ssh-ed25519 garbage\n", &alice),
            "a line that does not parse"
        );
    }
}
