//! Request handling against virtio-queue's mock queue: well-formed requests
//! do what they say, malformed chains get an error status or are dropped,
//! and nothing panics or touches memory outside the guest.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: usize = 0x100_0000; // 16 MiB
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Status bytes start as this, so "untouched" is visible.
const POISON: u8 = 0xee;

struct Fixture {
    mem: GuestMemoryMmap,
    file: tempfile::NamedTempFile,
    block: Block,
}

/// The disk's contents: byte `i` is `i % 251` (a prime, so no two
/// sectors match).
fn pattern_byte(i: usize) -> u8 {
    u8::try_from(i % 251).unwrap()
}

fn fixture_with(disk_len: usize, read_only: bool, direct: bool, serial: Option<&str>) -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..disk_len).map(pattern_byte).collect();
    file.write_all(&pattern).unwrap();
    file.flush().unwrap();
    let block = Block::open(file.path(), read_only, direct, serial).unwrap();
    mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    Fixture { mem, file, block }
}

fn fixture() -> Fixture {
    fixture_with(64 * 1024, false, false, Some("disk-serial-0"))
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Runs one chain (descriptors linked in order) through the device.
fn run(f: &mut Fixture, descs: &[RawDescriptor]) -> u32 {
    let vq = MockSplitQueue::new(&f.mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    f.block.process_chain(&f.mem, chain)
}

fn status(f: &Fixture) -> u8 {
    f.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn file_bytes(f: &Fixture) -> Vec<u8> {
    let mut v = Vec::new();
    let mut file = f.file.reopen().unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn read_returns_file_data() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_IN, 3);
    let used = run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 1024, F_WRITE), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(used, 1025);
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 1024];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, file_bytes(&f)[3 * 512..5 * 512]);
}

#[test]
fn write_lands_in_file_across_split_descriptors() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_OUT, 1);
    f.mem.write_slice(&[0xab; 300], GuestAddress(DATA)).unwrap();
    f.mem
        .write_slice(&[0xcd; 212], GuestAddress(DATA + 0x1000))
        .unwrap();
    // The header and first data bytes share one descriptor.
    f.mem
        .write_slice(&[0x11; 512], GuestAddress(HDR + 16))
        .unwrap();
    let used = run(
        &mut f,
        &[
            d(HDR, 16 + 512, 0),
            d(DATA, 300, 0),
            d(DATA + 0x1000, 212, 0),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    let bytes = file_bytes(&f);
    assert!(bytes[512..1024].iter().all(|b| *b == 0x11));
    assert!(bytes[1024..1324].iter().all(|b| *b == 0xab));
    assert!(bytes[1324..1536].iter().all(|b| *b == 0xcd));
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_GET_ID, 0);
    f.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let used = run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 20, F_WRITE), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(used, 21);
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-0");
    assert!(id[13..].iter().all(|b| *b == 0));
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let e = Block::open(file.path(), false, false, Some("012345678901234567890"))
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::SerialTooLong(_)));
}

#[test]
fn flush_and_unknown_types() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, F_WRITE)]), 1);
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    header(&f.mem, 0x7777, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, F_WRITE)]), 1);
    assert_eq!(status(&f), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn read_only_disk_refuses_writes_and_discards() {
    let mut f = fixture_with(64 * 1024, true, false, None);
    assert_ne!(f.block.features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f.block.features() & VIRTIO_BLK_F_DISCARD, 0);
    let before = file_bytes(&f);
    header(&f.mem, VIRTIO_BLK_T_OUT, 0);
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.mem
        .write_slice(&discard_segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&f), before);
    // Reads still work.
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 512, F_WRITE), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
}

// Malformed chains.

