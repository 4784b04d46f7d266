//! The snapshots directory, `STATE/snapshots/`: one directory per
//! snapshot, named by the snapshot, holding the sidecar, the VMM's state
//! and memory files and `disks/`.
//!
//! Invariants:
//! - **A listed snapshot is whole.** A snapshot is made in a hidden temp
//!   directory (`.tmp-NAME-…`) and renamed to `NAME` only when everything
//!   in it, the sidecar last, is written and fsynced; the rename never
//!   replaces anything (`RENAME_NOREPLACE`). [`list`] shows only names
//!   that do not start with a dot.
//! - **Stale temp directories go, live ones stay.** Each temp directory
//!   has a lock file beside it (`.tmp-NAME-….lock`), created and locked
//!   before the directory and held until the rename; [`clean_stale`]
//!   removes a temp directory only after taking its lock without waiting,
//!   so a save in progress (in this process or another) is never touched.
//! - **No snapshot is removed while it is read.** Clone, restore, export
//!   and push hold a shared `flock` on the snapshot's directory
//!   ([`SnapshotDir::open`]); [`remove`] takes it exclusively, without
//!   waiting, and renames the directory to a hidden name before deleting
//!   it, so a crash half-way leaves nothing listed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{flock, FlockOperation};

use super::sidecar::{Sidecar, SidecarError};
use crate::fsutil;

const TMP_PREFIX: &str = ".tmp-";
const RM_PREFIX: &str = ".rm-";
const LOCK_SUFFIX: &str = ".lock";
/// Longest snapshot name.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("snapshot {name} already exists in {dir}")]
    Exists { name: String, dir: PathBuf },
    #[error("no snapshot {name} in {dir}")]
    NotFound { name: String, dir: PathBuf },
    #[error("snapshot {name} is in use (a clone, restore, export or push is reading it); try again when it is done")]
    Busy { name: String },
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`: a plain directory name, never
/// hidden, never `.`/`..`, safe in a URL tag too.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::BadName {
        name: name.to_string(),
        reason,
    };
    let first = name.bytes().next().ok_or_else(|| bad("is empty".into()))?;
    if !first.is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or a digit".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(format!("is longer than {MAX_NAME_LEN} characters")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(bad(format!(
            "contains {c:?}; only letters, digits, _ . and - are allowed"
        )));
    }
    Ok(())
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}-{nanos:x}-{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Locks `file` exclusively without waiting; false when someone holds it.
fn try_lock(file: &File, path: &Path) -> Result<bool, StoreError> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(io_err("lock", path)(e.into())),
    }
}

/// A snapshot being written: a hidden directory under the snapshots
/// directory, removed when dropped uncommitted.
#[derive(Debug)]
pub struct TempSnapshot {
    root: PathBuf,
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    committed: bool,
}

impl TempSnapshot {
    /// The start of an import (from an archive or a registry): `name`
    /// checked and not taken under `snapshots_dir`, its temp directory
    /// made, with the empty disks directory (returned) the files go in.
    pub fn for_import(
        snapshots_dir: &Path,
        name: &str,
    ) -> Result<(TempSnapshot, PathBuf), StoreError> {
        check_name(name)?;
        if snapshots_dir.join(name).symlink_metadata().is_ok() {
            return Err(StoreError::Exists {
                name: name.to_string(),
                dir: snapshots_dir.to_path_buf(),
            });
        }
        let temp = TempSnapshot::create(snapshots_dir, name)?;
        let disks_dir = temp.path().join(super::sidecar::DISKS_DIR);
        std::fs::create_dir(&disks_dir).map_err(io_err("create", &disks_dir))?;
        Ok((temp, disks_dir))
    }

    /// A new temp directory for snapshot `name` under `snapshots_dir`
    /// (created, mode 0700, if missing).
    pub fn create(snapshots_dir: &Path, name: &str) -> Result<TempSnapshot, StoreError> {
        check_name(name)?;
        fsutil::create_private_dir(snapshots_dir, 0o700)
            .map_err(io_err("create", snapshots_dir))?;
        let base = format!("{TMP_PREFIX}{name}-{}", unique());
        let dir = snapshots_dir.join(&base);
        let lock_path = snapshots_dir.join(format!("{base}{LOCK_SUFFIX}"));
        let lock = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("create", &lock_path))?;
        // A cleaner may have taken (and unlinked) the fresh lock file
        // between its creation and our lock: then the directory would have
        // no lock, and look stale. Take a new name instead.
        let locked = try_lock(&lock, &lock_path)?;
        let ours = lock.metadata().map_err(io_err("stat", &lock_path))?;
        let still_named = fs::symlink_metadata(&lock_path)
            .is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev());
        if !locked || !still_named {
            return Self::create(snapshots_dir, name);
        }
        let made = TempSnapshot {
            root: snapshots_dir.to_path_buf(),
            dir: dir.clone(),
            lock_path,
            _lock: lock,
            committed: false,
        };
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
        Ok(made)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Renames the directory to `name` (never over an existing one) and
    /// makes the rename durable. Everything inside must be fsynced.
    pub fn commit(mut self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        fsutil::sync_dir(&self.dir).map_err(io_err("fsync", &self.dir))?;
        let dest = self.root.join(name);
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.dir,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => {
                return Err(StoreError::Exists {
                    name: name.into(),
                    dir: self.root.clone(),
                })
            }
            Err(e) => return Err(io_err("rename into place", &dest)(e.into())),
        }
        self.committed = true;
        fsutil::sync_dir(&self.root).map_err(io_err("fsync", &self.root))?;
        let _ = fs::remove_file(&self.lock_path);
        Ok(dest)
    }
}

impl Drop for TempSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// What [`clean_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// Temp and half-removed directories deleted.
    pub removed: Vec<PathBuf>,
    /// Temp directories left because a live save holds their lock.
    pub busy: usize,
}

