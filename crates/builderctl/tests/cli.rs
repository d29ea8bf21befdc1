//! The command line itself: clap's own checks, completions, keygen.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use clap::CommandFactory;

const BIN: &str = env!("CARGO_BIN_EXE_builderctl");

#[test]
fn clap_definition_is_consistent() {
    builderctl::cli::Cli::command().debug_assert();
}

#[test]
fn every_command_has_examples_in_its_help() {
    for sub in [
        "machines-file",
        "ssh-config",
        "keygen",
        "doctor",
        "status",
        "completions",
    ] {
        let out = Command::new(BIN).args([sub, "--help"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Examples:"),
            "{sub} --help:\n{text}"
        );
    }
}

/// `tunnel` without `--install` writes nothing and reads the pool as you: the flags that only
/// mean something to `--install` are refused, naming it, instead of being ignored.
#[test]
fn tunnel_refuses_install_only_flags_without_install() {
    for flag in ["--no-backup", "--read-as-root"] {
        let out = Command::new(BIN).args(["tunnel", "builds", flag]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains("--install"), "{flag}: {stderr}");
    }
}

#[test]
fn doctor_refuses_a_skip_id_it_does_not_know_and_lists_the_valid_ones() {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--skip", "tpc", "--machines-file"])
        .arg(t.path().join("machines"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid value 'tpc' for '--skip <CHECK>'"), "{stderr}");
    for id in builderctl::doctor::CheckId::ALL {
        assert!(stderr.contains(id.as_str()), "{id} is not listed: {stderr}");
    }
    // Nothing was checked: no report on stdout.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    // A known id is taken.
    let out = Command::new(BIN)
        .args([
            "doctor",
            "--skip",
            "tcp",
            "--skip",
            "daemon",
            "--json",
            "--machines-file",
        ])
        .arg(t.path().join("machines"))
        .args(["--nix-conf"])
        .arg(t.path().join("nix.conf"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["builders", "machines-file", "builders-use-substitutes"],
        "{report}"
    );
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef builderctl"),
        ("fish", "complete -c builderctl"),
    ] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(marker), "{shell}: {text}");
        assert!(text.contains("machines-file"), "{shell} completes the subcommands");
    }
}

#[test]
fn keygen_makes_a_usable_key_and_never_prints_it() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("nix/nixpool_ed25519");
    let out = Command::new(BIN)
        .args(["keygen", "--pool", "linux", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let private = std::fs::read_to_string(&key).unwrap();
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let parsed = ssh_key::PrivateKey::from_openssh(&private).unwrap();
    assert!(!parsed.is_encrypted());
    assert_eq!(parsed.algorithm(), ssh_key::Algorithm::Ed25519);
    let public = parsed.public_key().to_openssh().unwrap();
    assert!(stdout.contains(&public), "the public key is printed");
    assert!(
        stdout.contains("authorizedKeys:") && stdout.contains("kind: ConfigMap"),
        "{stdout}"
    );
    assert!(!stdout.contains("PRIVATE KEY") && !String::from_utf8_lossy(&out.stderr).contains("PRIVATE KEY"));
    // ssh-keygen agrees: no passphrase (it would prompt, and fail, otherwise).
    let y = Command::new("ssh-keygen")
        .args(["-y", "-P", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(y.status.success(), "{}", String::from_utf8_lossy(&y.stderr));
    // A second run keeps the key unless --force.
    let again = Command::new(BIN).args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), private);
}
