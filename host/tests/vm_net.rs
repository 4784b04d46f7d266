//! The VM lifecycle's NICs end to end, every command run inside a network
//! namespace the test makes and removes: two VMs `run -d --network
//! bridge=` on one bridge exchange datagrams (the test guest sends and
//! reports them, checksums verified), each gets a tap the host made and
//! named after it, `stop` and a guest's power-off delete it, a killed
//! monitor's tap is replaced by the next start and deleted by `rm`, and
//! the seed's `network-config` names the NICs' MACs. Mistakes (a missing,
//! busy or wrong tap, a missing bridge, a bad MAC) are refused with the
//! reason, leaving no VM and no tap.

#[path = "../../vmm/tests/support/netns.rs"]
mod netns;
mod vm_common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{skip, Netns};
use serde_json::Value;
use vmm_support::{fields, kvm_or_skip, report, test_guest};

/// A state dir and a disk image, with every command run in the namespace
/// (whose taps the VMs' removal deletes before the namespace goes).
type Host = vm_common::Host<Netns>;

fn host(ns: Netns) -> Host {
    let prefix = ["ip", "netns", "exec", &ns.name].map(String::from).to_vec();
    Host::with(prefix, ns)
}

impl Host {
    /// The arguments of `run -d`/`create` of the test image booting the
    /// test guest with `cmdline`, then `extra`.
    fn vm_args<'a>(&'a self, guest: &'a Path, name: &'a str, cmdline: &'a str) -> Vec<&'a str> {
        vec![
            "--name",
            name,
            "--memory",
            "64M",
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            cmdline,
            self.image.to_str().unwrap(),
        ]
    }

