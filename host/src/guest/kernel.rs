//! Which Linux kernel a VM boots, in order:
//! 1. `--kernel` (and `--initrd`) from the command line;
//! 2. the image's own, when it carries one: `/boot/vmlinuz-RELEASE` with
//!    its initrd on a disk image's ext4 root ([`from_disk_image`], read
//!    with `debugfs`, nothing mounted);
//! 3. `[vm] kernel` (and `[vm] initrd`) from the config.
//!
//! A kernel without an initrd boots the cocoon initramfs, which needs the
//! exact kernel's modules: [`find_modules`] looks for
//! `lib/modules/RELEASE` in `[vm] modules`, then `modules/RELEASE` beside
//! the kernel (what `scripts/fetch-linux-kernel` leaves), then
//! `/lib/modules/RELEASE`. RELEASE is read from the kernel file itself
//! ([`release_of`]), so a kernel never gets another kernel's modules.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::VmSettings;
use crate::fsutil;

/// A kernel larger than this is refused (Debian's vmlinux is 53 MiB).
const MAX_KERNEL: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} was given without {needs}")]
    InitrdWithoutKernel {
        flag: &'static str,
        needs: &'static str,
    },
    #[error("no kernel: give --kernel, use an image that carries one, or set [vm] kernel in the config (scripts/fetch-linux-kernel installs Debian's cloud kernel)")]
    NoKernel,
    #[error("{path}: {reason}")]
    NotAKernel { path: PathBuf, reason: &'static str },
    #[error("[vm] modules {path}: no modules.order there")]
    BadModules { path: PathBuf },
    #[error("running debugfs (from e2fsprogs) on {path}")]
    Debugfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running unsquashfs (from squashfs-tools) on {path}")]
    Unsquashfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unsquashfs could not extract {file} from {path}: {stderr}")]
    Extract {
        path: PathBuf,
        file: String,
        stderr: String,
    },
    #[error("debugfs could not dump {file} from {path}: {stderr}")]
    Dump {
        path: PathBuf,
        file: String,
        stderr: String,
    },
}

/// Where the kernel came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// `--kernel`.
    Flag,
    /// The image's `/boot`.
    Image,
    /// `[vm] kernel`.
    Config,
}

/// The kernel a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChoice {
    pub kernel: PathBuf,
    /// The kernel's own initrd; `None` means the cocoon initramfs
    /// ([`super::initramfs::build`]).
    pub initrd: Option<PathBuf>,
    pub source: KernelSource,
    /// The kernel's release (`uname -r`), read from the file.
    pub release: String,
    /// Its `lib/modules/RELEASE`, when found ([`find_modules`]).
    pub modules: Option<PathBuf>,
}

impl KernelChoice {
    /// Whether the VM boots the cocoon initramfs.
    pub fn uses_cocoon_initramfs(&self) -> bool {
        self.initrd.is_none()
    }
}

/// A kernel found in an image, copied out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageKernel {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
}

/// Chooses the kernel (see the module docs). `flag_*` are `--kernel` and
/// `--initrd`; `image` is what [`from_disk_image`] found, if anything.
pub fn select(
    flag_kernel: Option<&Path>,
    flag_initrd: Option<&Path>,
    image: Option<&ImageKernel>,
    vm: &VmSettings,
) -> Result<KernelChoice, KernelError> {
    let (kernel, initrd, source) = pick(flag_kernel, flag_initrd, image, vm)?;
    let release = release_of(&kernel)?;
    let modules = find_modules(&kernel, &release, vm.modules.as_deref())?;
    Ok(KernelChoice {
        kernel,
        initrd,
        source,
        release,
        modules,
    })
}

