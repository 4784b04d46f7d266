//! Snapshots of a VM with a NIC, inside a network namespace the test
//! makes and removes: the test guest echoes every frame it receives
//! (`cocoon.net.echo`); a snapshot taken while it echoes restores onto its
//! own tap and MAC with no translation, and onto a second tap under a new
//! MAC (a clone), where the network sees only the new MAC while the guest
//! goes on using the one its driver read at boot. A restore that names the
//! wrong number of NICs or a missing tap is refused before KVM is touched.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_vmm::snapshot::{self, RestoreConfig, RestoreError, MEMORY_FILE, STATE_FILE};
use cocoon_vmm::{ExitReason, NetConfig, SerialOutput, Vm, VmConfig};
use netns::{skip, Netns, PacketSocket};
use support::{fields, kvm_or_skip, report, wait_for_log};

const TIMEOUT: Duration = Duration::from_secs(60);
const OLD_MAC: [u8; 6] = [0x02, 0xcc, 0x51, 0, 0, 0x01];
const NEW_MAC: [u8; 6] = [0x02, 0xcc, 0x51, 0, 0, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0xcc, 0x51, 0, 0, 0xfe];
/// IEEE 802 local experimental: nothing in the namespace speaks it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A frame from the peer to `dst` carrying `tag`.
fn probe_frame(dst: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..46u8).map(|i| i ^ tag));
    f
}

/// Sends `frame` until its echo arrives (the first may reach a tap before
/// the guest's driver is up) and returns the echo.
fn exchange(sock: &PacketSocket, frame: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        sock.send(frame).unwrap();
        let round = (Instant::now() + Duration::from_secs(5)).min(deadline);
        while let Some(f) = sock.recv_incoming(round) {
            // Only the echo of this frame: same payload, to the peer.
            if f.get(..6) == Some(&PEER_MAC[..]) && f.get(12..) == frame.get(12..) {
                return f;
            }
        }
        assert!(Instant::now() < deadline, "no echo of the test's frame");
    }
}

fn restore(dir: &Path, nets: Vec<NetConfig>, log: &Path) -> Result<Vm, RestoreError> {
    Vm::restore(RestoreConfig {
        state: dir.join(STATE_FILE),
        memory: dir.join(MEMORY_FILE),
        disks: Vec::new(),
        nets,
        serial: SerialOutput::File(log.to_path_buf()),
    })
}

fn nic(tap: &str, mac: [u8; 6]) -> NetConfig {
    NetConfig {
        tap: tap.into(),
        mac,
    }
}

/// The guest's echo lines in `log` (not its closing `frames=` line).
fn echoes(log: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    fields(
        &report(&std::fs::read_to_string(log).unwrap_or_default()),
        "net-echo",
    )
    .into_iter()
    .filter(|f| f.contains_key("seq"))
    .collect()
}

/// Waits for the VM to power off by itself once it has echoed its count.
fn finish(mut vm: Vm, log: &Path) {
    if vm.wait_timeout(TIMEOUT).is_none() {
        vm.stop();
    }
    let reason = vm.wait();
    let out = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(reason, ExitReason::PowerOff, "{out}");
    assert!(out.contains("net-echo nic=0 frames=2"), "{out}");
}

