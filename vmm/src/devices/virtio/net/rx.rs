//! The receive queue: frames from the tap into the guest's buffers.
//!
//! A frame is read from the tap only when none is waiting, into the host
//! buffer, and stays there until the guest has posted room for all of it:
//! one chain large enough, or with MRG_RXBUF as many chains as it takes.
//! Nothing reaches the used ring until the whole frame is placed, and then
//! all its chains are published with one index update, because a driver
//! that sees the first chain of a merged frame reads `num_buffers` and
//! expects the rest to be there.
//!
//! Each chain is checked before anything is written into it: every
//! descriptor device-writable and inside guest memory, at most
//! [`MAX_DESCRIPTORS`], room for at least the header. A chain that fails is
//! returned with length 0 and counted. A frame that can never fit (bigger
//! than the guest's buffer without MRG_RXBUF, or than its whole ring) is
//! dropped and counted, and the buffer stays posted for the next frame.

use std::io;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

use super::header::{check_rx, NetHdr, F_MRG_RXBUF, HDR_LEN, NUM_BUFFERS_OFFSET};
use super::{bump, Net, Segment, MAX_DESCRIPTORS};

/// The device-writable pieces of one receive chain.
#[derive(Debug)]
pub(super) struct RxChain {
    segments: Vec<Segment>,
    capacity: usize,
}

/// Why a receive chain cannot take a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxChainError {
    ReadOnlyDescriptor,
    OutsideMemory,
    TooManyDescriptors,
    NoRoomForHeader,
}

pub(super) fn parse_rx_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<RxChain, RxChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut segments = Vec::new();
    let mut capacity = 0usize;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_DESCRIPTORS {
            return Err(RxChainError::TooManyDescriptors);
        }
        if !desc.is_write_only() {
            return Err(RxChainError::ReadOnlyDescriptor);
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if mem.get_slice(desc.addr(), len).is_err() {
            return Err(RxChainError::OutsideMemory);
        }
        segments.push(Segment {
            addr: desc.addr(),
            len,
        });
        capacity += len;
    }
    if capacity < HDR_LEN {
        return Err(RxChainError::NoRoomForHeader);
    }
    Ok(RxChain { segments, capacity })
}

/// Writes `data` at byte `offset` of the chain; returns the bytes written
/// (less than `data.len()` only when the chain is full).
fn write_at(mem: &GuestMemoryMmap, chain: &RxChain, mut offset: usize, data: &[u8]) -> usize {
    let mut done = 0usize;
    for s in &chain.segments {
        if done == data.len() {
            break;
        }
        if offset >= s.len {
            offset -= s.len;
            continue;
        }
        let n = (s.len - offset).min(data.len() - done);
        // Inside the segment, which was checked against guest memory.
        let addr = s.addr.unchecked_add(offset as u64);
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            break;
        }
        done += n;
        offset = 0;
    }
    done
}

/// A used-ring entry waiting to be published.
#[derive(Debug, Clone, Copy)]
struct Used {
    head: u16,
    len: u32,
}

/// What became of the waiting frame.
enum Delivery {
    Delivered,
    /// Dropped and counted; the next frame may be read.
    Dropped,
    /// The guest has not posted enough room yet; the frame keeps waiting.
    /// `reached` is the avail index the search got to: the driver must
    /// be asked to notify once it posts past it.
    NoBuffers {
        reached: u16,
    },
}

/// Writes `entries` into the used ring after `next_used` and then moves
/// the ring's index past all of them at once.
fn publish(mem: &GuestMemoryMmap, queue: &mut Queue, entries: &[Used]) {
    if entries.is_empty() {
        return;
    }
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let mut idx = queue.next_used();
    for e in entries {
        // Heads come from the avail ring; one past the table cannot be
        // returned (add_used refuses the same).
        if e.head >= size {
            continue;
        }
        let slot = 4 + 8 * u64::from(idx % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(e.head).to_le_bytes());
        elem[4..].copy_from_slice(&e.len.to_le_bytes());
        // The ring was checked to be in guest memory at activation.
        if let Some(addr) = ring.checked_add(slot) {
            if mem.write_slice(&elem, addr).is_err() {
                return;
            }
        }
        idx = idx.wrapping_add(1);
    }
    let Some(idx_addr) = ring.checked_add(2) else {
        return;
    };
    // Release: the elements are visible before the index that covers them.
    if mem.store(idx.to_le(), idx_addr, Ordering::Release).is_ok() {
        queue.set_next_used(idx);
    }
}

/// Whether publishing from `old` to the queue's `next_used` asks for an
/// interrupt (virtio 1.2, 2.7.10: `used_event`, or the avail ring's
/// NO_INTERRUPT flag without EVENT_IDX).
fn should_interrupt(mem: &GuestMemoryMmap, queue: &Queue, old: u16) -> bool {
    let new = queue.next_used();
    if new == old {
        return false;
    }
    // Our used-ring writes before the driver's suppression fields.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let Some(addr) = avail.checked_add(4 + 2 * u64::from(queue.size())) else {
            return true;
        };
        let Ok(used_event) = mem.load::<u16>(addr, Ordering::Relaxed) else {
            return true;
        };
        let used_event = u16::from_le(used_event);
        return new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old);
    }
    let flags = mem
        .load::<u16>(avail, Ordering::Relaxed)
        .map(u16::from_le)
        .unwrap_or(0);
    flags & 1 == 0
}

