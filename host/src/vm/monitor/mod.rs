//! The monitor: the process that runs one VM (the `cocoon-monitor` binary
//! beside `cocoon-host`, or `cocoon-host __monitor`; started detached by
//! `start`, see [`super::spawn`]). It owns the `cocoon_vmm::Vm`, the VM's
//! writable-disk locks and its monitor lock, serves the API on
//! `run/api.sock`, keeps the console, and writes the record's state as it
//! changes. It loads no plugins and opens no network connection; its one
//! netlink socket (to the kernel) puts the VM's NICs on their taps at
//! start and deletes the taps it created before it exits.

pub mod console;
pub mod server;
pub mod snapshot;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_vmm::{DiskConfig, ExitReason, OutputHandler, SerialOutput, Vm, VmConfig};

use super::api::{self, VmInfo};
use super::monitor_lock::MonitorLock;
use super::record::{now, ExitInfo, ExitKind, VmRecord, VmState};
use super::vms::{api_socket, CONSOLE_LOG};
use crate::disk::lock::{DiskLocks, Wait};
use console::Console;

/// What the API handlers share.
pub struct Monitor {
    pub vm: Vm,
    pub console: Arc<Console>,
    dir: PathBuf,
    record: Mutex<VmRecord>,
    /// The VM's writable-disk locks, held for its whole life; taken out
    /// (released) when it stops. A snapshot holds the slot while it
    /// copies the disks.
    disk_locks: Mutex<Option<DiskLocks>>,
    /// A snapshot is being taken: pause, resume and shutdown are refused
    /// meanwhile (the snapshot pauses and resumes the guest itself).
    snapshotting: AtomicBool,
}

impl Monitor {
    pub fn info(&self) -> VmInfo {
        let r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        VmInfo {
            name: r.name.clone(),
            id: r.id.clone(),
            state: r.state,
            pid: std::process::id(),
            cpus: r.machine.cpus,
            memory: r.machine.memory,
            disks: r.storage.clone(),
            started_at: r.started_at.unwrap_or(0),
            console_end: self.console.end(),
        }
    }

    pub fn stopped(&self) -> bool {
        self.vm.exit_reason().is_some()
    }

    /// Pause, resume, shutdown or stop; the new state.
    pub fn act(&self, path: &str) -> Result<VmInfo, String> {
        if self.stopped() {
            return Err("the VM is stopping".into());
        }
        if path != api::PATH_STOP && self.snapshotting.load(Ordering::SeqCst) {
            return Err("a snapshot is being taken; try again when it is done".into());
        }
        match path {
            api::PATH_PAUSE => {
                self.vm.pause();
                self.set_state(VmState::Paused)?;
            }
            api::PATH_RESUME => {
                self.vm.resume();
                self.set_state(VmState::Running)?;
            }
            api::PATH_SHUTDOWN => {
                // A paused guest cannot answer; it runs to hear the request.
                if self.vm.is_paused() {
                    self.vm.resume();
                    self.set_state(VmState::Running)?;
                }
                self.vm
                    .send_ctrl_alt_del()
                    .map_err(|e| format!("sending Ctrl-Alt-Del: {}", crate::error_chain(&e)))?;
            }
            api::PATH_STOP => self.vm.stop(),
            _ => return Err(format!("no action {path}")),
        }
        Ok(self.info())
    }

    fn set_state(&self, state: VmState) -> Result<(), String> {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.state = state;
        r.save(&self.dir).map_err(|e| crate::error_chain(&e))
    }
}

