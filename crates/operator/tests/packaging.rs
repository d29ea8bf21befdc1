//! The packaging around the binaries: the Nix files parse, the FluxCD and nix-darwin examples
//! say what they mean and what they say is accepted by the chart.

mod common;

use std::process::Command;

use common::*;
use nixpool_testenv::need_tool;

fn nix_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // crates/ holds Rust, and at most Nix *snippets* as test fixtures (builderctl's golden output).
        if path.is_dir() && !name.starts_with('.') && name != "target" && name != "crates" {
            nix_files(&path, out);
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    need_tool("nix-instantiate", "apt-get install nix-bin").unwrap_or_else(|e| panic!("{e:#}"));
    let mut files = Vec::new();
    nix_files(std::path::Path::new(REPO), &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(REPO).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nix/packages.nix",
        "nix/release.nix",
        "image/builder.nix",
        "image/operator.nix",
        "examples/nix-darwin.nix",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(expected)),
            "{expected} is missing: {names:?}"
        );
    }
    for f in &files {
        run(Command::new("nix-instantiate").arg("--parse").arg(f));
    }
}

#[test]
fn the_flake_offers_what_users_build() {
    let flake = std::fs::read_to_string(format!("{REPO}/flake.nix")).unwrap();
    for attr in [
        "nixpool-operator",
        "nixpool-agent",
        "nixpool-gateway",
        "builderctl",
        "builder-image",
        "operator-image",
        "release",
        "devShells",
        "checks",
    ] {
        assert!(flake.contains(attr), "flake.nix lacks {attr}");
    }
    let image = std::fs::read_to_string(format!("{REPO}/image/builder.nix")).unwrap();
    assert!(
        image.contains("lib64/ld-linux-x86-64.so.2"),
        "the builder image must carry the FHS loader link"
    );
    assert!(
        image.contains(nixpool_api::paths::AGENT_BINARY),
        "the image's entrypoint is the agent"
    );
    assert!(
        image.contains("gateway"),
        "gateway pods run the builder image's nixpool-gateway"
    );
}

#[test]
fn the_nix_darwin_example_pins_the_host_key_and_uses_ssh_ng() {
    let text = std::fs::read_to_string(format!("{REPO}/examples/nix-darwin.nix")).unwrap();
    for needle in [
        "nix.distributedBuilds = true",
        "nix.buildMachines",
        "protocol = \"ssh-ng\"",
        "publicHostKey",
        "sshKey",
    ] {
        assert!(text.contains(needle), "examples/nix-darwin.nix lacks {needle}");
    }
    let b64 = text
        .split("publicHostKey = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let entry = nixpool_api::MachinesEntry::parse(&format!("ssh-ng://builder@h x86_64-linux - 1 1 - - {b64}")).unwrap();
    assert!(entry.host_public_key.unwrap().starts_with("ssh-ed25519 "));
}
