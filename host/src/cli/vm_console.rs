//! A VM's console on this terminal: output followed through the API's
//! long-poll reads, input forwarded (interactive `console`, in raw mode;
//! Ctrl-] detaches).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use cocoon_host::vm::client::Client;
use cocoon_host::vm::monitor_lock::{Liveness, MonitorLock};
use cocoon_host::vm::VmEntry;

/// Where followed output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Stdout,
    Discard,
}

/// The detach key: Ctrl-], as telnet and virsh use.
const DETACH: u8 = 0x1d;
/// Each console read waits this long for output (and a SIGINT is seen
/// within it).
const POLL: Duration = Duration::from_millis(500);
/// How long a running monitor's API may fail to answer before the console
/// gives up on it.
const UNREACHABLE: Duration = Duration::from_secs(10);

/// Follows the console from offset `from` until the monitor is gone;
/// returns everything it saw. `log_base` is where this run's output
/// starts in `console.log` (its length before the monitor started): what
/// the monitor wrote after the last read is taken from there. `stop`,
/// once set (SIGINT), makes it stop the VM and follow it to the end. A
/// stdout closed by its reader (`run IMAGE | head`) sets it too: the
/// console is gone, as with Ctrl-C, and a foreground VM does not outlive
/// its console unseen.
pub fn follow(
    vm: &VmEntry,
    from: u64,
    log_base: Option<u64>,
    mut out: Out,
    stop: Option<&AtomicBool>,
) -> anyhow::Result<Vec<u8>> {
    let client = Client::new(&vm.api_socket())?;
    let mut seen = Vec::new();
    let mut next = from;
    let mut stdout = std::io::stdout();
    let mut stopping = false;
    // Since when the API has not answered while the monitor runs.
    let mut unreachable: Option<std::time::Instant> = None;
    let mut emit = |bytes: &[u8], seen: &mut Vec<u8>| -> anyhow::Result<()> {
        if out == Out::Stdout {
            if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
                match stop {
                    Some(s) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        out = Out::Discard;
                        s.store(true, Ordering::Relaxed);
                    }
                    _ => return Err(StdoutClosed::or_io(e)),
                }
            }
        }
        seen.extend_from_slice(bytes);
        Ok(())
    };
    loop {
        if !stopping && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            // Asked again on the next turn if the API did not take it.
            stopping = client.act(cocoon_host::vm::api::PATH_STOP).is_ok();
        }
        match client.console(next, POLL) {
            Ok(chunk) => {
                next = chunk.next();
                emit(&chunk.data, &mut seen)?;
            }
            Err(e) => {
                // A monitor that still holds its lock is not gone: a read
                // that failed (its API busy, or not yet there) is tried
                // again, for a while.
                if matches!(MonitorLock::probe(&vm.dir), Ok(Liveness::Alive(_))) {
                    let since = *unreachable.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() < UNREACHABLE {
                        tracing::debug!(error = %cocoon_host::error_chain(&e), "console read failed; again");
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    return Err(anyhow::Error::new(e).context(format!(
                        "VM {}: its monitor runs, but its API has not answered for {} s",
                        vm.record.name,
                        UNREACHABLE.as_secs()
                    )));
                }
                // The monitor is gone: its log is complete and its record
                // says how the VM ended.
                if let Some(base) = log_base {
                    let rest = log_from(vm, base + next);
                    emit(&rest, &mut seen)?;
                }
                return Ok(seen);
            }
        }
        unreachable = None;
    }
}

/// Stdout was closed by its reader (`logs -f | head`): the command ends
/// quietly, as on SIGPIPE (see `main`).
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

impl StdoutClosed {
    /// `e` from a write to stdout, as the error to return.
    fn or_io(e: std::io::Error) -> anyhow::Error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            StdoutClosed.into()
        } else {
            anyhow::Error::new(e).context("writing to stdout")
        }
    }
}

/// How often `logs -f` looks for new output in the log.
const TAIL_POLL: Duration = Duration::from_millis(50);

