//! Kernel loading: an ELF with a PVH entry note, an ELF without one
//! (64-bit Linux boot protocol at its entry), or a bzImage; the initrd, the
//! command line, and the boot information the kernel reads (hvm_start_info
//! or boot_params).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::regs::EntryMode;
use crate::cast::usize_from;
use crate::memory::{
    e820_map, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START, PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `type_of_loader` = "undefined loader": without it Linux ignores the
/// initrd.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry of a bzImage is 0x200 past its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {0}")]
    Open(String, #[source] std::io::Error),
    #[error("{name} is {kind}, not a regular file")]
    NotAFile { name: String, kind: &'static str },
    #[error("{name} is {size} bytes, larger than the guest's {memory} bytes of memory")]
    LargerThanMemory {
        name: String,
        size: u64,
        memory: u64,
    },
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("cannot load the kernel as an ELF")]
    Elf(#[source] loader::Error),
    #[error("cannot load the kernel as a bzImage")]
    BzImage(#[source] loader::Error),
    #[error("the command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("the initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot write boot data into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What to load.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_size: u64,
    pub rsdp_addr: u64,
}

enum KernelKind {
    Pvh(GuestAddress),
    Elf64(GuestAddress),
    BzImage(setup_header, GuestAddress),
}

/// Loads everything into `mem` and says how the boot vCPU enters.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<EntryMode, BootError> {
    let name = spec.kernel.display().to_string();
    let mut file = open_regular(spec.kernel, &name, spec.memory_size)?;
    let (kind, kernel_end) = load_kernel(mem, &mut file, &name)?;

    write_cmdline(mem, spec.cmdline)?;
    let initrd = match spec.initrd {
        Some(path) => {
            let limit = match &kind {
                KernelKind::BzImage(hdr, _) if hdr.initrd_addr_max != 0 => {
                    u64::from(hdr.initrd_addr_max) + 1
                }
                _ => u64::from(u32::MAX) + 1,
            };
            Some(load_initrd(
                mem,
                path,
                kernel_end,
                limit.min(spec.memory_size.min(MMIO_GAP_START)),
            )?)
        }
        None => None,
    };
    // write_cmdline refused anything of CMDLINE_MAX_SIZE (4 KiB) or more.
    let cmdline_len = u32::try_from(spec.cmdline.len() + 1).expect("checked by write_cmdline");
    match kind {
        KernelKind::Pvh(entry) => {
            write_pvh_info(mem, spec, initrd)?;
            Ok(EntryMode::Pvh {
                entry: entry.0,
                start_info: PVH_INFO_ADDR,
            })
        }
        KernelKind::Elf64(entry) => {
            write_boot_params(mem, spec, default_setup_header(), cmdline_len, initrd)?;
            Ok(EntryMode::Linux64 {
                entry: entry.0,
                zero_page: ZERO_PAGE_ADDR,
            })
        }
        KernelKind::BzImage(hdr, load_addr) => {
            write_boot_params(mem, spec, hdr, cmdline_len, initrd)?;
            Ok(EntryMode::Linux64 {
                entry: load_addr.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                zero_page: ZERO_PAGE_ADDR,
            })
        }
    }
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    file: &mut File,
    name: &str,
) -> Result<(KernelKind, u64), BootError> {
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|e| BootError::Read(name.to_string(), e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::Read(name.to_string(), e))?;
    if &magic == b"\x7fELF" {
        let r =
            Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(BootError::Elf)?;
        let kind = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => KernelKind::Pvh(entry),
            _ => KernelKind::Elf64(r.kernel_load),
        };
        Ok((kind, r.kernel_end))
    } else {
        let r = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::BzImage)?;
        // BzImage::load always fills the setup header; a missing one would
        // have been an error above.
        let hdr = r.setup_header.unwrap_or_else(default_setup_header);
        Ok((KernelKind::BzImage(hdr, r.kernel_load), r.kernel_end))
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::GuestMemory)
}

/// Opens a kernel or initrd: a regular file of at most `max` bytes. The open
/// never blocks (a FIFO without a writer would hang it) and the type is
/// checked on the opened file, so a FIFO or a device such as /dev/zero is
/// refused before anything is read.
fn open_regular(path: &Path, name: &str, max: u64) -> Result<File, BootError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| BootError::Open(name.to_string(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| BootError::Read(name.to_string(), e))?;
    let t = meta.file_type();
    let kind = if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    };
    if let Some(kind) = kind {
        return Err(BootError::NotAFile {
            name: name.to_string(),
            kind,
        });
    }
    if meta.len() > max {
        return Err(BootError::LargerThanMemory {
            name: name.to_string(),
            size: meta.len(),
            memory: max,
        });
    }
    Ok(file)
}

/// Loads the initrd at the highest page-aligned address below `limit`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    // Its size is checked against the room below `limit` just below.
    let mut file = open_regular(path, &name, u64::MAX)?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Read(name.clone(), e))?
        .len();
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = match limit.checked_sub(size) {
        Some(a) => a & !(PAGE_SIZE - 1),
        None => return Err(too_large),
    };
    if addr < kernel_end {
        return Err(too_large);
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, usize_from(size))
        .map_err(BootError::GuestMemory)?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec<'_>,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = e820_map(spec.memory_size);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(BootError::GuestMemory)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: spec.rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(map.len()).expect("the E820 map has a few entries"),
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(BootError::GuestMemory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(BootError::GuestMemory)
}

fn default_setup_header() -> setup_header {
    setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT,
        ..Default::default()
    }
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    spec: &BootSpec<'_>,
    hdr: setup_header,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr =
        u32::try_from(CMDLINE_ADDR).expect("the command line is in low memory");
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        // load_initrd placed it below MMIO_GAP_START (3 GiB).
        let below_4g = |v: u64| u32::try_from(v).expect("the initrd ends below the MMIO gap");
        params.hdr.ramdisk_image = below_4g(addr);
        params.hdr.ramdisk_size = below_4g(size);
    }
    params.acpi_rsdp_addr = spec.rsdp_addr;
    let map = e820_map(spec.memory_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = u8::try_from(map.len().min(params.e820_table.len()))
        .expect("the zero page's table has 128 entries");
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(BootError::GuestMemory)?;
    // The zero page must not overlap the page tables right above it.
    debug_assert!(GuestAddress(ZERO_PAGE_ADDR)
        .checked_add(std::mem::size_of::<boot_params>() as u64)
        .is_some_and(|end| end.0 <= crate::memory::PML4_ADDR));
    Ok(())
}
