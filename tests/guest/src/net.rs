//! Network devices: setting them up with `virtio-drivers`' raw net driver
//! and the `cocoon.net.*` actions (see PROTOCOL.md).
//!
//! Receive buffers are posted when a device is set up, so frames that
//! arrive before a `recv` wait in them. Requests are polled, never
//! interrupt-driven, and every wait is bounded.

use crate::hal::GuestHal;
use crate::{say, tsc};
use cocoon_test_guest::frames::{self, Endpoints, Kind};
use cocoon_test_guest::netcmd::{BROADCAST, Ip, Mac, NetAction};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result as VirtioResult};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Descriptors per queue.
const QUEUE_SIZE: usize = 64;
/// Receive buffers posted per device, each big enough for a header and a
/// 1514-byte frame (the driver's minimum is 1526).
const RX_BUFFERS: usize = 8;
const RX_BUFFER_LEN: usize = 2048;
pub const MAX_NICS: usize = 4;
/// virtio_net_hdr_v1.
const HDR_LEN: usize = 12;
/// A header and the largest frame the guest sends (a 64 KiB TSO frame).
const TX_BUFFER_LEN: usize = HDR_LEN + frames::ETH_HLEN + 65535;
/// A frame not sent, or not received, in this long means a dead device.
const TIMEOUT_MS: u64 = 30_000;
/// Report at most this many payload bytes of a received datagram.
const PAYLOAD_SHOWN: usize = 32;

const F_CSUM: u64 = 1 << 0;
const F_HOST_TSO4: u64 = 1 << 11;
const F_STATUS: u64 = 1 << 16;

/// The memory all network I/O goes through (device-visible at its address).
#[repr(C, align(4096))]
struct NetArea {
    rx: [[[u8; RX_BUFFER_LEN]; RX_BUFFERS]; MAX_NICS],
    tx: [u8; TX_BUFFER_LEN],
}

struct AreaCell(UnsafeCell<NetArea>);

// SAFETY: the only access is through `take_area`, which hands out the
// single `&mut` once.
unsafe impl Sync for AreaCell {}

// In .noinit, like the disk I/O buffer: every byte is written, by the
// device or by us, before it is read.
// SAFETY (link_section): linker.ld gives .noinit.* a NOBITS output section
// of its own, where nothing else overlaps this area.
#[unsafe(link_section = ".noinit.net_area")]
static AREA: AreaCell = AreaCell(UnsafeCell::new(NetArea {
    rx: [[[0; RX_BUFFER_LEN]; RX_BUFFERS]; MAX_NICS],
    tx: [0; TX_BUFFER_LEN],
}));
static AREA_TAKEN: AtomicBool = AtomicBool::new(false);

fn take_area() -> Option<&'static mut NetArea> {
    if AREA_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the flag lets exactly one caller through, so this is the only
    // reference ever made to the area.
    Some(unsafe { &mut *AREA.0.get() })
}

/// The device's receive buffers and the shared transmit buffer, split out
/// of the area once.
pub struct Buffers {
    rx: [Option<&'static mut [[u8; RX_BUFFER_LEN]; RX_BUFFERS]>; MAX_NICS],
    tx: &'static mut [u8; TX_BUFFER_LEN],
}

impl Buffers {
    pub fn tx(&mut self) -> &mut [u8; TX_BUFFER_LEN] {
        self.tx
    }

    pub fn take() -> Option<Buffers> {
        let area = take_area()?;
        let [a, b, c, d] = &mut area.rx;
        Some(Buffers {
            rx: [Some(a), Some(b), Some(c), Some(d)],
            tx: &mut area.tx,
        })
    }
}

/// A transport that also asks for checksum offload and TSO (IPv4) when the
/// device offers them: `virtio-drivers`' net driver negotiates neither, and
/// the `blast` benchmark's TSO frames need both. The driver itself never
/// sets an offload flag; only `blast ... tso` does, in its own header.
pub struct OffloadTransport<T: Transport> {
    inner: T,
}

/// The features the wrapper adds when `offered` has them.
fn offload_extra(offered: u64) -> u64 {
    // TSO4 depends on CSUM (virtio 1.2, 5.1.3.1).
    if offered & F_CSUM == 0 {
        0
    } else {
        offered & (F_CSUM | F_HOST_TSO4)
    }
}

impl<T: Transport> Transport for OffloadTransport<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let extra = offload_extra(self.inner.read_device_features());
        self.inner.write_driver_features(driver_features | extra)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> VirtioResult<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> VirtioResult<()> {
        self.inner.write_config_space(offset, value)
    }
}

