//! Private files and directories: the one writer for keys and state files.
//!
//! Every key and state file meshd and the coordinator write goes through
//! [`write_private_atomic`] (or [`create_private_atomic`] for a file that must never be
//! replaced, such as a host key): the data goes to a temporary file (mode 0600) in the same
//! directory, which is fsynced, renamed (or linked) over the target, and the directory is
//! fsynced. A crash or a full disk leaves either the old file or the new one, never a
//! truncated one, and no temporary file behind. State directories are made 0700
//! ([`ensure_private_dir`]); an existing one that group or others may enter is refused with the
//! `chmod` that fixes it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a private file or directory could not be written or was refused.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The directory could not be created or inspected.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file could not be written (nothing was changed at `path`).
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said (`No space left on device`, `Permission denied` …).
        source: io::Error,
    },
    /// [`create_private_atomic`]: the file exists and is kept.
    #[error("{} already exists; not replacing it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The path exists but is not a directory.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Group or others may access a directory or file that must be private.
    #[error(
        "{} is accessible by group or others (mode {mode:04o}); run `chmod {fix:o} {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The directory or file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The mode that fixes it (700 for a directory, 600 for a file).
        fix: u32,
    },
}

impl FsError {
    /// The OS error behind a failed write, if any.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            FsError::CreateDir { source, .. } | FsError::Write { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that the existing one is a
/// directory that group and others cannot access.
pub fn ensure_private_dir(dir: &Path) -> Result<(), FsError> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(FsError::NotADirectory {
            path: dir.to_owned(),
        }),
        Ok(m) => check_mode(dir, m.permissions().mode(), 0o700),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| FsError::CreateDir {
                path: dir.to_owned(),
                source,
            }),
        Err(source) => Err(FsError::CreateDir {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Refuses a file that group or others may access (a missing file is fine).
pub fn check_private_file(path: &Path) -> Result<(), FsError> {
    match std::fs::metadata(path) {
        Ok(m) => check_mode(path, m.permissions().mode(), 0o600),
        Err(_) => Ok(()),
    }
}

/// Sets an existing file's mode to 0600 (a missing file is fine). For files other programs
/// create, such as SQLite's `-wal` and `-shm`.
pub fn make_private(path: &Path) -> Result<(), FsError> {
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| FsError::Write {
                    path: path.to_owned(),
                    source,
                },
            )
        }
        _ => Ok(()),
    }
}

fn check_mode(path: &Path, mode: u32, fix: u32) -> Result<(), FsError> {
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FsError::Permissions {
            path: path.to_owned(),
            mode,
            fix,
        });
    }
    Ok(())
}

/// Writes `data` to `path` atomically with mode 0600, replacing any earlier file: temporary file
/// in the same directory, fsync, rename, fsync of the directory. On error `path` is untouched
/// and the temporary file is removed.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> Result<(), FsError> {
    publish(path, data, Publish::Replace)
}

/// As [`write_private_atomic`], but refuses ([`FsError::Exists`]) to replace an existing file
/// (a host key: replacing it changes the host's identity). Atomic too: the file appears whole
/// or not at all.
pub fn create_private_atomic(path: &Path, data: &[u8]) -> Result<(), FsError> {
    publish(path, data, Publish::New)
}

