//! The device against virtio-queue's mock driver and a fake tap: frames
//! go through intact, malformed chains and buffers that are too small,
//! outside guest memory or of the wrong direction are dropped with a
//! counter, never a panic, and the device carries on afterwards.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::header::*;
use super::*;

const MEM_SIZE: usize = 0x100_0000; // 16 MiB
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const BUF: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

#[derive(Default)]
struct Wire {
    /// Frames (header first) the tap has for the guest.
    inbox: VecDeque<Vec<u8>>,
    /// Frames the device sent.
    sent: Vec<Vec<u8>>,
    offloads: Vec<u32>,
    would_block: bool,
    refuse: bool,
}

struct FakeTap {
    wire: Arc<Mutex<Wire>>,
    offload: bool,
}

impl Backend for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut w = self.wire.lock().unwrap();
        let frame = w
            .inbox
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        // As tun does: the full length even if the buffer cut it.
        Ok(frame.len())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        let mut w = self.wire.lock().unwrap();
        if w.would_block {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if w.refuse {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        w.sent.push(frame.to_vec());
        Ok(frame.len())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.wire.lock().unwrap().offloads.push(flags);
        Ok(())
    }

    fn supports_offload(&self) -> bool {
        self.offload
    }
}

/// A chain as the driver posts it: (addr, len, flags) per descriptor.
type Chain = Vec<(u64, u32, u16)>;

/// The driver side of one queue: posts chains, reads the used ring.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    queue: Queue,
    /// The used ring, a page after the mock's avail ring: the mock places
    /// its own used ring over the avail ring's used_event field.
    used_addr: GuestAddress,
    next_desc: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, at: u64, size: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(at), size);
        let mut queue = vq.create_queue::<Queue>().unwrap();
        let used_addr = GuestAddress(at + 0x8000);
        let [lo, hi] =
            [used_addr.0 & 0xffff_ffff, used_addr.0 >> 32].map(|v| u32::try_from(v).unwrap());
        queue.set_used_ring_address(Some(lo), Some(hi));
        Driver {
            mem,
            vq,
            queue,
            used_addr,
            next_desc: 0,
            size,
        }
    }

    /// Posts one chain of (addr, len, flags) descriptors.
    fn post(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == chain.len();
                let (flags, next) = if last {
                    (flags, 0)
                } else {
                    (
                        flags | F_NEXT,
                        (head + u16::try_from(i).unwrap() + 1) % self.size,
                    )
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&descs, head).unwrap();
        self.next_desc = (head + u16::try_from(chain.len()).unwrap()) % self.size;
        head
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.used_addr.unchecked_add(2))
            .unwrap()
    }

    /// The used entry `i`: (head, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = self
            .used_addr
            .unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    /// avail_event, where the device says when it wants a notification.
    fn avail_event(&self) -> u16 {
        let at = self.used_addr.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj(at).unwrap()
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    wire: Arc<Mutex<Wire>>,
    net: Net,
}

fn fixture_with(offload: bool, acked: u64) -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let wire = Arc::new(Mutex::new(Wire::default()));
    let mut net = Net::new(
        Box::new(FakeTap {
            wire: wire.clone(),
            offload,
        }),
        MAC,
    );
    assert!(net.activate(acked | VIRTIO_F_VERSION_1));
    Fixture { mem, wire, net }
}

fn fixture() -> Fixture {
    fixture_with(true, 0)
}

/// A test buffer's length as a descriptor's.
fn len32(b: &[u8]) -> u32 {
    u32::try_from(b.len()).unwrap()
}

/// An Ethernet frame of `len` bytes with a recognisable payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(7) ^ seed)
        .collect();
    f[..6].copy_from_slice(&MAC);
    f
}

fn with_header(hdr: NetHdr, body: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn stats(f: &Fixture) -> NetStats {
    f.net.counters().stats()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

// ---- transmit ----

#[test]
fn tx_sends_a_frame_split_over_descriptors() {
    let mut f = fixture();
    let body = frame(1514, 1);
    let packet = with_header(NetHdr::default(), &body);
    f.mem.write_slice(&packet[..20], GuestAddress(BUF)).unwrap();
    f.mem
        .write_slice(&packet[20..], GuestAddress(BUF + 0x1000))
        .unwrap();
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, 20, 0), (BUF + 0x1000, len32(&packet) - 20, 0)]);
    f.net.process_queue(&f.mem, TX_QUEUE, &mut d.queue);
    assert_eq!(f.wire.lock().unwrap().sent, vec![packet]);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 0));
    let s = stats(&f);
    assert_eq!((s.tx_frames, s.tx_bytes), (1, 1514));
}

