//! Property tests of the config files the agent writes (issue 14, goal 7; docs/reliability.md
//! §7): `authorized_keys`, nix.conf and sshd_config, each read back with a parser that follows
//! the reading program (OpenSSH's `auth-options.c`, Nix's `config.cc`, sshd's `servconf.c`).
//! Case counts are for CI; `NIXPOOL_LONG=1` runs 50 times as many.

use std::collections::BTreeMap;

use nixpool_api::AgentConfig;
use proptest::prelude::*;

use crate::nixconf::{self, Host};
use crate::ssh::{self, SshdSettings};

fn config(ci_cases: u32) -> ProptestConfig {
    let long = std::env::var("NIXPOOL_LONG").is_ok_and(|v| v == "1");
    ProptestConfig {
        cases: if long { ci_cases * 50 } else { ci_cases },
        ..ProptestConfig::default()
    }
}

// ---- authorized_keys ----

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbOkOOzoWy8fLjOmJmbmT7K8GmeiE5XaH7Sik8y7Dm0";
/// The forced command as the agent builds it (paths of its own, not from a spec).
const COMMAND: &str = "/nix/store/abc-nixpool-agent/bin/nixpool-agent gate --daemon-socket /nix/var/nix/daemon-socket/socket --nix-store /nix/store/def-nix/bin/nix-store --slots-dir /run/nixpool/slots";

/// `name` and, for `name="value"`, the value.
type KeyOption = (String, Option<String>);

/// An `authorized_keys` line as sshd reads it: its options (`name` or `name="value"`, the
/// value unescaped as `opt_dequote` does: only `\"` is an escape) and the rest. `None`: sshd
/// would refuse the line.
fn sshd_key_line(line: &str) -> Option<(Vec<KeyOption>, String)> {
    let line = line.trim_start_matches([' ', '\t']);
    let first = line.split([' ', '\t']).next()?;
    if first.starts_with("ssh-") || first.starts_with("ecdsa-") || first.starts_with("sk-") {
        return Some((Vec::new(), line.to_string()));
    }
    let mut options = Vec::new();
    let mut rest = line;
    loop {
        let name_end = rest.find(['=', ',', ' ', '\t'])?;
        let name = rest[..name_end].to_ascii_lowercase();
        rest = &rest[name_end..];
        let value = if let Some(after) = rest.strip_prefix("=\"") {
            let mut v = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '\\') if after[i + 1..].starts_with('"') => {
                        chars.next();
                        v.push('"');
                    }
                    (i, '"') => break i,
                    (_, c) => v.push(c),
                }
            };
            rest = &after[end + 1..];
            Some(v)
        } else if rest.starts_with('=') {
            return None;
        } else {
            None
        };
        options.push((name, value));
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if rest.starts_with([' ', '\t']) {
            return Some((options, rest.trim_start_matches([' ', '\t']).to_string()));
        } else {
            return None;
        }
    }
}

/// One option of a user's key line: what real lines hold and what an attacker would try.
fn key_option() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("from=\"10.0.0.0/8\"".to_string()),
        Just("expiry-time=\"20270101\"".to_string()),
        Just("verify-required".to_string()),
        Just("no-pty".to_string()),
        Just("restrict".to_string()),
        Just("cert-authority".to_string()),
        Just("permitopen=\"localhost:22\"".to_string()),
        Just("environment=\"LD_PRELOAD=/tmp/x\"".to_string()),
        Just("command=\"/bin/sh\"".to_string()),
        Just("principals=\"root\"".to_string()),
        "(from|expiry-time|command|FROM)=\"[a-z0-9 ,\"\\\\=/.*!-]{0,16}\"",
        "(from|expiry-time)=\"[a-z0-9.]{0,6}\\\\\" ,command=\"/bin/sh\"",
        "from=\"[a-z0-9.]{1,6}\" (command|cert-authority)[=\"a-z/]{0,8}",
        "[a-z-]{1,12}(=\"[ -~]{0,10}\")?",
        "[ -~]{0,12}",
    ]
}