/// The files [`select`] chooses, before it reads them: the kernel, its
/// initrd if any, and where they came from.
pub fn pick(
    flag_kernel: Option<&Path>,
    flag_initrd: Option<&Path>,
    image: Option<&ImageKernel>,
    vm: &VmSettings,
) -> Result<(PathBuf, Option<PathBuf>, KernelSource), KernelError> {
    if flag_initrd.is_some() && flag_kernel.is_none() {
        return Err(KernelError::InitrdWithoutKernel {
            flag: "--initrd",
            needs: "--kernel",
        });
    }
    if vm.initrd.is_some() && vm.kernel.is_none() {
        return Err(KernelError::InitrdWithoutKernel {
            flag: "[vm] initrd",
            needs: "[vm] kernel",
        });
    }
    if let Some(k) = flag_kernel {
        Ok((
            k.to_path_buf(),
            flag_initrd.map(Path::to_path_buf),
            KernelSource::Flag,
        ))
    } else if let Some(img) = image {
        Ok((
            img.kernel.clone(),
            Some(img.initrd.clone()),
            KernelSource::Image,
        ))
    } else if let Some(k) = &vm.kernel {
        Ok((k.clone(), vm.initrd.clone(), KernelSource::Config))
    } else {
        Err(KernelError::NoKernel)
    }
}

/// The kernel release a bzImage's setup header or a vmlinux's banner
/// names (`6.1.0-57-cloud-amd64`).
pub fn release_of(kernel: &Path) -> Result<String, KernelError> {
    let not = |reason| KernelError::NotAKernel {
        path: kernel.to_path_buf(),
        reason,
    };
    let bytes =
        fsutil::input::read_bounded(kernel, MAX_KERNEL).map_err(|source| KernelError::Io {
            what: "reading the kernel",
            path: kernel.to_path_buf(),
            source,
        })?;
    let text = if bytes.get(0x202..0x206) == Some(b"HdrS") {
        // kernel_version: offset of a NUL-terminated string, from 0x200.
        let off = u16::from_le_bytes([bytes[0x20e], bytes[0x20f]]) as usize;
        if off == 0 {
            return Err(not("its setup header has no kernel_version"));
        }
        bytes
            .get(0x200 + off..)
            .ok_or_else(|| not("kernel_version points past the end"))?
    } else if bytes.starts_with(b"\x7fELF") {
        let banner = b"Linux version ";
        let at = bytes
            .windows(banner.len())
            .position(|w| w == banner)
            .ok_or_else(|| not("an ELF without a \"Linux version\" banner"))?;
        &bytes[at + banner.len()..]
    } else {
        return Err(not("neither a bzImage nor a vmlinux ELF"));
    };
    let end = text
        .iter()
        .position(|&b| b == 0 || b == b' ')
        .unwrap_or(text.len())
        .min(256);
    let release = std::str::from_utf8(&text[..end]).map_err(|_| not("its version is not text"))?;
    if release.is_empty()
        || !release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    {
        return Err(not("its version string is not a kernel release"));
    }
    Ok(release.to_string())
}

/// The `lib/modules/RELEASE` directory for `kernel` (see the module docs),
/// or `None` when there is none.
pub fn find_modules(
    kernel: &Path,
    release: &str,
    configured: Option<&Path>,
) -> Result<Option<PathBuf>, KernelError> {
    if let Some(dir) = configured {
        if !dir.join("modules.order").is_file() {
            return Err(KernelError::BadModules {
                path: dir.to_path_buf(),
            });
        }
        return Ok(Some(dir.to_path_buf()));
    }
    let beside = kernel.parent().map(|d| d.join("modules").join(release));
    let system = Path::new("/lib/modules").join(release);
    Ok(beside
        .into_iter()
        .chain([system])
        .find(|d| d.join("modules.order").is_file()))
}

/// Byte offsets of the filesystems that may hold `/boot` on a raw disk:
/// each GPT partition's start (in table order), then the whole disk.
pub fn candidate_offsets(raw: &Path) -> Result<Vec<u64>, KernelError> {
    let io = |source| KernelError::Io {
        what: "reading",
        path: raw.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(raw).map_err(io)?;
    let mut out: Vec<u64> = super::gpt::partitions(&f)
        .map_err(io)?
        .into_iter()
        .map(|p| p.start)
        .collect();
    out.push(0);
    Ok(out)
}

/// Compares kernel releases numerically where they are numbers
/// (`6.1.0-10` after `6.1.0-9`).
pub(crate) fn release_key(r: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = r;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (num, tail) = rest.split_at(digits);
        let text = tail.bytes().take_while(|b| !b.is_ascii_digit()).count();
        let (word, tail) = tail.split_at(text);
        out.push((num.parse().unwrap_or(0), word.to_string()));
        rest = tail;
    }
    out
}

