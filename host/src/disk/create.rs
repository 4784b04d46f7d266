//! Making the files of an accepted [`Plan`]: the blank cow (formatted
//! ext4, as the cocoon init expects) or the per-VM base copy, data disks (sparse; ext4 ones formatted by the real
//! `mkfs.ext4`), the cloud-init seed. Layers are the store's and are not
//! touched.
//!
//! Each file is made under a temp name, fsynced and linked into place only
//! if nothing is there: creation never overwrites a disk. A failure removes
//! every file this call made, so a VM is created whole or not at all. The
//! caller holds the VM's lock and the plan's disk locks (asked for as a
//! [`DiskLocks`], so it cannot be forgotten).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cidata::{self, CidataError, SeedInput, SeedMount};
use super::copy::{self, CopyError, CopyReport};
use super::lock::DiskLocks;
use super::model::{DiskRole, FsType};
use super::newfile::NewFile;
use super::plan::{DiskSource, Plan};
use crate::fsutil;

/// The mkfs.ext4 options for data disks: no reserved blocks (a data disk
/// has no root daemons to save space for), lazy inode-table and journal
/// init (formatting a 1 TiB sparse file takes a second instead of writing
/// gigabytes), discard (keeps the file sparse).
pub const MKFS_EXT4_ARGS: [&str; 5] = [
    "-F",
    "-m0",
    "-q",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,discard",
];

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; creating a VM's disks never overwrites one")]
    Exists { path: PathBuf },
    #[error("{path} is writable but its lock is not held")]
    NotLocked { path: PathBuf },
    #[error("mkfs.ext4 on {path} failed ({status}): {stderr}")]
    Mkfs {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("running mkfs.ext4 (from e2fsprogs)")]
    MkfsMissing(#[source] std::io::Error),
    #[error("the plan has a cidata disk but no seed was given")]
    NoSeed,
    #[error("the per-VM copy of the base image")]
    Copy(#[source] CopyError),
    #[error("the cloud-init seed {path}")]
    Cidata {
        path: PathBuf,
        #[source]
        source: CidataError,
    },
}

/// What [`create`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Every file made, in plan order.
    pub paths: Vec<PathBuf>,
    /// How the base image was copied, for a disk-image VM.
    pub base_copy: Option<CopyReport>,
}

/// The `mounts:` rows of a plan: its data disks that have a mount point.
pub fn seed_mounts(plan: &Plan) -> Vec<SeedMount> {
    plan.disks
        .iter()
        .filter(|d| d.config.role == DiskRole::Data)
        .filter_map(|d| {
            Some(SeedMount {
                serial: d.config.serial.clone(),
                mount_point: d.config.mount_point.clone()?,
                fstype: d.config.fstype.unwrap_or(FsType::None),
            })
        })
        .collect()
}

/// Creates every file of `plan` except the layers. `seed` is required when
/// the plan has a cidata disk.
pub fn create(
    plan: &Plan,
    locks: &DiskLocks,
    seed: Option<&SeedInput>,
) -> Result<Created, CreateError> {
    let locked: Vec<&Path> = locks.disks().collect();
    for d in &plan.disks {
        if matches!(d.source, DiskSource::Layer { .. }) {
            continue;
        }
        if !d.config.read_only && !locked.iter().any(|l| is_same(l, &d.config.path)) {
            return Err(CreateError::NotLocked {
                path: d.config.path.clone(),
            });
        }
        if d.config.path.symlink_metadata().is_ok() {
            return Err(CreateError::Exists {
                path: d.config.path.clone(),
            });
        }
    }
    let mut made = Created {
        paths: Vec::new(),
        base_copy: None,
    };
    for d in &plan.disks {
        let path = &d.config.path;
        let result = match &d.source {
            DiskSource::Layer { .. } => continue,
            // The layered root's cow: the guest's init mounts it as ext4
            // for the overlay's upper and work dirs (it has no mkfs).
            DiskSource::Blank { size } => blank(path, *size, Some(FsType::Ext4)),
            DiskSource::Data { size, fstype } => blank(path, *size, Some(*fstype)),
            DiskSource::BaseCopy { base, size } => match copy::copy_base(base, path, *size) {
                Ok(report) => {
                    made.base_copy = Some(report);
                    Ok(())
                }
                Err(e) => Err(CreateError::Copy(e)),
            },
            DiskSource::Cidata => match seed {
                None => Err(CreateError::NoSeed),
                Some(seed) => write_seed(path, seed, plan),
            },
        };
        match result {
            Ok(()) => made.paths.push(path.clone()),
            Err(e) => {
                undo(&made.paths);
                return Err(e);
            }
        }
    }
    Ok(made)
}

fn is_same(locked: &Path, planned: &Path) -> bool {
    // Locked paths are resolved; the plan's are absolute paths in the VM's
    // directory, which may itself be reached through a symlink.
    locked == planned
        || match (
            planned.parent().map(std::fs::canonicalize),
            planned.file_name(),
        ) {
            (Some(Ok(dir)), Some(name)) => locked == dir.join(name),
            _ => false,
        }
}

fn undo(paths: &[PathBuf]) {
    for p in paths.iter().rev() {
        let _ = std::fs::remove_file(p);
    }
    if let Some(dir) = paths.first().and_then(|p| p.parent()) {
        let _ = fsutil::sync_dir(dir);
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CreateError {
    let path = path.to_path_buf();
    move |source| CreateError::Io { what, path, source }
}

/// A sparse file of `size` bytes, formatted when `fstype` is ext4.
fn blank(path: &Path, size: u64, fstype: Option<FsType>) -> Result<(), CreateError> {
    let io = |what| io_err(what, path);
    let f = NewFile::create(path).map_err(io("creating a temp file for"))?;
    f.file().set_len(size).map_err(io("sizing"))?;
    if fstype == Some(FsType::Ext4) {
        mkfs_ext4(f.path())?;
    }
    f.commit().map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CreateError::Exists {
            path: path.to_path_buf(),
        },
        _ => io("creating")(e),
    })?;
    Ok(())
}

/// Formats `path` (a regular file) as ext4 with [`MKFS_EXT4_ARGS`].
pub fn mkfs_ext4(path: &Path) -> Result<(), CreateError> {
    let out = Command::new(find_tool("mkfs.ext4"))
        .args(MKFS_EXT4_ARGS)
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .map_err(CreateError::MkfsMissing)?;
    if !out.status.success() {
        return Err(CreateError::Mkfs {
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// `name` from PATH, else from the sbin directories, which a non-root
/// PATH often lacks.
pub(crate) fn find_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn write_seed(path: &Path, seed: &SeedInput, plan: &Plan) -> Result<(), CreateError> {
    let wrap = |source| CreateError::Cidata {
        path: path.to_path_buf(),
        source,
    };
    let files = cidata::render(seed, &seed_mounts(plan)).map_err(wrap)?;
    let bytes = cidata::image(&files).map_err(wrap)?;
    let io = |what| io_err(what, path);
    let f = NewFile::create(path).map_err(io("creating a temp file for"))?;
    std::os::unix::fs::FileExt::write_all_at(f.file(), &bytes, 0).map_err(io("writing"))?;
    f.commit().map_err(io("creating"))?;
    Ok(())
}
