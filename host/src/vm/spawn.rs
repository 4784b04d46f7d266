//! Starting a VM: its monitor, detached. The starting command takes the
//! monitor lock, executes the monitor in a new session with stdio on the
//! VM's `monitor.log`, hands it the lock and a pipe, and returns once the
//! monitor says the VM runs (or why it does not).
//!
//! The monitor is `cocoon-monitor` from the directory of the running
//! binary (the same build: cargo and the install put both there), which
//! links only what a monitor runs; without it this binary re-executes
//! itself as `__monitor`, which runs the same code.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::monitor_lock::MonitorLock;
use super::record::VmState;
use super::vms::VmEntry;
use super::VmError;

/// The hidden subcommand.
pub const MONITOR_COMMAND: &str = "__monitor";
/// The monitor's own binary, looked for beside the running one.
pub const MONITOR_BINARY: &str = "cocoon-monitor";
/// The build the CLI passes to the monitor, which refuses another.
pub const BUILD_ENV: &str = "COCOON_BUILD";
/// This build.
pub const BUILD: &str = env!("CARGO_PKG_VERSION");
/// The monitor's own stderr (the console is `console.log`).
pub const MONITOR_LOG: &str = "monitor.log";
/// How long a monitor may take to say the VM runs.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `vm`'s monitor. The VM must be created or stopped; a VM whose
/// monitor runs, or that another command is starting, is busy.
pub fn start(vm: &VmEntry) -> Result<u32, VmError> {
    let name = vm.record.name.clone();
    let _op = vm.lock("start")?;
    let record =
        super::VmRecord::load(&vm.dir)?.ok_or_else(|| VmError::NotFound { vm: name.clone() })?;
    let lock = match MonitorLock::acquire(&vm.dir).map_err(VmError::io("locking", &vm.dir))? {
        Ok(l) => l,
        Err(holder) => {
            return Err(VmError::Busy {
                vm: name,
                holder: format!("it is running ({holder})"),
            })
        }
    };
    if !matches!(
        record.state,
        VmState::Created | VmState::Stopped | VmState::Error
    ) {
        return Err(VmError::WrongState {
            vm: name,
            state: record.state,
            what: "only a created or stopped VM can start",
        });
    }
    let log_path = vm.dir.join(MONITOR_LOG);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&log_path)
        .map_err(VmError::io("opening", &log_path))?;
    let (read_end, write_end) = pipe().map_err(VmError::io("making a pipe for", &vm.dir))?;
    let lock_fd = lock
        .inheritable_fd()
        .map_err(VmError::io("passing the lock of", &vm.dir))?;
    // Both descriptors are made inheritable here, not between fork and
    // exec: without a pre_exec hook std spawns with posix_spawn (a vfork),
    // where a fork had to copy this process's page tables first (8 ms of
    // every `run`). Nothing else in this process spawns meanwhile.
    let ready_fd = write_end.as_raw_fd();
    let flags = rustix::io::fcntl_getfd(&write_end)
        .map_err(|e| VmError::io("passing the pipe of", &vm.dir)(e.into()))?;
    rustix::io::fcntl_setfd(&write_end, flags - rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| VmError::io("passing the pipe of", &vm.dir)(e.into()))?;
    let mut cmd = monitor_command()?;
    cmd.arg(&vm.dir)
        .arg(lock_fd.to_string())
        .arg(ready_fd.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(VmError::io("opening", &log_path))?)
        .stderr(log)
        .env_remove("RUST_LOG_STYLE")
        .env(BUILD_ENV, BUILD);
    let mut child = cmd
        .spawn()
        .map_err(VmError::io("starting the monitor of", &vm.dir))?;
    // Only the child writes to the pipe now; EOF means it exited.
    drop(write_end);
    drop(lock);
    let pid = child.id();
    let answer = read_ready(read_end);
    // The monitor is not our child to wait for (a new session, reaped by
    // init once we exit); reap it here only if it already failed.
    match answer {
        Ok(line) if line.trim() == "ok" => {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            Ok(pid)
        }
        Ok(line) => {
            let _ = child.wait();
            Err(VmError::MonitorStart {
                vm: vm.record.name.clone(),
                reason: if line.trim().is_empty() {
                    format!("it exited without a word; see {}", log_path.display())
                } else {
                    line.trim().to_string()
                },
            })
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(VmError::MonitorStart {
                vm: vm.record.name.clone(),
                reason: e,
            })
        }
    }
}

/// The monitor's program and its leading arguments: `cocoon-monitor`
/// beside this binary, or this binary's `__monitor`.
fn monitor_command() -> Result<Command, VmError> {
    let exe =
        std::env::current_exe().map_err(VmError::io("finding", Path::new("/proc/self/exe")))?;
    let sibling = exe.with_file_name(MONITOR_BINARY);
    Ok(if is_executable(&sibling) {
        Command::new(sibling)
    } else {
        let mut cmd = Command::new(exe);
        cmd.arg(MONITOR_COMMAND);
        cmd
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((File::from(r), w))
}

/// The monitor's one line, within [`READY_TIMEOUT`].
fn read_ready(mut pipe: File) -> Result<String, String> {
    let fd: RawFd = pipe.as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(READY_TIMEOUT.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n == 0 {
        return Err(format!("no answer within {} s", READY_TIMEOUT.as_secs()));
    }
    let mut line = String::new();
    let _ = (&mut pipe).take(64 << 10).read_to_string(&mut line);
    Ok(line)
}

/// Adopts the raw descriptors of `__monitor`'s arguments.
pub fn parse_fd(arg: &str) -> Result<RawFd, String> {
    arg.parse::<RawFd>()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("not a descriptor number: {arg:?}"))
}
