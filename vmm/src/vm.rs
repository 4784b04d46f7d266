//! The VM: building it from a [`VmConfig`] and the handle that runs it.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, MmioSlot};
use crate::arch::{cpuid, msrs, regs};
use crate::boot::{self, BootSpec};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::acpi_pm::{AcpiPowerDevice, ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{SerialDevice, SerialWriter, COM1_GSI, COM1_PORT, COM1_PORT_LEN};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::{lock, Bus, BusDevice};
use crate::memory::{self, MAX_VIRTIO_DEVICES, VIRTIO_MMIO_SIZE};
use crate::vcpu::{self, Control};

pub use crate::vcpu::ExitReason;

/// Most vCPUs: APIC IDs are a byte in the MADT, and 0xff is broadcast.
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("/dev/kvm does not answer as KVM (API version {0})")]
    NotKvm(i32),
    #[error("the host KVM lacks {0:?}")]
    MissingCap(Cap),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("cannot load the kernel")]
    Boot(#[from] boot::BootError),
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error("disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: crate::devices::virtio::block::BlockError,
    },
    #[error("cannot place a device")]
    Bus(#[from] crate::devices::BusError),
    #[error("vcpu{0} set-up")]
    Regs(u8, #[source] regs::RegsError),
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
}

/// A running VM.
pub struct Vm {
    control: Arc<Control>,
    vcpus: usize,
    vcpu_threads: Vec<JoinHandle<()>>,
    io: IoThreads,
    exit: Option<ExitReason>,
    // Kept alive for as long as the vCPUs run: dropping them unmaps
    // memory and closes the VM.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Vm, VmError> {
        validate(&config)?;
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Io("install the vCPU kick signal handler", e.into()))?;
        let kvm = open_kvm()?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("create a VM", e))?;
        vm.set_tss_address(memory::KVM_TSS_ADDR as usize)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        vm.set_identity_map_address(memory::KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Kvm("set the identity map address", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmError::Kvm("create the irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create the PIT", e))?;

        let mem = memory::create_guest_memory(config.memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of exactly `len` bytes
            // owned by `mem`, which the returned Vm keeps until after the
            // VM fd is closed.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("map guest memory", e))?;
        }

        let control = Arc::new(Control::default());
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io("create an eventfd", e))?;
        vm.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(|e| VmError::Kvm("register the COM1 irqfd", e))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            serial_writer(&config.serial)?,
        )));
        pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(control.clone()))),
            I8042_PORT,
            I8042_PORT_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerDevice::new(control.clone()))),
            ACPI_PM_PORT_BASE,
            ACPI_PM_PORT_LEN,
        )?;
        if config.serial == SerialOutput::Stdout {
            spawn_stdin_reader(serial)?;
        }

        // Dropped on any early return below, which stops the I/O threads.
        let mut io = IoThreads {
            stop: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmError::Io("create an eventfd", e))?,
            handles: Vec::new(),
        };
        let mut slots = Vec::new();
        for (index, disk) in config.disks.iter().enumerate() {
            let (addr, irq) = memory::virtio_mmio_slot(index);
            let block = Block::open(
                &disk.path,
                disk.read_only,
                disk.direct,
                disk.serial.as_deref(),
            )
            .map_err(|source| VmError::Disk { index, source })?;
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmError::Io("create an eventfd", e))?;
            vm.register_irqfd(&irq_evt, irq)
                .map_err(|e| VmError::Kvm("register a virtio irqfd", e))?;
            let transport = MmioTransport::new(Box::new(block), mem.clone(), irq_evt);
            let mut queue_evts = Vec::new();
            for q in 0..transport.num_queues() {
                let evt = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| VmError::Io("create an eventfd", e))?;
                vm.register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(addr + REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(|e| VmError::Kvm("register a virtio ioeventfd", e))?;
                queue_evts.push(evt);
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), addr, VIRTIO_MMIO_SIZE)?;
            let stop = io
                .stop
                .try_clone()
                .map_err(|e| VmError::Io("clone an eventfd", e))?;
            let handle = std::thread::Builder::new()
                .name(format!("virtio-blk{index}"))
                .spawn(move || io_thread(transport, queue_evts, stop))
                .map_err(|e| VmError::Io("spawn a disk I/O thread", e))?;
            io.handles.push(handle);
            slots.push(MmioSlot { addr, irq });
        }

        let rsdp_addr = acpi::write_tables(&mem, config.cpus, &slots)?;
        let cmdline = full_cmdline(&config.cmdline, &slots);
        let entry = boot::load(
            &mem,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                memory_size: config.memory,
                rsdp_addr,
            },
        )?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("report the supported CPUID", e))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut fds = Vec::new();
        for index in 0..config.cpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| VmError::Kvm("create a vCPU", e))?;
            let mut cpuid = supported.clone();
            cpuid::patch_cpuid(&mut cpuid, index, config.cpus, tsc_deadline);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| VmError::Kvm("set CPUID", e))?;
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
            regs::setup_fpu(&fd).map_err(|e| VmError::Regs(index, e))?;
            regs::setup_lint(&fd).map_err(|e| VmError::Regs(index, e))?;
            if index == 0 {
                // Application processors wait for INIT/SIPI from the
                // guest, which sets their state then.
                regs::setup_boot_vcpu(&fd, &mem, entry).map_err(|e| VmError::Regs(index, e))?;
            }
            fds.push(fd);
        }
        let mut vcpu_threads = Vec::new();
        for (index, fd) in fds.into_iter().enumerate() {
            let ctx = vcpu::VcpuContext {
                index: index as u8,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
            };
            match vcpu::spawn(ctx) {
                Ok(h) => vcpu_threads.push(h),
                Err(e) => {
                    control.request_exit(ExitReason::Error("cannot spawn a vCPU thread".into()));
                    vcpu::join_all(&control, vcpu_threads);
                    return Err(VmError::Io("spawn a vCPU thread", e));
                }
            }
        }
        Ok(Vm {
            control,
            vcpus: config.cpus as usize,
            vcpu_threads,
            io,
            exit: None,
            _vm: vm,
            _mem: mem,
        })
    }

    /// Stops every vCPU at its next exit and returns when all are parked.
    pub fn pause(&self) {
        self.control.pause(self.vcpus);
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns [`ExitReason::HostRequest`]
    /// unless the guest had already stopped it.
    pub fn stop(&self) {
        self.control.request_exit(ExitReason::HostRequest);
    }

    /// A handle that can stop the VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.control.clone())
    }

    /// The exit reason, once there is one.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.control.exit_reason()
    }

    /// Waits up to `timeout` for the VM to stop by itself.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.control.wait_exit(Some(timeout))
    }

    /// Waits until the VM stops, tears it down and says why it stopped.
    pub fn wait(&mut self) -> ExitReason {
        if let Some(r) = &self.exit {
            return r.clone();
        }
        let reason = self
            .control
            .wait_exit(None)
            .unwrap_or_else(|| ExitReason::Error("no exit reason".into()));
        self.teardown();
        self.exit = Some(reason.clone());
        reason
    }

    fn teardown(&mut self) {
        vcpu::join_all(&self.control, std::mem::take(&mut self.vcpu_threads));
        self.io.stop_and_join();
    }
}

