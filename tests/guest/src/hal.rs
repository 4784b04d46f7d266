//! The `virtio_drivers::Hal` of an identity-mapped guest with no allocator.
//!
//! Physical and virtual addresses are the same (the trampoline maps the first
//! 4 GiB 1:1), so sharing a buffer with a device is just taking its address.
//! DMA pages (the virtqueues) come from a static arena by bumping a pointer;
//! they are never given back, which is fine for a guest that sets up its
//! disks once and powers off.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// Room for the queues of every device the command line may name
/// (a virtio-blk queue of 16 entries takes two or three pages).
const ARENA_PAGES: usize = 96;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_PAGES * PAGE_SIZE]>);

// SAFETY: pages of the arena are handed out at most once each (the bump
// index only grows, atomically), so no two owners ever share a byte.
unsafe impl Sync for Arena {}

// In .noinit: nothing zeroes it up front (that would cost start-up time under
// instruction emulation); `dma_alloc` zeroes the pages it hands out.
// SAFETY (link_section): linker.ld gives .noinit.* a NOBITS output section of
// its own, where nothing else overlaps the arena.
#[unsafe(link_section = ".noinit.dma_arena")]
static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_PAGES * PAGE_SIZE]));
static NEXT_PAGE: AtomicUsize = AtomicUsize::new(0);

pub struct GuestHal;

// SAFETY: dma_alloc returns page-aligned pages, zeroed when handed out and
// never handed out twice, whose physical address equals their virtual
// address; share/unshare need no bouncing because every guest buffer is
// directly addressable by the device at its virtual address.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let claimed = NEXT_PAGE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
            next.checked_add(pages).filter(|&end| end <= ARENA_PAGES)
        });
        match claimed {
            Ok(first) => {
                // SAFETY: `first + pages <= ARENA_PAGES`, so the offset stays
                // inside the arena.
                let ptr = unsafe { ARENA.0.get().cast::<u8>().add(first * PAGE_SIZE) };
                // SAFETY: the pages were just claimed exclusively (above) and
                // lie inside the arena.
                unsafe { ptr.write_bytes(0, pages * PAGE_SIZE) };
                // Never null: it points into a static.
                let ptr = NonNull::new(ptr).unwrap_or(NonNull::dangling());
                (ptr.as_ptr() as PhysAddr, ptr)
            }
            // A zero physical address makes the driver report DmaError.
            Err(_) => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Bump allocation: pages are not reused (see the module comment).
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