pub(crate) fn good_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// The image's own kernel and initrd, copied to `out_dir` as `vmlinuz` and
/// `initrd.img`: the newest `/boot/vmlinuz-RELEASE` that has an
/// `/boot/initrd.img-RELEASE` (Debian, Ubuntu) or
/// `/boot/initramfs-RELEASE.img` (Fedora) beside it, on the first ext4
/// filesystem of `raw` (a disk image in raw format: a GPT partition, or
/// the whole disk) that has one. `None` when no filesystem has both.
pub fn from_disk_image(raw: &Path, out_dir: &Path) -> Result<Option<ImageKernel>, KernelError> {
    for offset in candidate_offsets(raw)? {
        let spec = format!("{}?offset={offset}", raw.display());
        let out = debugfs(raw, &spec, "ls -p /boot", out_dir)?;
        // `ls -p` rows: /INODE/MODE/UID/GID/NAME/SIZE/
        let mut files = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split('/').collect();
            if f.len() >= 7 && f[2].starts_with("100") {
                files.push(f[5].to_string());
            }
        }
        let mut found: Vec<(String, String, String)> = files
            .iter()
            .filter_map(|k| {
                let rel = k.strip_prefix("vmlinuz-")?;
                if !good_name(rel) {
                    return None;
                }
                [format!("initrd.img-{rel}"), format!("initramfs-{rel}.img")]
                    .into_iter()
                    .find(|i| files.contains(i))
                    .map(|i| (rel.to_string(), k.clone(), i))
            })
            .collect();
        found.sort_by_key(|(rel, _, _)| release_key(rel));
        let Some((release, kernel, initrd)) = found.pop() else {
            continue;
        };
        for (name, to) in [(&kernel, "vmlinuz"), (&initrd, "initrd.img")] {
            let _ = std::fs::remove_file(out_dir.join(to));
            let out = debugfs(raw, &spec, &format!("dump /boot/{name} {to}"), out_dir)?;
            if !out_dir.join(to).is_file() {
                return Err(KernelError::Dump {
                    path: raw.to_path_buf(),
                    file: format!("/boot/{name}"),
                    stderr: String::from_utf8_lossy(&out.stderr)
                        .trim()
                        .chars()
                        .take(400)
                        .collect(),
                });
            }
        }
        return Ok(Some(ImageKernel {
            kernel: out_dir.join("vmlinuz"),
            initrd: out_dir.join("initrd.img"),
            release,
        }));
    }
    Ok(None)
}

