//! `run --store-volume`: the image's `/nix` under an overlay layer on the volume, reused when
//! the container starts again; and the copy where no overlay can be mounted, reused too.
//!
//! Each test runs the real agent in a mount namespace of its own over a scratch root whose
//! `nix` plays the image's `/nix`. The agent has no config, so it stops right after setting up
//! the store (exit 1, naming the config); the namespace keeps its mounts for the checks.

mod support;

use std::fs;
use std::path::Path;
use std::process::Output;

use support::*;

/// Runs the agent once (as a container start does), returning its JSON log.
fn start(b: &Builder) -> String {
    let out: Output = run(b.inside(AGENT).arg("--root").arg(&b.root.root).args([
        "--log-format",
        "json",
        "run",
        "--store-volume",
        "/nix-volume",
        "--sshd",
        SSHD,
        "--nix-daemon",
        NIX_DAEMON,
        "--nix-store",
        NIX_STORE,
    ]));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the agent has no config and must stop: {log}");
    assert!(
        log.contains("cannot read the agent config"),
        "it stopped for another reason than the missing config: {log}"
    );
    log
}

/// A builder namespace whose `nix` holds one "image" store path, with an empty volume and no
/// agent config.
fn image_root() -> Builder {
    let b = Builder::new(&config("store"));
    fs::remove_file(b.root.path("/etc/nixpool/agent.json")).unwrap();
    let p = b.root.path("/nix/store/aaaa-image-path");
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("file"), "from the image\n").unwrap();
    fs::create_dir_all(b.root.path("/nix-volume")).unwrap();
    b
}

/// `sh -c script` inside the builder's namespaces, with `$R` the scratch root.
fn sh(b: &Builder, script: &str) -> String {
    let out = ok(b.inside("sh").env("R", &b.root.root).args(["-c", script]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The mountinfo lines of mounts at `$R/nix` (field 5, the mount point).
const MOUNTS_AT_NIX: &str = "awk '$5 == ENVIRON[\"R\"] \"/nix\"' /proc/self/mountinfo";

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

#[test]
fn the_image_store_is_overlaid_not_copied_and_the_layer_is_reused_on_restart() {
    let b = image_root();
    let log = start(&b);
    assert!(
        log.contains("nothing copied") && log.contains("\"reused\":false"),
        "{log}"
    );
    assert!(!log.contains("falling back"), "{log}");
    // Inside: the image's path, and a write lands in the volume's upper layer.
    assert_eq!(sh(&b, "cat $R/nix/store/aaaa-image-path/file"), "from the image\n");
    assert!(sh(&b, MOUNTS_AT_NIX).contains(" - overlay "));
    sh(&b, "echo built > $R/nix/store/bbbb-built");
    assert!(exists(&b.root.path("/nix-volume/upper/store/bbbb-built")));
    // Outside the namespace the image's /nix is untouched: nothing was copied or written there.
    assert!(!exists(&b.root.path("/nix/store/bbbb-built")));
    assert!(!exists(&b.root.path("/nix-volume/copy")));
    // Deleting an image path (as garbage collection does) hides it, in the upper layer only.
    sh(&b, "rm -r $R/nix/store/aaaa-image-path");
    assert_eq!(sh(&b, "ls $R/nix/store"), "bbbb-built\n");
    assert!(exists(&b.root.path("/nix/store/aaaa-image-path/file")));

    // Started again in the same mount namespace: already set up, nothing mounted twice.
    let log = start(&b);
    assert!(log.contains("already set up"), "{log}");
    assert_eq!(sh(&b, MOUNTS_AT_NIX).lines().count(), 1);

    // A container restart (a new mount namespace, simulated by unmounting): the layer is kept.
    sh(&b, "umount $R/nix");
    let log = start(&b);
    assert!(
        log.contains("nothing copied") && log.contains("\"reused\":true"),
        "{log}"
    );
    assert_eq!(sh(&b, "ls $R/nix/store"), "bbbb-built\n");
}

#[test]
fn where_no_overlay_can_be_mounted_the_store_is_copied_once_and_reused() {
    let b = image_root();
    // The image's /nix already two overlays deep (as on a node whose containerd itself runs on
    // an overlay, like kind): one more exceeds the kernel's stacking depth.
    let scratch = b.root.dir.path().display().to_string();
    sh(
        &b,
        &format!(
            "set -e; for i in 1 2; do mkdir -p {scratch}/o$i/u {scratch}/o$i/w; \
             mount -t overlay o$i -o lowerdir=$R/nix,upperdir={scratch}/o$i/u,workdir={scratch}/o$i/w $R/nix; done"
        ),
    );
    let log = start(&b);
    assert!(log.contains("falling back to copying"), "{log}");
    assert!(log.contains("copied the image's /nix into the store volume"), "{log}");
    assert!(log.contains("\"bytes\":15"), "the copy's size is logged: {log}");
    assert!(exists(&b.root.path("/nix-volume/copy.done")));
    assert_eq!(
        fs::read_to_string(b.root.path("/nix-volume/copy/store/aaaa-image-path/file")).unwrap(),
        "from the image\n"
    );
    // /nix is the copy: a write lands in it.
    sh(&b, "echo built > $R/nix/store/bbbb-built");
    assert!(exists(&b.root.path("/nix-volume/copy/store/bbbb-built")));

    // A container restart: the complete copy is reused, not made again.
    sh(&b, "umount $R/nix");
    let log = start(&b);
    assert!(log.contains("reusing this pod's earlier copy"), "{log}");
    assert!(!log.contains("copied the image's /nix"), "{log}");
    assert_eq!(sh(&b, "ls $R/nix/store"), "aaaa-image-path\nbbbb-built\n");
}
