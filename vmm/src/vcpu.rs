//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, and the
//! shared run control (stop, pause, resume) with its kick signal.
//!
//! A kick is a signal to the vCPU thread whose handler sets `immediate_exit`
//! in that thread's `kvm_run`. Whatever the thread is doing when the signal
//! lands, it is out of KVM_RUN soon after: inside KVM_RUN the signal ends the
//! call with EINTR; before the call, `immediate_exit` makes KVM_RUN return
//! EINTR at once. Every kick follows a change of the run flags, which the
//! loop reads after clearing `immediate_exit`, so one kick is enough.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{lock, Bus};

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5, or KVM's shutdown system event).
    PowerOff,
    /// The guest reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The host asked for it ([`crate::Vm::stop`]).
    HostRequest,
    /// Something failed; the text says what.
    Error(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("guest power-off"),
            ExitReason::Reset => f.write_str("guest reset"),
            ExitReason::HostRequest => f.write_str("host request"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

#[derive(Default)]
struct State {
    exit: Option<ExitReason>,
    pause: bool,
    parked: usize,
}

/// Shared by the VM handle, the vCPU threads and the devices that can end
/// the VM.
#[derive(Default)]
pub struct Control {
    state: Mutex<State>,
    cond: Condvar,
    // Checked on every loop iteration without taking the lock.
    stopping: AtomicBool,
    pausing: AtomicBool,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

thread_local! {
    // The kvm_run of the vCPU this thread runs, for the kick handler. A
    // const-initialised Cell of a pointer needs no lazy set-up and has no
    // destructor, so reading it from a signal handler is sound.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.try_with(Cell::get).unwrap_or(std::ptr::null_mut());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by
        // `run` below while the vCPU fd that owns the mapping is alive and
        // cleared before the thread lets go of it. A volatile byte store is
        // what KVM reads at its next entry; the interrupted code never holds
        // a Rust reference to this field across KVM_RUN.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    *ONCE.get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler))
}

impl Control {
    /// Records the first exit reason and tells every vCPU to leave.
    pub fn request_exit(&self, reason: ExitReason) {
        {
            let mut s = lock(&self.state);
            if s.exit.is_none() {
                s.exit = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        self.kick_all();
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.state).exit.clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.threads).push(me);
    }

    fn unregister_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.threads).retain(|t| *t != me);
    }

    /// Signals every live vCPU thread; each leaves KVM_RUN and looks at the
    /// run flags, which the caller has set before.
    pub fn kick_all(&self) {
        let threads = lock(&self.threads);
        for t in threads.iter() {
            // SAFETY: the id is of a thread that is still registered, and a
            // thread unregisters (under this lock) before it ends, so the id
            // is live. The signal's handler is installed before any vCPU
            // thread starts.
            unsafe {
                libc::pthread_kill(*t, kick_signal());
            }
        }
    }

    /// Blocks until every vCPU thread is parked (or the VM is stopping).
    pub fn pause(&self, vcpus: usize) {
        lock(&self.state).pause = true;
        self.pausing.store(true, Ordering::SeqCst);
        self.kick_all();
        let mut s = lock(&self.state);
        while s.parked < vcpus && s.exit.is_none() {
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        let mut s = lock(&self.state);
        s.pause = false;
        self.pausing.store(false, Ordering::SeqCst);
        self.cond.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.state).pause
    }

    /// Blocks while a pause is in force, for threads other than vCPUs that
    /// feed the guest (the serial input).
    pub fn wait_while_paused(&self) {
        let mut s = lock(&self.state);
        while s.pause && s.exit.is_none() {
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Parks the calling vCPU thread while a pause is in force.
    fn park_if_paused(&self) {
        if !self.pausing.load(Ordering::SeqCst) {
            return;
        }
        let mut s = lock(&self.state);
        if !s.pause {
            return;
        }
        s.parked += 1;
        self.cond.notify_all();
        while s.pause && s.exit.is_none() {
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Waits until an exit reason is set; `None` on timeout.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut s = lock(&self.state);
        loop {
            if let Some(r) = &s.exit {
                return Some(r.clone());
            }
            match deadline {
                None => s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    s = self
                        .cond
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// What a vCPU thread needs. The fd is shared with the VM handle, which
/// uses it only while the thread is parked (the thread holds the lock
/// around KVM_RUN and the exit it handles).
pub struct VcpuContext {
    pub index: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<Control>,
}

pub fn spawn(ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.index))
        .spawn(move || run(ctx))
}

fn run(ctx: VcpuContext) {
    let control = ctx.control.clone();
    // Before the first look at the flags, so that no kick can miss us.
    KVM_RUN.with(|r| r.set(lock(&ctx.fd).get_kvm_run()));
    control.register_thread();
    let result = run_loop(&ctx);
    control.unregister_thread();
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    if let Err(reason) = result {
        control.request_exit(reason);
    }
}

fn run_loop(ctx: &VcpuContext) -> Result<(), ExitReason> {
    let index = ctx.index;
    let err = |what: String| ExitReason::Error(format!("vcpu{index}: {what}"));
    loop {
        if ctx.control.is_stopping() {
            return Ok(());
        }
        ctx.control.park_if_paused();
        if ctx.control.is_stopping() {
            return Ok(());
        }
        #[cfg(test)]
        tests::delay_before_run();
        let mut fd = lock(&ctx.fd);
        let fd = &mut *fd;
        match fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    ctx.pio.read(u64::from(port), data);
                }
                VcpuExit::IoOut(port, data) => {
                    ctx.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    ctx.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.mmio.write(addr, data);
                }
                VcpuExit::Shutdown => {
                    // A triple fault: what a PC does next is reset.
                    ctx.control.request_exit(ExitReason::Reset);
                    return Ok(());
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                        other => return Err(err(format!("system event {other}"))),
                    };
                    ctx.control.request_exit(reason);
                    return Ok(());
                }
                VcpuExit::Hlt => {
                    // The in-kernel irqchip handles HLT; an exit means the
                    // vCPU halted with interrupts it can never get.
                    return Err(err("halted for good".into()));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Err(err(format!(
                        "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                    )));
                }
                VcpuExit::InternalError => {
                    return Err(err(internal_error(fd)));
                }
                other => return Err(err(format!("unexpected exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear it, then the flags are read at the top.
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Err(err(format!("KVM_RUN failed: {e}"))),
        }
    }
}

/// Describes a KVM_EXIT_INTERNAL_ERROR from its suberror and data.
fn internal_error(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
    // is the union member KVM filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "cannot deliver an event",
        _ => "internal error",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    format!(
        "KVM: {what} (suberror {}, data [{}])",
        internal.suberror,
        data.join(", ")
    )
}

/// Joins vCPU threads once an exit was requested (which kicked them).
pub fn join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{self, Machine};
    use std::sync::atomic::AtomicU64;
    use vm_memory::{Bytes, GuestAddress};

    /// Milliseconds every vCPU thread sleeps between reading the run flags
    /// and entering KVM_RUN: the window where a kick used to be lost.
    static DELAY_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn delay_before_run() {
        let ms = DELAY_MS.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    /// A one-vCPU machine whose guest halts for good with interrupts off
    /// (real mode at 0x1000: cli; hlt; jmp back to the hlt), so its vCPU
    /// stays inside KVM_RUN until a signal gets it out.
    fn halting_machine() -> Option<(Machine, Arc<Mutex<VcpuFd>>)> {
        let kvm = match builder::open_kvm() {
            Ok(k) => k,
            Err(e) if std::env::var("COCOON_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED vcpu kick test: KVM is not usable: {e}");
                return None;
            }
            Err(e) => panic!("KVM is not usable: {e} (and COCOON_REQUIRE_KVM=1)"),
        };
        let vm = builder::create_vm(&kvm).unwrap();
        let mem = crate::memory::create_guest_memory(crate::memory::MIN_MEMORY).unwrap();
        mem.write_slice(&[0xfa, 0xf4, 0xeb, 0xfd], GuestAddress(0x1000))
            .unwrap();
        let machine = Machine::new(kvm, vm, mem).unwrap();
        let fd = machine.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        };
        fd.set_regs(&regs).unwrap();
        Some((machine, Arc::new(Mutex::new(fd))))
    }

    #[test]
    fn a_kick_before_kvm_run_is_not_lost() {
        let Some((machine, fd)) = halting_machine() else {
            return;
        };
        DELAY_MS.store(300, Ordering::SeqCst);
        let threads = machine.start_vcpus(vec![fd]).unwrap();
        // The thread has read the flags and sleeps before KVM_RUN: this
        // pause's one kick lands in that window.
        std::thread::sleep(Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel();
        let control = machine.control.clone();
        std::thread::spawn(move || {
            control.pause(1);
            tx.send(()).unwrap();
        });
        let paused = rx.recv_timeout(Duration::from_secs(5));
        DELAY_MS.store(0, Ordering::SeqCst);
        // Whatever happened, stop the VM (the stop's own kick gets a halted
        // vCPU out of KVM_RUN).
        machine.control.request_exit(ExitReason::HostRequest);
        join_all(threads);
        assert!(
            paused.is_ok(),
            "pause did not return: the kick before KVM_RUN was lost"
        );
    }
}