#[test]
fn tx_malformed_chains_are_dropped_and_counted() {
    let mut f = fixture_with(true, F_CSUM);
    let good = with_header(NetHdr::default(), &frame(60, 2));
    f.mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 32);
    let outside = MEM_SIZE as u64 - 8;
    // (chain, which counter it lands in)
    let cases: Vec<(Chain, &str)> = vec![
        (vec![(BUF, 72, F_WRITE)], "bad_chains"),
        (vec![(BUF, 12, 0), (BUF + 12, 60, F_WRITE)], "bad_chains"),
        (vec![(BUF, 12, 0), (outside, 60, 0)], "bad_chains"),
        (vec![(u64::MAX - 4, 16, 0)], "bad_chains"),
        (vec![(BUF, 8, 0)], "bad_chains"),
        (vec![(BUF, 0, 0)], "bad_chains"),
        // More than a header and the largest frame, all inside memory.
        (
            vec![(BUF, 0x8000, 0), (BUF + 0x8000, 0x8000, 0), (BUF, 0x100, 0)],
            "oversize",
        ),
    ];
    for (chain, _) in &cases {
        d.post(chain);
    }
    // A header the acked features forbid: DATA_VALID on transmit.
    let mut bad_hdr = good.clone();
    bad_hdr[0] = FLAG_DATA_VALID;
    f.mem
        .write_slice(&bad_hdr, GuestAddress(BUF + 0x2_0000))
        .unwrap();
    d.post(&[(BUF + 0x2_0000, len32(&bad_hdr), 0)]);
    // A checksum that points past the frame.
    let mut bad_csum = good.clone();
    bad_csum[..HDR_LEN].copy_from_slice(
        &NetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 50,
            csum_offset: 16,
            ..NetHdr::default()
        }
        .to_bytes(),
    );
    f.mem
        .write_slice(&bad_csum, GuestAddress(BUF + 0x3_0000))
        .unwrap();
    d.post(&[(BUF + 0x3_0000, len32(&bad_csum), 0)]);
    // And then a good frame still goes out.
    d.post(&[(BUF, len32(&good), 0)]);

    f.net.process_queue(&f.mem, TX_QUEUE, &mut d.queue);
    let total = u16::try_from(cases.len()).unwrap() + 3;
    assert_eq!(d.used_idx(), total, "every chain is returned");
    for i in 0..total {
        assert_eq!(d.used(i).1, 0);
    }
    assert_eq!(f.wire.lock().unwrap().sent, vec![good]);
    let s = stats(&f);
    let bad = cases.iter().filter(|c| c.1 == "bad_chains").count() as u64;
    assert_eq!(s.tx_bad_chains, bad);
    assert_eq!(s.tx_dropped_oversize, 1);
    assert_eq!(s.tx_dropped_bad_header, 2);
    assert_eq!(s.tx_frames, 1);
}

#[test]
fn tx_gso_needs_the_acked_feature() {
    let gso = with_header(
        NetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..NetHdr::default()
        },
        &frame(9000, 3),
    );
    for (acked, sent) in [(F_CSUM, 0), (F_CSUM | F_HOST_TSO4, 1)] {
        let mut f = fixture_with(true, acked);
        f.mem.write_slice(&gso, GuestAddress(BUF)).unwrap();
        let mem = f.mem.clone();
        let mut d = Driver::new(&mem, 0, 16);
        d.post(&[(BUF, len32(&gso), 0)]);
        f.net.process_queue(&f.mem, TX_QUEUE, &mut d.queue);
        assert_eq!(f.wire.lock().unwrap().sent.len(), sent, "{acked:#x}");
        assert_eq!(stats(&f).tx_dropped_bad_header, 1 - sent as u64);
    }
}