type Driver = VirtIONetRaw<GuestHal, OffloadTransport<MmioTransport<'static>>, QUEUE_SIZE>;

/// One set-up network device.
pub struct Nic {
    pub index: usize,
    dev: Driver,
    mac: [u8; 6],
    tso: bool,
    rx: &'static mut [[u8; RX_BUFFER_LEN]; RX_BUFFERS],
    /// The token of each posted receive buffer.
    tokens: [Option<u16>; RX_BUFFERS],
}

/// Sets up the network device behind `transport`, posts its receive
/// buffers and prints its `nic` line.
pub fn probe(
    index: usize,
    addr: u64,
    transport: MmioTransport<'static>,
    buffers: &mut Buffers,
) -> Result<Nic, VirtioError> {
    let mut transport = OffloadTransport { inner: transport };
    let offered = transport.read_device_features();
    let tso = offload_extra(offered) & F_HOST_TSO4 != 0;
    // The status field means something only with VIRTIO_NET_F_STATUS;
    // without it the link is up (virtio 1.2, 5.1.4.2).
    let link_up = offered & F_STATUS == 0 || transport.read_config_space::<u16>(6)? & 1 == 1;
    let rx = buffers
        .rx
        .get_mut(index)
        .and_then(Option::take)
        .ok_or(VirtioError::InvalidParam)?;
    let dev = VirtIONetRaw::new(transport)?;
    let mut nic = Nic {
        index,
        mac: dev.mac_address(),
        tso,
        dev,
        rx,
        tokens: [None; RX_BUFFERS],
    };
    for i in 0..RX_BUFFERS {
        nic.post(i)?;
    }
    say!(
        "nic index={index} addr={addr:#x} mac={} link={} tso={}",
        Mac(nic.mac, ':'),
        if link_up { "up" } else { "down" },
        u8::from(nic.tso),
    );
    Ok(nic)
}

impl Nic {
    /// Posts receive buffer `i`.
    fn post(&mut self, i: usize) -> Result<(), VirtioError> {
        // SAFETY: the buffer is 'static and is not touched again until the
        // device has returned it (`recv` matches tokens before reading).
        let token = unsafe { self.dev.receive_begin(&mut self.rx[i])? };
        self.tokens[i] = Some(token);
        Ok(())
    }

    pub fn run(&mut self, action: &NetAction, tx: &mut [u8; TX_BUFFER_LEN]) {
        match *action {
            NetAction::Arp { sender, target, .. } => {
                let len = frames::arp_request(&mut tx[HDR_LEN..], self.mac, sender, target);
                let outcome = self.send_one(tx, len);
                self.report_tx("arp", len, outcome);
            }
            NetAction::Udp {
                src,
                dst,
                port,
                len,
                dst_mac,
                ..
            } => {
                let e = Endpoints {
                    src_mac: self.mac,
                    dst_mac,
                    src_ip: src,
                    dst_ip: dst,
                    port,
                };
                let len = frames::udp(&mut tx[HDR_LEN..], &e, len as usize);
                let outcome = self.send_one(tx, len);
                self.report_tx("udp", len, outcome);
            }
            NetAction::Recv { count, ms, .. } => self.recv(count, ms, None),
            NetAction::Echo { count, ms, .. } => self.recv(count, ms, Some(tx)),
            NetAction::Blast {
                len, count, tso, ..
            } => self.blast(tx, len as usize, count, tso),
        }
    }

    fn report_tx(&self, kind: &str, len: usize, outcome: Result<(), &'static str>) {
        match outcome {
            Ok(()) => say!("net-tx nic={} kind={kind} len={len} outcome=ok", self.index),
            Err(e) => say!(
                "net-tx nic={} kind={kind} len={len} outcome=error reason={e}",
                self.index
            ),
        }
    }

