//! Everything a snapshot's state file holds, and the checks a state must
//! pass before a restore uses it.

use serde::{Deserialize, Serialize};

use super::cpu::{self, VcpuState};
use super::kvm_vm::KvmVmState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::UartState;
use crate::devices::virtio::block::BlockState;
#[cfg(test)]
use crate::devices::virtio::block::VIRTIO_ID_BLOCK;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::net::NetState;
use crate::devices::virtio::DeviceState;
use crate::memory::{self, MAX_VIRTIO_DEVICES, MIN_MEMORY};
use crate::vm::MAX_VCPUS;

/// A paused VM: machine shape, vCPUs, KVM's VM-wide state, devices, and
/// where guest memory lies in the memory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub cpus: u8,
    pub memory_bytes: u64,
    /// The vCPUs' TSC rate when saved; `None` when KVM could not say.
    pub tsc_khz: Option<u32>,
    pub memory: Vec<MemoryRegionState>,
    pub vcpus: Vec<VcpuState>,
    pub vm: KvmVmState,
    pub serial: UartState,
    /// In virtio-mmio slot order.
    pub devices: Vec<VirtioDeviceState>,
    /// Since format 1.1, encoded after the fields above (see
    /// [`super::format`]); a 1.0 state has the power-on i8042, which is all
    /// that VMM had.
    #[serde(skip)]
    pub i8042: I8042State,
}

/// One guest RAM region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub transport: TransportState,
    pub device: DeviceState,
}

/// The guest's view of one disk, for a host's preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSummary {
    /// Position among the VM's disks (its virtio-blk order).
    pub index: usize,
    pub read_only: bool,
    pub capacity_bytes: u64,
    /// The GET_ID string, NULs trimmed.
    pub serial: String,
}

/// The guest's view of one NIC, for a host's preflight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicSummary {
    /// Position among the VM's NICs (its virtio-net order).
    pub index: usize,
    /// The MAC the network saw (config space's).
    pub mac: [u8; 6],
    /// The MAC the guest's driver uses (`mac` unless the saved VM was
    /// itself a clone translating between them).
    pub guest_mac: [u8; 6],
}

/// The memory file's layout for `memory_bytes` of RAM: the regions of
/// [`memory::ram_regions`], back to back.
pub fn memory_layout(memory_bytes: u64) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    memory::ram_regions(memory_bytes)
        .into_iter()
        .map(|(addr, size)| {
            let r = MemoryRegionState {
                guest_addr: addr.0,
                size,
                file_offset: offset,
            };
            offset += size;
            r
        })
        .collect()
}

