//! The kernel modules the cocoon initramfs carries, taken from the exact
//! kernel's `lib/modules/RELEASE` and put in load order. Debian's packages
//! ship no `modules.dep`, so the order comes from each module's own
//! `.modinfo` (`depends=`), and each module's `vermagic=` must name the
//! kernel's release: a module built for another kernel would be refused
//! by the guest's kernel at boot, far from the mistake.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What the init needs: virtio-mmio transport, disks and NIC, the overlay
/// root, ext4 (cow, data disks, disk images), vfat (the cidata seed, with
/// the code page and the I/O charsets its mount may want: Debian's
/// default is ascii), and both read-only layer formats.
pub const WANTED: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "overlay",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "squashfs",
    "erofs",
];

/// A module's `.modinfo` larger than this is not a module we know.
const MAX_MODULE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: no module {name} (neither in modules.order nor in modules.builtin)")]
    Missing { dir: PathBuf, name: String },
    #[error("{path}: no vermagic= in its .modinfo; not a kernel module")]
    NoVermagic { path: PathBuf },
    #[error("{path} is built for kernel {found}, not {want}")]
    WrongKernel {
        path: PathBuf,
        found: String,
        want: String,
    },
    #[error("{path}: its dependencies loop back to {name}")]
    Cycle { path: PathBuf, name: String },
}

/// One module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The name `insmod` knows it by (underscores).
    pub name: String,
    pub path: PathBuf,
}

/// The name the kernel uses: `-` and `_` are the same in module names.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Name → path (relative to `dir`) from `modules.order`, and the builtin
/// names from `modules.builtin`.
fn index(dir: &Path) -> Result<(BTreeMap<String, PathBuf>, BTreeSet<String>), ModulesError> {
    let read = |name: &str| {
        let path = dir.join(name);
        crate::fsutil::input::read_to_string_bounded(&path, 16 << 20)
            .map_err(|source| ModulesError::Io { path, source })
    };
    let stem = |line: &str| {
        let file = line.rsplit('/').next().unwrap_or(line);
        canonical(file.trim_end_matches(".ko"))
    };
    let mut order = BTreeMap::new();
    for line in read("modules.order")?.lines().map(str::trim) {
        if line.ends_with(".ko") {
            order.insert(stem(line), dir.join(line));
        }
    }
    let builtin = match read("modules.builtin") {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| l.ends_with(".ko"))
            .map(stem)
            .collect(),
        Err(ModulesError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            BTreeSet::new()
        }
        Err(e) => return Err(e),
    };
    Ok((order, builtin))
}

/// The `key=` values of a module's `.modinfo` strings. They are NUL
/// separated `key=value` strings; searching the whole file for them is
/// what `modinfo` amounts to for these two keys, without an ELF parser.
fn modinfo<'a>(bytes: &'a [u8], key: &str) -> Option<&'a str> {
    let needle = format!("\0{key}=");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?
        + needle.len();
    let end = bytes[at..].iter().position(|&b| b == 0)? + at;
    std::str::from_utf8(&bytes[at..end]).ok()
}

