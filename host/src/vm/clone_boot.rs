//! A clone's own boot files, for its later cold boots (its first start
//! restores the snapshot and boots nothing). Its record takes them from
//! the snapshot (which carries them since sidecar 1.1) or, for an older
//! snapshot, from the source VM's record. Files in the snapshot's
//! directory go with `snapshot rm`, files in the source VM's directory
//! (`vms/ID/initrd.img`, an image's kernel under `vms/ID/boot/`) with the
//! VM, so the clone gets its own: the snapshot's as `boot/NAME`, a VM's at
//! the same place under the clone's directory. Paths elsewhere (a user's
//! `--kernel FILE`, the config's kernel) stay as they are.
//!
//! A hard link where the filesystem allows (it always does within one
//! state directory): a snapshot's files are written once, before it is
//! renamed into place, and a VM's boot files once, at create, through a
//! temp file renamed into place; neither is ever written in place after,
//! so a link shares no change, and removing the snapshot or either VM
//! only unlinks its own name. Elsewhere (another filesystem), a copy.

use std::path::{Component, Path, PathBuf};

use super::record::Machine;
use super::VmError;

/// Points `machine`'s kernel and initrd at files of the clone's own
/// directory `clone_dir` when they are in the snapshot directory
/// `snapshot_dir` or in a VM directory under `vms_root`, linking (or
/// copying) them there.
pub fn own(
    vms_root: &Path,
    snapshot_dir: &Path,
    clone_dir: &Path,
    machine: &mut Machine,
) -> Result<(), VmError> {
    let roots = Roots {
        vms: std::fs::canonicalize(vms_root).map_err(VmError::io("resolving", vms_root))?,
        snapshot: std::fs::canonicalize(snapshot_dir)
            .map_err(VmError::io("resolving", snapshot_dir))?,
    };
    machine.kernel = own_one(&roots, clone_dir, &machine.kernel)?;
    if let Some(initrd) = &machine.initrd {
        machine.initrd = Some(own_one(&roots, clone_dir, initrd)?);
    }
    Ok(())
}

struct Roots {
    vms: PathBuf,
    snapshot: PathBuf,
}

/// Where `path` goes in the clone's directory, if it is a file of the
/// snapshot or of a VM.
fn place(roots: &Roots, path: &Path) -> Option<PathBuf> {
    if let Some(name) = path
        .strip_prefix(&roots.snapshot)
        .ok()
        .and_then(|rel| rel.file_name())
    {
        return Some(Path::new(crate::vm::guest_boot::IMAGE_BOOT_DIR).join(name));
    }
    in_vm_dir(&roots.vms, path).map(Path::to_path_buf)
}

/// `vms_root/ID/REST` as `clone_dir/REST`, a snapshot's `NAME` as
/// `clone_dir/boot/NAME`; anything else as it is.
fn own_one(roots: &Roots, clone_dir: &Path, path: &Path) -> Result<PathBuf, VmError> {
    let Some(rest) = place(roots, path) else {
        return Ok(path.to_path_buf());
    };
    // A file of the snapshot may be a symlink inside it (the preflight
    // confined it): link the file, not the symlink.
    let path = &std::fs::canonicalize(path).map_err(VmError::io("resolving", path))?;
    let dest = clone_dir.join(rest);
    if &dest == path {
        return Ok(dest);
    }
    let parent = dest.parent().unwrap_or(clone_dir);
    crate::fsutil::create_private_dir(parent, 0o700).map_err(VmError::io("creating", parent))?;
    match std::fs::hard_link(path, &dest) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            crate::disk::copy::copy_file(path, &dest).map_err(|e| {
                VmError::io("copying the boot file", path)(std::io::Error::other(
                    crate::error_chain(&e),
                ))
            })?;
        }
        Err(e) => return Err(VmError::io("linking the boot file", path)(e)),
    }
    crate::fsutil::sync_dir(parent).map_err(VmError::io("fsync", parent))?;
    Ok(dest)
}

/// `REST` when `path` is `vms_root/ID/REST`: a file of a VM's directory.
fn in_vm_dir<'a>(vms_root: &Path, path: &'a Path) -> Option<&'a Path> {
    let rel = path.strip_prefix(vms_root).ok()?;
    let mut parts = rel.components();
    let Some(Component::Normal(_id)) = parts.next() else {
        return None;
    };
    let rest = parts.as_path();
    let plain = rest.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && !rest.as_os_str().is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_of_the_source_vm_are_the_clones_own_and_others_stay() {
        let state = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(state.path()).unwrap().join("vms");
        let src = root.join("src-id");
        std::fs::create_dir_all(src.join("boot")).unwrap();
        std::fs::write(src.join("boot/vmlinuz"), b"kernel").unwrap();
        std::fs::write(src.join("initrd.img"), b"initrd").unwrap();
        let clone = root.join("clone-id");
        std::fs::create_dir_all(&clone).unwrap();
        let mut m = Machine {
            cpus: 1,
            memory: 64 << 20,
            kernel: src.join("boot/vmlinuz"),
            initrd: Some(src.join("initrd.img")),
            cmdline: "console=ttyS0".into(),
        };
        let snap = std::fs::canonicalize(state.path())
            .unwrap()
            .join("snapshots/s1");
        std::fs::create_dir_all(&snap).unwrap();
        own(&root, &snap, &clone, &mut m).unwrap();
        assert_eq!(m.kernel, clone.join("boot/vmlinuz"));
        assert_eq!(m.initrd, Some(clone.join("initrd.img")));
        std::fs::remove_dir_all(&src).unwrap();
        assert_eq!(std::fs::read(&m.kernel).unwrap(), b"kernel");
        assert_eq!(std::fs::read(clone.join("initrd.img")).unwrap(), b"initrd");
        let mode = std::fs::metadata(clone.join("boot")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);

        // A user's kernel and the store's files are left where they are;
        // so is a path that only looks like a VM's.
        let user = state.path().join("my-kernel");
        for kernel in [user.clone(), root.join("x"), root.join("a/../b")] {
            let mut m = Machine {
                kernel: kernel.clone(),
                initrd: None,
                ..m.clone()
            };
            own(&root, &snap, &clone, &mut m).unwrap();
            assert_eq!(m.kernel, kernel);
        }

        // The snapshot's own boot files: under the clone's boot/.
        std::fs::write(snap.join("kernel"), b"snap kernel").unwrap();
        let clone2 = root.join("clone2-id");
        std::fs::create_dir_all(&clone2).unwrap();
        let mut m = Machine {
            kernel: snap.join("kernel"),
            initrd: None,
            ..m.clone()
        };
        own(&root, &snap, &clone2, &mut m).unwrap();
        assert_eq!(m.kernel, clone2.join("boot/kernel"));
        std::fs::remove_dir_all(&snap).unwrap();
        assert_eq!(std::fs::read(&m.kernel).unwrap(), b"snap kernel");
    }
}
