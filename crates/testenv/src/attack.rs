//! Attacks a key holder could try on a builder, each with the proof that it failed or did no
//! harm (a uid, a file, an exit code). Run against the agent's scratch-root builder (Nix 2.8's
//! daemon) and against pool pods on the real node (trixie's Nix 2.26), from Nix 2.8's CLI and
//! from [`WorkerClient`], which sends what the CLI never forwards.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::worker_client::{BasicDerivation, WorkerClient};

/// A builder under attack, and how the test looks at it.
pub trait Target {
    /// `ssh builder@<builder> <command>`, with the authorized client key and the host key pinned.
    fn ssh(&self, command: &str) -> Command;
    /// The machines line that builds on this builder over `scheme` (`ssh-ng` or `ssh`).
    fn machines_line(&self, scheme: &str) -> String;
    /// The store URI of the builder over `ssh-ng://`, with key and host key.
    fn store_uri(&self) -> String;
    /// A command on the client side (Nix 2.8 on the host).
    fn client(&self, program: &str) -> Command;
    /// A text file on the builder, if it exists.
    fn read(&self, path: &str) -> Option<String>;
    /// Whether a path exists on the builder.
    fn exists(&self, path: &str) -> bool;
    /// Secret texts the builder holds that no build may see (the private host key).
    fn secrets(&self) -> Vec<String>;
    /// A scratch directory on the host.
    fn scratch(&self) -> PathBuf;
}

/// Settings that would take a trusted client out of the sandbox or run its programs as root.
pub const HOSTILE_SETTINGS: &[&str] = &[
    "sandbox",
    "build-users-group",
    "extra-sandbox-paths",
    "pre-build-hook",
    "post-build-hook",
];

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn nonce() -> String {
    format!("{}{}", std::process::id(), jiff::Timestamp::now().as_nanosecond())
}

/// A syntactically valid store path no one has made (Nix's base-32 alphabet).
fn fresh_store_path(name: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut seed = jiff::Timestamp::now().as_nanosecond() as u128 ^ (std::process::id() as u128) << 64;
    let hash: String = (0..32)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ALPHABET[((seed >> 64) % 32) as usize] as char
        })
        .collect();
    format!("/nix/store/{hash}-{name}")
}

/// Static busybox and two hook scripts, added to the host store.
struct Tools {
    busybox: String,
    pre_hook: String,
    post_hook: String,
    pre_marker: String,
    post_marker: String,
}

fn tools(t: &dyn Target) -> Tools {
    let dir = t.scratch().join(format!("attack-{}", nonce()));
    let bb = dir.join("busybox");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", bb.join("bin/busybox")).expect("/bin/busybox: apt-get install busybox-static");
    std::os::unix::fs::symlink("busybox", bb.join("bin/sh")).unwrap();
    let busybox = ok(
        t.client("/usr/bin/nix-store").arg("--add").arg(&bb).output().unwrap(),
        "nix-store --add busybox",
    );
    let n = nonce();
    let hook = |name: &str| -> (String, String) {
        use std::os::unix::fs::PermissionsExt;
        let marker = format!("/nix/var/nixpool-attack-{name}-{n}");
        let file = dir.join(format!("{name}-hook"));
        std::fs::write(
            &file,
            format!("#!{busybox}/bin/sh\n{busybox}/bin/busybox touch {marker}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = ok(
            t.client("/usr/bin/nix-store").arg("--add").arg(&file).output().unwrap(),
            "nix-store --add hook",
        );
        (path, marker)
    };
    let (pre_hook, pre_marker) = hook("pre");
    let (post_hook, post_marker) = hook("post");
    Tools {
        busybox,
        pre_hook,
        post_hook,
        pre_marker,
        post_marker,
    }
}

/// What a build inside the builder can see: its uid, the root directory, and any secret.
const PROBE: &str = "busybox id -u; busybox ls /; for f in /run/nixpool/* /run/nixpool/*/* /etc/nix/nix.conf; do busybox cat $f 2>/dev/null; done; true";

/// Asserts a probe's output shows the sandbox: uid 1000 (Nix's sandbox user), a root directory
/// without the pod's /run or /usr, and no secret.
fn assert_sandboxed(t: &dyn Target, what: &str, output: &str) {
    let uid = output.lines().next().unwrap_or_default();
    assert_eq!(
        uid, "1000",
        "{what}: the build ran as uid {uid:?}, not in the sandbox:\n{output}"
    );
    let root: Vec<&str> = output.lines().skip(1).collect();
    for outside in ["run", "usr", "var"] {
        assert!(!root.contains(&outside), "{what}: the build sees /{outside}:\n{output}");
    }
    for s in t.secrets() {
        let body = s
            .lines()
            .find(|l| l.len() > 20 && !l.starts_with("-----"))
            .unwrap_or(&s)
            .to_string();
        assert!(!output.contains(&body), "{what}: a secret reached the build output");
    }
    assert!(
        !output.contains("trusted-users"),
        "{what}: the build read nix.conf:\n{output}"
    );
}

/// `nix copy --to ssh-ng://` of paths no one signed: accepted, because remote builds upload
/// their inputs unsigned; all it can do is add store paths (proved harmless by the attacks that
/// follow, which use those paths and get nothing).
fn unsigned_copy(t: &dyn Target, paths: &[&str]) {
    let out = t
        .client("/usr/bin/nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &t.store_uri(),
        ])
        .args(paths)
        .output()
        .unwrap();
    ok(out, "an unsigned nix copy --to ssh-ng://");
    for p in paths {
        assert!(t.exists(p), "{p} did not reach the builder");
    }
}

