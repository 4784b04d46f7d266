//! Locks on a VM's writable disks and on the VM itself, and the crash-safe
//! replacement of a set of disks under those locks.
//!
//! Invariants, each enforced here and nowhere else:
//!
//! - **One writer per disk.** Every operation that touches a writable disk
//!   (start, snapshot, clone, restore, rm, `boot`) holds an exclusive
//!   `flock` on the disk's lock file, `.NAME.lock` beside the disk, for as
//!   long as it uses the disk. [`DiskLocks::acquire`] is the only way to
//!   get one.
//! - **No deadlock.** A set of disk locks is always taken in sorted path
//!   order, so no process waits for a disk while holding one that sorts
//!   after it. A VM lock ([`VmLock`]) is taken before any disk lock, and
//!   several VM locks in sorted order too.
//! - **Lock files stay put while anyone may hold them.** Only the
//!   exclusive holder of a lock file unlinks it ([`DiskLocks::remove`]),
//!   and every acquirer checks, after `flock` returns, that the path still
//!   names the file it locked; a waiter that wakes on an unlinked file
//!   drops it and starts over, so one path never stands for two locks.
//! - **Crash repair only under the lock.** The temp and backup files of an
//!   interrupted [`DiskLocks::replace`] are resolved by the next
//!   [`DiskLocks::acquire`] of that disk, right after it is locked and
//!   before the caller sees the disk: never by a process that does not
//!   hold the disk.
//!
//! Replacing disks (restore: every disk of a VM at once) is all or none,
//! crash included. Each disk's new contents are staged beside it, under
//! [`DiskLocks::staging_path`] or (a restore, which stages while the VM
//! still runs and holds the locks) in a locked `fsutil::temp` temp that
//! the sweep removes if its writer dies; [`DiskLocks::replace`] then
//! 1. hard-links each disk to `.NAME.bak-TXN` (the old contents),
//! 2. renames each staged file over its disk,
//! 3. writes the journal `.txn-TXN` in the disks' directory: the commit
//!    point,
//! 4. unlinks the backups, then the journal.
//!
//! Repair of a disk finds `.NAME.bak-TXN`: with the journal there the
//! replacement committed and the backup goes; without it the backup is
//! renamed back over the disk. Staged files (`.NAME.tmp-…`) of a
//! replacement that never committed are removed, and so is a journal that
//! no backup refers to any more.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{flock, FlockOperation};

use crate::fsutil;

/// What to do when a lock is held by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Fail at once with a "busy" error naming the holder.
    No,
    /// Block until the holder lets go (`--wait`).
    Yes,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk {disk} is in use ({holder}); a writable disk serves one VM or operation at a time"
    )]
    DiskBusy { disk: PathBuf, holder: String },
    #[error("VM {vm} is busy ({holder}); try again when it is done, or pass --wait")]
    VmBusy { vm: PathBuf, holder: String },
    #[error(
        "disk {disk} is given twice (or under two names); a writable disk can be attached once"
    )]
    Duplicate { disk: PathBuf },
    #[error("{disk} has no file name")]
    NoFileName { disk: PathBuf },
    #[error("{disk} is not one of the locked disks")]
    NotHeld { disk: PathBuf },
    #[error("disks of one replacement must share a directory: {a} and {b}")]
    Directories { a: PathBuf, b: PathBuf },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LockError {
    let path = path.to_path_buf();
    move |source| LockError::Io { what, path, source }
}

/// An exclusively locked lock file; closing it releases the lock.
#[derive(Debug)]
struct LockFile {
    /// Holds the flock; closing it releases the lock.
    _file: File,
    path: PathBuf,
}

enum Got {
    Locked(LockFile),
    Busy(String),
}

