//! Pieces of the whole flow, for the whole-flow tests and the demo: the product's binaries, a
//! client key, a derivation that needs no nixpkgs, and a real `nix-build` on the host store that
//! builds only remotely, through a machines file.

use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// The workspace's binaries, next to the running executable (`target/<profile>/` or its
/// `deps/`). `cargo test --workspace` and `cargo build --workspace --bins` put them there.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` first",
        exe.display()
    )
}

/// Adds to an `ssh` command what every test login uses: only `key`, the host key pinned in
/// `known_hosts`, no config file, no prompts, a 5 s connect timeout.
pub fn ssh_args<'a>(
    ssh: &'a mut Command,
    key: &Path,
    known_hosts: &Path,
    destination: &str,
    command: &str,
) -> &'a mut Command {
    ssh.arg("-i")
        .arg(key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "ConnectTimeout=5", "-F", "/dev/null"])
        .arg(destination)
        .arg(command)
}

/// A passphrase-less ed25519 client key (what `builderctl keygen` makes), 0600, root's.
pub struct ClientKey {
    pub path: PathBuf,
    pub public: String,
}

impl ClientKey {
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("pub"));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .output()?;
        if !out.status.success() {
            bail!("ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let public = std::fs::read_to_string(path.with_extension("pub"))?.trim().to_string();
        Ok(Self { path, public })
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Writes a derivation whose builder is static busybox (no nixpkgs needed) that runs `script`,
/// and returns the file. Every call gives a new derivation (a nonce), so nothing is cached.
pub fn derivation(dir: &Path, name: &str, script: &str) -> anyhow::Result<PathBuf> {
    let bb = dir.join("busybox-dir");
    if !bb.join("bin/sh").exists() {
        std::fs::create_dir_all(bb.join("bin"))?;
        std::fs::copy("/bin/busybox", bb.join("bin/busybox"))
            .context("/bin/busybox: apt-get install busybox-static")?;
        symlink("busybox", bb.join("bin/sh"))?;
    }
    let nonce = format!(
        "{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        jiff::Timestamp::now().as_nanosecond()
    );
    let file = dir.join(format!("{name}.nix"));
    std::fs::write(
        &file,
        format!(
            r#"let bb = builtins.path {{ path = {bb}; name = "nixpool-busybox"; }}; in
derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = "${{bb}}/bin/sh";
  args = [ "-c" "{script}" ];
  PATH = "${{bb}}/bin";
  nonce = "{nonce}";
}}
"#,
            bb = bb.display()
        ),
    )?;
    Ok(file)
}

/// Arguments of a `nix-build` of `file` that may only build remotely (`--max-jobs 0`), on the
/// `builders` given (a machines line, or `@<machines file>`), with no substituters.
pub fn nix_build_args(builders: &str, file: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![file.into()];
    for a in ["--no-out-link", "--max-jobs", "0", "--option", "builders", builders] {
        args.push(a.into());
    }
    for a in [
        "--option",
        "substituters",
        "",
        "--option",
        "builders-use-substitutes",
        "false",
        "--option",
        "connect-timeout",
        "5",
    ] {
        args.push(a.into());
    }
    args
}

/// `nix-build` as root on the host store through the machines file: it can only succeed on a
/// remote builder of that file.
pub fn nix_build_command(machines: &Path, file: &Path) -> Command {
    let mut c = Command::new("nix-build");
    c.args(nix_build_args(&format!("@{}", machines.display()), file));
    c
}

pub fn nix_build(machines: &Path, file: &Path) -> anyhow::Result<Output> {
    Ok(nix_build_command(machines, file).output()?)
}

/// sshd's StrictModes refuses an authorized-keys file below a directory that others can write
/// (like /tmp): make `dir` and its parents 0755 where they are not sticky-world-writable system
/// directories, and refuse when one is. For the hand-made builder a benchmark compares against.
pub fn make_traversable(dir: &Path) -> anyhow::Result<()> {
    for d in dir.ancestors() {
        let meta = std::fs::metadata(d)?;
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            if mode & 0o1000 != 0 {
                bail!(
                    "{} is world-writable (like /tmp or /dev/shm): sshd refuses keys below it; use another directory",
                    d.display()
                );
            }
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode & !0o022))?;
        }
    }
    Ok(())
}

/// The median of measured durations (the upper one of an even count), for the benches.
pub fn median(mut v: Vec<std::time::Duration>) -> std::time::Duration {
    v.sort();
    v[v.len() / 2]
}

/// A duration as whole milliseconds, for the benches' tables.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Times a trivial remote build (`echo ok`) through `machines`, panicking if it fails.
pub fn timed_build(machines: &Path, dir: &Path, name: &str) -> std::time::Duration {
    let drv = derivation(dir, name, "echo ok > $out").unwrap();
    let t = std::time::Instant::now();
    let out = nix_build(machines, &drv).unwrap();
    assert!(
        out.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}
