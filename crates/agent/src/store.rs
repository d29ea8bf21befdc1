//! The store at `/nix`: the image's own `/nix` as the read-only lower layer of an overlay whose
//! writable upper layer lives on the pod's store volume. Nothing is copied, so a builder starts
//! as fast with a 500 MB store in its image as with a 10 MB one, and the image's store database
//! (every path of the image registered) is the lower layer's, seen as is.
//!
//! Where the volume's file system cannot hold an overlay's upper layer (some CSI volumes, an
//! overlay-on-overlay node), the image's `/nix` is copied into the volume once and bind-mounted
//! at `/nix`: start time then grows with the image's store, and the log says so.
//!
//! On the volume:
//! - `upper/`, `work/`: the overlay's layers, reused when the container restarts in the same pod;
//! - `copy/` and `copy.done`: the fallback's copy, reused once `copy.done` exists.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

use crate::layout::Layout;

pub const UPPER: &str = "upper";
pub const WORK: &str = "work";
pub const COPY: &str = "copy";
pub const COPY_DONE: &str = "copy.done";

/// How `/nix` was set up.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `/nix` already is the overlay (or the copy) on this volume: `run` started again in the
    /// same mount namespace.
    AlreadyMounted,
    /// The overlay is mounted; `reused` when the upper layer has content from an earlier
    /// container of this pod.
    Overlay { reused: bool },
    /// The fallback: the image's `/nix` was copied into the volume (or an earlier complete copy
    /// was reused: `copied` is `None`) and bind-mounted at `/nix`.
    Copied { copied: Option<Copied> },
}

#[derive(Debug, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store volume {0} is not a directory: mount the pod's store volume there")]
    NoVolume(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} cannot be given to overlayfs (a path with ',', ':' or '\\')")]
    BadPath(PathBuf),
    #[error("mount -t overlay on {target} ({options}): {errno}")]
    Overlay {
        target: PathBuf,
        options: String,
        errno: nix::errno::Errno,
    },
    #[error("{0}")]
    Copy(String),
    #[error("mount --bind {from} {to}: {errno}")]
    Bind {
        from: PathBuf,
        to: PathBuf,
        errno: nix::errno::Errno,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { action, path, source }
}

/// The mount options of the overlay, or why a path cannot be one of them (overlayfs splits
/// its options on `,` and its lower directories on `:`).
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String, StoreError> {
    let mut parts = Vec::new();
    for (key, p) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let s = p.to_str().ok_or_else(|| StoreError::BadPath(p.to_path_buf()))?;
        if s.contains([',', ':', '\\']) {
            return Err(StoreError::BadPath(p.to_path_buf()));
        }
        parts.push(format!("{key}={s}"));
    }
    Ok(parts.join(","))
}

/// One line of `/proc/self/mountinfo`: the mount point, the file-system type and the
/// super-block options. Fields: id, parent, dev, root, mount point, options, optional fields
/// up to `-`, then type, source, super options. Spaces in paths are octal-escaped (`\040`).
#[derive(Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub root: PathBuf,
    pub fs_type: String,
    pub super_options: String,
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let unescape = |s: &str| -> PathBuf {
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        use std::os::unix::ffi::OsStringExt as _;
        PathBuf::from(std::ffi::OsString::from_vec(out))
    };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            if dash < 6 || fields.len() < dash + 4 {
                return None;
            }
            Some(MountEntry {
                root: unescape(fields[3]),
                mount_point: unescape(fields[4]),
                fs_type: fields[dash + 1].to_string(),
                super_options: fields[dash + 3].to_string(),
            })
        })
        .collect()
}

/// Whether the topmost mount at `target` is this volume's store: the overlay with `upper` as its
/// upper layer, or a bind mount of the volume's `copy` directory.
pub fn already_mounted(entries: &[MountEntry], target: &Path, upper: &Path, volume: &Path) -> bool {
    let top_at = |p: &Path| entries.iter().rev().find(|e| e.mount_point == p);
    let Some(top) = top_at(target) else {
        return false;
    };
    if top.fs_type == "overlay" {
        let wanted = format!("upperdir={}", upper.display());
        return top.super_options.split(',').any(|o| o == wanted);
    }
    top_at(volume).is_some_and(|v| top.root == v.root.join(COPY))
}

/// Mounts the overlay at `<root>/nix` (lower: the image's `/nix`; upper and work on `volume`),
/// or returns why not. The caller falls back to [`copy`].
pub fn overlay(layout: &Layout, volume: &Path) -> Result<Outcome, StoreError> {
    let nix_dir = layout.path("/nix");
    let vol = layout.path(volume);
    if !vol.is_dir() {
        return Err(StoreError::NoVolume(vol));
    }
    let (upper, work) = (vol.join(UPPER), vol.join(WORK));
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let entries = parse_mountinfo(&mountinfo);
    if already_mounted(&entries, &nix_dir, &upper, &vol) {
        return Ok(Outcome::AlreadyMounted);
    }
    if vol.join(COPY_DONE).is_file() {
        // An earlier container of this pod fell back to a copy: keep using it.
        return Err(StoreError::Copy(format!(
            "{} exists: an earlier container of this pod copied the store",
            vol.join(COPY_DONE).display()
        )));
    }
    for d in [&upper, &work] {
        fs::create_dir_all(d).map_err(io("create", d))?;
    }
    let reused = fs::read_dir(&upper).map_err(io("read", &upper))?.next().is_some();
    let options = overlay_options(&nix_dir, &upper, &work)?;
    mount(
        Some("overlay"),
        &nix_dir,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|errno| StoreError::Overlay {
        target: nix_dir.clone(),
        options,
        errno,
    })?;
    Ok(Outcome::Overlay { reused })
}

