//! [`Vm::restore`]: a running VM from a snapshot, with every file checked
//! before KVM is touched.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, VcpuFd};

use super::cpu::{self, CpuStateError, HostCpu, TscError, TscPlan};
use super::kvm_vm::{self, KvmVmError};
use super::memory_file::{self, MemoryFileError};
use super::state::{DiskSummary, MachineState, NicSummary};
use super::{format, StateFileError, StateSummary, VmShell};
use crate::builder::Machine;
use crate::config::{DiskConfig, NetConfig, SerialOutput};
use crate::devices::lock;
use crate::devices::serial::{SerialDevice, SerialWriter, UartStateError};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::TransportStateError;
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::DeviceState;
use crate::memory::{self, MemoryError};
use crate::vm::{self, Vm, VmError};

/// What to restore and onto which files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The snapshot's state file.
    pub state: PathBuf,
    /// The snapshot's memory file; mapped private, never written.
    pub memory: PathBuf,
    /// One per disk of the snapshot, in order. The paths may differ from
    /// the snapshotted VM's (a clone gets its own copies); the read-only
    /// flag must be the saved one, a serial if given too, and each file
    /// must have the saved size. `direct` is the host's choice.
    pub disks: Vec<DiskConfig>,
    /// One per NIC of the snapshot, in order: the tap to open (the
    /// snapshotted VM's, or a clone's own) and the MAC the network is to
    /// see. A MAC other than the one the guest uses (a clone's) is
    /// translated by the device (see
    /// [`MacRewrite`](crate::devices::virtio::net::MacRewrite)); the saved
    /// MAC restores without any rewrite.
    pub nets: Vec<NetConfig>,
    pub serial: SerialOutput,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error("the snapshot has {saved} disks; the restore names {given}")]
    DiskCount { saved: usize, given: usize },
    #[error("disk {index} ({path}) is {} in the snapshot, and the restore asks for it {}", ro(*saved), ro(*given))]
    DiskReadOnly {
        index: usize,
        path: String,
        saved: bool,
        given: bool,
    },
    #[error("disk {index} has serial {saved:?} in the snapshot; the restore asks for {given:?}")]
    DiskSerial {
        index: usize,
        saved: String,
        given: String,
    },
    #[error("the snapshot has {saved} NICs; the restore names {given}")]
    NicCount { saved: usize, given: usize },
    #[error("NIC {index} ({mac}) is not a unicast MAC")]
    NicMac { index: usize, mac: String },
    #[error("NIC {index} (tap {tap})")]
    Tap {
        index: usize,
        tap: String,
        #[source]
        source: TapError,
    },
    #[error("NIC {index} (tap {tap})")]
    Net {
        index: usize,
        tap: String,
        #[source]
        source: NetError,
    },
    #[error("disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("cannot open the memory file {path}")]
    MemoryFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the memory file {path} is {found} bytes; the snapshot's guest has {expected}")]
    MemoryFileSize {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error(transparent)]
    HostMemory(#[from] MemoryError),
    #[error(transparent)]
    MemoryMap(#[from] MemoryFileError),
    #[error(transparent)]
    Tsc(#[from] TscError),
    #[error("cannot read the host's vCPU capabilities")]
    HostCpu(#[source] CpuStateError),
    #[error("cannot restore vcpu{index}")]
    Cpu {
        index: usize,
        #[source]
        source: CpuStateError,
    },
    #[error("cannot restore the VM's KVM state")]
    KvmVm(#[source] KvmVmError),
    #[error("cannot restore virtio device {index}")]
    Device {
        index: usize,
        #[source]
        source: TransportStateError,
    },
    #[error("cannot restore COM1")]
    Serial(#[source] UartStateError),
    #[error("cannot open the serial log")]
    SerialLog(#[source] std::io::Error),
    #[error("the VM shell has {shell} bytes of memory; the snapshot's guest {snapshot}")]
    ShellSize { shell: u64, snapshot: u64 },
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn ro(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}

/// The disks a restore names against the snapshot's: the same count, and
/// per index the same read-only flag and (when given) serial. Pure, for a
/// host's preflight; [`Vm::restore`] runs it too.
pub fn check_disks(saved: &[DiskSummary], given: &[DiskConfig]) -> Result<(), RestoreError> {
    if saved.len() != given.len() {
        return Err(RestoreError::DiskCount {
            saved: saved.len(),
            given: given.len(),
        });
    }
    for (index, (s, g)) in saved.iter().zip(given).enumerate() {
        if s.read_only != g.read_only {
            return Err(RestoreError::DiskReadOnly {
                index,
                path: g.path.display().to_string(),
                saved: s.read_only,
                given: g.read_only,
            });
        }
        if let Some(serial) = &g.serial {
            if *serial != s.serial {
                return Err(RestoreError::DiskSerial {
                    index,
                    saved: s.serial.clone(),
                    given: serial.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The NICs a restore names against the snapshot's: the same count, and
/// each MAC one a NIC can have (unicast). Pure, for a host's preflight;
/// [`Vm::restore`] runs it too.
pub fn check_nics(saved: &[NicSummary], given: &[NetConfig]) -> Result<(), RestoreError> {
    if saved.len() != given.len() {
        return Err(RestoreError::NicCount {
            saved: saved.len(),
            given: given.len(),
        });
    }
    for (index, n) in given.iter().enumerate() {
        if n.mac[0] & 1 != 0 {
            return Err(RestoreError::NicMac {
                index,
                mac: n
                    .mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            });
        }
    }
    Ok(())
}

/// The memory file is there and exactly the guest's size (a truncated copy
/// would read as zeros, or fault, where the guest had data).
pub fn check_memory_file(path: &Path, summary: &StateSummary) -> Result<(), RestoreError> {
    open_memory_file(path, summary.memory_bytes).map(|_| ())
}

fn open_memory_file(path: &Path, expected: u64) -> Result<File, RestoreError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| RestoreError::MemoryFile {
        path: name.clone(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| RestoreError::MemoryFile {
            path: name.clone(),
            source,
        })?
        .len();
    if found != expected {
        return Err(RestoreError::MemoryFileSize {
            path: name,
            expected,
            found,
        });
    }
    Ok(file)
}

/// Everything a restore needs, read and checked, and nothing of KVM yet.
struct Prepared {
    state: MachineState,
    memory: File,
    memory_name: String,
    blocks: Vec<Block>,
    /// Each restored device with its tap's descriptor for the I/O thread.
    nets: Vec<(Net, std::os::fd::OwnedFd)>,
    serial_out: SerialWriter,
    serial: SerialOutput,
}

fn prepare(config: RestoreConfig) -> Result<Prepared, RestoreError> {
    let (_version, state) = format::read(&config.state)?;
    check_disks(&state.disk_summaries(), &config.disks)?;
    check_nics(&state.nic_summaries(), &config.nets)?;
    memory::check_fits_this_host(state.memory_bytes)?;
    let memory = open_memory_file(&config.memory, state.memory_bytes)?;
    let blocks = state
        .disks()
        .zip(&config.disks)
        .enumerate()
        .map(|(index, (saved, disk))| {
            Block::open_restored(&disk.path, saved, disk.direct)
                .map_err(|source| RestoreError::Disk { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The taps last: a tap is held from here until the VM stops.
    let nets = state
        .nics()
        .zip(&config.nets)
        .enumerate()
        .map(|(index, ((transport, saved), nic))| open_net(index, transport, saved, nic))
        .collect::<Result<Vec<_>, _>>()?;
    let serial_out = vm::serial_writer(&config.serial).map_err(|e| match e {
        VmError::Io(_, source) => RestoreError::SerialLog(source),
        other => RestoreError::Vm(other),
    })?;
    Ok(Prepared {
        state,
        memory,
        memory_name: config.memory.display().to_string(),
        blocks,
        nets,
        serial_out,
        serial: config.serial,
    })
}

/// NIC `index` over its tap, in its saved state: the acked features are
/// the transport's (when the driver had set DRIVER_OK), and set on the tap
/// as activation does.
fn open_net(
    index: usize,
    transport: &crate::devices::virtio::mmio::TransportState,
    saved: &crate::devices::virtio::net::NetState,
    nic: &NetConfig,
) -> Result<(Net, std::os::fd::OwnedFd), RestoreError> {
    let tap_err = |source| RestoreError::Tap {
        index,
        tap: nic.tap.clone(),
        source,
    };
    let tap = Tap::open(&nic.tap).map_err(tap_err)?;
    let poll_fd = tap.poll_fd().map_err(|source| {
        tap_err(TapError::Ioctl {
            what: "duplicate the descriptor",
            name: nic.tap.clone(),
            source,
        })
    })?;
    let acked = if transport.activated {
        transport.driver_features
    } else {
        0
    };
    let net =
        Net::restore(Box::new(tap), saved, acked, nic.mac).map_err(|source| RestoreError::Net {
            index,
            tap: nic.tap.clone(),
            source,
        })?;
    Ok((net, poll_fd))
}

impl Vm {
    /// Restores a snapshot and runs it. See [`crate::snapshot`].
    pub fn restore(config: RestoreConfig) -> Result<Vm, RestoreError> {
        Self::restore_from(config, None)
    }

    /// [`Vm::restore`] into a KVM VM made ahead; its memory size must be
    /// the snapshot's.
    pub fn restore_with_shell(shell: VmShell, config: RestoreConfig) -> Result<Vm, RestoreError> {
        Self::restore_from(config, Some(shell))
    }

    fn restore_from(config: RestoreConfig, shell: Option<VmShell>) -> Result<Vm, RestoreError> {
        let p = prepare(config)?;
        let state = &p.state;
        let shell = match shell {
            Some(s) if s.memory_bytes() != state.memory_bytes => {
                return Err(RestoreError::ShellSize {
                    shell: s.memory_bytes(),
                    snapshot: state.memory_bytes,
                })
            }
            Some(s) => s,
            None => VmShell::new(state.memory_bytes)?,
        };
        let mem = memory_file::map_into(&p.memory, &state.memory, &shell.memory, &p.memory_name)?;
        let mut machine = Machine::from_parts(shell.kvm, shell.vm, mem, Some(shell.memory));
        machine.attach_serial(|irq| {
            SerialDevice::from_state(irq, p.serial_out, &state.serial).map_err(RestoreError::Serial)
        })?;
        machine.attach_power_devices()?;
        if let Some(i8042) = &machine.i8042 {
            lock(i8042).restore(&state.i8042);
        }
        // In slot order, as saved: each device of its kind, in turn.
        let mut blocks = p.blocks.into_iter().enumerate();
        let mut nets = p.nets.into_iter().enumerate();
        for (index, saved) in state.devices.iter().enumerate() {
            let restore = |t: &mut crate::devices::virtio::mmio::MmioTransport| {
                t.restore(&saved.transport)
                    .map_err(|source| RestoreError::Device { index, source })
            };
            match &saved.device {
                DeviceState::Block(_) => {
                    let (i, block) = blocks.next().expect("one block per disk state");
                    machine.attach_virtio(Box::new(block), format!("virtio-blk{i}"), restore)?;
                }
                DeviceState::Net(_) => {
                    let (i, (net, poll_fd)) = nets.next().expect("one device per NIC state");
                    machine.attach_net_device(i, net, poll_fd, restore)?;
                }
            }
        }

        let fds = restore_vcpus(&machine, state)?;
        kvm_vm::restore(&machine.vm, &state.vm).map_err(RestoreError::KvmVm)?;
        for fd in &fds {
            vm::kvmclock_ctrl(fd);
        }
        kick_devices(&machine);
        Ok(Vm::run(machine, fds, &p.serial)?)
    }
}

/// New vCPUs with the saved state, their TSC at the saved rate.
fn restore_vcpus(machine: &Machine, state: &MachineState) -> Result<Vec<VcpuFd>, RestoreError> {
    let host = HostCpu::probe(&machine.kvm, &machine.vm).map_err(RestoreError::HostCpu)?;
    let fds = (0..state.cpus)
        .map(|i| machine.create_vcpu(i))
        .collect::<Result<Vec<_>, _>>()?;
    let host_khz = fds[0].get_tsc_khz().ok();
    let can_scale = machine.kvm.check_extension(Cap::TscControl);
    if let TscPlan::Scale(khz) = cpu::plan_tsc(state.tsc_khz, host_khz, can_scale)? {
        for (index, fd) in fds.iter().enumerate() {
            fd.set_tsc_khz(khz).map_err(|source| RestoreError::Cpu {
                index,
                source: CpuStateError::Kvm {
                    what: "scale the TSC",
                    source,
                },
            })?;
        }
    }
    for (index, (fd, saved)) in fds.iter().zip(&state.vcpus).enumerate() {
        cpu::restore(fd, saved, &host).map_err(|source| RestoreError::Cpu { index, source })?;
    }
    Ok(fds)
}

/// Interrupts that were pending (or in flight) when the state was saved,
/// and requests posted but not yet served.
fn kick_devices(machine: &Machine) {
    if let Some(serial) = &machine.serial {
        lock(serial).kick();
    }
    if let Some(i8042) = &machine.i8042 {
        lock(i8042).kick();
    }
    for slot in &machine.virtio {
        lock(&slot.transport).kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(read_only: bool, serial: &str) -> DiskSummary {
        DiskSummary {
            index: 0,
            read_only,
            capacity_bytes: 1 << 20,
            serial: serial.into(),
        }
    }

    fn given(read_only: bool, serial: Option<&str>) -> DiskConfig {
        DiskConfig {
            path: "/clone/disk.img".into(),
            read_only,
            serial: serial.map(Into::into),
            direct: false,
        }
    }

    #[test]
    fn nics_must_match_in_count_and_be_unicast() {
        let saved = [NicSummary {
            index: 0,
            mac: [2, 0, 0, 0, 0, 1],
            guest_mac: [2, 0, 0, 0, 0, 1],
        }];
        let nic = |mac| NetConfig {
            tap: "tap0".into(),
            mac,
        };
        // Another MAC is a clone's: translated, not refused.
        check_nics(&saved, &[nic([2, 0, 0, 0, 0, 9])]).unwrap();
        let e = check_nics(&saved, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the snapshot has 1 NICs; the restore names 0"
        );
        let e = check_nics(&[], &[nic([2, 0, 0, 0, 0, 1])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the snapshot has 0 NICs; the restore names 1"
        );
        let e = check_nics(&saved, &[nic([3, 0, 0, 0, 0, 1])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NIC 0 (03:00:00:00:00:01) is not a unicast MAC"
        );
    }

    #[test]
    fn disks_must_match_in_count_read_only_flag_and_serial() {
        let s = [saved(true, "layer0"), saved(false, "data")];
        // Paths may differ, serials may be left out, direct is free.
        check_disks(&s, &[given(true, None), given(false, Some("data"))]).unwrap();
        let mut direct = given(false, None);
        direct.direct = true;
        check_disks(&s, &[given(true, Some("layer0")), direct]).unwrap();

        let cases: Vec<(Vec<DiskConfig>, &str)> = vec![
            (vec![given(true, None)], "the snapshot has 2 disks; the restore names 1"),
            (
                vec![given(true, None), given(false, None), given(false, None)],
                "names 3",
            ),
            (
                vec![given(true, None), given(true, None)],
                "disk 1 (/clone/disk.img) is writable in the snapshot, and the restore asks for it read-only",
            ),
            (
                vec![given(false, None), given(false, None)],
                "disk 0 (/clone/disk.img) is read-only in the snapshot",
            ),
            (
                vec![given(true, None), given(false, Some("other"))],
                "disk 1 has serial \"data\" in the snapshot; the restore asks for \"other\"",
            ),
        ];
        for (disks, want) in cases {
            let e = check_disks(&s, &disks).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
