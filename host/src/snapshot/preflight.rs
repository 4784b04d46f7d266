//! The preflight: everything a clone or restore checks before it changes
//! anything (before a restore stops the running VM). A snapshot directory
//! is untrusted input (it may have been imported, pulled, or edited), so
//! every rule of issue 13 is checked here and each broken one has its own
//! [`PreflightError`] variant:
//!
//! 1. every name in the sidecar is a plain relative path (no `..`, not
//!    absolute), and every resident disk and boot file is one of the
//!    listed files;
//! 2. every listed file is present, a regular file, inside the snapshot
//!    directory once symlinks are resolved, and of the recorded size;
//! 3. the sidecar's disks pass the storage rules ([`rules::validate`]);
//! 4. every layer is a regular file of the image store of its recorded
//!    size and sha256: hashed whole, streamed, opened with `O_NOFOLLOW`
//!    (the host never boots a disk whose digest it has not verified). A
//!    clone or restore has checked the layers before this, and built the
//!    missing ones and the ones whose bytes did not match again, held to
//!    the sidecar's digests ([`super::layers`]); the layers it hashed or
//!    built then ([`Options::hashed_layers`]) are not hashed twice. The
//!    layers are hashed last, after every cheap check;
//! 5. the VMM state file is whole, of a version this VMM reads, of the
//!    version the sidecar records, and of the sidecar's shape;
//! 6. files up to [`Options::hash_limit`] bytes (the state, the seed) hash
//!    to the recorded sha256 (import and pull hash everything);
//! 7. disk count and, per index, serial, read-only flag and size agree
//!    with what the VMM state says the guest has;
//! 8. for a restore, the roles and serials are the target VM's, but for
//!    one trailing cidata disk on either side (the seed is dropped after
//!    the first boot);
//! 9. the image the VM was built from is in the store.
//!
//! The checks that need no file are pure functions of their inputs
//! ([`check_name`], [`check_against_state`], [`check_roles`],
//! [`check_shape`]) and are table-tested here; the whole preflight is
//! tested on real tampered snapshots in `host/tests/snapshot_tamper.rs`.

use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};

use cocoon_vmm::snapshot::{self, FormatVersion, StateFileError, StateSummary};

use super::sidecar::{Sidecar, SnapshotDisk};
use crate::disk::copy;
use crate::disk::model::{DiskRole, StorageConfig};
use crate::disk::rules::{self, Context, Violations};
use crate::store::digest::Digest;

