//! Termination signals for a VMM process: SIGINT and SIGTERM become a
//! host-request stop instead of killing the process with the guest's disks
//! half-flushed.

use crate::vm::StopHandle;

const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

fn sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread
/// it starts afterwards. Call it before [`crate::Vm::start`].
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = sigset();
    // SAFETY: a valid set; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// Starts a thread that waits for SIGINT or SIGTERM and stops the VM.
/// The signals must have been blocked first.
pub fn stop_on_termination_signals(stop: StopHandle) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = sigset();
            let mut sig: libc::c_int = 0;
            // SAFETY: a valid set and a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                stop.stop();
            }
        })
        .map(|_| ())
}
