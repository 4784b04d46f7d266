//! Snapshots of a paused VM, and VMs restored from them.
//!
//! A snapshot is two files in a directory the caller names:
//!
//! - [`STATE_FILE`] (`state`): the machine state (vCPUs, KVM's PIT, clock
//!   and interrupt controllers, COM1, the i8042, every virtio device's transport and
//!   queues, each disk's size, read-only flag and serial, each NIC's MAC,
//!   link status and any frame the guest had not taken yet), in the versioned,
//!   checksummed format of [`format`];
//! - [`MEMORY_FILE`] (`memory`): guest RAM, raw, sparse (zero pages are
//!   holes), as large as the guest's memory.
//!
//! Disks are not part of it: the host copies the writable ones inside the
//! pause window, and a restore names the files to use (a clone's own copies).
//! Nor are taps: a restore names one per NIC ([`RestoreConfig::nets`]),
//! with the MAC the network is to see. A restore onto another MAC (a
//! clone) translates between it and the MAC the guest's driver keeps using
//! (see [`MacRewrite`](crate::devices::virtio::net::MacRewrite)).
//!
//! # For the host
//!
//! ```no_run
//! # use cocoon_vmm::{Vm, DiskConfig, SerialOutput};
//! # use cocoon_vmm::snapshot::{self, RestoreConfig};
//! # fn f(vm: &Vm) -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/var/lib/cocoon-host/snapshots/s1");
//! vm.pause(); // vCPUs out of KVM_RUN, no disk request in flight
//! // ... copy the writable disks here, under their locks ...
//! let info = vm.snapshot(dir)?; // writes dir/state and dir/memory
//! vm.resume();
//!
//! // Preflight, without KVM: the state file is whole and of a version this
//! // VMM reads, and the disks the clone will get fit what the guest knows.
//! let summary = snapshot::verify_state(&dir.join(snapshot::STATE_FILE))?;
//! let disks = vec![DiskConfig::new("/var/lib/cocoon-host/vms/c1/root.img")];
//! snapshot::check_disks(&summary.disks, &disks)?;
//! snapshot::check_memory_file(&dir.join(snapshot::MEMORY_FILE), &summary)?;
//!
//! let clone = Vm::restore(RestoreConfig {
//!     state: dir.join(snapshot::STATE_FILE),
//!     memory: dir.join(snapshot::MEMORY_FILE),
//!     disks,
//!     nets: Vec::new(), // one NetConfig per summary.nics entry
//!     serial: SerialOutput::Sink,
//! })?; // running
//! # Ok(()) }
//! ```
//!
//! [`Vm::snapshot`](crate::Vm::snapshot) needs a paused VM and writes both
//! files under temporary names, fsyncs them and renames them into place
//! (memory first, so a `state` file means a complete snapshot), then fsyncs
//! the directory. Snapshotting a restored VM into the directory it was
//! restored from is safe: the rename replaces the name, while the running VM
//! keeps its private mapping of the old file.
//!
//! [`Vm::restore`](crate::Vm::restore) reads and checks everything (state
//! file, disk count, each disk's read-only flag, serial and size, NIC count,
//! each tap, the memory file's size, the host's RAM) before it opens
//! `/dev/kvm`; a bad snapshot
//! fails with its own [`RestoreError`] and changes nothing.
//! [`Vm::restore_with_shell`](crate::Vm::restore_with_shell) takes a
//! [`VmShell`] made ahead (the KVM VM, its irqchip and memory slots), which
//! leaves a restore only the snapshot-specific work. A snapshot
//! taken where the TSC ran at another rate is scaled with KVM_SET_TSC_KHZ
//! where the host can (KVM_CAP_TSC_CONTROL), and refused where it cannot.

//!
//! # What the host must keep to
//!
//! - The memory file must not change while a VM restored from it runs:
//!   replace it only by rename (as [`crate::Vm::snapshot`] does); writing
//!   or truncating it in place changes or faults the guest's memory.
//! - The disks the state describes are the ones copied inside the pause
//!   window; a restore checks their count, order, read-only flags, serials
//!   and sizes, not their contents.
//! - A snapshot restores on a host of the same CPU model: the saved CPUID
//!   and MSRs are set as they are (KVM refuses an MSR it does not have,
//!   which fails the restore naming it). Only the TSC rate is adapted.
//! - The ACPI power registers hold no state between guest accesses, so
//!   they are not saved. The i8042 is (since format 1.1): its control
//!   register and any keys the guest has not read yet.

pub mod cpu;
pub mod format;
pub mod kvm_vm;
pub mod memory_file;
mod restore;
mod save;
mod shell;
pub mod state;

use std::path::{Path, PathBuf};

pub use format::{FormatVersion, StateFileError, CURRENT as FORMAT_VERSION};
pub use restore::{check_disks, check_memory_file, check_nics, RestoreConfig, RestoreError};
pub use save::SnapshotError;
pub use shell::VmShell;
pub use state::{DiskSummary, NicSummary};

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// What [`crate::Vm::snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub state: PathBuf,
    pub memory: PathBuf,
    pub version: FormatVersion,
    pub cpus: u8,
    pub memory_bytes: u64,
    /// Bytes of the memory file that hold data (the rest are holes).
    pub memory_data_bytes: u64,
    pub state_bytes: u64,
    pub tsc_khz: Option<u32>,
    pub disks: Vec<DiskSummary>,
    pub nics: Vec<NicSummary>,
}

/// What a host's preflight needs from a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSummary {
    pub version: FormatVersion,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub tsc_khz: Option<u32>,
    pub disks: Vec<DiskSummary>,
    pub nics: Vec<NicSummary>,
}

/// The format version of a state file, from its header alone.
pub fn read_version(path: &Path) -> Result<FormatVersion, StateFileError> {
    format::read_version(path)
}

/// Reads and checks a whole state file (size, checksum, version, decoding,
/// consistency) without KVM, and summarises it.
pub fn verify_state(path: &Path) -> Result<StateSummary, StateFileError> {
    let (version, state) = format::read(path)?;
    Ok(StateSummary {
        version,
        cpus: state.cpus,
        memory_bytes: state.memory_bytes,
        tsc_khz: state.tsc_khz,
        disks: state.disk_summaries(),
        nics: state.nic_summaries(),
    })
}