/// One line of the authorized-keys ConfigMap: a key with options and a comment, or noise.
fn key_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (proptest::collection::vec(key_option(), 0..4), "[ \t]{0,2}", "[ -~]{0,16}").prop_map(|(opts, ws, comment)| {
            let opts = opts.join(",");
            let sep = if opts.is_empty() { "" } else { " " };
            format!("{ws}{opts}{sep}{KEY} {comment}")
        }),
        1 => "[ -~\t]{0,40}",
        1 => Just(format!("{KEY} comment\rwith a CR")),
        1 => Just(format!("from=\"a\"\r{KEY}")),
    ]
}

const KEPT: [&str; 3] = ["from", "expiry-time", "verify-required"];

proptest! {
    #![proptest_config(config(3000))]

    /// Property: whatever a team's ConfigMap holds, every line the agent writes to
    /// `authorized_keys` reads, as sshd reads it, as `restrict`, then exactly the agent's forced
    /// command, then only options that narrow who may log in (`from`, `expiry-time`,
    /// `verify-required`), then one key; no line holds a control character (no second line);
    /// and no input line gives more than one output line.
    #[test]
    fn no_key_line_can_inject_an_option_or_a_line(lines in proptest::collection::vec((key_line(), any::<bool>()), 0..6)) {
        let text: String = lines.iter().map(|(l, crlf)| format!("{l}{}", if *crlf { "\r\n" } else { "\n" })).collect();
        let (out, bad) = ssh::render_authorized_keys(&text, COMMAND);
        let written: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        let given = text.lines().filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#')).count();
        prop_assert_eq!(written.len() + bad.len(), given, "{:?}", out);
        for line in written {
            prop_assert!(!line.chars().any(char::is_control), "{line:?}");
            let (options, rest) = sshd_key_line(line).ok_or_else(|| TestCaseError::fail(format!("sshd cannot read {line:?}")))?;
            prop_assert_eq!(&options[0], &("restrict".to_string(), None));
            prop_assert_eq!(&options[1], &("command".to_string(), Some(COMMAND.to_string())));
            for (name, _) in &options[2..] {
                prop_assert!(KEPT.contains(&name.as_str()), "{name} in {line:?}");
            }
            prop_assert!(ssh_key::PublicKey::from_openssh(&rest).is_ok(), "{rest:?}");
        }
    }

    /// Property: any forced command (printable, not ending in `\`, which `opt_dequote` would
    /// read as an escaped closing quote) reaches sshd unchanged: quotes and backslashes included.
    #[test]
    fn the_forced_command_reaches_sshd_as_written(command in "[ -~]{0,40}[ -\\[\\]-~]") {
        let (out, _) = ssh::render_authorized_keys(&format!("{KEY} a@b\n"), &command);
        let line = out.lines().find(|l| !l.starts_with('#')).expect("one key line");
        let (options, _) = sshd_key_line(line).ok_or_else(|| TestCaseError::fail(format!("sshd cannot read {line:?}")))?;
        prop_assert_eq!(&options[1], &("command".to_string(), Some(command.clone())));
    }
}

// ---- nix.conf ----

/// nix.conf as Nix reads it (`config.cc`, `applyConfig`): per line, cut at `#`, split at
/// space/tab/CR/LF, `name = value...` with the value's words joined by one space. `Err`: Nix
/// refuses the file (an `include` line, or a line that is no setting), so nix-daemon would not
/// start.
fn nix_conf_settings(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        let line = line.split('#').next().unwrap_or_default();
        let tokens: Vec<&str> = line.split([' ', '\t', '\r', '\n']).filter(|t| !t.is_empty()).collect();
        if tokens.is_empty() {
            continue;
        }
        if tokens.len() < 2 || tokens[0] == "include" || tokens[0] == "!include" || tokens[1] != "=" {
            return Err(format!("illegal configuration line {line:?}"));
        }
        out.push((tokens[0].to_string(), tokens[2..].join(" ")));
    }
    Ok(out)
}

/// A spec string: mostly ordinary, sometimes with what nix.conf splits, cuts or breaks at.
fn spec_string() -> BoxedStrategy<String> {
    prop_oneof![
        8 => "[a-z0-9:/._+=-]{1,12}",
        2 => "[a-z]{0,4}[ \t\r\n#=\u{b}\u{a0}][a-z]{0,4}",
    ]
    .boxed()
}

fn setting_name() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[a-z][a-z0-9-]{0,14}",
        1 => proptest::sample::select(vec!["include", "!include", "extra-include", "builders", "extra-trusted-users"]).prop_map(String::from),
        1 => "[a-z]{1,4}[ =#!\n][a-z]{0,3}",
    ]
    .boxed()
}

