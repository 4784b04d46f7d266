//! Saving a snapshot of a paused VM: the VMM's state and memory, copies of
//! the writable disks (and the seed) taken inside the pause window, the
//! layers by digest only, the sidecar last, then one rename that makes
//! the snapshot exist (see [`super::store`] for why a crash leaves no half
//! snapshot listed).
//!
//! Split in two so the pause lasts only as long as it must:
//! [`capture`] (VM paused, disk locks held: VMM files and disk copies) and
//! [`Captured::finish`] (VM running again, no lock needed: hashing every
//! file, the sidecar, the rename). [`save`] does both.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_vmm::snapshot::{self as vmm_snapshot, RestoreError};

use super::sidecar::{
    ImageInfo, LayerRef, ResidentFile, Sidecar, SidecarError, SnapshotBoot, SnapshotDisk,
    StateVersion, DISKS_DIR, INITRD_FILE, KERNEL_FILE,
};
use super::store::{self, StoreError, TempSnapshot};
use crate::disk::copy::{self, CopyError, CopyMethod};
use crate::disk::lock::DiskLocks;
use crate::disk::model::{DiskRole, StorageConfig};
use crate::disk::rules::{self, Context, Violations};
use crate::store::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the VM's disks break the storage rules")]
    Storage(#[source] Violations),
    #[error(
        "disk {path} is writable but its lock is not held; a snapshot copies it under its lock"
    )]
    NotLocked { path: PathBuf },
    #[error("the VM has {disks} layer disks but {digests} layer digests were given")]
    LayerDigests { disks: usize, digests: usize },
    #[error("layer disk {index} ({path}) is not under the image store {store}")]
    LayerOutsideStore {
        index: usize,
        path: PathBuf,
        store: PathBuf,
    },
    #[error("disks {a} and {b} have the same file name; a snapshot keeps one copy per name")]
    SameFileName { a: PathBuf, b: PathBuf },
    #[error("the VMM could not write the snapshot")]
    Vmm(#[source] vmm_snapshot::SnapshotError),
    #[error("the VMM's disks do not match the VM's storage")]
    VmmDisks(#[source] RestoreError),
    #[error("cannot {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: CopyError,
    },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
}

/// What the host knows about the VM beyond its disks.
#[derive(Debug, Clone)]
pub struct SaveMeta {
    /// The VM's name.
    pub source_vm: String,
    /// The image it was built from.
    pub image: ImageInfo,
    /// Digests of the VM's layer disks, in disk order (from its record).
    pub layers: Vec<Digest>,
    /// The VM's directory: its cow, data and seed files are under it.
    pub vm_dir: PathBuf,
    /// The image store's root (`STATE/images`): its layers are under it.
    pub store_root: PathBuf,
    /// The VM's NICs (from its record), in device order.
    pub nics: Vec<crate::net::Nic>,
    /// What the VM boots: copied into the snapshot (after the pause), so
    /// that its clones have it wherever they are made.
    pub boot: Option<BootFiles>,
}

/// A VM's kernel, initrd and command line (its record's).
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// What [`save`] made.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub name: String,
    /// `STATE/snapshots/NAME`.
    pub dir: PathBuf,
    pub sidecar: Sidecar,
    /// How each resident disk was copied, by serial.
    pub copies: Vec<(String, CopyMethod)>,
    /// The VMM's own report (memory bytes written, TSC rate…).
    pub vmm: vmm_snapshot::SnapshotInfo,
    /// Time spent in [`capture`] (inside the pause window) and in
    /// [`Captured::finish`].
    pub capture_time: Duration,
    pub finish_time: Duration,
}

