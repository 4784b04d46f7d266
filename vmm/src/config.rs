//! What a VM is made of: the input of [`crate::Vm::start`].

use std::path::PathBuf;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and fail every write with an I/O error.
    pub read_only: bool,
    /// The GET_ID string, at most 20 bytes.
    pub serial: Option<String>,
    /// Open the file with O_DIRECT (bypass the host page cache).
    pub direct: bool,
}

impl DiskConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            direct: false,
        }
    }
}

/// Where COM1's output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialOutput {
    /// Discard it.
    #[default]
    Sink,
    /// The VMM process's standard output (and its stdin feeds COM1).
    Stdout,
    /// Append to a file (created if missing).
    File(PathBuf),
}

/// A VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// A bzImage, or an ELF (vmlinux or any PVH kernel) with a PVH entry note.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The command line; the VMM appends its `virtio_mmio.device=` entries.
    pub cmdline: String,
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub disks: Vec<DiskConfig>,
    pub serial: SerialOutput,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 256 << 20,
            disks: Vec::new(),
            serial: SerialOutput::Sink,
        }
    }
}