/// What the preflight hashes by default: the state file and the seed, not
/// memory or disks (import and pull verify those).
pub const DEFAULT_HASH_LIMIT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("snapshot file name {name:?}: {reason}")]
    BadFileName { name: String, reason: String },
    #[error("snapshot file {name} is listed twice")]
    Duplicate { name: String },
    #[error("disk {index} ({serial}) is {name}, which the sidecar's file list does not have")]
    Unlisted {
        index: usize,
        serial: String,
        name: String,
    },
    #[error("the sidecar's boot file {name} is not in its file list")]
    BootUnlisted { name: String },
    #[error("the sidecar lists no {name} file; every snapshot has one")]
    NoVmmFile { name: &'static str },
    #[error("snapshot file {name} leads out of the snapshot directory (to {resolved})")]
    SymlinkOut { name: String, resolved: PathBuf },
    #[error("snapshot file {name} is {kind}, not a regular file")]
    NotRegular { name: String, kind: &'static str },
    #[error("disk {index} ({serial}) is missing from the snapshot: no {name}")]
    MissingDisk {
        index: usize,
        serial: String,
        name: String,
    },
    #[error("snapshot file {name} is missing")]
    MissingFile { name: String },
    #[error("snapshot file {name} is {found} bytes; the sidecar records {recorded}")]
    FileSize {
        name: String,
        recorded: u64,
        found: u64,
    },
    #[error(
        "snapshot file {name} is corrupt: its sha256 is {computed}, the sidecar records {recorded}"
    )]
    FileHash {
        name: String,
        recorded: Digest,
        computed: Digest,
    },
    #[error("the sidecar's disks break the storage rules")]
    Storage(#[source] Violations),
    #[error("disk {index} ({serial}): {reason}")]
    Layer {
        index: usize,
        serial: String,
        reason: String,
    },
    #[error("layer disk {index} at {path} does not have the bytes the snapshot pins: its sha256 is {found}, the sidecar records {recorded}; it is not booted (nothing was changed)")]
    LayerHash {
        index: usize,
        path: PathBuf,
        recorded: Digest,
        found: Digest,
    },
    #[error(
        "layer {digest} (disk {index}) is not in the image store (no {path}); a clone or restore builds it again from the image"
    )]
    MissingLayer {
        index: usize,
        digest: Digest,
        path: PathBuf,
    },
    #[error("the snapshot's VMM state has format version {found}; this VMM reads {supported}.x")]
    StateVersion {
        found: FormatVersion,
        supported: u16,
    },
    #[error("the snapshot's VMM state is unreadable or corrupt")]
    StateCorrupt(#[source] StateFileError),
    #[error("the sidecar records VMM state version {sidecar}, the state file is {state}")]
    StateVersionMismatch {
        sidecar: FormatVersion,
        state: FormatVersion,
    },
    #[error("the sidecar says {what} {sidecar}, the VMM state {state}")]
    Shape {
        what: &'static str,
        sidecar: u64,
        state: u64,
    },
    #[error("the sidecar has {sidecar} disks; the VMM state {state}")]
    DiskCount { sidecar: usize, state: usize },
    #[error("the sidecar has {sidecar} NICs; the VMM state {state}")]
    NicCount { sidecar: usize, state: usize },
    #[error("NIC {index} has MAC {sidecar} in the sidecar and {state} in the VMM state")]
    NicMac {
        index: usize,
        sidecar: String,
        state: String,
    },
    #[error("the sidecar's disks are out of order: disk {index} is {sidecar} in the sidecar and {state} in the VMM state")]
    Reordered {
        index: usize,
        sidecar: String,
        state: String,
    },
    #[error(
        "disk {index} ({serial}): {field} is {sidecar} in the sidecar, {state} in the VMM state"
    )]
    DiskMismatch {
        index: usize,
        serial: String,
        field: &'static str,
        sidecar: String,
        state: String,
    },
    #[error("the snapshot's disks are [{snapshot}]; the VM's are [{vm}] (only a trailing cidata may differ)")]
    Roles { snapshot: String, vm: String },
    #[error("image {digest}, which the snapshot's VM was built from, is not in the store; pull it by digest first")]
    ImageMissing { digest: Digest },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PreflightError {
    let path = path.to_path_buf();
    move |source| PreflightError::Io { what, path, source }
}

/// A plain relative path of normal components: what every name in a
/// sidecar must be.
pub fn check_name(name: &str) -> Result<(), PreflightError> {
    let bad = |reason: &str| PreflightError::BadFileName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.contains('\0') {
        return Err(bad("contains NUL"));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Err(bad("is absolute; names are relative to the snapshot"));
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err(bad("contains a .. component")),
            _ => return Err(bad("contains a . component")),
        }
    }
    if name.ends_with('/') || name.contains("//") {
        return Err(bad("is not a plain path"));
    }
    Ok(())
}

/// The sidecar's cpus and memory against the state's.
pub fn check_shape(sidecar: &Sidecar, state: &StateSummary) -> Result<(), PreflightError> {
    if sidecar.cpus != state.cpus {
        return Err(PreflightError::Shape {
            what: "cpus",
            sidecar: sidecar.cpus.into(),
            state: state.cpus.into(),
        });
    }
    if sidecar.memory_bytes != state.memory_bytes {
        return Err(PreflightError::Shape {
            what: "memory bytes",
            sidecar: sidecar.memory_bytes,
            state: state.memory_bytes,
        });
    }
    Ok(())
}

