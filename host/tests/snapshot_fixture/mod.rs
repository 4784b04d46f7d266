//! A snapshot directory made without a VM, for tests of what moves
//! snapshots around (export, import, push, pull): real sparse files and a
//! sidecar that records them.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cocoon_format_common::test_support::Rng;
use cocoon_host::disk::copy::sha256_file;
use cocoon_host::disk::{DiskRole, FsType, StorageConfig};
use cocoon_host::snapshot::sidecar::{
    ImageInfo, ResidentFile, Sidecar, SnapshotDisk, StateVersion, SIDECAR_VERSION,
};
use cocoon_host::snapshot::store::TempSnapshot;
use cocoon_host::store::digest::Digest;

pub const NAMES: [&str; 4] = ["state", "memory", "disks/cow.raw", "disks/data-logs.raw"];

/// A committed snapshot `name` with real files and a sidecar that records
/// them.
pub fn make_snapshot(snaps: &Path, name: &str) -> PathBuf {
    let t = TempSnapshot::create(snaps, name).unwrap();
    let d = t.path();
    std::fs::create_dir(d.join("disks")).unwrap();
    std::fs::write(d.join("state"), Rng::new(1).bytes(5000)).unwrap();
    let mem = std::fs::File::create(d.join("memory")).unwrap();
    mem.set_len(64 << 20).unwrap();
    // Pages here and there, far more runs than one GNU header holds.
    for i in 0..40u64 {
        mem.write_all_at(&Rng::new(i).bytes(4096), i * (1 << 20) + 8192)
            .unwrap();
    }
    let cow = std::fs::File::create(d.join("disks/cow.raw")).unwrap();
    cow.set_len(32 << 20).unwrap();
    cow.write_all_at(b"cow data", 1 << 20).unwrap();
    // A data disk that ends in data, with an odd size.
    let data = std::fs::File::create(d.join("disks/data-logs.raw")).unwrap();
    data.set_len((16 << 20) + 1000).unwrap();
    data.write_all_at(&[0x5a; 512], 4 * 512).unwrap();
    data.write_all_at(&[7; 1000], 16 << 20).unwrap();
    let names = ["state", "memory", "disks/cow.raw", "disks/data-logs.raw"];
    let files = names
        .iter()
        .map(|n| {
            let (size, digest) = sha256_file(&d.join(n)).unwrap();
            (n.to_string(), size, digest)
        })
        .collect();
    let s = sidecar(name, files);
    s.write(d).unwrap();
    t.commit(name).unwrap()
}

pub fn sidecar(name: &str, files: Vec<(String, u64, Digest)>) -> Sidecar {
    let disk = |role: DiskRole, serial: &str, path: &str| SnapshotDisk {
        config: StorageConfig {
            path: path.into(),
            read_only: role.read_only(),
            serial: serial.into(),
            role,
            mount_point: None,
            fstype: (role == DiskRole::Data).then_some(FsType::None),
            direct_io: None,
        },
        layer: None,
    };
    Sidecar {
        version: SIDECAR_VERSION,
        nics: Vec::new(),
        name: name.into(),
        created: "2026-12-02T01:00:00Z".into(),
        source_vm: "v1".into(),
        image: ImageInfo {
            digest: Digest::of(b"image"),
            reference: None,
        },
        vmm_state_version: StateVersion(cocoon_vmm::snapshot::FORMAT_VERSION),
        cpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![
            disk(DiskRole::Cow, "cocoon-root", "disks/cow.raw"),
            disk(DiskRole::Data, "logs", "disks/data-logs.raw"),
        ],
        boot: None,
        files: files
            .into_iter()
            .map(|(name, size, sha256)| ResidentFile { name, size, sha256 })
            .collect(),
    }
}

pub fn same_files(a: &Path, b: &Path, names: &[&str]) {
    for n in names {
        assert_eq!(
            sha256_file(&a.join(n)).unwrap(),
            sha256_file(&b.join(n)).unwrap(),
            "{n}"
        );
    }
}

pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
