//! The command line: help that explains, and bad input refused with the flag and the fix.

use std::process::Command;

const GATEWAY: &str = env!("CARGO_BIN_EXE_nixpool-gateway");

#[test]
fn help_explains_and_bad_flags_name_the_fix() {
    let help = Command::new(GATEWAY).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.contains("front door") && text.contains("--builder"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = Command::new(GATEWAY)
        .args(["--builder", "10.0.0.1:22"])
        .arg("--host-key")
        .arg(&missing)
        .arg("--authorized-keys")
        .arg(&missing)
        .arg("--builder-key")
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--builder \"10.0.0.1:22\"") && err.contains("HOST:PORT=SLOTS"),
        "{err}"
    );

    let out = Command::new(GATEWAY)
        .args(["--builder", "10.0.0.1:22=1"])
        .arg("--host-key")
        .arg(&missing)
        .arg("--authorized-keys")
        .arg(&missing)
        .arg("--builder-key")
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--host-key") && err.contains("OpenSSH private key"),
        "{err}"
    );
}