impl Net {
    /// Moves frames from the tap into the guest until one side runs dry;
    /// returns whether to interrupt the guest.
    pub(super) fn process_rx(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
        let old = queue.next_used();
        self.rx_parked = false;
        loop {
            if self.pending.is_none() {
                match self.read_frame() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(()) => {
                        // Wait for the guest's next receive notification
                        // rather than poll a failing tap.
                        self.rx_parked = true;
                        break;
                    }
                }
            }
            match self.deliver(mem, queue) {
                Delivery::Delivered | Delivery::Dropped => self.pending = None,
                Delivery::NoBuffers { reached } => {
                    // Ask for a notification past what was searched (not
                    // past the buffers given back, which the driver has
                    // already posted), and look again if more arrived.
                    let resume = queue.next_avail();
                    queue.set_next_avail(reached);
                    let more = queue.enable_notification(mem);
                    queue.set_next_avail(resume);
                    match more {
                        Ok(true) => continue,
                        _ => {
                            self.rx_parked = true;
                            break;
                        }
                    }
                }
            }
        }
        should_interrupt(mem, queue, old)
    }

    /// Reads the next frame the guest can take from the tap into the
    /// buffer: whether one is waiting now; `Err` when the tap failed.
    fn read_frame(&mut self) -> Result<bool, ()> {
        let c = &self.counters;
        loop {
            let len = match self.backend.recv(&mut self.rx_buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-net: tap read failed");
                    bump(&c.rx_tap_errors, 1);
                    return Err(());
                }
            };
            if len < HDR_LEN {
                bump(&c.rx_tap_errors, 1);
                continue;
            }
            // tun reports a frame's full length even when it had to cut it
            // to fit the buffer.
            if len > self.rx_buf.len() {
                bump(&c.rx_dropped_too_big, 1);
                continue;
            }
            let mut raw = [0u8; HDR_LEN];
            raw.copy_from_slice(&self.rx_buf[..HDR_LEN]);
            match check_rx(&NetHdr::parse(&raw), self.acked) {
                Ok(hdr) => {
                    self.rx_buf[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
                    // Into the guest's terms now, so that a waiting frame
                    // (and a snapshot of it) is what the guest will see.
                    if let Some(rw) = &self.rewrite {
                        rw.inbound(&mut self.rx_buf[..len]);
                    }
                    self.pending = Some(len);
                    return Ok(true);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-net: tap frame the guest cannot take");
                    bump(&c.rx_dropped_bad_header, 1);
                }
            }
        }
    }

    /// Tries to place the waiting frame into the guest's buffers.
    fn deliver(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Delivery {
        let Some(len) = self.pending else {
            return Delivery::Dropped;
        };
        let frame = &self.rx_buf[..len];
        let c = &self.counters;
        let merge = self.acked & F_MRG_RXBUF != 0;
        let start = queue.next_avail();
        let mut used: Vec<Used> = Vec::new();
        // Chains returned unused ahead of the first that takes a byte: they
        // are given back even if the frame has to wait.
        let mut leading_bad = 0usize;
        let mut first: Option<RxChain> = None;
        let mut buffers = 0u16;
        let mut written = 0usize;
        let mut scanned = 0usize;
        while written < len {
            if scanned >= usize::from(queue.size()) {
                // A full ring cannot hold it, so it never will: drop it and
                // leave the buffers for the next frame.
                self.give_back(mem, queue, start, &used[..leading_bad]);
                bump(&c.rx_dropped_too_big, 1);
                return Delivery::Dropped;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                let reached = queue.next_avail();
                self.give_back(mem, queue, start, &used[..leading_bad]);
                return Delivery::NoBuffers { reached };
            };
            scanned += 1;
            let head = chain.head_index();
            let rx = match parse_rx_chain(mem, chain) {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::debug!(error = ?e, "virtio-net: malformed receive chain");
                    used.push(Used { head, len: 0 });
                    if buffers == 0 {
                        leading_bad += 1;
                    }
                    continue;
                }
            };
            if !merge && rx.capacity < len {
                // Leave this buffer for a frame that fits.
                queue.go_to_previous_position();
                publish(mem, queue, &used);
                bump(&c.rx_bad_chains, used.len() as u64);
                bump(&c.rx_dropped_too_big, 1);
                return Delivery::Dropped;
            }
            let n = write_at(mem, &rx, 0, &frame[written..]);
            if n == 0 {
                used.push(Used { head, len: 0 });
                if buffers == 0 {
                    leading_bad += 1;
                }
                continue;
            }
            written += n;
            buffers += 1;
            used.push(Used {
                head,
                len: u32::try_from(n).expect("a frame is under 64 KiB and a header"),
            });
            if first.is_none() {
                first = Some(rx);
            }
        }
        // The header sits at the start of the first buffer, which has room
        // for all of it (parse_rx_chain).
        if let Some(rx) = &first {
            write_at(mem, rx, NUM_BUFFERS_OFFSET, &buffers.to_le_bytes());
        }
        publish(mem, queue, &used);
        bump(&c.rx_bad_chains, (used.len() - buffers as usize) as u64);
        bump(&c.rx_frames, 1);
        bump(&c.rx_bytes, (len - HDR_LEN) as u64);
        Delivery::Delivered
    }

    /// Undoes the pops of a frame that was not delivered, except for the
    /// unusable chains at the front (`bad`), which are returned empty.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most one queue of chains (u16 sized); ring indices wrap mod 2^16 anyway"
    )]
    fn give_back(&self, mem: &GuestMemoryMmap, queue: &mut Queue, start: u16, bad: &[Used]) {
        queue.set_next_avail(start.wrapping_add(bad.len() as u16));
        publish(mem, queue, bad);
        bump(&self.counters.rx_bad_chains, bad.len() as u64);
    }
}
