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
    let start = |builder: &str| {
        let out = Command::new(GATEWAY)
            .args(["--builder", builder])
            .args(
                ["--host-key", "--authorized-keys", "--builder-key"]
                    .iter()
                    .flat_map(|f| [f.as_ref(), missing.as_os_str()]),
            )
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = start("10.0.0.1:22");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--builder \"10.0.0.1:22\"") && err.contains("HOST:PORT=SLOTS"),
        "{err}"
    );
    let (code, err) = start("10.0.0.1:22=1");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--host-key") && err.contains("OpenSSH private key"),
        "{err}"
    );

    // Builders come from exactly one place.
    let keys = ["--host-key=/k", "--authorized-keys=/a", "--builder-key=/g"];
    let run = |extra: &[&str]| {
        let out = Command::new(GATEWAY).args(keys).args(extra).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--builder <HOST:PORT=SLOTS>|--builders-selector <SELECTOR>"),
        "neither: {err}"
    );
    let (code, err) = run(&["--builder=10.0.0.1:22=1", "--builders-selector=app=b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--builder") && err.contains("cannot be used with") && err.contains("--builders-selector"),
        "both: {err}"
    );
}
