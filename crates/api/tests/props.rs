//! Property tests of the formats nixpool-api owns (issue 14, goal 7; docs/reliability.md §7).
//! Case counts are for CI; `NIXPOOL_LONG=1` runs 50 times as many.

use nixpool_api::AgentConfig;
use nixpool_api::machines::{self, MachinesEntry, NIX_COLUMN_SEPARATORS, StoreUri};
use proptest::prelude::*;

fn config(ci_cases: u32) -> ProptestConfig {
    let long = std::env::var("NIXPOOL_LONG").is_ok_and(|v| v == "1");
    ProptestConfig {
        cases: if long { ci_cases * 50 } else { ci_cases },
        ..ProptestConfig::default()
    }
}

/// A column value: mostly what real entries hold, sometimes the characters Nix splits, cuts or
/// empties a column at, and other whitespace Nix does not split at.
fn value() -> BoxedStrategy<String> {
    prop_oneof![
        30 => safe_value(),
        1 => Just("-".to_string()),
        3 => "[a-z]{0,4}[ \t\r\n;#,@\u{a0}\u{b}\u{c}\u{85}\u{2028}\u{3000}-][a-z]{0,4}",
    ]
    .boxed()
}

/// What real entries hold: URIs, paths, systems, feature names.
fn safe_value() -> BoxedStrategy<String> {
    "[A-Za-z0-9_.+/:@\\[\\]-]{1,16}"
        .prop_filter("`-` alone is an empty column", |v| v != "-")
        .boxed()
}

fn entry() -> impl Strategy<Value = MachinesEntry> {
    entry_of(value())
}

fn entry_of(value: BoxedStrategy<String>) -> impl Strategy<Value = MachinesEntry> {
    let list = || proptest::collection::vec(value.clone(), 0..4);
    (
        (
            value.clone(),
            list(),
            proptest::option::of(value.clone()),
            any::<u32>(),
            any::<u32>(),
        ),
        (
            list(),
            list(),
            proptest::option::of(prop_oneof![
                "ssh-ed25519 [A-Za-z0-9+/]{8,68}( [a-z@.]{1,12})?",
                "[ \n]?ssh-ed25519 [A-Za-z0-9+/]{8}[\n\r ]?(\\* ssh-ed25519 [A-Z]{4})?",
            ]),
        ),
        any::<bool>(),
    )
        .prop_map(
            |((uri, systems, ssh_key, max_jobs, speed_factor), (supported, mandatory, host_key), scheme)| {
                MachinesEntry {
                    uri: if scheme { format!("ssh-ng://{uri}") } else { uri },
                    systems,
                    ssh_key,
                    max_jobs,
                    speed_factor,
                    supported_features: supported,
                    mandatory_features: mandatory,
                    host_public_key: host_key,
                }
            },
        )
}

const ENTRY_FIELDS: [&str; 6] = [
    "uri",
    "systems",
    "sshKey",
    "supportedFeatures",
    "mandatoryFeatures",
    "hostPublicKey",
];