/// The modules of [`WANTED`] and everything they depend on, dependencies
/// first, from `dir` (a `lib/modules/RELEASE` directory) for kernel
/// `release`. Builtin modules are left out.
pub fn resolve(dir: &Path, release: &str) -> Result<Vec<Module>, ModulesError> {
    let (order, builtin) = index(dir)?;
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    for name in WANTED {
        visit(
            dir,
            release,
            &canonical(name),
            &order,
            &builtin,
            &mut done,
            &mut Vec::new(),
            &mut out,
        )?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn visit(
    dir: &Path,
    release: &str,
    name: &str,
    order: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    done: &mut BTreeSet<String>,
    stack: &mut Vec<String>,
    out: &mut Vec<Module>,
) -> Result<(), ModulesError> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    let Some(path) = order.get(name) else {
        return Err(ModulesError::Missing {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        });
    };
    if stack.iter().any(|s| s == name) {
        return Err(ModulesError::Cycle {
            path: path.clone(),
            name: name.to_string(),
        });
    }
    let bytes = crate::fsutil::input::read_bounded(path, MAX_MODULE).map_err(|source| {
        ModulesError::Io {
            path: path.clone(),
            source,
        }
    })?;
    let vermagic = modinfo(&bytes, "vermagic")
        .ok_or_else(|| ModulesError::NoVermagic { path: path.clone() })?;
    let found = vermagic.split(' ').next().unwrap_or("");
    if found != release {
        return Err(ModulesError::WrongKernel {
            path: path.clone(),
            found: found.to_string(),
            want: release.to_string(),
        });
    }
    let depends: Vec<String> = modinfo(&bytes, "depends")
        .unwrap_or("")
        .split(',')
        .filter(|d| !d.is_empty())
        .map(canonical)
        .collect();
    stack.push(name.to_string());
    for dep in &depends {
        visit(dir, release, dep, order, builtin, done, stack, out)?;
    }
    stack.pop();
    done.insert(name.to_string());
    out.push(Module {
        name: name.to_string(),
        path: path.clone(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake module: just the `.modinfo` strings the resolver reads.
    fn module(dir: &Path, rel: &str, release: &str, depends: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body = format!(
            "\x7fELF\0license=GPL\0depends={depends}\0name=x\0vermagic={release} SMP mod_unload\0"
        );
        std::fs::write(path, body).unwrap();
    }

    fn tree(release: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mods = [
            ("kernel/drivers/virtio/virtio_ring.ko", ""),
            ("kernel/drivers/virtio/virtio.ko", "virtio_ring"),
            ("kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring"),
            ("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
            ("kernel/net/core/failover.ko", ""),
            ("kernel/drivers/net/net_failover.ko", "failover"),
            (
                "kernel/drivers/net/virtio_net.ko",
                "virtio_ring,virtio,net_failover",
            ),
            ("kernel/fs/overlayfs/overlay.ko", ""),
            ("kernel/fs/fat/fat.ko", ""),
            ("kernel/fs/fat/vfat.ko", "fat"),
            ("kernel/fs/nls/nls_cp437.ko", ""),
            ("kernel/fs/nls/nls_ascii.ko", ""),
            ("kernel/fs/nls/nls_utf8.ko", ""),
            ("kernel/fs/squashfs/squashfs.ko", ""),
            ("kernel/lib/libcrc32c.ko", ""),
            ("kernel/fs/erofs/erofs.ko", "libcrc32c"),
        ];
        let mut order = String::new();
        for (rel, deps) in mods {
            module(p, rel, release, deps);
            order.push_str(rel);
            order.push('\n');
        }
        std::fs::write(p.join("modules.order"), order).unwrap();
        std::fs::write(
            p.join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn dependencies_come_first_and_builtins_are_skipped() {
        let d = tree("6.1.0-9-cloud-amd64");
        let names: Vec<String> = resolve(d.path(), "6.1.0-9-cloud-amd64")
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "overlay",
                "fat",
                "vfat",
                "nls_cp437",
                "nls_ascii",
                "nls_utf8",
                "squashfs",
                "libcrc32c",
                "erofs"
            ]
        );
    }

    #[test]
    fn another_kernels_modules_and_missing_ones_are_refused() {
        let d = tree("6.1.0-8-cloud-amd64");
        let err = resolve(d.path(), "6.1.0-9-cloud-amd64")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "virtio_mmio.ko is built for kernel 6.1.0-8-cloud-amd64, not 6.1.0-9-cloud-amd64"
            ),
            "{err}"
        );
        let d = tree("r");
        std::fs::write(d.path().join("modules.builtin"), "").unwrap();
        let err = resolve(d.path(), "r").unwrap_err().to_string();
        assert!(err.contains("no module ext4"), "{err}");
    }

    #[test]
    fn a_dependency_loop_is_refused() {
        let d = tree("r");
        module(
            d.path(),
            "kernel/drivers/virtio/virtio_ring.ko",
            "r",
            "virtio_mmio",
        );
        let err = resolve(d.path(), "r").unwrap_err().to_string();
        assert!(err.contains("loop back to virtio_mmio"), "{err}");
    }
}