#[test]
fn header_outside_guest_memory_is_an_error() {
    let mut f = fixture();
    let used = run(
        &mut f,
        &[d(MEM_SIZE as u64 - 8, 16, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
}

#[test]
fn data_outside_guest_memory_is_an_error_and_the_file_is_untouched() {
    let mut f = fixture();
    let before = file_bytes(&f);
    header(&f.mem, VIRTIO_BLK_T_OUT, 0);
    run(
        &mut f,
        &[
            d(HDR, 16, 0),
            d(u64::MAX - 100, 512, 0),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f,
        &[
            d(HDR, 16, 0),
            d(MEM_SIZE as u64, 512, F_WRITE),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&f), before);
}

#[test]
fn huge_lengths_are_errors() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f,
        &[
            d(HDR, 16, 0),
            d(DATA, 0x8000_0000, F_WRITE),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    // A chain longer than 4 GiB in total is cut where it overflows, before
    // the status: dropped.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    let used = run(
        &mut f,
        &[
            d(HDR, 16, 0),
            d(DATA, u32::MAX, F_WRITE),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(used, 0);
    assert_eq!(status(&f), POISON);
    // A sector whose byte offset overflows u64.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_IN, u64::MAX / 2);
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 512, F_WRITE), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    // One sector past the end.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_IN, 128);
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 512, F_WRITE), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
}

#[test]
fn wrong_directions_are_errors_or_dropped() {
    let mut f = fixture();
    // Read data in a device-readable buffer: the device cannot write it.
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    f.mem.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    let mut data = [0u8; 512];
    f.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(
        data.iter().all(|b| *b == 0x42),
        "a readable buffer was written"
    );
    // A readable descriptor after a writable one.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f,
        &[
            d(HDR, 16, 0),
            d(DATA, 512, F_WRITE),
            d(DATA + 0x1000, 512, 0),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    // A device-writable header.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    run(&mut f, &[d(HDR, 16, F_WRITE), d(STATUS, 1, F_WRITE)]);
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    // A device-readable status: nowhere to answer, the request is dropped.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, 0)]), 0);
    assert_eq!(status(&f), POISON);
}

#[test]
fn status_buffers_of_the_wrong_size() {
    let mut f = fixture();
    // Zero bytes: dropped.
    header(&f.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 0, F_WRITE)]), 0);
    assert_eq!(status(&f), POISON);
    // Two bytes after a read: 513 data bytes are not whole sectors.
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    f.mem.write_obj(POISON, GuestAddress(STATUS + 1)).unwrap();
    let used = run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 512, F_WRITE), d(STATUS, 2, F_WRITE)],
    );
    assert_eq!(used, 1);
    let last: u8 = f.mem.read_obj(GuestAddress(STATUS + 1)).unwrap();
    assert_eq!(last, VIRTIO_BLK_S_IOERR);
    // A status that runs off the end of guest memory.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(MEM_SIZE as u64 - 1, 4, F_WRITE)]),
        0
    );
}

#[test]
fn short_header_is_an_error() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    run(
        &mut f,
        &[d(HDR, 8, 0), d(DATA, 512, F_WRITE), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    run(&mut f, &[d(STATUS, 1, F_WRITE)]);
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
}

#[test]
fn descriptor_loops_terminate() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&f.mem, 16);
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, F_WRITE | F_NEXT, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE | F_NEXT, 1)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&f.mem).unwrap();
    let used = f.block.process_chain(&f.mem, chain);
    // The chain is cut at the queue size; whatever the device makes of
    // the remains, it is an error, not a success or a hang.
    assert!(used <= 1);
    assert_ne!(status(&f), VIRTIO_BLK_S_OK);
}

#[test]
fn process_queue_completes_requests_and_honours_event_idx() {
    let mut f = fixture();
    header(&f.mem, VIRTIO_BLK_T_GET_ID, 0);
    let vq = MockSplitQueue::new(&f.mem, 16);
    let descs = [d(HDR, 16, 0), d(DATA, 20, F_WRITE), d(STATUS, 1, F_WRITE)];
    let mut linked = Vec::new();
    for (i, raw) in descs.iter().enumerate() {
        let s = SplitDescriptor::from(*raw);
        let flags = if i + 1 < descs.len() {
            s.flags() | F_NEXT
        } else {
            s.flags()
        };
        linked.push(RawDescriptor::from(SplitDescriptor::new(
            s.addr().0,
            s.len(),
            flags,
            u16::try_from(i + 1).unwrap(),
        )));
    }
    vq.add_desc_chains(&linked, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    let notify = f.block.process_queue(&f.mem, 0, &mut q);
    assert!(notify);
    assert_eq!(vq.used().idx().load(), 1);
    let elem = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!(elem.id(), 0);
    assert_eq!(elem.len(), 21);
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    // Nothing new: no interrupt.
    assert!(!f.block.process_queue(&f.mem, 0, &mut q));
}

#[test]
fn bogus_avail_index_does_not_panic() {
    let mut f = fixture();
    let vq = MockSplitQueue::new(&f.mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    // Claims 1000 new entries in a 16-entry ring.
    vq.avail().idx().store(1000);
    f.block.process_queue(&f.mem, 0, &mut q);
    assert_eq!(vq.used().idx().load(), 0);
}

// Discard and write-zeroes.

fn discard_segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

fn data_after(file: &std::fs::File, offset: i64) -> i64 {
    // SAFETY: lseek on an fd we own.
    unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) }
}

