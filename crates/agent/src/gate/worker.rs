//! What an `ssh-ng://` client may ask of the builder's nix-daemon. The builder user is a Nix
//! trusted user (remote builds of input-addressed derivations need it), and the daemon applies
//! every setting a trusted client sends: `sandbox = false` with `build-users-group =` would run
//! builds as root. So the gate reads each request the client sends and:
//! - passes `SetOptions` on with only the settings in [`ALLOWED_SETTINGS`] (the ones Nix itself
//!   lets an untrusted client set) and drops the rest;
//! - passes the operations builds and copies use, byte for byte;
//! - refuses every other operation (GC roots anywhere on disk, garbage collection, store
//!   repair and optimisation, build logs, the pre-1.26 import forms) with an error the client
//!   prints, and ends the session.
//!
//! It reads only the client's direction; the daemon's answers are copied back unread. Nix clients
//! send one request and wait for its answer, so the gate can add a message of its own between.

use std::io::{Read, Write};

use super::wire::{self, Recorder, WireError};

/// The oldest worker protocol served: 1.26 (Nix 2.4) has framed uploads and the error form the
/// gate sends.
pub const MIN_MINOR: u64 = 26;

/// Client settings passed to the daemon: the set Nix applies for an untrusted client (limits and
/// timeouts), plus the log size limit that `ssh://` clients may set too. `builders` passes only
/// when empty (a builder never forwards builds).
pub const ALLOWED_SETTINGS: &[&str] = &[
    "build-timeout",
    "timeout",
    "max-silent-time",
    "poll-interval",
    "connect-timeout",
    "max-build-log-size",
];

/// Verbosity (`-v`, Nix's `lvlTalkative`) from which the gate tells the client what it dropped.
const TALKATIVE: u64 = 4;

/// The operations of the worker protocol by number (Nix's `WorkerProto::Op`).
pub fn op_name(op: u64) -> &'static str {
    match op {
        1 => "IsValidPath",
        3 => "HasSubstitutes",
        4 => "QueryPathHash",
        5 => "QueryReferences",
        6 => "QueryReferrers",
        7 => "AddToStore",
        8 => "AddTextToStore",
        9 => "BuildPaths",
        10 => "EnsurePath",
        11 => "AddTempRoot",
        12 => "AddIndirectRoot",
        13 => "SyncWithGC",
        14 => "FindRoots",
        16 => "ExportPath",
        18 => "QueryDeriver",
        19 => "SetOptions",
        20 => "CollectGarbage",
        21 => "QuerySubstitutablePathInfo",
        22 => "QueryDerivationOutputs",
        23 => "QueryAllValidPaths",
        24 => "QueryFailedPaths",
        25 => "ClearFailedPaths",
        26 => "QueryPathInfo",
        27 => "ImportPaths",
        28 => "QueryDerivationOutputNames",
        29 => "QueryPathFromHashPart",
        30 => "QuerySubstitutablePathInfos",
        31 => "QueryValidPaths",
        32 => "QuerySubstitutablePaths",
        33 => "QueryValidDerivers",
        34 => "OptimiseStore",
        35 => "VerifyStore",
        36 => "BuildDerivation",
        37 => "AddSignatures",
        38 => "NarFromPath",
        39 => "AddToStoreNar",
        40 => "QueryMissing",
        41 => "QueryDerivationOutputMap",
        42 => "RegisterDrvOutput",
        43 => "QueryRealisation",
        44 => "AddMultipleToStore",
        45 => "AddBuildLog",
        46 => "BuildPathsWithResults",
        47 => "AddPermRoot",
        _ => "unknown",
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The client closed its side after a whole request.
    Done,
    /// The gate refused; the client was sent this message as an error.
    Refused(String),
    /// Not the worker protocol, or a connection error.
    Broken(WireError),
}

impl From<WireError> for End {
    fn from(e: WireError) -> Self {
        End::Broken(e)
    }
}