fn agent_config() -> impl Strategy<Value = AgentConfig> {
    let list = || proptest::collection::vec(spec_string(), 0..3);
    (
        (list(), list(), list(), list(), list()),
        proptest::collection::btree_map(
            setting_name(),
            prop_oneof![3 => spec_string(), 1 => "[a-z ]{0,12}"],
            0..4,
        ),
        (any::<u32>(), any::<u32>(), any::<Option<u64>>(), any::<Option<u64>>()),
    )
        .prop_map(
            |((systems, supported, mandatory, substituters, keys), extra, (max_jobs, cores, min_free, max_free))| {
                let mut c = nixconf::tests::config();
                c.systems = systems;
                c.supported_features = supported;
                c.mandatory_features = mandatory;
                c.substituters = substituters;
                c.trusted_public_keys = keys;
                c.extra_nix_config = extra;
                c.max_jobs = max_jobs;
                c.cores = cores;
                c.min_free_bytes = min_free;
                c.max_free_bytes = max_free;
                c
            },
        )
}

/// The words of a value as Nix splits them, joined by one space.
fn nix_words(s: &str) -> String {
    s.split([' ', '\t', '\r', '\n'])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn words(list: &[String]) -> String {
    nix_words(&list.join(" "))
}

proptest! {
    #![proptest_config(config(3000))]

    /// Property: for any agent config the agent accepts (`problems()` empty, the rules the CRD
    /// and the operator share), the nix.conf it writes is one Nix reads, and reads as exactly
    /// the intended settings: each once, each with its intended words. Any config it refuses is
    /// refused naming a field.
    #[test]
    fn nix_conf_holds_exactly_the_intended_settings(c in agent_config(), kvm in any::<bool>()) {
        let problems = c.problems();
        if !problems.is_empty() {
            for (field, _) in &problems {
                prop_assert!(!field.is_empty());
            }
            return Ok(());
        }
        let host = Host { kvm, system: "x86_64-linux".into(), sandbox: "true".into(), post_build_hook: None };
        let text = nixconf::render(&c, &host);
        let read = nix_conf_settings(&text).map_err(|e| TestCaseError::fail(format!("{e} in\n{text}")))?;
        let mut intended: BTreeMap<String, String> = BTreeMap::new();
        let extra_platforms: Vec<String> = c.systems.iter().filter(|s| *s != &host.system).cloned().collect();
        for (k, v) in [
            ("build-users-group", nixpool_api::rules::BUILD_GROUP.to_string()),
            ("trusted-users", format!("root {}", c.builder_user)),
            ("max-jobs", c.max_jobs.to_string()),
            ("cores", c.cores.to_string()),
            ("sandbox", "true".into()),
            ("system-features", words(&nixconf::system_features(&c, kvm))),
            ("extra-platforms", words(&extra_platforms)),
            ("substituters", words(&c.substituters)),
            ("trusted-public-keys", words(&c.trusted_public_keys)),
            ("builders", String::new()),
        ] {
            intended.insert(k.into(), v);
        }
        if let Some(b) = c.min_free_bytes {
            intended.insert("min-free".into(), b.to_string());
        }
        if let Some(b) = c.max_free_bytes {
            intended.insert("max-free".into(), b.to_string());
        }
        for (k, v) in &c.extra_nix_config {
            prop_assert!(intended.insert(k.clone(), nix_words(v)).is_none(), "{k} set twice");
        }
        let mut got = BTreeMap::new();
        for (k, v) in read {
            prop_assert!(got.insert(k.clone(), v).is_none(), "{k} appears twice in\n{text}");
        }
        prop_assert_eq!(got, intended, "{}", text);
    }
}

// ---- sshd_config ----

/// sshd_config as sshd reads it (`servconf.c`): per line, `#` starts a comment line, the
/// keyword and its arguments split at whitespace.
fn sshd_settings(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split([' ', '\t']).filter(|w| !w.is_empty()).map(String::from);
            (words.next().unwrap_or_default().to_ascii_lowercase(), words.collect())
        })
        .collect()
}

