//! Block devices: probing the virtio-mmio windows (network devices are
//! handed on to `net`) and the actions on disks.

use crate::hal::GuestHal;
use crate::{fatal, say, tsc};
use cocoon_test_guest::cmdline::{Escaped, MmioDevice};
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use sha2::{Digest, Sha256};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};

/// Bytes per request for hashing and the sequential read: large enough that
/// the benchmark measures the device rather than per-request guest overhead.
/// Under the instruction emulation of the test machines a request costs about
/// 0.9 ms whatever its size (a 512-byte read takes as long as a 128 KiB one),
/// so 1 MiB rather than the 64-128 KiB a hardware-virtualized guest would use.
pub const CHUNK: usize = 1024 * 1024;

/// A request that takes longer than this is taken as a dead device.
const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// Only the identity-mapped first 4 GiB can be touched.
const MAPPED_END: u64 = 1 << 32;

/// The one buffer all disk I/O goes through (device-visible at its address).
#[repr(C, align(4096))]
pub struct IoBuffer(UnsafeCell<[u8; CHUNK]>);

// SAFETY: the only access is through `io_buffer`, which hands out the single
// `&mut` once.
unsafe impl Sync for IoBuffer {}

// In .noinit (see hal.rs): every byte is written, by the device or by us,
// before it is read.
// SAFETY (link_section): as for the DMA arena in hal.rs.
#[unsafe(link_section = ".noinit.io_buffer")]
static IO_BUFFER: IoBuffer = IoBuffer(UnsafeCell::new([0; CHUNK]));
static IO_BUFFER_TAKEN: AtomicBool = AtomicBool::new(false);

/// The I/O buffer; `None` on any call after the first.
pub fn io_buffer() -> Option<&'static mut [u8; CHUNK]> {
    if IO_BUFFER_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the flag above lets exactly one caller through, so this is the
    // only reference ever made to the buffer.
    Some(unsafe { &mut *IO_BUFFER.0.get() })
}

/// One probed virtio-blk device.
pub struct Disk {
    pub index: usize,
    pub addr: u64,
    blk: VirtIOBlk<GuestHal, MmioTransport<'static>>,
}

/// What a `virtio_mmio.device=` window turned out to be.
#[allow(
    clippy::large_enum_variant,
    reason = "no allocator to box into; made once per device and moved straight into place"
)]
pub enum Probe {
    /// A block device: it takes the next disk index whether or not the driver
    /// could set it up, so later indices stay what the host configured.
    Block(Result<Disk, VirtioError>),
    /// A network device, for `net::probe`; it takes no disk index.
    Net(MmioTransport<'static>),
    /// Not usable as a disk; the reason has no spaces.
    Skip(&'static str),
}

/// Looks at one window. `seen` holds the windows probed before it: two
/// transports over one window would alias the device's registers.
pub fn probe(device: &MmioDevice, seen: &[MmioDevice], index: usize) -> Probe {
    let end = device.addr.checked_add(device.size);
    if device.addr == 0 || !device.addr.is_multiple_of(4) || end.is_none_or(|e| e > MAPPED_END) {
        return Probe::Skip("out-of-range");
    }
    if seen
        .iter()
        .any(|s| s.addr < device.addr + device.size && device.addr < s.addr + s.size)
    {
        return Probe::Skip("overlaps-another-device");
    }
    let Some(header) = NonNull::new(device.addr as *mut VirtIOHeader) else {
        return Probe::Skip("out-of-range");
    };
    // SAFETY: the window is below 4 GiB (identity mapped, uncached), aligned,
    // overlaps no other window we drive, and the host put a virtio-mmio
    // device there for the life of the VM; nothing else in the guest touches it.
    let transport = match unsafe { MmioTransport::new(header, device.size as usize) } {
        Ok(t) => t,
        Err(MmioError::BadMagic(_)) => return Probe::Skip("bad-magic"),
        Err(MmioError::UnsupportedVersion(_)) => return Probe::Skip("unsupported-version"),
        // Device ID 0: a transport with no device behind it.
        Err(MmioError::InvalidDeviceID(_)) => return Probe::Skip("no-device"),
        Err(MmioError::MmioRegionTooSmall) => return Probe::Skip("window-too-small"),
    };
    match transport.device_type() {
        DeviceType::Block => {}
        DeviceType::Network => return Probe::Net(transport),
        _ => return Probe::Skip("not-block"),
    }
    Probe::Block(VirtIOBlk::new(transport).map(|blk| Disk {
        index,
        addr: device.addr,
        blk,
    }))
}

impl Disk {
    pub fn capacity_sectors(&self) -> u64 {
        self.blk.capacity()
    }

    pub fn readonly(&self) -> bool {
        self.blk.readonly()
    }

    /// The GET_ID string, NULs trimmed; empty when the device has none.
    pub fn serial(&mut self) -> Result<([u8; 20], usize), VirtioError> {
        let mut id = [0u8; 20];
        match self.blk.device_id(&mut id) {
            Ok(len) => Ok((id, len)),
            Err(VirtioError::Unsupported) => Ok((id, 0)),
            Err(e) => Err(e),
        }
    }

    /// Prints the `disk` line.
    pub fn report(&mut self) {
        let (id, len) = self.serial().unwrap_or_else(|e| {
            say!("error disk index={} GET_ID failed: {e}", self.index);
            ([0; 20], 0)
        });
        say!(
            "disk index={} addr={:#x} capacity_sectors={} serial={} ro={}",
            self.index,
            self.addr,
            self.capacity_sectors(),
            Serial(&id[..len]),
            u8::from(self.readonly()),
        );
    }

    /// Errors unless `count` sectors from `sector` are on the disk.
    fn check_range(&self, sector: u64, count: u64) -> Result<(), &'static str> {
        match sector.checked_add(count) {
            Some(end) if end <= self.capacity_sectors() => Ok(()),
            _ => Err("range beyond the disk's capacity"),
        }
    }

    /// Reads whole sectors from `sector` into `buf`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        let mut req = BlkReq::default();
        let mut resp = BlkResp::default();
        // SAFETY: req, buf and resp are not touched until the request
        // completes: `wait` either sees it complete or powers off without
        // returning, so the device never writes into a dead stack frame.
        let token = unsafe {
            self.blk
                .read_blocks_nb(sector as usize, &mut req, buf, &mut resp)?
        };
        self.wait(token);
        // SAFETY: the same buffers as passed to read_blocks_nb, and the
        // request is complete.
        unsafe { self.blk.complete_read_blocks(token, &req, buf, &mut resp) }
    }