#[test]
fn a_nic_vm_restores_on_its_own_mac_and_as_a_clone_under_a_new_one() {
    let test = "a_nic_vm_restores_on_its_own_mac_and_as_a_clone_under_a_new_one";
    if !kvm_or_skip(test) {
        return;
    }
    let ns = match Netns::new("netsnap") {
        Ok(ns) => ns,
        Err(reason) if std::env::var_os("CI").is_none() => return skip(test, &reason),
        Err(reason) => panic!("{test}: {reason} (and CI is set)"),
    };
    ns.bridge("br0");
    ns.tap_on("tapa", "br0");
    ns.tap_on("tapb", "br0");
    ns.veth_on("veth0", "veth0p", "br0");
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let logs: Vec<_> = ["boot", "same", "clone"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.log")))
        .collect();
    ns.enter(|| {
        let sock = PacketSocket::open("veth0").expect("packet socket on veth0");
        let mut config = VmConfig::new(support::test_guest());
        config.cmdline = "cocoon.net.echo=0:2:60000".into();
        config.nets.push(nic("tapa", OLD_MAC));
        config.serial = SerialOutput::File(logs[0].clone());
        let mut vm = Vm::start(config).expect("start the VM");
        wait_for_log(&logs[0], "the guest's NIC", |s| s.contains("nic index=0"));
        let echo = exchange(&sock, &probe_frame(OLD_MAC, 1));
        assert_eq!(&echo[6..12], &OLD_MAC, "the echo's source");
        // The guest reports an echo after sending it.
        wait_for_log(&logs[0], "the first echo's line", |s| {
            s.contains("net-echo nic=0 seq=1 ")
        });

        // Snapshot while the guest waits for its second frame.
        vm.pause();
        let info = vm.snapshot(&snap).expect("snapshot a VM with a NIC");
        assert_eq!(info.version, snapshot::FORMAT_VERSION);
        assert_eq!(info.nics.len(), 1);
        assert_eq!(
            (info.nics[0].mac, info.nics[0].guest_mac),
            (OLD_MAC, OLD_MAC)
        );
        vm.stop();
        vm.wait();
        drop(vm);
        let summary = snapshot::verify_state(&snap.join(STATE_FILE)).unwrap();
        assert_eq!(summary.nics, info.nics);

        // Refused before KVM: a count mismatch, a tap that is not there.
        match restore(&snap, Vec::new(), &logs[1]) {
            Err(e @ RestoreError::NicCount { saved: 1, given: 0 }) => assert_eq!(
                e.to_string(),
                "the snapshot has 1 NICs; the restore names 0"
            ),
            other => panic!("expected NicCount, got {:?}", other.err()),
        }
        match restore(&snap, vec![nic("gone0", NEW_MAC)], &logs[1]) {
            Err(e @ RestoreError::Tap { index: 0, .. }) => {
                let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
                assert_eq!(
                    chain,
                    "NIC 0 (tap gone0): there is no network interface named gone0"
                );
            }
            other => panic!("expected Tap, got {:?}", other.err()),
        }

        // Onto its own tap and MAC: no translation.
        let vm = restore(&snap, vec![nic("tapa", OLD_MAC)], &logs[1]).expect("restore");
        let echo = exchange(&sock, &probe_frame(OLD_MAC, 2));
        assert_eq!(&echo[6..12], &OLD_MAC);
        finish(vm, &logs[1]);
        let e = echoes(&logs[1]);
        assert_eq!(e[0]["seq"], "2", "the restored guest goes on: {e:?}");
        assert_eq!(e[0]["rx_dst"], mac_str(OLD_MAC));

        // As a clone, on a second tap under a new MAC: the network sees
        // only the new MAC, the guest only its old one.
        let vm = restore(&snap, vec![nic("tapb", NEW_MAC)], &logs[2]).expect("restore as a clone");
        let echo = exchange(&sock, &probe_frame(NEW_MAC, 3));
        assert_eq!(&echo[6..12], &NEW_MAC, "the echo's source on the wire");
        assert_eq!(&echo[..6], &PEER_MAC);
        finish(vm, &logs[2]);
        let e = echoes(&logs[2]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0]["seq"], "2");
        assert_eq!(
            e[0]["rx_dst"],
            mac_str(OLD_MAC),
            "the guest saw its own MAC"
        );
        assert_eq!(e[0]["rx_src"], mac_str(PEER_MAC));
        assert_eq!(e[0]["tx_src"], mac_str(OLD_MAC), "the guest sent as before");
        assert_eq!(e[0]["outcome"], "ok");
        // Before the snapshot, the guest's one echo.
        let before = echoes(&logs[0]);
        assert_eq!(before.len(), 1);
        assert_eq!(before[0]["seq"], "1");
    });
}