proptest! {
    #![proptest_config(config(2000))]

    /// Property: for any builder user the rules accept and any port and max-jobs, sshd_config
    /// holds the same keywords each once, lets in exactly that user on exactly that port, and
    /// MaxStartups is three numbers that grow with max-jobs. A user the rules refuse is refused
    /// naming `builderUser`.
    #[test]
    fn sshd_config_lets_in_exactly_the_builder_user(
        user in prop_oneof!["[a-z_][a-z0-9_-]{0,30}", "[a-z_]{1,5}[ \t\n#,*?!@A-Z][a-z]{0,5}", Just("root".to_string())],
        port in 1u16..,
        max_jobs in any::<u32>(),
    ) {
        let mut c = nixconf::tests::config();
        c.builder_user = user.clone();
        c.ssh_port = port;
        c.health_port = port.wrapping_add(1).max(1);
        c.max_jobs = max_jobs.max(1);
        let problems = c.problems();
        if let Some(p) = nixpool_api::rules::builder_user_problem(&user) {
            prop_assert!(problems.iter().any(|(f, _)| *f == "builderUser"), "{p}: {problems:?}");
            return Ok(());
        }
        let base = sshd_settings(&ssh::render_sshd_config(&SshdSettings {
            port: 22,
            host_key: "/etc/ssh/k".into(),
            authorized_keys_dir: "/etc/ssh/authorized_keys.d".into(),
            pid_file: "/run/sshd.pid".into(),
            builder_user: "builder".into(),
            max_jobs: 1,
        }));
        let got = sshd_settings(&ssh::render_sshd_config(&SshdSettings {
            port,
            host_key: "/etc/ssh/k".into(),
            authorized_keys_dir: "/etc/ssh/authorized_keys.d".into(),
            pid_file: "/run/sshd.pid".into(),
            builder_user: user.clone(),
            max_jobs: c.max_jobs,
        }));
        let keywords = |s: &[(String, Vec<String>)]| s.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        prop_assert_eq!(keywords(&got), keywords(&base));
        let get = |k: &str| got.iter().find(|(kw, _)| kw == k).map(|(_, a)| a.clone()).unwrap();
        prop_assert_eq!(get("allowusers"), vec![user]);
        prop_assert_eq!(get("port"), vec![port.to_string()]);
        let startups: Vec<u64> = get("maxstartups")[0].split(':').map(|n| n.parse().unwrap()).collect();
        prop_assert_eq!(startups.len(), 3);
        prop_assert!(startups[0] >= u64::from(c.max_jobs.min(u32::MAX / 4)) && startups[0] <= startups[2]);
    }
}

/// The nix.conf model above, checked against the real reader: Nix itself (`nix show-config`)
/// reads rendered files the rules accept without error, and shows each setting it knows with
/// the words nixpool meant. Unknown names (`x-nixpool-*`) stand for the pool's extra settings.
#[test]
fn nix_itself_reads_rendered_nix_conf_as_the_model_does() {
    use proptest::test_runner::TestRunner;
    let nix = [
        "/usr/bin/nix",
        "/run/current-system/sw/bin/nix",
        "/nix/var/nix/profiles/default/bin/nix",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("this test runs the real `nix show-config`: install Nix (apt-get install nix-bin)");
    let strategy = (agent_config(), any::<bool>()).prop_map(|(mut c, kvm)| {
        c.extra_nix_config = c
            .extra_nix_config
            .into_iter()
            .enumerate()
            .map(|(i, (_, v))| (format!("x-nixpool-{i}"), v))
            .collect();
        (c, kvm)
    });
    let mut runner = TestRunner::new(config(40));
    let checked = std::cell::Cell::new(0);
    runner
        .run(&strategy, |(c, kvm)| {
            if !c.problems().is_empty() {
                return Ok(());
            }
            let host = Host {
                kvm,
                system: "x86_64-linux".into(),
                sandbox: "true".into(),
                post_build_hook: None,
            };
            let text = nixconf::render(&c, &host);
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("nix.conf"), &text).unwrap();
            let out = std::process::Command::new(nix)
                .args(["--extra-experimental-features", "nix-command", "show-config"])
                .env("NIX_CONF_DIR", dir.path())
                .env("NIX_USER_CONF_FILES", dir.path().join("none"))
                .env("HOME", dir.path())
                .output()
                .unwrap();
            prop_assert!(
                out.status.success(),
                "Nix refuses\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let shown: BTreeMap<String, String> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once(" = ").or_else(|| l.strip_suffix(" =").map(|k| (k, ""))))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let sorted = |v: &str| {
                let mut w: Vec<&str> = v.split(' ').filter(|w| !w.is_empty()).collect();
                w.sort();
                w.join(" ")
            };
            for (k, v) in nix_conf_settings(&text).unwrap() {
                if let Some(s) = shown.get(&k) {
                    prop_assert_eq!(sorted(s), sorted(&v), "{} in\n{}", k, text);
                }
            }
            for k in [
                "max-jobs",
                "cores",
                "trusted-users",
                "substituters",
                "trusted-public-keys",
                "system-features",
            ] {
                prop_assert!(shown.contains_key(k), "nix show-config has no {k}");
            }
            checked.set(checked.get() + 1);
            Ok(())
        })
        .unwrap();
    assert!(
        checked.get() >= 5,
        "only {} accepted configs were checked against Nix",
        checked.get()
    );
}