/// The disk I/O threads and the eventfd that stops them all.
struct IoThreads {
    stop: EventFd,
    handles: Vec<JoinHandle<()>>,
}

impl IoThreads {
    fn stop_and_join(&mut self) {
        // No thread reads the stop counter, so it stays readable for every
        // thread, now or at its next poll.
        let _ = self.stop.write(1);
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
    }
}

impl Drop for IoThreads {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.control.request_exit(ExitReason::HostRequest);
            self.teardown();
        }
    }
}

/// Whether this host can run VMs: /dev/kvm opens, answers as KVM, and has
/// the capabilities the VMM needs. The error says what is missing.
pub fn check_kvm() -> Result<(), VmError> {
    open_kvm().map(|_| ())
}

fn open_kvm() -> Result<Kvm, VmError> {
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

/// Stops a VM from anywhere (a signal thread, a supervisor).
#[derive(Clone)]
pub struct StopHandle(Arc<Control>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.request_exit(ExitReason::HostRequest);
    }
}

fn validate(config: &VmConfig) -> Result<(), VmError> {
    if config.cpus == 0 || config.cpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "{} vCPUs; between 1 and {MAX_VCPUS} are supported",
            config.cpus
        )));
    }
    if config.disks.len() > MAX_VIRTIO_DEVICES {
        return Err(VmError::Config(format!(
            "{} disks; at most {MAX_VIRTIO_DEVICES} are supported",
            config.disks.len()
        )));
    }
    Ok(())
}

/// The user's command line plus one `virtio_mmio.device=` per slot, for
/// guests that find devices there rather than in the DSDT.
pub fn full_cmdline(user: &str, slots: &[MmioSlot]) -> String {
    let mut s = user.trim().to_string();
    for slot in slots {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            slot.addr, slot.irq
        ));
    }
    s
}

fn serial_writer(out: &SerialOutput) -> Result<SerialWriter, VmError> {
    Ok(match out {
        SerialOutput::Sink => Box::new(std::io::sink()),
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| VmError::Io("open the serial log", e))?,
        ),
    })
}

/// Feeds the host's stdin to COM1. The thread blocks in read(2) and is
/// left behind when the VM stops; it only ever holds the serial lock
/// briefly.
fn spawn_stdin_reader(serial: Arc<Mutex<SerialDevice>>) -> Result<(), VmError> {
    std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let k = lock(&serial).enqueue_input(rest);
                    rest = &rest[k..];
                    if k == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| VmError::Io("spawn the stdin reader", e))
}

/// Serves a virtio device's queue notifications until `stop` fires.
fn io_thread(transport: Arc<Mutex<MmioTransport>>, queue_evts: Vec<EventFd>, stop: EventFd) {
    let mut fds: Vec<libc::pollfd> = queue_evts
        .iter()
        .chain(std::iter::once(&stop))
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfd for its length, and the
        // eventfds it names outlive this call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds.last().is_some_and(|f| f.revents != 0) {
            return;
        }
        for (index, evt) in queue_evts.iter().enumerate() {
            if fds[index].revents & libc::POLLIN != 0 && evt.read().is_ok() {
                lock(&transport).notify(index);
            }
        }
    }
}

#[allow(dead_code)]
fn assert_send<T: Send>() {}
#[allow(dead_code)]
fn assertions() {
    assert_send::<Arc<Mutex<dyn BusDevice>>>();
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

    #[test]
    fn zero_or_too_many_cpus_and_disks_are_refused() {
        let mut c = VmConfig::new("/nonexistent");
        c.cpus = 0;
        assert!(matches!(validate(&c), Err(VmError::Config(_))));
        c.cpus = 255;
        assert!(matches!(validate(&c), Err(VmError::Config(_))));
        c.cpus = 2;
        c.disks = vec![crate::DiskConfig::new("/x"); MAX_VIRTIO_DEVICES + 1];
        assert!(matches!(validate(&c), Err(VmError::Config(_))));
    }
}
