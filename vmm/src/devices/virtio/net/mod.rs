//! virtio-net (virtio 1.2, 5.1) over a host tap device.
//!
//! One receive queue (0) and one transmit queue (1). Every frame crosses
//! with the 12-byte `virtio_net_hdr_v1`, which the tap also uses, so the
//! device checks headers against the negotiated features and otherwise
//! passes them through. The offloads the tap is set to (TUNSETOFFLOAD) are
//! exactly the receive offloads the guest acked, so the tap never hands us
//! a frame the guest cannot take; the guest's send offloads (checksum,
//! TSO) are offered when the tap accepts offloads at all.
//!
//! Frames are copied through a host buffer in both directions: a transmit
//! chain is checked descriptor by descriptor and copied before its header
//! is judged (so the header that is checked is the one sent), and a
//! received frame waits in the buffer until the guest has posted room for
//! all of it. A frame the guest has buffers for is never dropped; frames
//! that cannot be delivered or sent are dropped and counted in
//! [`NetCounters`].
//!
//! The device's I/O thread polls the tap for what the device can use
//! ([`VirtioDevice::backend_interest`]): input only while the guest has
//! room (a receive notification resumes it), output only after a send
//! would have blocked.
//!
//! A restored device may carry a MAC translation ([`MacRewrite`]): a
//! clone's guest keeps the MAC its driver read before the snapshot, while
//! the network sees the clone's own, which config space reports.

pub mod header;
pub mod rewrite;
mod rx;
pub mod tap;
mod tx;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use self::header::{
    missing_dependency, tap_offload, F_MAC, F_MRG_RXBUF, F_STATUS, HDR_LEN, MAX_BUFFER_LEN,
    OFFLOAD_FEATURES,
};
pub use self::rewrite::MacRewrite;
use super::{
    read_config_from, DeviceState, Interest, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

pub const VIRTIO_ID_NET: u32 = 1;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// A chain with more descriptors than this is refused (the queue bounds
/// direct chains; this also bounds indirect tables).
const MAX_DESCRIPTORS: usize = 1024;
/// mac, status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;
#[allow(
    clippy::cast_possible_truncation,
    reason = "VIRTIO_NET_S_LINK_UP is 1, a bit of the 16-bit status field"
)]
const LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
const _: () = assert!(LINK_UP as u32 == virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP);

/// What the device needs of the other end: a tap, or a fake in tests.
pub trait Backend: Send {
    /// Reads one frame, vnet header first; `WouldBlock` when none is queued.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame, vnet header first.
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Sets which offloads (TUN_F_*) frames handed to `recv` may use.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// Whether checksum and TSO offloads can be offered.
    fn supports_offload(&self) -> bool;
}

/// Frames and drops, readable while the VM runs.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// A frame bigger than the buffer the guest posted (no MRG_RXBUF), or
    /// than its whole ring.
    pub rx_dropped_too_big: AtomicU64,
    /// A frame whose tap header the guest's features cannot take.
    pub rx_dropped_bad_header: AtomicU64,
    /// Receive chains returned unused: a read-only descriptor, memory
    /// outside the guest, too many descriptors, or room for no header.
    pub rx_bad_chains: AtomicU64,
    pub rx_tap_errors: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped: a writable descriptor, memory outside the
    /// guest, too many descriptors, or shorter than a header.
    pub tx_bad_chains: AtomicU64,
    /// Frames longer than [`header::MAX_FRAME_LEN`].
    pub tx_dropped_oversize: AtomicU64,
    /// Frames whose header breaks the negotiated features.
    pub tx_dropped_bad_header: AtomicU64,
    /// Frames the tap refused (it is down, or rejected the header).
    pub tx_tap_errors: AtomicU64,
}

/// A plain copy of [`NetCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped_too_big: u64,
    pub rx_dropped_bad_header: u64,
    pub rx_bad_chains: u64,
    pub rx_tap_errors: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_bad_chains: u64,
    pub tx_dropped_oversize: u64,
    pub tx_dropped_bad_header: u64,
    pub tx_tap_errors: u64,
}

