//! `nixpool-operator render`: every example renders to the children the operator would apply,
//! without any private key. The outputs are kept in the target's tmp directory for the suite's
//! secret-leak scan.

use std::process::Command;

const OPERATOR: &str = env!("CARGO_BIN_EXE_nixpool-operator");

#[test]
fn every_example_renders_its_children_and_no_private_key() {
    for example in ["minimal.yaml", "caches.yaml", "team-keys.yaml"] {
        let file = format!("{}/../../examples/{example}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(OPERATOR).args(["render", "-f", &file]).output().unwrap();
        assert!(
            out.status.success(),
            "render {example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        std::fs::write(format!("{}/render-{example}.out", env!("CARGO_TARGET_TMPDIR")), &text).unwrap();
        let kinds: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
        for kind in ["Secret", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"] {
            assert!(kinds.contains(&kind), "render {example} has no {kind}: {kinds:?}");
        }
        assert!(!text.contains("PRIVATE KEY"), "render {example} printed a private key");
        assert!(
            text.contains("ssh_host_ed25519_key.pub"),
            "render {example}: the public host key is shown"
        );
    }
}
