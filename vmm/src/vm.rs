//! The running VM: the handle that pauses, resumes, stops and waits for
//! it. [`Vm::start`] builds one from a [`VmConfig`] with the steps in
//! [`crate::builder`].

use std::fs::OpenOptions;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{Cap, VcpuFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::{self, Machine};
use crate::config::{OutputHandler, SerialOutput, VmConfig};
use crate::devices::lock;
use crate::devices::serial::{SerialDevice, SerialWriter};
use crate::devices::virtio::net::NetCounters;
use crate::memory::{self, MAX_VIRTIO_DEVICES};
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
    Boot(#[from] crate::boot::BootError),
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: crate::devices::virtio::block::BlockError,
    },
    #[error("network device {index} (tap {tap})")]
    Net {
        index: usize,
        tap: String,
        #[source]
        source: crate::devices::virtio::net::tap::TapError,
    },
    #[error("cannot place a device")]
    Bus(#[from] crate::devices::BusError),
    #[error("vcpu{0} set-up")]
    Regs(u8, #[source] crate::arch::regs::RegsError),
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("cannot send Ctrl-Alt-Del")]
    CtrlAltDel(#[source] crate::devices::i8042::I8042Error),
}

/// A running VM.
pub struct Vm {
    // The threads go first (teardown joins them), then the vCPU fds, then
    // the machine: its VM fd before its memory.
    vcpu_threads: Vec<JoinHandle<()>>,
    pub(crate) vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub(crate) machine: Machine,
    exit: Option<ExitReason>,
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Vm, VmError> {
        validate(&config)?;
        memory::check_fits_this_host(config.memory)?;
        let kvm = builder::open_kvm()?;
        let vm = builder::create_vm(&kvm)?;
        let mem = memory::create_guest_memory(config.memory)?;
        let mut machine = Machine::new(kvm, vm, mem)?;
        machine.attach_new_serial(serial_writer(&config.serial)?)?;
        machine.attach_power_devices()?;
        for (index, disk) in config.disks.iter().enumerate() {
            machine.attach_block(index, disk)?;
        }
        for (index, nic) in config.nets.iter().enumerate() {
            machine.attach_net(index, nic)?;
        }
        let entry = builder::load_guest(&machine.mem, &config, &machine.slots())?;
        let fds = machine.create_vcpus(config.cpus)?;
        builder::configure_boot_vcpus(&fds, &machine.mem, entry)?;
        Self::run(machine, fds, &config.serial)
    }

    /// Starts the vCPU threads of a built machine (and the serial input).
    pub(crate) fn run(
        machine: Machine,
        fds: Vec<VcpuFd>,
        serial: &SerialOutput,
    ) -> Result<Vm, VmError> {
        if *serial == SerialOutput::Stdout {
            if let Some(dev) = &machine.serial {
                spawn_stdin_reader(dev.clone(), machine.control.clone())?;
            }
        }
        let vcpus: Vec<_> = fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let vcpu_threads = machine.start_vcpus(vcpus.clone())?;
        Ok(Vm {
            vcpu_threads,
            vcpus,
            machine,
            exit: None,
        })
    }

    /// Stops every vCPU and then every device I/O thread, and returns when
    /// all are parked: no guest instruction runs and no disk request is in
    /// flight until [`Vm::resume`].
    pub fn pause(&self) {
        self.control().pause(self.vcpus.len());
        self.machine.workers.pause();
    }

    pub fn resume(&self) {
        if !self.is_paused() {
            return;
        }
        self.machine.workers.resume();
        // The guest's kvmclock learns that it was paused, so its soft
        // lockup watchdog does not fire on the time it lost.
        for fd in &self.vcpus {
            kvmclock_ctrl(&lock(fd));
        }
        self.control().resume();
    }

    pub fn is_paused(&self) -> bool {
        self.control().is_paused()
    }

    /// Queues host input in COM1's receive FIFO and raises its interrupt
    /// (when the guest enabled it); returns how many bytes fitted (the FIFO
    /// holds 64; 0 when it is full). Safe from any thread while the vCPUs
    /// run: it takes the UART's lock as a vCPU's access does. Input queued
    /// while the VM is paused waits in the FIFO, and is part of a snapshot
    /// taken then (a restore raises its interrupt again).
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        match &self.machine.serial {
            Some(serial) => lock(serial).enqueue_input(bytes),
            None => 0,
        }
    }

    /// Asks the guest to shut down, as Firecracker's `SendCtrlAltDel` does:
    /// the i8042 gets the scan codes of Ctrl-Alt-Del (pressed and released)
    /// and raises IRQ 1. What follows is the guest's choice (Linux runs its
    /// init's ctrl-alt-del action, a reboot or a power-off; the test guest
    /// powers off); [`Vm::wait_timeout`] tells whether it did. Fails when the
    /// guest has not read the keys of an earlier request. Safe from any
    /// thread while the vCPUs run.
    pub fn send_ctrl_alt_del(&self) -> Result<(), VmError> {
        let i8042 = self
            .machine
            .i8042
            .as_ref()
            .ok_or_else(|| VmError::Config("the VM has no i8042".into()))?;
        lock(i8042)
            .trigger_ctrl_alt_del()
            .map_err(VmError::CtrlAltDel)
    }

    /// The counters of network device `index` (in [`VmConfig::nets`] order).
    pub fn net_counters(&self, index: usize) -> Option<Arc<NetCounters>> {
        self.machine.nets.get(index).cloned()
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.machine.mem.iter().map(|r| r.len()).sum()
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns [`ExitReason::HostRequest`]
    /// unless the guest had already stopped it.
    pub fn stop(&self) {
        self.control().request_exit(ExitReason::HostRequest);
    }

    /// A handle that can stop the VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.control().clone())
    }

    /// The exit reason, once there is one.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.control().exit_reason()
    }

    /// Waits up to `timeout` for the VM to stop by itself.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.control().wait_exit(Some(timeout))
    }

    /// Waits until the VM stops, tears it down and says why it stopped.
    pub fn wait(&mut self) -> ExitReason {
        if let Some(r) = &self.exit {
            return r.clone();
        }
        let reason = self
            .control()
            .wait_exit(None)
            .unwrap_or_else(|| ExitReason::Error("no exit reason".into()));
        self.teardown();
        self.exit = Some(reason.clone());
        reason
    }

    fn control(&self) -> &Arc<Control> {
        &self.machine.control
    }

    fn teardown(&mut self) {
        vcpu::join_all(std::mem::take(&mut self.vcpu_threads));
        self.machine.workers.stop_and_join();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.control().request_exit(ExitReason::HostRequest);
            self.teardown();
        }
    }
}

