//! Restoring a snapshot into an existing VM: its disks take the
//! snapshot's contents, all or none, and the VMM restore config runs it.
//!
//! In three steps, so that a bad snapshot never costs the running VM:
//! 1. [`prepare`]: the preflight, against the VM's disks as its record has
//!    them; nothing is changed, the VM may run.
//! 2. [`Prepared::stage`]: under the VM's disk locks (its monitor holds
//!    them while it runs), copies of the snapshot's disks are staged
//!    beside the VM's ([`DiskLocks::staging_path`]); the VM may still run.
//! 3. The caller stops the VM, then [`Staged::commit`] swaps the staged
//!    files in with [`DiskLocks::replace`] (crash-safe, all or none) and
//!    returns the storage and the restore config.
//!
//! The seed: when the VM has dropped its cidata disk since the snapshot
//! (after its first boot), the snapshot's seed is written back (the guest
//! knows the disk); when the VM has one the snapshot lacks, it is left
//! alone and not attached.

use std::path::{Path, PathBuf};

use cocoon_vmm::snapshot::RestoreConfig;
use cocoon_vmm::SerialOutput;

use super::clone::write_new;
use super::preflight::{self, Checked, PreflightError};
use super::store::SnapshotDir;
use crate::disk::copy::{self, CopyError};
use crate::disk::lock::{DiskLocks, LockError};
use crate::disk::model::{DiskRole, StorageConfig};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot {snapshot} fails its preflight; the VM was not touched")]
    Preflight {
        snapshot: String,
        #[source]
        source: PreflightError,
    },
    #[error("the VM's disk {path} is not locked; a restore replaces disks under their locks")]
    NotLocked { path: PathBuf },
    #[error("staging {to} from {from}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: CopyError,
    },
    #[error("replacing the VM's disks")]
    Lock(#[source] LockError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A restore that passed its preflight.
#[derive(Debug)]
pub struct Prepared {
    pub checked: Checked,
    /// The VM's disks after the restore: the snapshot's, at the VM's paths
    /// (layers: the snapshot's, in the store).
    pub storage: Vec<StorageConfig>,
    snapshot: String,
}

/// Step 1: the preflight against `target` (the VM's disks now) and the
/// plan. `vm_dir` is the VM's directory (a seed the VM lacks goes there).
pub fn prepare(
    snapshot: &SnapshotDir,
    checks: &preflight::Options<'_>,
    target: &[StorageConfig],
    vm_dir: &Path,
) -> Result<Prepared, RestoreError> {
    let checks = preflight::Options {
        target: Some(target),
        ..*checks
    };
    let checked =
        preflight::preflight(&snapshot.dir, &snapshot.sidecar, &checks).map_err(|source| {
            RestoreError::Preflight {
                snapshot: snapshot.name.clone(),
                source,
            }
        })?;
    let storage = checked
        .storage
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let path = match (d.role, target.get(i)) {
                (DiskRole::Layer, _) => d.path.clone(),
                // check_roles: same role and serial at this index.
                (_, Some(t)) if t.role == d.role => t.path.clone(),
                _ => vm_dir.join(d.path.file_name().expect("a resident disk is a file")),
            };
            StorageConfig { path, ..d.clone() }
        })
        .collect();
    Ok(Prepared {
        checked,
        storage,
        snapshot: snapshot.name.clone(),
    })
}

/// Staged copies, waiting for the VM to stop.
#[derive(Debug)]
pub struct Staged<'a> {
    prepared: Prepared,
    locks: &'a DiskLocks,
    /// (VM disk, staged copy) for the writable disks.
    staged: Vec<(PathBuf, PathBuf)>,
    /// Read-only resident disks (the seed) to write: (snapshot file, VM path).
    seeds: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

impl Prepared {
    /// Step 2: stages copies of the snapshot's writable disks beside the
    /// VM's, under `locks` (the VM's writable disks). The VM may run.
    pub fn stage<'a>(self, locks: &'a DiskLocks) -> Result<Staged<'a>, RestoreError> {
        let pairs: Vec<(DiskRole, PathBuf, PathBuf)> = self
            .checked
            .storage
            .iter()
            .zip(&self.storage)
            .map(|(from, to)| (to.role, from.path.clone(), to.path.clone()))
            .collect();
        // Dropped on an error: removes what was staged so far.
        let mut out = Staged {
            prepared: self,
            locks,
            staged: Vec::new(),
            seeds: Vec::new(),
            committed: false,
        };
        for (role, from, to) in pairs {
            match role {
                DiskRole::Layer => {}
                DiskRole::Cidata => out.seeds.push((from, to)),
                DiskRole::Cow | DiskRole::Data => {
                    let tmp = locks.staging_path(&to).map_err(|e| match e {
                        LockError::NotHeld { .. } => RestoreError::NotLocked { path: to.clone() },
                        other => RestoreError::Lock(other),
                    })?;
                    copy::copy_file(&from, &tmp).map_err(|source| RestoreError::Copy {
                        from: from.clone(),
                        to: tmp.clone(),
                        source,
                    })?;
                    out.staged.push((to, tmp));
                }
            }
        }
        Ok(out)
    }
}

impl Staged<'_> {
    /// Step 3, after the VM has stopped: swaps the staged copies in (all
    /// or none, crash included) and writes a seed the VM lacks. Returns
    /// the VM's new storage (for its record) and the restore config.
    pub fn commit(
        mut self,
        serial: SerialOutput,
    ) -> Result<(Vec<StorageConfig>, RestoreConfig), RestoreError> {
        self.locks
            .replace(&self.staged)
            .map_err(RestoreError::Lock)?;
        self.committed = true;
        for (from, to) in &self.seeds {
            let bytes = std::fs::read(from).map_err(|source| RestoreError::Io {
                what: "read",
                path: from.clone(),
                source,
            })?;
            let same = std::fs::read(to).is_ok_and(|b| b == bytes);
            if !same {
                let _ = std::fs::remove_file(to);
                write_new(to, &bytes).map_err(|source| RestoreError::Io {
                    what: "write",
                    path: to.clone(),
                    source,
                })?;
            }
        }
        let p = &self.prepared;
        let restore = RestoreConfig {
            state: p.checked.dir.join(cocoon_vmm::snapshot::STATE_FILE),
            memory: p.checked.dir.join(cocoon_vmm::snapshot::MEMORY_FILE),
            disks: p.storage.iter().map(|d| d.to_vmm_disk()).collect(),
            // The taps exist only once the monitor starts: it names them.
            nets: Vec::new(),
            serial,
        };
        Ok((p.storage.clone(), restore))
    }

    /// The snapshot being restored.
    pub fn snapshot(&self) -> &str {
        &self.prepared.snapshot
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.committed {
            for (_, tmp) in &self.staged {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}