/// `logs [-f]`: `console.log` from its start; with `follow`, then what is
/// appended to it until the VM's monitor is gone. The file is followed,
/// not the API's ring: the log writer runs a little behind the ring, so a
/// switch from the file to the ring would drop or repeat the bytes between
/// the two. The monitor completes the log before it lets go of its lock,
/// so the read after the lock is seen free has everything. A rotation
/// (`console.log` renamed to `console.log.1`) is followed: the old file is
/// read to its end, then the new one from its start.
pub fn tail(vm: &VmEntry, follow: bool) -> anyhow::Result<()> {
    let path = vm.console_log();
    let mut out = std::io::stdout().lock();
    let mut log: Option<std::fs::File> = None;
    loop {
        // Before the read: once the monitor is seen gone, this read is
        // the last one needed.
        let alive = follow && matches!(MonitorLock::probe(&vm.dir), Ok(Liveness::Alive(_)));
        if let Some(f) = log.as_mut() {
            copy_to_end(f, &path, &mut out)?;
        }
        if let Some(next) = reopened(&path, log.as_ref())? {
            log = Some(next);
            continue;
        }
        if !alive {
            return Ok(());
        }
        std::thread::sleep(TAIL_POLL);
    }
}

/// The rest of `log` to `out`; the error says which side failed (a
/// closed pipe on stdout is not a bad log).
fn copy_to_end(
    log: &mut std::fs::File,
    path: &std::path::Path,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = log
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return out.flush().map_err(StdoutClosed::or_io);
        }
        out.write_all(&buf[..n]).map_err(StdoutClosed::or_io)?;
    }
}

/// The file now at `path` when it is not `current` (the log was made or
/// rotated since `current` was opened); `None` when it is, or when there
/// is no log yet. Anything but a regular file there is refused.
fn reopened(
    path: &std::path::Path,
    current: Option<&std::fs::File>,
) -> anyhow::Result<Option<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    let now = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // The monitor opens its log with O_NOFOLLOW: a link there is not its.
    if now.file_type().is_symlink() {
        anyhow::bail!("{} is a symlink, not the VM's console log", path.display());
    }
    if let Some(f) = current {
        let m = f
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        if (m.dev(), m.ino()) == (now.dev(), now.ino()) {
            return Ok(None);
        }
    }
    let input = cocoon_host::fsutil::input::open(path, cocoon_host::fsutil::input::Accept::Regular)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(input.file))
}

/// The console log's length now (where a new run's output will start).
pub fn log_len(vm: &VmEntry) -> u64 {
    std::fs::metadata(vm.console_log())
        .map(|m| m.len())
        .unwrap_or(0)
}

fn log_from(vm: &VmEntry, offset: u64) -> Vec<u8> {
    use std::io::Seek;
    let Ok(mut f) = std::fs::File::open(vm.console_log()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if f.seek(std::io::SeekFrom::Start(offset)).is_ok() {
        let _ = f.take(64 << 20).read_to_end(&mut out);
    }
    out
}

/// Raw mode on stdin while it lives (when stdin is a terminal).
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        match rustix::termios::tcgetattr(&stdin) {
            Ok(saved) => {
                let mut raw = saved.clone();
                raw.make_raw();
                let _ =
                    rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
                RawMode(Some(saved))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// `console`: output from now on, input to the guest, until Ctrl-] or
/// the VM stops.
pub fn interactive(vm: &VmEntry) -> anyhow::Result<()> {
    let client = Client::new(&vm.api_socket())?;
    let info = client
        .info()
        .context("asking the monitor where the console is")?;
    eprintln!("console of {} (Ctrl-] detaches)", vm.record.name);
    // Recent output first, so the screen has context.
    let from = info.console_end.saturating_sub(2048);
    let _raw = RawMode::enter();
    let socket = vm.api_socket();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok(input) = Client::new(&socket) else {
            return;
        };
        let mut buf = [0u8; 512];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let bytes = &buf[..n];
            if let Some(i) = bytes.iter().position(|b| *b == DETACH) {
                let _ = input.input(&bytes[..i]);
                break;
            }
            if input.input(bytes).is_err() {
                break;
            }
        }
        let _ = tx.send(());
    });
    let mut next = from;
    let mut stdout = std::io::stdout();
    loop {
        if rx.try_recv().is_ok() {
            break;
        }
        match client.console(next, Duration::from_millis(200)) {
            Ok(chunk) => {
                next = chunk.next();
                stdout.write_all(&chunk.data)?;
                stdout.flush()?;
            }
            Err(_) => break,
        }
    }
    drop(_raw);
    eprintln!("\r\ndetached from {}", vm.record.name);
    Ok(())
}
