//! Per-key `flock`s. Lock files live in `locks/` and are never deleted
//! (deleting a lock file someone waits on would split the lock in two).
//!
//! Lock names are chosen so that the order in which a pull takes them
//! (reference, then blob, then staged file, then conversions) is also
//! their sorted path order: `0-ref-…` < `1-blob-…` < `1-stage-…` <
//! `2-conv-…`. No process ever takes a
//! lower-ordered lock while holding a higher one, so no two processes can
//! deadlock. `gc` holds `0-gc` exclusively; every writer holds it shared,
//! first (it sorts before every other lock).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// A held lock; released when dropped (closing the file releases it).
#[derive(Debug)]
pub struct Held {
    _file: File,
    pub path: PathBuf,
}

/// Opens (creating) a lock file; a symlink is never followed and a FIFO
/// never waited on: anything but a regular file is refused.
fn open(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a lock file that is not a regular file",
        ));
    }
    Ok(file)
}

/// Blocks until `path` is locked exclusively.
pub fn exclusive(path: &Path) -> io::Result<Held> {
    let file = open(path)?;
    flock(&file, FlockOperation::LockExclusive)?;
    Ok(Held {
        _file: file,
        path: path.to_path_buf(),
    })
}

/// Blocks until `path` is locked shared.
pub fn shared(path: &Path) -> io::Result<Held> {
    let file = open(path)?;
    flock(&file, FlockOperation::LockShared)?;
    Ok(Held {
        _file: file,
        path: path.to_path_buf(),
    })
}

/// Locks `path` exclusively if no one holds it; `None` when someone does.
/// Never waits, so it may be taken in any order.
pub fn try_exclusive(path: &Path) -> io::Result<Option<Held>> {
    let file = open(path)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(Held {
            _file: file,
            path: path.to_path_buf(),
        })),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Locks several paths exclusively, in sorted order.
pub fn exclusive_all(paths: &[PathBuf]) -> io::Result<Vec<Held>> {
    let mut sorted = paths.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted.iter().map(|p| exclusive(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_releases_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let held = exclusive(&p).unwrap();
        let other = open(&p).unwrap();
        assert!(flock(&other, FlockOperation::NonBlockingLockExclusive).is_err());
        assert!(try_exclusive(&p).unwrap().is_none());
        drop(held);
        assert!(flock(&other, FlockOperation::NonBlockingLockExclusive).is_ok());
        drop(other);
        assert!(try_exclusive(&p).unwrap().is_some());
    }
}
