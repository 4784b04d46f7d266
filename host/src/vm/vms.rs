//! The host's VMs: `STATE/vms/ID/`, one directory per VM holding its
//! record, its disks, its console log and its run directory.
//!
//! Locks, outermost first:
//! - `vms/.lock`: held while a create claims a name and writes its
//!   placeholder, and while stale placeholders are swept, so a sweep never
//!   sees a placeholder before its creator holds it;
//! - `vms/ID/.lock` ([`VmLock`]): held by any command that changes the
//!   record or the disks while no monitor runs (create, start, rm, the
//!   sweep);
//! - `vms/ID/run/monitor.lock` ([`MonitorLock`]): held by the monitor for
//!   its life; while it is held only the monitor writes the record.

use std::fs;
use std::path::{Path, PathBuf};

use super::monitor_lock::{Liveness, MonitorLock};
use super::name;
use super::record::{now, ExitInfo, ExitKind, Machine, VmRecord, VmState, RECORD_VERSION};
use super::VmError;
use crate::disk::lock::{VmLock, Wait};

/// The VM directory tree of a state dir.
#[derive(Debug, Clone)]
pub struct Vms {
    root: PathBuf,
}

/// One VM as found on disk.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub dir: PathBuf,
    pub record: VmRecord,
}

/// A create in progress: its placeholder record exists and its lock is
/// held. Dropped without [`Creating::finish`], it removes everything it
/// made; killed, the next command's sweep does.
#[derive(Debug)]
pub struct Creating {
    pub dir: PathBuf,
    pub record: VmRecord,
    lock: Option<VmLock>,
}

