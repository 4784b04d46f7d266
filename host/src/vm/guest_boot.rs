//! What a new VM boots, decided by `create` once its disks exist (the
//! command line names them by serial, and a disk image's kernel is read
//! from the VM's own copy):
//!
//! 1. the kernel: `--kernel`/`--initrd`, else the image's own, copied
//!    into the VM's `boot/`: a disk image's `/boot/vmlinuz-RELEASE` with
//!    its initrd ([`crate::guest::kernel::from_disk_image`]), a container
//!    image's with its modules ([`crate::guest::layer_kernel`]); else
//!    `[vm] kernel`/`[vm] initrd` ([`crate::guest::kernel::pick`]);
//! 2. a kernel that is not Linux (no bzImage header, no "Linux version"
//!    banner: the test guest, a unikernel) boots as given, with `--cmdline`
//!    or `console=ttyS0`;
//! 3. a Linux kernel without an initrd boots the cocoon initramfs for it
//!    (built or found in `STATE/initramfs`, verified by its digest),
//!    written into the VM's directory as `initrd.img` with the image's OCI
//!    process appended ([`crate::guest::initramfs::write_vm_initrd`]);
//! 4. a Linux kernel's command line is the [`BootPlan`] of the VM's disks
//!    after `--cmdline` (extra arguments); a disk image's root partition is
//!    the PARTUUID of the first GPT partition holding ext4
//!    ([`crate::guest::gpt::root_partition`]), and when the kernel has its
//!    own initrd (the image's), `root=PARTUUID=…` is added for it.
//!
//! Every file it writes is in the VM's directory, so a create that fails
//! removes them with the directory.

use std::path::{Path, PathBuf};

use crate::config::VmSettings;
use crate::disk::model::{DiskRole, StorageConfig};
use crate::guest::cmdline::CmdlineError;
use crate::guest::initramfs::{self, Initramfs, InitramfsError};
use crate::guest::kernel::{self, KernelError, KernelSource};
use crate::guest::layer_kernel;
use crate::guest::{gpt, BootPlan, ExecConfig, RootKind, RootPartition};

/// The VM's own initrd, in its directory.
pub const VM_INITRD: &str = "initrd.img";
/// The directory a disk image's kernel and initrd are copied to.
pub const IMAGE_BOOT_DIR: &str = "boot";

/// What the image is, as far as booting goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestImage {
    /// OCI layers under an overlay root; `exec` is the image's process.
    Layered { exec: ExecConfig },
    /// A disk image: the VM's cow is its copy.
    Disk,
}