/// The monitor's log on stderr (its `monitor.log`): warnings and up, or
/// what `RUST_LOG` asks for by level (`error`, `warn`, `info`, `debug`,
/// `trace`). Targets are not parsed: that would link a regex engine into
/// every monitor for a filter nobody sets on a VM.
pub fn init_logging() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.trim().parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// [`main`] with the descriptors as `spawn` writes them on the command line.
///
/// # Safety
/// As for [`main`]: the descriptors must be the ones `spawn` passed.
pub unsafe fn main_from_args(vm_dir: &Path, lock_fd: &str, ready_fd: &str) -> i32 {
    let fds =
        super::spawn::parse_fd(lock_fd).and_then(|l| Ok((l, super::spawn::parse_fd(ready_fd)?)));
    match fds {
        // SAFETY: the caller's promise, passed on.
        Ok((lock_fd, ready_fd)) => unsafe { main(vm_dir, lock_fd, ready_fd) },
        Err(e) => {
            eprintln!("cocoon-host monitor: {e}");
            2
        }
    }
}

/// The monitor process's `main`. `lock_fd` is the monitor lock its parent
/// took; `ready_fd` the pipe on which it reports `ok` or why it failed.
///
/// # Safety
/// Both descriptors must be the ones `spawn` passed, owned by nothing else.
pub unsafe fn main(vm_dir: &Path, lock_fd: RawFd, ready_fd: RawFd) -> i32 {
    one_malloc_arena();
    // SAFETY: the caller passes the inherited, otherwise unused pipe.
    let mut ready = unsafe { File::from_raw_fd(ready_fd) };
    // A session of its own, so that the terminal's signals and its hangup
    // never reach the VM. Here rather than between fork and exec in the
    // parent, which would cost `spawn` its posix_spawn (see `spawn::start`).
    // SAFETY: setsid takes no pointers; it fails only for a group leader,
    // which a child `spawn` starts is not.
    if unsafe { libc::setsid() } < 0 {
        let _ = writeln!(ready, "setsid: {}", std::io::Error::last_os_error());
        return 1;
    }
    // `cocoon-monitor` is found beside the CLI; one left from another
    // release would read records and state files it does not know.
    if let Some(wanted) = std::env::var_os(super::spawn::BUILD_ENV) {
        if wanted != super::spawn::BUILD {
            let _ = writeln!(
                ready,
                "{} is version {}, the CLI {}: install both from one build",
                std::env::current_exe()
                    .unwrap_or_else(|_| PathBuf::from(super::spawn::MONITOR_BINARY))
                    .display(),
                super::spawn::BUILD,
                wanted.to_string_lossy()
            );
            return 1;
        }
    }
    // SAFETY: the caller passes the inherited, otherwise unused lock file.
    let lock = match unsafe { MonitorLock::adopt(lock_fd) } {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(ready, "the monitor lock: {e}");
            return 1;
        }
    };
    match start(vm_dir, lock) {
        // The API socket before "ok": the CLI that reads it may call the
        // API at once (a foreground `run` reads the console).
        Ok((monitor, lock)) => match bind_api(&monitor.dir) {
            Ok(api) => {
                let _ = writeln!(ready, "ok");
                drop(ready);
                serve_until_exit(monitor, lock, api)
            }
            Err(e) => {
                let _ = writeln!(ready, "{e}");
                eprintln!("cocoon-host monitor: {e}");
                monitor.vm.stop();
                finish(&monitor, lock, &api_socket(&monitor.dir))
            }
        },
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = writeln!(ready, "{}", msg.replace('\n', " "));
            eprintln!("cocoon-host monitor: {msg}");
            // The record says what happened, for `list` and `inspect`.
            if let Ok(Some(mut r)) = VmRecord::load(vm_dir) {
                r.state = VmState::Error;
                r.pid = None;
                r.exit = Some(ExitInfo {
                    kind: ExitKind::Error,
                    reason: msg,
                    at: now(),
                });
                let _ = r.save(vm_dir);
            }
            1
        }
    }
}

/// Before any thread exists: one malloc arena for the whole monitor.
/// glibc gives each thread that allocates an arena of its own (up to 8 per
/// core), each with resident pages of its own; the monitor's threads
/// allocate little and rarely at once.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before the monitor starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

