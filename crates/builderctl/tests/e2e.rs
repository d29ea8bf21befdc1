//! End to end with real processes: a pool whose status points at a builder run by the nixpool
//! agent, `builderctl machines-file --from` writes the file, a real `nix-build --max-jobs 0`
//! builds through it, and `doctor` passes, then names each planted fault.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::builder::Builder;

const BIN: &str = env!("CARGO_BIN_EXE_builderctl");

fn pool_yaml(host_key: &str, port: u16) -> String {
    format!(
        r#"apiVersion: nixpool.dev/v1alpha1
kind: NixBuilderPool
metadata:
  name: e2e
  namespace: builds
spec:
  replicas: 1
  maxJobs: 2
  systems: [x86_64-linux]
  supportedFeatures: [big-parallel]
  ssh:
    user: builder
status:
  replicas: 1
  readyReplicas: 1
  endpoint:
    host: 127.0.0.1
    port: {port}
  hostPublicKey: {host_key}
  conditions:
  - type: Ready
    status: "True"
    reason: BuildersReady
    message: 1 of 1 builders ready
    lastTransitionTime: "2026-01-01T00:00:00Z"
"#
    )
}

struct Client<'a> {
    b: &'a Builder,
    dir: PathBuf,
}

impl Client<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn machines(&self) -> PathBuf {
        self.path("machines")
    }
    fn nix_conf(&self) -> PathBuf {
        self.path("nix/nix.conf")
    }
    /// Writes the pool file and runs machines-file --from it.
    fn machines_file(&self, host_key: &str, port: u16) -> Output {
        std::fs::write(self.path("pool.yaml"), pool_yaml(host_key, port)).unwrap();
        let out = Command::new(BIN)
            .args(["machines-file", "--from"])
            .arg(self.path("pool.yaml"))
            .arg("--machines-file")
            .arg(self.machines())
            .arg("--key")
            .arg(&self.b.client_key)
            .arg("--etc-static")
            .arg(self.path("no-etc-static"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out
    }
    fn doctor(&self, extra: &[&str]) -> (bool, Vec<Value>) {
        let out = self
            .b
            .client(BIN)
            .args(["doctor", "--json", "--skip", "daemon", "--machines-file"])
            .arg(self.machines())
            .arg("--nix-conf")
            .arg(self.nix_conf())
            .args(extra)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json: {e}\n{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            out.status.success(),
            v["passed"].as_bool().unwrap(),
            "exit code tells pass/fail"
        );
        (v["passed"].as_bool().unwrap(), v["checks"].as_array().unwrap().clone())
    }
}

fn find<'a>(checks: &'a [Value], id: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} check in {checks:#?}"))
}

fn assert_check(checks: &[Value], id: &str, status: &str, words: &[&str]) {
    let c = find(checks, id);
    let text = format!("{} {}", c["found"], c["fix"]);
    assert_eq!(c["status"], status, "{id}: {c:#}");
    for w in words {
        assert!(text.contains(w), "{id} does not say {w:?}: {c:#}");
    }
}