impl LockFile {
    /// Locks `path` exclusively, creating it if needed. Re-opens when the
    /// file was unlinked or replaced while we waited for it (see the
    /// module's invariants).
    fn lock(path: &Path, op: &str, wait: Wait) -> Result<Got, LockError> {
        loop {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err("opening lock file", path))?;
            let how = match wait {
                Wait::Yes => FlockOperation::LockExclusive,
                Wait::No => FlockOperation::NonBlockingLockExclusive,
            };
            match flock(&file, how) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Ok(Got::Busy(holder_of(&mut file)));
                }
                Err(e) => return Err(io_err("locking", path)(e.into())),
            }
            let ours = file.metadata().map_err(io_err("checking", path))?;
            match fs::symlink_metadata(path) {
                Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {}
                // Unlinked (or replaced) by its holder while we waited.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("checking", path)(e)),
            }
            // Who holds it, for the "busy" errors of the next one.
            let note = format!("{op} by pid {}", std::process::id());
            let _ = file
                .set_len(0)
                .and_then(|()| file.write_all(note.as_bytes()));
            return Ok(Got::Locked(LockFile {
                _file: file,
                path: path.to_path_buf(),
            }));
        }
    }
}

/// The note the current holder left in the lock file (best effort: it is
/// only for the error message).
fn holder_of(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.take(200).read_to_string(&mut s);
    let s = s.trim();
    if s.is_empty() {
        "held by another process".into()
    } else {
        format!("held: {s}")
    }
}

/// `dir/.NAME.lock` for `dir/NAME`.
pub fn disk_lock_path(disk: &Path) -> Result<PathBuf, LockError> {
    sibling(disk, "", ".lock")
}

/// A fresh temp name beside `disk`, `.NAME.tmp-…`: the name repair
/// removes, so a crash never leaves one for good.
pub(crate) fn temp_path(disk: &Path) -> Result<PathBuf, LockError> {
    sibling(disk, ".tmp-", &unique())
}

/// `dir/.NAME<infix>SUFFIX`: the host's own files beside a disk start with
/// a dot, which disk file names never do.
fn sibling(disk: &Path, infix: &str, suffix: &str) -> Result<PathBuf, LockError> {
    let name = file_name(disk)?;
    let dir = disk.parent().unwrap_or(Path::new(""));
    Ok(dir.join(format!(".{}{infix}{suffix}", name.to_string_lossy())))
}

fn file_name(disk: &Path) -> Result<&OsStr, LockError> {
    disk.file_name().ok_or_else(|| LockError::NoFileName {
        disk: disk.to_path_buf(),
    })
}

/// The path two spellings of one disk share: symlinks and `..` resolved
/// (the file itself when it exists, else its directory).
fn canonical(disk: &Path) -> Result<PathBuf, LockError> {
    match fs::canonicalize(disk) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let name = file_name(disk)?;
            let dir = match disk.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let dir = fs::canonicalize(dir).map_err(io_err("resolving", dir))?;
            Ok(dir.join(name))
        }
        Err(e) => Err(io_err("resolving", disk)(e)),
    }
}

#[derive(Debug)]
struct HeldDisk {
    disk: PathBuf,
    lock: LockFile,
}

/// Exclusive locks on a set of writable disks; released on drop.
#[derive(Debug)]
pub struct DiskLocks {
    held: Vec<HeldDisk>,
}

impl DiskLocks {
    /// Locks every disk in `disks` exclusively, in sorted order, for
    /// operation `op` (named in the "busy" error others get), then repairs
    /// what an interrupted replacement left beside each one.
    ///
    /// Paths are resolved first, so two spellings of one file are one
    /// disk; a disk given twice is refused. With [`Wait::No`] a disk held
    /// elsewhere fails the whole call (the locks taken so far are
    /// released).
    pub fn acquire(disks: &[PathBuf], op: &str, wait: Wait) -> Result<DiskLocks, LockError> {
        let mut resolved = Vec::with_capacity(disks.len());
        for d in disks {
            resolved.push(canonical(d)?);
        }
        resolved.sort();
        if let Some(w) = resolved.windows(2).find(|w| w[0] == w[1]) {
            return Err(LockError::Duplicate { disk: w[0].clone() });
        }
        // Hard links are one file under two names (and two lock files).
        let mut files = std::collections::BTreeMap::new();
        for d in &resolved {
            if let Ok(m) = fs::metadata(d) {
                if let Some(first) = files.insert((m.dev(), m.ino()), d) {
                    return Err(LockError::Duplicate {
                        disk: first.clone(),
                    });
                }
            }
        }
        let mut held = Vec::with_capacity(resolved.len());
        for disk in resolved {
            let path = disk_lock_path(&disk)?;
            match LockFile::lock(&path, op, wait)? {
                Got::Locked(lock) => held.push(HeldDisk { disk, lock }),
                Got::Busy(holder) => return Err(LockError::DiskBusy { disk, holder }),
            }
        }
        let locks = DiskLocks { held };
        for h in &locks.held {
            repair(&h.disk)?;
        }
        Ok(locks)
    }

