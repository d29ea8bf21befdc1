//! `nixpool-agent check` on good and broken mounts (no namespaces needed; reads only).

mod support;

use std::process::Command;

use support::*;

fn check(root: &Root) -> (bool, String, String) {
    let out = run(Command::new(AGENT).arg("--root").arg(&root.root).args([
        "check",
        "--sshd",
        SSHD,
        "--nix-daemon",
        NIX_DAEMON,
        "--nix-store",
        NIX_STORE,
    ]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stdout.contains("PRIVATE KEY") && !stderr.contains("PRIVATE KEY"),
        "check printed a private key"
    );
    (out.status.success(), stdout, stderr)
}

#[test]
fn a_good_root_passes_and_shows_the_plan() {
    preflight();
    let root = Root::new(&config("check"));
    let (ok, stdout, stderr) = check(&root);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trusted-users = root builder"), "{stdout}");
    assert!(
        stdout.contains("authorized keys: 1 key(s), each with restrict,command="),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("host key: {}", root.host_public.trim_end_matches(" test"))),
        "{stdout}"
    );
    assert!(stdout.contains("not advertising kvm"), "{stdout}");
    assert!(stdout.contains("shadow (600, secret: content not shown)"), "{stdout}");
    assert!(stdout.trim_end().ends_with("ok"));
    // check writes nothing.
    assert!(
        !root.path("/etc/nix/nix.conf").exists()
            || !std::fs::read_to_string(root.path("/etc/nix/nix.conf"))
                .unwrap()
                .contains("nixpool-agent")
    );
}

#[test]
fn a_missing_host_key_is_named_with_the_fix() {
    preflight();
    let root = Root::new(&config("check"));
    std::fs::remove_dir_all(root.path("/run/nixpool/host-key")).unwrap();
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(
        stderr.contains("host key") && stderr.contains("mount the pool's host-key Secret at /run/nixpool/host-key"),
        "{stderr}"
    );
}

#[test]
fn a_host_key_that_is_not_a_private_key_is_refused() {
    preflight();
    let root = Root::new(&config("check"));
    let public = root.host_public.clone();
    write_secret(
        &root.path("/run/nixpool/host-key"),
        &[("ssh_host_ed25519_key", &public)],
        0o400,
    );
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(stderr.contains("is not an OpenSSH private key"), "{stderr}");
}

#[test]
fn bad_authorized_keys_lines_are_named_by_line() {
    preflight();
    let root = Root::new(&config("check"));
    let good = root.client_public.clone();
    root.set_authorized_keys(&[&good, "ssh-ed25519 not-base64"]);
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(
        stderr.contains("authorized keys line 2: not an OpenSSH public key"),
        "{stderr}"
    );

    std::fs::remove_dir_all(root.path("/run/nixpool/authorized-keys")).unwrap();
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(
        stderr.contains("mount the pool's authorized-keys ConfigMap at /run/nixpool/authorized-keys"),
        "{stderr}"
    );
}

#[test]
fn config_errors_name_the_field() {
    preflight();
    let root = Root::new(&config("check"));
    let mut c = config("check");
    c.builder_user = "root".into();
    c.extra_nix_config.insert("sandbox".into(), "false".into());
    root.write_config(&c);
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(
        stderr.contains("config field `builderUser`: \"root\" is reserved"),
        "{stderr}"
    );
    assert!(
        stderr.contains("config field `extraNixConfig`: sets `sandbox`"),
        "{stderr}"
    );

    std::fs::write(root.path("/etc/nixpool/agent.json"), r#"{"pool": "p"}"#).unwrap();
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(stderr.contains("missing field `builderUser`"), "{stderr}");

    std::fs::remove_file(root.path("/etc/nixpool/agent.json")).unwrap();
    let (ok, _, stderr) = check(&root);
    assert!(!ok);
    assert!(stderr.contains("must be mounted at /etc/nixpool"), "{stderr}");
}

#[test]
fn missing_binaries_name_the_flag() {
    preflight();
    let root = Root::new(&config("check"));
    let out = run(Command::new(AGENT)
        .arg("--root")
        .arg(&root.root)
        .args(["check", "--sshd", "/nonexistent/sshd"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/sshd is not an executable file: install it in the image or pass --sshd"),
        "{stderr}"
    );
}