#[test]
fn tx_waits_for_a_full_tap_and_counts_a_refusing_one() {
    let mut f = fixture();
    let good = with_header(NetHdr::default(), &frame(100, 4));
    f.mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, len32(&good), 0)]);
    d.post(&[(BUF, len32(&good), 0)]);
    f.wire.lock().unwrap().would_block = true;
    f.net.process_queue(&f.mem, TX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 0, "the chain stays with the device");
    assert!(f.net.tx_blocked);
    f.wire.lock().unwrap().would_block = false;
    // The tap became writable: the device event resumes the queue.
    let tx = std::mem::replace(&mut d.queue, Queue::new(16).unwrap());
    let mut queues = vec![Queue::new(16).unwrap(), tx];
    f.net.process_event(&f.mem, &mut queues);
    d.queue = queues.pop().unwrap();
    assert_eq!(d.used_idx(), 2);
    assert_eq!(f.wire.lock().unwrap().sent.len(), 2);
    // A tap that refuses (down): dropped, counted, chain returned.
    f.wire.lock().unwrap().refuse = true;
    d.post(&[(BUF, len32(&good), 0)]);
    f.net.process_queue(&f.mem, TX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 3);
    assert_eq!(stats(&f).tx_tap_errors, 1);
    assert_eq!(stats(&f).tx_frames, 2);
}

// ---- receive ----

fn push_rx(f: &Fixture, packet: Vec<u8>) {
    f.wire.lock().unwrap().inbox.push_back(packet);
}

#[test]
fn rx_delivers_a_frame_with_num_buffers_1() {
    let mut f = fixture();
    let body = frame(1000, 5);
    push_rx(&f, with_header(NetHdr::default(), &body));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, 600, F_WRITE), (BUF + 0x1000, 1526 - 600, F_WRITE)]);
    assert!(f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue));
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 1012));
    let mut got = read(&f.mem, BUF, 600);
    got.extend(read(&f.mem, BUF + 0x1000, 412));
    let hdr = NetHdr::parse(got[..HDR_LEN].try_into().unwrap());
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(&got[HDR_LEN..], &body[..]);
    let s = stats(&f);
    assert_eq!((s.rx_frames, s.rx_bytes), (1, 1000));
}

#[test]
fn rx_frame_waits_for_buffers_and_is_not_dropped() {
    let mut f = fixture();
    let first = frame(200, 6);
    let second = frame(300, 7);
    push_rx(&f, with_header(NetHdr::default(), &first));
    push_rx(&f, with_header(NetHdr::default(), &second));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    // The tap has frames, the guest no buffers: nothing happens.
    assert!(!f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue));
    assert_eq!(d.used_idx(), 0);
    // One buffer: the first frame; the second waits in the tap.
    d.post(&[(BUF, 1526, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(&read(&f.mem, BUF + 12, 200), &first);
    d.post(&[(BUF + 0x1000, 1526, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used(1), (1, 312));
    assert_eq!(&read(&f.mem, BUF + 0x1000 + 12, 300), &second);
    let s = stats(&f);
    assert_eq!(s.rx_frames, 2);
    assert_eq!(s.rx_dropped_too_big + s.rx_bad_chains, 0);
}

#[test]
fn rx_unusable_chains_are_returned_empty_and_counted() {
    let mut f = fixture();
    let body = frame(100, 8);
    push_rx(&f, with_header(NetHdr::default(), &body));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    let outside = MEM_SIZE as u64 - 100;
    let bad: [&[(u64, u32, u16)]; 5] = [
        // Device-readable: the wrong direction.
        &[(BUF, 1526, 0)],
        &[(BUF, 12, F_WRITE), (BUF + 0x1000, 1514, 0)],
        &[(outside, 1526, F_WRITE)],
        &[(u64::MAX - 100, 1526, F_WRITE)],
        // No room for the header.
        &[(BUF, 8, F_WRITE)],
    ];
    for chain in bad {
        d.post(chain);
    }
    d.post(&[(BUF + 0x4000, 1526, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 6);
    for i in 0..5 {
        assert_eq!(d.used(i).1, 0, "chain {i}");
    }
    assert_eq!(d.used(5).1, 112);
    assert_eq!(&read(&f.mem, BUF + 0x4000 + 12, 100), &body);
    let s = stats(&f);
    assert_eq!((s.rx_bad_chains, s.rx_frames), (5, 1));
}

#[test]
fn rx_bad_chains_are_returned_even_while_the_frame_waits() {
    let mut f = fixture();
    push_rx(&f, with_header(NetHdr::default(), &frame(100, 9)));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, 1526, 0)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 0));
    assert_eq!(stats(&f).rx_bad_chains, 1);
    assert!(f.net.pending.is_some(), "the frame waits for a real buffer");
}

#[test]
fn rx_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut f = fixture();
    let small = frame(80, 10);
    push_rx(&f, with_header(NetHdr::default(), &frame(1000, 11)));
    push_rx(&f, with_header(NetHdr::default(), &small));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, 500, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    // The big frame went; the same buffer took the small one.
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 92));
    assert_eq!(&read(&f.mem, BUF + 12, 80), &small);
    let s = stats(&f);
    assert_eq!((s.rx_dropped_too_big, s.rx_frames), (1, 1));
}