impl NetCounters {
    pub fn stats(&self) -> NetStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            rx_dropped_too_big: g(&self.rx_dropped_too_big),
            rx_dropped_bad_header: g(&self.rx_dropped_bad_header),
            rx_bad_chains: g(&self.rx_bad_chains),
            rx_tap_errors: g(&self.rx_tap_errors),
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            tx_bad_chains: g(&self.tx_bad_chains),
            tx_dropped_oversize: g(&self.tx_dropped_oversize),
            tx_dropped_bad_header: g(&self.tx_dropped_bad_header),
            tx_tap_errors: g(&self.tx_tap_errors),
        }
    }

    fn restore(&self, s: &NetStats) {
        let p = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        p(&self.rx_frames, s.rx_frames);
        p(&self.rx_bytes, s.rx_bytes);
        p(&self.rx_dropped_too_big, s.rx_dropped_too_big);
        p(&self.rx_dropped_bad_header, s.rx_dropped_bad_header);
        p(&self.rx_bad_chains, s.rx_bad_chains);
        p(&self.rx_tap_errors, s.rx_tap_errors);
        p(&self.tx_frames, s.tx_frames);
        p(&self.tx_bytes, s.tx_bytes);
        p(&self.tx_bad_chains, s.tx_bad_chains);
        p(&self.tx_dropped_oversize, s.tx_dropped_oversize);
        p(&self.tx_dropped_bad_header, s.tx_dropped_bad_header);
        p(&self.tx_tap_errors, s.tx_tap_errors);
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// What a snapshot keeps of a network device beyond the transport's own
/// state (queue positions and addresses, the features the driver acked,
/// the device status), which is not repeated here: a restore takes the
/// acked features from the transport's state.
///
/// Between two requests the device keeps one thing the guest would miss:
/// a frame read from the tap that no guest buffer has taken yet. A frame
/// is never half delivered (nothing of it reaches the used ring until all
/// of it is placed, and a pause waits for the I/O thread to finish its
/// round), so the waiting frame is saved whole and delivered after the
/// restore. Transmit chains the tap had no room for stay on the avail ring
/// and are sent by the restore's kick; the "parked" and "blocked" flags
/// are recomputed by that kick.
///
/// Unlike Firecracker's net state, which records its tap's name and
/// reopens it, the tap is not part of the state: a restore names one per
/// NIC ([`crate::snapshot::RestoreConfig::nets`]), since a clone must not
/// take its source's. Firecracker also drops a frame deferred for want of
/// guest buffers; this device keeps it (`pending_rx`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The MAC config space reported: the one the network saw.
    pub mac: [u8; 6],
    /// The MAC the guest's driver uses: `mac`, unless the saved device
    /// was itself translating (a clone that was snapshotted again).
    pub guest_mac: [u8; 6],
    /// Features offered; a restore onto a tap that cannot offer the same
    /// is refused.
    pub features: u64,
    /// Config space's status field (VIRTIO_NET_S_LINK_UP).
    pub status: u16,
    /// A frame read from the tap that no guest buffer had taken yet,
    /// header first, already in the guest's terms (its MAC translated).
    pub pending_rx: Option<Vec<u8>>,
    pub stats: NetStats,
}