/// A worker-protocol client sends every hostile setting itself (none with `hostile` false: the
/// baseline), then builds a probe.
fn set_options_then_build(t: &dyn Target, tools: &Tools, hostile: bool) {
    let mut c = WorkerClient::connect(t.ssh("nix-daemon --stdio")).expect("a worker-protocol session");
    let settings = [
        ("sandbox", "false"),
        ("build-users-group", ""),
        ("extra-sandbox-paths", "/"),
        ("pre-build-hook", tools.pre_hook.as_str()),
        ("post-build-hook", tools.post_hook.as_str()),
    ];
    let settings = if hostile { &settings[..] } else { &[] };
    assert_eq!(c.set_options(settings).unwrap(), Ok(()), "SetOptions is answered");
    let out_path = fresh_store_path("nixpool-attack-probe");
    let drv = BasicDerivation {
        drv_path: format!("{}.drv", fresh_store_path("nixpool-attack-probe")),
        out_path: out_path.clone(),
        input_srcs: vec![tools.busybox.clone()],
        builder: format!("{}/bin/sh", tools.busybox),
        args: vec!["-c".into(), format!("({PROBE}) > $out")],
        env: vec![
            ("out".into(), out_path.clone()),
            ("PATH".into(), format!("{}/bin", tools.busybox)),
        ],
    };
    let (status, msg) = c
        .build_derivation(&drv)
        .unwrap()
        .unwrap_or_else(|e| panic!("BuildDerivation was refused: {e}"));
    assert!(status <= 1, "the probe did not build (status {status}): {msg}");
    let output = t
        .read(&out_path)
        .unwrap_or_else(|| panic!("{out_path} is not on the builder"));
    c.finish();
    let what = if hostile {
        "SetOptions sandbox=false, build-users-group=''"
    } else {
        "a plain BuildDerivation"
    };
    assert_sandboxed(t, what, &output);
    for marker in [&tools.pre_marker, &tools.post_marker] {
        assert!(
            !t.exists(marker),
            "a client-set build hook ran as root: {marker} exists"
        );
    }
}

/// A GC root is a symlink the daemon (root) makes anywhere: refused, and nix.conf is untouched.
fn perm_root_over_nix_conf(t: &dyn Target, tools: &Tools) {
    let before = t.read("/etc/nix/nix.conf").expect("the builder's nix.conf");
    let mut c = WorkerClient::connect(t.ssh("nix-daemon --stdio")).expect("a worker-protocol session");
    let answer = c.add_perm_root(&tools.pre_hook, "/etc/nix/nix.conf").unwrap();
    let err = answer.expect_err("AddPermRoot onto /etc/nix/nix.conf passed");
    assert!(err.contains("AddPermRoot"), "{err}");
    c.finish();
    assert_eq!(
        t.read("/etc/nix/nix.conf").as_deref(),
        Some(before.as_str()),
        "nix.conf changed"
    );
}

/// Nix's CLI with the same settings as `--option`s, over `ssh-ng://` and `ssh://`.
fn cli_options(t: &dyn Target, tools: &Tools) {
    for scheme in ["ssh-ng", "ssh"] {
        let file = crate::flow::derivation(
            &t.scratch(),
            &format!("attack-cli-{scheme}"),
            &format!("({PROBE}) > $out"),
        )
        .unwrap();
        let mut args = crate::flow::nix_build_args(&t.machines_line(scheme), &file);
        for (k, v) in [
            ("sandbox", "false"),
            ("build-users-group", ""),
            ("extra-sandbox-paths", "/"),
            ("pre-build-hook", tools.pre_hook.as_str()),
        ] {
            args.extend(["--option".into(), k.into(), v.into()]);
        }
        let out = t.client("/usr/bin/nix-build").args(args).output().unwrap();
        let path = ok(out, &format!("nix-build over {scheme}:// with hostile --options"));
        let output = std::fs::read_to_string(path.lines().last().unwrap()).unwrap();
        assert_sandboxed(
            t,
            &format!("nix-build --option sandbox false ... over {scheme}://"),
            &output,
        );
        assert!(!t.exists(&tools.pre_marker), "the pre-build hook ran on the builder");
    }
}

/// Every attack, in order. Panics with what got through.
pub fn run_all(t: &dyn Target) {
    let tools = tools(t);
    unsigned_copy(t, &[&tools.busybox, &tools.pre_hook, &tools.post_hook]);
    set_options_then_build(t, &tools, false);
    set_options_then_build(t, &tools, true);
    perm_root_over_nix_conf(t, &tools);
    cli_options(t, &tools);
}
