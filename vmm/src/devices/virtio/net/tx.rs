//! The transmit queue: chains from the guest to the tap.
//!
//! Every descriptor is checked before a byte is read: device-readable,
//! inside one region of guest memory, and the running total within a
//! header plus [`MAX_FRAME_LEN`]. The chain is then copied into the host
//! buffer, its header judged against the acked features, and the frame
//! written to the tap. A chain that fails any check is returned to the
//! guest unsent and counted; the device carries on with the next one.

use std::io;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

use super::header::{check_tx, NetHdr, HDR_LEN, MAX_BUFFER_LEN};
use super::{bump, Net, MAX_DESCRIPTORS};
use crate::devices::virtio::drain_queue;

/// Why a transmit chain was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxChainError {
    WritableDescriptor,
    OutsideMemory,
    TooManyDescriptors,
    TooShort,
    Oversize,
}

/// Checks every descriptor of `chain` and copies it into `buf`; returns
/// the bytes copied (header and frame).
pub(super) fn copy_tx_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<usize, TxChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut at = 0usize;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_DESCRIPTORS {
            return Err(TxChainError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return Err(TxChainError::WritableDescriptor);
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        // Within one region of guest memory (get_slice checks without
        // touching it), then within the buffer.
        if mem.get_slice(desc.addr(), len).is_err() {
            return Err(TxChainError::OutsideMemory);
        }
        let end = at
            .checked_add(len)
            .filter(|e| *e <= buf.len().min(MAX_BUFFER_LEN))
            .ok_or(TxChainError::Oversize)?;
        mem.read_slice(&mut buf[at..end], desc.addr())
            .map_err(|_| TxChainError::OutsideMemory)?;
        at = end;
    }
    if at < HDR_LEN {
        return Err(TxChainError::TooShort);
    }
    Ok(at)
}

impl Net {
    /// Sends what the guest queued; returns whether to interrupt it.
    pub(super) fn process_tx(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
        self.tx_blocked = false;
        drain_queue(mem, queue, |chain| {
            if self.send_chain(mem, chain) {
                // The device writes nothing into a transmit chain.
                Some(0)
            } else {
                // The tap is full: leave the chain for when it drains.
                self.tx_blocked = true;
                None
            }
        })
    }

    /// Sends or drops one chain; false only when the tap would block.
    fn send_chain<M>(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> bool
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let c = &self.counters;
        let len = match copy_tx_chain(mem, chain, &mut self.tx_buf) {
            Ok(len) => len,
            Err(TxChainError::Oversize) => {
                bump(&c.tx_dropped_oversize, 1);
                return true;
            }
            Err(e) => {
                tracing::debug!(error = ?e, "virtio-net: malformed transmit chain");
                bump(&c.tx_bad_chains, 1);
                return true;
            }
        };
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&self.tx_buf[..HDR_LEN]);
        let hdr = NetHdr::parse(&raw);
        if let Err(e) = check_tx(&hdr, len - HDR_LEN, self.acked) {
            tracing::debug!(error = %e, "virtio-net: transmit header refused");
            bump(&c.tx_dropped_bad_header, 1);
            return true;
        }
        // num_buffers means nothing on transmit (virtio 1.2, 5.1.6.2).
        self.tx_buf[HDR_LEN - 2..HDR_LEN].fill(0);
        if let Some(rw) = &self.rewrite {
            rw.outbound(&mut self.tx_buf[..len]);
        }
        match self.backend.send(&self.tx_buf[..len]) {
            Ok(_) => {
                bump(&c.tx_frames, 1);
                bump(&c.tx_bytes, (len - HDR_LEN) as u64);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-net: the tap refused a frame");
                bump(&c.tx_tap_errors, 1);
                true
            }
        }
    }
}
