//! The `/etc/nix/machines` line: one remote builder per line, up to 8 space-separated columns
//! (`-` for an empty one):
//!
//! ```text
//! URI  SYSTEMS  SSH-KEY  MAX-JOBS  SPEED-FACTOR  SUPPORTED-FEATURES  MANDATORY-FEATURES  HOST-KEY
//! ssh-ng://builder@nbp.example.com x86_64-linux /etc/nix/nixpool_ed25519 8 1 big-parallel - c3NoLWVk...
//! ```
//!
//! Lists are comma-separated; the host key is the base64 of the OpenSSH public key line, so Nix
//! pins it without a `known_hosts` entry.
//!
//! How Nix reads the file (`src/libstore/machines.cc`, Nix 2.8 to 2.2x): lines end at `\n` *or*
//! `;`; each is trimmed and cut at its first `#`; a line starting with `@` includes another file;
//! columns are split at space, tab, CR and LF (nothing else); `-` or a missing column is empty;
//! lists are split at `,` with empty items dropped. [`parse_file`] reads a file that way, and
//! [`MachinesEntry::problems`] names every field that would not survive it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::fmt;
use std::str::FromStr;

/// One machines-file line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachinesEntry {
    /// Store URI, e.g. `ssh-ng://builder@host` or `ssh://builder@host`.
    pub uri: String,
    /// Systems built there, e.g. `x86_64-linux`.
    pub systems: Vec<String>,
    /// Path of the SSH private key on the client; `None` is `-` (ssh's default identity).
    pub ssh_key: Option<String>,
    pub max_jobs: u32,
    pub speed_factor: u32,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    /// The host's OpenSSH public key line (`ssh-ed25519 AAAA...`), not base64: the formatter
    /// encodes it and the parser decodes it.
    pub host_public_key: Option<String>,
}

/// Why a line is not a machines entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the line is empty or a comment")]
    Empty,
    #[error("column {column} ({name}): {value:?} is not a whole number")]
    NotANumber {
        column: usize,
        name: &'static str,
        value: String,
    },
    #[error("column 8 (host key): {0}")]
    HostKey(String),
    #[error("the line has {0} columns; a machines line has at most 8")]
    TooManyColumns(usize),
    #[error("column 1 (store URI) is `-`: Nix needs a store URI there, e.g. ssh-ng://builder@host")]
    NoUri,
    #[error("`@{0}` includes another machines file; builderctl does not follow includes")]
    Include(String),
}

/// The characters Nix splits a machines line into columns at (its `tokenizeString` default);
/// no other whitespace splits.
pub const NIX_COLUMN_SEPARATORS: [char; 4] = [' ', '\t', '\n', '\r'];

/// Why `value` cannot be one column, or one item of a list column, of a machines line, if it
/// cannot: Nix would split it, cut it or read it as empty. The one rule for every column.
pub fn column_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("it is empty")
    } else if value == "-" {
        Some("it is `-`, which Nix reads as an empty column")
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it holds whitespace or a control character, where Nix splits a machines line")
    } else if value.contains('#') {
        Some("it holds `#`, where Nix cuts a machines line as a comment")
    } else if value.contains(';') {
        Some("it holds `;`, where Nix splits a machines line")
    } else if value.contains(',') {
        Some("it holds `,`, which separates systems and features")
    } else {
        None
    }
}

/// Reads a machines file as Nix does (see the module doc): one result per machine, in order;
/// blank and comment-only lines give none.
pub fn parse_file(text: &str) -> Vec<Result<MachinesEntry, ParseError>> {
    text.split(['\n', ';'])
        .filter_map(|line| match MachinesEntry::parse(line) {
            Err(ParseError::Empty) => None,
            r => Some(r),
        })
        .collect()
}

impl MachinesEntry {
    /// `ssh-ng://user@host[:port]`. The port is left out when it is 22 so that Nix versions that
    /// take no port in the URI still parse the line; for another port with such a version use an
    /// ssh_config `Host` block (`builderctl ssh-config`).
    pub fn ssh_ng_uri(user: &str, host: &str, port: u16) -> String {
        StoreUri {
            scheme: "ssh-ng".into(),
            user: Some(user.into()),
            host: host.into(),
            port: (port != 22).then_some(port),
        }
        .to_string()
    }

    /// The host key column: base64 of the public key line.
    pub fn host_key_column(&self) -> String {
        match &self.host_public_key {
            Some(k) => STANDARD.encode(k.trim()),
            None => "-".into(),
        }
    }