impl NetState {
    /// What decoding cannot check.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(frame) = &self.pending_rx {
            if !(HDR_LEN..=MAX_BUFFER_LEN).contains(&frame.len()) {
                return Err(format!(
                    "a waiting frame of {} bytes; a frame with its header is {HDR_LEN} to {MAX_BUFFER_LEN}",
                    frame.len()
                ));
            }
        }
        if self.status & !LINK_UP != 0 {
            return Err(format!("link status {:#x}", self.status));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the tap offers features {have:#x}, the saved device had {want:#x}")]
    Features { have: u64, want: u64 },
    #[error("the saved device state is not valid: {0}")]
    Invalid(String),
    #[error("the driver acked {0:#x}, which breaks a feature dependency")]
    AckedFeatures(u64),
    #[error("cannot set the tap's offloads")]
    Offload(#[source] io::Error),
}

/// A contiguous guest-memory piece of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// One virtio-net device.
pub struct Net {
    backend: Box<dyn Backend>,
    /// The MAC in config space: the one the network sees.
    mac: [u8; 6],
    /// Set while the guest's driver uses another MAC than `mac` (see
    /// [`MacRewrite`]); a driver reset clears it.
    rewrite: Option<MacRewrite>,
    features: u64,
    acked: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    /// A received frame (header first) and its length, while `pending`.
    rx_buf: Box<[u8]>,
    pending: Option<usize>,
    tx_buf: Box<[u8]>,
    /// The tap said `WouldBlock` on a send: retry when it is writable.
    tx_blocked: bool,
    /// The guest has no room for the waiting frame (or the tap failed):
    /// the tap is not polled until the guest notifies the receive queue.
    rx_parked: bool,
    counters: Arc<NetCounters>,
}

impl Net {
    pub fn new(backend: Box<dyn Backend>, mac: [u8; 6]) -> Net {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | F_MAC
            | F_STATUS
            | F_MRG_RXBUF;
        if backend.supports_offload() {
            features |= OFFLOAD_FEATURES;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Net {
            backend,
            mac,
            rewrite: None,
            features,
            acked: 0,
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            rx_buf: vec![0u8; MAX_BUFFER_LEN].into_boxed_slice(),
            pending: None,
            tx_buf: vec![0u8; MAX_BUFFER_LEN].into_boxed_slice(),
            tx_blocked: false,
            rx_parked: false,
            counters: Arc::default(),
        }
    }

    /// The MAC the network sees (config space's).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MAC the guest's driver uses.
    pub fn guest_mac(&self) -> [u8; 6] {
        self.rewrite.map_or(self.mac, |r| r.guest)
    }

    /// The translation in force, if the guest's MAC is not the wire's.
    pub fn rewrite(&self) -> Option<MacRewrite> {
        self.rewrite
    }

    /// The device's counters, shared: they can be read from any thread
    /// while the device runs.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn state(&self) -> NetState {
        NetState {
            mac: self.mac,
            guest_mac: self.guest_mac(),
            features: self.features,
            status: u16::from_le_bytes([self.config[6], self.config[7]]),
            pending_rx: self.pending.map(|n| self.rx_buf[..n].to_vec()),
            stats: self.counters.stats(),
        }
    }

    /// A device in the saved state over `backend`, seen by the network as
    /// `wire_mac` (which config space reports from now on). `acked` is what
    /// the driver acked, from the transport's saved state (0 when it had
    /// not set DRIVER_OK): the tap's offloads and vnet header are set for
    /// it exactly as activation does on a cold boot, since the transport
    /// restores without a new negotiation. When `wire_mac` is not the MAC
    /// the guest uses, the device translates between them
    /// ([`MacRewrite`]).
    pub fn restore(
        backend: Box<dyn Backend>,
        state: &NetState,
        acked: u64,
        wire_mac: [u8; 6],
    ) -> Result<Net, NetError> {
        state.validate().map_err(NetError::Invalid)?;
        let mut net = Net::new(backend, wire_mac);
        if net.features != state.features {
            return Err(NetError::Features {
                have: net.features,
                want: state.features,
            });
        }
        net.config[6..8].copy_from_slice(&state.status.to_le_bytes());
        net.rewrite = MacRewrite::between(state.guest_mac, wire_mac);
        if let Some(frame) = &state.pending_rx {
            net.rx_buf[..frame.len()].copy_from_slice(frame);
            net.pending = Some(frame.len());
        }
        if acked != 0 {
            if missing_dependency(acked).is_some() {
                return Err(NetError::AckedFeatures(acked));
            }
            net.backend
                .set_offload(tap_offload(acked))
                .map_err(NetError::Offload)?;
            net.acked = acked;
        }
        net.counters.restore(&state.stats);
        Ok(net)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from(&self.config, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> bool {
        if let Some(feature) = missing_dependency(acked_features) {
            tracing::warn!(
                feature,
                "virtio-net driver acked a feature without its dependency"
            );
            return false;
        }
        if let Err(e) = self.backend.set_offload(tap_offload(acked_features)) {
            tracing::warn!(error = %e, "cannot set the tap's offloads");
            return false;
        }
        self.acked = acked_features;
        true
    }

    fn process_queue(&mut self, mem: &GuestMemoryMmap, index: usize, queue: &mut Queue) -> bool {
        match index {
            RX_QUEUE => self.process_rx(mem, queue),
            TX_QUEUE => self.process_tx(mem, queue),
            _ => false,
        }
    }

    fn process_event(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> bool {
        let mut interrupt = false;
        if self.tx_blocked {
            if let Some(q) = queues.get_mut(TX_QUEUE) {
                interrupt |= self.process_tx(mem, q);
            }
        }
        if let Some(q) = queues.get_mut(RX_QUEUE) {
            interrupt |= self.process_rx(mem, q);
        }
        interrupt
    }

    fn backend_interest(&self) -> Interest {
        Interest {
            read: !self.rx_parked,
            write: self.tx_blocked,
        }
    }

    fn state(&self) -> Option<DeviceState> {
        Some(DeviceState::Net(Net::state(self)))
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.pending = None;
        // The next driver reads config space's MAC and uses it.
        self.rewrite = None;
        self.tx_blocked = false;
        self.rx_parked = false;
        // Until the next driver says what it takes, the tap finishes
        // checksums itself.
        if let Err(e) = self.backend.set_offload(0) {
            tracing::debug!(error = %e, "cannot clear the tap's offloads");
        }
    }
}

#[cfg(test)]
mod tests;
