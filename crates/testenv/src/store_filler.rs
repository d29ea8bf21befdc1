//! A image layer with a given amount of valid store paths under `/nix/store` (and the store
//! database that registers them), for benches of how builder start-up depends on the size of
//! the image's store. Made once per machine with the host's `nix-store --add` into a scratch
//! store, cached under the cache directory keyed by [`VERSION`] and the size.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cache_dir, need_tool};

/// Bump when the layer's content or layout changes.
const VERSION: &str = "v1";
/// Each store path holds this many files of [`FILE_BYTES`]: 10 MiB a path.
const FILES_PER_PATH: usize = 160;
const FILE_BYTES: usize = 64 * 1024;

/// A cached filler layer.
pub struct Filler {
    /// `nix/store/...` and `nix/var/nix/db/...`, owned by root.
    pub layer: PathBuf,
    pub sha256: String,
    /// The store paths in it, each `FILES_PER_PATH` files of 64 KiB.
    pub paths: Vec<String>,
}

/// The layer with `mebibytes` (a multiple of 10) of store paths, built on first use.
pub fn filler(mebibytes: usize) -> anyhow::Result<Filler> {
    let count = mebibytes.div_ceil(10).max(1);
    let out = cache_dir().join(format!("store-filler-{VERSION}-{}m", count * 10));
    let read = |dir: &Path| -> anyhow::Result<Filler> {
        Ok(Filler {
            layer: dir.join("layer.tar"),
            sha256: std::fs::read_to_string(dir.join("layer.tar.sha256"))?
                .trim()
                .to_string(),
            paths: std::fs::read_to_string(dir.join("paths"))?
                .lines()
                .map(str::to_string)
                .collect(),
        })
    };
    if out.join("paths").is_file() {
        return read(&out);
    }
    need_tool("nix-store", "apt-get install nix-bin")?;
    need_tool("tar", "apt-get install tar")?;
    let tmp = out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let (src, root) = (tmp.join("src"), tmp.join("root"));
    let mut dirs = Vec::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for p in 0..count {
        let d = src.join(format!("filler-{p:03}"));
        std::fs::create_dir_all(&d)?;
        for f in 0..FILES_PER_PATH {
            // xorshift: incompressible and never sparse, so every byte is really written.
            let mut bytes = Vec::with_capacity(FILE_BYTES);
            while bytes.len() < FILE_BYTES {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.extend_from_slice(&state.to_le_bytes());
            }
            std::fs::write(d.join(format!("file-{f:03}")), &bytes)?;
        }
        dirs.push(d);
    }
    std::fs::create_dir_all(&root)?;
    let added = Command::new("nix-store")
        .arg("--store")
        .arg(&root)
        .arg("--add")
        .args(&dirs)
        .output()
        .context("nix-store --add")?;
    if !added.status.success() {
        bail!("nix-store --add: {}", String::from_utf8_lossy(&added.stderr));
    }
    let paths = String::from_utf8(added.stdout)?;
    if paths.lines().count() != count {
        bail!("nix-store --add printed {paths:?}, expected {count} store paths");
    }
    std::fs::remove_dir_all(&src)?;
    let layer = tmp.join("layer.tar");
    let tar = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
        .arg(&layer)
        .arg("-C")
        .arg(&root)
        .arg("nix")
        .output()?;
    if !tar.status.success() {
        bail!("tar: {}", String::from_utf8_lossy(&tar.stderr));
    }
    std::fs::remove_dir_all(&root)?;
    let sha = Command::new("sha256sum").arg(&layer).output()?;
    let sha = String::from_utf8(sha.stdout)?
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string();
    std::fs::write(tmp.join("layer.tar.sha256"), format!("{sha}\n"))?;
    std::fs::write(tmp.join("paths"), paths)?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out)?;
    read(&out)
}
