//! Tampered snapshots are refused before the running VM is touched, each
//! with its own error: a real snapshot of the test guest is copied, one
//! thing in the copy is changed, and a restore into the running source VM
//! is prepared from it. Every case fails in the preflight with its own
//! variant, and the source runs on with its disks as they were.

mod snapshot_common;

use std::path::Path;
use std::process::Command;

use cocoon_host::disk::copy::sha256_file;
use cocoon_host::snapshot::preflight::{self, PreflightError};
use cocoon_host::snapshot::{restore, save, store, SidecarError, SnapshotDir, StoreError};
use serde_json::Value;
use snapshot_common::*;

type Tamper = fn(&Path);
type Want = fn(&PreflightError) -> bool;

fn edit_sidecar(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("snapshot.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap();
}

fn cases() -> Vec<(&'static str, Tamper, Want)> {
    vec![
        (
            "edited sidecar roles",
            |d| edit_sidecar(d, |v| v["disks"][1]["config"]["role"] = "data".into()),
            |e| matches!(e, PreflightError::Storage(v) if v.has(Some(1), "serial") && v.has(Some(1), "fstype")),
        ),
        (
            "a path with ..",
            |d| {
                edit_sidecar(d, |v| {
                    let evil = Value::from("disks/../../../../../etc/passwd");
                    v["disks"][DATA]["config"]["path"] = evil.clone();
                    v["files"][3]["name"] = evil;
                })
            },
            |e| matches!(e, PreflightError::BadFileName { reason, .. } if reason.contains("..")),
        ),
        (
            "a symlink out",
            |d| {
                let disk = d.join("disks/data-logs.raw");
                let outside = d.parent().unwrap().join(format!(
                    "outside-{}",
                    d.file_name().unwrap().to_string_lossy()
                ));
                std::fs::rename(&disk, &outside).unwrap();
                std::os::unix::fs::symlink(&outside, &disk).unwrap();
            },
            |e| matches!(e, PreflightError::SymlinkOut { name, .. } if name == "disks/data-logs.raw"),
        ),
        (
            "a missing data disk",
            |d| std::fs::remove_file(d.join("disks/data-cache.raw")).unwrap(),
            |e| matches!(e, PreflightError::MissingDisk { index: CACHE, serial, .. } if serial == "cache"),
        ),
        (
            "reordered disks",
            |d| {
                edit_sidecar(d, |v| {
                    v["disks"].as_array_mut().unwrap().swap(DATA, CACHE);
                })
            },
            |e| matches!(e, PreflightError::Reordered { index: DATA, sidecar, state } if sidecar == "cache" && state == "logs"),
        ),
        (
            "a truncated memory file",
            |d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory"))
                    .unwrap();
                f.set_len(MEMORY / 2).unwrap();
            },
            |e| matches!(e, PreflightError::FileSize { name, found, .. } if name == "memory" && *found == MEMORY / 2),
        ),
        (
            "a flipped byte in the state file",
            |d| {
                let p = d.join("state");
                let mut b = std::fs::read(&p).unwrap();
                let mid = b.len() / 2;
                b[mid] ^= 0x01;
                std::fs::write(&p, b).unwrap();
            },
            |e| {
                matches!(
                    e,
                    PreflightError::StateCorrupt(
                        cocoon_vmm::snapshot::StateFileError::Checksum { .. }
                    )
                )
            },
        ),
        (
            "an unknown major version of the state",
            |d| write_at(&d.join("state"), 8, &9u16.to_le_bytes()),
            |e| matches!(e, PreflightError::StateVersion { found, supported: 1 } if found.major == 9),
        ),
        (
            "a boot file the file list lacks",
            |d| {
                edit_sidecar(d, |v| {
                    v["boot"] = serde_json::json!({ "kernel": "kernel", "cmdline": "x" })
                })
            },
            |e| matches!(e, PreflightError::BootUnlisted { name } if name == "kernel"),
        ),
        (
            "a boot file with ..",
            |d| {
                edit_sidecar(d, |v| {
                    v["boot"] = serde_json::json!({ "kernel": "../../kernel", "cmdline": "x" })
                })
            },
            |e| matches!(e, PreflightError::BadFileName { reason, .. } if reason.contains("..")),
        ),
        (
            "a layer gone from the store",
            |d| {
                edit_sidecar(d, |v| {
                    v["disks"][0]["config"]["path"] = "blobs/sha256/gone".into()
                })
            },
            |e| matches!(e, PreflightError::MissingLayer { index: 0, .. }),
        ),
        (
            "a layer of other bytes than the sidecar's digest",
            |d| {
                edit_sidecar(d, |v| {
                    v["disks"][0]["layer"]["digest"] = format!("sha256:{}", "ab".repeat(32)).into()
                })
            },
            |e| {
                matches!(
                    e,
                    PreflightError::LayerHash { index: 0, recorded, found, path }
                        if recorded.hex() == "ab".repeat(32)
                            && found.hex() != recorded.hex()
                            && path.starts_with("/")
                ) && e.to_string().contains("nothing was changed")
            },
        ),
        (
            "a resized data disk",
            |d| {
                let p = d.join("disks/data-logs.raw");
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.set_len(32 << 20).unwrap();
                let size = std::fs::metadata(&p).unwrap().len();
                edit_sidecar(d, |v| v["files"][3]["size"] = size.into());
            },
            |e| {
                matches!(
                    e,
                    PreflightError::DiskMismatch {
                        index: DATA,
                        field: "size",
                        ..
                    }
                )
            },
        ),
        (
            "an edited seed",
            |d| write_at(&d.join("disks/cidata.img"), 4096, b"x"),
            |e| matches!(e, PreflightError::FileHash { name, .. } if name == "disks/cidata.img"),
        ),
    ]
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

#[test]
fn tampered_snapshots_are_refused_before_the_running_vm_is_touched() {
    if !kvm_or_skip("tampered_snapshots_are_refused_before_the_running_vm_is_touched") {
        return;
    }
    let host = Host::new();
    let (storage, locks) = host.create_vm("src");
    let log = host.dir.path().join("src.log");
    let cmdline = format!("cocoon.write={DATA}:4:5a cocoon.count=20:0");
    let vm = boot(&storage, &cmdline, &log);
    wait_count(&log, 3);
    vm.pause();
    save(
        &vm,
        &storage,
        &locks,
        host.meta("src"),
        &host.snapshots,
        "good",
    )
    .unwrap();
    vm.resume();
    let disk_hashes = || -> Vec<String> {
        storage
            .iter()
            .map(|d| sha256_file(&d.path).unwrap().1.to_string())
            .collect()
    };
    let before = disk_hashes();
    let vm_dir = host.vm_dir("src");

    // The untouched copy passes, so each failure below is its tampering's.
    let good = SnapshotDir::open(&host.snapshots, "good").unwrap();
    restore::prepare(&good, &host.checks(), &storage, &vm_dir).unwrap();

    for (i, (what, tamper, want)) in cases().into_iter().enumerate() {
        let name = format!("t{i}");
        copy_dir(&host.snapshots.join("good"), &host.snapshots.join(&name));
        tamper(&host.snapshots.join(&name));
        let snap = SnapshotDir::open(&host.snapshots, &name).unwrap();
        let e = restore::prepare(&snap, &host.checks(), &storage, &vm_dir).expect_err(what);
        let restore::RestoreError::Preflight { source, .. } = &e else {
            panic!("{what}: not a preflight error: {e}");
        };
        assert!(want(source), "{what}: {}", cocoon_host::error_chain(&e));
        eprintln!("{what}: {}", cocoon_host::error_chain(&e));
        assert!(vm.exit_reason().is_none(), "{what}: the VM stopped");
    }

    // A restore onto a VM with other disks.
    let mut fewer = storage.clone();
    fewer.remove(CACHE);
    let e = restore::prepare(&good, &host.checks(), &fewer, &vm_dir).unwrap_err();
    assert!(
        matches!(
            &e,
            restore::RestoreError::Preflight {
                source: PreflightError::Roles { .. },
                ..
            }
        ),
        "{e}"
    );
    // An image the store does not have.
    let mut checks = host.checks();
    checks.image_present = &|_| false;
    let e = restore::prepare(&good, &checks, &storage, &vm_dir).unwrap_err();
    assert!(
        matches!(
            &e,
            restore::RestoreError::Preflight {
                source: PreflightError::ImageMissing { .. },
                ..
            }
        ),
        "{e}"
    );
    // A layer the caller hashed already (a clone's layers::check) is not
    // hashed again, and only that exact layer: the same file under a
    // sidecar digest the caller did not hash for that disk is hashed and
    // refused.
    copy_dir(&host.snapshots.join("good"), &host.snapshots.join("forged"));
    let forged = format!("sha256:{}", "cd".repeat(32));
    edit_sidecar(&host.snapshots.join("forged"), |v| {
        v["disks"][0]["layer"]["digest"] = forged.clone().into()
    });
    let snap = SnapshotDir::open(&host.snapshots, "forged").unwrap();
    let layer = &snap.sidecar.disks[0].layer.clone().unwrap();
    let hashed = |index, digest: &str| preflight::HashedLayer {
        index,
        path: std::fs::canonicalize(&host.layer.path).unwrap(),
        digest: digest.parse().unwrap(),
        size: layer.size,
    };
    let run = |hashed_layers: &[preflight::HashedLayer]| {
        let checks = preflight::Options {
            hashed_layers,
            ..host.checks()
        };
        preflight::preflight(&snap.dir, &snap.sidecar, &checks)
    };
    run(&[hashed(0, &forged)]).expect("taken as hashed, not hashed again");
    for wrong in [
        vec![],
        vec![hashed(1, &forged)],
        vec![hashed(0, &host.layer.digest.to_string())],
    ] {
        let e = run(&wrong).unwrap_err();
        assert!(
            matches!(&e, PreflightError::LayerHash { index: 0, recorded, .. } if recorded.to_string() == forged),
            "{wrong:?}: {e}"
        );
    }

    // A sidecar of another major version is refused when opened.
    copy_dir(&host.snapshots.join("good"), &host.snapshots.join("v2"));
    edit_sidecar(&host.snapshots.join("v2"), |v| v["version"] = "2.0".into());
    let e = SnapshotDir::open(&host.snapshots, "v2").unwrap_err();
    assert!(
        matches!(
            &e,
            StoreError::Sidecar(SidecarError::UnsupportedVersion { .. })
        ),
        "{e}"
    );

    // The source ran through all of it, on the same disks.
    let n = last_count(&log);
    wait_count(&log, n + 3);
    assert_consecutive("source", &counts(&read(&log)));
    assert_eq!(disk_hashes(), before, "no disk of the running VM changed");
    assert_eq!(
        store::list(&host.snapshots).unwrap().len(),
        cases().len() + 3
    );
    stop(vm);
}