#[test]
fn rx_merged_buffers_publish_a_frame_at_once() {
    let mut f = fixture_with(true, F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX);
    let body = frame(3000, 12);
    push_rx(&f, with_header(NetHdr::default(), &body));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, 1024, F_WRITE)]);
    d.post(&[(BUF + 0x1000, 1024, F_WRITE)]);
    // Two buffers are not enough: nothing is published, nothing consumed,
    // and the driver is asked to notify once it posts a third.
    d.queue.set_event_idx(true);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(d.queue.next_avail(), 0);
    assert_eq!(d.avail_event(), 2);
    d.post(&[(BUF + 0x2000, 1024, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 3);
    assert_eq!(
        (0..3).map(|i| d.used(i)).collect::<Vec<_>>(),
        vec![(0, 1024), (1, 1024), (2, 3012 - 2048)]
    );
    let mut got = read(&f.mem, BUF, 1024);
    got.extend(read(&f.mem, BUF + 0x1000, 1024));
    got.extend(read(&f.mem, BUF + 0x2000, 3012 - 2048));
    assert_eq!(NetHdr::parse(got[..12].try_into().unwrap()).num_buffers, 3);
    assert_eq!(&got[12..], &body[..]);
}

#[test]
fn rx_merged_frame_bigger_than_the_ring_is_dropped() {
    let mut f = fixture_with(true, F_MRG_RXBUF);
    push_rx(&f, with_header(NetHdr::default(), &frame(2000, 13)));
    let small = frame(40, 14);
    push_rx(&f, with_header(NetHdr::default(), &small));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 8);
    for i in 0..8 {
        d.post(&[(BUF + i * 0x1000, 64, F_WRITE)]);
    }
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    let s = stats(&f);
    assert_eq!(s.rx_dropped_too_big, 1);
    // The ring's buffers were left for the next frame, which took one.
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 52));
    assert_eq!(&read(&f.mem, BUF + 12, 40), &small);
}

#[test]
fn rx_headers_the_guest_cannot_take_are_dropped() {
    let mut f = fixture();
    let tso = NetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        ..NetHdr::default()
    };
    push_rx(&f, with_header(tso, &frame(3000, 15)));
    // Shorter than a header, and longer than any frame can be.
    push_rx(&f, vec![0u8; 5]);
    push_rx(&f, vec![0u8; MAX_BUFFER_LEN + 1]);
    let ok = frame(64, 16);
    push_rx(
        &f,
        with_header(
            NetHdr {
                flags: FLAG_DATA_VALID,
                ..NetHdr::default()
            },
            &ok,
        ),
    );
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.post(&[(BUF, 1526, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 1);
    let got = read(&f.mem, BUF, 76);
    // DATA_VALID is cleared for a guest without GUEST_CSUM.
    assert_eq!(got[0], 0);
    assert_eq!(&got[12..], &ok);
    let s = stats(&f);
    assert_eq!(s.rx_dropped_bad_header, 1);
    assert_eq!(s.rx_tap_errors, 1);
    assert_eq!(s.rx_dropped_too_big, 1);
}

#[test]
fn rx_interrupts_follow_used_event() {
    let mut f = fixture_with(true, VIRTIO_RING_F_EVENT_IDX);
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    d.queue.set_event_idx(true);
    // used_event = 5: the driver wants an interrupt once entry 5 is used.
    let used_event = d.vq.avail_addr().unchecked_add(4 + 2 * 16);
    f.mem.write_obj(5u16.to_le(), used_event).unwrap();
    let mut interrupts = Vec::new();
    for i in 0..7u64 {
        push_rx(
            &f,
            with_header(NetHdr::default(), &frame(60, u8::try_from(i).unwrap())),
        );
        d.post(&[(BUF + i * 0x1000, 1526, F_WRITE)]);
        interrupts.push(f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue));
    }
    assert_eq!(d.used_idx(), 7);
    assert_eq!(
        interrupts,
        vec![false, false, false, false, false, true, false]
    );
}

