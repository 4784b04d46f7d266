//! Building a VM in small steps, as Firecracker's `builder.rs` does: create
//! the KVM VM, register guest memory, attach each device, create and
//! configure the vCPUs, start them. [`crate::Vm::start`] runs the boot
//! recipe; restoring a snapshot runs the same steps with state instead of a
//! kernel.
//!
//! A new virtio device kind attaches through [`Machine::attach_virtio`]: it
//! takes the next virtio-mmio slot (address, IOAPIC pin, irqfd, one
//! ioeventfd per queue) and gets its own I/O thread.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, MmioSlot};
use crate::arch::{cpuid, msrs, regs};
use crate::boot::{self, BootSpec};
use crate::config::{DiskConfig, NetConfig, VmConfig};
use crate::devices::acpi_pm::{AcpiPowerDevice, ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN, KEYBOARD_GSI};
use crate::devices::serial::{SerialDevice, SerialWriter, COM1_GSI, COM1_PORT, COM1_PORT_LEN};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::{Net, NetCounters};
use crate::devices::virtio::worker::Workers;
use crate::devices::virtio::VirtioDevice;
use crate::devices::Bus;
use crate::memory::{self, Reservation, MAX_VIRTIO_DEVICES, VIRTIO_MMIO_SIZE};
use crate::vcpu::{self, Control, ExitReason};
use crate::vm::VmError;

/// Opens /dev/kvm and checks that it is KVM with what we need.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::NotKvm(version));
    }
    for cap in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

const REQUIRED_CAPS: [Cap; 4] = [Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory];

/// Creates the KVM VM (its TSS and identity map pages set). Its memory is
/// registered next, and only then [`create_irqchip`]: a memory slot added
/// after the in-kernel irqchip and PIT exist took 5-10 ms on a nested KVM
/// host (0.1-0.2 ms before them), the largest single cost of a boot.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create a VM", e))?;
    vm.set_tss_address(crate::cast::usize_from(memory::KVM_TSS_ADDR))
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    vm.set_identity_map_address(memory::KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmError::Kvm("set the identity map address", e))?;
    Ok(vm)
}

/// The in-kernel irqchip and PIT, after guest memory is registered (see
/// [`create_vm`]) and before any vCPU exists (KVM requires the latter).
pub fn create_irqchip(vm: &VmFd) -> Result<(), VmError> {
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create the PIT", e))
}

/// Tells KVM where guest memory lives, one slot per region.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("guest memory has a few regions"),
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of exactly `len` bytes owned
        // by `mem`, which the Machine keeps until after the VM fd is closed.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| VmError::Kvm("map guest memory", e))?;
    }
    Ok(())
}

/// Tells KVM that guest memory will live in `reserved`, before anything is
/// mapped there: KVM resolves guest pages through the host mapping at fault
/// time, and follows later changes to it through its MMU notifier.
pub fn register_reserved(vm: &VmFd, reserved: &Reservation) -> Result<(), VmError> {
    for (slot, r) in reserved.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("guest memory has a few regions"),
            flags: 0,
            guest_phys_addr: r.guest_addr.0,
            memory_size: r.size as u64,
            userspace_addr: r.host_addr as u64,
        };
        // SAFETY: the range is reserved address space of exactly `size`
        // bytes owned by `reserved`, which outlives the VM fd (it is the
        // Machine's last field).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("map guest memory", e))?;
    }
    Ok(())
}

/// A virtio device attached to the MMIO bus.
pub struct VirtioSlot {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub slot: MmioSlot,
}

/// A VM being built, and then owned by the running [`crate::Vm`].
pub struct Machine {
    pub kvm: Kvm,
    // Declared before `mem`: the VM (and its memory slots) goes first.
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub control: Arc<Control>,
    /// Shared with the vCPU threads once they run; devices attach before.
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The keyboard controller, for the host's Ctrl-Alt-Del.
    pub i8042: Option<Arc<Mutex<I8042>>>,
    pub virtio: Vec<VirtioSlot>,
    /// The counters of each network device, in attach order.
    pub nets: Vec<Arc<NetCounters>>,
    pub workers: Workers,
    /// The address space `mem` lives in, when it was reserved ahead; last,
    /// so it is unmapped after everything that uses it.
    pub reservation: Option<Reservation>,
}

