//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): registers,
//! feature negotiation, queue set-up, activation and reset. Queue
//! notifications arrive through an ioeventfd and interrupts leave through
//! an irqfd, so the data path never exits to this code's vCPU side.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interest, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x434f_434e; // "COCN"

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_SEL: u64 = 0x0ac;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// InterruptStatus bit: a used buffer notification.
pub const INT_USED_RING: u32 = 1;

/// One queue, as virtio-queue's `QueueState` has it (which is not serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(q: QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers and queues, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    /// What the device offered; a restore refuses a device offering other.
    pub device_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueState>,
}

/// Why a saved transport state does not fit the device it is restored on.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("the device type is {found}, the snapshot has {saved}")]
    DeviceType { saved: u32, found: u32 },
    #[error("the device offers features {found:#x}, the snapshot's {saved:#x}")]
    Features { saved: u64, found: u64 },
    #[error("the device has {found} queues, the snapshot {saved}")]
    QueueCount { saved: usize, found: usize },
    #[error("queue {index}: maximum size {saved} in the snapshot, {found} on the device")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        found: u16,
    },
    #[error("queue {index} is invalid")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {index} of an active device is not usable in guest memory")]
    QueueOutsideMemory { index: usize },
    #[error(
        "the driver accepted features {driver:#x} that the device does not offer ({offered:#x})"
    )]
    DriverFeatures { driver: u64, offered: u64 },
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // Queue::new fails only for sizes that are not a power of two
            // or are zero; device sizes are constants that are neither.
            .map(|s| Queue::new(*s).expect("device queue size is a power of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            activated: false,
        }
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The guest notified queue `index`: serve it and interrupt if needed.
    pub fn notify(&mut self, index: usize) {
        if !self.activated || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if self.device.process_queue(&self.mem, index, queue) {
            self.signal_used();
        }
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        // A full eventfd counter (impossible at 2^64-1) would only
        // coalesce interrupts.
        let _ = self.irq.write(1);
    }

    /// The device's backend has an event (see [`VirtioDevice::process_event`]).
    pub fn device_event(&mut self) {
        if !self.activated || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        if self.device.process_event(&self.mem, &mut self.queues) {
            self.signal_used();
        }
    }

    /// The device's own part of a snapshot.
    pub fn device_state(&self) -> Option<super::DeviceState> {
        self.device.state()
    }

    /// Registers and queues as they are now.
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            device_features: self.device.features(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            activated: self.activated,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Puts back a saved state, checked against this device first: nothing
    /// changes unless all of it fits.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), TransportStateError> {
        let found = self.device.device_type();
        if state.device_type != found {
            return Err(TransportStateError::DeviceType {
                saved: state.device_type,
                found,
            });
        }
        let offered = self.device.features();
        if state.device_features != offered {
            return Err(TransportStateError::Features {
                saved: state.device_features,
                found: offered,
            });
        }
        if state.driver_features & !offered != 0 {
            return Err(TransportStateError::DriverFeatures {
                driver: state.driver_features,
                offered,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount {
                saved: state.queues.len(),
                found: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, max)) in state
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            if saved.max_size != *max {
                return Err(TransportStateError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    found: *max,
                });
            }
            let q = Queue::try_from(virtio_queue::QueueState::from(*saved))
                .map_err(|source| TransportStateError::Queue { index, source })?;
            if state.activated && !q.is_valid(&self.mem) {
                return Err(TransportStateError::QueueOutsideMemory { index });
            }
            queues.push(q);
        }
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        self.activated = state.activated;
        Ok(())
    }

    /// After a restore, once the interrupt controllers have their state:
    /// raises an interrupt the driver had not acknowledged (it may have
    /// been in flight when the state was saved), and serves every queue
    /// once, for requests the driver posted whose notification the saved
    /// VM had not yet read.
    pub fn kick(&mut self) {
        if self.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
        for index in 0..self.queues.len() {
            self.notify(index);
        }
    }

    /// What the device wants of its backend; nothing before activation or
    /// once it needs a reset, when nothing would be served.
    pub fn backend_interest(&self) -> Interest {
        if !self.activated || self.status & STATUS_NEEDS_RESET != 0 {
            return Interest::default();
        }
        self.device.backend_interest()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.activated = false;
        self.device.reset();
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => low_half(self.device.features()),
                1 => low_half(self.device.features() >> 32),
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            // No shared memory regions: length all ones means "none".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            // The configuration never changes at run time.
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue and feature set-up is only legal before DRIVER_OK; a driver
        // that tries later is ignored rather than allowed to move rings
        // under the device.
        let setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if setup && self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    // A size past 16 bits is as invalid as 0: refused,
                    // the queue left as it was (truncated, 0x10010 would
                    // pass for 16).
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            REG_QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW if setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            REG_QUEUE_DESC_HIGH if setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            REG_QUEUE_DRIVER_LOW if setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            REG_QUEUE_DRIVER_HIGH if setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            REG_QUEUE_DEVICE_LOW if setup => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            REG_QUEUE_DEVICE_HIGH if setup => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => {}
            // QueueNotify arrives here only if the ioeventfd is missing.
            REG_QUEUE_NOTIFY => self.notify(v as usize),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is a broken driver,
        // which we flag rather than follow.
        if v & self.status != self.status {
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let added = v & !self.status;
        let mut new = v;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Refuse FEATURES_OK: the driver reads it back and gives up.
                new &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 && (new & STATUS_FEATURES_OK == 0 || !self.activate()) {
            new = (new & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
        }
        self.status = new;
    }

    fn activate(&mut self) -> bool {
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            if !q.ready() || !q.is_valid(&self.mem) {
                return false;
            }
            q.set_event_idx(event_idx);
        }
        if !self.device.activate(self.driver_features) {
            return false;
        }
        self.activated = true;
        true
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and aligned; other accesses read as zero.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The block device has no writable configuration field we offer.
        if offset >= CONFIG_SPACE {
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// The low 32 bits of a 64-bit feature word (the registers show it in
/// halves, selected by DeviceFeaturesSel).
#[allow(
    clippy::cast_possible_truncation,
    reason = "the truncation is the point: the low half"
)]
fn low_half(features: u64) -> u32 {
    features as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use vm_memory::GuestAddress;

    /// What a [`SlowDevice`] has done, seen from outside.
    #[derive(Default)]
    pub(crate) struct Probe {
        pub started: AtomicUsize,
        pub finished: AtomicUsize,
    }

    /// A device whose every queue notification takes `delay`.
    struct SlowDevice {
        delay: Duration,
        probe: Arc<Probe>,
    }

    impl VirtioDevice for SlowDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process_queue(&mut self, _: &GuestMemoryMmap, _: usize, _: &mut Queue) -> bool {
            self.probe.started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.probe.finished.fetch_add(1, Ordering::SeqCst);
            false
        }
    }

    /// A transport whose driver has set up queue 0 and activated it.
    pub(crate) fn activated_transport(delay: Duration) -> (MmioTransport, Arc<Probe>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let probe = Arc::new(Probe::default());
        let mut t = MmioTransport::new(
            Box::new(SlowDevice {
                delay,
                probe: probe.clone(),
            }),
            mem,
            irq,
        );
        negotiate(&mut t, 1);
        setup_queue(&mut t);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_activated());
        (t, probe)
    }

    struct Dummy {
        processed: usize,
        resets: usize,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | super::super::VIRTIO_RING_F_EVENT_IDX
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        #[allow(
            clippy::cast_possible_truncation,
            reason = "the test device's config space is a few bytes long"
        )]
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn process_queue(&mut self, _: &GuestMemoryMmap, _: usize, _: &mut Queue) -> bool {
            self.processed += 1;
            true
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn transport() -> (MmioTransport, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(Dummy {
                processed: 0,
                resets: 0,
            }),
            mem,
            irq.try_clone().unwrap(),
        );
        (t, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, 0x1000);
        w(t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(t, REG_QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport, high: u32) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, high);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    #[test]
    fn identifies_as_version_2() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 2);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        // Unaligned and narrow register reads return zero.
        let mut b = [0u8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        // Config space is byte-addressable.
        let mut c = [0u8; 1];
        t.read(CONFIG_SPACE + 3, &mut c);
        assert_eq!(c[0], 3);
    }

    /// QueueNum is a 32-bit register over a 16-bit size: a value past 16
    /// bits is refused like any invalid size, not truncated into a valid
    /// one (0x10010 would pass for 16).
    #[test]
    fn queue_sizes_past_16_bits_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 8);
        assert_eq!(t.state().queues[0].size, 8);
        w(&mut t, REG_QUEUE_NUM, 0x1_0010);
        assert_eq!(t.state().queues[0].size, 8);
        w(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(t.state().queues[0].size, 16);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 0);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn activation_notify_interrupt_and_reset() {
        let (mut t, irq) = transport();
        negotiate(&mut t, 1);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Notify before DRIVER_OK is ignored.
        t.notify(0);
        assert!(irq.read().is_err());
        setup_queue(&mut t);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_activated());
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        t.notify(0);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        w(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        // Rings cannot move after DRIVER_OK.
        w(&mut t, REG_QUEUE_DESC_LOW, 0x8000);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn driver_ok_with_rings_outside_memory_needs_reset() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x10);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn state_round_trips_and_misfits_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        w(&mut t, REG_QUEUE_SEL, 0);
        t.notify(0);
        let saved = t.state();
        assert!(saved.activated);
        assert_eq!(saved.queues[0].desc_table, 0x1000);
        assert_eq!(saved.interrupt_status, INT_USED_RING);

        // Onto a fresh transport of the same device: the same state.
        let (mut fresh, irq) = transport();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.state(), saved);
        assert!(fresh.is_activated());
        // The kick re-raises the unacknowledged interrupt.
        while irq.read().is_ok() {}
        fresh.kick();
        assert!(irq.read().is_ok());

        type Edit = fn(&mut TransportState);
        let cases: &[(&str, Edit)] = &[
            ("device type is 2, the snapshot has 1", |s| {
                s.device_type = 1
            }),
            ("offers features", |s| s.device_features |= 1 << 40),
            ("does not offer", |s| s.driver_features |= 1 << 3),
            ("has 1 queues, the snapshot 2", |s| {
                let q = s.queues[0];
                s.queues.push(q)
            }),
            ("maximum size 32", |s| s.queues[0].max_size = 32),
            ("queue 0 is invalid", |s| s.queues[0].size = 3),
            ("not usable in guest memory", |s| {
                s.queues[0].desc_table = 1 << 40
            }),
        ];
        for (want, edit) in cases {
            let mut bad = saved.clone();
            edit(&mut bad);
            let (mut target, _) = transport();
            let before = target.state();
            let e = target.restore(&bad).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
            assert_eq!(target.state(), before, "{want}: changed on refusal");
        }
    }
}