/// The user's and the config's choices.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// `--cmdline`: the whole line for a kernel that is not Linux, extra
    /// arguments before the plan for a Linux one.
    pub cmdline: Option<String>,
    pub vm: VmSettings,
    /// Where the initramfs cache lives.
    pub state_dir: PathBuf,
    pub image: GuestImage,
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub source: KernelSource,
    /// The kernel's release; `None` for a kernel that is not Linux.
    pub release: Option<String>,
    /// The cocoon initramfs the VM's initrd was made from.
    pub initramfs: Option<Initramfs>,
    /// The disk image's root partition, when the host found it.
    pub root_partition: Option<RootPartition>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("the cocoon initramfs")]
    Initramfs(#[source] InitramfsError),
    #[error("the VM's initrd {path}")]
    VmInitrd {
        path: PathBuf,
        #[source]
        source: InitramfsError,
    },
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Decides and prepares what the VM in `vm_dir` boots, its disks being
/// `storage` (in plan order, every file made).
pub fn prepare(
    req: &BootRequest,
    vm_dir: &Path,
    storage: &[StorageConfig],
) -> Result<Booted, BootError> {
    let cow = storage.iter().find(|d| d.role == DiskRole::Cow);
    let image_kernel = match (&req.image, &req.kernel, cow) {
        // A disk image's own kernel and initrd, from its ext4 root (the
        // VM's copy).
        (GuestImage::Disk, None, Some(cow)) => {
            in_boot_dir(vm_dir, |dir| kernel::from_disk_image(&cow.path, dir))?
        }
        _ => None,
    };
    let layer_kernel = match (&req.image, &req.kernel) {
        // A container image's own kernel, with its modules.
        (GuestImage::Layered { .. }, None) => {
            let layers: Vec<PathBuf> = storage
                .iter()
                .filter(|d| d.role == DiskRole::Layer)
                .map(|d| d.path.clone())
                .collect();
            in_boot_dir(vm_dir, |dir| layer_kernel::from_layers(&layers, dir))?
        }
        _ => None,
    };
    let (picked, initrd, source) = match layer_kernel {
        // The image's kernel with its modules: the cocoon initramfs.
        Some(k) if req.initrd.is_none() => (k, None, KernelSource::Image),
        _ => kernel::pick(
            req.kernel.as_deref(),
            req.initrd.as_deref(),
            image_kernel.as_ref(),
            &req.vm,
        )?,
    };
    // The record names the files themselves; the modules are looked for
    // beside the path as given (a symlink to a kernel in a cache keeps its
    // modules beside the link).
    let kernel = std::fs::canonicalize(&picked).map_err(io("the kernel", &picked))?;
    let initrd = initrd
        .map(|i| std::fs::canonicalize(&i).map_err(io("the initrd", &i)))
        .transpose()?;
    match kernel::release_of(&kernel) {
        Err(KernelError::NotAKernel { .. }) => {
            return Ok(Booted {
                kernel,
                initrd,
                cmdline: req
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0".into()),
                source,
                release: None,
                initramfs: None,
                root_partition: None,
            })
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    let choice = kernel::select(
        Some(&picked),
        initrd.as_deref(),
        None,
        &VmSettings {
            kernel: None,
            initrd: None,
            ..req.vm.clone()
        },
    )?;
    let root_partition = match (&req.image, cow) {
        (GuestImage::Disk, Some(cow)) => {
            gpt::root_partition(&cow.path).map_err(io("reading the partitions of", &cow.path))?
        }
        _ => None,
    };
    let root = match &req.image {
        GuestImage::Layered { .. } => RootKind::Layered,
        GuestImage::Disk => RootKind::Disk {
            part: root_partition.clone(),
        },
    };
    let mut extra = req.cmdline.clone().unwrap_or_default();
    let (initrd, built) = match initrd {
        Some(own) => {
            // The kernel's own initrd (a distribution's) finds the root by
            // `root=`; the cocoon plan after it is unknown to it, harmless.
            if let Some(RootPartition::PartUuid(u)) = &root_partition {
                extra = format!("{extra} root=PARTUUID={u}");
            }
            (own, None)
        }
        None => {
            let busybox =
                initramfs::find_busybox(req.vm.busybox.as_deref()).map_err(BootError::Initramfs)?;
            let base = initramfs::build(&req.state_dir, &choice, &busybox)
                .map_err(BootError::Initramfs)?;
            let exec = match &req.image {
                GuestImage::Layered { exec } if !exec.argv().is_empty() => Some(exec),
                _ => None,
            };
            let path = vm_dir.join(VM_INITRD);
            initramfs::write_vm_initrd(&base, exec, &path).map_err(|source| {
                BootError::VmInitrd {
                    path: path.clone(),
                    source,
                }
            })?;
            // The image's modules were copied out for this build only.
            if source == KernelSource::Image {
                let _ = std::fs::remove_dir_all(vm_dir.join(IMAGE_BOOT_DIR).join("modules"));
            }
            (path, Some(base))
        }
    };
    let cmdline = BootPlan::new(root, storage)?.kernel_cmdline(&extra)?;
    Ok(Booted {
        kernel,
        initrd: Some(initrd),
        cmdline,
        source,
        release: Some(choice.release),
        initramfs: built,
        root_partition,
    })
}

/// Runs `find` (a search of the image for its kernel) on `vm_dir/boot`,
/// made for it and removed when it finds nothing.
fn in_boot_dir<T>(
    vm_dir: &Path,
    find: impl FnOnce(&Path) -> Result<Option<T>, KernelError>,
) -> Result<Option<T>, BootError> {
    let dir = vm_dir.join(IMAGE_BOOT_DIR);
    crate::fsutil::create_private_dir(&dir, 0o700).map_err(io("creating", &dir))?;
    let found = find(&dir)?;
    if found.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::gpt::fixture::{self, bzimage};

    fn disk(serial: &str, role: DiskRole, path: &Path) -> StorageConfig {
        StorageConfig {
            path: path.to_path_buf(),
            read_only: role.read_only(),
            serial: serial.into(),
            role,
            mount_point: None,
            fstype: None,
            direct_io: None,
        }
    }

    fn request(kernel: Option<PathBuf>, image: GuestImage, state: &Path) -> BootRequest {
        BootRequest {
            kernel,
            initrd: None,
            cmdline: None,
            vm: VmSettings::default(),
            state_dir: state.to_path_buf(),
            image,
        }
    }

    /// A kernel that is not Linux is booted as given (the test guest),
    /// whatever the image; `--cmdline` is then the whole line.
    #[test]
    fn a_kernel_that_is_not_linux_boots_as_given() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("guest.elf");
        std::fs::write(&k, b"\x7fELF and no banner").unwrap();
        let cow = d.path().join("cow.raw");
        std::fs::write(&cow, vec![0u8; 4096]).unwrap();
        let storage = [disk("cocoon-root", DiskRole::Cow, &cow)];
        let mut req = request(Some(k.clone()), GuestImage::Disk, d.path());
        let b = prepare(&req, d.path(), &storage).unwrap();
        assert_eq!(
            (b.kernel.as_path(), b.initrd.as_deref(), b.cmdline.as_str()),
            (k.canonicalize().unwrap().as_path(), None, "console=ttyS0")
        );
        assert_eq!((b.source, b.release), (KernelSource::Flag, None));
        req.cmdline = Some("report=all".into());
        assert_eq!(
            prepare(&req, d.path(), &storage).unwrap().cmdline,
            "report=all"
        );
        // Nothing chosen at all, or a kernel that is not there.
        req.kernel = None;
        assert!(matches!(
            prepare(&req, d.path(), &storage),
            Err(BootError::Kernel(KernelError::NoKernel))
        ));
        assert!(
            !d.path().join(IMAGE_BOOT_DIR).exists(),
            "no kernel, no boot dir"
        );
        req.kernel = Some(d.path().join("missing"));
        let e = prepare(&req, d.path(), &storage).unwrap_err().to_string();
        assert!(e.contains("the kernel") && e.contains("missing"), "{e}");
    }

    /// A Linux kernel with its own initrd keeps it, and gets the plan on
    /// its command line (with `root=` for a disk image whose root
    /// partition the host found).
    #[test]
    fn a_linux_kernel_with_its_own_initrd_gets_the_plan() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinuz");
        std::fs::write(&k, bzimage("6.1.0")).unwrap();
        let i = d.path().join("initrd");
        std::fs::write(&i, b"own").unwrap();
        let l0 = d.path().join("l0.sqfs");
        let cow = d.path().join("cow.raw");
        std::fs::write(&l0, b"").unwrap();
        std::fs::write(&cow, vec![0u8; 4096]).unwrap();
        let storage = [
            disk("cocoon-layer0", DiskRole::Layer, &l0),
            disk("cocoon-root", DiskRole::Cow, &cow),
        ];
        let mut req = request(
            Some(k),
            GuestImage::Layered {
                exec: ExecConfig::default(),
            },
            d.path(),
        );
        req.initrd = Some(i.clone());
        req.cmdline = Some("quiet".into());
        let b = prepare(&req, d.path(), &storage).unwrap();
        assert_eq!(b.release.as_deref(), Some("6.1.0"));
        assert_eq!(b.initrd, Some(i.canonicalize().unwrap()));
        assert_eq!(b.initramfs, None);
        assert_eq!(
            b.cmdline,
            "console=ttyS0 panic=-1 quiet cocoon.root=layered cocoon.disk=cocoon-layer0:layer cocoon.disk=cocoon-root:cow"
        );
        // A disk-image plan with layers cannot boot: refused by the plan.
        req.image = GuestImage::Disk;
        assert!(matches!(
            prepare(&req, d.path(), &storage),
            Err(BootError::Cmdline(CmdlineError::Disk { .. }))
        ));
    }

    /// A disk image that carries a kernel and its initrd boots them,
    /// copied into the VM's directory, with `root=` and the plan naming
    /// the root partition.
    #[test]
    fn a_disk_images_own_kernel_is_copied_and_gets_its_root() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("boot")).unwrap();
        let release = "6.1.0-10-amd64";
        std::fs::write(
            tree.join(format!("boot/vmlinuz-{release}")),
            bzimage(release),
        )
        .unwrap();
        std::fs::write(
            tree.join(format!("boot/initrd.img-{release}")),
            b"its initrd",
        )
        .unwrap();
        let Some(image) = fixture::disk(
            d.path(),
            "start=2048, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
            Some((&tree, 2048)),
        ) else {
            return;
        };
        let uuid = gpt::partitions(&std::fs::File::open(&image).unwrap()).unwrap()[0].partuuid();
        let vm_dir = d.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let storage = [disk("cocoon-root", DiskRole::Cow, &image)];
        let mut req = request(None, GuestImage::Disk, d.path());
        // The config's kernel is the fallback, not used here.
        req.vm.kernel = Some(d.path().join("unused"));
        let b = prepare(&req, &vm_dir, &storage).unwrap();
        assert_eq!(b.source, KernelSource::Image);
        assert_eq!(b.release.as_deref(), Some(release));
        assert_eq!(
            b.kernel,
            vm_dir.join("boot/vmlinuz").canonicalize().unwrap()
        );
        let initrd = b.initrd.as_deref().unwrap();
        assert_eq!(std::fs::read(initrd).unwrap(), b"its initrd");
        assert_eq!(b.initramfs, None);
        assert_eq!(
            b.root_partition,
            Some(RootPartition::PartUuid(uuid.clone()))
        );
        assert_eq!(
            b.cmdline,
            format!(
                "console=ttyS0 panic=-1 root=PARTUUID={uuid} cocoon.root=disk \
                 cocoon.rootpart=PARTUUID={uuid} cocoon.disk=cocoon-root:cow"
            )
        );
    }

    /// A container image whose layers carry a kernel boots it with the
    /// cocoon initramfs built from the modules beside it in the VM's
    /// `boot/` (here a modules directory without the modules the init
    /// needs: the build says so, naming that directory).
    #[test]
    fn a_container_images_own_kernel_takes_its_modules_from_the_layers() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        let release = "6.1.0-10-amd64";
        std::fs::create_dir_all(tree.join("boot")).unwrap();
        std::fs::write(
            tree.join(format!("boot/vmlinuz-{release}")),
            bzimage(release),
        )
        .unwrap();
        let mods = tree.join(format!("lib/modules/{release}"));
        std::fs::create_dir_all(&mods).unwrap();
        std::fs::write(mods.join("modules.order"), "").unwrap();
        std::fs::write(mods.join("modules.builtin"), "").unwrap();
        let Some(layers) = crate::guest::layer_kernel::fixture::layers(d.path(), &[(&tree, None)])
        else {
            return;
        };
        let cow = d.path().join("cow.raw");
        std::fs::write(&cow, b"").unwrap();
        let storage = [
            disk("cocoon-layer0", DiskRole::Layer, &layers[0]),
            disk("cocoon-root", DiskRole::Cow, &cow),
        ];
        let vm_dir = d.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let mut req = request(
            None,
            GuestImage::Layered {
                exec: ExecConfig::default(),
            },
            d.path(),
        );
        req.vm.kernel = Some(d.path().join("unused"));
        let Err(e) = prepare(&req, &vm_dir, &storage) else {
            panic!("built an initramfs without modules");
        };
        let chain = crate::error_chain(&e);
        assert!(
            matches!(e, BootError::Initramfs(_))
                && chain.contains(
                    &vm_dir
                        .join("boot/modules")
                        .join(release)
                        .display()
                        .to_string()
                ),
            "{chain}"
        );
        assert_eq!(
            std::fs::read(vm_dir.join("boot/vmlinuz")).unwrap(),
            bzimage(release)
        );
    }
}
