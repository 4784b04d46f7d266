//! virtio-blk (virtio 1.2, 5.2) over a raw host file.
//!
//! Every descriptor of a request is checked before anything is read or
//! written: its direction (device-readable ones first, then
//! device-writable), that it lies inside one guest memory region, and that
//! the lengths add up to what the request type needs. A chain with no
//! writable byte for the status is dropped (returned with used length 0);
//! every other malformed request gets VIRTIO_BLK_S_IOERR.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

use crate::cast::usize_from;

use super::{
    drain_queue, read_config_from, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
/// SECTOR_SIZE as the config space's 32-bit blk_size field.
const BLK_SIZE: u32 = 512;
const _: () = assert!(BLK_SIZE as u64 == SECTOR_SIZE);
const SECTOR_SHIFT: u32 = 9;
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of a GET_ID answer.
pub const SERIAL_LEN: usize = 20;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Segments per discard / write-zeroes request we accept.
const MAX_DISCARD_SEG: u32 = 32;
/// A descriptor chain longer than this is refused. The queue bounds
/// direct chains; this also bounds indirect tables.
const MAX_DESCRIPTORS: usize = 1024;
const REQUEST_HEADER_LEN: u64 = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;
const CONFIG_LEN: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {0}")]
    Open(String, #[source] io::Error),
    #[error("disk {0} is {1} bytes, not a whole number of 512-byte sectors")]
    Size(String, u64),
    #[error("disk serial {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("disk {path} is {found} bytes; the snapshot's guest knows it as {saved} bytes")]
    SizeChanged {
        path: String,
        saved: u64,
        found: u64,
    },
}

/// What the guest knows of a disk, for a snapshot. The backing path is not
/// part of it: a restore names the file (a clone's own copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity: u64,
    pub read_only: bool,
    pub serial: [u8; SERIAL_LEN],
}

/// A contiguous guest-memory piece of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// Why a request failed, decided before or during its execution.
#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    /// No writable byte for the status: the request cannot be answered.
    NoStatus,
    /// Malformed; answer IOERR.
    Malformed(&'static str),
    Unsupported,
    ReadOnly,
    Io,
}

/// A request whose descriptors passed the checks.
#[derive(Debug)]
struct Request {
    kind: u32,
    sector: u64,
    /// Device-readable bytes after the 16-byte header.
    data_out: Vec<Segment>,
    /// Device-writable bytes before the status byte.
    data_in: Vec<Segment>,
    status: GuestAddress,
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Drops the first `n` bytes of `segs`.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if n >= s.len {
            n -= s.len;
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + n),
            len: s.len - n,
        });
        n = 0;
    }
    out
}

