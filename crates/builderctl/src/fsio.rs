//! Reading and atomically replacing a root-owned config file.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be written. The file itself is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "{path}: permission denied ({what}). It belongs to root: run the same command with sudo, e.g. `sudo builderctl {hint}`"
    )]
    PermissionDenied {
        path: PathBuf,
        what: &'static str,
        hint: String,
    },
    #[error(
        "{path}: the file system is read-only ({what}). On nix-darwin or NixOS /etc is generated: use the printed nix.buildMachines snippet instead; elsewhere remount it read-write (with sudo)"
    )]
    ReadOnly { path: PathBuf, what: &'static str },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The previous content was saved here (`None` when there was no previous file or no
    /// backup was asked for).
    pub backup: Option<PathBuf>,
}

fn classify(path: &Path, what: &'static str, hint: &str, e: std::io::Error) -> WriteError {
    match e.kind() {
        ErrorKind::PermissionDenied => WriteError::PermissionDenied {
            path: path.into(),
            what,
            hint: hint.into(),
        },
        ErrorKind::ReadOnlyFilesystem => WriteError::ReadOnly {
            path: path.into(),
            what,
        },
        _ if e.raw_os_error() == Some(30) => WriteError::ReadOnly {
            path: path.into(),
            what,
        },
        _ => WriteError::Io {
            path: path.into(),
            what,
            source: e,
        },
    }
}

/// Reads a file; a missing file reads as empty.
pub fn read_or_empty(path: &Path) -> Result<String, WriteError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| WriteError::Io {
            path: path.into(),
            what: "reading it",
            source: std::io::Error::new(ErrorKind::InvalidData, "it is not UTF-8 text; fix or move it"),
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(classify(path, "reading it", "", e)),
    }
}

/// The backup path of `path`: `<path>.builderctl-backup`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".builderctl-backup");
    PathBuf::from(s)
}

/// Replaces `path` with `contents` atomically: a temp file in the same directory, fsync,
/// rename, fsync of the directory. Keeps the mode and owner of the existing file (new files get
/// `new_mode`), follows a symlink to write its target, and first saves the old content to
/// `<path>.builderctl-backup` (itself written atomically) when `backup` is set. On any error the
/// file is left as it was and no temp file remains.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    new_mode: u32,
    backup: bool,
    hint: &str,
) -> Result<Written, WriteError> {
    let target = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == ErrorKind::NotFound => path.to_path_buf(),
        Err(e) => return Err(classify(path, "resolving it", hint, e)),
    };
    let old = match fs::metadata(&target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(classify(path, "reading its mode", hint, e)),
    };
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| classify(dir, "creating its directory", hint, e))?;
    }
    let mut written = Written { backup: None };
    if backup && let Some(m) = &old {
        let previous = fs::read(&target).map_err(|e| classify(path, "reading it for the backup", hint, e))?;
        let b = backup_path(&target);
        replace(&b, &previous, m.mode() & 0o7777, Some((m.uid(), m.gid())), hint)?;
        written.backup = Some(b);
    }
    let mode = old.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(new_mode);
    let owner = old.as_ref().map(|m| (m.uid(), m.gid()));
    replace(&target, contents, mode, owner, hint)?;
    Ok(written)
}

fn replace(target: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>, hint: &str) -> Result<(), WriteError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".builderctl-tmp")
        .tempfile_in(dir)
        .map_err(|e| classify(target, "creating a temp file next to it", hint, e))?;
    // From here on, dropping `tmp` on an error removes the temp file.
    let f = tmp.as_file_mut();
    f.write_all(contents)
        .map_err(|e| classify(target, "writing the temp file", hint, e))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| classify(target, "setting the mode", hint, e))?;
    if let Some((uid, gid)) = owner {
        let m = f
            .metadata()
            .map_err(|e| classify(target, "reading the temp file", hint, e))?;
        if (m.uid(), m.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&*f, Some(uid), Some(gid))
                .map_err(|e| classify(target, "keeping the owner", hint, e))?;
        }
    }
    f.sync_all()
        .map_err(|e| classify(target, "syncing the temp file", hint, e))?;
    tmp.persist(target)
        .map_err(|e| classify(target, "renaming the temp file over it", hint, e.error))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