    /// The locked disks, resolved, in lock order.
    pub fn disks(&self) -> impl Iterator<Item = &Path> {
        self.held.iter().map(|h| h.disk.as_path())
    }

    fn held(&self, disk: &Path) -> Result<&HeldDisk, LockError> {
        let want = canonical(disk)?;
        self.held
            .iter()
            .find(|h| h.disk == want)
            .ok_or(LockError::NotHeld { disk: want })
    }

    /// A fresh path beside `disk` to stage its new contents in before
    /// [`replace`](Self::replace). A staged file that is never committed
    /// is removed by the next repair.
    pub fn staging_path(&self, disk: &Path) -> Result<PathBuf, LockError> {
        temp_path(&self.held(disk)?.disk)
    }

    /// Puts each staged file in place of its disk, all or none, even
    /// across a crash (see the module doc). Every disk must exist, be
    /// held, and share one directory; staged files must be complete
    /// (written and fsynced) and beside their disks.
    pub fn replace(&self, staged: &[(PathBuf, PathBuf)]) -> Result<(), LockError> {
        let Some(first) = staged.first() else {
            return Ok(());
        };
        let dir = self.held(&first.0)?.disk.parent().unwrap().to_path_buf();
        let mut plan = Vec::with_capacity(staged.len());
        for (disk, new) in staged {
            let disk = self.held(disk)?.disk.clone();
            if disk.parent() != Some(dir.as_path()) {
                return Err(LockError::Directories {
                    a: first.0.clone(),
                    b: disk,
                });
            }
            plan.push((disk, new.clone()));
        }
        let txn = unique();
        let journal = dir.join(format!(".txn-{txn}"));
        let mut backups = Vec::with_capacity(plan.len());
        let undo = |backups: &[(PathBuf, PathBuf)]| {
            for (disk, bak) in backups {
                let _ = restore_backup(disk, bak);
            }
            let _ = fsutil::sync_dir(&dir);
        };
        for (disk, _) in &plan {
            let bak = sibling(disk, ".bak-", &txn)?;
            if let Err(e) = fs::hard_link(disk, &bak) {
                undo(&backups);
                return Err(io_err("backing up", disk)(e));
            }
            backups.push((disk.clone(), bak));
        }
        for (disk, new) in &plan {
            if let Err(e) = fs::rename(new, disk) {
                undo(&backups);
                return Err(io_err("renaming a staged file onto", disk)(e));
            }
        }
        let names: Vec<String> = plan
            .iter()
            .map(|(d, _)| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let text = serde_json::to_vec(&names).expect("a list of strings serialises");
        let part = dir.join(format!(".txnpart-{txn}"));
        if let Err(e) = write_journal(&part, &journal, &text) {
            let _ = fs::remove_file(&part);
            undo(&backups);
            return Err(io_err("writing the journal", &journal)(e));
        }
        // Committed: what is left is clean-up, which repair redoes if we
        // stop here.
        for (_, bak) in &backups {
            fs::remove_file(bak).map_err(io_err("removing the backup", bak))?;
        }
        fsutil::sync_dir(&dir).map_err(io_err("syncing", &dir))?;
        // Another disk's repair may have removed it already: with every
        // backup gone, nothing refers to it.
        remove_if_there(&journal)?;
        fsutil::sync_dir(&dir).map_err(io_err("syncing", &dir))
    }

    /// Deletes every locked disk, its leftovers and its lock file (rm).
    /// Safe while others wait on the lock: they notice the unlinked file
    /// and start over (see the module doc).
    pub fn remove(self) -> Result<(), LockError> {
        for h in &self.held {
            match fs::remove_file(&h.disk) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &h.disk)(e)),
            }
        }
        for h in &self.held {
            fs::remove_file(&h.lock.path).map_err(io_err("removing", &h.lock.path))?;
        }
        Ok(())
    }
}