    /// What in this entry would not read back from its line as written, as (field, problem with
    /// the fix). Empty: [`parse_file`] of the line gives exactly this entry.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut column = |field: &'static str, value: &str| {
            if let Some(why) = column_problem(value) {
                out.push((field, format!("{value:?}: {why}")));
            }
        };
        column("uri", &self.uri);
        if let Some(k) = &self.ssh_key {
            column("sshKey", k);
        }
        for (field, list) in [
            ("systems", &self.systems),
            ("supportedFeatures", &self.supported_features),
            ("mandatoryFeatures", &self.mandatory_features),
        ] {
            for item in list {
                column(field, item);
            }
        }
        if self.uri.starts_with('@') {
            out.push((
                "uri",
                format!("{:?}: a line starting with `@` includes a file", self.uri),
            ));
        }
        // Nix hands the decoded key to ssh as a known_hosts line: one trimmed line, or ssh would
        // trust a second key.
        if let Some(k) = &self.host_public_key
            && (k.is_empty() || k.trim() != k || k.chars().any(char::is_control))
        {
            out.push((
                "hostPublicKey",
                format!(
                    "{k:?} is empty, has surrounding whitespace or a line break: give the one line of the .pub file"
                ),
            ));
        }
        out
    }

    /// Parses one line as Nix splits them (at `\n` and `;`, see [`parse_file`]). Comments (`#`
    /// to end of line) are ignored; missing trailing columns get Nix's defaults (1 job, speed 1,
    /// no features).
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let content = line.split('#').next().unwrap_or("");
        let cols: Vec<&str> = content.split(NIX_COLUMN_SEPARATORS).filter(|c| !c.is_empty()).collect();
        if cols.is_empty() {
            return Err(ParseError::Empty);
        }
        if cols[0].starts_with('@') {
            let path = content.trim_matches(NIX_COLUMN_SEPARATORS)[1..].trim_matches(NIX_COLUMN_SEPARATORS);
            return Err(ParseError::Include(path.to_string()));
        }
        if cols[0] == "-" {
            return Err(ParseError::NoUri);
        }
        if cols.len() > 8 {
            return Err(ParseError::TooManyColumns(cols.len()));
        }
        let col = |i: usize| cols.get(i).copied().filter(|c| *c != "-" && !c.is_empty());
        let list = |i: usize| -> Vec<String> {
            col(i)
                .map(|c| c.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
                .unwrap_or_default()
        };
        let number = |i: usize, name: &'static str| -> Result<u32, ParseError> {
            match col(i) {
                None => Ok(1),
                Some(v) => v.parse().map_err(|_| ParseError::NotANumber {
                    column: i + 1,
                    name,
                    value: v.into(),
                }),
            }
        };
        let host_public_key = match col(7) {
            None => None,
            Some(b64) => {
                let bytes = STANDARD
                    .decode(b64)
                    .map_err(|e| ParseError::HostKey(format!("not base64 ({e})")))?;
                let text = String::from_utf8(bytes).map_err(|_| ParseError::HostKey("not a text public key".into()))?;
                Some(text.trim().to_string())
            }
        };
        Ok(Self {
            uri: cols[0].to_string(),
            systems: list(1),
            ssh_key: col(2).map(str::to_string),
            max_jobs: number(3, "max jobs")?,
            speed_factor: number(4, "speed factor")?,
            supported_features: list(5),
            mandatory_features: list(6),
            host_public_key,
        })
    }
}

impl fmt::Display for MachinesEntry {
    /// All 8 columns, `-` for the empty ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
        write!(
            f,
            "{} {} {} {} {} {} {} {}",
            self.uri,
            list(&self.systems),
            self.ssh_key.as_deref().unwrap_or("-"),
            self.max_jobs,
            self.speed_factor,
            list(&self.supported_features),
            list(&self.mandatory_features),
            self.host_key_column()
        )
    }
}

/// The parts of a machines line's store URI (`ssh-ng://user@host:port`) that ssh needs.
///
/// Read leniently, as Nix and ssh take them: no scheme means `ssh`, a query (`?ssh-key=..`) is
/// ignored, the user is all before the last `@`, a port that is not a number is no port, and an
/// IPv6 host is written in brackets (`[2001:db8::1]:2222`; bare, it has no port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUri {
    pub scheme: String,
    pub user: Option<String>,
    /// Without brackets, also for IPv6.
    pub host: String,
    pub port: Option<u16>,
}

/// Why a store URI cannot be taken apart.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreUriError {
    #[error(
        "{0:?}: the IPv6 host has no closing `]`; write it as ssh-ng://user@[2001:db8::1]:2222 (builderctl machines-file does)"
    )]
    UnclosedBracket(String),
}

impl StoreUri {
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

    /// `host[:port]` as a URI writes it: an IPv6 address in brackets.
    pub fn host_and_port(&self) -> String {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }
}

impl FromStr for StoreUri {
    type Err = StoreUriError;

    fn from_str(uri: &str) -> Result<Self, StoreUriError> {
        let (scheme, rest) = uri.split_once("://").unwrap_or(("ssh", uri));
        let rest = rest.split('?').next().unwrap_or(rest);
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h
                .split_once(']')
                .ok_or_else(|| StoreUriError::UnclosedBracket(uri.to_string()))?;
            (h.to_string(), after.strip_prefix(':').and_then(|p| p.parse().ok()))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
                _ => (hostport.to_string(), None),
            }
        };
        Ok(StoreUri {
            scheme: scheme.into(),
            user,
            host,
            port,
        })
    }
}

