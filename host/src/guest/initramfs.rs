//! The cocoon initramfs: a gzip'd newc cpio of a static busybox, the
//! exact kernel's modules ([`super::modules`]) in load order, and
//! [`INIT_SCRIPT`] as `/init`. Built by the host, cached per kernel under
//! `STATE/initramfs/KEY/` where KEY hashes every input (the kernel file,
//! its release, each module, busybox, the init script and this format's
//! version), with its own digest file beside it:
//!
//! - written temp, fsync, rename; then the digest file, the same way;
//! - used only when the digest file is there and the image hashes to it,
//!   else rebuilt (a crash between the two renames, a truncated file);
//! - built under an exclusive `flock` on `STATE/initramfs/KEY.lock`, so
//!   concurrent `create`s build it once.
//!
//! A VM whose image has an OCI process gets its own initrd:
//! [`write_vm_initrd`] appends a second cpio holding `/cocoon/exec`
//! ([`super::exec`]) to the cached one (the kernel unpacks concatenated
//! archives in order).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::cpio::{self, Archive, Kind};
use super::exec::{ExecConfig, ExecError, EXEC_FILE};
use super::kernel::KernelChoice;
use super::modules::{self, ModulesError};
use crate::fsutil;
use crate::store::digest::{hash_reader, Digest};