/// KVM_KVMCLOCK_CTRL on a paused vCPU. EINVAL only means the guest has not
/// turned kvmclock on; anything else is worth a warning, not a failure.
pub(crate) fn kvmclock_ctrl(fd: &VcpuFd) {
    if let Err(e) = fd.kvmclock_ctrl() {
        if e.errno() != libc::EINVAL {
            tracing::warn!(error = %e, "KVM_KVMCLOCK_CTRL failed");
        }
    }
}

/// Whether this host can run VMs: /dev/kvm opens, answers as KVM, and has
/// the capabilities the VMM needs. The error says what is missing.
pub fn check_kvm() -> Result<(), VmError> {
    builder::open_kvm().map(|_| ())
}

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
    if config.disks.len() + config.nets.len() > MAX_VIRTIO_DEVICES {
        return Err(VmError::Config(format!(
            "{} disks and {} network devices; at most {MAX_VIRTIO_DEVICES} virtio devices are supported",
            config.disks.len(),
            config.nets.len()
        )));
    }
    Ok(())
}

pub(crate) fn serial_writer(out: &SerialOutput) -> Result<SerialWriter, VmError> {
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
        SerialOutput::Handler(handler) => Box::new(HandlerWriter(handler.clone())),
    })
}

/// COM1's writer for [`SerialOutput::Handler`]: every write goes straight
/// to the callback (the UART writes one byte at a time).
struct HandlerWriter(OutputHandler);

impl std::io::Write for HandlerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.call(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds the host's stdin to COM1. The thread blocks in read(2) and is
/// left behind when the VM stops; it only ever holds the serial lock
/// briefly, and holds its input while the VM is paused.
fn spawn_stdin_reader(
    serial: Arc<Mutex<SerialDevice>>,
    control: Arc<Control>,
) -> Result<(), VmError> {
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
                    control.wait_while_paused();
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

#[cfg(test)]
mod tests {
    use super::*;

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