/// Writes the journal under its temp name (which repair removes with the
/// backups of a replacement that died before committing), then renames it
/// into place: the commit point.
fn write_journal(part: &Path, journal: &Path, text: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(part)?;
    f.write_all(text)?;
    f.sync_all()?;
    fs::rename(part, journal)?;
    fsutil::sync_dir(journal.parent().unwrap_or(Path::new(".")))
}

/// A name no other replacement or stage uses: pid, time and a counter.
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

/// Resolves what an interrupted replacement left beside `disk`. Called
/// only with `disk` locked.
fn repair(disk: &Path) -> Result<(), LockError> {
    let dir = disk.parent().unwrap_or(Path::new("/"));
    let name = file_name(disk)?.to_string_lossy().into_owned();
    let tmp_prefix = format!(".{name}.tmp-");
    let bak_prefix = format!(".{name}.bak-");
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    let mut changed = false;
    for n in &names {
        let path = dir.join(n);
        if n.strip_prefix(&tmp_prefix).is_some_and(is_unique) {
            tracing::info!(
                "removing {}, left by an interrupted operation",
                path.display()
            );
            remove_if_there(&path)?;
            changed = true;
        } else if let Some(txn) = n.strip_prefix(&bak_prefix).filter(|t| is_unique(t)) {
            if dir.join(format!(".txn-{txn}")).exists() {
                remove_if_there(&path)?;
            } else {
                // The replacement died before its commit point.
                remove_if_there(&dir.join(format!(".txnpart-{txn}")))?;
                tracing::warn!(
                    "{}: rolling back an interrupted replacement",
                    disk.display()
                );
                restore_backup(disk, &path).map_err(io_err("restoring the backup of", disk))?;
            }
            changed = true;
        }
    }
    if changed {
        fsutil::sync_dir(dir).map_err(io_err("syncing", dir))?;
    }
    // Journals whose backups are all gone are never read again.
    for n in &names {
        if let Some(txn) = n.strip_prefix(".txn-").filter(|t| is_unique(t)) {
            let suffix = format!(".bak-{txn}");
            let referenced = fs::read_dir(dir)
                .map_err(io_err("listing", dir))?
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(&suffix));
            if !referenced {
                remove_if_there(&dir.join(n))?;
            }
        }
    }
    Ok(())
}

/// Whether `s` is a name [`unique`] made: names of other disks' files
/// beside this one (`.a.raw.tmp-x.raw.lock` for a disk `a.raw.tmp-x.raw`)
/// never are, so repair cannot mistake them for leftovers.
fn is_unique(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Puts the backup `bak` back as `disk`. When `disk` is still the very
/// file the backup links to (it was never switched), rename would do
/// nothing and leave the backup, so the link is removed instead.
fn restore_backup(disk: &Path, bak: &Path) -> io::Result<()> {
    let b = fs::symlink_metadata(bak)?;
    match fs::symlink_metadata(disk) {
        Ok(d) if d.dev() == b.dev() && d.ino() == b.ino() => fs::remove_file(bak),
        _ => fs::rename(bak, disk),
    }
}

fn remove_if_there(path: &Path) -> Result<(), LockError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// The per-VM operation lock: two invocations never change one VM at
/// once. Held for the whole operation; released on drop. Take it before
/// any of the VM's disk locks.
#[derive(Debug)]
pub struct VmLock {
    _lock: LockFile,
}

/// The VM's operation lock file.
pub fn vm_lock_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(".lock")
}

impl VmLock {
    /// Locks the VM whose directory is `vm_dir` for operation `op`. With
    /// [`Wait::No`] a VM another invocation is changing fails at once
    /// with [`LockError::VmBusy`], which names that invocation. A VM whose
    /// directory is removed meanwhile (rm) fails with the I/O error
    /// `NotFound`.
    pub fn acquire(vm_dir: &Path, op: &str, wait: Wait) -> Result<VmLock, LockError> {
        match LockFile::lock(&vm_lock_path(vm_dir), op, wait)? {
            Got::Locked(lock) => Ok(VmLock { _lock: lock }),
            Got::Busy(holder) => Err(LockError::VmBusy {
                vm: vm_dir.to_path_buf(),
                holder,
            }),
        }
    }