// ---- negotiation, config, state ----

#[test]
fn config_space_holds_mac_link_and_one_pair() {
    let f = fixture();
    let mut c = [0xffu8; 12];
    f.net.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    assert_eq!(&c[10..], &[0, 0]);
    let mut b = [0u8; 2];
    f.net.read_config(4, &mut b);
    assert_eq!(b, [0x44, 0x55]);
}

#[test]
fn offloads_are_offered_only_when_the_tap_has_them() {
    let with = fixture_with(true, 0);
    let without = fixture_with(false, 0);
    assert_eq!(with.net.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    assert_eq!(without.net.features() & OFFLOAD_FEATURES, 0);
    for f in [&with, &without] {
        let want = VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX;
        assert_eq!(f.net.features() & want, want);
    }
}

#[test]
fn activation_sets_tap_offloads_from_the_guest_features_and_reset_clears_them() {
    let mut f = fixture_with(true, F_GUEST_CSUM | F_GUEST_TSO4);
    assert_eq!(
        f.wire.lock().unwrap().offloads,
        vec![libc::TUN_F_CSUM | libc::TUN_F_TSO4]
    );
    f.net.reset();
    assert_eq!(f.wire.lock().unwrap().offloads.last(), Some(&0));
    // A driver that acks TSO without checksums is refused.
    assert!(!f.net.activate(VIRTIO_F_VERSION_1 | F_GUEST_TSO4));
    assert!(!f.net.activate(VIRTIO_F_VERSION_1 | F_CSUM | F_HOST_ECN));
}

#[test]
fn state_keeps_mac_features_and_a_waiting_frame() {
    let mut f = fixture_with(true, F_GUEST_CSUM);
    let body = frame(500, 17);
    push_rx(&f, with_header(NetHdr::default(), &body));
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    let state = f.net.state();
    assert_eq!((state.mac, state.guest_mac), (MAC, MAC));
    assert_eq!(state.status, 1, "link up");
    assert_eq!(state.pending_rx.as_deref().map(<[u8]>::len), Some(512));
    let acked = F_GUEST_CSUM | VIRTIO_F_VERSION_1;
    // Through serde, as a snapshot would carry it.
    let json = serde_json::to_string(&state).unwrap();
    let back: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let wire = Arc::new(Mutex::new(Wire::default()));
    let tap = || {
        Box::new(FakeTap {
            wire: wire.clone(),
            offload: true,
        })
    };
    let mut restored = Net::restore(tap(), &back, acked, MAC).unwrap();
    assert_eq!(restored.rewrite(), None, "the saved MAC needs no rewrite");
    assert_eq!(wire.lock().unwrap().offloads, vec![libc::TUN_F_CSUM]);
    d.post(&[(BUF, 1526, F_WRITE)]);
    restored.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(&read(&f.mem, BUF + 12, 500), &body);

    // A tap without offloads cannot carry a device that offered them.
    let plain = Box::new(FakeTap {
        wire: wire.clone(),
        offload: false,
    });
    assert!(matches!(
        Net::restore(plain, &back, acked, MAC),
        Err(NetError::Features { .. })
    ));
    // Nor can a driver's acks that break a dependency come back.
    assert!(matches!(
        Net::restore(tap(), &back, VIRTIO_F_VERSION_1 | F_GUEST_TSO4, MAC),
        Err(NetError::AckedFeatures(_))
    ));
    // A device that had not been activated sets no offloads.
    let before = wire.lock().unwrap().offloads.len();
    Net::restore(tap(), &back, 0, MAC).unwrap();
    assert_eq!(wire.lock().unwrap().offloads.len(), before);
}

const WIRE_MAC: [u8; 6] = [0x02, 0x99, 0x88, 0x77, 0x66, 0x55];
const PEER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 1];

