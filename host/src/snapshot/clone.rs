//! A new VM from a snapshot: the preflight first, then the new VM's own
//! copies of the cow and data disks (reflink where the filesystem can), a
//! seed with a new identity, and the VMM restore config that runs it.
//!
//! What a clone shares with its snapshot: the layers (read-only store
//! blobs) and the memory file, which the VMM maps `MAP_PRIVATE` (the
//! guest's writes go to its own anonymous pages, never to the file).
//! Every writable file is the clone's own.
//!
//! A clone has the snapshot's vCPUs and memory. It cannot have more (or
//! fewer): the guest's firmware tables and memory map are part of the
//! restored state and the VMM offers no CPU or memory hotplug, so a guest
//! would never see an added vCPU or RAM (and would fault on removed RAM).
//! Asking for other sizes is refused, saying so.

use std::path::{Path, PathBuf};

use cocoon_vmm::snapshot::RestoreConfig;
use cocoon_vmm::SerialOutput;

use super::clone_disks::{self, CloneDiskError, DataDiskFile};
use super::preflight::{self, Checked, PreflightError};
use super::store::SnapshotDir;
use crate::disk::cidata::{self, CidataError};
use crate::disk::copy::{self, CopyError, CopyMethod};
use crate::disk::lock::{DiskLocks, LockError, Wait};
use crate::disk::model::{DiskRole, StorageConfig};
use crate::disk::rules::{self, Context, Violations};
use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("snapshot {snapshot} fails its preflight")]
    Preflight {
        snapshot: String,
        #[source]
        source: PreflightError,
    },
    #[error("snapshot {snapshot} has {have} {what}; a clone cannot have {asked}: {why}")]
    Resize {
        snapshot: String,
        what: &'static str,
        have: u64,
        asked: u64,
        why: &'static str,
    },
    #[error("{path} already exists; a clone never overwrites a file")]
    Exists { path: PathBuf },
    #[error("locking the clone's disks")]
    Lock(#[source] LockError),
    #[error("copying {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: CopyError,
    },
    #[error("the clone's cloud-init seed {path}")]
    Cidata {
        path: PathBuf,
        #[source]
        source: CidataError,
    },
    #[error(transparent)]
    DataDisk(#[from] CloneDiskError),
    #[error("the clone's disks break the storage rules")]
    Storage(#[source] Violations),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why no resize: see the module documentation.
const NO_HOTPLUG: &str = "the restored guest's ACPI tables and memory map are fixed at its boot, and this VMM has no CPU or memory hotplug";

/// The clone's identity and shape.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// The new VM's name: its seed's hostname.
    pub name: String,
    /// The seed's new `instance-id`.
    pub instance_id: String,
    /// vCPUs and memory asked for (`None`: the snapshot's).
    pub cpus: Option<u8>,
    pub memory_bytes: Option<u64>,
    pub serial: SerialOutput,
    /// `(snapshot's MAC, clone's MAC)` per NIC, `aa:bb:…`: the seed's
    /// `network-config` matches the clone's NICs by them.
    pub macs: Vec<(String, String)>,
    /// `--data-disk`: files in place of the snapshot's data disks.
    pub data_disks: Vec<DataDiskFile>,
}

/// A prepared clone: start it with `Vm::restore(cloned.restore)` (or
/// `Vm::restore_with_shell`), while holding `locks`.
#[derive(Debug)]
pub struct Cloned {
    /// The new VM's disks, for its record.
    pub storage: Vec<StorageConfig>,
    pub restore: RestoreConfig,
    /// How each writable disk was copied, by serial.
    pub copies: Vec<(String, CopyMethod)>,
    /// The clone's writable disks, locked: keep them while it runs.
    pub locks: DiskLocks,
    pub checked: Checked,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CloneError {
    let path = path.to_path_buf();
    move |source| CloneError::Io { what, path, source }
}

/// Refuses other vCPU or memory sizes than the snapshot's.
pub fn check_resize(
    snapshot: &str,
    cpus: u8,
    memory_bytes: u64,
    opts: &CloneOptions,
) -> Result<(), CloneError> {
    let resize = |what, have: u64, asked: u64| CloneError::Resize {
        snapshot: snapshot.into(),
        what,
        have,
        asked,
        why: NO_HOTPLUG,
    };
    if let Some(c) = opts.cpus.filter(|&c| c != cpus) {
        return Err(resize("vCPUs", cpus.into(), c.into()));
    }
    if let Some(m) = opts.memory_bytes.filter(|&m| m != memory_bytes) {
        return Err(resize("bytes of memory", memory_bytes, m));
    }
    Ok(())
}

/// Files made so far, removed unless the clone completes.
struct Made(Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes `bytes` at `dest`, which must not exist: temp, fsync, link.
pub(crate) fn write_new(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(dest).map_err(|e| e.error)?;
    fsutil::sync_dir(dir)
}

/// Prepares a new VM in `vm_dir` (which exists, and which the caller
/// holds the VM lock of) from the snapshot, after its preflight.
pub fn clone(
    snapshot: &SnapshotDir,
    checks: &preflight::Options<'_>,
    vm_dir: &Path,
    opts: CloneOptions,
) -> Result<Cloned, CloneError> {
    let sidecar = &snapshot.sidecar;
    check_resize(&snapshot.name, sidecar.cpus, sidecar.memory_bytes, &opts)?;
    let checks = preflight::Options {
        target: None,
        ..*checks
    };
    let checked = preflight::preflight(&snapshot.dir, sidecar, &checks).map_err(|source| {
        CloneError::Preflight {
            snapshot: snapshot.name.clone(),
            source,
        }
    })?;

    // The clone's files: the same names as the source VM had.
    let mut storage = checked.storage.clone();
    for d in storage.iter_mut().filter(|d| d.role != DiskRole::Layer) {
        let name = d.path.file_name().expect("a resident disk is a file");
        let dest = vm_dir.join(name);
        if dest.symlink_metadata().is_ok() {
            return Err(CloneError::Exists { path: dest });
        }
        d.path = dest;
    }
    // The user's files in place of snapshot data disks are locked with
    // the clone's own disks (one sorted acquire), so nothing writes them
    // while they are copied.
    let replacements = clone_disks::resolve(&snapshot.name, &checked.storage, &opts.data_disks)?;
    let writable: Vec<PathBuf> = storage
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.path.clone())
        .chain(replacements.iter().map(|r| r.resolved.clone()))
        .collect();
    let locks = DiskLocks::acquire(&writable, "clone", Wait::No).map_err(CloneError::Lock)?;

    let mut made = Made(Vec::new());
    let mut copies = Vec::new();
    for (index, (from, to)) in checked.storage.iter().zip(&storage).enumerate() {
        match to.role {
            DiskRole::Layer => {}
            DiskRole::Data if replacements.iter().any(|r| r.index == index) => {
                let r = replacements
                    .iter()
                    .find(|r| r.index == index)
                    .expect("found");
                let want = std::fs::metadata(&from.path)
                    .map_err(io_err("stat", &from.path))?
                    .len();
                let input = r.open(from, want)?;
                let method =
                    copy::copy_open_file(&input.file, r.path(), &to.path).map_err(|source| {
                        CloneError::Copy {
                            from: r.path().to_path_buf(),
                            to: to.path.clone(),
                            source,
                        }
                    })?;
                made.0.push(to.path.clone());
                copies.push((to.serial.clone(), method));
            }
            DiskRole::Cow | DiskRole::Data => {
                let method =
                    copy::copy_file(&from.path, &to.path).map_err(|source| CloneError::Copy {
                        from: from.path.clone(),
                        to: to.path.clone(),
                        source,
                    })?;
                made.0.push(to.path.clone());
                copies.push((to.serial.clone(), method));
            }
            DiskRole::Cidata => {
                let wrap = |source| CloneError::Cidata {
                    path: to.path.clone(),
                    source,
                };
                let old = std::fs::read(&from.path).map_err(io_err("read", &from.path))?;
                let new =
                    cidata::with_identity_and_macs(&old, &opts.instance_id, &opts.name, &opts.macs)
                        .map_err(wrap)?;
                if new.len() != old.len() {
                    // The guest knows the disk's size; another would not
                    // restore.
                    return Err(wrap(CidataError::Invalid {
                        field: "image size",
                        value: old.len().to_string(),
                        reason: format!("the regenerated seed is {} bytes", new.len()),
                    }));
                }
                write_new(&to.path, &new).map_err(io_err("create", &to.path))?;
                made.0.push(to.path.clone());
            }
        }
    }

    let roots = [vm_dir.to_path_buf(), checks.store_root.to_path_buf()];
    let size_of = |_: usize, d: &StorageConfig| std::fs::metadata(&d.path).ok().map(|m| m.len());
    rules::validate(
        &storage,
        &Context {
            roots: &roots,
            size_of: &size_of,
        },
    )
    .map_err(CloneError::Storage)?;

    made.0.clear();
    let restore = RestoreConfig {
        state: checked.dir.join(cocoon_vmm::snapshot::STATE_FILE),
        memory: checked.dir.join(cocoon_vmm::snapshot::MEMORY_FILE),
        disks: storage.iter().map(|d| d.to_vmm_disk()).collect(),
        // The taps exist only once the monitor starts: it names them.
        nets: Vec::new(),
        serial: opts.serial,
    };
    Ok(Cloned {
        storage,
        restore,
        copies,
        locks,
        checked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(cpus: Option<u8>, memory_bytes: Option<u64>) -> CloneOptions {
        CloneOptions {
            name: "c1".into(),
            instance_id: "i-c1".into(),
            cpus,
            memory_bytes,
            serial: SerialOutput::Sink,
            macs: Vec::new(),
            data_disks: Vec::new(),
        }
    }

    #[test]
    fn resizing_is_refused_saying_why() {
        check_resize("s", 2, 64 << 20, &opts(None, None)).unwrap();
        check_resize("s", 2, 64 << 20, &opts(Some(2), Some(64 << 20))).unwrap();
        for (o, what) in [
            (opts(Some(4), None), "has 2 vCPUs; a clone cannot have 4"),
            (opts(Some(1), None), "cannot have 1"),
            (opts(None, Some(128 << 20)), "bytes of memory"),
        ] {
            let e = check_resize("s", 2, 64 << 20, &o).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
            assert!(e.contains("no CPU or memory hotplug"), "{e}");
        }
    }
}
