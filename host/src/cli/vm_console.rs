//! A VM's console on this terminal: output followed through the API's
//! long-poll reads, input forwarded (interactive `console`, in raw mode;
//! Ctrl-] detaches).

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::Context;
use cocoon_host::vm::client::Client;
use cocoon_host::vm::VmEntry;

/// Where followed output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Stdout,
    Discard,
}

/// The detach key: Ctrl-], as telnet and virsh use.
const DETACH: u8 = 0x1d;
const POLL: Duration = Duration::from_secs(5);

/// Follows the console from the first byte until the monitor is gone;
/// returns everything it saw.
pub fn follow(vm: &VmEntry, out: Out) -> anyhow::Result<Vec<u8>> {
    follow_from(vm, 0, out)
}

pub fn follow_from(vm: &VmEntry, from: u64, out: Out) -> anyhow::Result<Vec<u8>> {
    let client = Client::new(&vm.api_socket())?;
    let mut seen = Vec::new();
    let mut next = from;
    let mut stdout = std::io::stdout();
    loop {
        match client.console(next, POLL) {
            Ok(chunk) => {
                next = chunk.next();
                if out == Out::Stdout {
                    stdout.write_all(&chunk.data)?;
                    stdout.flush()?;
                }
                seen.extend_from_slice(&chunk.data);
            }
            // The monitor is gone (the VM stopped): what it wrote after
            // our last read is in the log.
            Err(_) => {
                let rest = tail_of_log(vm, &seen);
                if out == Out::Stdout {
                    stdout.write_all(&rest)?;
                    stdout.flush()?;
                }
                seen.extend_from_slice(&rest);
                return Ok(seen);
            }
        }
    }
}

/// What the log holds beyond `seen` (a suffix match: the log may hold
/// earlier runs too).
fn tail_of_log(vm: &VmEntry, seen: &[u8]) -> Vec<u8> {
    let Ok(log) = std::fs::read(vm.console_log()) else {
        return Vec::new();
    };
    if seen.is_empty() {
        return Vec::new();
    }
    match find_last(&log, seen) {
        Some(end) => log[end..].to_vec(),
        None => Vec::new(),
    }
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // Match on the last 4 KiB of what was seen; enough to place it.
    let n = &needle[needle.len().saturating_sub(4096)..];
    hay.windows(n.len())
        .rposition(|w| w == n)
        .map(|i| i + n.len())
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
