//! virtio devices over the MMIO transport.

pub mod block;
pub mod mmio;
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
    /// The virtio device ID (2 = block).
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
    /// Forgets per-session state (the driver reset the device).
    fn reset(&mut self) {}
    /// What a snapshot keeps of the device, beyond its transport; `None`
    /// for a device that cannot be snapshotted (a snapshot then refuses).
    fn state(&self) -> Option<DeviceState> {
        None
    }
}

/// The device-specific part of a virtio device's snapshot, one variant per
/// device kind. A new kind adds a variant at the end (a minor format
/// version: older readers refuse only snapshots that have one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
}