/// The sidecar's disks (and their files' sizes, in disk order) against
/// what the VMM state says the guest has: count, then per index serial
/// (a serial found elsewhere means reordered disks), read-only flag and
/// size.
pub fn check_against_state(
    disks: &[SnapshotDisk],
    sizes: &[u64],
    state: &StateSummary,
) -> Result<(), PreflightError> {
    if disks.len() != state.disks.len() {
        return Err(PreflightError::DiskCount {
            sidecar: disks.len(),
            state: state.disks.len(),
        });
    }
    for (index, ((d, size), s)) in disks.iter().zip(sizes).zip(&state.disks).enumerate() {
        let c = &d.config;
        if c.serial != s.serial {
            if state.disks.iter().any(|o| o.serial == c.serial) {
                return Err(PreflightError::Reordered {
                    index,
                    sidecar: c.serial.clone(),
                    state: s.serial.clone(),
                });
            }
            return Err(PreflightError::DiskMismatch {
                index,
                serial: c.serial.clone(),
                field: "serial",
                sidecar: c.serial.clone(),
                state: s.serial.clone(),
            });
        }
        let mismatch = |field, sidecar: String, state: String| PreflightError::DiskMismatch {
            index,
            serial: c.serial.clone(),
            field,
            sidecar,
            state,
        };
        if c.read_only != s.read_only {
            return Err(mismatch(
                "read_only",
                c.read_only.to_string(),
                s.read_only.to_string(),
            ));
        }
        if *size != s.capacity_bytes {
            return Err(mismatch(
                "size",
                size.to_string(),
                s.capacity_bytes.to_string(),
            ));
        }
    }
    Ok(())
}

/// The sidecar's NICs against the VMM state's: the same count, and per
/// index the MAC the network saw.
pub fn check_nics_against_state(
    nics: &[crate::net::Nic],
    state: &StateSummary,
) -> Result<(), PreflightError> {
    if nics.len() != state.nics.len() {
        return Err(PreflightError::NicCount {
            sidecar: nics.len(),
            state: state.nics.len(),
        });
    }
    for (index, (n, s)) in nics.iter().zip(&state.nics).enumerate() {
        if n.mac.0 != s.mac {
            return Err(PreflightError::NicMac {
                index,
                sidecar: n.mac.to_string(),
                state: crate::net::MacAddr(s.mac).to_string(),
            });
        }
    }
    Ok(())
}

/// `(role, serial)` per disk, without one trailing cidata.
fn core(disks: &[(DiskRole, String)]) -> &[(DiskRole, String)] {
    match disks.split_last() {
        Some((last, rest)) if last.0 == DiskRole::Cidata => rest,
        _ => disks,
    }
}

fn show(disks: &[(DiskRole, String)]) -> String {
    disks
        .iter()
        .map(|(r, s)| format!("{r} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A restore's snapshot disks against the target VM's: the same roles and
/// serials in the same order, but for one trailing cidata disk on either
/// side.
pub fn check_roles(
    snapshot: &[(DiskRole, String)],
    vm: &[(DiskRole, String)],
) -> Result<(), PreflightError> {
    if core(snapshot) == core(vm) {
        Ok(())
    } else {
        Err(PreflightError::Roles {
            snapshot: show(snapshot),
            vm: show(vm),
        })
    }
}

/// The `(role, serial)` list of a VM's disks, for [`check_roles`].
pub fn roles_of(disks: &[StorageConfig]) -> Vec<(DiskRole, String)> {
    disks.iter().map(|d| (d.role, d.serial.clone())).collect()
}

/// How much the preflight checks.
pub struct Options<'a> {
    /// The image store's root (`STATE/images`): layers are under it.
    pub store_root: &'a Path,
    /// For a restore: the target VM's disks as its record has them now.
    pub target: Option<&'a [StorageConfig]>,
    /// Whether the store has an image of this digest (the caller's store
    /// lookup; pull by digest and retry when it says no).
    pub image_present: &'a dyn Fn(&Digest) -> bool,
    /// Files up to this size are hashed against the sidecar.
    pub hash_limit: u64,
    /// Layers this process has hashed (or built) already, against the
    /// sidecar's digests ([`super::layers::check`]): not hashed again.
    /// Every other layer is hashed here.
    pub hashed_layers: &'a [HashedLayer],
}

/// A layer file whose bytes this process hashed (or built), and found to
/// be the digest and size the sidecar records for disk `index`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HashedLayer {
    pub index: usize,
    /// Resolved, as [`Checked::storage`] has it.
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// The sha256 and length of the layer file at `path` (resolved), opened
/// with `O_NOFOLLOW` and checked to be a regular file, streamed.
pub fn hash_layer(path: &Path) -> Result<(u64, Digest), PreflightError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(PreflightError::NotRegular {
            name: path.display().to_string(),
            kind: if meta.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            },
        });
    }
    copy::sha256_open(&file, path).map_err(|e| PreflightError::Io {
        what: "hash",
        path: path.to_path_buf(),
        source: io::Error::other(crate::error_chain(&e)),
    })
}