proptest! {
    #![proptest_config(config(4000))]

    /// Property: for any entry that `problems()` accepts, reading its rendered line the way Nix
    /// reads a machines file gives back exactly that entry, on one line of exactly 8 columns
    /// with no `;`, `#` or line break in it. Any entry it refuses is refused naming its field.
    #[test]
    fn a_valid_entry_reads_back_as_written_and_nothing_splits(e in entry()) {
        let problems = e.problems();
        if problems.is_empty() {
            let line = e.to_string();
            prop_assert!(!line.contains(['\n', '\r', ';', '#']), "{line:?}");
            let columns: Vec<&str> = line.split(NIX_COLUMN_SEPARATORS).collect();
            prop_assert_eq!(columns.len(), 8, "{:?}", line);
            prop_assert!(columns.iter().all(|c| !c.is_empty()), "{:?}", line);
            prop_assert_eq!(machines::parse_file(&line), vec![Ok(e.clone())]);
            // The host key Nix hands ssh is one known_hosts line.
            if let Some(k) = &e.host_public_key {
                prop_assert!(!k.contains(['\n', '\r']));
            }
        } else {
            for (field, problem) in &problems {
                prop_assert!(ENTRY_FIELDS.contains(field), "{field}");
                prop_assert!(!problem.is_empty());
            }
            // The refusal is not idle: something in the entry is indeed what Nix splits at, cuts
            // at, reads as empty, or would trust as a second host key.
            let column_values = std::iter::once(&e.uri)
                .chain(e.ssh_key.iter())
                .chain(e.systems.iter())
                .chain(e.supported_features.iter())
                .chain(e.mandatory_features.iter());
            let host_key_bad = e
                .host_public_key
                .as_ref()
                .is_some_and(|k| k.is_empty() || k.trim() != k || k.contains(['\n', '\r']));
            prop_assert!(
                host_key_bad
                    || e.uri.starts_with('@')
                    || column_values.into_iter().any(|v| v.is_empty()
                        || v == "-"
                        || v.contains(|c: char| c.is_whitespace() || c.is_control() || "#;,".contains(c))),
                "refused for nothing: {:?}", problems
            );
        }
    }

    /// Property: an entry of ordinary values (and a well-formed host key) is accepted and reads
    /// back as written: the rule refuses only what Nix would split.
    #[test]
    fn an_ordinary_entry_is_accepted_and_reads_back(e in entry_of(safe_value())) {
        let e = MachinesEntry {
            uri: if e.uri.starts_with('@') { format!("ssh-ng://{}", e.uri) } else { e.uri },
            host_public_key: e.host_public_key.map(|k| k.trim().replace(['\n', '\r'], "")),
            ..e
        };
        prop_assert_eq!(e.problems(), vec![]);
        prop_assert_eq!(machines::parse_file(&e.to_string()), vec![Ok(e)]);
    }

    /// Property: reading any text as a machines file never panics, and every entry it yields
    /// holds no column value Nix would split (the reader agrees with the rule).
    #[test]
    fn any_text_reads_without_panic_into_unsplittable_columns(
        text in "[a-z0-9 \t\r\n;#,@:/=+-]{0,120}",
    ) {
        for entry in machines::parse_file(&text).into_iter().flatten() {
            for v in std::iter::once(&entry.uri).chain(entry.ssh_key.iter()).chain(entry.systems.iter()) {
                prop_assert!(!v.contains([' ', '\t', '\r', '\n', ';', '#']), "{v:?} from {text:?}");
            }
        }
    }
}

/// A valid agent config document, as the operator writes it.
fn valid_document() -> String {
    r#"{
  "pool": "p", "builderUser": "builder", "maxJobs": 4, "cores": 2,
  "systems": ["x86_64-linux"], "supportedFeatures": ["big-parallel"],
  "sshPort": 22, "healthPort": 8090, "substituters": ["https://cache.example"],
  "trustedPublicKeys": ["cache.example-1:abc="], "minFreeBytes": 100,
  "extraNixConfig": {"connect-timeout": "5"},
  "push": [{"kind": "cachix", "cache": "c", "tokenFile": "/t"}],
  "drainTimeoutSeconds": 60
}"#
    .to_string()
}

/// What the agent does with the bytes of its config file: the document or a message.
fn read_config(bytes: &[u8]) -> Result<AgentConfig, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    AgentConfig::from_json(text).map_err(|e| e.to_string())
}

/// A message says where the document is wrong: serde_json names the line and column of the
/// fault, and the field when it is missing, unknown or of the wrong kind.
fn says_where(message: &str) -> bool {
    message.starts_with("not UTF-8") || (message.contains(" line ") && message.contains(" column "))
}

