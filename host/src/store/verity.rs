//! fs-verity on blobs and converted images, where the filesystem has it:
//! the kernel then checks every read against a Merkle tree and a changed
//! byte fails the read instead of being served. It is defence in depth,
//! not a replacement for the store's sha256 (the verity digest is of
//! another construction): a filesystem without the feature (ext4 without
//! `-O verity`, a kernel without CONFIG_FS_VERITY) is detected and
//! reported, never an error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct fsverity_enable_arg` of `<linux/fsverity.h>`.
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// `FS_IOC_ENABLE_VERITY`: `_IOW('f', 133, struct fsverity_enable_arg)`.
const FS_IOC_ENABLE_VERITY: libc::c_ulong =
    (1 << 30) | ((std::mem::size_of::<EnableArg>() as libc::c_ulong) << 16) | (0x66 << 8) | 133;
const FS_VERITY_HASH_ALG_SHA256: u32 = 1;

/// What enabling fs-verity on a file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verity {
    /// The kernel checks every read of the file from now on.
    Enabled,
    /// This filesystem (or kernel) has no fs-verity.
    Unsupported,
    /// It has, but enabling failed for this file (it is still served,
    /// checked by the store's hashes).
    Failed,
}

/// Enables fs-verity on `path` (which no one may hold open for writing).
pub fn enable(path: &Path) -> Verity {
    let Ok(file) = File::open(path) else {
        return Verity::Failed;
    };
    let arg = EnableArg {
        version: 1,
        hash_algorithm: FS_VERITY_HASH_ALG_SHA256,
        block_size: 4096,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: FS_IOC_ENABLE_VERITY reads one `fsverity_enable_arg` through
    // the pointer, which points at a live, fully initialised value of that
    // layout (repr(C), 128 bytes) for the duration of the call; the fd is
    // open. The kernel writes nothing back.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_ENABLE_VERITY, &arg) };
    if rc == 0 {
        return Verity::Enabled;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EEXIST) => Verity::Enabled,
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS | libc::EINVAL) => Verity::Unsupported,
        _ => Verity::Failed,
    }
}

/// Whether fs-verity is on for `path`; `None` when the kernel cannot say
/// (no `statx` attribute for it).
pub fn is_enabled(path: &Path) -> Option<bool> {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )
    .ok()?;
    let (mask, attrs) = (st.stx_attributes_mask, st.stx_attributes);
    mask.contains(StatxAttributes::VERITY)
        .then(|| attrs.contains(StatxAttributes::VERITY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_is_the_kernels() {
        assert_eq!(std::mem::size_of::<EnableArg>(), 128);
        assert_eq!(FS_IOC_ENABLE_VERITY, 0x4080_6685);
    }

    #[test]
    fn enabling_is_reported_as_the_filesystem_allows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![5u8; 10_000]).unwrap();
        let v = enable(&p);
        // Whatever this filesystem can do, the report matches the file.
        match v {
            Verity::Enabled => assert_eq!(is_enabled(&p), Some(true)),
            Verity::Unsupported | Verity::Failed => assert_ne!(is_enabled(&p), Some(true)),
        }
        // Still readable either way.
        assert_eq!(std::fs::read(&p).unwrap().len(), 10_000);
        eprintln!("fs-verity on {}: {v:?}", dir.path().display());
    }
}