/// Splits off the last byte of `segs`: (the rest, that byte's address).
fn split_last_byte(segs: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let mut rest = segs.to_vec();
    let last = rest.pop()?;
    let status = GuestAddress(last.addr.0 + last.len - 1);
    if last.len > 1 {
        rest.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    Some((rest, status))
}

fn read_segments(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == buf.len() {
            break;
        }
        let n = (buf.len() - at).min(usize_from(s.len));
        if mem.read_slice(&mut buf[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

/// Walks a chain and checks every descriptor.
/// On failure, says where the status byte is, if there is one.
fn parse<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<Request, (Option<GuestAddress>, RequestError)>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut malformed = None;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_DESCRIPTORS {
            malformed.get_or_insert("too many descriptors");
            break;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if seg.len == 0 {
            continue;
        }
        // The whole descriptor must be inside a single region of guest
        // memory; get_slice checks that without touching it.
        if mem.get_slice(seg.addr, usize_from(seg.len)).is_err() {
            malformed.get_or_insert("descriptor outside guest memory");
            continue;
        }
        if desc.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            malformed.get_or_insert("device-readable descriptor after a writable one");
        } else {
            readable.push(seg);
        }
    }
    let (data_in, status) = split_last_byte(&writable).ok_or((None, RequestError::NoStatus))?;
    if let Some(why) = malformed {
        // The status byte itself was checked with its descriptor.
        return Err((Some(status), RequestError::Malformed(why)));
    }
    let mut header = [0u8; usize_from(REQUEST_HEADER_LEN)];
    if total(&readable) < REQUEST_HEADER_LEN || !read_segments(mem, &readable, &mut header) {
        return Err((
            Some(status),
            RequestError::Malformed("request header too short"),
        ));
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok(Request {
        kind,
        sector: u64::from_le_bytes(sector),
        data_out: skip(&readable, REQUEST_HEADER_LEN),
        data_in,
        status,
    })
}

/// One virtio-blk disk.
pub struct Block {
    file: File,
    /// The same file without O_DIRECT, for requests whose buffers are not
    /// aligned enough for direct I/O. Linux keeps the two coherent for a
    /// single writer.
    buffered: Option<File>,
    capacity: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
}

impl Block {
    pub fn open(
        path: &Path,
        read_only: bool,
        direct: bool,
        serial: Option<&str>,
    ) -> Result<Self, BlockError> {
        let name = path.display().to_string();
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path).map_err(|e| BlockError::Open(name.clone(), e))
        };
        let file = open(direct)?;
        let buffered = if direct { Some(open(false)?) } else { None };
        // Seeking to the end sizes regular files and block devices alike
        // (a block device's metadata says 0).
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size(name, size));
        }
        let mut id = [0u8; SERIAL_LEN];
        if let Some(s) = serial {
            if s.len() > SERIAL_LEN {
                return Err(BlockError::SerialTooLong(s.to_string()));
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        Ok(Self::from_parts(file, buffered, size, read_only, id))
    }

    fn from_parts(
        file: File,
        buffered: Option<File>,
        capacity: u64,
        read_only: bool,
        serial: [u8; SERIAL_LEN],
    ) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut config = [0u8; CONFIG_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(capacity >> SECTOR_SHIFT).to_le_bytes()); // capacity
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &BLK_SIZE.to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &u32::MAX.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        put(48, &u32::MAX.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Block {
            file,
            buffered,
            capacity,
            read_only,
            serial,
            features,
            config,
            queue_sizes: [QUEUE_SIZE],
        }
    }

    /// Opens `path` as the disk a snapshot's guest had: same size, same
    /// read-only flag (the caller checked it), same serial.
    pub fn open_restored(
        path: &Path,
        state: &BlockState,
        direct: bool,
    ) -> Result<Self, BlockError> {
        let mut block = Self::open(path, state.read_only, direct, None)?;
        if block.capacity != state.capacity {
            return Err(BlockError::SizeChanged {
                path: path.display().to_string(),
                saved: state.capacity,
                found: block.capacity,
            });
        }
        block.serial = state.serial;
        Ok(block)
    }

    pub fn state(&self) -> BlockState {
        BlockState {
            capacity: self.capacity,
            read_only: self.read_only,
            serial: self.serial,
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity >> SECTOR_SHIFT
    }

    /// Serves one descriptor chain; returns the used length.
    fn process_chain<M>(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<M>,
    ) -> u32
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let (status_addr, result) = match parse(mem, chain) {
            Ok(req) => {
                let r = self.execute(mem, &req);
                (Some(req.status), r)
            }
            Err((status, e)) => (status, Err(e)),
        };
        if let Err(e) = &result {
            tracing::debug!(error = ?e, "virtio-blk request failed");
        }
        let Some(status_addr) = status_addr else {
            return 0;
        };
        let (status, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(RequestError::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        };
        // The status address was validated with its descriptor.
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    /// Runs a checked request; returns the bytes written to `data_in`.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<u64, RequestError> {
        match req.kind {
            VIRTIO_BLK_T_IN => {
                let len = total(&req.data_in);
                self.check_range(req.sector, len)?;
                self.transfer(mem, &req.data_in, req.sector << SECTOR_SHIFT, false)?;
                Ok(len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = total(&req.data_out);
                self.check_range(req.sector, len)?;
                self.transfer(mem, &req.data_out, req.sector << SECTOR_SHIFT, true)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|_| RequestError::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = SERIAL_LEN.min(usize_from(total(&req.data_in)));
                let mut at = 0usize;
                for s in &req.data_in {
                    if at == n {
                        break;
                    }
                    let k = (n - at).min(usize_from(s.len));
                    mem.write_slice(&self.serial[at..at + k], s.addr)
                        .map_err(|_| RequestError::Io)?;
                    at += k;
                }
                Ok(n as u64)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                self.discard(mem, req)?;
                Ok(0)
            }
            _ => Err(RequestError::Unsupported),
        }
    }

    fn check_range(&self, sector: u64, len: u64) -> Result<(), RequestError> {
        if len == 0 {
            return Err(RequestError::Malformed("no data"));
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Malformed("data length not a multiple of 512"));
        }
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| s.checked_add(len))
            .ok_or(RequestError::Malformed("sector overflow"))?;
        if end > self.capacity {
            return Err(RequestError::Malformed("beyond the end of the disk"));
        }
        Ok(())
    }

    fn discard(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<(), RequestError> {
        let len = total(&req.data_out);
        if len == 0 || !len.is_multiple_of(DISCARD_SEGMENT_LEN) {
            return Err(RequestError::Malformed(
                "discard payload not whole segments",
            ));
        }
        let count = len / DISCARD_SEGMENT_LEN;
        if count > u64::from(MAX_DISCARD_SEG) {
            return Err(RequestError::Malformed("too many discard segments"));
        }
        let mut payload = vec![0u8; usize_from(len)];
        if !read_segments(mem, &req.data_out, &mut payload) {
            return Err(RequestError::Io);
        }
        // Check every segment before changing anything.
        let mut ranges = Vec::with_capacity(usize_from(count));
        for seg in payload.chunks_exact(usize_from(DISCARD_SEGMENT_LEN)) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let allowed = if req.kind == VIRTIO_BLK_T_WRITE_ZEROES {
                WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(RequestError::Unsupported);
            }
            let bytes = u64::from(num) << SECTOR_SHIFT;
            if bytes > 0 {
                self.check_range(sector, bytes)?;
            }
            ranges.push((sector << SECTOR_SHIFT, bytes));
        }
        for (offset, bytes) in ranges {
            if bytes == 0 {
                continue;
            }
            // Both discard and write-zeroes punch a hole: it reads back as
            // zeros and gives the space back to the host.
            punch_hole(&self.file, offset, bytes).map_err(|_| RequestError::Io)?;
        }
        Ok(())
    }

    /// Moves `segs` to or from the file at `offset`.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        offset: u64,
        write: bool,
    ) -> Result<(), RequestError> {
        if segs.is_empty() {
            return Ok(());
        }
        let mut iovecs = Vec::with_capacity(segs.len());
        for s in segs {
            let slice = mem
                .get_slice(s.addr, usize_from(s.len))
                .map_err(|_| RequestError::Malformed("descriptor outside guest memory"))?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: usize_from(s.len),
            });
        }
        let direct_ok = self.buffered.is_some()
            && iovecs.iter().all(|v| {
                (v.iov_base as usize).is_multiple_of(usize_from(SECTOR_SIZE))
                    && v.iov_len.is_multiple_of(usize_from(SECTOR_SIZE))
            });
        let result = match (&self.buffered, direct_ok) {
            (Some(buffered), false) => rw_all(buffered, &mut iovecs, offset, write),
            (Some(buffered), true) => {
                let mut retry = iovecs.clone();
                match rw_all(&self.file, &mut iovecs, offset, write) {
                    // The file system wants more alignment than 512.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        rw_all(buffered, &mut retry, offset, write)
                    }
                    r => r,
                }
            }
            (None, _) => rw_all(&self.file, &mut iovecs, offset, write),
        };
        result.map_err(|_| RequestError::Io)
    }
}

