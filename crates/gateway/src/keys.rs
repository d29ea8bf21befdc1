//! Which client keys may log in: the pool's authorized-keys file (the `<pool>-authorized-keys`
//! ConfigMap the operator keeps), read at every login, so a revoked key stops at once.

use russh::keys::PublicKey;

/// Whether `key` is on a line of `authorized_keys` (options before the key are allowed; only
/// the key itself is compared).
pub fn authorized(authorized_keys: &str, key: &PublicKey) -> bool {
    let Ok(line) = key.to_openssh() else {
        return false;
    };
    let mut parts = line.split_whitespace();
    let (Some(algorithm), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    authorized_keys
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|l| {
            let tokens: Vec<&str> = l.split_whitespace().collect();
            tokens.windows(2).any(|w| w[0].ends_with(algorithm) && w[1] == blob)
        })
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
}