type Started = (Arc<Monitor>, MonitorLock);

fn start(vm_dir: &Path, mut lock: MonitorLock) -> anyhow::Result<Started> {
    use anyhow::Context;
    lock.set_note(&format!("running: monitor pid {}", std::process::id()));
    let mut record = VmRecord::load(vm_dir)?.context("the VM record is missing")?;
    let storage = &record.storage;
    let roots = [vm_dir.to_path_buf(), super::create::store_root(vm_dir)];
    let size_of = |_: usize, d: &crate::disk::model::StorageConfig| {
        std::fs::metadata(&d.path).ok().map(|m| m.len())
    };
    crate::disk::rules::validate(
        storage,
        &crate::disk::rules::Context {
            roots: &roots,
            size_of: &size_of,
        },
    )
    .map_err(|v| anyhow::anyhow!("the record's disks break the disk rules: {v}"))?;
    let writable: Vec<PathBuf> = storage
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.path.clone())
        .collect();
    let disk_locks = DiskLocks::acquire(&writable, "run", Wait::No)?;

    let console = Console::open(&vm_dir.join(CONSOLE_LOG)).context("opening the console log")?;
    let sink = console.clone();
    let config = VmConfig {
        kernel: record.machine.kernel.clone(),
        initrd: record.machine.initrd.clone(),
        cmdline: record.machine.cmdline.clone(),
        cpus: record.machine.cpus,
        memory: record.machine.memory,
        disks: storage
            .iter()
            .map(|d| DiskConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                serial: Some(d.serial.clone()),
                direct: d.direct_io.unwrap_or(false),
            })
            .collect(),
        nets: Vec::new(),
        serial: SerialOutput::Handler(OutputHandler::new(move |b: &[u8]| sink.push(b))),
    };
    // The taps last: nothing that can fail without deleting them again
    // comes between here and the VM's start (netlink runs on this thread
    // alone, so the signal mask below still reaches every VM thread).
    let attached = super::nics::attach(&record.id, &record.nics).context("the VM's NICs")?;
    for (i, a) in attached.iter().enumerate() {
        eprintln!(
            "cocoon-host monitor: nic{i} tap {} mac {}{}",
            a.tap,
            a.nic.mac,
            if a.created { " (created)" } else { "" }
        );
    }
    let config = VmConfig {
        nets: attached.iter().map(|a| a.vmm_config()).collect(),
        ..config
    };
    let started = start_vm(vm_dir, config).and_then(|vm| {
        record.state = VmState::Running;
        record.pid = Some(std::process::id());
        record.started_at = Some(now());
        record.exit = None;
        record.save(vm_dir)?;
        Ok(vm)
    });
    let vm = match started {
        Ok(vm) => vm,
        Err(e) => {
            // While the monitor lock is still held (see `finish`).
            if let Err(e) = super::nics::release(&record.id, &record.nics) {
                eprintln!("cocoon-host monitor: {}", crate::error_chain(&e));
            }
            return Err(e);
        }
    };
    let monitor = Arc::new(Monitor {
        vm,
        console,
        dir: vm_dir.to_path_buf(),
        record: Mutex::new(record),
        disk_locks: Mutex::new(Some(disk_locks)),
        snapshotting: AtomicBool::new(false),
    });
    Ok((monitor, lock))
}

fn start_vm(vm_dir: &Path, config: VmConfig) -> anyhow::Result<Vm> {
    use anyhow::Context;
    // Before any thread exists, so that only the watcher gets them.
    cocoon_vmm::signals::block_termination_signals().context("blocking SIGINT/SIGTERM")?;
    // A clone's or a restored VM's first start restores its snapshot.
    let vm = match super::snapshot::StartFrom::load(vm_dir)? {
        Some(from) => snapshot::restore(vm_dir, &from, config)?,
        None => Vm::start(config).context("starting the VM")?,
    };
    cocoon_vmm::signals::stop_on_termination_signals(vm.stop_handle())
        .context("watching SIGINT/SIGTERM")?;
    Ok(vm)
}