/// The most iovecs one preadv/pwritev takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// preadv/pwritev until every byte moved. The iovecs point into guest
/// memory that stays mapped for as long as `mem` lives.
fn rw_all(file: &File, iovecs: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
    let mut start = 0usize;
    while start < iovecs.len() {
        let chunk = &iovecs[start..(start + IOV_MAX).min(iovecs.len())];
        let count = libc::c_int::try_from(chunk.len()).expect("at most IOV_MAX iovecs");
        // SAFETY: every iovec covers a range of guest memory that
        // GuestMemoryMmap::get_slice vouched for and that stays mapped
        // while the caller holds `mem`; the kernel only reads or writes
        // those bytes. The guest may change them concurrently, which is
        // harmless for a copy.
        let n = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    chunk.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    chunk.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // The file shrank under us.
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && start < iovecs.len() {
            let v = &mut iovecs[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing inside the same iovec, by less than its
                // length.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a file descriptor we own, with plain integers.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn state(&self) -> Option<super::DeviceState> {
        Some(super::DeviceState::Block(Block::state(self)))
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from(&self.config, offset, data);
    }

    fn process_queue(&mut self, mem: &GuestMemoryMmap, _index: usize, queue: &mut Queue) -> bool {
        // A driver that keeps refilling keeps only this disk's own thread
        // busy.
        drain_queue(mem, queue, |chain| Some(self.process_chain(mem, chain)))
    }
}

#[cfg(test)]
mod tests;