/// Runs one client session: reads the client's requests from `client`, writes what passes to
/// `daemon`, and writes the gate's own messages with `to_client`. `daemon_version` gives the
/// version the daemon announced (the copy of the daemon's answers reads it).
pub fn session(
    client: impl Read,
    daemon: &mut impl Write,
    daemon_version: impl FnOnce() -> Option<u64>,
    to_client: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> End {
    let mut c = Recorder::new(client);
    let minor = match handshake(&mut c, daemon, daemon_version) {
        Ok(Ok(minor)) => minor,
        Ok(Err(reason)) => return End::Refused(reason),
        Err(e) => return End::Broken(e),
    };
    loop {
        let op = match c.u64_or_eof() {
            Ok(Some(op)) => op,
            Ok(None) => return End::Done,
            Err(e) => return End::Broken(e),
        };
        let result = match request(op, minor, &mut c, daemon) {
            Ok(Passed::Forwarded) => Ok(()),
            Ok(Passed::Options {
                bytes,
                dropped,
                verbosity,
            }) => {
                let note = (!dropped.is_empty() && verbosity >= TALKATIVE).then(|| {
                    wire::log_line(&format!(
                        "nixpool: this builder ignores the client settings {}; see docs/security.md",
                        dropped.join(", ")
                    ))
                });
                note.map_or(Ok(()), |n| to_client(&n))
                    .map_err(WireError::from)
                    .and_then(|()| daemon.write_all(&bytes).map_err(WireError::from))
            }
            Ok(Passed::Refused(reason)) => {
                let _ = to_client(&wire::error(&reason));
                return End::Refused(reason);
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result.and_then(|()| daemon.flush().map_err(WireError::from)) {
            return End::Broken(e);
        }
    }
}

/// Reads the client's half of the handshake and forwards it; returns the protocol minor version
/// both sides speak, or why the client is refused.
fn handshake(
    c: &mut Recorder<impl Read>,
    daemon: &mut impl Write,
    daemon_version: impl FnOnce() -> Option<u64>,
) -> Result<Result<u64, String>, WireError> {
    let magic = c.u64()?;
    if magic != wire::WORKER_MAGIC_1 {
        return Err(WireError::Malformed(
            "the client did not open with the worker protocol's magic number".into(),
        ));
    }
    daemon.write_all(&c.take())?;
    daemon.flush()?;
    let client_version = c.u64()?;
    let Some(daemon_version) = daemon_version() else {
        return Err(WireError::Malformed("nix-daemon did not answer the handshake".into()));
    };
    let version = client_version.min(daemon_version);
    if wire::major(client_version) != 1 || wire::minor(version) < MIN_MINOR {
        return Ok(Err(format!(
            "nixpool: this builder needs a Nix client that speaks worker protocol 1.{MIN_MINOR} or later (Nix 2.4 or later); this one speaks {}.{}",
            wire::major(client_version),
            wire::minor(client_version)
        )));
    }
    let minor = wire::minor(version);
    // What the client sent so far must reach the daemon now: from 1.38 the client waits for the
    // daemon's features before it sends the rest of its handshake.
    daemon.write_all(&c.take())?;
    daemon.flush()?;
    if minor >= 38 {
        c.strings()?; // features
        daemon.write_all(&c.take())?;
        daemon.flush()?;
    }
    if c.u64()? != 0 {
        c.u64()?; // obsolete CPU affinity
    }
    c.u64()?; // obsolete reserveSpace
    daemon.write_all(&c.take())?;
    daemon.flush()?;
    Ok(Ok(minor))
}

enum Passed {
    Forwarded,
    /// A `SetOptions` rewritten to carry only allowed settings.
    Options {
        bytes: Vec<u8>,
        dropped: Vec<String>,
        verbosity: u64,
    },
    Refused(String),
}

/// Reads one request's arguments; forwards it, rewrites it or refuses it.
fn request(op: u64, minor: u64, c: &mut Recorder<impl Read>, daemon: &mut impl Write) -> Result<Passed, WireError> {
    match op {
        // One store path, hash part or output id.
        1 | 3 | 4 | 5 | 6 | 10 | 11 | 18 | 21 | 22 | 26 | 28 | 29 | 33 | 38 | 41 | 43 => {
            c.bytes()?;
        }
        13 | 23 => {}
        31 => {
            c.strings()?;
            if minor >= 27 {
                c.u64()?; // substitute
            }
        }
        32 | 40 => {
            c.strings()?;
        }
        30 => {
            if minor < 22 {
                c.strings()?;
            } else {
                c.string_pairs()?; // path -> content address
            }
        }
        9 => {
            c.strings()?;
            if minor >= 15 {
                c.u64()?; // build mode
            }
        }
        46 => {
            c.strings()?;
            c.u64()?;
        }
        36 => {
            c.bytes()?; // derivation path
            derivation(c)?;
            c.u64()?; // build mode
        }
        37 => {
            c.bytes()?;
            c.strings()?;
        }
        8 => {
            c.bytes()?;
            c.bytes()?;
            c.strings()?;
        }
        42 => {
            c.bytes()?;
            if minor < 31 {
                c.bytes()?;
            }
        }
        7 => {
            c.bytes()?; // name
            c.bytes()?; // content-address method
            c.strings()?; // references
            c.u64()?; // repair
            c.stream_frames(daemon)?;
            return Ok(Passed::Forwarded);
        }
        39 => {
            for _ in 0..3 {
                c.bytes()?; // path, deriver, NAR hash
            }
            c.strings()?; // references
            for _ in 0..3 {
                c.u64()?; // registration time, NAR size, ultimate
            }
            c.strings()?; // signatures
            c.bytes()?; // content address
            c.u64()?; // repair
            c.u64()?; // dontCheckSigs
            c.stream_frames(daemon)?;
            return Ok(Passed::Forwarded);
        }
        44 => {
            c.u64()?; // repair
            c.u64()?; // dontCheckSigs
            c.stream_frames(daemon)?;
            return Ok(Passed::Forwarded);
        }
        19 => return set_options(c),
        _ => {
            return Ok(Passed::Refused(format!(
                "nixpool: this builder does not serve the worker operation {} ({op}): a key holder may build and copy store paths, nothing more (see docs/security.md)",
                op_name(op)
            )));
        }
    }
    daemon.write_all(&c.take())?;
    Ok(Passed::Forwarded)
}

/// A `BasicDerivation` as Nix sends it.
fn derivation(c: &mut Recorder<impl Read>) -> Result<(), WireError> {
    let outputs = c.count()?;
    for _ in 0..outputs {
        for _ in 0..4 {
            c.bytes()?; // name, path, hash algorithm, hash
        }
    }
    c.strings()?; // input sources
    c.bytes()?; // platform
    c.bytes()?; // builder
    c.strings()?; // args
    c.string_pairs()?; // env
    Ok(())
}

fn set_options(c: &mut Recorder<impl Read>) -> Result<Passed, WireError> {
    let mut fixed = [0u64; 12];
    for f in &mut fixed {
        *f = c.u64()?;
    }
    let verbosity = fixed[3];
    let overrides = c.string_pairs()?;
    c.discard();
    let (kept, dropped): (Vec<_>, Vec<_>) = overrides.into_iter().partition(|(k, v)| allowed(k, v));
    let mut bytes = Vec::new();
    wire::put_u64(&mut bytes, 19);
    for f in fixed {
        wire::put_u64(&mut bytes, f);
    }
    wire::put_u64(&mut bytes, kept.len() as u64);
    for (k, v) in &kept {
        wire::put_bytes(&mut bytes, k.as_bytes());
        wire::put_bytes(&mut bytes, v.as_bytes());
    }
    Ok(Passed::Options {
        bytes,
        dropped: dropped.into_iter().map(|(k, _)| k).collect(),
        verbosity,
    })
}

/// Whether a client setting reaches the daemon.
pub fn allowed(name: &str, value: &str) -> bool {
    ALLOWED_SETTINGS.contains(&name) || (name == "builders" && value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::wire::{put_bytes, put_u64};

    const V: u64 = (1 << 8) | 34;

    fn hello(version: u64) -> Vec<u8> {
        let mut b = Vec::new();
        put_u64(&mut b, wire::WORKER_MAGIC_1);
        put_u64(&mut b, version);
        if wire::minor(version) >= 38 {
            put_u64(&mut b, 1);
            put_bytes(&mut b, b"some-feature");
        }
        put_u64(&mut b, 0);
        put_u64(&mut b, 0);
        b
    }

    fn set_options(overrides: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        put_u64(&mut b, 19);
        for f in [0, 0, 0, 4, 1, 0, 1, 0, 0, 0, 2, 1] {
            put_u64(&mut b, f);
        }
        put_u64(&mut b, overrides.len() as u64);
        for (k, v) in overrides {
            put_bytes(&mut b, k.as_bytes());
            put_bytes(&mut b, v.as_bytes());
        }
        b
    }

    fn path(op: u64, p: &str) -> Vec<u8> {
        let mut b = Vec::new();
        put_u64(&mut b, op);
        put_bytes(&mut b, p.as_bytes());
        b
    }

    fn add_to_store_nar(data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        put_u64(&mut b, 39);
        for s in ["/nix/store/aaaa-x", "", "sha256:00"] {
            put_bytes(&mut b, s.as_bytes());
        }
        put_u64(&mut b, 1);
        put_bytes(&mut b, b"/nix/store/bbbb-y");
        for v in [0, data.len() as u64, 0] {
            put_u64(&mut b, v);
        }
        put_u64(&mut b, 0);
        put_bytes(&mut b, b"");
        put_u64(&mut b, 0);
        put_u64(&mut b, 1);
        put_u64(&mut b, data.len() as u64);
        b.extend_from_slice(data);
        put_u64(&mut b, 0);
        b
    }

    fn build_derivation() -> Vec<u8> {
        let mut b = path(36, "/nix/store/cccc-d.drv");
        put_u64(&mut b, 1);
        for s in ["out", "/nix/store/dddd-d", "", ""] {
            put_bytes(&mut b, s.as_bytes());
        }
        put_u64(&mut b, 1);
        put_bytes(&mut b, b"/nix/store/eeee-busybox");
        put_bytes(&mut b, b"x86_64-linux");
        put_bytes(&mut b, b"/nix/store/eeee-busybox/bin/sh");
        put_u64(&mut b, 2);
        put_bytes(&mut b, b"-c");
        put_bytes(&mut b, b"echo hi > $out");
        put_u64(&mut b, 1);
        put_bytes(&mut b, b"out");
        put_bytes(&mut b, b"/nix/store/dddd-d");
        put_u64(&mut b, 0);
        b
    }

    struct Run {
        to_daemon: Vec<u8>,
        to_client: Vec<u8>,
        end: End,
    }

    fn run(client: &[u8], daemon_version: u64) -> Run {
        let mut to_daemon = Vec::new();
        let mut to_client = Vec::new();
        let end = session(client, &mut to_daemon, || Some(daemon_version), &mut |b| {
            to_client.extend_from_slice(b);
            Ok(())
        });
        Run {
            to_daemon,
            to_client,
            end,
        }
    }

    #[test]
    fn builds_and_copies_pass_byte_for_byte() {
        for version in [V, (1 << 8) | 38] {
            let mut client = hello(version);
            let mut ops = Vec::new();
            ops.extend(path(26, "/nix/store/aaaa-x"));
            ops.extend(add_to_store_nar(b"a NAR of any length"));
            ops.extend(build_derivation());
            let mut qvp = Vec::new();
            put_u64(&mut qvp, 31);
            put_u64(&mut qvp, 1);
            put_bytes(&mut qvp, b"/nix/store/aaaa-x");
            put_u64(&mut qvp, 0);
            ops.extend(qvp);
            ops.extend(path(38, "/nix/store/aaaa-x"));
            client.extend(&ops);
            let r = run(&client, version);
            assert!(matches!(r.end, End::Done), "{:?}", r.end);
            assert_eq!(r.to_daemon, client);
            assert!(r.to_client.is_empty());
        }
    }

    /// From 1.38 a client sends the rest of its handshake only after the daemon answered its
    /// features, so the gate must pass them on before it reads further.
    #[test]
    fn the_1_38_handshake_passes_the_features_before_reading_on() {
        use std::cell::RefCell;
        use std::rc::Rc;
        const V38: u64 = (1 << 8) | 38;
        struct Client {
            first: Vec<u8>,
            rest: Vec<u8>,
            daemon_got: Rc<RefCell<Vec<u8>>>,
        }
        impl Read for Client {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let source = if !self.first.is_empty() {
                    &mut self.first
                } else if self.daemon_got.borrow().len() >= 8 + 8 + 8 + 8 + 16 {
                    &mut self.rest
                } else {
                    return Err(std::io::Error::other(
                        "the client waits for the daemon's features, which never came",
                    ));
                };
                let n = buf.len().min(source.len());
                buf[..n].copy_from_slice(&source[..n]);
                source.drain(..n);
                Ok(n)
            }
        }
        struct Daemon(Rc<RefCell<Vec<u8>>>);
        impl Write for Daemon {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.borrow_mut().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let all = hello(V38);
        let got = Rc::new(RefCell::new(Vec::new()));
        let client = Client {
            first: all[..all.len() - 16].to_vec(),
            rest: all[all.len() - 16..].to_vec(),
            daemon_got: Rc::clone(&got),
        };
        let end = session(client, &mut Daemon(Rc::clone(&got)), || Some(V38), &mut |_| Ok(()));
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!(*got.borrow(), all);
    }

    #[test]
    fn set_options_keeps_only_allowed_settings() {
        let mut client = hello(V);
        client.extend(set_options(&[
            ("sandbox", "false"),
            ("build-users-group", ""),
            ("max-silent-time", "30"),
            ("pre-build-hook", "/nix/store/x-hook"),
            ("builders", ""),
            ("builders", "ssh://elsewhere"),
            ("extra-sandbox-paths", "/"),
        ]));
        let r = run(&client, V);
        assert!(matches!(r.end, End::Done));
        let mut expected = hello(V);
        expected.extend(set_options(&[("max-silent-time", "30"), ("builders", "")]));
        assert_eq!(r.to_daemon, expected);
        let note = String::from_utf8_lossy(&r.to_client);
        for name in ["sandbox", "build-users-group", "pre-build-hook", "extra-sandbox-paths"] {
            assert!(note.contains(name), "{note}");
        }
    }

    #[test]
    fn the_note_about_dropped_settings_waits_for_verbose_clients() {
        let mut client = hello(V);
        let mut opts = set_options(&[("sandbox", "false")]);
        opts[8 + 3 * 8] = 3; // verbosity: info
        client.extend(opts);
        let r = run(&client, V);
        assert!(r.to_client.is_empty());
    }

    #[test]
    fn operations_beyond_building_are_refused_with_an_error_the_client_prints() {
        for (op, name) in [
            (47, "AddPermRoot"),
            (20, "CollectGarbage"),
            (12, "AddIndirectRoot"),
            (35, "VerifyStore"),
            (27, "ImportPaths"),
            (999, "unknown"),
        ] {
            let mut client = hello(V);
            client.extend(path(op, "/etc/nix/nix.conf"));
            let r = run(&client, V);
            let End::Refused(msg) = r.end else {
                panic!("{op} passed")
            };
            assert!(msg.contains(name), "{msg}");
            assert_eq!(
                r.to_daemon,
                hello(V),
                "nothing of the refused request reached the daemon"
            );
            let mut expected_head = Vec::new();
            put_u64(&mut expected_head, wire::STDERR_ERROR);
            assert!(r.to_client.starts_with(&expected_head));
            assert!(String::from_utf8_lossy(&r.to_client).contains(name));
        }
    }

    #[test]
    fn old_clients_and_other_protocols_are_refused() {
        let r = run(&hello((1 << 8) | 21), V);
        let End::Refused(msg) = r.end else { panic!() };
        assert!(msg.contains("Nix 2.4 or later"), "{msg}");
        let r = run(b"GET / HTTP/1.1\r\n\r\n", V);
        assert!(matches!(r.end, End::Broken(WireError::Malformed(_))));
    }

    #[test]
    fn a_request_cut_short_breaks_the_session() {
        let mut client = hello(V);
        let b = build_derivation();
        client.extend(&b[..b.len() - 5]);
        assert!(matches!(run(&client, V).end, End::Broken(_)));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;
    use crate::gate::wire::{put_bytes, put_u64};

    const V: u64 = (1 << 8) | 34;

    fn hello() -> Vec<u8> {
        let mut b = Vec::new();
        for w in [wire::WORKER_MAGIC_1, V, 0, 0] {
            put_u64(&mut b, w);
        }
        b
    }

    const NAMES: &[&str] = &[
        "sandbox",
        "build-users-group",
        "pre-build-hook",
        "post-build-hook",
        "extra-sandbox-paths",
        "trusted-public-keys",
        "netrc-file",
        "builders",
        "max-silent-time",
        "build-timeout",
        "connect-timeout",
    ];

    proptest! {
        /// Whatever follows the handshake, the gate ends the session cleanly: no panic, no
        /// endless loop.
        #[test]
        fn arbitrary_requests_never_panic(op in 0u64..50, tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut client = hello();
            put_u64(&mut client, op);
            client.extend(tail);
            let _ = session(&client[..], &mut Vec::new(), || Some(V), &mut |_| Ok(()));
        }

        /// Whatever settings a client sends, the daemon receives exactly the allowed ones, in
        /// order.
        #[test]
        fn only_allowed_settings_reach_the_daemon(
            picks in proptest::collection::vec((0..NAMES.len(), prop_oneof![Just(String::new()), "[a-z/]{1,12}"]), 0..12)
        ) {
            let overrides: Vec<(&str, String)> = picks.iter().map(|(i, v)| (NAMES[*i], v.clone())).collect();
            let encode = |list: &[(&str, String)]| {
                let mut b = Vec::new();
                put_u64(&mut b, 19);
                for f in [0u64; 12] {
                    put_u64(&mut b, f);
                }
                put_u64(&mut b, list.len() as u64);
                for (k, v) in list {
                    put_bytes(&mut b, k.as_bytes());
                    put_bytes(&mut b, v.as_bytes());
                }
                b
            };
            let mut client = hello();
            client.extend(encode(&overrides));
            let mut to_daemon = Vec::new();
            let end = session(&client[..], &mut to_daemon, || Some(V), &mut |_| Ok(()));
            prop_assert!(matches!(end, End::Done));
            let kept: Vec<(&str, String)> = overrides.iter().filter(|(k, v)| allowed(k, v)).cloned().collect();
            let mut expected = hello();
            expected.extend(encode(&kept));
            prop_assert_eq!(to_daemon, expected);
        }
    }
}