/// What a passed preflight knows.
#[derive(Debug, Clone)]
pub struct Checked {
    pub state: StateSummary,
    /// The snapshot's disks with absolute, resolved paths: resident disks
    /// inside the snapshot directory, layers in the store.
    pub storage: Vec<StorageConfig>,
    /// The snapshot directory, resolved.
    pub dir: PathBuf,
}

/// `root/name` with symlinks resolved, which must stay inside `root`
/// (itself resolved) and be a regular file; `Ok(None)` when missing.
pub(crate) fn confine(root: &Path, name: &str) -> Result<Option<(PathBuf, u64)>, PreflightError> {
    let joined = root.join(name);
    let resolved = match std::fs::canonicalize(&joined) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symlink is missing too, but say where it leads
            // when that is outside.
            if let Ok(target) = std::fs::read_link(&joined) {
                let target = joined.parent().unwrap_or(root).join(target);
                if !target.starts_with(root) {
                    return Err(PreflightError::SymlinkOut {
                        name: name.into(),
                        resolved: target,
                    });
                }
            }
            return Ok(None);
        }
        Err(e) => return Err(io_err("resolve", &joined)(e)),
    };
    if !resolved.starts_with(root) || resolved == root {
        return Err(PreflightError::SymlinkOut {
            name: name.into(),
            resolved,
        });
    }
    let meta = std::fs::metadata(&resolved).map_err(io_err("stat", &resolved))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(PreflightError::NotRegular {
            name: name.into(),
            kind,
        });
    }
    Ok(Some((resolved, meta.len())))
}

fn state_error(e: StateFileError) -> PreflightError {
    match e {
        StateFileError::UnsupportedVersion { found, .. } => PreflightError::StateVersion {
            found,
            supported: snapshot::FORMAT_VERSION.major,
        },
        other => PreflightError::StateCorrupt(other),
    }
}

