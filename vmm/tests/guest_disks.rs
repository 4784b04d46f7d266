//! Boots the no_std test guest with 1, 4 and 8 disks (mixed read-only and
//! read-write, with and without serials) and checks its report against what
//! the host configured, and the host files against what the guest did.

mod support;

use std::time::Duration;

use cocoon_vmm::{DiskConfig, ExitReason, VmConfig};
use sha2::{Digest, Sha256};
use support::{disk_bytes, fields, kvm_or_skip, report, run_vm, test_guest};

const SECTOR: usize = 512;
const HASH_SECTOR: usize = 8;
const HASH_COUNT: usize = 8;
const WRITE_SECTOR: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(60);

struct Disk {
    path: std::path::PathBuf,
    contents: Vec<u8>,
    read_only: bool,
    serial: Option<String>,
}

fn disks(dir: &std::path::Path, n: usize) -> Vec<Disk> {
    (0..n)
        .map(|i| {
            // Different sizes so a mixed-up order shows in capacities.
            let len = (1 << 20) + i * 64 * SECTOR;
            let contents = disk_bytes(i as u64 + 1, len);
            let path = dir.join(format!("disk{i}.img"));
            std::fs::write(&path, &contents).unwrap();
            Disk {
                path,
                contents,
                read_only: i % 2 == 1,
                // Every third disk has no serial; one uses all 20 bytes.
                serial: match i % 3 {
                    2 => None,
                    _ if i == 4 => Some("serial-of-twenty-b04".into()),
                    _ => Some(format!("data{i}")),
                },
            }
        })
        .collect()
}

fn boot_and_check(n: usize, cpus: u8) {
    if !kvm_or_skip(&format!("guest with {n} disks")) {
        return;
    }
    let guest = test_guest();
    let dir = tempfile::tempdir().unwrap();
    let disks = disks(dir.path(), n);
    let mut config = VmConfig::new(&guest);
    config.cpus = cpus;
    config.memory = 128 << 20;
    let mut cmdline = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let mut dc = DiskConfig::new(&d.path);
        dc.read_only = d.read_only;
        dc.serial = d.serial.clone();
        config.disks.push(dc);
        cmdline.push(format!("cocoon.hash={i}:{HASH_SECTOR}:{HASH_COUNT}"));
        cmdline.push(format!("cocoon.write={i}:{WRITE_SECTOR}:5a"));
    }
    config.cmdline = cmdline.join(" ");

    let (reason, serial) = run_vm(config, TIMEOUT);
    assert_eq!(reason, ExitReason::PowerOff, "guest output:\n{serial}");
    let report = report(&serial);
    assert_eq!(
        report.first().map(String::as_str),
        Some("start"),
        "{serial}"
    );
    assert!(report.iter().all(|l| !l.starts_with("error")), "{serial}");
    assert!(report.contains(&format!("done disks={n}")), "{serial}");

    let disk_lines = fields(&report, "disk");
    let hash_lines = fields(&report, "hash");
    let write_lines = fields(&report, "write");
    assert_eq!(disk_lines.len(), n, "{serial}");
    for (i, d) in disks.iter().enumerate() {
        let line = &disk_lines[i];
        let idx = i.to_string();
        assert_eq!(line["index"], idx);
        assert_eq!(
            line["addr"],
            format!("{:#x}", 0xd000_0000u64 + i as u64 * 0x1000)
        );
        assert_eq!(
            line["capacity_sectors"],
            (d.contents.len() / SECTOR).to_string()
        );
        assert_eq!(line["serial"], d.serial.clone().unwrap_or_default());
        assert_eq!(line["ro"], if d.read_only { "1" } else { "0" });

        let hash = hash_lines
            .iter()
            .find(|h| h["index"] == idx)
            .expect("hash line");
        let want =
            Sha256::digest(&d.contents[HASH_SECTOR * SECTOR..(HASH_SECTOR + HASH_COUNT) * SECTOR]);
        assert_eq!(hash["sha256"], hex::encode(want), "disk {i}");

        let write = write_lines
            .iter()
            .find(|w| w["index"] == idx)
            .expect("write line");
        let after = std::fs::read(&d.path).unwrap();
        if d.read_only {
            assert_eq!(write["outcome"], "error", "disk {i}");
            assert!(after == d.contents, "read-only disk {i} changed");
        } else {
            assert_eq!(write["outcome"], "ok", "disk {i}");
            let sector = &after[WRITE_SECTOR * SECTOR..(WRITE_SECTOR + 1) * SECTOR];
            assert!(
                sector.iter().all(|b| *b == 0x5a),
                "disk {i} sector not written"
            );
            // Nothing else changed.
            assert_eq!(
                after[..WRITE_SECTOR * SECTOR],
                d.contents[..WRITE_SECTOR * SECTOR]
            );
            assert_eq!(
                after[(WRITE_SECTOR + 1) * SECTOR..],
                d.contents[(WRITE_SECTOR + 1) * SECTOR..]
            );
        }
    }
}

#[test]
fn guest_with_one_disk() {
    boot_and_check(1, 1);
}

#[test]
fn guest_with_four_disks() {
    boot_and_check(4, 2);
}

#[test]
fn guest_with_eight_disks() {
    boot_and_check(8, 4);
}

#[test]
fn guest_sees_its_command_line_and_powers_off_without_disks() {
    if !kvm_or_skip("guest without disks") {
        return;
    }
    let mut config = VmConfig::new(test_guest());
    config.cmdline = "hello=world".into();
    let (reason, serial) = run_vm(config, TIMEOUT);
    assert_eq!(reason, ExitReason::PowerOff, "{serial}");
    let report = report(&serial);
    assert!(
        report.contains(&"cmdline hello=world".to_string()),
        "{serial}"
    );
    assert!(report.contains(&"done disks=0".to_string()), "{serial}");
}

#[test]
fn direct_io_disk_reads_and_writes() {
    if !kvm_or_skip("guest with an O_DIRECT disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let contents = disk_bytes(99, 4 << 20);
    let path = dir.path().join("direct.img");
    std::fs::write(&path, &contents).unwrap();
    let mut config = VmConfig::new(test_guest());
    let mut d = DiskConfig::new(&path);
    d.direct = true;
    d.serial = Some("direct".into());
    config.disks.push(d);
    config.cmdline = "cocoon.hash=0:0:64 cocoon.write=0:9:a5 cocoon.seqread=0:4194304".into();
    let (reason, serial) = run_vm(config, TIMEOUT);
    assert_eq!(reason, ExitReason::PowerOff, "{serial}");
    let report = report(&serial);
    let hash = &fields(&report, "hash")[0];
    assert_eq!(
        hash["sha256"],
        hex::encode(Sha256::digest(&contents[..64 * SECTOR]))
    );
    assert_eq!(fields(&report, "write")[0]["outcome"], "ok");
    assert_eq!(fields(&report, "seqread")[0]["bytes"], "4194304");
    let after = std::fs::read(&path).unwrap();
    assert!(after[9 * SECTOR..10 * SECTOR].iter().all(|b| *b == 0xa5));
}
