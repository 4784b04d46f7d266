//! Restoring a snapshot into an existing VM: its disks take the
//! snapshot's contents, all or none, and the VMM restore config runs it.
//!
//! In three steps, so that a bad snapshot never costs the running VM:
//! 1. [`prepare`]: the preflight, against the VM's disks as its record has
//!    them; nothing is changed, the VM may run.
//! 2. [`Prepared::stage`]: copies of the snapshot's disks, each hashed
//!    against the sidecar, are staged in locked temps beside the VM's
//!    disks (the same filesystem); the VM still runs, and a failure here
//!    (no space, a read error, a disk changed since the snapshot) removes
//!    the staged files and leaves the VM running as it was.
//! 3. The caller stops the VM, takes its disk locks, then
//!    [`Staged::commit`] renames the staged files over the disks with
//!    [`DiskLocks::replace`] (crash-safe, all or none) and returns the
//!    storage and the restore config.
//!
//! Staged files are `fsutil::temp` temps: locked while their process
//! lives, unlinked on SIGINT/SIGTERM, and removed by the next command's
//! sweep after a SIGKILL (an unlocked temp is nobody's work).
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
use crate::fsutil::input::{self, Accept};
use crate::fsutil::temp::Temp;
use crate::store::digest::Digest;

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
    #[error("staging a copy of {from} for the VM's disk {to}; the VM was not touched")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: CopyError,
    },
    #[error("{path} has changed since the snapshot: its sha256 is {computed}, the sidecar records {recorded}; nothing was staged, the VM was not touched")]
    Changed {
        path: PathBuf,
        recorded: Digest,
        computed: Digest,
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
    /// Per disk, the sha256 the sidecar records for its resident file.
    hashes: Vec<Option<Digest>>,
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
    let hashes = snapshot
        .sidecar
        .disks
        .iter()
        .map(|d| {
            d.resident()
                .then(|| snapshot.sidecar.file(&d.config.path.to_string_lossy()))
                .flatten()
                .map(|f| f.sha256.clone())
        })
        .collect();
    Ok(Prepared {
        checked,
        storage,
        snapshot: snapshot.name.clone(),
        hashes,
    })
}

/// Staged copies, waiting for the VM to stop. Dropped before
/// [`Staged::commit`], the staged files are removed; a process killed
/// with some staged leaves them unlocked, and the next command's sweep
/// removes them ([`crate::fsutil::temp::remove_stale`], from
/// [`crate::vm::Vms::sweep`]).
#[derive(Debug)]
pub struct Staged {
    prepared: Prepared,
    /// (VM disk, its staged copy) for the writable disks: locked temps
    /// beside the disks (one filesystem, so the commit is a rename).
    staged: Vec<(PathBuf, Temp)>,
    /// Read-only resident disks (the seed) to write: (snapshot file, VM path).
    seeds: Vec<(PathBuf, PathBuf)>,
}

impl Prepared {
    /// Step 2: copies the snapshot's writable disks into temps beside the
    /// VM's disks, each hashed on the way against the sidecar (the
    /// preflight hashes only small files; a big disk changed since the
    /// snapshot is found here). Needs no lock and touches no file of the
    /// VM, so the VM runs meanwhile: this is the long part of a restore,
    /// and any failure in it costs the VM nothing.
    pub fn stage(self) -> Result<Staged, RestoreError> {
        // Dropped on an error: the temps staged so far go with it.
        let mut staged = Vec::new();
        let mut seeds = Vec::new();
        for ((from, to), hash) in self
            .checked
            .storage
            .iter()
            .zip(&self.storage)
            .zip(&self.hashes)
        {
            match to.role {
                DiskRole::Layer => {}
                DiskRole::Cidata => seeds.push((from.path.clone(), to.path.clone())),
                DiskRole::Cow | DiskRole::Data => {
                    let tmp = stage_one(&from.path, &to.path, hash.as_ref())?;
                    staged.push((to.path.clone(), tmp));
                }
            }
        }
        Ok(Staged {
            prepared: self,
            staged,
            seeds,
        })
    }
}

/// One staged copy of the snapshot file `from`, beside the VM's disk
/// `to`, hashed against `expect`.
fn stage_one(from: &Path, to: &Path, expect: Option<&Digest>) -> Result<Temp, RestoreError> {
    let dir = to.parent().unwrap_or(Path::new("."));
    // Opened as an input: a path swapped for a FIFO or a device since the
    // preflight is refused, never read (or blocked on).
    let src = input::open(from, Accept::Regular).map_err(|source| RestoreError::Io {
        what: "open",
        path: from.to_path_buf(),
        source,
    })?;
    let tmp = Temp::create_in(dir, STAGE_SUFFIX).map_err(|source| RestoreError::Io {
        what: "create a staged copy in",
        path: dir.to_path_buf(),
        source,
    })?;
    let hashed = expect.is_some();
    let (_, computed) = copy::copy_into(&src.file, from, tmp.as_file(), tmp.path(), hashed)
        .map_err(|source| RestoreError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source,
        })?;
    if let (Some(recorded), Some(computed)) = (expect, computed) {
        if *recorded != computed {
            return Err(RestoreError::Changed {
                path: from.to_path_buf(),
                recorded: recorded.clone(),
                computed,
            });
        }
    }
    Ok(tmp)
}

impl Staged {
    /// Step 3, after the VM has stopped and under `locks` (the VM's
    /// writable disks): renames the staged copies over the disks (all or
    /// none, crash included: [`DiskLocks::replace`], which fsyncs the
    /// directory; the copies were fsynced when staged) and writes a seed
    /// the VM lacks. Returns the VM's new storage (for its record) and the
    /// restore config.
    pub fn commit(
        self,
        locks: &DiskLocks,
        serial: SerialOutput,
    ) -> Result<(Vec<StorageConfig>, RestoreConfig), RestoreError> {
        let pairs: Vec<(PathBuf, PathBuf)> = self
            .staged
            .iter()
            .map(|(disk, tmp)| (disk.clone(), tmp.path().to_path_buf()))
            .collect();
        for (disk, _) in &pairs {
            if !locks.disks().any(|l| same_file(l, disk)) {
                return Err(RestoreError::NotLocked { path: disk.clone() });
            }
        }
        locks.replace(&pairs).map_err(RestoreError::Lock)?;
        for (_, tmp) in self.staged {
            tmp.renamed();
        }
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

    /// The VM's disks after the restore.
    pub fn storage(&self) -> &[StorageConfig] {
        &self.prepared.storage
    }

    /// The snapshot directory, resolved.
    pub fn snapshot_dir(&self) -> &Path {
        &self.prepared.checked.dir
    }

    /// The staged copies' paths (they exist until the commit).
    pub fn staged_paths(&self) -> Vec<PathBuf> {
        self.staged
            .iter()
            .map(|(_, t)| t.path().to_path_buf())
            .collect()
    }
}

/// The suffix of a staged copy's temp name (`.cocoon-tmp-XXXXXX.stage`).
pub const STAGE_SUFFIX: &str = ".stage";

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || std::fs::canonicalize(b).is_ok_and(|c| c == a)
}
