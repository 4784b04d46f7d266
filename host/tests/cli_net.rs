//! `cocoon-host boot --network bridge=BR` end to end, in a network
//! namespace: the host creates a tap on the bridge for the VM, the test
//! guest sends a frame through it, and the tap is gone after the VM stops;
//! `--nic`/`--network` mistakes are refused before anything is made.

#[path = "../../vmm/tests/support/netns.rs"]
mod netns;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::process::Command;

use netns::{skip, Netns};

fn boot(ns: &Netns, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_cocoon-host"),
            "boot",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn boot_on_a_bridge_creates_a_tap_and_deletes_it_after() {
    let test = "boot_on_a_bridge_creates_a_tap_and_deletes_it_after";
    if !vmm_support::kvm_or_skip(test) {
        return;
    }
    let ns = match Netns::new("cli") {
        Ok(ns) => ns,
        Err(reason) if std::env::var_os("CI").is_none() => return skip(test, &reason),
        Err(reason) => panic!("{test}: {reason}"),
    };
    ns.bridge("br0");
    let guest = vmm_support::test_guest();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let out = boot(
        &ns,
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            "cocoon.net.arp=0:10.7.0.2:10.7.0.1",
            "--network",
            "bridge=br0,mac=02:00:00:00:07:02",
            "--serial-log",
            log.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("cocoon-host boot: nic0 tap cctap0 mac 02:00:00:00:07:02"),
        "{stderr}"
    );
    let serial = std::fs::read_to_string(&log).unwrap();
    let lines = vmm_support::report(&serial);
    assert!(
        lines.contains(&"net-tx nic=0 kind=arp len=42 outcome=ok".to_string()),
        "{serial}"
    );
    let nic = &vmm_support::fields(&lines, "nic")[0];
    assert_eq!(nic["mac"], "02:00:00:00:07:02");
    let links = ns.exec(&["ip", "-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("cctap"), "the tap was deleted: {links}");
}

#[test]
fn bad_network_options_are_refused_before_anything_is_made() {
    let test = "bad_network_options_are_refused_before_anything_is_made";
    let ns = match Netns::new("cli") {
        Ok(ns) => ns,
        Err(reason) if std::env::var_os("CI").is_none() => return skip(test, &reason),
        Err(reason) => panic!("{test}: {reason}"),
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["--network", "bridge=nobr"],
            "there is no bridge named nobr",
        ),
        (
            &["--nic", "tap=nosuch0"],
            "there is no network interface named nosuch0",
        ),
        (
            &["--nic", "tap=t0,ip=10.0.0.2/24"],
            "boot writes no cloud-init seed, so ip= and gw= have nothing to configure",
        ),
        (
            &["--nic", "tap=t0,mac=01:00:00:00:00:01"],
            "is a multicast address",
        ),
        (
            &["--network", "none", "--nic", "tap=t0"],
            "--network none cannot be combined with another NIC",
        ),
    ];
    for (args, want) in cases {
        let mut argv = vec!["--kernel", "/nonexistent"];
        argv.extend_from_slice(args);
        let out = boot(&ns, &argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
