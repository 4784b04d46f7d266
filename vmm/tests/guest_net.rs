//! virtio-net end to end, inside network namespaces the tests make and
//! remove: the test guest (driving the device through `virtio-drivers`)
//! sends an ARP request and a UDP datagram that a packet socket on a veth
//! of the same bridge receives and checks, and reports the frames the test
//! sends it, checksums verified by the guest; two VMs on one bridge
//! exchange datagrams; opening a tap that is missing, busy or not a tap
//! fails with an error that says so.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cocoon_vmm::devices::virtio::net::tap::{Tap, TapError};
use cocoon_vmm::{NetConfig, Vm, VmConfig, VmError};
use netns::{skip, Netns, PacketSocket};
use support::{fields, kvm_or_skip, report, run_vm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(90);
const GUEST_MAC: [u8; 6] = [0x02, 0xcc, 0x00, 0x00, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0xcc, 0x00, 0x00, 0x00, 0x02];
const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
const PEER_IP: [u8; 4] = [10, 99, 0, 1];

fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::new("net") {
        Ok(ns) => Some(ns),
        Err(reason) if std::env::var_os("CI").is_none() => {
            skip(test, &reason);
            None
        }
        Err(reason) => panic!("{test}: {reason} (and CI is set)"),
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_str(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// The guest's payload pattern (tests/guest/src/frames.rs).
fn payload_byte(i: usize) -> u8 {
    i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(7)
}

fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap()
}

fn udp_pseudo(src: &[u8], dst: &[u8], len: usize) -> u32 {
    sum16(sum16(0, src), dst) + 17 + u32::try_from(len).unwrap()
}

/// An IPv4/UDP frame with correct checksums (or a broken UDP one).
fn udp_frame(dst_mac: [u8; 6], port: u16, payload: &[u8], break_udp_csum: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 7, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&u16::try_from(20 + udp_len).unwrap().to_be_bytes());
    ip.extend_from_slice(&PEER_IP);
    ip.extend_from_slice(&GUEST_IP);
    let c = !fold(sum16(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut c = !fold(sum16(udp_pseudo(&PEER_IP, &GUEST_IP, udp_len), &udp));
    if c == 0 {
        c = 0xffff;
    }
    if break_udp_csum {
        c ^= 0x0101;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(udp);
    f
}

/// Checks a UDP frame the guest sent: both checksums hold, the payload is
/// the guest's pattern. Returns (dport, payload length).
fn check_guest_udp(f: &[u8]) -> (u16, usize) {
    assert_eq!(&f[6..12], &GUEST_MAC, "source MAC");
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    let ip = &f[14..34];
    assert_eq!(fold(sum16(0, ip)), 0xffff, "IPv4 header checksum");
    assert_eq!(&ip[12..16], &GUEST_IP);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp = &f[34..14 + total];
    let udp_len = udp.len();
    assert_eq!(
        fold(sum16(udp_pseudo(&ip[12..16], &ip[16..20], udp_len), udp)),
        0xffff,
        "UDP checksum"
    );
    let payload = &udp[8..];
    assert!(payload
        .iter()
        .enumerate()
        .all(|(i, b)| *b == payload_byte(i)));
    (u16::from_be_bytes([udp[2], udp[3]]), payload.len())
}

/// A network with the VM's tap and a veth end for the test, on one bridge.
fn bridged(ns: &Netns) {
    ns.bridge("br0");
    ns.tap_on("tap0", "br0");
    ns.veth_on("veth0", "veth0p", "br0");
}

#[test]
fn guest_frames_cross_the_bridge_both_ways_with_checksums() {
    let test = "guest_frames_cross_the_bridge_both_ways_with_checksums";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    bridged(&ns);
    let guest = test_guest();
    let cmdline = format!(
        "cocoon.net.arp=0:{g}:{p} cocoon.net.udp=0:{g}:{p}:4000:300 cocoon.net.recv=0:3:30000",
        g = ip_str(GUEST_IP),
        p = ip_str(PEER_IP)
    );
    let payload: Vec<u8> = (0..24u8).map(|i| i.wrapping_mul(3) ^ 0xa5).collect();
    let (serial, stats, seen) = ns.enter(|| {
        let sock = PacketSocket::open("veth0").expect("packet socket on veth0");
        let mut config = VmConfig::new(&guest);
        config.cmdline = cmdline;
        config.nets.push(NetConfig {
            tap: "tap0".into(),
            mac: GUEST_MAC,
        });
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        config.serial = cocoon_vmm::SerialOutput::File(log.clone());
        let mut vm = Vm::start(config).expect("start the VM");
        // The guest's two frames, in order. Only frames from the guest's
        // MAC count: the bridge also forwards the namespace's own traffic
        // (IGMP reports to 01:00:5e:00:00:16 as its ports come up).
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let f = sock
                .recv_incoming(deadline)
                .expect("the guest's frames reach the veth");
            if f.get(6..12) == Some(&GUEST_MAC[..]) {
                seen.push(f);
            }
        }
        // Three frames for the guest: a datagram, one with a broken UDP
        // checksum, and a broadcast ARP request.
        sock.send(&udp_frame(GUEST_MAC, 5000, &payload, false))
            .unwrap();
        sock.send(&udp_frame(GUEST_MAC, 5001, &payload, true))
            .unwrap();
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&PEER_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&PEER_MAC);
        arp.extend_from_slice(&PEER_IP);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&GUEST_IP);
        sock.send(&arp).unwrap();
        let counters = vm.net_counters(0).unwrap();
        if vm.wait_timeout(TIMEOUT).is_none() {
            vm.stop();
        }
        let reason = vm.wait();
        assert_eq!(reason, cocoon_vmm::ExitReason::PowerOff);
        (
            std::fs::read_to_string(&log).unwrap(),
            counters.stats(),
            seen,
        )
    });
    let lines = report(&serial);
    assert!(lines.iter().all(|l| !l.starts_with("error")), "{serial}");
    let nic = &fields(&lines, "nic")[0];
    assert_eq!(nic["mac"], mac_str(GUEST_MAC), "{serial}");
    assert_eq!(nic["link"], "up");

    // What the test saw of the guest: the ARP request, then the datagram.
    let arp = &seen[0];
    assert_eq!(&arp[..6], &[0xff; 6]);
    assert_eq!(&arp[12..14], &[0x08, 0x06]);
    assert_eq!(&arp[20..22], &[0, 1], "ARP request");
    assert_eq!(&arp[22..28], &GUEST_MAC, "sender MAC");
    assert_eq!(&arp[28..32], &GUEST_IP, "sender IP");
    assert_eq!(&arp[38..42], &PEER_IP, "target IP");
    assert_eq!(check_guest_udp(&seen[1]), (4000, 300 - 42));

    // What the guest saw of the test's frames, checksums checked by it.
    let rx = fields(&lines, "net-rx");
    assert_eq!(rx.len(), 3, "{serial}");
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let want_udp = |port: &str, csum: &str| -> BTreeMap<String, String> {
        [
            ("nic", "0"),
            ("dst", &mac_str(GUEST_MAC)),
            ("src", &mac_str(PEER_MAC)),
            ("type", "0x0800"),
            ("src_ip", &ip_str(PEER_IP)),
            ("dst_ip", &ip_str(GUEST_IP)),
            ("proto", "17"),
            ("ip_csum", "ok"),
            ("sport", port),
            ("dport", port),
            ("udp_csum", csum),
            ("payload_len", "24"),
            ("payload", &hex),
            ("len", "66"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    assert_eq!(rx[0], want_udp("5000", "ok"));
    assert_eq!(rx[1], want_udp("5001", "bad"));
    assert_eq!(rx[2]["type"], "0x0806");
    assert_eq!(rx[2]["arp_op"], "1");
    assert_eq!(rx[2]["spa"], ip_str(PEER_IP));
    assert_eq!(rx[2]["tpa"], ip_str(GUEST_IP));
    assert!(
        lines.contains(&"net-recv nic=0 frames=3".to_string()),
        "{serial}"
    );
    let sent: Vec<_> = fields(&lines, "net-tx");
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|t| t["outcome"] == "ok"));

    // The device's own count: nothing dropped either way.
    assert_eq!((stats.tx_frames, stats.rx_frames), (2, 3), "{stats:?}");
    assert_eq!(
        stats.tx_bad_chains
            + stats.tx_dropped_bad_header
            + stats.tx_dropped_oversize
            + stats.tx_tap_errors
            + stats.rx_bad_chains
            + stats.rx_dropped_too_big
            + stats.rx_dropped_bad_header
            + stats.rx_tap_errors,
        0,
        "{stats:?}"
    );
}

#[test]
fn two_vms_on_one_bridge_exchange_datagrams() {
    let test = "two_vms_on_one_bridge_exchange_datagrams";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.tap_on("tapa", "br0");
    ns.tap_on("tapb", "br0");
    let guest = test_guest();
    let (a_mac, b_mac) = ([2, 0xcc, 0, 0, 0, 0xa], [2, 0xcc, 0, 0, 0, 0xb]);
    let dash = |m: [u8; 6]| mac_str(m).replace(':', "-");
    let config = |tap: &str, mac: [u8; 6], me: &str, peer: &str, peer_mac: [u8; 6]| {
        let mut c = VmConfig::new(&guest);
        c.cmdline = format!(
            "cocoon.net.udp=0:{me}:{peer}:7000:120:{} cocoon.net.recv=0:1:30000",
            dash(peer_mac)
        );
        c.nets.push(NetConfig {
            tap: tap.into(),
            mac,
        });
        c
    };
    let a = config("tapa", a_mac, "10.99.0.10", "10.99.0.11", b_mac);
    let b = config("tapb", b_mac, "10.99.0.11", "10.99.0.10", a_mac);
    let (out_a, out_b) = ns.enter(|| {
        // Both taps are attached (their VMs built) before either guest
        // sends: a frame for a tap nobody holds is dropped by the kernel.
        std::thread::scope(|s| {
            let vb = s.spawn(|| run_vm(b, TIMEOUT));
            let va = s.spawn(|| run_vm(a, TIMEOUT));
            (va.join().unwrap(), vb.join().unwrap())
        })
    });
    for ((reason, serial), (me, mac, from)) in [
        (out_a, ("10.99.0.10", a_mac, b_mac)),
        (out_b, ("10.99.0.11", b_mac, a_mac)),
    ] {
        assert_eq!(reason, cocoon_vmm::ExitReason::PowerOff, "{serial}");
        let lines = report(&serial);
        let rx = fields(&lines, "net-rx");
        assert_eq!(rx.len(), 1, "{serial}");
        let f = &rx[0];
        assert_eq!(f["dst"], mac_str(mac));
        assert_eq!(f["src"], mac_str(from));
        assert_eq!(f["dst_ip"], me);
        assert_eq!(
            (f["ip_csum"].as_str(), f["udp_csum"].as_str()),
            ("ok", "ok")
        );
        assert_eq!(f["payload_len"], "78");
        let want: String = (0..32)
            .map(|i| format!("{:02x}", payload_byte(i)))
            .collect();
        assert_eq!(f["payload"], want);
    }
}

#[test]
fn opening_a_tap_that_is_missing_busy_or_not_a_tap_says_so() {
    let test = "opening_a_tap_that_is_missing_busy_or_not_a_tap_says_so";
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.ip("tuntap add dev tapx mode tap");
    ns.ip("tuntap add dev tunx mode tun");
    ns.enter(|| {
        assert!(matches!(Tap::open("nosuch0"), Err(TapError::NotFound(n)) if n == "nosuch0"));
        assert!(matches!(Tap::open("br0"), Err(TapError::NotATap(_))));
        assert!(matches!(Tap::open("tunx"), Err(TapError::NotATap(_))));
        let held = Tap::open("tapx").expect("open the tap");
        match Tap::open("tapx") {
            Err(e @ TapError::Busy(_)) => {
                assert_eq!(
                    e.to_string(),
                    "tap tapx is busy: another process has it open"
                )
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(held);
        // Free again once the holder lets go, and still there.
        let again = Tap::open("tapx").expect("reopen the tap");
        assert_eq!(again.name(), "tapx");
    });
}

#[test]
fn a_vm_with_a_missing_tap_fails_to_start_naming_it() {
    let test = "a_vm_with_a_missing_tap_fails_to_start_naming_it";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    let mut config = VmConfig::new(test_guest());
    config.nets.push(NetConfig {
        tap: "gone0".into(),
        mac: GUEST_MAC,
    });
    let err = ns.enter(|| Vm::start(config).err().expect("the start fails"));
    assert!(matches!(err, VmError::Net { index: 0, .. }), "{err:?}");
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        "network device 0 (tap gone0): there is no network interface named gone0"
    );
}
