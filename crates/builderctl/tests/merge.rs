//! Merging into an existing machines file, through the real binary: foreign lines survive byte
//! for byte, a second run changes nothing, --check and --remove, and a failed write leaves the
//! file as it was.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use builderctl::merge::{self, Change, MergeError};

const BIN: &str = env!("CARGO_BIN_EXE_builderctl");
const FOREIGN: &str = "# my own builders\r\nssh://me@old-box x86_64-linux /root/.ssh/id_ed25519 2\r\n\n   \n# keep this comment\nthis line - does not parse\nssh://me@tail aarch64-linux";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pools.yaml")
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(existing: Option<&str>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Env { dir };
        if let Some(t) = existing {
            std::fs::write(e.machines(), t).unwrap();
        }
        e
    }
    fn machines(&self) -> PathBuf {
        self.dir.path().join("machines")
    }
    fn text(&self) -> String {
        std::fs::read_to_string(self.machines()).unwrap()
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd_without_source(&["--from"]);
        c.arg(fixture()).args(args);
        c
    }
    /// `machines-file` on this file, without `--from` (as `--remove` is run).
    fn cmd_without_source(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("machines-file")
            .arg("--machines-file")
            .arg(self.machines())
            .arg("--etc-static")
            .arg(self.dir.path().join("no-etc-static"))
            .args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn remove(&self, args: &[&str]) -> Output {
        let mut c = self.cmd_without_source(&["--remove"]);
        c.args(args);
        c.output().unwrap()
    }
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn foreign_lines_are_kept_byte_for_byte_and_reported_when_unparsable() {
    let env = Env::new(Some(FOREIGN));
    let out = env.run(&["linux", "kvm"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = env.text();
    // The old file, plus the newline its last line lacked, is an exact prefix.
    assert!(text.starts_with(&format!("{FOREIGN}\n")), "{text:?}");
    assert!(text.contains("# BEGIN nixpool builds/linux") && text.contains("# END nixpool builds/kvm"));
    assert!(
        stderr(&out).contains("line 6: this line - does not parse") && stderr(&out).contains("kept as it is"),
        "{}",
        stderr(&out)
    );
    // The backup is the old file, exactly.
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("machines.builderctl-backup")).unwrap(),
        FOREIGN
    );
}

#[test]
fn a_second_run_changes_nothing_and_check_agrees() {
    let env = Env::new(Some("ssh://me@old x86_64-linux\n"));
    assert!(env.run(&["linux"]).status.success());
    let first = env.text();
    let ino = std::fs::metadata(env.machines()).unwrap().ino();
    let out = env.run(&["linux"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("up to date; nothing written"), "{}", stdout(&out));
    assert_eq!(env.text(), first);
    assert_eq!(
        std::fs::metadata(env.machines()).unwrap().ino(),
        ino,
        "not even rewritten"
    );

    let check = env.run(&["linux", "--check"]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    let check = env.run(&["linux", "kvm", "--check"]);
    assert_eq!(check.status.code(), Some(1), "kvm is missing: out of date");
    assert!(
        stderr(&check).contains("out of date for builds/kvm"),
        "{}",
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("+# BEGIN nixpool builds/kvm"),
        "the diff: {}",
        stdout(&check)
    );
    assert_eq!(env.text(), first, "--check writes nothing");

    // A pool whose status changed (another ready builder) is out of date until rewritten.
    let yaml = std::fs::read_to_string(fixture())
        .unwrap()
        .replace("readyReplicas: 2", "readyReplicas: 3");
    let changed = env.dir.path().join("pools.yaml");
    std::fs::write(&changed, yaml).unwrap();
    let args = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["machines-file", "linux", "--from"])
            .arg(&changed)
            .arg("--machines-file")
            .arg(env.machines())
            .arg("--etc-static")
            .arg(env.dir.path().join("none"))
            .args(extra);
        c.output().unwrap()
    };
    assert_eq!(args(&["--check"]).status.code(), Some(1));
    let dry = args(&["--dry-run"]);
    assert!(dry.status.success());
    assert!(
        stdout(&dry).contains(" 12 2 "),
        "max jobs 3x4 in the diff: {}",
        stdout(&dry)
    );
    assert_eq!(env.text(), first, "--dry-run writes nothing");
    assert!(args(&[]).status.success());
    assert_eq!(args(&["--check"]).status.code(), Some(0));
}

#[test]
fn remove_takes_out_only_the_pools_block() {
    let env = Env::new(Some(FOREIGN));
    assert!(env.run(&["linux", "kvm"]).status.success());
    let out = env.remove(&["linux"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = env.text();
    assert!(!text.contains("builds/linux"), "{text}");
    assert!(text.contains("# BEGIN nixpool builds/kvm"));
    let out = env.remove(&["-n", "builds", "kvm"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        env.text(),
        FOREIGN,
        "back to the user's file, byte for byte (the newline added before the blocks is taken out too)"
    );
    let out = env.remove(&["builds/kvm"]);
    assert!(
        stderr(&out).contains("no block for pool builds/kvm"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn remove_refuses_the_flags_it_would_ignore_and_changes_nothing() {
    let env = Env::new(Some(FOREIGN));
    assert!(env.run(&["linux", "kvm"]).status.success());
    let before = env.text();
    for (flags, named) in [
        (&["--from", "pools.yaml"][..], "--from"),
        (&["--kubeconfig", "/k"], "--kubeconfig"),
        (&["--context", "c"], "--context"),
        (&["-A"], "--all-namespaces"),
        (&["-l", "team=web"], "--selector"),
        (&["--read-as-root"], "--read-as-root"),
        (&["--allow-unready"], "--allow-unready"),
        (&["--allow-stale"], "--allow-stale"),
        (&["--via-ssh-config"], "--via-ssh-config"),
        (&["--configure-nix"], "--configure-nix"),
    ] {
        let mut args = flags.to_vec();
        args.push("linux");
        let out = env.remove(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("drop {named}")),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert_eq!(env.text(), before, "{flags:?}: nothing written");
    }
}

#[test]
fn an_unready_pool_writes_nothing() {
    let env = Env::new(Some("ssh://me@old x86_64-linux\n"));
    let out = env.run(&["linux", "pending"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("builds/pending is not Ready") && stderr(&out).contains("nothing written"));
    assert_eq!(env.text(), "ssh://me@old x86_64-linux\n");
    assert!(env.run(&["pending", "--allow-unready"]).status.success());
}

#[test]
fn mode_and_owner_are_kept_and_new_files_are_0644() {
    let env = Env::new(None);
    assert!(env.run(&["linux"]).status.success());
    assert_eq!(std::fs::metadata(env.machines()).unwrap().mode() & 0o7777, 0o644);
    std::fs::set_permissions(env.machines(), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(env.machines(), Some(1), Some(2)).unwrap();
    assert!(env.run(&["kvm"]).status.success());
    let m = std::fs::metadata(env.machines()).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1, 2));
}

#[test]
fn a_target_the_user_cannot_write_names_sudo_and_leaves_no_partial_file() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it runs builderctl as nobody through setpriv from util-linux)"
    );
    let env = Env::new(Some(FOREIGN));
    let before = env.files();
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
        .args(env.cmd(&["linux"]).get_program().to_str())
        .args(env.cmd(&["linux"]).get_args())
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("permission denied") && err.contains("sudo builderctl machines-file") && err.contains("machines"),
        "{err}"
    );
    assert_eq!(env.text(), FOREIGN);
    assert_eq!(env.files(), before, "no temp or backup file left");
}

#[test]
fn a_read_only_file_system_is_named_and_nothing_changes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (unshare --mount from util-linux)"
    );
    let env = Env::new(Some(FOREIGN));
    let before = env.files();
    let d = env.dir.path().display().to_string();
    let cmd = env.cmd(&["linux"]);
    let argv: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let script = format!(
        "mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec {}",
        argv.join(" ")
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    assert_eq!(env.text(), FOREIGN);
    assert_eq!(env.files(), before);
}

#[test]
fn hand_broken_blocks_are_refused_not_guessed() {
    let set = [Change::Set {
        id: "builds/linux".into(),
        line: "ssh-ng://b@h x86_64-linux".into(),
    }];
    let unterminated = "a x\n# BEGIN nixpool builds/linux (managed)\nssh-ng://b@h x\n";
    assert_eq!(
        merge::merge(unterminated, &set),
        Err(MergeError::Unterminated {
            id: "builds/linux".into(),
            line: 2
        })
    );
    let dup = format!("{}{}", merge::block("ns/a", "x y"), merge::block("ns/a", "x y"));
    assert!(matches!(
        merge::merge(&dup, &set),
        Err(MergeError::Duplicate { line: 4, .. })
    ));
    assert!(matches!(
        merge::merge("# END nixpool ns/a\n", &set),
        Err(MergeError::Stray { line: 1, .. })
    ));
    // Through the binary: an error naming the line, and the file untouched.
    let env = Env::new(Some(unterminated));
    let out = env.run(&["linux"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("line 2") && stderr(&out).contains("# END nixpool builds/linux"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.text(), unterminated);
}

#[test]
fn markers_survive_nix_splitting_lines_at_semicolons() {
    // Nix 2.8 splits the machines file at `;` as well as newlines, before it strips comments:
    // a `;` in a marker comment made the rest of it a machine line (found by the e2e test).
    let b = merge::block("ns/a", "ssh-ng://b@h x86_64-linux");
    assert!(!b.contains(';'), "{b}");
}

#[test]
fn a_block_is_replaced_in_place() {
    let text = format!("first x\n{}last y\n", merge::block("ns/a", "old z"));
    let m = merge::merge(
        &text,
        &[Change::Set {
            id: "ns/a".into(),
            line: "new z".into(),
        }],
    )
    .unwrap();
    assert_eq!(m.text, format!("first x\n{}last y\n", merge::block("ns/a", "new z")));
    assert_eq!(m.changed, ["ns/a"]);
}

#[test]
fn nix_darwin_gets_a_snippet_and_no_file() {
    let env = Env::new(Some(FOREIGN));
    // nix-darwin manages Nix: its nix.conf is in /etc/static.
    std::fs::create_dir_all(env.dir.path().join("no-etc-static/nix")).unwrap();
    std::fs::write(env.dir.path().join("no-etc-static/nix/nix.conf"), "").unwrap();
    let out = env.run(&["linux"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("nix.buildMachines = [") && stdout(&out).contains("nix.distributedBuilds = true;"));
    assert!(stderr(&out).contains("Unexpected files in /etc"), "{}", stderr(&out));
    assert_eq!(env.text(), FOREIGN, "nothing written");
}