/// The fallback: copies the image's `/nix` into `<volume>/copy` (`cp -a`, which keeps owners,
/// modes, times, hard links and the store database) unless an earlier complete copy is there,
/// then bind-mounts it at `/nix`.
pub fn copy(layout: &Layout, volume: &Path, cp: &Path) -> Result<Outcome, StoreError> {
    let nix_dir = layout.path("/nix");
    let vol = layout.path(volume);
    if !vol.is_dir() {
        return Err(StoreError::NoVolume(vol));
    }
    let (dest, done) = (vol.join(COPY), vol.join(COPY_DONE));
    let mut copied = None;
    if !done.is_file() {
        let started = Instant::now();
        if dest.exists() {
            // A copy cut short by a restart: start again.
            fs::remove_dir_all(&dest).map_err(io("remove the partial copy", &dest))?;
        }
        fs::create_dir_all(&dest).map_err(io("create", &dest))?;
        let out = Command::new(cp)
            .arg("-a")
            .arg(format!("{}/.", nix_dir.display()))
            .arg(&dest)
            .output()
            .map_err(io("run", cp))?;
        if !out.status.success() {
            return Err(StoreError::Copy(format!(
                "cp -a {}/. {}: {}",
                nix_dir.display(),
                dest.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::write(&done, b"").map_err(io("write", &done))?;
        copied = Some(Copied {
            bytes: disk_usage(&dest),
            elapsed: started.elapsed(),
        });
    }
    mount(
        Some(&dest),
        &nix_dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|errno| StoreError::Bind {
        from: dest.clone(),
        to: nix_dir.clone(),
        errno,
    })?;
    Ok(Outcome::Copied { copied })
}

/// Bytes of the regular files under `dir` (hard links once), for the log line.
fn disk_usage(dir: &Path) -> u64 {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total += m.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_name_the_three_layers() {
        let o = overlay_options(
            Path::new("/nix"),
            Path::new("/nix-volume/upper"),
            Path::new("/nix-volume/work"),
        )
        .unwrap();
        assert_eq!(o, "lowerdir=/nix,upperdir=/nix-volume/upper,workdir=/nix-volume/work");
    }

    #[test]
    fn overlay_options_refuse_separators() {
        for bad in ["/a,b", "/a:b", "/a\\b"] {
            let e = overlay_options(Path::new(bad), Path::new("/u"), Path::new("/w")).unwrap_err();
            assert!(matches!(e, StoreError::BadPath(p) if p == Path::new(bad)), "{bad}");
        }
    }

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/l1,upperdir=/var/lib/u1,workdir=/var/lib/w1
30 22 253:0 /var/lib/kubelet/pods/x/volumes/kubernetes.io~empty-dir/nix /nix-volume rw,relatime shared:1 - ext4 /dev/vda rw
31 22 0:40 / /nix rw,relatime - overlay overlay rw,lowerdir=/nix,upperdir=/nix-volume/upper,workdir=/nix-volume/work
32 22 0:41 / /run/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_is_parsed_with_optional_fields_and_escapes() {
        let e = parse_mountinfo(MOUNTINFO);
        assert_eq!(e.len(), 4);
        assert_eq!(e[1].mount_point, Path::new("/nix-volume"));
        assert_eq!(e[1].fs_type, "ext4");
        assert_eq!(
            e[1].root,
            Path::new("/var/lib/kubelet/pods/x/volumes/kubernetes.io~empty-dir/nix")
        );
        assert_eq!(e[2].fs_type, "overlay");
        assert_eq!(e[3].mount_point, Path::new("/run/with space"));
        assert!(parse_mountinfo("garbage line\n").is_empty());
    }

    #[test]
    fn our_overlay_is_recognised_and_another_is_not() {
        let e = parse_mountinfo(MOUNTINFO);
        let copy = Path::new("/nix-volume");
        assert!(already_mounted(
            &e,
            Path::new("/nix"),
            Path::new("/nix-volume/upper"),
            copy
        ));
        assert!(!already_mounted(
            &e,
            Path::new("/nix"),
            Path::new("/elsewhere/upper"),
            copy
        ));
        // The root file system's overlay is not a store mount.
        assert!(!already_mounted(&e, Path::new("/"), Path::new("/var/lib/u2"), copy));
        assert!(!already_mounted(
            &e,
            Path::new("/absent"),
            Path::new("/nix-volume/upper"),
            copy
        ));
    }

    #[test]
    fn a_bind_mounted_copy_is_recognised_by_its_root() {
        let text = "30 22 253:0 /pods/x/nix /nix-volume rw - ext4 /dev/vda rw\n\
                    40 22 253:0 /pods/x/nix/copy /nix rw - ext4 /dev/vda rw\n\
                    41 22 253:0 /pods/y/nix/copy /other rw - ext4 /dev/vda rw\n";
        let e = parse_mountinfo(text);
        let (upper, vol) = (Path::new("/nix-volume/upper"), Path::new("/nix-volume"));
        assert!(already_mounted(&e, Path::new("/nix"), upper, vol));
        assert!(!already_mounted(&e, Path::new("/other"), upper, vol));
    }

    #[test]
    fn disk_usage_counts_hard_links_once() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/a"), vec![0u8; 1000]).unwrap();
        fs::hard_link(d.path().join("sub/a"), d.path().join("b")).unwrap();
        fs::write(d.path().join("c"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("sub/a", d.path().join("l")).unwrap();
        assert_eq!(disk_usage(d.path()), 1024);
    }
}