/// A snapshot whose files are written but not yet hashed or named.
#[derive(Debug)]
pub struct Captured {
    temp: TempSnapshot,
    name: String,
    sidecar: Sidecar,
    copies: Vec<(String, CopyMethod)>,
    vmm: vmm_snapshot::SnapshotInfo,
    capture_time: Duration,
    boot: Option<BootFiles>,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SaveError {
    let path = path.to_path_buf();
    move |source| SaveError::Io { what, path, source }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || std::fs::canonicalize(b).is_ok_and(|c| c == a)
}

/// `save` in one call: [`capture`], then [`Captured::finish`]. The caller
/// paused `vm` and holds `locks` (the VM's writable disks); it may resume
/// the VM when this returns (or, with the two halves, after `capture`).
pub fn save(
    vm: &cocoon_vmm::Vm,
    storage: &[StorageConfig],
    locks: &DiskLocks,
    meta: SaveMeta,
    snapshots_dir: &Path,
    name: &str,
) -> Result<SnapshotInfo, SaveError> {
    capture(vm, storage, locks, meta, snapshots_dir, name)?.finish()
}

/// The pause-window half of a save: checks the VM's storage, writes the
/// VMM's files and copies every resident disk into a temp snapshot
/// directory. Nothing is listed until [`Captured::finish`]; dropping the
/// result removes everything.
pub fn capture(
    vm: &cocoon_vmm::Vm,
    storage: &[StorageConfig],
    locks: &DiskLocks,
    meta: SaveMeta,
    snapshots_dir: &Path,
    name: &str,
) -> Result<Captured, SaveError> {
    let t0 = Instant::now();
    store::check_name(name)?;
    if snapshots_dir.join(name).symlink_metadata().is_ok() {
        return Err(StoreError::Exists {
            name: name.into(),
            dir: snapshots_dir.to_path_buf(),
        }
        .into());
    }
    // Leftovers of an earlier, interrupted save go first (never a live one).
    store::clean_stale(snapshots_dir)?;

    let roots = [meta.vm_dir.clone(), meta.store_root.clone()];
    let size_of = |_: usize, d: &StorageConfig| std::fs::metadata(&d.path).ok().map(|m| m.len());
    rules::validate(
        storage,
        &Context {
            roots: &roots,
            size_of: &size_of,
        },
    )
    .map_err(SaveError::Storage)?;
    let locked: Vec<&Path> = locks.disks().collect();
    for d in storage.iter().filter(|d| !d.read_only) {
        if !locked.iter().any(|l| same_file(l, &d.path)) {
            return Err(SaveError::NotLocked {
                path: d.path.clone(),
            });
        }
    }
    let n_layers = storage.iter().filter(|d| d.role == DiskRole::Layer).count();
    if n_layers != meta.layers.len() {
        return Err(SaveError::LayerDigests {
            disks: n_layers,
            digests: meta.layers.len(),
        });
    }

    // Where each disk goes in the sidecar (relative paths).
    let mut layer_digests = meta.layers.iter();
    let mut disks = Vec::with_capacity(storage.len());
    let mut names: Vec<(String, &Path)> = Vec::new();
    for (index, d) in storage.iter().enumerate() {
        if d.role == DiskRole::Layer {
            let rel = d.path.strip_prefix(&meta.store_root).map_err(|_| {
                SaveError::LayerOutsideStore {
                    index,
                    path: d.path.clone(),
                    store: meta.store_root.clone(),
                }
            })?;
            let size = std::fs::metadata(&d.path)
                .map_err(io_err("stat", &d.path))?
                .len();
            disks.push(SnapshotDisk {
                config: StorageConfig {
                    path: rel.to_path_buf(),
                    ..d.clone()
                },
                layer: Some(LayerRef {
                    digest: layer_digests.next().expect("counted above").clone(),
                    size,
                }),
            });
            continue;
        }
        let file = d
            .path
            .file_name()
            .expect("validated: a disk path is a file under the VM's directory")
            .to_string_lossy();
        let rel = format!("{DISKS_DIR}/{file}");
        if let Some((_, other)) = names.iter().find(|(n, _)| *n == rel) {
            return Err(SaveError::SameFileName {
                a: other.to_path_buf(),
                b: d.path.clone(),
            });
        }
        names.push((rel.clone(), &d.path));
        disks.push(SnapshotDisk {
            config: StorageConfig {
                path: rel.into(),
                ..d.clone()
            },
            layer: None,
        });
    }

    let temp = TempSnapshot::create(snapshots_dir, name)?;
    let vmm = vm.snapshot(temp.path()).map_err(SaveError::Vmm)?;
    let vmm_disks: Vec<cocoon_vmm::DiskConfig> = storage.iter().map(|d| d.to_vmm_disk()).collect();
    vmm_snapshot::check_disks(&vmm.disks, &vmm_disks).map_err(SaveError::VmmDisks)?;
    let disks_dir = temp.path().join(DISKS_DIR);
    std::fs::create_dir(&disks_dir).map_err(io_err("create", &disks_dir))?;
    let mut copies = Vec::new();
    for (d, s) in storage.iter().zip(&disks) {
        if s.layer.is_some() {
            continue;
        }
        let dest = temp.path().join(&s.config.path);
        let method = copy::copy_file(&d.path, &dest).map_err(|source| SaveError::File {
            what: "copy",
            path: d.path.clone(),
            source,
        })?;
        copies.push((d.serial.clone(), method));
    }

    let sidecar = Sidecar {
        version: Sidecar::version_for(&meta.nics, meta.boot.is_some()),
        name: name.into(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        source_vm: meta.source_vm,
        image: meta.image,
        vmm_state_version: StateVersion(vmm.version),
        cpus: vmm.cpus,
        memory_bytes: vmm.memory_bytes,
        disks,
        nics: meta.nics,
        boot: None,
        files: Vec::new(),
    };
    Ok(Captured {
        temp,
        name: name.into(),
        sidecar,
        copies,
        vmm,
        capture_time: t0.elapsed(),
        boot: meta.boot,
    })
}

/// Copies a boot file into the snapshot: opened as an input (a regular
/// file: a path swapped for a FIFO is refused, never read), then a
/// reflink or sparse copy, fsynced, that never replaces a file.
fn copy_boot_file(from: &Path, dest: &Path) -> Result<(), SaveError> {
    let input = crate::fsutil::input::open(from, crate::fsutil::input::Accept::Regular)
        .map_err(io_err("open the boot file", from))?;
    copy::copy_open_file(&input.file, from, dest).map_err(|source| SaveError::File {
        what: "copy the boot file",
        path: from.to_path_buf(),
        source,
    })?;
    Ok(())
}

impl Captured {
    /// The temp directory the snapshot is being written in.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Hashes every file, writes the sidecar, renames the snapshot into
    /// place. The VM may run meanwhile: nothing here reads its disks.
    pub fn finish(mut self) -> Result<SnapshotInfo, SaveError> {
        let t0 = Instant::now();
        let dir = self.temp.path().to_path_buf();
        let mut names = vec![
            vmm_snapshot::STATE_FILE.to_string(),
            vmm_snapshot::MEMORY_FILE.to_string(),
        ];
        names.extend(
            self.sidecar
                .disks
                .iter()
                .filter(|d| d.resident())
                .map(|d| d.config.path.to_string_lossy().into_owned()),
        );
        if let Some(boot) = self.boot.take() {
            let mut copy_in = |from: &Path, name: &str| {
                copy_boot_file(from, &dir.join(name))?;
                names.push(name.to_string());
                Ok::<_, SaveError>(name.to_string())
            };
            let kernel = copy_in(&boot.kernel, KERNEL_FILE)?;
            let initrd = boot
                .initrd
                .as_deref()
                .map(|i| copy_in(i, INITRD_FILE))
                .transpose()?;
            self.sidecar.boot = Some(SnapshotBoot {
                kernel,
                initrd,
                cmdline: boot.cmdline,
            });
        }
        for name in names {
            let path = dir.join(&name);
            let (size, sha256) = copy::sha256_file(&path).map_err(|source| SaveError::File {
                what: "hash",
                path: path.clone(),
                source,
            })?;
            // The copies were made by NewFile (fsynced); the VMM's files
            // too. The disks directory's entries need their own fsync.
            self.sidecar.files.push(ResidentFile { name, size, sha256 });
        }
        let disks_dir = dir.join(DISKS_DIR);
        crate::fsutil::sync_dir(&disks_dir).map_err(io_err("fsync", &disks_dir))?;
        crate::fsutil::sync_dir(&dir).map_err(io_err("fsync", &dir))?;
        crate::store::crash_point("snapshot-before-sidecar");
        self.sidecar.write(&dir)?;
        crate::store::crash_point("snapshot-before-rename");
        let dest = self.temp.commit(&self.name)?;
        Ok(SnapshotInfo {
            name: self.name,
            dir: dest,
            sidecar: self.sidecar,
            copies: self.copies,
            vmm: self.vmm,
            capture_time: self.capture_time,
            finish_time: t0.elapsed(),
        })
    }
}