/// The typed-setting rules (`nixpool_api::rules::{BOOLEAN,INTEGER}_NIX_SETTINGS`) against the
/// real Nix: every Boolean and whole-number setting this Nix has (old names included) is in the
/// rules or refused outright; each value the rules allow, Nix reads; a value they refuse, Nix
/// refuses too (so the rules keep a builder from a nix.conf its nix-daemon would not start on).
#[test]
fn nix_itself_types_the_settings_as_the_rules_do() {
    use nixpool_api::rules::{BOOLEAN_NIX_SETTINGS, BOOLEAN_NIX_VALUES, INTEGER_NIX_SETTINGS, refused_nix_setting};
    let nix = ["/usr/bin/nix", "/nix/var/nix/profiles/default/bin/nix"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("this test runs the real Nix: install Nix (apt-get install nix-bin)");
    let dir = tempfile::tempdir().unwrap();
    let show = |conf: &str, json: bool| {
        std::fs::write(dir.path().join("nix.conf"), conf).unwrap();
        let mut c = std::process::Command::new(nix);
        c.args(["--extra-experimental-features", "nix-command", "show-config"]);
        if json {
            c.arg("--json");
        }
        c.env("NIX_CONF_DIR", dir.path())
            .env("NIX_USER_CONF_FILES", dir.path().join("none"))
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    let out = show("", true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let settings: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let (mut booleans, mut integers) = (Vec::new(), Vec::new());
    for (name, s) in &settings {
        let names = std::iter::once(name.clone()).chain(
            s["aliases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(String::from)),
        );
        for n in names.filter(|n| !refused_nix_setting(n)) {
            match &s["value"] {
                serde_json::Value::Bool(_) => booleans.push(n),
                serde_json::Value::Number(_) => integers.push(n),
                _ => {}
            }
        }
    }
    for n in &booleans {
        assert!(
            BOOLEAN_NIX_SETTINGS.contains(&n.as_str()),
            "Nix reads {n} as a Boolean; the rules do not know it"
        );
    }
    for n in &integers {
        assert!(
            INTEGER_NIX_SETTINGS.contains(&n.as_str()),
            "Nix reads {n} as a number; the rules do not know it"
        );
    }
    assert!(
        booleans.len() >= 30 && integers.len() >= 15,
        "{booleans:?} {integers:?}"
    );
    // What the rules allow, Nix reads: every such setting at once, for each value.
    for value in BOOLEAN_NIX_VALUES {
        let conf: String = booleans.iter().map(|n| format!("{n} = {value}\n")).collect();
        let out = show(&conf, false);
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for value in ["0", "123456789"] {
        let conf: String = integers.iter().map(|n| format!("{n} = {value}\n")).collect();
        let out = show(&conf, false);
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // What they refuse, Nix refuses: each setting on its own, so the error is that setting's.
    for (names, bad) in [(&booleans, "maybe"), (&integers, "1h")] {
        for n in names {
            assert!(
                nixpool_api::rules::nix_setting_value_problem(n, bad).is_some(),
                "{n} = {bad}"
            );
            let out = show(&format!("{n} = {bad}\n"), false);
            assert!(!out.status.success(), "Nix took {n} = {bad}, which the rules refuse");
        }
    }
}
