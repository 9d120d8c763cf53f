//! Private key files: one base64 key, mode 0600.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use meshd_tunnel::PrivateKey;

use crate::fsutil::{create_private_atomic, ensure_private_dir, FsError};
use crate::KeyFileError;

/// Longest key file we read; a base64 key with a newline is 45 bytes.
const MAX_KEY_FILE: u64 = 1024;

/// Loads a private key from `path`, refusing files that group or others may access.
///
/// The file holds the key in base64 (as `wg genkey` prints it); surrounding whitespace is
/// ignored. Permissions are checked on the opened file, so a swap between check and read
/// is not possible.
pub fn load_private_key(path: impl AsRef<Path>) -> Result<PrivateKey, KeyFileError> {
    let path = path.as_ref();
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    text.parse().map_err(|source| KeyFileError::BadKey {
        path: path.to_owned(),
        source,
    })
}

/// Writes `key` to a new file at `path` with mode 0600 (atomically: a full disk leaves no
/// empty key behind), creating missing parent directories with mode 0700.
///
/// Refuses to overwrite an existing file ([`KeyFileError::Write`] with
/// [`io::ErrorKind::AlreadyExists`]): replacing a key changes the host's identity.
pub fn write_private_key(path: impl AsRef<Path>, key: &PrivateKey) -> Result<(), KeyFileError> {
    let path = path.as_ref();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            ensure_private_dir(dir).map_err(|e| KeyFileError::CreateDir {
                path: dir.to_owned(),
                source: into_io(e),
            })?;
        }
    }
    create_private_atomic(path, format!("{}\n", key.to_base64()).as_bytes()).map_err(|e| {
        KeyFileError::Write {
            path: path.to_owned(),
            source: into_io(e),
        }
    })
}

fn into_io(e: FsError) -> io::Error {
    match e {
        FsError::CreateDir { source, .. } | FsError::Write { source, .. } => source,
        FsError::Exists { .. } => io::Error::from(io::ErrorKind::AlreadyExists),
        other => io::Error::other(other.to_string()),
    }
}
