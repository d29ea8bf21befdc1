//! The FHS a Nix image lacks, found rather than hard-coded, and the file-writing helpers every
//! step uses (atomic, idempotent, root-owned).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::error::{FsError, fs_err};
use crate::layout::Layout;

/// Where binaries expect the dynamic loader, and its file name.
#[cfg(target_arch = "aarch64")]
pub const LOADER_LINK: &str = "/lib/ld-linux-aarch64.so.1";
#[cfg(not(target_arch = "aarch64"))]
pub const LOADER_LINK: &str = "/lib64/ld-linux-x86-64.so.2";

pub fn loader_name() -> &'static str {
    LOADER_LINK.rsplit('/').next().expect("a file name")
}

/// Where a link's target came from (printed by `check` and logged by `run`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The interpreter recorded in the nix-daemon binary (the glibc Nix itself runs on).
    Interpreter,
    /// Found by searching the store.
    Store,
    /// The image (or host) already has it; left alone.
    Existing,
    /// Taken from the host's own file because neither the root nor its store has one.
    Host,
}

/// A symlink the agent makes.
#[derive(Clone, Debug)]
pub struct Link {
    pub link: PathBuf,
    pub target: PathBuf,
    pub source: Source,
}

/// The ELF program interpreter (`PT_INTERP`) of a 64-bit little-endian binary.
pub fn elf_interpreter(binary: &Path) -> Option<String> {
    let data = fs::read(binary).ok()?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if data.get(0..4)? != b"\x7fELF" || data.get(4)? != &2 || data.get(5)? != &1 {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? == 3 {
            let (off, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let raw = data.get(off..off + size)?;
            let s = raw.split(|b| *b == 0).next()?;
            return String::from_utf8(s.to_vec()).ok();
        }
    }
    None
}

/// Store entries (full paths under the root) that contain `rel`, best first: entries whose name
/// contains `prefer` first, then by name, highest first (so a newer version wins).
pub fn search_store(layout: &Layout, rel: &str, prefer: &str) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(layout.store()) else {
        return Vec::new();
    };
    let mut found: Vec<(bool, String, PathBuf)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let candidate = e.path().join(rel);
            candidate.exists().then(|| {
                let pname = name.split_once('-').map(|(_, p)| p.to_string()).unwrap_or(name.clone());
                (pname.contains(prefer), pname, candidate)
            })
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    found.into_iter().map(|(_, _, p)| p).collect()
}

/// The loader link: the nix-daemon's own interpreter if it is a store path under the root, else
/// the newest glibc in the store, else whatever is already there, else (root not `/`) the host's.
pub fn find_loader(layout: &Layout, nix_daemon: &Path) -> Result<Link, String> {
    let link = layout.path(LOADER_LINK);
    if let Some(interp) = elf_interpreter(nix_daemon).filter(|i| i.starts_with("/nix/store/")) {
        let under_root = layout.path(&interp);
        if under_root.exists() {
            return Ok(Link {
                link,
                target: under_root,
                source: Source::Interpreter,
            });
        }
    }
    let rel = format!("lib/{}", loader_name());
    if let Some(target) = search_store(layout, &rel, "glibc").into_iter().next() {
        return Ok(Link {
            link,
            target,
            source: Source::Store,
        });
    }
    if link.exists() {
        let target = fs::canonicalize(&link).unwrap_or(link.clone());
        return Ok(Link {
            link,
            target,
            source: Source::Existing,
        });
    }
    match fs::canonicalize(LOADER_LINK) {
        Ok(target) if !layout.is_slash() => Ok(Link {
            link,
            target,
            source: Source::Host,
        }),
        _ => Err(format!(
            "no glibc loader: {} has no */lib/{} and {} does not exist; the image must ship glibc in its store",
            layout.store().display(),
            loader_name(),
            layout.path(LOADER_LINK).display()
        )),
    }
}

/// A tool link such as `/bin/sh`: kept if present, else from the store (`rels` in order), else
/// the host's.
pub fn find_tool(layout: &Layout, at: &str, rels: &[(&str, &str)]) -> Result<Link, String> {
    let link = layout.path(at);
    if link.exists() {
        let target = fs::canonicalize(&link).unwrap_or(link.clone());
        return Ok(Link {
            link,
            target,
            source: Source::Existing,
        });
    }
    for (rel, prefer) in rels {
        if let Some(target) = search_store(layout, rel, prefer).into_iter().next() {
            return Ok(Link {
                link,
                target,
                source: Source::Store,
            });
        }
    }
    match fs::canonicalize(at) {
        Ok(target) if !layout.is_slash() => Ok(Link {
            link,
            target,
            source: Source::Host,
        }),
        _ => Err(format!(
            "{at}: not in the image and no store path has {}",
            rels.iter().map(|r| r.0).collect::<Vec<_>>().join(" or ")
        )),
    }
}

