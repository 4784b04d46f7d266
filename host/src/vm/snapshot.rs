//! VMs and snapshots: a new VM cloned from a snapshot, a snapshot
//! restored into an existing VM, and the note that makes a VM's next
//! start a restore instead of a cold boot.
//!
//! Both clone and restore end the same way: the VM's disks hold the
//! snapshot's contents, its record names them, and `start-from.json` in
//! its directory ([`StartFrom`]) names the snapshot's state and memory
//! files. The monitor that starts next finds the note, restores the VMM
//! from those files instead of booting the kernel, and removes the note,
//! so every later start is a cold boot of the same disks (as after a
//! crash of the guest).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::create::store_root;
use super::record::{ImageInfo, Machine, VmState};
use super::vms::{VmEntry, Vms};
use super::VmError;
use crate::disk::copy::CopyMethod;
use crate::disk::lock::{DiskLocks, Wait};
use crate::disk::model::DiskRole;
use crate::net::NicSpec;
use crate::snapshot::clone::{self, CloneError, CloneOptions};
use crate::snapshot::clone_disks::DataDiskFile;
use crate::snapshot::preflight::{self, HashedLayer, DEFAULT_HASH_LIMIT};
use crate::snapshot::restore::{self, Prepared, RestoreError, Staged};
use crate::snapshot::store::{SnapshotDir, StoreError};

/// The note of a pending restore, in the VM's directory.
pub const START_FROM_FILE: &str = "start-from.json";

/// The snapshot a VM's next start restores (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartFrom {
    /// The snapshot's name, for messages.
    pub snapshot: String,
    /// Its directory (resolved by the preflight).
    pub dir: PathBuf,
    /// The VMM's state and memory files in it.
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// The note is tiny; anything bigger was not written by us.
const MAX_START_FROM_BYTES: u64 = 64 << 10;

impl StartFrom {
    pub fn path(vm_dir: &Path) -> PathBuf {
        vm_dir.join(START_FROM_FILE)
    }

