//! Temp files written beside a destination (a conversion's output, an
//! unpacked download): short names, so a 255-byte destination name still
//! leaves room; an exclusive `flock` held for as long as the temp is
//! written, so a later process can tell an abandoned temp from a live one;
//! and removal of abandoned ones that a SIGKILL or a power cut left
//! ([`remove_stale`]). Removal on SIGINT, SIGTERM and SIGHUP is
//! [`super::cleanup`]'s.
//!
//! The invariant [`remove_stale`] relies on: a temp whose lock can be
//! taken is not being written. A writer locks its temp right after
//! creating it and then checks that the path still names the file it
//! locked; if a remover got in between (locked and unlinked it), the
//! writer starts again with a new temp.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use tempfile::NamedTempFile;

use super::cleanup::{self, Registration};

/// Every temp this module makes starts with it.
pub const PREFIX: &str = ".cocoon-tmp-";
/// Names earlier versions used for unpacked downloads (never locked; a
/// process of such a version still running would lose its temp).
const LEGACY_PREFIXES: &[&str] = &[".cocoon-unpack-"];

/// A locked temp file, removed when dropped (and on a termination signal
/// while it exists).
#[derive(Debug)]
pub struct Temp {
    tmp: NamedTempFile,
    _registration: Registration,
}

impl Temp {
    /// Creates and locks a temp file in `dir`, named `PREFIX`, six random
    /// characters, then `suffix` (e.g. ".part").
    pub fn create_in(dir: &Path, suffix: &str) -> io::Result<Temp> {
        let (tmp, registration) = cleanup::create_registered(|| loop {
            let tmp = tempfile::Builder::new()
                .prefix(PREFIX)
                .suffix(suffix)
                .tempfile_in(dir)?;
            match flock(tmp.as_file(), FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                // A remover holds it and is about to unlink it.
                Err(rustix::io::Errno::WOULDBLOCK) => continue,
                Err(e) => return Err(e.into()),
            }
            if !still_named(tmp.as_file(), tmp.path())? {
                // Removed between our create and our lock. Dropping `tmp`
                // would unlink whatever now has that name: forget the path.
                let _ = tmp.into_temp_path().keep();
                continue;
            }
            let path = tmp.path().to_path_buf();
            return Ok((tmp, path));
        })?;
        Ok(Temp {
            tmp,
            _registration: registration,
        })
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn as_file(&self) -> &File {
        self.tmp.as_file()
    }

    pub fn as_file_mut(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// The temp was renamed onto its destination by other means (a
    /// replacement of several files at once, all or none): forget its
    /// path, so that dropping it unlinks nothing.
    pub fn renamed(self) {
        let Temp { tmp, _registration } = self;
        let _ = tmp.into_temp_path().keep();
    }

    /// Renames the temp onto `dest`.
    pub fn persist(self, dest: &Path) -> io::Result<()> {
        let Temp { tmp, _registration } = self;
        tmp.persist(dest).map(|_| ()).map_err(|e| e.error)
    }
}

/// Whether `path` still names the file open as `file`.
fn still_named(file: &File, path: &Path) -> io::Result<bool> {
    let open = file.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(now) => Ok(now.dev() == open.dev() && now.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `name` is one of ours.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(PREFIX) || LEGACY_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What [`remove_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    pub paths: Vec<PathBuf>,
    /// Bytes of disk the removed files held (allocated, not apparent:
    /// temps are sparse).
    pub bytes: u64,
}

/// Removes the temps in `dir` that no process is writing: regular files
/// with our names whose lock can be taken. With `dry_run`, only reports
/// them. A missing `dir` has none.
pub fn remove_stale(dir: &Path, dry_run: bool) -> io::Result<Removed> {
    let mut removed = Removed::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !entry.file_name().to_str().is_some_and(is_temp_name) {
            continue;
        }
        let path = entry.path();
        // Never through a symlink, never a device or FIFO: only regular
        // files of ours are ours to remove.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(_) => continue,
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            continue;
        }
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            // Its writer is alive.
            Err(rustix::io::Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }
        if !still_named(&file, &path)? {
            continue;
        }
        if !dry_run {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        removed.bytes += meta.blocks() * 512;
        removed.paths.push(path);
    }
    Ok(removed)
}

/// [`remove_stale`] in `root` and in its subdirectories down to `depth`
/// levels (real directories only, never through a symlink). For the image
/// store's gc, whose conversions write temps a few levels down.
pub fn remove_stale_below(root: &Path, depth: usize, dry_run: bool) -> io::Result<Removed> {
    let mut removed = remove_stale(root, dry_run)?;
    if depth == 0 {
        return Ok(removed);
    }
    let entries = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            let below = remove_stale_below(&entry.path(), depth - 1, dry_run)?;
            removed.paths.extend(below.paths);
            removed.bytes += below.bytes;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn live_temps_stay_and_abandoned_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut live = Temp::create_in(dir.path(), ".part").unwrap();
        live.as_file_mut().write_all(&[1; 8192]).unwrap();
        let name = live
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            name.starts_with(PREFIX) && name.ends_with(".part"),
            "{name}"
        );
        assert_eq!(name.len(), PREFIX.len() + 6 + ".part".len());
        // Abandoned: ours by name, nobody holds its lock (a SIGKILLed
        // writer's lock went with it).
        let stale = dir.path().join(format!("{PREFIX}dead01.part"));
        std::fs::write(&stale, [2; 8192]).unwrap();
        let legacy = dir.path().join(".cocoon-unpack-abc123");
        std::fs::write(&legacy, b"x").unwrap();
        // Not ours, or not a regular file: untouched.
        let other = dir.path().join("disk.part");
        std::fs::write(&other, b"x").unwrap();
        let link = dir.path().join(format!("{PREFIX}link01.part"));
        std::os::unix::fs::symlink(&other, &link).unwrap();

        let seen = remove_stale(dir.path(), true).unwrap();
        assert_eq!(seen.paths.len(), 2, "{seen:?}");
        assert!(stale.exists(), "a dry run removes nothing");
        let gone = remove_stale(dir.path(), false).unwrap();
        assert_eq!(gone.paths.len(), 2);
        assert!(gone.bytes >= 8192, "{gone:?}");
        assert!(!stale.exists() && !legacy.exists());
        assert!(live.path().exists(), "a locked temp is some process's work");
        assert!(other.exists() && link.symlink_metadata().is_ok());

        drop(live);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn stale_temps_below_a_root_go_to_the_given_depth() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let too_deep = deep.join("c");
        std::fs::create_dir(&too_deep).unwrap();
        for d in [root.path(), &deep, &too_deep] {
            std::fs::write(d.join(format!("{PREFIX}stale1.part")), b"x").unwrap();
        }
        let live = Temp::create_in(&deep, ".part").unwrap();
        let r = remove_stale_below(root.path(), 2, false).unwrap();
        assert_eq!(r.paths.len(), 2, "{r:?}");
        assert!(live.path().exists());
        assert!(too_deep.join(format!("{PREFIX}stale1.part")).exists());
    }

    #[test]
    fn a_temp_persists_onto_its_destination() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Temp::create_in(dir.path(), ".part").unwrap();
        t.as_file_mut().write_all(b"data").unwrap();
        let dest = dir.path().join("x".repeat(254));
        t.persist(&dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"data");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