/// The CA bundle for substituters: the image's, else a store `cacert`, linked to the usual place.
pub fn find_ca_bundle(layout: &Layout) -> Option<Link> {
    let at = "/etc/ssl/certs/ca-certificates.crt";
    let link = layout.path(at);
    if link.exists() {
        return Some(Link {
            target: link.clone(),
            link,
            source: Source::Existing,
        });
    }
    let target = search_store(layout, "etc/ssl/certs/ca-bundle.crt", "cacert")
        .into_iter()
        .next()?;
    Some(Link {
        link,
        target,
        source: Source::Store,
    })
}

/// `/dev/kvm` can be opened read-write.
pub fn kvm_usable(layout: &Layout) -> bool {
    fs::OpenOptions::new().read(true).write(true).open(layout.kvm()).is_ok()
}

/// Makes `link` point at `target` (atomically replacing another symlink). Leaves an existing
/// regular file alone. Returns whether anything changed.
pub fn ensure_link(l: &Link) -> Result<bool, FsError> {
    if l.source == Source::Existing {
        return Ok(false);
    }
    if let Ok(current) = fs::read_link(&l.link) {
        if current == l.target {
            return Ok(false);
        }
    } else if l.link.exists() {
        return Ok(false);
    }
    let parent = l.link.parent().expect("a link has a parent");
    fs::create_dir_all(parent).map_err(fs_err("create directory", parent))?;
    let tmp = tmp_name(&l.link);
    let _ = fs::remove_file(&tmp);
    symlink(&l.target, &tmp).map_err(fs_err("create symlink", &tmp))?;
    fs::rename(&tmp, &l.link).map_err(fs_err("rename into place", &l.link))?;
    Ok(true)
}

/// Creates `dir` (and parents) and sets its mode and its owner (`uid`, `gid`; parents it
/// creates stay root's).
pub fn ensure_dir(dir: &Path, mode: u32, (uid, gid): (u32, u32)) -> Result<(), FsError> {
    fs::create_dir_all(dir).map_err(fs_err("create directory", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(fs_err("chmod", dir))?;
    chown(dir, uid, gid)
}

fn chown_root(path: &Path) -> Result<(), FsError> {
    chown(path, 0, 0)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), FsError> {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| FsError {
            action: "chown",
            path: path.into(),
            source: e.into(),
        })?;
    }
    Ok(())
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.nixpool-tmp-{}", std::process::id()))
}

/// Writes `content` to `path` atomically (temp file, fsync, rename) with `mode`, owned by root.
/// Skips the write when the file already has this content and mode. Returns whether it wrote.
pub fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<bool, FsError> {
    if let (Ok(old), Ok(meta)) = (fs::read(path), fs::symlink_metadata(path))
        && old == content
        && meta.permissions().mode() & 0o7777 == mode
        && meta.file_type().is_file()
    {
        return Ok(false);
    }
    let parent = path.parent().expect("a file has a parent");
    fs::create_dir_all(parent).map_err(fs_err("create directory", parent))?;
    let tmp = tmp_name(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fs_err("create", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(fs_err("chmod", &tmp))?;
    chown_root(&tmp)?;
    f.write_all(content)
        .and_then(|()| f.sync_all())
        .map_err(fs_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(fs_err("rename into place", path))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_interpreter_of_a_real_binary() {
        let interp = elf_interpreter(Path::new("/bin/sh").canonicalize().unwrap().as_path());
        assert!(interp.as_deref().is_some_and(|i| i.contains("ld-linux")), "{interp:?}");
        assert_eq!(elf_interpreter(Path::new("/etc/hostname")), None);
    }

    #[test]
    fn finds_the_newest_glibc_loader_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        for name in ["aaaa-glibc-2.38", "bbbb-glibc-2.40", "cccc-gcc-13-lib"] {
            let lib = layout.store().join(name).join("lib");
            fs::create_dir_all(&lib).unwrap();
            fs::write(lib.join(loader_name()), b"").unwrap();
        }
        let l = find_loader(&layout, Path::new("/nonexistent")).unwrap();
        assert_eq!(l.source, Source::Store);
        assert_eq!(l.target, layout.store().join("bbbb-glibc-2.40/lib").join(loader_name()));
        assert!(ensure_link(&l).unwrap());
        assert!(!ensure_link(&l).unwrap(), "second run changes nothing");
        assert_eq!(fs::read_link(layout.path(LOADER_LINK)).unwrap(), l.target);
    }

    #[test]
    fn falls_back_to_the_host_loader_for_a_scratch_root_without_glibc() {
        let dir = tempfile::tempdir().unwrap();
        let l = find_loader(&Layout::new(dir.path()), Path::new("/nonexistent")).unwrap();
        assert_eq!(l.source, Source::Host);
        assert!(l.target.exists());
    }

    #[test]
    fn write_file_is_atomic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b");
        assert!(write_file(&p, b"x", 0o600).unwrap());
        assert!(!write_file(&p, b"x", 0o600).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_file(&p, b"x", 0o644).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }
}