/// Runs every check on the snapshot in `dir` whose sidecar is `sidecar`.
pub fn preflight(
    dir: &Path,
    sidecar: &Sidecar,
    opts: &Options<'_>,
) -> Result<Checked, PreflightError> {
    let root = std::fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
    let store_root =
        std::fs::canonicalize(opts.store_root).map_err(io_err("resolve", opts.store_root))?;

    // 1. Names.
    let mut seen = HashSet::new();
    for f in &sidecar.files {
        check_name(&f.name)?;
        if !seen.insert(f.name.as_str()) {
            return Err(PreflightError::Duplicate {
                name: f.name.clone(),
            });
        }
    }
    for name in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
        if !seen.contains(name) {
            return Err(PreflightError::NoVmmFile { name });
        }
    }
    for (index, d) in sidecar.disks.iter().enumerate() {
        let name = d.config.path.to_string_lossy();
        check_name(&name)?;
        if d.resident() && !seen.contains(name.as_ref()) {
            return Err(PreflightError::Unlisted {
                index,
                serial: d.config.serial.clone(),
                name: name.into_owned(),
            });
        }
    }

    if let Some(boot) = &sidecar.boot {
        for name in std::iter::once(&boot.kernel).chain(&boot.initrd) {
            check_name(name)?;
            if !seen.contains(name.as_str()) {
                return Err(PreflightError::BootUnlisted { name: name.clone() });
            }
        }
    }

    // 2. Files: present, inside, regular, of their size.
    let mut resolved = std::collections::HashMap::new();
    for f in &sidecar.files {
        let disk = sidecar
            .disks
            .iter()
            .enumerate()
            .find(|(_, d)| d.resident() && d.config.path.as_os_str() == f.name.as_str());
        let Some((path, found)) = confine(&root, &f.name)? else {
            return Err(match disk {
                Some((index, d)) => PreflightError::MissingDisk {
                    index,
                    serial: d.config.serial.clone(),
                    name: f.name.clone(),
                },
                None => PreflightError::MissingFile {
                    name: f.name.clone(),
                },
            });
        };
        if found != f.size {
            return Err(PreflightError::FileSize {
                name: f.name.clone(),
                recorded: f.size,
                found,
            });
        }
        resolved.insert(f.name.as_str(), (path, found));
    }

    // 3. Storage rules, on the paths as this host will use them.
    let mut storage = sidecar.storage(&root, &store_root);
    let sizes: Vec<u64> = sidecar
        .disks
        .iter()
        .map(|d| {
            if d.resident() {
                resolved[d.config.path.to_string_lossy().as_ref()].1
            } else {
                d.layer.as_ref().map_or(0, |l| l.size)
            }
        })
        .collect();
    let roots = [root.clone(), store_root.clone()];
    let mut layers_to_hash = Vec::new();
    let size_of = |i: usize, _: &StorageConfig| sizes.get(i).copied();
    rules::validate(
        &storage,
        &Context {
            roots: &roots,
            size_of: &size_of,
        },
    )
    .map_err(PreflightError::Storage)?;
    for (index, d) in sidecar.disks.iter().enumerate() {
        let at = &mut storage[index];
        if d.resident() {
            if d.layer.is_some() {
                return Err(PreflightError::Layer {
                    index,
                    serial: d.config.serial.clone(),
                    reason: format!(
                        "a {} disk is a file of the snapshot and takes no layer digest",
                        d.config.role
                    ),
                });
            }
            at.path = resolved[d.config.path.to_string_lossy().as_ref()].0.clone();
            continue;
        }
        // 4. Layers, in the store.
        let Some(layer) = &d.layer else {
            return Err(PreflightError::Layer {
                index,
                serial: d.config.serial.clone(),
                reason: "a layer disk needs its digest and size".into(),
            });
        };
        let name = d.config.path.to_string_lossy();
        let Some((path, found)) = confine(&store_root, &name)? else {
            return Err(PreflightError::MissingLayer {
                index,
                digest: layer.digest.clone(),
                path: store_root.join(name.as_ref()),
            });
        };
        if found != layer.size {
            return Err(PreflightError::FileSize {
                name: path.display().to_string(),
                recorded: layer.size,
                found,
            });
        }
        let hashed = opts.hashed_layers.iter().any(|h| {
            h.index == index && h.path == path && h.digest == layer.digest && h.size == layer.size
        });
        if !hashed {
            layers_to_hash.push((index, path.clone(), layer.digest.clone()));
        }
        at.path = path;
    }

    // 5. The VMM state.
    let state_path = &resolved[snapshot::STATE_FILE].0;
    let state = snapshot::verify_state(state_path).map_err(state_error)?;
    if state.version != sidecar.vmm_state_version.0 {
        return Err(PreflightError::StateVersionMismatch {
            sidecar: sidecar.vmm_state_version.0,
            state: state.version,
        });
    }
    check_shape(sidecar, &state)?;
    let memory_size = resolved[snapshot::MEMORY_FILE].1;
    if memory_size != state.memory_bytes {
        return Err(PreflightError::FileSize {
            name: snapshot::MEMORY_FILE.into(),
            recorded: state.memory_bytes,
            found: memory_size,
        });
    }

    // 6. Cheap hashes.
    for f in &sidecar.files {
        if f.size > opts.hash_limit && f.name != snapshot::STATE_FILE {
            continue;
        }
        let path = &resolved[f.name.as_str()].0;
        let (_, computed) = copy::sha256_file(path).map_err(|e| PreflightError::Io {
            what: "hash",
            path: path.clone(),
            source: io::Error::other(crate::error_chain(&e)),
        })?;
        if computed != f.sha256 {
            return Err(PreflightError::FileHash {
                name: f.name.clone(),
                recorded: f.sha256.clone(),
                computed,
            });
        }
    }

    // 7. Disks and NICs against the state.
    check_against_state(&sidecar.disks, &sizes, &state)?;
    check_nics_against_state(&sidecar.nics, &state)?;

    // 8. Roles against the target VM.
    if let Some(target) = opts.target {
        check_roles(&roles_of(&storage), &roles_of(target))?;
    }

    // 9. The image.
    if !(opts.image_present)(&sidecar.image.digest) {
        return Err(PreflightError::ImageMissing {
            digest: sidecar.image.digest.clone(),
        });
    }

    // 4, the expensive part: every layer not hashed already, last.
    for (index, path, recorded) in layers_to_hash {
        let (_, found) = hash_layer(&path)?;
        if found != recorded {
            return Err(PreflightError::LayerHash {
                index,
                path,
                recorded,
                found,
            });
        }
    }
    Ok(Checked {
        state,
        storage,
        dir: root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::sidecar::tests::sample;
    use cocoon_vmm::snapshot::DiskSummary;

    fn summary(disks: &[(&str, bool, u64)]) -> StateSummary {
        StateSummary {
            version: snapshot::FORMAT_VERSION,
            cpus: 1,
            memory_bytes: 64 << 20,
            tsc_khz: None,
            nics: Vec::new(),
            disks: disks
                .iter()
                .enumerate()
                .map(
                    |(index, &(serial, read_only, capacity_bytes))| DiskSummary {
                        index,
                        read_only,
                        capacity_bytes,
                        serial: serial.into(),
                    },
                )
                .collect(),
        }
    }

    #[test]
    fn names() {
        for ok in ["state", "disks/cow.raw", "blobs/sha256/ab"] {
            check_name(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("disks/../../x", ".. component"),
            ("..", ".. component"),
            ("./state", ". component"),
            ("disks//x", "plain"),
            ("disks/", "plain"),
            ("a\0b", "NUL"),
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(
                matches!(e, PreflightError::BadFileName { .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn disks_against_the_state() {
        let s = sample();
        // layer, cow, data: sizes as the files are.
        let sizes = [1 << 20, 32 << 20, 16 << 20];
        let good = [
            ("cocoon-layer0", true, 1 << 20),
            ("cocoon-root", false, 32 << 20),
            ("logs", false, 16 << 20),
        ];
        check_against_state(&s.disks, &sizes, &summary(&good)).unwrap();

        type Case = (Vec<(&'static str, bool, u64)>, fn(&PreflightError) -> bool);
        let cases: Vec<Case> = vec![
            (good[..2].to_vec(), |e| {
                matches!(
                    e,
                    PreflightError::DiskCount {
                        sidecar: 3,
                        state: 2
                    }
                )
            }),
            (vec![good[0], good[2], good[1]], |e| {
                matches!(e, PreflightError::Reordered { index: 1, .. })
            }),
            (vec![good[0], good[1], ("other", false, 16 << 20)], |e| {
                matches!(
                    e,
                    PreflightError::DiskMismatch {
                        index: 2,
                        field: "serial",
                        ..
                    }
                )
            }),
            (
                vec![good[0], ("cocoon-root", true, 32 << 20), good[2]],
                |e| {
                    matches!(
                        e,
                        PreflightError::DiskMismatch {
                            index: 1,
                            field: "read_only",
                            ..
                        }
                    )
                },
            ),
            (vec![good[0], good[1], ("logs", false, 17 << 20)], |e| {
                matches!(
                    e,
                    PreflightError::DiskMismatch {
                        index: 2,
                        field: "size",
                        ..
                    }
                )
            }),
        ];
        for (state, want) in cases {
            let e = check_against_state(&s.disks, &sizes, &summary(&state)).unwrap_err();
            assert!(want(&e), "{state:?}: {e}");
        }
    }

    #[test]
    fn nics_against_the_state() {
        use cocoon_vmm::snapshot::NicSummary;
        let nics = crate::net::resolve(
            vec!["tap=t0,mac=02:00:00:00:00:01".parse().unwrap()],
            &Default::default(),
        )
        .unwrap();
        let mut state = summary(&[]);
        let nic = |mac: [u8; 6]| NicSummary {
            index: 0,
            mac,
            guest_mac: [2, 0, 0, 0, 0, 9],
        };
        state.nics = vec![nic([2, 0, 0, 0, 0, 1])];
        check_nics_against_state(&nics, &state).unwrap();
        let e = check_nics_against_state(&[], &state).unwrap_err();
        assert_eq!(e.to_string(), "the sidecar has 0 NICs; the VMM state 1");
        state.nics = vec![nic([2, 0, 0, 0, 0, 2])];
        let e = check_nics_against_state(&nics, &state).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NIC 0 has MAC 02:00:00:00:00:01 in the sidecar and 02:00:00:00:00:02 in the VMM state"
        );
    }

    #[test]
    fn shape() {
        let s = sample();
        check_shape(&s, &summary(&[])).unwrap();
        let mut st = summary(&[]);
        st.cpus = 2;
        assert!(matches!(
            check_shape(&s, &st),
            Err(PreflightError::Shape { what: "cpus", .. })
        ));
        let mut st = summary(&[]);
        st.memory_bytes = 128 << 20;
        assert!(matches!(
            check_shape(&s, &st),
            Err(PreflightError::Shape {
                what: "memory bytes",
                ..
            })
        ));
    }

    type Disks<'a> = &'a [(DiskRole, &'a str)];

    #[test]
    fn roles_against_the_vm() {
        use DiskRole::*;
        let d = |v: &[(DiskRole, &str)]| -> Vec<(DiskRole, String)> {
            v.iter().map(|(r, s)| (*r, s.to_string())).collect()
        };
        let base = [
            (Layer, "cocoon-layer0"),
            (Cow, "cocoon-root"),
            (Data, "logs"),
        ];
        let with_seed = [
            (Layer, "cocoon-layer0"),
            (Cow, "cocoon-root"),
            (Data, "logs"),
            (Cidata, "cocoon-cidata"),
        ];
        let ok: [(Disks, Disks); 4] = [
            (&base, &base),
            (&base, &with_seed),
            (&with_seed, &base),
            (&with_seed, &with_seed),
        ];
        for (snap, vm) in ok {
            check_roles(&d(snap), &d(vm)).unwrap();
        }
        let bad: [(Disks, Disks); 5] = [
            (&base[..2], &base),
            (&base, &base[..2]),
            (
                &[
                    (Layer, "cocoon-layer0"),
                    (Data, "logs"),
                    (Cow, "cocoon-root"),
                ],
                &base,
            ),
            (
                &[
                    (Layer, "cocoon-layer0"),
                    (Cow, "cocoon-root"),
                    (Data, "cache"),
                ],
                &base,
            ),
            (
                &[
                    (Layer, "cocoon-layer0"),
                    (Cow, "cocoon-root"),
                    (Cidata, "cocoon-cidata"),
                    (Data, "logs"),
                ],
                &with_seed,
            ),
        ];
        for (snap, vm) in bad {
            let e = check_roles(&d(snap), &d(vm)).unwrap_err();
            assert!(matches!(e, PreflightError::Roles { .. }), "{snap:?}: {e}");
        }
        let e = check_roles(&d(&base[..2]), &d(&base))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[layer cocoon-layer0, cow cocoon-root]; the VM's are [layer cocoon-layer0, cow cocoon-root, data logs]"),
            "{e}"
        );
    }
}