impl MachineState {
    /// Checks what decoding cannot: counts agree, the memory layout is this
    /// VMM's, sizes are within what KVM takes, each device's parts are of
    /// one kind.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(format!(
                "{} vCPUs; between 1 and {MAX_VCPUS} are supported",
                self.cpus
            ));
        }
        if self.vcpus.len() != usize::from(self.cpus) {
            return Err(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.cpus
            ));
        }
        if self.memory_bytes < MIN_MEMORY {
            return Err(format!(
                "guest memory of {} bytes is below the minimum of {MIN_MEMORY}",
                self.memory_bytes
            ));
        }
        if self.memory != memory_layout(self.memory_bytes) {
            return Err(format!(
                "memory regions {:?} are not this VMM's layout for {} bytes",
                self.memory, self.memory_bytes
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
                return Err(format!("vcpu{i}: {} CPUID entries", v.cpuid.len()));
            }
            if v.msrs.len() > cpu::MAX_MSRS {
                return Err(format!("vcpu{i}: {} MSRs", v.msrs.len()));
            }
            let xsave = v.xsave.len() * 4;
            if !(cpu::XSAVE_LEGACY_LEN..=cpu::MAX_XSAVE_LEN).contains(&xsave) {
                return Err(format!("vcpu{i}: an XSAVE area of {xsave} bytes"));
            }
        }
        self.vm.validate()?;
        self.i8042.validate()?;
        if self.devices.len() > MAX_VIRTIO_DEVICES {
            return Err(format!(
                "{} virtio devices; at most {MAX_VIRTIO_DEVICES}",
                self.devices.len()
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            let kind = d.device.device_type();
            if d.transport.device_type != kind {
                return Err(format!(
                    "virtio device {i}: transport of type {} for a device of type {kind}",
                    d.transport.device_type
                ));
            }
            if let DeviceState::Net(n) = &d.device {
                n.validate()
                    .map_err(|e| format!("virtio device {i} (network): {e}"))?;
                if d.transport.device_features != n.features {
                    return Err(format!(
                        "virtio device {i} (network): the transport offered {:#x}, the device {:#x}",
                        d.transport.device_features, n.features
                    ));
                }
            }
        }
        Ok(())
    }

    /// The block devices' states, in disk order.
    pub fn disks(&self) -> impl Iterator<Item = &BlockState> {
        self.devices.iter().filter_map(|d| match &d.device {
            DeviceState::Block(b) => Some(b),
            DeviceState::Net(_) => None,
        })
    }

    /// The network devices with their transports, in NIC order.
    pub fn nics(&self) -> impl Iterator<Item = (&TransportState, &NetState)> {
        self.devices.iter().filter_map(|d| match &d.device {
            DeviceState::Net(n) => Some((&d.transport, n)),
            DeviceState::Block(_) => None,
        })
    }

    pub fn nic_summaries(&self) -> Vec<NicSummary> {
        self.nics()
            .enumerate()
            .map(|(index, (_, n))| NicSummary {
                index,
                mac: n.mac,
                guest_mac: n.guest_mac,
            })
            .collect()
    }

    pub fn disk_summaries(&self) -> Vec<DiskSummary> {
        self.disks()
            .enumerate()
            .map(|(index, b)| DiskSummary {
                index,
                read_only: b.read_only,
                capacity_bytes: b.capacity,
                serial: String::from_utf8_lossy(&b.serial)
                    .trim_end_matches('\0')
                    .to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::mmio::QueueState;
    use kvm_bindings::{
        kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    };

    /// A state that passes validation, with KVM parts at their defaults.
    pub(crate) fn sample_state() -> MachineState {
        let vcpu = VcpuState {
            cpuid: vec![Default::default(); 3],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; cpu::XSAVE_LEGACY_WORDS],
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 5],
            events: Default::default(),
        };
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        let mut serial = [0u8; 20];
        serial[..5].copy_from_slice(b"data0");
        MachineState {
            cpus: 2,
            memory_bytes: 256 << 20,
            tsc_khz: Some(2_600_000),
            memory: memory_layout(256 << 20),
            vcpus: vec![vcpu.clone(), vcpu],
            vm: KvmVmState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
                ioapic: chip(KVM_IRQCHIP_IOAPIC),
            },
            serial: UartState {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 3,
                modem_status: 0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            devices: vec![VirtioDeviceState {
                transport: TransportState {
                    device_type: VIRTIO_ID_BLOCK,
                    device_features: 1 << 32,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    driver_features: 1 << 32,
                    queue_sel: 0,
                    status: 15,
                    interrupt_status: 0,
                    activated: true,
                    queues: vec![QueueState {
                        max_size: 256,
                        next_avail: 3,
                        next_used: 3,
                        event_idx_enabled: true,
                        size: 256,
                        ready: true,
                        desc_table: 0x10_0000,
                        avail_ring: 0x10_1000,
                        used_ring: 0x10_2000,
                    }],
                },
                device: DeviceState::Block(BlockState {
                    capacity: 1 << 20,
                    read_only: true,
                    serial,
                }),
            }],
            i8042: I8042State {
                control: 0x47,
                buffer: vec![0x14, 0x11],
                ..Default::default()
            },
        }
    }

    pub(crate) const SAVED_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x10];

    /// [`sample_state`] with a NIC after its disk.
    pub(crate) fn sample_state_with_nic() -> MachineState {
        let mut s = sample_state();
        let mut transport = s.devices[0].transport.clone();
        let features = 1 << 32 | 1 << 5 | 1 << 16;
        transport.device_type = crate::devices::virtio::net::VIRTIO_ID_NET;
        transport.device_features = features;
        transport.driver_features = features;
        transport.queues = vec![transport.queues[0]; 2];
        s.devices.push(VirtioDeviceState {
            transport,
            device: DeviceState::Net(NetState {
                mac: SAVED_MAC,
                guest_mac: SAVED_MAC,
                features,
                status: 1,
                pending_rx: Some(vec![0; 74]),
                stats: Default::default(),
            }),
        });
        s
    }

    #[test]
    fn a_nic_is_summarised_apart_from_the_disks_and_checked() {
        let s = sample_state_with_nic();
        s.validate().unwrap();
        assert_eq!(s.disk_summaries().len(), 1);
        assert_eq!(
            s.nic_summaries(),
            vec![NicSummary {
                index: 0,
                mac: SAVED_MAC,
                guest_mac: SAVED_MAC
            }]
        );
        type Edit = fn(&mut NetState, &mut TransportState);
        let cases: &[(&str, Edit)] = &[
            (
                "virtio device 1: transport of type 2 for a device of type 1",
                |_, t| t.device_type = VIRTIO_ID_BLOCK,
            ),
            (
                "virtio device 1 (network): a waiting frame of 5 bytes",
                |n, _| n.pending_rx = Some(vec![0; 5]),
            ),
            ("a waiting frame of 70000 bytes", |n, _| {
                n.pending_rx = Some(vec![0; 70000])
            }),
            ("link status 0x4", |n, _| n.status = 4),
            (
                "the transport offered 0x100010020, the device 0x100010021",
                |n, _| n.features |= 1,
            ),
        ];
        for (want, edit) in cases {
            let mut s = sample_state_with_nic();
            let d = &mut s.devices[1];
            let DeviceState::Net(n) = &mut d.device else {
                unreachable!()
            };
            edit(n, &mut d.transport);
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn a_sample_state_is_valid_and_summarises_its_disks() {
        let s = sample_state();
        s.validate().unwrap();
        assert_eq!(
            s.disk_summaries(),
            vec![DiskSummary {
                index: 0,
                read_only: true,
                capacity_bytes: 1 << 20,
                serial: "data0".into()
            }]
        );
    }

    #[test]
    fn invalid_states_are_refused_with_what_is_wrong() {
        type Edit = fn(&mut MachineState);
        let cases: &[(&str, Edit)] = &[
            ("0 vCPUs", |s| s.cpus = 0),
            ("255 vCPUs", |s| s.cpus = 255),
            ("1 vCPU states for 2 vCPUs", |s| {
                s.vcpus.pop();
            }),
            ("below the minimum", |s| {
                s.memory_bytes = 1 << 20;
                s.memory = memory_layout(1 << 20);
            }),
            ("not this VMM's layout", |s| s.memory[0].file_offset = 4096),
            ("not this VMM's layout", |s| s.memory_bytes += 4096),
            ("CPUID entries", |s| {
                s.vcpus[1].cpuid = vec![Default::default(); 257]
            }),
            ("MSRs", |s| s.vcpus[0].msrs = vec![Default::default(); 5000]),
            ("XSAVE area of 4194304", |s| {
                s.vcpus[0].xsave = vec![0; 1 << 20]
            }),
            ("XSAVE area of 400", |s| s.vcpus[0].xsave = vec![0; 100]),
            ("IOAPIC state has chip id 0", |s| s.vm.ioapic.chip_id = 0),
            ("virtio devices", |s| {
                let d = s.devices[0].clone();
                s.devices = vec![d; MAX_VIRTIO_DEVICES + 1];
            }),
            ("transport of type 1", |s| {
                s.devices[0].transport.device_type = 1
            }),
            ("i8042 holds 17 bytes", |s| s.i8042.buffer = vec![0; 17]),
        ];
        for (want, edit) in cases {
            let mut s = sample_state();
            edit(&mut s);
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn memory_layout_follows_the_gap() {
        let small = memory_layout(256 << 20);
        assert_eq!(
            small,
            vec![MemoryRegionState {
                guest_addr: 0,
                size: 256 << 20,
                file_offset: 0
            }]
        );
        let big = memory_layout(4 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(big[1].guest_addr, memory::MMIO_GAP_END);
        assert_eq!(big[1].file_offset, memory::MMIO_GAP_START);
        assert_eq!(big[1].file_offset + big[1].size, 4 << 30);
    }
}
