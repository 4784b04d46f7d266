//! Guest physical memory: the layout of the machine and the E820 map.
//!
//! RAM starts at 0 and runs up to the 32-bit MMIO gap (3 GiB); anything
//! beyond continues at 4 GiB. The gap holds the virtio-mmio slots, the
//! IOAPIC and the local APICs.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::cast::usize_from;

/// Where the GDT for the boot vCPU state lives.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// The Linux zero page (`boot_params`) for bzImage boot.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables for the 64-bit bzImage entry.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the usable conventional memory below 640 KiB.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables live in the BIOS area, where a bzImage kernel also scans
/// for the RSDP when nobody tells it.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Kernels and everything above.
pub const HIMEM_START: u64 = 0x100000;
/// The 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio slots: 4 KiB each from here, one IOAPIC pin each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first IOAPIC pin for virtio devices; COM1 has 4.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins run 0..24, so 19 virtio slots fit.
pub const MAX_VIRTIO_DEVICES: usize = 19;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, on
/// Intel without unrestricted guest; put them just below the IOAPIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Smallest memory we accept: the low layout above plus room for a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// An entry of the E820 map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} bytes is below the minimum of {MIN_MEMORY}")]
    TooSmall(u64),
    #[error(
        "guest memory of {requested} bytes ({}) is more than this host's RAM of {host} bytes ({}, MemTotal in /proc/meminfo)",
        gib(*requested),
        gib(*host)
    )]
    MoreThanHost { requested: u64, host: u64 },
    #[error("cannot read the host's memory size from /proc/meminfo")]
    HostMemory(#[source] std::io::Error),
    #[error("cannot reserve {0} bytes of address space for guest memory")]
    Reserve(u64, #[source] std::io::Error),
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// Refuses guest memory larger than the host's RAM.
///
/// The bound is MemTotal, not MemAvailable: guest RAM is an anonymous
/// mapping whose pages arrive on first touch (and a restored VM's come from
/// its memory file), so what is free when a VM starts says little about
/// what it will use, and refusing on it would forbid the overcommit that
/// packs many mostly idle microVMs on one host. A guest larger than all of
/// the host's RAM, though, can never be backed and could only end in the
/// OOM killer.
pub fn check_fits_host(requested: u64, host_total: u64) -> Result<(), MemoryError> {
    if requested > host_total {
        return Err(MemoryError::MoreThanHost {
            requested,
            host: host_total,
        });
    }
    Ok(())
}

/// [`check_fits_host`] against this host's MemTotal.
pub fn check_fits_this_host(requested: u64) -> Result<(), MemoryError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(MemoryError::HostMemory)?;
    let total = parse_mem_total(&meminfo).ok_or_else(|| {
        MemoryError::HostMemory(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal line",
        ))
    })?;
    check_fits_host(requested, total)
}

/// MemTotal from the text of /proc/meminfo, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let rest = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim();
    let kib: u64 = rest.strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The RAM regions for `size` bytes of guest memory, split around the gap.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if size > low {
        regions.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    regions
}

/// Maps anonymous, private guest memory.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < MIN_MEMORY {
        return Err(MemoryError::TooSmall(size));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(a, s)| (a, usize_from(s)))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)?;
    for region in mem.iter() {
        // Transparent huge pages for guest RAM, as QEMU asks for too: with
        // THP in "madvise" mode (Debian's default) this is the difference
        // between 4 KiB and 2 MiB mappings for every guest access and for
        // the device copies into guest memory. Advisory: failure is fine.
        // SAFETY: the range is exactly a mapping owned by `mem`; MADV_HUGEPAGE
        // changes no contents.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                usize_from(region.len()),
                libc::MADV_HUGEPAGE,
            );
        }
    }
    Ok(mem)
}

/// Address space for guest RAM, reserved (no access, no memory behind it)
/// so that KVM can be told where guest memory will live before it is
/// mapped there. Unmapped on drop, with whatever was mapped over it.
pub struct Reservation {
    regions: Vec<ReservedRegion>,
}

