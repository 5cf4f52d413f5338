//! Plain files in the data dir: the `serve` lock, the generated HS256 key, and secret files.
//!
//! Must stay true:
//! - Only one `serve` per data dir: [`DataDirLock`] holds an exclusive `flock` for the daemon's
//!   life (monoio listeners use `SO_REUSEPORT`, so a second daemon would otherwise start silently
//!   and share the port). The CLI never takes it.
//! - The JWT key file is created atomically with mode 0600 and never overwritten: concurrent
//!   creators agree on one key.
//! - Secret contents never reach an error message or a log; only paths do.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{create_private_dir, Result, StoreError};
use crate::ids;

/// Name of the lock file `serve` holds in the data dir.
pub const LOCK_FILE: &str = "switchboard.lock";
/// Name of the HS256 key `serve` generates in the data dir.
pub const JWT_KEY_FILE: &str = "jwt-hs256.key";

/// An exclusive lock on a data dir, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Take the lock on `dir/switchboard.lock` without waiting (creating `dir` with mode 0700 if
    /// needed). Fails with [`StoreError::Locked`] if another process holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock> {
        create_private_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io("opening lock file", &path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.kind() == io::ErrorKind::WouldBlock {
                StoreError::Locked { path: dir.to_path_buf() }
            } else {
                StoreError::io("locking", &path, err)
            });
        }
        // For whoever looks: which process holds it. Best effort.
        let _ = file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn trimmed(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// The content of a secret file, leading and trailing whitespace removed, as bytes (spec §9:
/// the HS256 key). An empty (or all-whitespace) file is an error.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| StoreError::io("reading secret file", path, e))?;
    let key = trimmed(&bytes);
    if key.is_empty() {
        return Err(StoreError::EmptySecret { path: path.to_path_buf() });
    }
    Ok(key.to_vec())
}

/// The data dir's generated HS256 key, if `serve` has created it.
pub fn read_jwt_key(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = dir.join(JWT_KEY_FILE);
    match std::fs::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("reading JWT key", &path, e)),
        Ok(bytes) => {
            let key = trimmed(&bytes);
            if key.is_empty() {
                return Err(StoreError::EmptySecret { path });
            }
            Ok(Some(key.to_vec()))
        }
    }
}

/// The data dir's HS256 key, generated now (32 random bytes, base64url, mode 0600) if missing.
/// Returns the key bytes (the file's trimmed content), its path, and whether it was created now.
pub fn ensure_jwt_key(dir: &Path) -> Result<(Vec<u8>, PathBuf, bool)> {
    create_private_dir(dir)?;
    let path = dir.join(JWT_KEY_FILE);
    if let Some(key) = read_jwt_key(dir)? {
        return Ok((key, path, false));
    }
    let mut content = URL_SAFE_NO_PAD.encode(ids::random_bytes::<32>());
    content.push('\n');

    // Write a private temporary file completely, then link it into place: the key file appears
    // whole or not at all, and an existing one is never replaced.
    let tmp = dir.join(format!(".{JWT_KEY_FILE}.{}.{}", std::process::id(), hex8()));
    let created = match write_new_file(&tmp, content.as_bytes()) {
        Ok(()) => {
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                // Filesystems without hard links: exclusive create directly.
                Err(_) => create_directly(&path, content.as_bytes())?,
            }
        }
        Err(_) => create_directly(&path, content.as_bytes())?,
    };
    if created {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let key = read_jwt_key(dir)?.ok_or_else(|| StoreError::EmptySecret { path: path.clone() })?;
    Ok((key, path, created))
}

fn create_directly(path: &Path, content: &[u8]) -> Result<bool> {
    match write_new_file(path, content) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StoreError::io("creating JWT key", path, e)),
    }
}

fn write_new_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let written = f.write_all(content).and_then(|()| f.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

fn hex8() -> String {
    ids::random_bytes::<4>().iter().map(|b| format!("{b:02x}")).collect()
}