fn hole_after(file: &std::fs::File, offset: i64) -> i64 {
    // SAFETY: lseek on an fd we own.
    unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_HOLE) }
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    const MIB: usize = 1 << 20;
    let mut f = fixture_with(4 * MIB, false, false, None);
    f.file.as_file().sync_all().unwrap();
    let file = f.file.reopen().unwrap();
    let blocks_before = file.metadata().unwrap().blocks();
    // Fully written: the first hole is at the end.
    assert_eq!(hole_after(&file, 0), 4 * MIB as i64);

    // Discard the first MiB and write-zeroes (unmap) the third.
    header(&f.mem, VIRTIO_BLK_T_DISCARD, 0);
    f.mem
        .write_slice(&discard_segment(0, 2048, 0), GuestAddress(DATA))
        .unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.mem
        .write_slice(
            &discard_segment(4096, 2048, WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(DATA),
        )
        .unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);

    assert_eq!(hole_after(&file, 0), 0);
    assert_eq!(data_after(&file, 0), MIB as i64);
    assert_eq!(hole_after(&file, MIB as i64), 2 * MIB as i64);
    assert_eq!(data_after(&file, 2 * MIB as i64), 3 * MIB as i64);
    let blocks_after = file.metadata().unwrap().blocks();
    assert!(
        blocks_after + 2 * 2048 <= blocks_before,
        "{blocks_before} -> {blocks_after}"
    );
    assert_eq!(file.metadata().unwrap().len(), 4 * MIB as u64);
    let bytes = file_bytes(&f);
    assert!(bytes[..MIB].iter().all(|b| *b == 0));
    assert!(bytes[2 * MIB..3 * MIB].iter().all(|b| *b == 0));
    assert_eq!(bytes[MIB + 7], pattern_byte(MIB + 7));
}

#[test]
fn bad_discards_change_nothing() {
    let mut f = fixture();
    let before = file_bytes(&f);
    // Second segment beyond the end: the first must not be applied either.
    header(&f.mem, VIRTIO_BLK_T_DISCARD, 0);
    let mut payload = discard_segment(0, 8, 0).to_vec();
    payload.extend_from_slice(&discard_segment(120, 16, 0));
    f.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    // Unmap flag on a discard is not defined.
    f.mem
        .write_slice(&discard_segment(0, 8, 1), GuestAddress(DATA))
        .unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_UNSUPP);
    // A payload that is not whole segments.
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 15, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&f), before);
}

#[test]
fn direct_io_reads_and_writes_aligned_and_unaligned_buffers() {
    let mut f = fixture_with(64 * 1024, false, true, None);
    // Aligned buffer: goes through O_DIRECT.
    header(&f.mem, VIRTIO_BLK_T_OUT, 8);
    f.mem
        .write_slice(&[0x77; 4096], GuestAddress(DATA))
        .unwrap();
    run(
        &mut f,
        &[d(HDR, 16, 0), d(DATA, 4096, 0), d(STATUS, 1, F_WRITE)],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    // Unaligned guest buffer: served through the buffered descriptor.
    f.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    header(&f.mem, VIRTIO_BLK_T_IN, 8);
    run(
        &mut f,
        &[
            d(HDR, 16, 0),
            d(DATA + 0x10003, 4096, F_WRITE),
            d(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&f), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 4096];
    f.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x10003))
        .unwrap();
    assert!(got.iter().all(|b| *b == 0x77));
    assert!(file_bytes(&f)[4096..8192].iter().all(|b| *b == 0x77));
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let f = fixture();
    let mut cap = [0u8; 8];
    f.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut seg = [0u8; 4];
    f.block.read_config(40, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), MAX_DISCARD_SEG);
    // Past the end reads zero.
    let mut past = [0xffu8; 8];
    f.block.read_config(58, &mut past);
    assert_eq!(past, [0; 8]);
    f.block.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 8]);
}
