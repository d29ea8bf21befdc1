//! The parts of a machines line's store URI (`ssh-ng://user@host:port`) that ssh needs.
//!
//! `darwin.rs` takes a URI apart too; issue 15 item 4 makes this one
//! `nixpool_api::machines::StoreUri` for both.

/// Scheme, user, host and port of a store URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUri {
    pub scheme: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl StoreUri {
    /// `None` when an IPv6 host has no closing `]`. No scheme means `ssh`; a query is ignored.
    pub fn parse(uri: &str) -> Option<StoreUri> {
        let (scheme, rest) = uri.split_once("://").unwrap_or(("ssh", uri));
        let rest = rest.split('?').next().unwrap_or(rest);
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h.split_once(']')?;
            (h.to_string(), after.strip_prefix(':').and_then(|p| p.parse().ok()))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
                _ => (hostport.to_string(), None),
            }
        };
        Some(StoreUri {
            scheme: scheme.into(),
            user,
            host,
            port,
        })
    }

    /// `user@host` as ssh takes it.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The known_hosts name Nix pins the host key under.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(scheme: &str, user: Option<&str>, host: &str, port: Option<u16>) -> StoreUri {
        StoreUri {
            scheme: scheme.into(),
            user: user.map(Into::into),
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_the_uris_machines_lines_hold() {
        let cases = [
            (
                "ssh-ng://builder@192.0.2.10:2222",
                uri("ssh-ng", Some("builder"), "192.0.2.10", Some(2222)),
            ),
            ("ssh://root@mac.example", uri("ssh", Some("root"), "mac.example", None)),
            ("host.example", uri("ssh", None, "host.example", None)),
            (
                "ssh-ng://b@[2001:db8::1]:22",
                uri("ssh-ng", Some("b"), "2001:db8::1", Some(22)),
            ),
            ("ssh-ng://[2001:db8::1]", uri("ssh-ng", None, "2001:db8::1", None)),
            // A bare IPv6 address has no port.
            ("ssh://2001:db8::1", uri("ssh", None, "2001:db8::1", None)),
            (
                "ssh-ng://b@h:2222?ssh-key=/k&compress=true",
                uri("ssh-ng", Some("b"), "h", Some(2222)),
            ),
            // An ssh_config alias; a user name with @ keeps all but the last.
            (
                "ssh-ng://builder@nixpool-builds-linux",
                uri("ssh-ng", Some("builder"), "nixpool-builds-linux", None),
            ),
            ("ssh://a@b@h", uri("ssh", Some("a@b"), "h", None)),
            // A port that is not a number is no port.
            ("ssh://h:ssh", uri("ssh", None, "h", None)),
        ];
        for (text, want) in cases {
            assert_eq!(StoreUri::parse(text).as_ref(), Some(&want), "{text}");
        }
        assert_eq!(StoreUri::parse("ssh-ng://b@[2001:db8::1:22"), None);
    }

    #[test]
    fn ssh_destination_and_known_hosts_name() {
        let u = StoreUri::parse("ssh-ng://builder@192.0.2.10:2222").unwrap();
        assert_eq!(u.destination(), "builder@192.0.2.10");
        assert_eq!(u.known_hosts_name(), "[192.0.2.10]:2222");
        let u = StoreUri::parse("ssh-ng://h:22").unwrap();
        assert_eq!((u.destination().as_str(), u.known_hosts_name().as_str()), ("h", "h"));
        assert_eq!(
            StoreUri::parse("ssh://[::1]:2200").unwrap().known_hosts_name(),
            "[::1]:2200"
        );
    }
}
