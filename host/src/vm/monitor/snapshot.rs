//! The monitor's side of snapshots: `PUT /v1/vm/snapshot`, and a start
//! that restores a snapshot instead of booting the kernel.
//!
//! A snapshot is taken here because only the monitor can: it owns the
//! VMM and holds the VM's writable-disk locks for the VM's whole life.
//! The guest is paused, the VMM's state and memory are written and the
//! cow and data disks copied while it is paused (the disks cannot change
//! under the copy: no vCPU runs and no disk request is in flight), the
//! guest is resumed, and only then is every file hashed and the snapshot
//! renamed into place ([`crate::snapshot::save`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use cocoon_vmm::{Vm, VmConfig};

use super::Monitor;
use crate::snapshot::save::{self, SaveError, SaveMeta};
use crate::snapshot::store::StoreError;
use crate::vm::api::{DiskCopy, SnapshotTaken};
use crate::vm::create::store_root;
use crate::vm::snapshot::StartFrom;

/// Why a snapshot was not taken, as the API answers it.
#[derive(Debug)]
pub enum Refused {
    /// 400: the request itself (a bad name).
    Bad(String),
    /// 409: not now (stopping, another snapshot, the name exists).
    Conflict(String),
    /// 500: it failed; nothing of it is listed.
    Failed(String),
}

/// Clears the "snapshot in progress" flag however the snapshot ends.
struct Busy<'a>(&'a Monitor);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.snapshotting.store(false, Ordering::SeqCst);
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Takes snapshot `name` of the running (or paused) VM. Blocking: the API
/// runs it off its async thread.
pub fn take(monitor: &Monitor, name: &str) -> Result<SnapshotTaken, Refused> {
    crate::snapshot::store::check_name(name).map_err(|e| Refused::Bad(crate::error_chain(&e)))?;
    if monitor
        .snapshotting
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(Refused::Conflict(
            "another snapshot of this VM is being taken".into(),
        ));
    }
    let _busy = Busy(monitor);
    if monitor.stopped() {
        return Err(Refused::Conflict("the VM is stopping".into()));
    }
    let record = monitor
        .record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let image = record.image.as_ref().ok_or_else(|| {
        Refused::Conflict(format!(
            "VM {}'s record names no image; a snapshot records the image its VM was built from",
            record.name
        ))
    })?;
    let state_dir = monitor
        .dir
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| {
            Refused::Failed(format!("{} has no state directory", monitor.dir.display()))
        })?;
    let snapshots_dir = crate::snapshot::snapshots_dir(state_dir);
    let meta = SaveMeta {
        source_vm: record.name.clone(),
        image: crate::snapshot::ImageInfo {
            digest: image.digest.clone(),
            reference: Some(image.reference.clone()),
        },
        layers: image.layers.clone(),
        vm_dir: monitor.dir.clone(),
        store_root: store_root(&monitor.dir),
        nics: record.nics.clone(),
        boot: Some(save::BootFiles {
            kernel: record.machine.kernel.clone(),
            initrd: record.machine.initrd.clone(),
            cmdline: record.machine.cmdline.clone(),
        }),
    };

    // The disk locks stay with the monitor; holding their slot keeps the
    // monitor's exit from releasing them while the copies are made.
    let slot = monitor.disk_locks.lock().unwrap_or_else(|e| e.into_inner());
    let Some(locks) = slot.as_ref() else {
        return Err(Refused::Conflict("the VM is stopping".into()));
    };
    let was_paused = monitor.vm.is_paused();
    let t0 = Instant::now();
    if !was_paused {
        monitor.vm.pause();
    }
    let captured = save::capture(
        &monitor.vm,
        &record.storage,
        locks,
        meta,
        &snapshots_dir,
        name,
    );
    if !was_paused && !monitor.stopped() {
        monitor.vm.resume();
    }
    let paused = if was_paused {
        std::time::Duration::ZERO
    } else {
        t0.elapsed()
    };
    drop(slot);
    let refuse = |e: SaveError| match &e {
        SaveError::Store(StoreError::Exists { .. }) => Refused::Conflict(crate::error_chain(&e)),
        SaveError::Store(StoreError::BadName { .. }) => Refused::Bad(crate::error_chain(&e)),
        _ => Refused::Failed(crate::error_chain(&e)),
    };
    let info = captured.and_then(save::Captured::finish).map_err(refuse)?;
    Ok(SnapshotTaken {
        name: info.name,
        dir: info.dir,
        paused_ms: ms(paused),
        capture_ms: ms(info.capture_time),
        finish_ms: ms(info.finish_time),
        memory_bytes: info.vmm.memory_bytes,
        memory_data_bytes: info.vmm.memory_data_bytes,
        copies: info
            .copies
            .into_iter()
            .map(|(serial, method)| DiskCopy {
                serial,
                method: format!("{method:?}").to_lowercase(),
            })
            .collect(),
    })
}

/// The VM of `config` restored from the snapshot `from` names, instead of
/// booted: the disks are `config`'s (the clone's or the restored VM's own
/// files, which the VMM checks against the saved state), COM1 goes where
/// `config` says. The note is removed once the VM runs, so the next start
/// boots; a restore that fails keeps it (the next start tries again).
pub fn restore(vm_dir: &std::path::Path, from: &StartFrom, config: VmConfig) -> anyhow::Result<Vm> {
    // Held (shared) while the VMM reads the files: `snapshot rm` is
    // refused meanwhile.
    let name = from.snapshot.clone();
    let _snap = crate::snapshot::store::SnapshotDir::open_path(&from.dir, &name)
        .with_context(|| format!("opening snapshot {name} to restore it"))?;
    let vm = Vm::restore(cocoon_vmm::snapshot::RestoreConfig {
        state: from.state.clone(),
        memory: from.memory.clone(),
        disks: config.disks,
        // The record's NICs on the taps the monitor attached: a clone's
        // are new MACs, which the VMM translates for the guest.
        nets: config.nets,
        serial: config.serial,
    })
    .with_context(|| format!("restoring snapshot {name}"))?;
    StartFrom::clear(vm_dir)?;
    Ok(vm)
}
