//! Property tests of the machines-file merge (issue 14, goal 7; docs/reliability.md §7).
//! Case counts are for CI; `NIXPOOL_LONG=1` runs 50 times as many.

use builderctl::fsio;
use builderctl::merge::{self, BEGIN, Change, END};
use proptest::prelude::*;

fn config(ci_cases: u32) -> ProptestConfig {
    let long = std::env::var("NIXPOOL_LONG").is_ok_and(|v| v == "1");
    ProptestConfig {
        cases: if long { ci_cases * 50 } else { ci_cases },
        ..ProptestConfig::default()
    }
}

/// One foreign line, without its end: machines lines, comments, blanks, `;`, near-misses of our
/// markers, any text.
fn foreign_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("ssh://me@box x86_64-linux".to_string()),
        Just("ssh-ng://b@h x86_64-linux /k 4 1 big-parallel - -  # mine".to_string()),
        Just("# BEGIN nixpool ".to_string()),
        Just(" # BEGIN nixpool ns/a (indented: not a marker)".to_string()),
        Just("#BEGIN nixpool ns/a".to_string()),
        Just("# END nixpool".to_string()),
        Just("a b; c d # e".to_string()),
        "[ -~]{0,30}",
        "\\PC{0,20}",
        "[\t \u{a0}\u{feff}\u{2028}]{0,3}",
    ]
    .prop_filter("our own markers are not foreign", |l| !is_marker(l))
}

fn is_marker(line: &str) -> bool {
    let bare = line.trim_end_matches(['\n', '\r']);
    [BEGIN, END].iter().any(|p| {
        bare.strip_prefix(p)
            .is_some_and(|rest| rest.split_whitespace().next().is_some())
    })
}

/// Foreign content: lines ended by `\n` or `\r\n`, the last one maybe unended.
fn foreign() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec((foreign_line(), any::<bool>()), 0..8),
        any::<bool>(),
    )
        .prop_map(|(lines, last_ended)| {
            let mut text = String::new();
            let n = lines.len();
            for (i, (line, crlf)) in lines.into_iter().enumerate() {
                text.push_str(&line);
                if i + 1 < n || last_ended {
                    text.push_str(if crlf { "\r\n" } else { "\n" });
                }
            }
            text
        })
}

fn change_id(c: &Change) -> &str {
    match c {
        Change::Set { id, .. } | Change::Remove { id } => id,
    }
}

const IDS: [&str; 3] = ["ns/a", "ns/b", "other/a"];
const LINES: [&str; 2] = [
    "ssh-ng://builder@h x86_64-linux /etc/nix/nixpool_ed25519 8 1 big-parallel - -",
    "ssh-ng://builder@h:2222 x86_64-linux,aarch64-linux /etc/nix/nixpool_ed25519 2 1 - - -",
];

/// One merge: which pools to set (with which line) or remove.
fn changes() -> impl Strategy<Value = Vec<Change>> {
    proptest::collection::vec((0..IDS.len(), proptest::option::of(0..LINES.len())), 1..4).prop_map(|v| {
        v.into_iter()
            .map(|(id, line)| match line {
                Some(l) => Change::Set {
                    id: IDS[id].into(),
                    line: LINES[l].into(),
                },
                None => Change::Remove { id: IDS[id].into() },
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Property: any foreign content (any lines, CRLF or LF, comments, `;`, no final newline)
    /// is kept byte for byte by any sequence of merges: it stays the start of the file while
    /// pools are set, and once every pool is removed the file is exactly what it was. Setting
    /// a pool's line again changes nothing.
    #[test]
    fn foreign_content_is_kept_byte_for_byte(f in foreign(), steps in proptest::collection::vec(changes(), 1..5)) {
        let mut text = f.clone();
        for step in &steps {
            let merged = merge::merge(&text, step).unwrap();
            text = merged.text;
            prop_assert!(text.starts_with(&f), "{f:?} is no longer the start of {text:?}");
            // Each pool whose last change in this step sets it has its line in its block, once.
            for (i, change) in step.iter().enumerate() {
                if step[i + 1..].iter().any(|c| change_id(c) == change_id(change)) {
                    continue;
                }
                if let Change::Set { id, .. } = change {
                    let again = merge::merge(&text, std::slice::from_ref(change)).unwrap();
                    prop_assert_eq!(&again.text, &text);
                    prop_assert!(again.changed.is_empty());
                    let lines: Vec<_> = merge::entries(&text).into_iter().filter(|(_, _, b)| b.as_deref() == Some(id)).collect();
                    prop_assert_eq!(lines.len(), 1, "{:?} in {:?}", id, text);
                }
            }
        }
        let all: Vec<Change> = IDS.iter().map(|id| Change::Remove { id: id.to_string() }).collect();
        prop_assert_eq!(merge::merge(&text, &all).unwrap().text, f.clone());
        // Removed one by one, in any order, the same.
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
            let mut t = text.clone();
            for i in order {
                t = merge::merge(&t, &[all[i].clone()]).unwrap().text;
            }
            prop_assert_eq!(&t, &f);
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// Property: the machines file as builderctl reads it: any bytes are the text, byte for
    /// byte, or an error that says it is not UTF-8 text and what to do; never a panic.
    #[test]
    fn any_bytes_read_as_the_same_text_or_a_clear_error(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machines");
        std::fs::write(&path, &bytes).unwrap();
        match fsio::read_or_empty(&path) {
            Ok(text) => prop_assert_eq!(text.as_bytes(), &bytes[..]),
            Err(e) => {
                prop_assert!(std::str::from_utf8(&bytes).is_err());
                let message = format!("{e:#}");
                prop_assert!(message.contains("not UTF-8 text; fix or move it"), "{message}");
                prop_assert!(message.contains(&path.display().to_string()), "{message}");
            }
        }
    }
}
