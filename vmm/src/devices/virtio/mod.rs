//! virtio devices over the MMIO transport.

pub mod block;
pub mod mmio;
pub mod net;
pub mod worker;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
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
}
