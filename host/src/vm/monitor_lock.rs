//! The monitor lock, `run/monitor.lock`: held exclusively by a VM's
//! monitor for its whole life, so "is the monitor alive?" is answered by
//! the kernel (a dead process holds no flock) rather than by a pid that
//! may have been reused. The command that starts a monitor takes the lock
//! first and hands the open file to the child, so there is no moment at
//! which a starting VM looks dead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

pub const RUN_DIR: &str = "run";
pub const LOCK_FILE: &str = "monitor.lock";

pub fn lock_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(RUN_DIR).join(LOCK_FILE)
}

/// The monitor lock, held.
#[derive(Debug)]
pub struct MonitorLock {
    file: File,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// A monitor holds the lock; its note (`monitor pid N`).
    Alive(String),
    Dead,
}

fn open(vm_dir: &Path) -> io::Result<File> {
    let run = vm_dir.join(RUN_DIR);
    crate::fsutil::create_private_dir(&run, 0o700)?;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(run.join(LOCK_FILE))
}

fn note_of(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.take(200).read_to_string(&mut s);
    match s.trim() {
        "" => "a monitor".into(),
        s => s.to_string(),
    }
}

impl MonitorLock {
    /// Takes the lock to start a monitor. Another holder is retried for a
    /// moment (a `list` probing liveness holds it for microseconds); a
    /// monitor keeps it, and that is [`Liveness::Alive`].
    pub fn acquire(vm_dir: &Path) -> io::Result<Result<MonitorLock, String>> {
        let mut file = open(vm_dir)?;
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Ok(MonitorLock { file })),
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(Err(note_of(&mut file))),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether a monitor holds the lock now. Takes and drops a shared lock,
    /// which never keeps a monitor from starting for more than the
    /// retries of [`MonitorLock::acquire`].
    pub fn probe(vm_dir: &Path) -> io::Result<Liveness> {
        let path = lock_path(vm_dir);
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Liveness::Dead),
            Err(e) => return Err(e),
        };
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => Ok(Liveness::Dead),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(Liveness::Alive(note_of(&mut file))),
            Err(e) => Err(e.into()),
        }
    }

    /// Says who holds it (for the next one's "busy" error).
    pub fn set_note(&mut self, note: &str) {
        let _ = self
            .file
            .set_len(0)
            .and_then(|()| self.file.write_all(note.as_bytes()));
    }

    /// The descriptor a child inherits: close-on-exec cleared. Call just
    /// before spawning the monitor; the lock is shared with it from then.
    pub fn inheritable_fd(&self) -> io::Result<RawFd> {
        let fd = self.file.as_fd();
        let flags = rustix::io::fcntl_getfd(fd)?;
        rustix::io::fcntl_setfd(fd, flags - rustix::io::FdFlags::CLOEXEC)?;
        Ok(fd.as_raw_fd())
    }

    /// The monitor's side: the lock its parent took, as descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open descriptor this process owns and nothing else
    /// uses (the inherited lock file).
    pub unsafe fn adopt(fd: RawFd) -> io::Result<MonitorLock> {
        // SAFETY: the caller guarantees `fd` is ours alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let flags = rustix::io::fcntl_getfd(&owned)?;
        rustix::io::fcntl_setfd(&owned, flags | rustix::io::FdFlags::CLOEXEC)?;
        let file = File::from(owned);
        // Still ours? (The parent took it; flock on a shared description
        // succeeds for any of its holders.)
        flock(&file, FlockOperation::NonBlockingLockExclusive)?;
        Ok(MonitorLock { file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_alive_and_a_dropped_one_dead() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(MonitorLock::probe(dir.path()).unwrap(), Liveness::Dead);
        let mut held = MonitorLock::acquire(dir.path()).unwrap().unwrap();
        held.set_note("monitor pid 42");
        assert_eq!(
            MonitorLock::probe(dir.path()).unwrap(),
            Liveness::Alive("monitor pid 42".into())
        );
        assert_eq!(
            MonitorLock::acquire(dir.path()).unwrap().unwrap_err(),
            "monitor pid 42"
        );
        drop(held);
        // Other tests of this binary fork children: one forked just now
        // shares the lock's open file description until its exec closes
        // it (CLOEXEC), so the lock may outlive the drop by that long.
        let dropped = Instant::now();
        while MonitorLock::probe(dir.path()).unwrap() != Liveness::Dead {
            assert!(
                dropped.elapsed() < Duration::from_secs(5),
                "a dropped lock still held after 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // A probe does not keep the lock.
        MonitorLock::probe(dir.path()).unwrap();
        assert!(MonitorLock::acquire(dir.path()).unwrap().is_ok());
    }
}