    /// Locks several VMs (clone: source and target) in sorted order.
    pub fn acquire_all(
        vm_dirs: &[PathBuf],
        op: &str,
        wait: Wait,
    ) -> Result<Vec<VmLock>, LockError> {
        let mut sorted = vm_dirs.to_vec();
        sorted.sort();
        sorted.dedup();
        sorted
            .iter()
            .map(|d| VmLock::acquire(d, op, wait))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, contents).unwrap();
        p
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && !n.ends_with(".lock"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_held_disk_is_busy_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"a");
        let b = disk(dir.path(), "b.raw", b"b");
        let held = DiskLocks::acquire(std::slice::from_ref(&a), "start", Wait::No).unwrap();
        let e = DiskLocks::acquire(&[b.clone(), a.clone()], "snapshot", Wait::No).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, LockError::DiskBusy { ref disk, .. } if disk.ends_with("a.raw")),
            "{e}"
        );
        assert!(
            text.contains(&format!("start by pid {}", std::process::id())),
            "{text}"
        );
        // The failed call released b.
        drop(DiskLocks::acquire(std::slice::from_ref(&b), "x", Wait::No).unwrap());
        drop(held);
        let both = DiskLocks::acquire(&[b, a], "x", Wait::No).unwrap();
        let names: Vec<_> = both
            .disks()
            .map(|d| d.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a.raw", "b.raw"], "sorted");
    }

    #[test]
    fn the_same_disk_twice_is_refused_however_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"a");
        std::os::unix::fs::symlink(&a, dir.path().join("link.raw")).unwrap();
        fs::hard_link(&a, dir.path().join("hard.raw")).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        for other in [
            a.clone(),
            dir.path().join("link.raw"),
            dir.path().join("hard.raw"),
            dir.path().join("sub/../a.raw"),
        ] {
            let e = DiskLocks::acquire(&[a.clone(), other.clone()], "boot", Wait::No).unwrap_err();
            assert!(
                matches!(e, LockError::Duplicate { .. }),
                "{}: {e}",
                other.display()
            );
        }
    }

    #[test]
    fn flock_is_per_open_so_one_process_cannot_hold_a_disk_twice() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"a");
        let _first = DiskLocks::acquire(std::slice::from_ref(&a), "one", Wait::No).unwrap();
        assert!(matches!(
            DiskLocks::acquire(&[a], "two", Wait::No),
            Err(LockError::DiskBusy { .. })
        ));
    }

    #[test]
    fn replace_swaps_every_disk_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"old a");
        let b = disk(dir.path(), "b.raw", b"old b");
        let locks = DiskLocks::acquire(&[a.clone(), b.clone()], "restore", Wait::No).unwrap();
        let sa = locks.staging_path(&a).unwrap();
        let sb = locks.staging_path(&b).unwrap();
        fs::write(&sa, b"new a").unwrap();
        fs::write(&sb, b"new b").unwrap();
        locks.replace(&[(a.clone(), sa), (b.clone(), sb)]).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"new a");
        assert_eq!(fs::read(&b).unwrap(), b"new b");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
        let other = tempfile::tempdir().unwrap();
        let c = disk(other.path(), "c.raw", b"c");
        assert!(matches!(
            locks.staging_path(&c),
            Err(LockError::NotHeld { .. })
        ));
    }

    #[test]
    fn a_failed_replace_undoes_the_disks_it_switched() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"old a");
        let b = disk(dir.path(), "b.raw", b"old b");
        let locks = DiskLocks::acquire(&[a.clone(), b.clone()], "restore", Wait::No).unwrap();
        let sa = locks.staging_path(&a).unwrap();
        fs::write(&sa, b"new a").unwrap();
        // b's staged file was never written: its rename fails.
        let sb = locks.staging_path(&b).unwrap();
        let e = locks
            .replace(&[(a.clone(), sa), (b.clone(), sb)])
            .unwrap_err();
        assert!(e.to_string().contains("b.raw"), "{e}");
        assert_eq!(fs::read(&a).unwrap(), b"old a");
        assert_eq!(fs::read(&b).unwrap(), b"old b");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    /// The states an interrupted replacement can leave, and what the next
    /// lock holder finds after repair.
    #[test]
    fn repair_rolls_back_before_the_journal_and_forward_after_it() {
        type Setup = fn(&Path);
        let cases: &[(&str, Setup, &[u8], &[u8])] = &[
            (
                "staged, not switched",
                |d| fs::write(d.join(".a.raw.tmp-1"), b"new a").unwrap(),
                b"old a",
                b"old b",
            ),
            (
                "backed up, a switched, no journal",
                |d| {
                    fs::hard_link(d.join("a.raw"), d.join(".a.raw.bak-a1")).unwrap();
                    fs::hard_link(d.join("b.raw"), d.join(".b.raw.bak-a1")).unwrap();
                    fs::write(d.join("a.raw.new"), b"new a").unwrap();
                    fs::rename(d.join("a.raw.new"), d.join("a.raw")).unwrap();
                    fs::write(d.join(".b.raw.tmp-a1"), b"new b").unwrap();
                },
                b"old a",
                b"old b",
            ),
            (
                "both switched, journal written, a's backup gone",
                |d| {
                    fs::write(d.join("a.raw"), b"new a").unwrap();
                    fs::hard_link(d.join("b.raw"), d.join(".b.raw.bak-b2")).unwrap();
                    fs::remove_file(d.join("b.raw")).unwrap();
                    fs::write(d.join("b.raw"), b"new b").unwrap();
                    fs::write(d.join(".txn-b2"), b"[]").unwrap();
                },
                b"new a",
                b"new b",
            ),
            (
                "journal left after every backup went",
                |d| fs::write(d.join(".txn-c3"), b"[]").unwrap(),
                b"old a",
                b"old b",
            ),
        ];
        for (name, setup, want_a, want_b) in cases {
            let dir = tempfile::tempdir().unwrap();
            let a = disk(dir.path(), "a.raw", b"old a");
            let b = disk(dir.path(), "b.raw", b"old b");
            setup(dir.path());
            drop(DiskLocks::acquire(&[a.clone(), b.clone()], "start", Wait::No).unwrap());
            assert_eq!(fs::read(&a).unwrap(), *want_a, "{name}");
            assert_eq!(fs::read(&b).unwrap(), *want_b, "{name}");
            assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn repair_touches_only_the_locked_disk() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"a");
        disk(dir.path(), "b.raw", b"b");
        fs::write(dir.path().join(".b.raw.tmp-1"), b"someone's stage").unwrap();
        drop(DiskLocks::acquire(&[a], "start", Wait::No).unwrap());
        assert_eq!(leftovers(dir.path()), vec![".b.raw.tmp-1".to_string()]);
    }

    #[test]
    fn remove_deletes_disks_and_lock_files_and_waiters_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a.raw", b"a");
        let locks = DiskLocks::acquire(std::slice::from_ref(&a), "rm", Wait::No).unwrap();
        let lock_path = disk_lock_path(&locks.held[0].disk).unwrap();
        // A waiter that opened the lock file before rm unlinked it.
        let waiter = {
            let lock_path = lock_path.clone();
            std::thread::spawn(move || {
                let got = LockFile::lock(&lock_path, "start", Wait::Yes).unwrap();
                let Got::Locked(l) = got else { panic!("busy") };
                let ino = l._file.metadata().unwrap().ino();
                (ino, fs::metadata(&lock_path).unwrap().ino())
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        locks.remove().unwrap();
        assert!(!a.exists());
        let (locked, on_disk) = waiter.join().unwrap();
        assert_eq!(locked, on_disk, "the waiter holds the file the path names");
    }

    #[test]
    fn vm_lock_busy_then_wait() {
        let dir = tempfile::tempdir().unwrap();
        let held = VmLock::acquire(dir.path(), "start", Wait::No).unwrap();
        let e = VmLock::acquire(dir.path(), "rm", Wait::No).unwrap_err();
        assert!(matches!(e, LockError::VmBusy { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("busy") && text.contains("start by pid"),
            "{text}"
        );
        assert!(text.contains("--wait"), "{text}");
        let path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            VmLock::acquire(&path, "rm", Wait::Yes).unwrap();
            t.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
        assert!(waiter.join().unwrap() >= std::time::Duration::from_millis(150));
        let gone = dir.path().join("gone");
        let e = VmLock::acquire(&gone, "start", Wait::No).unwrap_err();
        assert!(
            matches!(&e, LockError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
    }
}