/// The API's runtime and its socket, bound (mode 0600). A
/// current-thread runtime: the API needs one thread, and the multi-thread
/// scheduler would page in code (and libm, for its poll-time averages)
/// that every monitor would carry for nothing.
fn bind_api(vm_dir: &Path) -> Result<(tokio::runtime::Runtime, tokio::net::UnixListener), String> {
    let socket = api_socket(vm_dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("the API runtime: {e}"))?;
    let listener = rt
        .block_on(async {
            let _ = std::fs::remove_file(&socket);
            let l = tokio::net::UnixListener::bind(&socket)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
            Ok::<_, std::io::Error>(l)
        })
        .map_err(|e| format!("the API socket {}: {e}", socket.display()))?;
    Ok((rt, listener))
}

/// Serves the API on a thread of its own until the VM exits.
fn serve_until_exit(
    monitor: Arc<Monitor>,
    lock: MonitorLock,
    (rt, listener): (tokio::runtime::Runtime, tokio::net::UnixListener),
) -> i32 {
    let socket = api_socket(&monitor.dir);
    let (stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
    let m = monitor.clone();
    let served = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            rt.block_on(futures_util::future::select(
                Box::pin(server::serve(listener, m)),
                stopped,
            ));
            rt.shutdown_timeout(Duration::from_millis(200));
        });
    let api = match served {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("cocoon-host monitor: the API thread: {e}");
            monitor.vm.stop();
            None
        }
    };
    while monitor.vm.wait_timeout(Duration::from_secs(3600)).is_none() {}
    // Wake console readers so that they see the end.
    monitor.console.notify.notify_waiters();
    let _ = stop_api.send(());
    if let Some(t) = api {
        let _ = t.join();
    }
    finish(&monitor, lock, &socket)
}

fn finish(monitor: &Monitor, lock: MonitorLock, socket: &Path) -> i32 {
    let reason = monitor
        .vm
        .exit_reason()
        .unwrap_or_else(|| ExitReason::Error("no exit reason".into()));
    // The log complete before anyone can see the monitor gone.
    monitor.console.close();
    let _ = std::fs::remove_file(socket);
    let (kind, state, text) = match &reason {
        ExitReason::PowerOff => (
            ExitKind::PowerOff,
            VmState::Stopped,
            "the guest powered off".to_string(),
        ),
        ExitReason::Reset => (
            ExitKind::Reset,
            VmState::Stopped,
            "the guest reset".to_string(),
        ),
        ExitReason::HostRequest => (
            ExitKind::Stopped,
            VmState::Stopped,
            "stopped by the host".to_string(),
        ),
        ExitReason::Error(e) => (
            ExitKind::Error,
            VmState::Error,
            format!("the VMM stopped: {e}"),
        ),
    };
    eprintln!("cocoon-host monitor: VM stopped: {text}");
    {
        let mut r = monitor.record.lock().unwrap_or_else(|e| e.into_inner());
        // Before the monitor lock goes: the next start makes taps of the
        // same names.
        if let Err(e) = super::nics::release(&r.id, &r.nics) {
            eprintln!(
                "cocoon-host monitor: deleting the VM's taps: {}",
                crate::error_chain(&e)
            );
        }
        r.state = state;
        r.pid = None;
        r.exit = Some(ExitInfo {
            kind,
            reason: text,
            at: now(),
        });
        if let Err(e) = r.save(&monitor.dir) {
            eprintln!("cocoon-host monitor: {}", crate::error_chain(&e));
        }
    }
    // The disks first: whoever sees the monitor gone may take them (after
    // a snapshot that is copying them, which holds their slot).
    drop(
        monitor
            .disk_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    drop(lock);
    i32::from(kind == ExitKind::Error)
}