    /// The namespace's interfaces whose names start with `prefix`.
    fn links(&self, prefix: &str) -> Vec<String> {
        let out = self.guard.exec(&["ip", "-o", "link", "show"]).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    fn link(&self, name: &str) -> Option<String> {
        let out = self
            .guard
            .exec(&["ip", "-d", "link", "show", name])
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::new("vmnet") {
        Ok(ns) => Some(ns),
        Err(reason) if std::env::var_os("CI").is_none() => {
            skip(test, &reason);
            None
        }
        Err(reason) => panic!("{test}: {reason} (and CI is set)"),
    }
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const MAC_A: &str = "02:cc:00:00:01:0a";
const MAC_B: &str = "02:cc:00:00:01:0b";

/// The one datagram a guest received, checked: from `from` to `to`,
/// checksums good, the guest's payload pattern. Other frames the guest
/// saw (the namespace's own IGMP reports) are not the test's.
fn check_datagram(log: &str, to: &str, from: &str, src_ip: &str, both: &str) {
    let lines = report(log);
    let rx: Vec<_> = fields(&lines, "net-rx")
        .into_iter()
        .filter(|f| f.get("proto").map(String::as_str) == Some("17"))
        .collect();
    let log = both;
    assert_eq!(rx.len(), 1, "{log}");
    let f = &rx[0];
    assert_eq!(f["dst"], to, "{log}");
    assert_eq!(f["src"], from, "{log}");
    assert_eq!(f["src_ip"], src_ip, "{log}");
    assert_eq!(f["ip_csum"], "ok", "{log}");
    assert_eq!(f["udp_csum"], "ok", "{log}");
    assert_eq!(f["dport"], "7000", "{log}");
    // 120-byte frame: 42 bytes of headers, 78 of payload, i*31+7.
    assert_eq!(f["payload_len"], "78", "{log}");
    let want: String = (0..32u32)
        .map(|i| format!("{:02x}", (i * 31 + 7) % 256))
        .collect();
    assert_eq!(f["payload"], want, "{log}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("net-recv nic=0 frames=")),
        "{log}"
    );
}

#[test]
fn two_vms_on_a_bridge_exchange_datagrams_and_their_taps_go_with_them() {
    let test = "two_vms_on_a_bridge_exchange_datagrams_and_their_taps_go_with_them";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    let h = host(ns);
    let guest = test_guest();
    let dash = |m: &str| m.replace(':', "-");
    // B listens for 30 s, then answers; A sends after 2 s, then listens
    // for 60 s; both then keep counting, so they run until stopped. Each
    // takes up to 4 frames: the namespace's interfaces send IGMP reports
    // of their own. A waits because a bridge port forwards only once the
    // kernel's link watch has seen the tap's carrier (it comes when the
    // VMM opens the tap, and may take a second or more on a loaded
    // machine); a frame before that is dropped.
    let cmd_b = format!(
        "cocoon.net.recv=0:4:30000 cocoon.net.udp=0:10.98.0.11:10.98.0.10:7000:120:{} cocoon.count=100:0",
        dash(MAC_A)
    );
    let cmd_a = format!(
        "cocoon.count=100:20 cocoon.net.udp=0:10.98.0.10:10.98.0.11:7000:120:{} cocoon.net.recv=0:4:60000 cocoon.count=100:0",
        dash(MAC_B)
    );
    let net_b = format!("bridge=br0,mac={MAC_B}");
    let mut args = vec!["run", "-d"];
    args.extend(h.vm_args(&guest, "b", &cmd_b));
    args.extend(["--network", net_b.as_str()]);
    assert_eq!(h.ok(&args).trim(), "b");
    // A sends only once B's receive buffers are posted (the `nic` line).
    eventually("B's NIC", Duration::from_secs(30), || {
        h.ok(&["logs", "b"]).contains("cocoon-guest: nic index=0")
    });
    let net_a = format!("bridge=br0,mac={MAC_A}");
    let mut args = vec!["run", "-d", "-o", "json"];
    args.extend(h.vm_args(&guest, "a", &cmd_a));
    args.extend(["--network", net_a.as_str()]);
    let steps: Value = serde_json::from_str(&h.ok(&args)).unwrap();
    assert_eq!(steps["nics"][0]["mac"], MAC_A, "{steps}");
    assert_eq!(steps["nics"][0]["bridge"], "br0", "{steps}");
    assert_eq!(steps["nics"][0]["host_tap"], true, "{steps}");

    // Both guests say when their exchange is over (received or not).
    for vm in ["a", "b"] {
        eventually(
            &format!("{vm}'s exchange"),
            Duration::from_secs(150),
            || h.ok(&["logs", vm]).contains("cocoon-guest: net-recv nic=0"),
        );
    }
    let both = format!("A:\n{}\nB:\n{}", h.ok(&["logs", "a"]), h.ok(&["logs", "b"]));
    for (vm, me, from, src_ip) in [
        ("a", MAC_A, MAC_B, "10.98.0.11"),
        ("b", MAC_B, MAC_A, "10.98.0.10"),
    ] {
        let log = h.ok(&["logs", vm]);
        let nic = &fields(&report(&log), "nic")[0];
        assert_eq!(nic["mac"], me, "the guest sees the record's MAC: {both}");
        check_datagram(&log, me, from, src_ip, &both);
    }

    // Each VM's tap: the host's, named after the VM, on the bridge, up.
    let tap_of = |vm: &str| -> (String, Value) {
        let inspect = h.json(&["inspect", vm, "-o", "json"]);
        let id = inspect["record"]["id"].as_str().unwrap().to_string();
        let tap = inspect["nics"][0]["tap"].as_str().unwrap().to_string();
        assert_eq!(tap, format!("cc{}n0", &id[..10]), "{inspect}");
        assert_eq!(inspect["record"]["nics"][0]["attach"]["bridge"], "br0");
        (tap, inspect)
    };
    let (tap_a, inspect_a) = tap_of("a");
    let (tap_b, _) = tap_of("b");
    assert_eq!(inspect_a["record"]["nics"][0]["mac"], MAC_A);
    for tap in [&tap_a, &tap_b] {
        let link = h.link(tap).unwrap_or_else(|| panic!("{tap} exists"));
        assert!(
            link.contains("master br0") && link.contains("tun type tap"),
            "{link}"
        );
    }
    let text = h.ok(&["inspect", "a"]);
    assert!(
        text.contains(&format!(
            "nic0 bridge=br0 tap {tap_a} (made at start) mac {MAC_A} dhcp"
        )),
        "{text}"
    );

    // The seed tells cloud-init the NIC by its MAC.
    let seed = inspect_a["record"]["storage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["role"] == "cidata")
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .expect("a seed disk");
    let files = cocoon_host::disk::cidata::read_image(&std::fs::read(seed).unwrap()).unwrap();
    let net: Value = serde_json::from_slice(&files["network-config"]).unwrap();
    assert_eq!(
        net,
        serde_json::json!({"version": 2, "ethernets": {
            "nic0": {"match": {"macaddress": MAC_A}, "dhcp4": true}}})
    );

    // stop: the tap is gone when stop returns; B's is untouched.
    h.ok(&["stop", "a"]);
    assert_eq!(h.vm("a")["state"], "stopped");
    assert!(h.link(&tap_a).is_none(), "stop deleted {tap_a}");
    assert!(h.link(&tap_b).is_some());

    // A killed monitor leaves its tap; the next start replaces it.
    let pid = h.vm("b")["pid"].as_u64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    eventually("the dead monitor noticed", Duration::from_secs(10), || {
        h.vm("b")["state"] == "stopped"
    });
    assert!(h.link(&tap_b).is_some(), "a killed monitor deletes nothing");
    h.ok(&["start", "b"]);
    assert_eq!(h.vm("b")["state"], "running");
    assert!(h.link(&tap_b).is_some());
    // A second start of B's names while it runs is refused, and touches
    // nothing of B's.
    h.fails_with(&["start", "b"], "busy");
    assert!(h.link(&tap_b).is_some());

    // rm (of a running VM, with --force) and of a stopped one: no tap left.
    h.ok(&["rm", "-f", "b"]);
    h.ok(&["rm", "a"]);
    assert!(h.vm_dirs().is_empty());
    assert_eq!(h.links("cc"), Vec::<String>::new());
    assert!(h.link("br0").is_some());
}

#[test]
fn a_guest_that_powers_off_takes_its_tap_and_a_users_tap_stays() {
    let test = "a_guest_that_powers_off_takes_its_tap_and_a_users_tap_stays";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.tap_on("mine0", "br0");
    let h = host(ns);
    let guest = test_guest();
    let mut args = vec!["run", "-d"];
    args.extend(h.vm_args(&guest, "p", "cocoon.net.arp=0:10.97.0.2:10.97.0.1"));
    args.extend([
        "--nic",
        "tap=mine0,ip=10.97.0.2/24,gw=10.97.0.1",
        "--network",
        "bridge=br0",
    ]);
    h.ok(&args);
    eventually("the guest's power-off", Duration::from_secs(30), || {
        h.vm("p")["state"] == "stopped"
    });
    let log = h.ok(&["logs", "p"]);
    assert!(
        report(&log).contains(&"net-tx nic=0 kind=arp len=42 outcome=ok".to_string()),
        "{log}"
    );
    let nics = fields(&report(&log), "nic");
    assert_eq!(nics.len(), 2, "{log}");
    let inspect = h.json(&["inspect", "p", "-o", "json"]);
    let views = inspect["nics"].as_array().unwrap();
    for (seen, view) in nics.iter().zip(views) {
        assert_eq!(seen["mac"], view["mac"].as_str().unwrap(), "{inspect}");
    }
    assert_ne!(views[0]["mac"], views[1]["mac"]);
    assert_eq!(views[0]["tap"], "mine0");
    assert_eq!(views[0]["host_tap"], false);
    assert_eq!(views[0]["address"], "10.97.0.2/24");
    assert_eq!(views[0]["gateway"], "10.97.0.1");
    let host_tap = views[1]["tap"].as_str().unwrap();
    assert!(
        h.link(host_tap).is_none(),
        "the monitor deleted {host_tap} on exit"
    );
    assert!(h.link("mine0").is_some(), "the user's tap is left alone");
    // The static NIC's entry in the seed.
    let seed = inspect["record"]["storage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["role"] == "cidata")
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .unwrap();
    let files = cocoon_host::disk::cidata::read_image(&std::fs::read(seed).unwrap()).unwrap();
    let net: Value = serde_json::from_slice(&files["network-config"]).unwrap();
    assert_eq!(
        net["ethernets"]["nic0"],
        serde_json::json!({"match": {"macaddress": views[0]["mac"]}, "dhcp4": false,
            "addresses": ["10.97.0.2/24"], "routes": [{"to": "0.0.0.0/0", "via": "10.97.0.1"}]})
    );
    h.ok(&["rm", "p"]);
    assert!(h.link("mine0").is_some(), "rm leaves the user's tap too");
    assert_eq!(h.links("cc"), Vec::<String>::new());
}

#[test]
fn network_mistakes_are_refused_and_leave_no_vm_and_no_tap() {
    let test = "network_mistakes_are_refused_and_leave_no_vm_and_no_tap";
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.ip("link add ve0 type veth peer name ve0p");
    ns.ip("tuntap add dev free0 mode tap");
    ns.ip("tuntap add dev held0 mode tap");
    let h = host(ns);
    // The kernel is never read: every case fails before it is needed.
    let guest = PathBuf::from("/nonexistent-kernel");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--nic", "tap=nosuch0"],
            "nic0 (tap=nosuch0): there is no network interface named nosuch0",
        ),
        (
            &["--nic", "tap=free0", "--nic", "tap=ve0"],
            "nic1 (tap=ve0): network interface ve0 is not a tap device",
        ),
        (
            &["--network", "bridge=nobr"],
            "nic0 (bridge=nobr): there is no bridge named nobr",
        ),
        (
            &["--network", "bridge=ve0"],
            "network interface ve0 is not a bridge",
        ),
        (
            &["--nic", "tap=free0,mac=01:00:00:00:00:01"],
            "01:00:00:00:00:01 is a multicast address",
        ),
        (&["--nic", "tap=free0,mac=02:00:00:00:00"], "is malformed"),
        (
            &[
                "--network",
                "bridge=br0,mac=02:00:00:00:00:05",
                "--network",
                "bridge=br0,mac=02:00:00:00:00:05",
            ],
            "MAC address 02:00:00:00:00:05 is given to two NICs",
        ),
        (
            &["--network", "none", "--network", "bridge=br0"],
            "--network none cannot be combined with another NIC",
        ),
        (
            &["--no-cidata", "--nic", "tap=free0,ip=10.0.0.2/24"],
            "--no-cidata writes no cloud-init seed",
        ),
    ];
    for (extra, want) in cases {
        for cmd in ["run", "create"] {
            let mut args = vec![cmd];
            if cmd == "run" {
                args.push("-d");
            }
            args.extend(h.vm_args(&guest, "x", "console=ttyS0"));
            args.extend_from_slice(extra);
            h.fails_with(&args, want);
        }
    }
    // A tap some process holds: `run` refuses it at once; `create` only
    // needs it to exist, and its `start` says it is busy (the record then
    // says why, whole).
    let holder = h
        .guard
        .enter(|| cocoon_vmm::devices::virtio::net::tap::Tap::open("held0").unwrap());
    let mut args = vec!["run", "-d"];
    args.extend(h.vm_args(&guest, "x", "console=ttyS0"));
    args.extend(["--nic", "tap=held0"]);
    h.fails_with(&args, "nic0 (tap=held0): tap held0 is busy");
    // Nothing was pulled either: the network is checked first.
    assert_eq!(
        h.json(&["image", "list", "-o", "json"]),
        serde_json::json!([])
    );
    assert!(h.vm_dirs().is_empty(), "no VM record was left");

    let real_guest = test_guest();
    let mut args = vec!["create"];
    args.extend(h.vm_args(&real_guest, "c", "console=ttyS0"));
    args.extend(["--nic", "tap=held0", "--network", "bridge=br0"]);
    h.ok(&args);
    assert_eq!(h.vm("c")["state"], "created");
    h.fails_with(&["start", "c"], "tap held0 is busy");
    let vm = h.vm("c");
    assert_eq!(vm["state"], "error", "{vm}");
    assert!(vm["exit"].as_str().unwrap().contains("busy"), "{vm}");
    drop(holder);
    let links = h.links("");
    assert!(
        links.iter().all(|l| !l.starts_with("cc")),
        "no tap is left: {links:?}"
    );
    h.ok(&["rm", "c"]);
    assert!(h.vm_dirs().is_empty());
}

/// Sends `frame` from the veth until its echo from `from` (the same bytes
/// after the addresses, back to the sender) arrives. A frame for an
/// address the bridge has not learned yet is flooded to every VM, and the
/// test guest echoes whatever it receives: echoes from others are not it.
fn echo_from(sock: &netns::PacketSocket, frame: &[u8], from: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sock.send(frame).unwrap();
        let round = (Instant::now() + Duration::from_secs(5)).min(deadline);
        while let Some(f) = sock.recv_incoming(round) {
            let echo = f.get(..6) == frame.get(6..12) && f.get(12..) == frame.get(12..);
            if echo && f.get(6..12).map(mac_of).as_deref() == Some(from) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no echo from {from}");
    }
}

const PEER: [u8; 6] = [0x02, 0xcc, 0, 0, 0x02, 0xfe];

/// A frame from the peer to `dst` (`aa:bb:…`), of the local experimental
/// ethertype, tagged.
fn frame_to(dst: &str, tag: u8) -> Vec<u8> {
    let mut f: Vec<u8> = dst
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..46u8).map(|i| i ^ tag));
    f
}

fn mac_of(f: &[u8]) -> String {
    f.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `network-config` of `vm`'s seed.
fn seed_network(h: &Host, vm: &str) -> Value {
    let inspect = h.json(&["inspect", vm, "-o", "json"]);
    let seed = inspect["record"]["storage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["role"] == "cidata")
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .expect("a seed disk");
    let files = cocoon_host::disk::cidata::read_image(&std::fs::read(seed).unwrap()).unwrap();
    serde_json::from_slice(&files["network-config"]).unwrap()
}

#[test]
fn a_bridged_vm_snapshots_and_its_clone_runs_beside_it_under_a_new_mac() {
    let test = "a_bridged_vm_snapshots_and_its_clone_runs_beside_it_under_a_new_mac";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.veth_on("veth0", "veth0p", "br0");
    ns.tap_on("mine0", "br0");
    ns.tap_on("mine1", "br0");
    let h = host(ns);
    let sock = h
        .guard
        .enter(|| netns::PacketSocket::open("veth0").expect("a packet socket on veth0"));
    let guest = test_guest();
    // Echo every frame for two minutes, then count until stopped.
    let cmdline = "cocoon.net.echo=0:50:120000 cocoon.count=100:0";
    let net = format!("bridge=br0,mac={MAC_A}");
    let mut args = vec!["run", "-d"];
    args.extend(h.vm_args(&guest, "src", cmdline));
    args.extend(["--network", net.as_str()]);
    h.ok(&args);
    eventually("src's NIC", Duration::from_secs(30), || {
        h.ok(&["logs", "src"]).contains("cocoon-guest: nic index=0")
    });
    echo_from(&sock, &frame_to(MAC_A, 1), MAC_A);

    // The snapshot records the NIC: its MAC and how its tap was given.
    h.ok(&["snapshot", "save", "src", "--name", "s1"]);
    let sidecar: Value = serde_json::from_slice(
        &std::fs::read(h.state_dir().join("snapshots/s1/snapshot.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["version"], "1.1", "{sidecar}");
    assert_eq!(
        sidecar["nics"],
        serde_json::json!([{"attach": {"bridge": "br0"}, "mac": MAC_A, "addressing": "dhcp"}])
    );
    let text = h.ok(&["snapshot", "inspect", "s1"]);
    assert!(
        text.contains(&format!("nics:\n  nic0 bridge=br0 mac {MAC_A}\n")),
        "{text}"
    );

    // The clone: a new MAC, its own tap on the same bridge, its seed
    // matching the new MAC, and the source still answering on its own.
    h.ok(&["clone", "s1", "--name", "c1", "-d"]);
    let inspect = h.json(&["inspect", "c1", "-o", "json"]);
    let nic = &inspect["record"]["nics"][0];
    let new_mac = nic["mac"].as_str().unwrap().to_string();
    assert_ne!(new_mac, MAC_A, "{inspect}");
    assert_eq!(nic["attach"]["bridge"], "br0");
    let id = inspect["record"]["id"].as_str().unwrap();
    let tap = format!("cc{}n0", &id[..10]);
    assert_eq!(inspect["nics"][0]["tap"], tap.as_str());
    let link = h.link(&tap).unwrap_or_else(|| panic!("{tap} exists"));
    assert!(link.contains("master br0"), "{link}");
    assert_eq!(
        seed_network(&h, "c1")["ethernets"]["nic0"]["match"]["macaddress"],
        new_mac.as_str()
    );
    assert_eq!(
        seed_network(&h, "src")["ethernets"]["nic0"]["match"]["macaddress"],
        MAC_A
    );
    // The clone answers as itself, the source as itself.
    echo_from(&sock, &frame_to(&new_mac, 2), &new_mac);
    echo_from(&sock, &frame_to(MAC_A, 3), MAC_A);
    // Inside, the clone's guest goes on with the MAC its driver read: it
    // sees frames for the new MAC addressed to its old one, and sends
    // from the old one; the new MAC never reaches it.
    // (The guest prints an echo's line after sending it: wait for the
    // line to end.)
    let echo_lines = |log: &str| -> Vec<_> {
        fields(&report(log), "net-echo")
            .into_iter()
            .filter(|e| e.contains_key("seq"))
            .collect()
    };
    eventually("the clone's echo line", Duration::from_secs(10), || {
        let lines = echo_lines(&h.ok(&["logs", "c1"]));
        !lines.is_empty() && lines.iter().all(|e| e.contains_key("outcome"))
    });
    let log = h.ok(&["logs", "c1"]);
    let echoes = echo_lines(&log);
    for e in &echoes {
        assert_eq!(e["rx_dst"], MAC_A, "{log}");
        assert_eq!(e["tx_src"], MAC_A, "{log}");
    }
    assert_eq!(h.vm("src")["state"], "running");
    h.ok(&["rm", "-f", "c1"]);
    assert!(h.link(&tap).is_none(), "rm deleted {tap}");

    // A restore keeps the VM's own NIC: its MAC on a tap of its name.
    let before = h.json(&["inspect", "src", "-o", "json"]);
    h.ok(&["restore", "src", "s1"]);
    assert_eq!(h.vm("src")["state"], "running");
    let after = h.json(&["inspect", "src", "-o", "json"]);
    assert_eq!(after["record"]["nics"], before["record"]["nics"]);
    assert_eq!(after["nics"][0]["tap"], before["nics"][0]["tap"]);
    echo_from(&sock, &frame_to(MAC_A, 5), MAC_A);

    // A VM on a user's tap: a clone needs a tap of its own.
    let mut args = vec!["run", "-d"];
    args.extend(h.vm_args(&guest, "own", cmdline));
    args.extend(["--nic", "tap=mine0"]);
    h.ok(&args);
    eventually("own's NIC", Duration::from_secs(30), || {
        h.ok(&["logs", "own"]).contains("cocoon-guest: nic index=0")
    });
    h.ok(&["snapshot", "save", "own", "--name", "s2"]);
    h.fails_with(
        &["clone", "s2", "--name", "c2", "-d"],
        "snapshot s2's nic0 is on tap mine0, a tap of the user's (--nic tap=), which a clone \
         cannot share with its source: give the clone a tap of its own with `clone --nic tap=NAME`",
    );
    assert_eq!(
        h.state_of("c2"),
        "absent",
        "nothing of the refused clone stays"
    );
    h.ok(&["clone", "s2", "--name", "c2", "-d", "--nic", "tap=mine1"]);
    let inspect = h.json(&["inspect", "c2", "-o", "json"]);
    assert_eq!(inspect["nics"][0]["tap"], "mine1", "{inspect}");
    let c2_mac = inspect["record"]["nics"][0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    echo_from(&sock, &frame_to(&c2_mac, 4), &c2_mac);
    for vm in ["c2", "own", "src"] {
        h.ok(&["rm", "-f", vm]);
    }
    assert_eq!(h.links("cc"), Vec::<String>::new());
    assert!(h.link("mine0").is_some() && h.link("mine1").is_some());
}