/// An ARP packet (Ethernet, IPv4) after an Ethernet header.
fn arp_frame(dst: [u8; 6], src: [u8; 6], op: u8, sha: [u8; 6], tha: [u8; 6]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f
}

/// A device saved with MAC and restored as `wire`, activated with MRG_RXBUF.
fn restored_as(wire_mac: [u8; 6]) -> (Fixture, Arc<Mutex<Wire>>) {
    let f = fixture_with(true, F_MRG_RXBUF);
    let wire = Arc::new(Mutex::new(Wire::default()));
    let net = Net::restore(
        Box::new(FakeTap {
            wire: wire.clone(),
            offload: true,
        }),
        &f.net.state(),
        VIRTIO_F_VERSION_1 | F_MRG_RXBUF,
        wire_mac,
    )
    .unwrap();
    (
        Fixture {
            mem: f.mem,
            wire: wire.clone(),
            net,
        },
        wire,
    )
}

#[test]
fn a_restore_onto_a_new_mac_translates_both_ways_and_config_space_shows_it() {
    let (mut f, wire) = restored_as(WIRE_MAC);
    assert_eq!(f.net.mac(), WIRE_MAC);
    assert_eq!(f.net.guest_mac(), MAC);
    let mut config = [0u8; 6];
    f.net.read_config(0, &mut config);
    assert_eq!(config, WIRE_MAC, "config space reports the wire MAC");
    // The saved state keeps what the guest uses.
    assert_eq!(
        (f.net.state().mac, f.net.state().guest_mac),
        (WIRE_MAC, MAC)
    );

    // Transmit: an ARP request split inside the virtio-net header, inside
    // the source MAC and inside the ARP sender address.
    let request = with_header(
        NetHdr::default(),
        &arp_frame([0xff; 6], MAC, 1, MAC, [0; 6]),
    );
    let mem = f.mem.clone();
    let cuts = [0usize, 5, 12 + 9, 12 + 14 + 11, request.len()];
    let mut chain = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        let at = BUF + 0x1000 * i as u64;
        mem.write_slice(&request[w[0]..w[1]], GuestAddress(at))
            .unwrap();
        chain.push((at, u32::try_from(w[1] - w[0]).unwrap(), 0));
    }
    let mut tx = Driver::new(&mem, 0x4_0000, 16);
    tx.post(&chain);
    f.net.process_queue(&mem, TX_QUEUE, &mut tx.queue);
    let sent = wire.lock().unwrap().sent.clone();
    assert_eq!(
        sent,
        vec![with_header(
            NetHdr::default(),
            &arp_frame([0xff; 6], WIRE_MAC, 1, WIRE_MAC, [0; 6])
        )]
    );
    // The guest's memory is left as the guest wrote it.
    assert_eq!(read(&mem, BUF + 0x1000, 7), request[5..12].to_vec());

    // Receive: the reply for the wire MAC reaches the guest addressed to
    // the MAC it knows, spread over small buffers (MRG_RXBUF).
    let reply = arp_frame(WIRE_MAC, PEER_MAC, 2, PEER_MAC, WIRE_MAC);
    push_rx(&f, with_header(NetHdr::default(), &reply));
    let mut rx = Driver::new(&mem, 0, 16);
    for i in 0..4u64 {
        rx.post(&[(BUF + 0x10_0000 + 0x1000 * i, 16, F_WRITE)]);
    }
    f.net.process_queue(&mem, RX_QUEUE, &mut rx.queue);
    assert_eq!(rx.used_idx(), 4);
    let mut got = Vec::new();
    for i in 0..4u16 {
        let (_, len) = rx.used(i);
        got.extend(read(
            &mem,
            BUF + 0x10_0000 + 0x1000 * u64::from(i),
            len as usize,
        ));
    }
    assert_eq!(
        &got[HDR_LEN..],
        &arp_frame(MAC, PEER_MAC, 2, PEER_MAC, MAC)[..]
    );
    // A frame for someone else, and a runt, pass untouched.
    let other = frame(60, 3);
    let mut for_peer = other.clone();
    for_peer[..6].copy_from_slice(&PEER_MAC);
    push_rx(&f, with_header(NetHdr::default(), &for_peer));
    push_rx(&f, with_header(NetHdr::default(), &WIRE_MAC[..4]));
    for i in 0..2u64 {
        rx.post(&[(BUF + 0x20_0000 + 0x1000 * i, 1526, F_WRITE)]);
    }
    f.net.process_queue(&mem, RX_QUEUE, &mut rx.queue);
    assert_eq!(rx.used_idx(), 6);
    assert_eq!(read(&mem, BUF + 0x20_0000 + 12, 60), for_peer);
    assert_eq!(read(&mem, BUF + 0x20_1000 + 12, 4), WIRE_MAC[..4].to_vec());
    let s = stats(&f);
    assert_eq!((s.tx_frames, s.rx_frames), (1, 3));

    // A driver reset ends the translation: the next driver reads the wire
    // MAC and uses it.
    f.net.reset();
    assert_eq!(f.net.rewrite(), None);
    assert_eq!(f.net.guest_mac(), WIRE_MAC);
}