    fn deadline(ms: u64) -> u64 {
        // With no known TSC frequency, assume 3 GHz: a guard, not a measure.
        let khz = tsc::khz().unwrap_or(3_000_000);
        tsc::now().saturating_add(khz.saturating_mul(ms))
    }

    /// Sends the frame of `len` bytes at `tx[HDR_LEN..]` with a plain header.
    fn send_one(&mut self, tx: &mut [u8; TX_BUFFER_LEN], len: usize) -> Result<(), &'static str> {
        tx[..HDR_LEN].fill(0);
        let buf = &tx[..HDR_LEN + len];
        // SAFETY: `buf` is not written until the device returns it: the
        // loop below waits for that or powers off.
        let token = unsafe { self.dev.transmit_begin(buf) }.map_err(|_| "queue-full")?;
        let deadline = Self::deadline(TIMEOUT_MS);
        loop {
            match self.dev.poll_transmit() {
                Some(t) if t == token => break,
                Some(_) => crate::fatal("net: completion for another request"),
                None if tsc::now() > deadline => crate::fatal("net: transmit timed out"),
                None => core::hint::spin_loop(),
            }
        }
        // SAFETY: the same buffer as passed to transmit_begin, now returned.
        unsafe { self.dev.transmit_complete(token, buf) }
            .map(|_| ())
            .map_err(|_| "device-error")
    }

    /// `cocoon.net.recv`: report up to `count` frames within `ms`; with
    /// `echo` (`cocoon.net.echo`), send each back instead.
    fn recv(&mut self, count: u32, ms: u32, mut echo: Option<&mut [u8; TX_BUFFER_LEN]>) {
        let deadline = Self::deadline(u64::from(ms));
        let mut got = 0u32;
        while got < count && tsc::now() <= deadline {
            let Some(token) = self.dev.poll_receive() else {
                core::hint::spin_loop();
                continue;
            };
            let Some(i) = self.tokens.iter().position(|t| *t == Some(token)) else {
                crate::fatal("net: completion for a buffer never posted");
            };
            self.tokens[i] = None;
            // SAFETY: buffer `i` is the one posted with this token, and the
            // device has returned it.
            let done = unsafe { self.dev.receive_complete(token, &mut self.rx[i]) };
            match done {
                Ok((hdr_len, len)) => {
                    got += 1;
                    match echo.as_deref_mut() {
                        Some(tx) => self.echo(tx, i, hdr_len, len, got),
                        None => self.report_rx(&self.rx[i][hdr_len..hdr_len + len]),
                    }
                }
                Err(e) => say!("error nic={} receive failed: {e}", self.index),
            }
            if let Err(e) = self.post(i) {
                say!(
                    "error nic={} cannot re-post a receive buffer: {e}",
                    self.index
                );
            }
        }
        let kind = if echo.is_some() { "echo" } else { "recv" };
        say!("net-{kind} nic={} frames={got}", self.index);
    }

    /// Sends received frame `seq` (in buffer `i`) back to its source from
    /// the MAC the driver read at probe, and reports both addresses it
    /// had: what the guest saw is what a test checks a VMM's MAC
    /// translation by.
    fn echo(
        &mut self,
        tx: &mut [u8; TX_BUFFER_LEN],
        i: usize,
        hdr_len: usize,
        len: usize,
        seq: u32,
    ) {
        let frame = &self.rx[i][hdr_len..hdr_len + len];
        if frame.len() < frames::ETH_HLEN {
            return say!("net-echo nic={} seq={seq} len={len} short", self.index);
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        src.copy_from_slice(&frame[6..12]);
        let body = &mut tx[HDR_LEN..HDR_LEN + len];
        body.copy_from_slice(frame);
        body[..6].copy_from_slice(&src);
        body[6..12].copy_from_slice(&self.mac);
        let outcome = self.send_one(tx, len);
        say!(
            "net-echo nic={} seq={seq} rx_dst={} rx_src={} tx_src={} len={len} outcome={}",
            self.index,
            Mac(dst, ':'),
            Mac(src, ':'),
            Mac(self.mac, ':'),
            match outcome {
                Ok(()) => "ok",
                Err(e) => e,
            }
        );
    }

    fn report_rx(&self, frame: &[u8]) {
        let n = self.index;
        let Some(p) = frames::parse(frame) else {
            return say!("net-rx nic={n} len={} short", frame.len());
        };
        let head = Head {
            nic: n,
            len: frame.len(),
            dst: p.dst,
            src: p.src,
            ethertype: p.ethertype,
        };
        match p.kind {
            Kind::Arp { op, sha, spa, tpa } => say!(
                "{head} arp_op={op} sha={} spa={} tpa={}",
                Mac(sha, ':'),
                Ip(spa),
                Ip(tpa)
            ),
            Kind::Ipv4 {
                src,
                dst,
                proto,
                header_csum,
                udp: Some(u),
            } => say!(
                "{head} src_ip={} dst_ip={} proto={proto} ip_csum={} sport={} dport={} udp_csum={} payload_len={} payload={}",
                Ip(src),
                Ip(dst),
                header_csum.name(),
                u.sport,
                u.dport,
                u.csum.name(),
                u.payload.len(),
                Hex(&u.payload[..u.payload.len().min(PAYLOAD_SHOWN)]),
            ),
            Kind::Ipv4 {
                src,
                dst,
                proto,
                header_csum,
                udp: None,
            } => say!(
                "{head} src_ip={} dst_ip={} proto={proto} ip_csum={}",
                Ip(src),
                Ip(dst),
                header_csum.name()
            ),
            Kind::Other => say!("{head}"),
            Kind::Truncated => say!("{head} truncated"),
        }
    }

    /// `cocoon.net.blast`: `count` copies of one frame, as many in flight
    /// as the queue holds, timed from the first send to the last completion.
    fn blast(&mut self, tx: &mut [u8; TX_BUFFER_LEN], len: usize, count: u32, tso: bool) {
        let n = self.index;
        if tso && !self.tso {
            return say!("error net-blast nic={n}: the device did not offer TSO");
        }
        let Some(khz) = tsc::khz() else {
            return say!("error net-blast nic={n}: TSC frequency unknown");
        };
        let e = Endpoints {
            src_mac: self.mac,
            dst_mac: BROADCAST,
            src_ip: [10, 0, 0, 2],
            dst_ip: [10, 0, 0, 99],
            port: 9,
        };
        tx[..HDR_LEN].fill(0);
        if tso {
            frames::tcp_for_tso(&mut tx[HDR_LEN..], &e, len);
            tx[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
            tx[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
            tx[2..4].copy_from_slice(&frames::TCP_HEADERS_LEN.to_le_bytes());
            tx[4..6].copy_from_slice(&frames::TSO_MSS.to_le_bytes());
            tx[6..8].copy_from_slice(&frames::TCP_CSUM_START.to_le_bytes());
            tx[8..10].copy_from_slice(&frames::TCP_CSUM_OFFSET.to_le_bytes());
        } else {
            frames::udp(&mut tx[HDR_LEN..], &e, len);
        }
        let buf = &tx[..HDR_LEN + len];
        let (mut sent, mut done) = (0u32, 0u32);
        let start = tsc::now();
        let deadline = Self::deadline(TIMEOUT_MS);
        while done < count {
            while sent < count && self.dev.can_send() {
                // SAFETY: `buf` is only read by the device and not written
                // until every copy in flight has completed (this loop).
                match unsafe { self.dev.transmit_begin(buf) } {
                    Ok(_) => sent += 1,
                    Err(_) => break,
                }
            }
            while let Some(token) = self.dev.poll_transmit() {
                // SAFETY: every request in flight was made with `buf`.
                if unsafe { self.dev.transmit_complete(token, buf) }.is_err() {
                    crate::fatal("net: transmit completion failed");
                }
                done += 1;
            }
            if tsc::now() > deadline {
                crate::fatal("net: blast timed out");
            }
        }
        let ns = tsc::ticks_to_ns(tsc::now() - start, khz);
        say!(
            "net-blast nic={n} len={len} count={count} tso={} ns={ns}",
            u8::from(tso)
        );
    }
}

/// The common start of a `net-rx` line.
struct Head {
    nic: usize,
    len: usize,
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
}

impl core::fmt::Display for Head {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "net-rx nic={} len={} dst={} src={} type={:#06x}",
            self.nic,
            self.len,
            Mac(self.dst, ':'),
            Mac(self.src, ':'),
            self.ethertype
        )
    }
}

/// Lower-case hex.
struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