/// Removes what interrupted saves and removals left under
/// `snapshots_dir`; safe to run at any time, from any command.
pub fn clean_stale(snapshots_dir: &Path) -> Result<Cleaned, StoreError> {
    let mut out = Cleaned::default();
    let entries = match fs::read_dir(snapshots_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list", snapshots_dir)(e)),
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(io_err("list", snapshots_dir))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    for n in &names {
        let path = snapshots_dir.join(n);
        if n.starts_with(RM_PREFIX) {
            // Renamed away by `remove`, which holds no lock on it after the
            // rename: nothing can use a hidden name.
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            out.removed.push(path);
        } else if n.starts_with(TMP_PREFIX) && !n.ends_with(LOCK_SUFFIX) {
            let lock_path = snapshots_dir.join(format!("{n}{LOCK_SUFFIX}"));
            let lock = match File::open(&lock_path) {
                Ok(f) => Some(f),
                // A lock file is made before its directory and removed
                // after it: a directory without one was left by a cleaner
                // that died between the two removals.
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("open", &lock_path)(e)),
            };
            if let Some(lock) = &lock {
                if !try_lock(lock, &lock_path)? {
                    out.busy += 1;
                    continue;
                }
            }
            match fs::remove_dir_all(&path) {
                Ok(()) => out.removed.push(path),
                // Committed (renamed) between our listing and our lock.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
            if lock.is_some() {
                let _ = fs::remove_file(&lock_path);
            }
        } else if let Some(dir) = n
            .strip_suffix(LOCK_SUFFIX)
            .filter(|_| n.starts_with(TMP_PREFIX))
        {
            // A lock file whose directory never came or is gone: remove it
            // under its lock, unless its saver is still starting.
            if names.iter().any(|m| m == dir) {
                continue;
            }
            if let Ok(f) = File::open(&path) {
                if try_lock(&f, &path)? && !snapshots_dir.join(dir).exists() {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
    Ok(out)
}

/// One entry of [`list`]: a snapshot directory and its sidecar, or why
/// the sidecar cannot be read.
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    pub dir: PathBuf,
    pub sidecar: Result<Sidecar, SidecarError>,
}

/// The snapshots under `snapshots_dir`, by name. Hidden entries (temp
/// directories, removals in progress) are never listed.
pub fn list(snapshots_dir: &Path) -> Result<Vec<Listed>, StoreError> {
    let entries = match fs::read_dir(snapshots_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", snapshots_dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io_err("list", snapshots_dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = e.path();
        out.push(Listed {
            sidecar: Sidecar::read(&dir),
            name,
            dir,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// An opened snapshot: its directory, held with a shared lock (so it is
/// not removed while read), and its sidecar as read (not yet checked:
/// see [`super::preflight`]).
#[derive(Debug)]
pub struct SnapshotDir {
    pub name: String,
    pub dir: PathBuf,
    pub sidecar: Sidecar,
    _lock: File,
}

impl SnapshotDir {
    /// Opens `snapshots_dir/name` for reading.
    pub fn open(snapshots_dir: &Path, name: &str) -> Result<SnapshotDir, StoreError> {
        check_name(name)?;
        let dir = snapshots_dir.join(name);
        Self::open_path(&dir, name)
    }

    /// Opens a snapshot directory anywhere (an import's staging directory).
    pub fn open_path(dir: &Path, name: &str) -> Result<SnapshotDir, StoreError> {
        let lock = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    name: name.into(),
                    dir: dir.parent().unwrap_or(Path::new("/")).to_path_buf(),
                })
            }
            Err(e) => return Err(io_err("open", dir)(e)),
        };
        flock(&lock, FlockOperation::LockShared).map_err(|e| io_err("lock", dir)(e.into()))?;
        let sidecar = Sidecar::read(dir)?;
        Ok(SnapshotDir {
            name: name.into(),
            dir: dir.to_path_buf(),
            sidecar,
            _lock: lock,
        })
    }
}

/// Removes snapshot `name`: refused while it is read; crash-safe (renamed
/// to a hidden name first, so it is never listed half-removed).
pub fn remove(snapshots_dir: &Path, name: &str) -> Result<(), StoreError> {
    check_name(name)?;
    let dir = snapshots_dir.join(name);
    let lock = match File::open(&dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound {
                name: name.into(),
                dir: snapshots_dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("open", &dir)(e)),
    };
    if !try_lock(&lock, &dir)? {
        return Err(StoreError::Busy { name: name.into() });
    }
    // The lock is on the directory, which keeps its inode across the
    // rename: a reader that opened it before us is already excluded.
    let meta = lock.metadata().map_err(io_err("stat", &dir))?;
    let now = fs::symlink_metadata(&dir).map_err(io_err("stat", &dir))?;
    if now.ino() != meta.ino() || now.dev() != meta.dev() {
        return Err(StoreError::Busy { name: name.into() });
    }
    let hidden = snapshots_dir.join(format!("{RM_PREFIX}{name}-{}", unique()));
    fs::rename(&dir, &hidden).map_err(io_err("rename", &dir))?;
    fsutil::sync_dir(snapshots_dir).map_err(io_err("fsync", snapshots_dir))?;
    drop(lock);
    fs::remove_dir_all(&hidden).map_err(io_err("remove", &hidden))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn snapshot_names() {
        for ok in ["s1", "web-2026.12.02", "A_b"] {
            check_name(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            (".hidden", "start with"),
            ("..", "start with"),
            ("a/b", "contains '/'"),
            ("a b", "contains ' '"),
            (&"x".repeat(65), "longer than 64"),
        ] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_temp_snapshot_is_listed_only_once_committed() {
        let root = tempfile::tempdir().unwrap();
        let snaps = root.path().join("snapshots");
        let t = TempSnapshot::create(&snaps, "s1").unwrap();
        fs::write(t.path().join("state"), b"x").unwrap();
        assert!(list(&snaps).unwrap().is_empty(), "a temp is never listed");
        // A cleaner leaves a live save alone.
        let c = clean_stale(&snaps).unwrap();
        assert_eq!((c.removed.len(), c.busy), (0, 1));
        let dest = t.commit("s1").unwrap();
        assert_eq!(names(&snaps), ["s1"], "the lock file went with the commit");
        assert_eq!(fs::read(dest.join("state")).unwrap(), b"x");
        let l = list(&snaps).unwrap();
        assert_eq!(l.len(), 1);
        assert!(matches!(l[0].sidecar, Err(SidecarError::Io { .. })));

        // Never over an existing snapshot, not even an empty directory.
        let t = TempSnapshot::create(&snaps, "s1").unwrap();
        assert!(matches!(t.commit("s1"), Err(StoreError::Exists { .. })));
        fs::create_dir(snaps.join("empty")).unwrap();
        let t = TempSnapshot::create(&snaps, "empty").unwrap();
        assert!(matches!(t.commit("empty"), Err(StoreError::Exists { .. })));
        assert_eq!(names(&snaps), ["empty", "s1"], "dropped temps are removed");
    }

    #[test]
    fn stale_temps_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let snaps = root.path();
        // What a SIGKILLed save leaves: the directory and its unlocked lock
        // file; a dead cleaner: a directory alone; a dead starter: a lock
        // file alone; a dead remover: a hidden .rm- directory.
        for d in [".tmp-a-1", ".tmp-b-2", ".rm-c-3"] {
            fs::create_dir(snaps.join(d)).unwrap();
            fs::write(snaps.join(d).join("memory"), b"m").unwrap();
        }
        fs::write(snaps.join(".tmp-a-1.lock"), b"").unwrap();
        fs::write(snaps.join(".tmp-d-4.lock"), b"").unwrap();
        let live = TempSnapshot::create(snaps, "live").unwrap();
        let c = clean_stale(snaps).unwrap();
        assert_eq!(c.removed.len(), 3, "{c:?}");
        assert_eq!(c.busy, 1);
        let left = names(snaps);
        assert_eq!(left.len(), 2, "only the live temp and its lock: {left:?}");
        assert!(live.path().is_dir());
    }

    #[test]
    fn remove_is_refused_while_a_reader_holds_the_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let snaps = root.path();
        let t = TempSnapshot::create(snaps, "s1").unwrap();
        crate::snapshot::sidecar::tests::sample()
            .write(t.path())
            .unwrap();
        t.commit("s1").unwrap();
        let reader = SnapshotDir::open(snaps, "s1").unwrap();
        assert_eq!(reader.sidecar.name, "s1");
        assert!(matches!(remove(snaps, "s1"), Err(StoreError::Busy { .. })));
        drop(reader);
        remove(snaps, "s1").unwrap();
        assert!(names(snaps).is_empty());
        assert!(matches!(
            remove(snaps, "s1"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            SnapshotDir::open(snaps, "s1"),
            Err(StoreError::NotFound { .. })
        ));
    }
}