    /// The pending restore of the VM in `vm_dir`, if any.
    pub fn load(vm_dir: &Path) -> Result<Option<StartFrom>, VmError> {
        let path = Self::path(vm_dir);
        let bytes = match crate::fsutil::input::read_bounded(&path, MAX_START_FROM_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VmError::io("reading", &path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| VmError::io("parsing", &path)(std::io::Error::other(e)))
    }

    /// Writes the note atomically (temp, fsync, rename).
    pub fn save(&self, vm_dir: &Path) -> Result<(), VmError> {
        let path = Self::path(vm_dir);
        let mut bytes = serde_json::to_vec_pretty(self).expect("a StartFrom serialises");
        bytes.push(b'\n');
        crate::fsutil::write_atomic(&path, &bytes, 0o600).map_err(VmError::io("writing", &path))
    }

    /// Removes the note (after a restore that worked).
    pub fn clear(vm_dir: &Path) -> Result<(), VmError> {
        let path = Self::path(vm_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => crate::fsutil::sync_dir(vm_dir).map_err(VmError::io("fsync", vm_dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::io("removing", &path)(e)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotVmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] StoreError),
    #[error("the image store")]
    Store(#[source] crate::store::StoreError),
    // Boxed: the preflight's errors are large, and these travel far.
    #[error(transparent)]
    Cloning(Box<CloneError>),
    #[error(transparent)]
    Restore(Box<RestoreError>),
    #[error(
        "snapshot {snapshot} has {snap_cpus} vCPUs and {snap_memory} bytes of memory, VM {vm} \
         {vm_cpus} and {vm_memory}; a restore keeps the VM's shape (the VM was not touched)"
    )]
    Shape {
        snapshot: String,
        vm: String,
        snap_cpus: u8,
        snap_memory: u64,
        vm_cpus: u8,
        vm_memory: u64,
    },
    #[error(
        "snapshot {snapshot} has {snap_nics} NICs, VM {vm} {vm_nics}; a restore keeps the VM's \
         NICs, one for each of the snapshot's (the VM was not touched)"
    )]
    NicCount {
        snapshot: String,
        vm: String,
        snap_nics: usize,
        vm_nics: usize,
    },
    #[error("the clone's NICs")]
    Nics(#[source] Box<super::nics::NicsError>),
    #[error("locking VM {vm}'s disks")]
    Lock {
        vm: String,
        #[source]
        source: crate::disk::lock::LockError,
    },
}

impl From<CloneError> for SnapshotVmError {
    fn from(e: CloneError) -> Self {
        SnapshotVmError::Cloning(Box::new(e))
    }
}

impl From<RestoreError> for SnapshotVmError {
    fn from(e: RestoreError) -> Self {
        SnapshotVmError::Restore(Box::new(e))
    }
}

/// The preflight options of the host whose state directory holds
/// `store_root`: an image counts as present when its blob is in the store;
/// the layers in `hashed_layers` were hashed by this process already.
fn with_checks<T>(
    store_root: &Path,
    hashed_layers: &[HashedLayer],
    f: impl FnOnce(&preflight::Options<'_>) -> T,
) -> Result<T, SnapshotVmError> {
    let layout =
        crate::store::Layout::create(store_root.to_path_buf()).map_err(SnapshotVmError::Store)?;
    let present = |d: &crate::store::Digest| layout.present(d, None).is_some();
    Ok(f(&preflight::Options {
        store_root,
        target: None,
        image_present: &present,
        hash_limit: DEFAULT_HASH_LIMIT,
        hashed_layers,
    }))
}

/// What [`clone_vm`] made.
#[derive(Debug)]
pub struct ClonedVm {
    pub vm: VmEntry,
    pub snapshot: String,
    /// How each writable disk was copied, by serial.
    pub copies: Vec<(String, CopyMethod)>,
}

/// The kernel a clone's record names for its later cold boots (its first
/// start restores the snapshot and boots nothing).
#[derive(Debug, Clone)]
pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// A new VM (`name`, or a generated one) from snapshot `snapshot` under
/// `state_dir`: the preflight, its own copies of the cow and data disks,
/// its own NICs (new MACs; `taps` for the NICs that were on a user's tap,
/// see [`super::nics::plan_clone`]), a seed with its own instance-id,
/// hostname and MACs, its record and the [`StartFrom`] note. `data_disks`
/// put the user's files in place of the snapshot's data disks
/// ([`crate::snapshot::clone_disks`]). `hashed_layers`: the snapshot's
/// layers hashed already ([`crate::snapshot::layers::check`]); the
/// preflight hashes the others. Not started. Nothing of it stays on an
/// error.
#[allow(clippy::too_many_arguments)]
pub fn clone_vm(
    vms: &Vms,
    state_dir: &Path,
    snapshot: &str,
    name: Option<&str>,
    taps: &[NicSpec],
    boot: Boot,
    data_disks: &[DataDiskFile],
    hashed_layers: &[HashedLayer],
) -> Result<ClonedVm, SnapshotVmError> {
    let snap = SnapshotDir::open(&crate::snapshot::snapshots_dir(state_dir), snapshot)?;
    let sidecar = &snap.sidecar;
    // The NICs before any file: the clone's MACs are new (the VMM
    // translates for the guest, which keeps the snapshot's), its bridge
    // taps are made by its monitor, a user's tap is the clone's own.
    let nics_err = |e| SnapshotVmError::Nics(Box::new(e));
    let taken = super::nics::taken_macs(vms)?;
    let nics =
        super::nics::plan_clone(&snap.name, &sidecar.nics, taps, &taken).map_err(nics_err)?;
    super::nics::check(&nics, true).map_err(nics_err)?;
    let macs = sidecar
        .nics
        .iter()
        .zip(&nics)
        .map(|(old, new)| (old.mac.to_string(), new.mac.to_string()))
        .collect();
    let mut creating = vms.begin_create(
        name,
        Machine {
            cpus: sidecar.cpus,
            memory: sidecar.memory_bytes,
            kernel: boot.kernel,
            initrd: boot.initrd,
            cmdline: boot.cmdline,
        },
    )?;
    let store = store_root(&creating.dir);
    let opts = CloneOptions {
        name: creating.record.name.clone(),
        instance_id: creating.record.id.clone(),
        cpus: None,
        memory_bytes: None,
        serial: cocoon_vmm::SerialOutput::Sink,
        macs,
        data_disks: data_disks.to_vec(),
    };
    let cloned = with_checks(&store, hashed_layers, |checks| {
        clone::clone(&snap, checks, &creating.dir, opts)
    })??;
    // Its own boot files (the snapshot's when it carries them): the
    // snapshot and the source VM may go before the clone does.
    if let Some(b) = &sidecar.boot {
        let m = &mut creating.record.machine;
        m.kernel = cloned.checked.dir.join(&b.kernel);
        m.initrd = b.initrd.as_ref().map(|i| cloned.checked.dir.join(i));
        m.cmdline.clone_from(&b.cmdline);
    }
    super::clone_boot::own(
        vms.root(),
        &cloned.checked.dir,
        &creating.dir,
        &mut creating.record.machine,
    )?;
    creating.record.storage = cloned.storage.clone();
    creating.record.nics = nics;
    creating.record.policy = format!("snapshot {}", snap.name);
    creating.record.image = Some(ImageInfo {
        reference: sidecar
            .image
            .reference
            .clone()
            .unwrap_or_else(|| sidecar.image.digest.to_string()),
        digest: sidecar.image.digest.clone(),
        base: None,
        layers: sidecar
            .disks
            .iter()
            .filter(|d| d.config.role == DiskRole::Layer)
            .filter_map(|d| d.layer.as_ref().map(|l| l.digest.clone()))
            .collect(),
    });
    StartFrom {
        snapshot: snap.name.clone(),
        dir: cloned.checked.dir.clone(),
        state: cloned.restore.state.clone(),
        memory: cloned.restore.memory.clone(),
    }
    .save(&creating.dir)?;
    // The record is finished while the disks are still locked, as create
    // does: no other command sees the files before the record names them.
    let vm = creating.finish()?;
    drop(cloned.locks);
    Ok(ClonedVm {
        vm,
        snapshot: snap.name.clone(),
        copies: cloned.copies,
    })
}

/// A restore that passed its preflight; the VM is untouched so far.
#[derive(Debug)]
pub struct RestorePlan {
    snap: SnapshotDir,
    prepared: Prepared,
}

impl RestorePlan {
    pub fn snapshot(&self) -> &str {
        &self.snap.name
    }

    /// Step 2, while the VM still runs: the snapshot's disks copied (and
    /// hashed) into staged files beside the VM's. An error removes what
    /// was staged; the VM was not touched.
    pub fn stage(self) -> Result<StagedRestore, SnapshotVmError> {
        let RestorePlan { snap, prepared } = self;
        let staged = prepared.stage()?;
        // A test kills the command here: the staged files are left for
        // the next command's sweep, the VM untouched.
        crate::store::crash_point("restore-staged");
        Ok(StagedRestore { snap, staged })
    }
}

/// A restore whose disks are staged; the VM is untouched so far. Dropped,
/// it removes the staged files.
#[derive(Debug)]
pub struct StagedRestore {
    snap: SnapshotDir,
    staged: Staged,
}

impl StagedRestore {
    pub fn snapshot(&self) -> &str {
        &self.snap.name
    }

    /// The staged files (for tests and messages).
    pub fn staged_paths(&self) -> Vec<PathBuf> {
        self.staged.staged_paths()
    }
}

/// Step 1 of a restore, while the VM may run: the snapshot's preflight
/// against the VM's disks and shape (the layers in `hashed_layers` hashed
/// already, the others hashed now). An error means nothing was touched.
pub fn prepare_restore(
    vm: &VmEntry,
    state_dir: &Path,
    snapshot: &str,
    hashed_layers: &[HashedLayer],
) -> Result<RestorePlan, SnapshotVmError> {
    let snap = SnapshotDir::open(&crate::snapshot::snapshots_dir(state_dir), snapshot)?;
    let m = &vm.record.machine;
    if (snap.sidecar.cpus, snap.sidecar.memory_bytes) != (m.cpus, m.memory) {
        return Err(SnapshotVmError::Shape {
            snapshot: snap.name.clone(),
            vm: vm.record.name.clone(),
            snap_cpus: snap.sidecar.cpus,
            snap_memory: snap.sidecar.memory_bytes,
            vm_cpus: m.cpus,
            vm_memory: m.memory,
        });
    }
    // The VM keeps its own NICs (taps and MACs; the VMM translates when
    // they are not the snapshot's), one per NIC the guest knows.
    if snap.sidecar.nics.len() != vm.record.nics.len() {
        return Err(SnapshotVmError::NicCount {
            snapshot: snap.name.clone(),
            vm: vm.record.name.clone(),
            snap_nics: snap.sidecar.nics.len(),
            vm_nics: vm.record.nics.len(),
        });
    }
    let store = store_root(&vm.dir);
    let prepared = with_checks(&store, hashed_layers, |checks| {
        restore::prepare(&snap, checks, &vm.record.storage, &vm.dir)
    })??;
    Ok(RestorePlan { snap, prepared })
}

/// Step 3, once the VM has no monitor: under the VM's lock and its disks'
/// locks, the staged disks are renamed over the VM's (all or none), the
/// record names them, and the [`StartFrom`] note makes the next start
/// restore the snapshot. The VM is left stopped.
pub fn commit_restore(vm: &VmEntry, staged: StagedRestore) -> Result<VmEntry, SnapshotVmError> {
    let _op = vm.lock("restore")?;
    let mut now = vm.clone();
    now.reload()?;
    if now.record.state.has_monitor() {
        return Err(VmError::WrongState {
            vm: now.record.name.clone(),
            state: now.record.state,
            what: "a restore replaces the disks of a stopped VM",
        }
        .into());
    }
    let StagedRestore { snap, staged } = staged;
    let writable: Vec<PathBuf> = staged
        .storage()
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.path.clone())
        .collect();
    let locks = DiskLocks::acquire(&writable, "restore", Wait::No).map_err(|source| {
        SnapshotVmError::Lock {
            vm: now.record.name.clone(),
            source,
        }
    })?;
    let dir = staged.snapshot_dir().to_path_buf();
    let (storage, config) = staged.commit(&locks, cocoon_vmm::SerialOutput::Sink)?;
    now.record.storage = storage;
    if now.record.state != VmState::Created {
        now.record.state = VmState::Stopped;
    }
    now.record.save(&now.dir).map_err(VmError::from)?;
    StartFrom {
        snapshot: snap.name.clone(),
        dir,
        state: config.state,
        memory: config.memory,
    }
    .save(&now.dir)?;
    drop(locks);
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_from_note_round_trips_and_refuses_what_it_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StartFrom::load(dir.path()).unwrap(), None);
        StartFrom::clear(dir.path()).unwrap();
        let note = StartFrom {
            snapshot: "s1".into(),
            dir: "/state/snapshots/s1".into(),
            state: "/state/snapshots/s1/state".into(),
            memory: "/state/snapshots/s1/memory".into(),
        };
        note.save(dir.path()).unwrap();
        assert_eq!(StartFrom::load(dir.path()).unwrap(), Some(note.clone()));
        let mut v = serde_json::to_value(&note).unwrap();
        v["extra"] = 1.into();
        std::fs::write(StartFrom::path(dir.path()), v.to_string()).unwrap();
        let e = StartFrom::load(dir.path()).unwrap_err();
        assert!(crate::error_chain(&e).contains("extra"), "{e}");
        assert!(e.to_string().contains(START_FROM_FILE), "{e}");
        StartFrom::clear(dir.path()).unwrap();
        assert_eq!(StartFrom::load(dir.path()).unwrap(), None);
    }
}
