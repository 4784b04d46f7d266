//! A planned and created VM's disks, as the guest sees them: the no_std
//! test guest booted on the cocoon VMM with 2 layers, a cow, an ext4 and a
//! blank data disk and the cloud-init seed reports each disk in plan order
//! with its serial, read-only flag and size, and reads the ext4
//! superblock (magic 0xEF53 at byte 1080) from the ext4 disk.

mod disk_common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::time::Duration;

use cocoon_host::disk::lock::{DiskLocks, Wait};
use cocoon_host::disk::plan::ImageDisks;
use cocoon_host::disk::spec::{resolve, DataDiskSpec};
use cocoon_host::disk::{create, plan, DiskRole};
use cocoon_vmm::{ExitReason, VmConfig};
use disk_common::{require, DefaultShape, State};
use sha2::{Digest, Sha256};
use vmm_support::{disk_bytes, fields, kvm_or_skip, report, run_vm, test_guest};

#[test]
fn the_guest_sees_the_planned_disks_in_order() {
    let t = "the_guest_sees_the_planned_disks_in_order";
    if !kvm_or_skip(t)
        || !require(
            t,
            "command -v mkfs.ext4 || test -x /usr/sbin/mkfs.ext4",
            "e2fsprogs",
        )
    {
        return;
    }
    let state = State::new();
    let layers = vec![
        state.layer(&disk_bytes(1, 1 << 20)),
        state.layer(&disk_bytes(2, 2 << 20)),
    ];
    let mut req = state.request(ImageDisks::Layered {
        layers: layers.clone(),
    });
    req.cow_size = Some(32 << 20);
    let specs: Vec<DataDiskSpec> = ["size=24M,name=logs", "size=16M,fstype=none"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    req.data_disks = resolve(&specs, &[]).unwrap();
    req.cidata = true;
    let plan = plan(&req, &DefaultShape).unwrap();
    let locks = DiskLocks::acquire(&plan.writable(), "start", Wait::No).unwrap();
    let seed = cocoon_host::disk::cidata::SeedInput {
        instance_id: "iid-v1".into(),
        hostname: "v1".into(),
        ssh_authorized_keys: vec![],
        network: Default::default(),
    };
    create(&plan, &locks, Some(&seed)).unwrap();

    let disks = plan.storage();
    let roles: Vec<DiskRole> = disks.iter().map(|d| d.role).collect();
    use DiskRole::*;
    assert_eq!(roles, [Layer, Layer, Cow, Data, Data, Cidata]);
    let ext4 = disks.iter().position(|d| d.serial == "logs").unwrap();

    let mut config = VmConfig::new(test_guest());
    config.memory = 64 << 20;
    config.disks = disks.iter().map(|d| d.to_vmm_disk()).collect();
    // Sector 2 holds the ext4 superblock's magic (byte 1080); sector 0 of
    // each layer tells the layers apart.
    config.cmdline = format!("cocoon.hash={ext4}:2:1 cocoon.hash=0:0:1 cocoon.hash=1:0:1");
    let (reason, serial) = run_vm(config, Duration::from_secs(60));
    assert_eq!(reason, ExitReason::PowerOff, "{serial}");
    let report = report(&serial);
    assert!(report.iter().all(|l| !l.starts_with("error")), "{serial}");
    assert!(
        report.contains(&format!("done disks={}", disks.len())),
        "{serial}"
    );

    let seen = fields(&report, "disk");
    assert_eq!(seen.len(), disks.len(), "{serial}");
    for (i, (d, line)) in disks.iter().zip(&seen).enumerate() {
        let size = std::fs::metadata(&d.path).unwrap().len();
        assert_eq!(line["index"], i.to_string());
        assert_eq!(line["serial"], d.serial, "disk {i}");
        assert_eq!(line["ro"], if d.read_only { "1" } else { "0" }, "disk {i}");
        assert_eq!(
            line["capacity_sectors"],
            (size / 512).to_string(),
            "disk {i}"
        );
    }
    let serials: Vec<&str> = seen.iter().map(|l| l["serial"].as_str()).collect();
    assert_eq!(
        serials,
        [
            "cocoon-layer0",
            "cocoon-layer1",
            "cocoon-root",
            "logs",
            "data1",
            "cocoon-cidata"
        ]
    );
    let sizes: Vec<&str> = seen
        .iter()
        .map(|l| l["capacity_sectors"].as_str())
        .collect();
    assert_eq!(
        sizes,
        ["2048", "4096", "65536", "49152", "32768", "2048"],
        "1 MiB, 2 MiB, 32 MiB, 24 MiB, 16 MiB, 1 MiB"
    );

    let hashes = fields(&report, "hash");
    let hash_of = |index: usize, sector: usize| {
        hashes
            .iter()
            .find(|h| h["index"] == index.to_string() && h["sector"] == sector.to_string())
            .unwrap_or_else(|| panic!("no hash of disk {index}: {serial}"))["sha256"]
            .clone()
    };
    let sb = std::fs::read(&disks[ext4].path).unwrap()[1024..1536].to_vec();
    assert_eq!(
        sb[56..58],
        [0x53, 0xef],
        "ext4 magic at byte 1080 on the host"
    );
    assert_eq!(
        hash_of(ext4, 2),
        hex::encode(Sha256::digest(&sb)),
        "the guest read the same superblock"
    );
    for (k, l) in layers.iter().enumerate() {
        let first = &std::fs::read(&l.path).unwrap()[..512];
        assert_eq!(
            hash_of(k, 0),
            hex::encode(Sha256::digest(first)),
            "layer {k}"
        );
    }
}