impl Machine {
    /// A machine with `mem` registered and no devices yet.
    pub fn new(kvm: Kvm, vm: VmFd, mem: GuestMemoryMmap) -> Result<Machine, VmError> {
        register_memory(&vm, &mem)?;
        create_irqchip(&vm)?;
        Ok(Self::from_parts(kvm, vm, mem, None))
    }

    /// A machine whose memory KVM already knows (through `reservation`).
    pub fn from_parts(
        kvm: Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
        reservation: Option<Reservation>,
    ) -> Machine {
        Machine {
            kvm,
            vm,
            mem,
            control: Arc::new(Control::default()),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            serial: None,
            i8042: None,
            virtio: Vec::new(),
            nets: Vec::new(),
            workers: Workers::new(),
            reservation,
        }
    }

    /// COM1 at 0x3f8 on IRQ 4; `make` builds the UART on its irqfd.
    pub fn attach_serial<E: From<VmError>>(
        &mut self,
        make: impl FnOnce(EventFd) -> Result<SerialDevice, E>,
    ) -> Result<(), E> {
        let irq = new_eventfd()?;
        self.vm
            .register_irqfd(&irq, COM1_GSI)
            .map_err(|e| VmError::Kvm("register the COM1 irqfd", e))?;
        let serial = Arc::new(Mutex::new(make(irq)?));
        bus_mut(&mut self.pio)?
            .insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)
            .map_err(VmError::from)?;
        self.serial = Some(serial);
        Ok(())
    }

    /// A fresh COM1 writing to `out`.
    pub fn attach_new_serial(&mut self, out: SerialWriter) -> Result<(), VmError> {
        self.attach_serial(|irq| Ok::<_, VmError>(SerialDevice::new(irq, out)))
    }

    /// The i8042 (its reset line, and the keyboard for Ctrl-Alt-Del on IRQ
    /// 1) and the ACPI sleep/reset registers.
    pub fn attach_power_devices(&mut self) -> Result<(), VmError> {
        let irq = new_eventfd()?;
        self.vm
            .register_irqfd(&irq, KEYBOARD_GSI)
            .map_err(|e| VmError::Kvm("register the keyboard irqfd", e))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(self.control.clone(), irq)));
        let pio = bus_mut(&mut self.pio)?;
        pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
        self.i8042 = Some(i8042);
        let pio = bus_mut(&mut self.pio)?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerDevice::new(self.control.clone()))),
            ACPI_PM_PORT_BASE,
            ACPI_PM_PORT_LEN,
        )?;
        Ok(())
    }

    /// Puts `device` in the next virtio-mmio slot with its own I/O thread
    /// named `name`; `setup` may change the transport before it goes live
    /// (a restore puts back the saved registers there).
    pub fn attach_virtio<E: From<VmError>>(
        &mut self,
        device: Box<dyn VirtioDevice>,
        name: String,
        setup: impl FnOnce(&mut MmioTransport) -> Result<(), E>,
    ) -> Result<MmioSlot, E> {
        self.attach_virtio_with_backend(device, name, None, setup)
    }

    /// As [`Machine::attach_virtio`], for a device whose backend has a file
    /// descriptor (a tap) that its I/O thread waits on as well.
    pub fn attach_virtio_with_backend<E: From<VmError>>(
        &mut self,
        device: Box<dyn VirtioDevice>,
        name: String,
        backend: Option<OwnedFd>,
        setup: impl FnOnce(&mut MmioTransport) -> Result<(), E>,
    ) -> Result<MmioSlot, E> {
        let index = self.virtio.len();
        if index >= MAX_VIRTIO_DEVICES {
            return Err(
                VmError::Config(format!("more than {MAX_VIRTIO_DEVICES} virtio devices")).into(),
            );
        }
        let (addr, irq) = memory::virtio_mmio_slot(index);
        let irq_evt = new_eventfd()?;
        self.vm
            .register_irqfd(&irq_evt, irq)
            .map_err(|e| VmError::Kvm("register a virtio irqfd", e))?;
        let mut transport = MmioTransport::new(device, self.mem.clone(), irq_evt);
        setup(&mut transport)?;
        let mut queue_evts = Vec::new();
        for q in 0..transport.num_queues() {
            let evt = new_eventfd()?;
            self.vm
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(addr + REG_QUEUE_NOTIFY),
                    u32::try_from(q).expect("a virtio device has a few queues"),
                )
                .map_err(|e| VmError::Kvm("register a virtio ioeventfd", e))?;
            queue_evts.push(evt);
        }
        let transport = Arc::new(Mutex::new(transport));
        bus_mut(&mut self.mmio)?
            .insert(transport.clone(), addr, VIRTIO_MMIO_SIZE)
            .map_err(VmError::from)?;
        self.workers
            .spawn(name, transport.clone(), queue_evts, backend)
            .map_err(|e| VmError::Io("spawn a virtio I/O thread", e))?;
        let slot = MmioSlot { addr, irq };
        self.virtio.push(VirtioSlot { transport, slot });
        Ok(slot)
    }

    /// Disk `index` of the configuration, as virtio-blk.
    pub fn attach_block(&mut self, index: usize, disk: &DiskConfig) -> Result<MmioSlot, VmError> {
        let block = open_block(index, disk)?;
        self.attach_virtio(Box::new(block), format!("virtio-blk{index}"), |_| {
            Ok::<_, VmError>(())
        })
    }

    /// Network device `index` of the configuration, as virtio-net over its
    /// tap.
    pub fn attach_net(&mut self, index: usize, nic: &NetConfig) -> Result<MmioSlot, VmError> {
        let error = |source| VmError::Net {
            index,
            tap: nic.tap.clone(),
            source,
        };
        let tap = Tap::open(&nic.tap).map_err(error)?;
        let poll_fd = tap
            .poll_fd()
            .map_err(|e| VmError::Io("duplicate a tap descriptor", e))?;
        let net = Net::new(Box::new(tap), nic.mac);
        self.attach_net_device(index, net, poll_fd, |_| Ok::<_, VmError>(()))
    }

    /// A network device made ahead (a restored one), its I/O thread waiting
    /// on `poll_fd` (its tap's) too; `setup` runs on its transport first.
    pub fn attach_net_device<E: From<VmError>>(
        &mut self,
        index: usize,
        net: Net,
        poll_fd: OwnedFd,
        setup: impl FnOnce(&mut MmioTransport) -> Result<(), E>,
    ) -> Result<MmioSlot, E> {
        let counters = net.counters();
        let slot = self.attach_virtio_with_backend(
            Box::new(net),
            format!("virtio-net{index}"),
            Some(poll_fd),
            setup,
        )?;
        self.nets.push(counters);
        Ok(slot)
    }

    /// The slots of every virtio device, in order.
    pub fn slots(&self) -> Vec<MmioSlot> {
        self.virtio.iter().map(|v| v.slot).collect()
    }

    /// Creates `count` vCPUs, each with its CPUID. CPUID goes first: KVM
    /// decides from it which MSRs and features the vCPU has.
    pub fn create_vcpus(&self, count: u8) -> Result<Vec<VcpuFd>, VmError> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("report the supported CPUID", e))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        (0..count)
            .map(|index| {
                let fd = self.create_vcpu(index)?;
                let mut cpuid: CpuId = supported.clone();
                cpuid::patch_cpuid(&mut cpuid, index, count, tsc_deadline);
                fd.set_cpuid2(&cpuid)
                    .map_err(|e| VmError::Kvm("set CPUID", e))?;
                Ok(fd)
            })
            .collect()
    }

    /// One vCPU, nothing set.
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::Kvm("create a vCPU", e))
    }

    /// Starts one thread per vCPU; on failure, the ones started are stopped.
    pub fn start_vcpus(
        &self,
        fds: Vec<Arc<Mutex<VcpuFd>>>,
    ) -> Result<Vec<std::thread::JoinHandle<()>>, VmError> {
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Io("install the vCPU kick signal handler", e.into()))?;
        let mut threads = Vec::new();
        for (index, fd) in fds.into_iter().enumerate() {
            let ctx = vcpu::VcpuContext {
                index: u8::try_from(index).expect("create_vcpus makes at most 255"),
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                control: self.control.clone(),
            };
            match vcpu::spawn(ctx) {
                Ok(h) => threads.push(h),
                Err(e) => {
                    self.control
                        .request_exit(ExitReason::Error("cannot spawn a vCPU thread".into()));
                    vcpu::join_all(threads);
                    return Err(VmError::Io("spawn a vCPU thread", e));
                }
            }
        }
        Ok(threads)
    }
}