impl fmt::Display for StoreUri {
    /// `scheme://[user@]host[:port]`, the host in brackets when it is IPv6.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        write!(f, "{}", self.host_and_port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> MachinesEntry {
        MachinesEntry {
            uri: "ssh-ng://builder@nbp.example.com".into(),
            systems: vec!["x86_64-linux".into(), "i686-linux".into()],
            ssh_key: Some("/etc/nix/nixpool_ed25519".into()),
            max_jobs: 8,
            speed_factor: 2,
            supported_features: vec!["big-parallel".into(), "benchmark".into()],
            mandatory_features: vec![],
            host_public_key: Some(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0".into(),
            ),
        }
    }

    #[test]
    fn formats_all_eight_columns() {
        let line = entry().to_string();
        let cols: Vec<&str> = line.split(' ').collect();
        assert_eq!(cols.len(), 8);
        assert_eq!(cols[1], "x86_64-linux,i686-linux");
        assert_eq!(cols[6], "-");
        assert_eq!(
            String::from_utf8(STANDARD.decode(cols[7]).unwrap()).unwrap(),
            entry().host_public_key.unwrap()
        );
    }

    #[test]
    fn round_trips() {
        let e = entry();
        assert_eq!(MachinesEntry::parse(&e.to_string()).unwrap(), e);
        let bare = MachinesEntry {
            ssh_key: None,
            supported_features: vec![],
            host_public_key: None,
            ..entry()
        };
        assert_eq!(MachinesEntry::parse(&bare.to_string()).unwrap(), bare);
    }

    #[test]
    fn parses_short_lines_with_nix_defaults_and_comments() {
        let e = MachinesEntry::parse("ssh://me@box x86_64-linux  # my old box").unwrap();
        assert_eq!(e.uri, "ssh://me@box");
        assert_eq!(e.max_jobs, 1);
        assert_eq!(e.speed_factor, 1);
        assert_eq!(e.ssh_key, None);
        assert_eq!(MachinesEntry::parse("   # only a comment"), Err(ParseError::Empty));
    }

    #[test]
    fn rejects_bad_columns_by_number() {
        assert_eq!(
            MachinesEntry::parse("ssh://a x86_64-linux - many"),
            Err(ParseError::NotANumber {
                column: 4,
                name: "max jobs",
                value: "many".into()
            })
        );
        assert!(matches!(
            MachinesEntry::parse("ssh://a x - 1 1 - - !!notbase64"),
            Err(ParseError::HostKey(_))
        ));
        assert!(matches!(
            MachinesEntry::parse("a b c d e f g h i"),
            Err(ParseError::TooManyColumns(9))
        ));
    }

    #[test]
    fn uri_leaves_out_port_22_and_brackets_ipv6() {
        assert_eq!(MachinesEntry::ssh_ng_uri("builder", "h", 22), "ssh-ng://builder@h");
        assert_eq!(
            MachinesEntry::ssh_ng_uri("builder", "h", 2222),
            "ssh-ng://builder@h:2222"
        );
        assert_eq!(MachinesEntry::ssh_ng_uri("b", "fd00::1", 22), "ssh-ng://b@[fd00::1]");
    }

    fn uri(scheme: &str, user: Option<&str>, host: &str, port: Option<u16>) -> StoreUri {
        StoreUri {
            scheme: scheme.into(),
            user: user.map(Into::into),
            host: host.into(),
            port,
        }
    }

    #[test]
    fn store_uri_parses_the_uris_machines_lines_hold() {
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
            assert_eq!(text.parse::<StoreUri>().as_ref(), Ok(&want), "{text}");
        }
        let err = "ssh-ng://b@[2001:db8::1:22".parse::<StoreUri>().unwrap_err();
        assert_eq!(err, StoreUriError::UnclosedBracket("ssh-ng://b@[2001:db8::1:22".into()));
        assert!(err.to_string().contains("no closing `]`; write it as"), "{err}");
    }

    #[test]
    fn store_uri_ssh_destination_and_known_hosts_name() {
        let u: StoreUri = "ssh-ng://builder@192.0.2.10:2222".parse().unwrap();
        assert_eq!(u.destination(), "builder@192.0.2.10");
        assert_eq!(u.known_hosts_name(), "[192.0.2.10]:2222");
        let u: StoreUri = "ssh-ng://h:22".parse().unwrap();
        assert_eq!((u.destination().as_str(), u.known_hosts_name().as_str()), ("h", "h"));
        assert_eq!(
            "ssh://[::1]:2200".parse::<StoreUri>().unwrap().known_hosts_name(),
            "[::1]:2200"
        );
    }

    #[test]
    fn store_uri_writes_what_it_reads() {
        for text in [
            "ssh-ng://builder@192.0.2.10:2222",
            "ssh://root@mac.example",
            "ssh-ng://b@[2001:db8::1]:22",
            "ssh-ng://[2001:db8::1]",
            "ssh://a@b@h",
        ] {
            assert_eq!(text.parse::<StoreUri>().unwrap().to_string(), text);
        }
        // What is dropped on reading is not written back.
        assert_eq!("h:ssh".parse::<StoreUri>().unwrap().to_string(), "ssh://h");
        assert_eq!(
            "ssh-ng://b@h?ssh-key=/k".parse::<StoreUri>().unwrap().to_string(),
            "ssh-ng://b@h"
        );
    }
}