impl Vms {
    pub fn open(state_dir: &Path) -> Result<Vms, VmError> {
        let root = state_dir.join("vms");
        crate::fsutil::create_private_dir(state_dir, 0o700)
            .and_then(|()| crate::fsutil::create_private_dir(&root, 0o700))
            .map_err(VmError::io("creating", &root))?;
        Ok(Vms { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn global_lock(&self, op: &str) -> Result<VmLock, VmError> {
        // `VmLock` on the `vms/` directory itself is `vms/.lock`.
        VmLock::acquire(&self.root, op, Wait::Yes).map_err(VmError::Lock)
    }

    fn dirs(&self) -> Result<Vec<PathBuf>, VmError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.root).map_err(VmError::io("listing", &self.root))?;
        for e in rd {
            let e = e.map_err(VmError::io("listing", &self.root))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            // Only directories we made; anything else is not ours to touch.
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes what killed creates (and restores) left, and records
    /// monitors that died.
    /// Every command that looks at VMs calls it first.
    pub fn sweep(&self) -> Result<(), VmError> {
        let _global = self.global_lock("sweep")?;
        for dir in self.dirs()? {
            // Temps nobody holds (a restore's staged disks, killed before
            // its commit): safe beside a running VM, since a live temp is
            // locked by its writer (see `fsutil::temp`).
            match crate::fsutil::temp::remove_stale(&dir, false) {
                Ok(r) => {
                    for p in r.paths {
                        tracing::info!("removed {}, left by an interrupted command", p.display());
                    }
                }
                Err(e) => tracing::warn!("removing stale temps in {}: {e}", dir.display()),
            }
            let Ok(lock) = VmLock::acquire(&dir, "sweep", Wait::No) else {
                continue; // a live command owns it
            };
            match VmRecord::load(&dir) {
                Ok(None)
                | Ok(Some(VmRecord {
                    state: VmState::Creating,
                    ..
                })) => {
                    tracing::info!("removing {} (an interrupted create)", dir.display());
                    drop(lock);
                    fs::remove_dir_all(&dir).map_err(VmError::io("removing", &dir))?;
                }
                Ok(Some(r)) if r.state.has_monitor() => {
                    if MonitorLock::probe(&dir).map_err(VmError::io("probing", &dir))?
                        == Liveness::Dead
                    {
                        // Re-read: the monitor may have written its exit
                        // just before it went.
                        if let Ok(Some(mut r)) = VmRecord::load(&dir) {
                            if r.state.has_monitor() {
                                r.state = VmState::Stopped;
                                r.exit = Some(ExitInfo {
                                    kind: ExitKind::MonitorDied,
                                    reason: format!(
                                        "the monitor (pid {}) died without stopping the VM",
                                        r.pid.map_or("?".into(), |p| p.to_string())
                                    ),
                                    at: now(),
                                });
                                r.pid = None;
                                r.save(&dir)?;
                            }
                        }
                    }
                }
                Ok(Some(_)) => {}
                // A record we cannot read is reported by list; never removed.
                Err(e) => tracing::warn!("{}", crate::error_chain(&e)),
            }
        }
        Ok(())
    }

    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<VmEntry>, VmError> {
        self.sweep()?;
        let mut out = Vec::new();
        for dir in self.dirs()? {
            if let Some(record) = VmRecord::load(&dir)? {
                if record.state != VmState::Creating {
                    out.push(VmEntry { dir, record });
                }
            }
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    /// A VM by name, or by id (or a unique prefix of 4 or more digits).
    pub fn find(&self, handle: &str) -> Result<VmEntry, VmError> {
        let all = self.list()?;
        if let Some(e) = all.iter().find(|e| e.record.name == handle) {
            return Ok(e.clone());
        }
        let by_id: Vec<&VmEntry> = all
            .iter()
            .filter(|e| handle.len() >= 4 && e.record.id.starts_with(handle))
            .collect();
        match by_id.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(VmError::NotFound {
                vm: handle.to_string(),
            }),
            _ => Err(VmError::Ambiguous {
                vm: handle.to_string(),
                count: by_id.len(),
            }),
        }
    }

    /// Claims a name and writes the placeholder record. `name` is checked
    /// (or generated) and must be unused.
    pub fn begin_create(&self, name: Option<&str>, machine: Machine) -> Result<Creating, VmError> {
        self.sweep()?;
        let _global = self.global_lock("create")?;
        let mut taken = Vec::new();
        for dir in self.dirs()? {
            if let Ok(Some(r)) = VmRecord::load(&dir) {
                taken.push(r.name);
            }
        }
        let name = match name {
            Some(n) => {
                name::check(n).map_err(|why| VmError::BadName {
                    name: n.to_string(),
                    why,
                })?;
                if taken.iter().any(|t| t == n) {
                    return Err(VmError::NameTaken {
                        name: n.to_string(),
                    });
                }
                n.to_string()
            }
            None => loop {
                let n = name::generate();
                if !taken.contains(&n) {
                    break n;
                }
            },
        };
        let id = name::new_id().map_err(VmError::io("making an id for", &self.root))?;
        let dir = self.root.join(&id);
        fs::create_dir(&dir).map_err(VmError::io("creating", &dir))?;
        crate::fsutil::create_private_dir(&dir, 0o700).map_err(VmError::io("creating", &dir))?;
        let lock = match VmLock::acquire(&dir, "create", Wait::No) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(VmError::Lock(e));
            }
        };
        let record = VmRecord {
            version: RECORD_VERSION,
            id,
            name,
            state: VmState::Creating,
            pid: Some(std::process::id()),
            machine,
            image: None,
            policy: String::new(),
            storage: Vec::new(),
            nics: Vec::new(),
            created_at: now(),
            started_at: None,
            exit: None,
        };
        let creating = Creating {
            dir,
            record,
            lock: Some(lock),
        };
        creating.record.save(&creating.dir)?;
        Ok(creating)
    }
}

impl Creating {
    /// Writes the final record (state `created`): every file exists.
    pub fn finish(mut self) -> Result<VmEntry, VmError> {
        self.record.state = VmState::Created;
        self.record.pid = None;
        self.record.save(&self.dir)?;
        self.lock.take();
        Ok(VmEntry {
            dir: self.dir.clone(),
            record: self.record.clone(),
        })
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        if self.lock.is_some() {
            // Not finished: nothing of this VM stays.
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl VmEntry {
    /// Re-reads the record.
    pub fn reload(&mut self) -> Result<(), VmError> {
        self.record = VmRecord::load(&self.dir)?.ok_or_else(|| VmError::NotFound {
            vm: self.record.name.clone(),
        })?;
        Ok(())
    }

    /// The VM's operation lock, waiting for a short-lived holder.
    pub fn lock(&self, op: &str) -> Result<VmLock, VmError> {
        VmLock::acquire(&self.dir, op, Wait::Yes).map_err(VmError::Lock)
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG)
    }

    pub fn api_socket(&self) -> PathBuf {
        api_socket(&self.dir)
    }
}

pub const CONSOLE_LOG: &str = "console.log";
pub const API_SOCKET: &str = "api.sock";

pub fn api_socket(vm_dir: &Path) -> PathBuf {
    vm_dir.join(super::monitor_lock::RUN_DIR).join(API_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            cpus: 1,
            memory: 256 << 20,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        }
    }

    #[test]
    fn names_are_unique_and_unfinished_creates_vanish() {
        let state = tempfile::tempdir().unwrap();
        let vms = Vms::open(state.path()).unwrap();
        let a = vms.begin_create(Some("a"), machine()).unwrap();
        let e = vms.begin_create(Some("a"), machine()).unwrap_err();
        assert!(matches!(e, VmError::NameTaken { .. }), "{e}");
        let e = vms.begin_create(Some("-x"), machine()).unwrap_err();
        assert!(e.to_string().contains("-x"), "{e}");
        // Still creating: not listed.
        assert!(vms.list().unwrap().is_empty());
        let a = a.finish().unwrap();
        assert_eq!(vms.find("a").unwrap().record.id, a.record.id);
        assert_eq!(vms.find(&a.record.id[..6]).unwrap().record.name, "a");
        let b = vms.begin_create(None, machine()).unwrap();
        let bdir = b.dir.clone();
        drop(b);
        assert!(!bdir.exists());
    }

    #[test]
    fn a_dead_monitor_is_recorded_as_stopped() {
        let state = tempfile::tempdir().unwrap();
        let vms = Vms::open(state.path()).unwrap();
        let mut e = vms
            .begin_create(Some("m"), machine())
            .unwrap()
            .finish()
            .unwrap();
        e.record.state = VmState::Running;
        e.record.pid = Some(4242);
        e.record.save(&e.dir).unwrap();
        {
            let _alive = MonitorLock::acquire(&e.dir).unwrap().unwrap();
            assert_eq!(vms.find("m").unwrap().record.state, VmState::Running);
        }
        let r = vms.find("m").unwrap().record;
        assert_eq!(r.state, VmState::Stopped);
        let exit = r.exit.unwrap();
        assert_eq!(exit.kind, ExitKind::MonitorDied);
        assert!(exit.reason.contains("4242"), "{}", exit.reason);
    }
}