proptest! {
    #![proptest_config(config(3000))]

    /// Property: any bytes as the agent config give the document or an error that says where
    /// it is wrong; never a panic. A document that parses is checked (`problems`) without panic
    /// and writes back to itself.
    #[test]
    fn any_bytes_give_a_config_or_a_clear_error(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        match read_config(&bytes) {
            Ok(c) => {
                let _ = c.problems();
                prop_assert_eq!(AgentConfig::from_json(&c.to_json()).unwrap(), c);
            }
            Err(m) => prop_assert!(says_where(&m), "{m}"),
        }
    }

    /// Property: a valid document with bytes deleted, inserted or replaced (truncations, stray
    /// quotes and braces, invalid UTF-8, a field's value swapped for another kind) gives the
    /// document or an error that says where; never a panic.
    #[test]
    fn an_edited_document_gives_a_config_or_a_clear_error(
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), 0u8..3, prop_oneof![
            any::<u8>(),
            proptest::sample::select(b"{}[]\",:0-9en\\\x00\xff".to_vec()),
        ]), 1..6),
    ) {
        let mut bytes = valid_document().into_bytes();
        for (at, op, b) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 => bytes.insert(i, b),
                1 if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ if i < bytes.len() => bytes[i] = b,
                _ => bytes.push(b),
            }
        }
        match read_config(&bytes) {
            Ok(c) => {
                let _ = c.problems();
            }
            Err(m) => prop_assert!(says_where(&m), "{m}"),
        }
    }

    /// Property: any field replaced by any JSON value: the document or an error naming where.
    #[test]
    fn any_field_of_any_kind_gives_a_config_or_a_clear_error(
        field in proptest::sample::select(vec![
            "pool", "builderUser", "maxJobs", "cores", "systems", "supportedFeatures",
            "mandatoryFeatures", "sshPort", "healthPort", "substituters", "trustedPublicKeys",
            "minFreeBytes", "maxFreeBytes", "extraNixConfig", "push", "drainTimeoutSeconds", "unknown",
        ]),
        value in prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "[a-z \n]{0,8}".prop_map(serde_json::Value::from),
            proptest::collection::vec("[a-z]{0,4}", 0..3).prop_map(serde_json::Value::from),
            Just(serde_json::json!({"kind": "attic"})),
            Just(serde_json::json!([{"kind": "nope"}])),
        ],
        remove in any::<bool>(),
    ) {
        let mut doc: serde_json::Value = serde_json::from_str(&valid_document()).unwrap();
        if remove {
            doc.as_object_mut().unwrap().remove(field);
        } else {
            doc[field] = value;
        }
        match read_config(doc.to_string().as_bytes()) {
            Ok(c) => {
                let _ = c.problems();
            }
            Err(m) => {
                prop_assert!(says_where(&m), "{m}");
                if remove {
                    prop_assert!(m.contains(&format!("missing field `{field}`")), "{m}");
                }
                if field == "unknown" {
                    prop_assert!(m.contains("unknown field `unknown`"), "{m}");
                }
            }
        }
    }
}

/// A store URI as machines lines hold them: a name, an IPv4 or an IPv6 host, with or without a
/// user and a port.
fn store_uri() -> impl Strategy<Value = StoreUri> {
    let host = prop_oneof![
        "[a-z][a-z0-9-]{0,12}(\\.[a-z][a-z0-9-]{0,8}){0,2}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        "[0-9a-f]{1,4}(:[0-9a-f]{0,4}){2,6}",
    ];
    (
        prop_oneof![Just("ssh-ng"), Just("ssh")],
        proptest::option::of("[a-z_][a-z0-9_.@-]{0,8}"),
        host,
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(scheme, user, host, port)| StoreUri {
            scheme: scheme.into(),
            user,
            host,
            port,
        })
}

proptest! {
    #![proptest_config(config(3000))]

    /// Property: a store URI reads back from what it writes, IPv6 hosts and all.
    #[test]
    fn a_store_uri_reads_back_as_written(u in store_uri()) {
        prop_assert_eq!(u.to_string().parse::<StoreUri>(), Ok(u.clone()));
    }

    /// Property: any text gives a store URI or an error that quotes it; never a panic.
    #[test]
    fn any_text_gives_a_store_uri_or_a_clear_error(text in "[a-z0-9:@/\\[\\]?.-]{0,24}") {
        if let Err(e) = text.parse::<StoreUri>() {
            prop_assert!(e.to_string().contains(&format!("{text:?}")), "{}", e);
        }
    }
}
