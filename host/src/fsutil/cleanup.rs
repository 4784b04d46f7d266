//! Temp files removed when the process is told to stop. Every live
//! [`super::temp::Temp`] is registered here; a command that writes them
//! calls [`remove_temps_on_termination`] first, and on SIGINT, SIGTERM or
//! SIGHUP the registered temps are unlinked and the process exits with
//! 128 + the signal's number (130, 143, 129), as a shell reports a command
//! the signal killed.
//!
//! signal-hook's handler only wakes one watcher thread, so the removal
//! runs as ordinary code (it may lock, allocate and unlink), not in a
//! signal handler.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

const SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

fn registry() -> &'static Mutex<BTreeMap<u64, PathBuf>> {
    static PATHS: OnceLock<Mutex<BTreeMap<u64, PathBuf>>> = OnceLock::new();
    PATHS.get_or_init(Mutex::default)
}

/// A registered path; dropping it unregisters the path.
#[derive(Debug)]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `make`, which creates a file and returns it with its path, and
/// registers the path, all with the registry locked. A signal that comes
/// meanwhile waits for the lock and then removes this file too; a
/// registration after the create would leave the file of a signal that came in
/// between (a test saw it under load), so this is the only way in.
pub fn create_registered<T>(
    make: impl FnOnce() -> io::Result<(T, PathBuf)>,
) -> io::Result<(T, Registration)> {
    let mut paths = registry().lock().unwrap_or_else(PoisonError::into_inner);
    let (made, path) = make()?;
    let id = next_id();
    paths.insert(id, path);
    Ok((made, Registration(id)))
}

/// The paths registered now.
pub fn registered() -> Vec<PathBuf> {
    registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect()
}

/// Unlinks every registered path; the lock is held until exit, so no temp
/// registered later is left behind either.
fn remove_registered_and_exit(signal: i32) -> ! {
    let paths = registry().lock().unwrap_or_else(PoisonError::into_inner);
    for path in paths.values() {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(128 + signal)
}

/// Starts the thread that, when SIGINT, SIGTERM or SIGHUP arrives, removes
/// the registered temps and exits with 128 + the signal. From then on those
/// signals no longer kill the process outright.
pub fn remove_temps_on_termination() -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(SIGNALS)?;
    std::thread::Builder::new()
        .name("cocoon-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                remove_registered_and_exit(signal);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_come_and_go() {
        let register = |p: &str| create_registered(|| Ok(((), PathBuf::from(p)))).unwrap().1;
        let a = register("/nonexistent/a");
        let b = register("/nonexistent/b");
        let now = registered();
        assert!(now.contains(&PathBuf::from("/nonexistent/a")));
        assert!(now.contains(&PathBuf::from("/nonexistent/b")));
        drop(a);
        let now = registered();
        assert!(!now.contains(&PathBuf::from("/nonexistent/a")));
        assert!(now.contains(&PathBuf::from("/nonexistent/b")));
        drop(b);
    }
}