/// Opens disk `index` as a virtio-blk backend.
pub fn open_block(index: usize, disk: &DiskConfig) -> Result<Block, VmError> {
    Block::open(
        &disk.path,
        disk.read_only,
        disk.direct,
        disk.serial.as_deref(),
    )
    .map_err(|source| VmError::Disk { index, source })
}

/// Writes the ACPI tables and loads the kernel, initrd and command line;
/// says how the boot vCPU enters.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    slots: &[MmioSlot],
) -> Result<regs::EntryMode, VmError> {
    let rsdp_addr = acpi::write_tables(mem, config.cpus, slots)?;
    let cmdline = full_cmdline(&config.cmdline, slots);
    Ok(boot::load(
        mem,
        &BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &cmdline,
            memory_size: config.memory,
            rsdp_addr,
        },
    )?)
}

/// Boot MSRs, FPU and LAPIC for every vCPU, and the entry state of the
/// first. Application processors wait for INIT/SIPI from the guest, which
/// sets their state then.
pub fn configure_boot_vcpus(
    fds: &[VcpuFd],
    mem: &GuestMemoryMmap,
    entry: regs::EntryMode,
) -> Result<(), VmError> {
    for (index, fd) in fds.iter().enumerate() {
        let index = u8::try_from(index).expect("create_vcpus makes at most 255");
        let msrs = msrs::boot_msrs();
        let n = fd
            .set_msrs(&msrs)
            .map_err(|e| VmError::Kvm("set MSRs", e))?;
        if n != msrs.as_slice().len() {
            return Err(VmError::Config(format!(
                "KVM accepted {n} of {} boot MSRs",
                msrs.as_slice().len()
            )));
        }
        regs::setup_fpu(fd).map_err(|e| VmError::Regs(index, e))?;
        regs::setup_lint(fd).map_err(|e| VmError::Regs(index, e))?;
        if index == 0 {
            regs::setup_boot_vcpu(fd, mem, entry).map_err(|e| VmError::Regs(index, e))?;
        }
    }
    Ok(())
}

/// The user's command line plus one `virtio_mmio.device=` per slot, for
/// guests that find devices there rather than in the DSDT.
pub fn full_cmdline(user: &str, slots: &[MmioSlot]) -> String {
    let mut cmdline = user.trim().to_string();
    for s in slots {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!("virtio_mmio.device=4K@{:#x}:{}", s.addr, s.irq));
    }
    cmdline
}

/// A bus to attach to: only before the vCPU threads hold it.
fn bus_mut(bus: &mut Arc<Bus>) -> Result<&mut Bus, VmError> {
    Arc::get_mut(bus)
        .ok_or_else(|| VmError::Config("devices attach only before the vCPUs start".into()))
}

fn new_eventfd() -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io("create an eventfd", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gets_one_entry_per_slot() {
        let slots = [
            MmioSlot {
                addr: 0xd000_0000,
                irq: 5,
            },
            MmioSlot {
                addr: 0xd000_1000,
                irq: 6,
            },
        ];
        assert_eq!(
            full_cmdline(" console=ttyS0 ", &slots),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(
            full_cmdline("", &slots[..1]),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