fn statuses(checks: &[Value]) -> Vec<String> {
    checks
        .iter()
        .map(|c| format!("{}={}", c["id"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect()
}

#[test]
fn a_pool_file_to_a_remote_build_and_every_planted_fault_named() {
    let mut b = Builder::start();
    let dir = b.dir.path().join("client");
    std::fs::create_dir_all(dir.join("nix")).unwrap();
    let c = Client { b: &b, dir };
    c.machines_file(&b.host_public, 22);
    std::fs::write(
        c.nix_conf(),
        format!(
            "builders = @{}\nbuilders-use-substitutes = true\n",
            c.machines().display()
        ),
    )
    .unwrap();

    // A real nix-build, local jobs off, through the written file.
    let drv = b.derivation("through-builderctl", "echo built-through-builderctl > $out");
    let out = b
        .client("/usr/bin/nix-build")
        .args(nixpool_testenv::flow::nix_build_args(
            &format!("@{}", c.machines().display()),
            &drv,
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-build failed:\n{}\nagent:\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_string();
    assert!(path.starts_with("/nix/store/"), "{path}");
    let on_builder = b.root.join(path.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(&on_builder)
            .unwrap_or_else(|e| panic!("{} was not built on the builder: {e}", on_builder.display())),
        "built-through-builderctl\n"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "built-through-builderctl\n",
        "and copied back"
    );

    // doctor: everything passes.
    let (passed, checks) = c.doctor(&["--from", c.path("pool.yaml").to_str().unwrap()]);
    assert!(passed, "{checks:#?}");
    for id in [
        "builders",
        "machines-file",
        "key",
        "host-key",
        "tcp",
        "ssh-auth",
        "store-ping",
        "trusted-user",
        "builders-use-substitutes",
    ] {
        assert_eq!(find(&checks, id)["status"], "pass", "{id}: {:#}", find(&checks, id));
    }

    // Fault: the key is 0644.
    std::fs::set_permissions(&b.client_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (passed, checks) = c.doctor(&[]);
    assert!(!passed);
    assert_check(&checks, "key", "fail", &["0644", "chmod 600"]);
    std::fs::set_permissions(&b.client_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Fault: the file pins another host key.
    let other = support::builder::keygen(&c.path("other_host_key"));
    c.machines_file(&other, 22);
    let (passed, checks) = c.doctor(&[]);
    assert!(!passed);
    assert_check(
        &checks,
        "ssh-auth",
        "fail",
        &["wrong host key", "Host key verification failed"],
    );
    assert_eq!(find(&checks, "store-ping")["status"], "skip");
    // ...and with the pool at hand, the pin itself is named as stale.
    std::fs::write(c.path("real-pool.yaml"), pool_yaml(&b.host_public, 22)).unwrap();
    let (_, checks) = c.doctor(&["--from", c.path("real-pool.yaml").to_str().unwrap()]);
    assert_check(&checks, "host-key", "fail", &["the pool publishes", "machines-file"]);
    c.machines_file(&b.host_public, 22);

    // Fault: nothing listening where the status points.
    c.machines_file(&b.host_public, 2);
    let (passed, checks) = c.doctor(&[]);
    assert!(!passed);
    assert_check(&checks, "tcp", "fail", &["nothing is listening on 127.0.0.1:2"]);
    assert_eq!(find(&checks, "ssh-auth")["status"], "skip", "{:?}", statuses(&checks));
    c.machines_file(&b.host_public, 22);

    // Fault: nix.conf has no builders line.
    std::fs::write(c.nix_conf(), "builders-use-substitutes = true\n").unwrap();
    let (passed, checks) = c.doctor(&[]);
    assert!(!passed);
    assert_check(&checks, "builders", "fail", &["no `builders` line", "builders = @"]);
    assert_eq!(
        find(&checks, "ssh-auth")["status"],
        "pass",
        "only that is wrong: {:?}",
        statuses(&checks)
    );
    std::fs::write(c.nix_conf(), format!("builders = @{}\n", c.machines().display())).unwrap();
    let (passed, checks) = c.doctor(&[]);
    assert!(passed, "a warning is not a failure: {checks:#?}");
    assert_check(
        &checks,
        "builders-use-substitutes",
        "warn",
        &["builders-use-substitutes = true"],
    );

    // Fault: the builder does not trust its user.
    drop(c);
    b.restart_untrusted();
    let c = Client {
        b: &b,
        dir: b.dir.path().join("client"),
    };
    let (passed, checks) = c.doctor(&[]);
    assert!(!passed);
    assert_check(
        &checks,
        "trusted-user",
        "fail",
        &["does not trust builder", "not privileged", "trusted-users = builder"],
    );
    assert_eq!(find(&checks, "ssh-auth")["status"], "pass", "{:?}", statuses(&checks));
}

#[test]
fn doctor_text_report_and_a_missing_machines_file() {
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("nix.conf");
    std::fs::write(&conf, "builders =\n").unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--skip", "daemon", "--machines-file"])
        .arg(t.path().join("machines"))
        .arg("--nix-conf")
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL  builders:") && text.contains("remote builds are off"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  machines-file:") && text.contains("fix: write it"),
        "{text}"
    );
    assert!(Path::new(&conf).exists());
}
