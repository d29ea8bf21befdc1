//! Property test of the authorized-keys content the operator writes (issue 14, goal 7;
//! docs/reliability.md §7). The agent's side (each line read as sshd reads it, with the forced
//! command) is `crates/agent/src/props.rs`. `NIXPOOL_LONG=1` runs 50 times as many cases.

use nixpool_api::rules;
use nixpool_operator::authorized_keys::AuthorizedKeys;
use proptest::prelude::*;

fn config(ci_cases: u32) -> ProptestConfig {
    let long = std::env::var("NIXPOOL_LONG").is_ok_and(|v| v == "1");
    ProptestConfig {
        cases: if long { ci_cases * 50 } else { ci_cases },
        ..ProptestConfig::default()
    }
}

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0";

/// A line of a team's ConfigMap or of `spec.ssh.authorizedKeys`: keys with options real and
/// hostile, comments, noise, stray CRs.
fn key_line() -> impl Strategy<Value = String> {
    let option = prop_oneof![
        Just("from=\"10.0.0.0/8\"".to_string()),
        Just("command=\"/bin/sh\"".to_string()),
        Just("COMMAND=\"/bin/sh\"".to_string()),
        Just("cert-authority".to_string()),
        Just("environment=\"A=b\"".to_string()),
        "(from|expiry-time|command)=\"[a-z0-9 ,\"\\\\=/.*!\r-]{0,12}\"",
        "[ -~]{0,12}",
    ];
    prop_oneof![
        4 => (proptest::collection::vec(option, 0..4), "[ -~\r]{0,12}").prop_map(|(opts, comment)| {
            let opts = opts.join(",");
            format!("{opts}{}{KEY} {comment}", if opts.is_empty() { "" } else { " " })
        }),
        1 => "[ -~\t\r]{0,40}",
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    /// Property: whatever a spec or team ConfigMap holds, the authorized-keys content the
    /// operator writes is one key per line (no control character, so no second line), each a
    /// line the agent keeps with the same option rule (`rules::kept_key_options`), none with a
    /// command of its own, none twice; every other line is named as bad.
    #[test]
    fn the_operators_key_lines_are_single_keys_the_agent_keeps(
        lines in proptest::collection::vec((key_line(), any::<bool>()), 0..6),
    ) {
        let text: String = lines.iter().map(|(l, crlf)| format!("{l}{}", if *crlf { "\r\n" } else { "\n" })).collect();
        let mut keys = AuthorizedKeys::default();
        keys.add_text(&text, "ConfigMap team", "keys");
        let rendered = keys.render();
        let written: Vec<&str> = rendered.lines().collect();
        prop_assert_eq!(written.len(), keys.lines.len());
        let given = text.lines().filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#')).count();
        prop_assert!(written.len() + keys.bad.len() <= given);
        for line in &written {
            prop_assert!(!line.chars().any(char::is_control), "{line:?}");
            let options = rules::key_options(line).map_err(|e| TestCaseError::fail(format!("{line:?}: {e}")))?;
            prop_assert!(!options.iter().any(|(name, _)| name == "command"), "{line:?}");
            prop_assert!(rules::kept_key_options(line).is_ok());
        }
        for bad in &keys.bad {
            prop_assert!(bad.origin.0.starts_with("ConfigMap team key keys line "), "{}", bad);
        }
    }
}