    /// Writes whole sectors from `buf` at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), VirtioError> {
        let mut req = BlkReq::default();
        let mut resp = BlkResp::default();
        // SAFETY: as in `read`.
        let token = unsafe {
            self.blk
                .write_blocks_nb(sector as usize, &mut req, buf, &mut resp)?
        };
        self.wait(token);
        // SAFETY: as in `read`.
        unsafe { self.blk.complete_write_blocks(token, &req, buf, &mut resp) }
    }

    /// Polls the used ring for `token`. A device that does not answer in
    /// time, or answers with another request, ends the run: the request's
    /// buffers would otherwise be left to a device that may still write them.
    fn wait(&mut self, token: u16) {
        // With no known TSC frequency, assume 3 GHz: the timeout is a guard,
        // not a measurement.
        let khz = tsc::khz().unwrap_or(3_000_000);
        let deadline = tsc::now().saturating_add(khz.saturating_mul(REQUEST_TIMEOUT_MS));
        loop {
            match self.blk.peek_used() {
                Some(t) if t == token => return,
                Some(t) => fatal(format_args!(
                    "disk index={} completed request {t} while waiting for {token}",
                    self.index
                )),
                None => {}
            }
            if tsc::now() > deadline {
                fatal(format_args!("disk index={} request timed out", self.index));
            }
            core::hint::spin_loop();
        }
    }

    /// `cocoon.hash`: sha256 of `count` sectors from `sector`.
    pub fn hash(&mut self, sector: u64, count: u64, buf: &mut [u8; CHUNK]) {
        let fail = |what: &dyn core::fmt::Display| {
            say!(
                "error hash index={} sector={sector} count={count}: {what}",
                self.index
            )
        };
        if let Err(e) = self.check_range(sector, count) {
            return fail(&e);
        }
        let mut hasher = Sha256::new();
        let mut next = sector;
        let end = sector + count;
        while next < end {
            let sectors = (end - next).min((CHUNK / SECTOR_SIZE) as u64);
            let chunk = &mut buf[..sectors as usize * SECTOR_SIZE];
            if let Err(e) = self.read(next, chunk) {
                return say!(
                    "error hash index={} sector={sector} count={count}: read at sector {next}: {e}",
                    self.index
                );
            }
            hasher.update(&*chunk);
            next += sectors;
        }
        say!(
            "hash index={} sector={sector} count={count} sha256={}",
            self.index,
            Hex(&hasher.finalize())
        );
    }

    /// `cocoon.write`: one sector of `byte`, then a flush. Failure is an
    /// expected outcome (read-only disks), so it is reported, not an error.
    pub fn write_sector(&mut self, sector: u64, byte: u8, buf: &mut [u8; CHUNK]) {
        let data = &mut buf[..SECTOR_SIZE];
        data.fill(byte);
        let result = self.write(sector, data).and_then(|()| self.blk.flush());
        say!(
            "write index={} sector={sector} byte={byte:02x} outcome={}",
            self.index,
            if result.is_ok() { "ok" } else { "error" }
        );
    }

    /// `cocoon.seqread`: reads `bytes` from sector 0 in CHUNK requests, one
    /// at a time, and reports the elapsed time.
    pub fn seqread(&mut self, bytes: u64, buf: &mut [u8; CHUNK]) {
        let Some(khz) = tsc::khz() else {
            return say!(
                "error seqread index={} bytes={bytes}: TSC frequency unknown",
                self.index
            );
        };
        let sectors = bytes / SECTOR_SIZE as u64;
        if let Err(e) = self.check_range(0, sectors) {
            return say!("error seqread index={} bytes={bytes}: {e}", self.index);
        }
        let start = tsc::now();
        let mut next = 0;
        while next < sectors {
            let n = (sectors - next).min((CHUNK / SECTOR_SIZE) as u64);
            if let Err(e) = self.read(next, &mut buf[..n as usize * SECTOR_SIZE]) {
                return say!(
                    "error seqread index={} bytes={bytes}: read at sector {next}: {e}",
                    self.index
                );
            }
            next += n;
        }
        let ns = tsc::ticks_to_ns(tsc::now() - start, khz);
        say!("seqread index={} bytes={bytes} ns={ns}", self.index);
    }
}

/// Lower-case hex.
struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A serial as a space-free token: printable ASCII as is, the rest `\xNN`.
struct Serial<'a>(&'a [u8]);

impl core::fmt::Display for Serial<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0 {
            if b == b' ' {
                f.write_str("\\x20")?;
            } else {
                write!(f, "{}", Escaped(&[b]))?;
            }
        }
        Ok(())
    }
}
