//! Guest memory in its own file: written sparse (pages of zeros stay
//! holes), and mapped back private (`MAP_PRIVATE`): pages load lazily from
//! the file on first touch, and the guest's writes stay in the process
//! (copy-on-write), so one memory file serves any number of restores.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::state::MemoryRegionState;
use crate::memory::Reservation;
use std::os::unix::io::AsRawFd;

/// The unit of the zero check: a page.
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write guest memory to {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot map {path} as guest memory")]
    Map {
        path: String,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot map {path} as guest memory: the regions overlap or overflow")]
    Layout { path: String },
    #[error("cannot map {path} over the reserved guest memory")]
    MapFixed {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the reserved guest memory does not have the snapshot's layout")]
    ReservationLayout,
}

/// Writes every region of `mem` at its offset in `file` (already sized),
/// skipping pages of zeros; returns the bytes written.
///
/// The caller guarantees nothing writes guest memory meanwhile: every vCPU
/// and device thread is parked.
pub fn write(
    mem: &GuestMemoryMmap,
    regions: &[MemoryRegionState],
    file: &File,
    path: &str,
) -> Result<u64, MemoryFileError> {
    let err = |source| MemoryFileError::Write {
        path: path.to_string(),
        source,
    };
    let mut written = 0u64;
    for (region, layout) in mem.iter().zip(regions) {
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem` for this call; with the VM paused nothing writes it, so a
        // shared view of it as bytes is sound for the read below.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        for (start, end) in nonzero_runs(bytes) {
            file.write_all_at(&bytes[start..end], layout.file_offset + start as u64)
                .map_err(err)?;
            written += (end - start) as u64;
        }
    }
    Ok(written)
}

/// The byte ranges of `bytes` that are runs of pages not all zero.
pub fn nonzero_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        if is_zero(page) {
            continue;
        }
        let start = i * PAGE;
        let end = start + page.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this; a byte loop is 8x slower.
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to returns the
        // aligned middle and the unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Maps `file` as guest memory with the saved layout, private and lazy.
pub fn map(
    file: &File,
    regions: &[MemoryRegionState],
    path: &str,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let clone = file.try_clone().map_err(|source| MemoryFileError::Write {
            path: path.to_string(),
            source,
        })?;
        let mapping = MmapRegionBuilder::new(r.size as usize)
            .with_file_offset(FileOffset::new(clone, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryFileError::Map {
                path: path.to_string(),
                source,
            })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemoryFileError::Layout {
                    path: path.to_string(),
                }
            })?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|_| MemoryFileError::Layout {
        path: path.to_string(),
    })
}

/// Maps `file` private and lazy over the address space `reserved` holds,
/// region by region, where KVM already expects guest memory.
pub fn map_into(
    file: &File,
    regions: &[MemoryRegionState],
    reserved: &Reservation,
    path: &str,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let slots = reserved.regions();
    if slots.len() != regions.len()
        || slots
            .iter()
            .zip(regions)
            .any(|(s, r)| s.guest_addr.0 != r.guest_addr || s.size as u64 != r.size)
    {
        return Err(MemoryFileError::ReservationLayout);
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    let mut out = Vec::with_capacity(regions.len());
    for (slot, r) in slots.iter().zip(regions) {
        // SAFETY: MAP_FIXED replaces exactly the reserved range, which
        // `reserved` owns and nothing else maps or uses yet.
        let p = unsafe {
            libc::mmap(
                slot.host_addr.cast(),
                slot.size,
                prot,
                flags | libc::MAP_FIXED,
                file.as_raw_fd(),
                r.file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryFileError::MapFixed {
                path: path.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the range is the live mapping just made, which stays
        // until `reserved` is dropped, after every user of the region.
        let mapping = unsafe {
            vm_memory::mmap::MmapRegion::build_raw(slot.host_addr, slot.size, prot, flags)
        }
        .map_err(|source| MemoryFileError::Map {
            path: path.to_string(),
            source,
        })?;
        let region = GuestRegionMmap::new(mapping, slot.guest_addr).ok_or_else(|| {
            MemoryFileError::Layout {
                path: path.to_string(),
            }
        })?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|_| MemoryFileError::Layout {
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::memory_layout;
    use vm_memory::Bytes;

    #[test]
    fn zero_pages_are_skipped_and_runs_merge() {
        let mut b = vec![0u8; 10 * PAGE + 100];
        assert!(nonzero_runs(&b).is_empty());
        b[PAGE + 7] = 1; // page 1
        b[2 * PAGE] = 1; // page 2: joins page 1
        b[5 * PAGE + PAGE - 1] = 9; // page 5, last byte
        b[10 * PAGE + 99] = 3; // the short tail page
        assert_eq!(
            nonzero_runs(&b),
            vec![
                (PAGE, 3 * PAGE),
                (5 * PAGE, 6 * PAGE),
                (10 * PAGE, 10 * PAGE + 100)
            ]
        );
    }

    #[test]
    fn memory_written_and_mapped_back_is_the_same_and_private() {
        let size = 16u64 << 20;
        let layout = memory_layout(size);
        let mem = crate::memory::create_guest_memory(size).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"in the middle", GuestAddress(7 << 20))
            .unwrap();
        mem.write_slice(b"last", GuestAddress(size - 4)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let written = write(&mem, &layout, &file, "memory").unwrap();
        // Three pages hold data; the rest of the file is holes.
        assert_eq!(written, 3 * PAGE as u64);
        drop(file);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        let file = File::open(&path).unwrap();
        let back = map(&file, &layout, "memory").unwrap();
        let mut buf = [0u8; 13];
        back.read_slice(&mut buf, GuestAddress(7 << 20)).unwrap();
        assert_eq!(&buf, b"in the middle");
        back.read_slice(&mut buf[..4], GuestAddress(size - 4))
            .unwrap();
        assert_eq!(&buf[..4], b"last");
        // Writes stay in this mapping: the file (opened read-only, even)
        // and a second mapping keep the saved bytes.
        back.write_slice(b"FIRST", GuestAddress(0)).unwrap();
        let again = map(&file, &layout, "memory").unwrap();
        let mut five = [0u8; 5];
        again.read_slice(&mut five, GuestAddress(0)).unwrap();
        assert_eq!(&five, b"first");
        assert_eq!(&std::fs::read(&path).unwrap()[..5], b"first");

        // The same over reserved address space.
        let reserved = Reservation::new(size).unwrap();
        let over = map_into(&file, &layout, &reserved, "memory").unwrap();
        assert_eq!(
            over.iter().next().unwrap().as_ptr(),
            reserved.regions()[0].host_addr
        );
        over.read_slice(&mut buf, GuestAddress(7 << 20)).unwrap();
        assert_eq!(&buf, b"in the middle");
        over.write_slice(b"OVER", GuestAddress(0)).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..5], b"first");
        let other = Reservation::new(size * 2).unwrap();
        assert!(matches!(
            map_into(&file, &layout, &other, "memory"),
            Err(MemoryFileError::ReservationLayout)
        ));
    }
}
