//! virtio devices over the MMIO transport.

pub mod block;
pub mod mmio;
pub mod net;
pub mod worker;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// Feature bits shared by all device types (virtio 1.2, 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// A device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = network, 2 = block).
    fn device_type(&self) -> u32;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves the available descriptors of queue `index`; returns whether
    /// the driver must be interrupted.
    fn process_queue(&mut self, mem: &GuestMemoryMmap, index: usize, queue: &mut Queue) -> bool;
    /// The driver set DRIVER_OK having acked `acked_features`; false makes
    /// the transport refuse it (DEVICE_NEEDS_RESET).
    fn activate(&mut self, _acked_features: u64) -> bool {
        true
    }
    /// Serves an event of the device's own backend (a tap that became
    /// readable or writable); returns whether the driver must be
    /// interrupted.
    fn process_event(&mut self, _mem: &GuestMemoryMmap, _queues: &mut [Queue]) -> bool {
        false
    }
    /// What the device can use from its backend right now.
    fn backend_interest(&self) -> Interest {
        Interest::default()
    }
    /// Forgets per-session state (the driver reset the device).
    fn reset(&mut self) {}
    /// What a snapshot keeps of the device, beyond its transport; `None`
    /// for a device that cannot be snapshotted (a snapshot then refuses).
    fn state(&self) -> Option<DeviceState> {
        None
    }
}

/// Which readiness of a backend descriptor a device wants to hear about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    /// As poll(2) events.
    pub fn poll_events(self) -> libc::c_short {
        let mut e = 0;
        if self.read {
            e |= libc::POLLIN;
        }
        if self.write {
            e |= libc::POLLOUT;
        }
        e
    }
}

/// The device-specific part of a virtio device's snapshot, one variant per
/// device kind. A new kind adds a variant at the end (a minor format
/// version: older readers refuse only snapshots that have one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
    /// Since format 1.2.
    Net(net::NetState),
}

impl DeviceState {
    /// The virtio device ID of the device this state is of.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceState::Block(_) => block::VIRTIO_ID_BLOCK,
            DeviceState::Net(_) => net::VIRTIO_ID_NET,
        }
    }
}

/// Copies a device's configuration space from `offset` into `data`; bytes
/// past its end read as zero.
pub fn read_config_from(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Serves the available chains of `queue`, each with `serve`, which says
/// the used length, or `None` to leave the chain (and the rest) for later.
/// Drains, re-enables notifications and drains again if the driver added
/// more meanwhile (the EVENT_IDX race); a round that finds "more" but pops
/// nothing means a corrupt avail index, so it stops rather than spin.
/// Returns whether the driver must be interrupted.
pub fn drain_queue<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> Option<u32>,
) -> bool {
    loop {
        if queue.disable_notification(mem).is_err() {
            return false;
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let Some(used) = serve(chain) else {
                queue.go_to_previous_position();
                return queue.needs_notification(mem).unwrap_or(true);
            };
            popped += 1;
            if queue.add_used(mem, head, used).is_err() {
                return false;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            Ok(_) => break,
            Err(_) => return false,
        }
    }
    queue.needs_notification(mem).unwrap_or(true)
}
