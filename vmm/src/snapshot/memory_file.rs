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

/// What is behind guest memory where the guest has not touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory (a booted VM): an untouched page is zero, and
    /// /proc/self/pagemap says which pages were touched, so only those are
    /// read (reading the rest would fault in 256 MiB of zero pages per
    /// 256 MiB guest, about 20 ms here).
    Anonymous,
    /// A private mapping of a memory file (a restored VM): an untouched
    /// page holds the file's bytes, so every page is read.
    File,
}

/// Writes every region of `mem` at its offset in `file` (already sized),
/// skipping pages of zeros; returns the bytes written.
///
/// The caller guarantees nothing writes guest memory meanwhile: every vCPU
/// and device thread is parked.
pub fn write(
    mem: &GuestMemoryMmap,
    regions: &[MemoryRegionState],
    backing: Backing,
    file: &File,
    path: &str,
) -> Result<u64, MemoryFileError> {
    let err = |source| MemoryFileError::Write {
        path: path.to_string(),
        source,
    };
    let mut written = 0u64;
    for (region, layout) in mem.iter().zip(regions) {
        let len = crate::cast::usize_from(region.len());
        let touched = match backing {
            Backing::Anonymous => touched_pages(region.as_ptr(), len)
                .inspect_err(|e| tracing::debug!(error = %e, "pagemap unreadable; reading all of guest memory"))
                .ok(),
            Backing::File => None,
        };
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem` for this call; with the VM paused nothing writes it, so a
        // shared view of it as bytes is sound. Only pages the filter lets
        // through are read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let runs = data_runs(bytes, |page| touched.as_ref().is_none_or(|t| t[page]));
        for (start, end) in runs {
            file.write_all_at(&bytes[start..end], layout.file_offset + start as u64)
                .map_err(err)?;
            written += (end - start) as u64;
        }
    }
    Ok(written)
}

/// For each page of the mapping at `addr`, whether it is present or
/// swapped out (/proc/self/pagemap bits 63 and 62): the pages the process
/// has touched.
pub fn touched_pages(addr: *const u8, len: usize) -> io::Result<Vec<bool>> {
    const PRESENT_OR_SWAPPED: u64 = 3 << 62;
    const CHUNK: usize = 64 * 1024;
    let pagemap = File::open("/proc/self/pagemap")?;
    let pages = len.div_ceil(PAGE);
    let first = addr as u64 / PAGE as u64;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; CHUNK.min(pages) * 8];
    let mut done = 0;
    while done < pages {
        let n = CHUNK.min(pages - done);
        pagemap.read_exact_at(&mut buf[..n * 8], (first + done as u64) * 8)?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            u64::from_le_bytes(word) & PRESENT_OR_SWAPPED != 0
        }));
        done += n;
    }
    Ok(out)
}

/// The byte ranges of `bytes` that are runs of pages holding data, among
/// the pages `candidate` (by page index) lets through.
pub fn data_runs(bytes: &[u8], candidate: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        if !candidate(i) || is_zero(page) {
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
        let mapping = MmapRegionBuilder::new(crate::cast::usize_from(r.size))
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
        assert!(data_runs(&b, |_| true).is_empty());
        b[PAGE + 7] = 1; // page 1
        b[2 * PAGE] = 1; // page 2: joins page 1
        b[5 * PAGE + PAGE - 1] = 9; // page 5, last byte
        b[10 * PAGE + 99] = 3; // the short tail page
        assert_eq!(
            data_runs(&b, |_| true),
            vec![
                (PAGE, 3 * PAGE),
                (5 * PAGE, 6 * PAGE),
                (10 * PAGE, 10 * PAGE + 100)
            ]
        );
        // Pages the filter leaves out are not looked at.
        assert_eq!(
            data_runs(&b, |p| p != 2 && p != 10),
            vec![(PAGE, 2 * PAGE), (5 * PAGE, 6 * PAGE)]
        );
    }

    #[test]
    fn pagemap_tells_touched_pages() {
        let len = 64 * PAGE;
        // SAFETY: (test) a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
        .cast::<u8>();
        assert_ne!(p.cast(), libc::MAP_FAILED);
        // SAFETY: (test) inside the mapping.
        unsafe {
            p.add(3 * PAGE).write(1);
            p.add(40 * PAGE + 7).write(2);
        }
        let t = touched_pages(p, len).unwrap();
        assert_eq!(t.len(), 64);
        let touched: Vec<usize> = (0..64).filter(|&i| t[i]).collect();
        assert_eq!(touched, vec![3, 40]);
        // SAFETY: (test) the mapping made above.
        unsafe { libc::munmap(p.cast(), len) };
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
        let written = write(&mem, &layout, Backing::Anonymous, &file, "memory").unwrap();
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
        // Snapshotting the file-backed copy reads every page: the bytes
        // the guest never touched come from the file.
        let again_path = dir.path().join("again");
        let f2 = File::create(&again_path).unwrap();
        f2.set_len(size).unwrap();
        assert_eq!(
            write(&over, &layout, Backing::File, &f2, "again").unwrap(),
            3 * PAGE as u64
        );
        let data = std::fs::read(&again_path).unwrap();
        assert_eq!(&data[..5], b"OVERt");
        assert_eq!(&data[7 << 20..(7 << 20) + 13], b"in the middle");
        let other = Reservation::new(size * 2).unwrap();
        assert!(matches!(
            map_into(&file, &layout, &other, "memory"),
            Err(MemoryFileError::ReservationLayout)
        ));
    }
}