/// `/init`: stage 1 in the initramfs, stage 2 in the new root.
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Bumped when the archive's layout changes, so old cache entries are
/// not reused.
const FORMAT: &str = "cocoon-initramfs 1";
/// The image's file name in its cache directory.
pub const IMAGE_FILE: &str = "initramfs.img";
/// Its digest file: `sha256:<hex>` and a newline.
pub const DIGEST_FILE: &str = "initramfs.img.sha256";
/// A busybox larger than this is not the one we know (Debian's is 2 MiB).
const MAX_BUSYBOX: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {kernel} comes with no modules directory; the cocoon initramfs needs the exact kernel's modules (set [vm] modules, or use scripts/fetch-linux-kernel's directory)")]
    NoModules { kernel: PathBuf },
    #[error("the kernel's modules")]
    Modules(#[source] ModulesError),
    #[error("{path} is not a static x86-64 busybox: {reason} (install busybox-static, or set [vm] busybox)")]
    Busybox { path: PathBuf, reason: &'static str },
    #[error(
        "no static busybox found (looked for {looked}); install busybox-static or set [vm] busybox"
    )]
    NoBusybox { looked: String },
    #[error("the OCI process")]
    Exec(#[source] ExecError),
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> InitramfsError + 'a {
    move |source| InitramfsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A built (or cached and verified) initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initramfs {
    pub path: PathBuf,
    /// The image's own digest (its digest file's content).
    pub digest: Digest,
    /// False when the cache already had it.
    pub built: bool,
}

/// Where busybox is looked for when `[vm] busybox` is not set (Debian's
/// busybox-static installs `/bin/busybox`).
pub const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// The static busybox to put in initramfs images: `configured`, else the
/// first of [`BUSYBOX_PATHS`] that is static.
pub fn find_busybox(configured: Option<&Path>) -> Result<PathBuf, InitramfsError> {
    if let Some(p) = configured {
        check_busybox(p)?;
        return Ok(p.to_path_buf());
    }
    for p in BUSYBOX_PATHS {
        if check_busybox(Path::new(p)).is_ok() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(InitramfsError::NoBusybox {
        looked: BUSYBOX_PATHS.join(", "),
    })
}

/// A 64-bit little-endian x86-64 ELF with no `PT_INTERP`: a dynamically
/// linked busybox would find no libc in the initramfs.
fn check_busybox(path: &Path) -> Result<(), InitramfsError> {
    let bad = |reason| InitramfsError::Busybox {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fsutil::input::read_bounded(path, MAX_BUSYBOX).map_err(io("reading", path))?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF"));
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    if u16_at(18) != 62 {
        return Err(bad("not x86-64"));
    }
    let phoff = crate::cast::usize_from(u64::from_le_bytes(bytes[32..40].try_into().unwrap()));
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(h) = bytes.get(at..at + 4) else {
            return Err(bad("its program headers lie past the end of the file"));
        };
        if u32::from_le_bytes(h.try_into().unwrap()) == 3 {
            return Err(bad("dynamically linked (it has an ELF interpreter)"));
        }
    }
    Ok(())
}

fn file_digest(path: &Path) -> Result<Digest, InitramfsError> {
    let f = std::fs::File::open(path).map_err(io("opening", path))?;
    Ok(hash_reader(std::io::BufReader::new(f))
        .map_err(io("reading", path))?
        .0)
}

/// The cocoon initramfs for `kernel` (its modules) with `busybox`, from
/// the cache under `state_dir` or built into it.
pub fn build(
    state_dir: &Path,
    kernel: &KernelChoice,
    busybox: &Path,
) -> Result<Initramfs, InitramfsError> {
    let Some(modules_dir) = kernel.modules.as_deref() else {
        return Err(InitramfsError::NoModules {
            kernel: kernel.kernel.clone(),
        });
    };
    check_busybox(busybox)?;
    let modules =
        modules::resolve(modules_dir, &kernel.release).map_err(InitramfsError::Modules)?;

    // The key: every input, by digest.
    let mut key = format!(
        "{FORMAT}\nkernel {}\nrelease {}\nbusybox {}\ninit {}\n",
        file_digest(&kernel.kernel)?,
        kernel.release,
        file_digest(busybox)?,
        Digest::of(INIT_SCRIPT.as_bytes())
    );
    let mut module_bytes = Vec::new();
    for m in &modules {
        let bytes = std::fs::read(&m.path).map_err(io("reading", &m.path))?;
        key.push_str(&format!("module {} {}\n", m.name, Digest::of(&bytes)));
        module_bytes.push(bytes);
    }
    let key = Digest::of(key.as_bytes());
    let root = state_dir.join("initramfs");
    fsutil::create_private_dir(&root, 0o700).map_err(io("creating", &root))?;
    let lock_path = root.join(format!("{}.lock", key.hex()));
    let _lock = crate::store::lock::exclusive(&lock_path).map_err(io("locking", &lock_path))?;
    let dir = root.join(key.hex());
    let image = dir.join(IMAGE_FILE);
    let digest_file = dir.join(DIGEST_FILE);
    if let Some(digest) = cached(&image, &digest_file)? {
        return Ok(Initramfs {
            path: image,
            digest,
            built: false,
        });
    }
    fsutil::create_private_dir(&dir, 0o700).map_err(io("creating", &dir))?;

    let mut a = Archive::new();
    for d in [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "cocoon",
        "proc",
        "sys",
        "newroot",
    ] {
        a.add(d, 0o755, Kind::Dir);
    }
    // The kernel opens /dev/console for init's stdio before init can
    // mount devtmpfs.
    a.add("dev/console", 0o600, Kind::Char(5, 1));
    let bb = std::fs::read(busybox).map_err(io("reading", busybox))?;
    a.add("bin/busybox", 0o755, Kind::File(&bb));
    a.add("init", 0o755, Kind::File(INIT_SCRIPT.as_bytes()));
    let mut load = String::new();
    for (m, bytes) in modules.iter().zip(&module_bytes) {
        a.add(
            &format!("lib/modules/{}.ko", m.name),
            0o644,
            Kind::File(bytes),
        );
        load.push_str(&m.name);
        load.push('\n');
    }
    a.add("lib/modules/load", 0o644, Kind::File(load.as_bytes()));
    let gz = cpio::gzip(&a.finish()).map_err(io("compressing", &image))?;
    let digest = Digest::of(&gz);

    let mut tmp =
        fsutil::temp::Temp::create_in(&dir, ".img").map_err(io("creating a temp file in", &dir))?;
    tmp.as_file_mut()
        .write_all(&gz)
        .map_err(io("writing", &image))?;
    tmp.as_file().sync_all().map_err(io("syncing", &image))?;
    tmp.persist(&image)
        .map_err(io("renaming into place", &image))?;
    fsutil::sync_dir(&dir).map_err(io("syncing", &dir))?;
    fsutil::write_atomic(&digest_file, format!("{digest}\n").as_bytes(), 0o600)
        .map_err(io("writing", &digest_file))?;
    Ok(Initramfs {
        path: image,
        digest,
        built: true,
    })
}

/// The cached image's digest when its digest file is there, well formed,
/// and the image hashes to it; `None` means rebuild.
fn cached(image: &Path, digest_file: &Path) -> Result<Option<Digest>, InitramfsError> {
    let want = match std::fs::read_to_string(digest_file) {
        Ok(s) => match s.trim().parse::<Digest>() {
            Ok(d) => d,
            Err(_) => return Ok(None),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", digest_file)(e)),
    };
    let got = match std::fs::File::open(image) {
        Ok(f) => {
            hash_reader(std::io::BufReader::new(f))
                .map_err(io("reading", image))?
                .0
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("opening", image)(e)),
    };
    Ok((got == want).then_some(want))
}

/// The gzip'd cpio holding `/cocoon/exec` for `exec`.
pub fn exec_archive(exec: &ExecConfig) -> Result<Vec<u8>, InitramfsError> {
    let text = exec.render().map_err(InitramfsError::Exec)?;
    let mut a = Archive::new();
    a.add("cocoon", 0o755, Kind::Dir);
    a.add(EXEC_FILE, 0o644, Kind::File(text.as_bytes()));
    cpio::gzip(&a.finish()).map_err(io("compressing", Path::new(EXEC_FILE)))
}

/// Writes a VM's initrd to `out` (temp, fsync, rename): the cached
/// `base`, then, when the image has an OCI process, [`exec_archive`].
/// Without one, `base` itself can be the VM's initrd.
pub fn write_vm_initrd(
    base: &Initramfs,
    exec: Option<&ExecConfig>,
    out: &Path,
) -> Result<(), InitramfsError> {
    let extra = exec.map(exec_archive).transpose()?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = fsutil::temp::Temp::create_in(dir, ".initrd")
        .map_err(io("creating a temp file in", dir))?;
    let mut src = std::fs::File::open(&base.path).map_err(io("opening", &base.path))?;
    let mut buf = Vec::new();
    src.read_to_end(&mut buf)
        .map_err(io("reading", &base.path))?;
    if Digest::of(&buf) != base.digest {
        return Err(InitramfsError::Io {
            what: "verifying",
            path: base.path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the initramfs no longer matches its digest",
            ),
        });
    }
    tmp.as_file_mut()
        .write_all(&buf)
        .map_err(io("writing", out))?;
    if let Some(extra) = extra {
        tmp.as_file_mut()
            .write_all(&extra)
            .map_err(io("writing", out))?;
    }
    tmp.as_file().sync_all().map_err(io("syncing", out))?;
    tmp.persist(out).map_err(io("renaming into place", out))?;
    fsutil::sync_dir(dir).map_err(io("syncing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_must_be_static_x86_64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bb");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert!(check_busybox(&p)
            .unwrap_err()
            .to_string()
            .contains("not a 64-bit"));
        // /bin/sh on this host is dynamically linked.
        if let Ok(sh) = std::fs::canonicalize("/bin/sh") {
            let err = check_busybox(&sh).unwrap_err().to_string();
            assert!(err.contains("dynamically linked"), "{err}");
        }
        if let Ok(bb) = find_busybox(None) {
            check_busybox(&bb).unwrap();
        }
    }
}