/// One reserved range: where guest RAM region `guest_addr` will live.
#[derive(Debug, Clone, Copy)]
pub struct ReservedRegion {
    pub guest_addr: GuestAddress,
    pub host_addr: *mut u8,
    pub size: usize,
}

// SAFETY: the pointers name mappings this value owns; it only hands them
// out, and unmaps them once, on drop.
unsafe impl Send for Reservation {}
// SAFETY: as above; nothing is read or written through them here.
unsafe impl Sync for Reservation {}

impl Reservation {
    /// Reserves the layout of [`ram_regions`] for `size` bytes.
    pub fn new(size: u64) -> Result<Reservation, MemoryError> {
        if size < MIN_MEMORY {
            return Err(MemoryError::TooSmall(size));
        }
        let mut r = Reservation {
            regions: Vec::new(),
        };
        for (guest_addr, len) in ram_regions(size) {
            // SAFETY: a fresh anonymous mapping at an address the kernel
            // picks; it overlaps nothing and is owned by `r` from here.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    usize_from(len),
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(MemoryError::Reserve(size, std::io::Error::last_os_error()));
            }
            r.regions.push(ReservedRegion {
                guest_addr,
                host_addr: p.cast(),
                size: usize_from(len),
            });
        }
        Ok(r)
    }

    pub fn regions(&self) -> &[ReservedRegion] {
        &self.regions
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: the range is ours (reserved in `new`, perhaps mapped
            // over with MAP_FIXED since); whoever used it is gone, as the
            // owner drops this last.
            unsafe { libc::munmap(r.host_addr.cast(), r.size) };
        }
    }
}

/// The E820 map: conventional memory, the reserved BIOS/ACPI area, and RAM
/// from 1 MiB up to the gap and beyond 4 GiB.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (addr, len) in ram_regions(size) {
        let start = addr.0.max(HIMEM_START);
        let end = addr.0 + len;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// The slot of virtio-mmio device `index`: (base address, IOAPIC pin).
pub fn virtio_mmio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + u32::try_from(index).expect("a few dozen devices"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_memory_has_no_high_region() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (256 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_large_memory_is_split_around_the_gap() {
        let size = 4u64 << 30;
        let map = e820_map(size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(
            map[3],
            E820Entry {
                addr: MMIO_GAP_END,
                size: size - MMIO_GAP_START,
                kind: E820_RAM
            }
        );
        let ram: u64 = ram_regions(size).iter().map(|r| r.1).sum();
        assert_eq!(ram, size);
    }

    #[test]
    fn virtio_slots_stay_inside_the_gap_and_the_ioapic() {
        let (addr, irq) = virtio_mmio_slot(MAX_VIRTIO_DEVICES - 1);
        assert!(addr + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR as u64);
        assert!(addr >= MMIO_GAP_START);
        assert_eq!(irq, 23);
    }

    #[test]
    fn memory_above_the_hosts_is_refused() {
        const GIB: u64 = 1 << 30;
        let cases: &[(u64, u64, bool)] = &[
            (256 << 20, 23 * GIB, true),
            (23 * GIB, 23 * GIB, true),
            (23 * GIB + 1, 23 * GIB, false),
            (1 << 40, 23 * GIB, false),
        ];
        for &(requested, host, ok) in cases {
            let r = check_fits_host(requested, host);
            assert_eq!(r.is_ok(), ok, "{requested} on {host}");
            if let Err(e) = r {
                let text = e.to_string();
                assert!(text.contains(&requested.to_string()), "{text}");
                assert!(text.contains("MemTotal"), "{text}");
            }
        }
        let e = check_fits_host(1 << 40, 23 * GIB).unwrap_err().to_string();
        assert!(e.contains("1024.0 GiB") && e.contains("23.0 GiB"), "{e}");
    }

    #[test]
    fn mem_total_parses_from_meminfo() {
        let text = "MemTotal:       24587360 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_587_360 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
        // This host's own file parses.
        let real = std::fs::read_to_string("/proc/meminfo").unwrap();
        assert!(parse_mem_total(&real).unwrap() > MIN_MEMORY);
    }

    #[test]
    fn too_small_memory_is_refused() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
    }
}