fn debugfs(
    raw: &Path,
    spec: &str,
    request: &str,
    cwd: &Path,
) -> Result<std::process::Output, KernelError> {
    Command::new(crate::disk::create::find_tool("debugfs"))
        .args(["-R", request, spec])
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| KernelError::Debugfs {
            path: raw.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::super::gpt::fixture::{self, bzimage};
    use super::*;

    #[test]
    fn release_from_bzimage_and_vmlinux() {
        let d = tempfile::tempdir().unwrap();
        let bz = d.path().join("vmlinuz");
        std::fs::write(&bz, bzimage("6.1.0-57-cloud-amd64")).unwrap();
        assert_eq!(release_of(&bz).unwrap(), "6.1.0-57-cloud-amd64");
        let elf = d.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF....Linux version 6.1.0-9-amd64 (gcc) #1\0").unwrap();
        assert_eq!(release_of(&elf).unwrap(), "6.1.0-9-amd64");
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(release_of(&junk)
            .unwrap_err()
            .to_string()
            .contains("neither a bzImage"));
        std::fs::write(&junk, bzimage("6.1/../x")).unwrap();
        assert!(release_of(&junk)
            .unwrap_err()
            .to_string()
            .contains("not a kernel release"));
    }

    #[test]
    fn flags_then_image_then_config() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, rel: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, bzimage(rel)).unwrap();
            p
        };
        let flag = write("flag", "1.0-flag");
        let img = write("img", "2.0-img");
        let conf = write("conf", "3.0-conf");
        let mods = d.path().join("modules/3.0-conf");
        std::fs::create_dir_all(&mods).unwrap();
        std::fs::write(mods.join("modules.order"), "").unwrap();
        let image = ImageKernel {
            kernel: img.clone(),
            initrd: d.path().join("img.initrd"),
            release: "2.0-img".into(),
        };
        let vm = VmSettings {
            kernel: Some(conf.clone()),
            ..Default::default()
        };
        let c = select(Some(&flag), None, Some(&image), &vm).unwrap();
        assert_eq!(
            (c.source, c.kernel.clone(), c.initrd.clone()),
            (KernelSource::Flag, flag.clone(), None)
        );
        assert_eq!(c.release, "1.0-flag");
        assert!(c.uses_cocoon_initramfs());
        let c = select(None, None, Some(&image), &vm).unwrap();
        assert_eq!(c.source, KernelSource::Image);
        assert_eq!(c.initrd.as_deref(), Some(image.initrd.as_path()));
        let c = select(None, None, None, &vm).unwrap();
        assert_eq!(c.source, KernelSource::Config);
        assert_eq!(
            c.modules.as_deref(),
            Some(mods.as_path()),
            "modules/RELEASE beside the kernel"
        );
        assert!(matches!(
            select(None, None, None, &VmSettings::default()),
            Err(KernelError::NoKernel)
        ));
        let err = select(None, Some(&flag), None, &vm)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--initrd was given without --kernel"), "{err}");
        let bad = VmSettings {
            modules: Some(d.path().to_path_buf()),
            ..vm.clone()
        };
        assert!(matches!(
            select(None, None, None, &bad),
            Err(KernelError::BadModules { .. })
        ));
    }

    #[test]
    fn newest_release_first() {
        let mut r = vec!["6.1.0-10-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"];
        r.sort_by_key(|s| release_key(s));
        assert_eq!(r, ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]);
    }

    /// A GPT disk with an ext4 partition holding /boot, made with sfdisk
    /// and mkfs.ext4 -d: the newest kernel with an initrd is copied out.
    #[test]
    fn finds_the_kernel_on_a_gpt_disks_ext4_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root/boot");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("vmlinuz-6.1.0-9-amd64"), bzimage("6.1.0-9-amd64")).unwrap();
        std::fs::write(root.join("initrd.img-6.1.0-9-amd64"), b"initrd 9").unwrap();
        std::fs::write(
            root.join("vmlinuz-6.1.0-10-amd64"),
            bzimage("6.1.0-10-amd64"),
        )
        .unwrap();
        std::fs::write(root.join("initrd.img-6.1.0-10-amd64"), b"initrd 10").unwrap();
        // Newest, but without an initrd: not bootable on its own.
        std::fs::write(root.join("vmlinuz-6.2.0-1-amd64"), bzimage("6.2.0-1-amd64")).unwrap();
        let Some(disk) = fixture::disk(
            d.path(),
            "start=2048, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
            Some((&d.path().join("root"), 2048)),
        ) else {
            return;
        };
        assert_eq!(candidate_offsets(&disk).unwrap(), [2048 * 512, 0]);
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let k = from_disk_image(&disk, &out).unwrap().expect("a kernel");
        assert_eq!(k.release, "6.1.0-10-amd64");
        assert_eq!(release_of(&k.kernel).unwrap(), "6.1.0-10-amd64");
        assert_eq!(std::fs::read(&k.initrd).unwrap(), b"initrd 10");
        // A disk with no ext4 anywhere has no kernel.
        let blank = d.path().join("blank.img");
        std::fs::File::create(&blank)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        assert_eq!(from_disk_image(&blank, &out).unwrap(), None);
    }
}