#[derive(Clone, Copy)]
enum Publish {
    Replace,
    New,
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary name next to `path` no other writer uses (process id and a counter).
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(path).join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn publish(path: &Path, data: &[u8], how: Publish) -> Result<(), FsError> {
    let err = |source| FsError::Write {
        path: path.to_owned(),
        source,
    };
    if matches!(how, Publish::New) && std::fs::symlink_metadata(path).is_ok() {
        return Err(FsError::Exists {
            path: path.to_owned(),
        });
    }
    let tmp = temp_path(path);
    let written = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    let placed = match how {
        Publish::Replace => std::fs::rename(&tmp, path),
        // A link fails if `path` exists, so a racing writer cannot be overwritten.
        Publish::New => std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp)),
    };
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::AlreadyExists {
            return Err(FsError::Exists {
                path: path.to_owned(),
            });
        }
        return Err(err(e));
    }
    // The rename is durable only once the directory is.
    File::open(parent(path))
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_replace_with_mode_0600_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_private_atomic(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(mode(&p), 0o600);
        // An earlier file with a loose mode is replaced by a private one.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(entries(dir.path()), ["state.json"]);
    }

    #[test]
    fn create_refuses_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("host.key");
        create_private_atomic(&p, b"key").unwrap();
        assert_eq!(mode(&p), 0o600);
        let e = create_private_atomic(&p, b"other").unwrap_err();
        assert!(matches!(e, FsError::Exists { .. }), "{e:?}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"key");
        assert_eq!(entries(dir.path()), ["host.key"]);
    }

    #[test]
    fn failed_write_names_the_path_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir/state.json");
        let e = write_private_atomic(&p, b"x").unwrap_err();
        assert!(matches!(e, FsError::Write { .. }), "{e:?}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");

        // A target that cannot be replaced (a non-empty directory in its place): the write
        // fails, the old content stays and the temporary file is gone.
        let q = dir.path().join("taken");
        std::fs::create_dir(&q).unwrap();
        std::fs::write(q.join("inside"), b"old").unwrap();
        let e = write_private_atomic(&q, b"new").unwrap_err();
        assert!(e.to_string().contains(&q.display().to_string()), "{e}");
        assert_eq!(std::fs::read(q.join("inside")).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["taken"]);
    }

    #[test]
    fn a_symlink_in_the_way_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"not ours").unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = dir.path().join("state.json");
        std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
        write_private_atomic(&p, b"ours").unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not ours");
        assert_eq!(mode(&elsewhere), 0o644);
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"ours");
        assert_eq!(mode(&p), 0o600);
        // A key is never created through a link, not even a dangling one.
        let k = dir.path().join("host.key");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &k).unwrap();
        let e = create_private_atomic(&k, b"key").unwrap_err();
        assert!(matches!(e, FsError::Exists { .. }), "{e:?}");
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(entries(dir.path()), ["elsewhere", "host.key", "state.json"]);
    }

    /// Set in the child process of the test below: the directory to write into.
    const FSIZE_CHILD: &str = "MESHD_FSUTIL_FSIZE_CHILD";

    #[test]
    fn a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp_file() {
        if let Some(dir) = std::env::var_os(FSIZE_CHILD) {
            // In the child, whose files may not grow past 512 bytes: the temporary file's
            // write fails part of the way (EFBIG), as on a full disk.
            let p = Path::new(&dir).join("state.json");
            let e = write_private_atomic(&p, &[b'x'; 64 * 1024]).unwrap_err();
            assert!(matches!(e, FsError::Write { .. }), "{e:?}");
            assert_eq!(
                e.io().and_then(io::Error::raw_os_error),
                Some(27),
                "EFBIG: {e:?}"
            );
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_private_atomic(&p, b"old").unwrap();
        // The test binary again, running only this test, with a file size limit (ignoring
        // SIGXFSZ, so that the write returns an error instead of killing the process).
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 1 && exec \"$0\" --exact \"$1\" --test-threads 1")
            .arg(exe)
            .arg("fsutil::tests::a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp_file")
            .env(FSIZE_CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["state.json"]);
    }

    #[test]
    fn private_dirs_are_made_0700_and_loose_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        ensure_private_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure_private_dir(&d).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("run `chmod 700 {}`", d.display())),
            "{msg}"
        );
        assert!(msg.contains("0755"), "{msg}");
        let f = dir.path().join("f");
        std::fs::write(&f, b"").unwrap();
        assert!(matches!(
            ensure_private_dir(&f),
            Err(FsError::NotADirectory { .. })
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_private_file(&f).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        make_private(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        check_private_file(&f).unwrap();
        check_private_file(&dir.path().join("none")).unwrap();
    }
}