#[test]
fn a_waiting_frame_is_saved_in_the_guests_terms() {
    let (mut f, _) = restored_as(WIRE_MAC);
    push_rx(
        &f,
        with_header(
            NetHdr::default(),
            &arp_frame(WIRE_MAC, PEER_MAC, 2, PEER_MAC, WIRE_MAC),
        ),
    );
    let mem = f.mem.clone();
    let mut rx = Driver::new(&mem, 0, 16);
    f.net.process_queue(&mem, RX_QUEUE, &mut rx.queue);
    let state = f.net.state();
    let pending = state.pending_rx.clone().unwrap();
    assert_eq!(&pending[HDR_LEN..HDR_LEN + 6], &MAC);
    // Restored again onto a third MAC: the guest still uses its own, the
    // waiting frame is delivered as it was.
    let third = [0x02, 0x33, 0, 0, 0, 3];
    let wire = Arc::new(Mutex::new(Wire::default()));
    let mut again = Net::restore(
        Box::new(FakeTap {
            wire,
            offload: true,
        }),
        &state,
        VIRTIO_F_VERSION_1 | F_MRG_RXBUF,
        third,
    )
    .unwrap();
    assert_eq!(again.guest_mac(), MAC);
    assert_eq!(again.mac(), third);
    rx.post(&[(BUF, 1526, F_WRITE)]);
    again.process_queue(&mem, RX_QUEUE, &mut rx.queue);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(read(&mem, BUF + 12, 6), MAC.to_vec());
    // Back onto the guest's own MAC: no translation.
    let wire = Arc::new(Mutex::new(Wire::default()));
    let home = Net::restore(
        Box::new(FakeTap {
            wire,
            offload: true,
        }),
        &state,
        VIRTIO_F_VERSION_1,
        MAC,
    )
    .unwrap();
    assert_eq!(home.rewrite(), None);
}

#[test]
fn the_tap_is_polled_only_while_the_guest_has_room() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut d = Driver::new(&mem, 0, 16);
    assert_eq!(
        f.net.backend_interest(),
        Interest {
            read: true,
            write: false
        }
    );
    // A frame and no buffer: the device stops reading the tap...
    push_rx(&f, with_header(NetHdr::default(), &frame(60, 1)));
    f.net
        .process_event(&f.mem, std::slice::from_mut(&mut d.queue));
    assert!(!f.net.backend_interest().read);
    // ...until the guest posts room and notifies.
    d.post(&[(BUF, 1526, F_WRITE)]);
    f.net.process_queue(&f.mem, RX_QUEUE, &mut d.queue);
    assert_eq!(d.used_idx(), 1);
    assert!(f.net.backend_interest().read);
    // A send that would block asks for writability.
    f.wire.lock().unwrap().would_block = true;
    let mut tx = Driver::new(&mem, 0x4_0000, 16);
    let good = with_header(NetHdr::default(), &frame(60, 2));
    f.mem
        .write_slice(&good, GuestAddress(BUF + 0x8000))
        .unwrap();
    tx.post(&[(BUF + 0x8000, len32(&good), 0)]);
    f.net.process_queue(&f.mem, TX_QUEUE, &mut tx.queue);
    assert!(f.net.backend_interest().write);
}
