//! The I/O threads of virtio devices: one per device, serving its queue
//! notifications (ioeventfds) until stopped, and able to pause between
//! requests so that a paused VM has no device work in flight (what a
//! consistent snapshot needs).
//!
//! A worker reads a queue's eventfd only when it is about to serve that
//! queue, so a notification that arrives while paused stays pending in the
//! eventfd and is served after resume.
//!
//! A device with a backend descriptor (a network device's tap) has it
//! polled too, for what the device says it can use right now
//! ([`MmioTransport::backend_interest`]): a tap is not polled for input
//! while the guest has no room for a frame, so the worker never spins on
//! one it cannot drain; the guest's next receive notification turns
//! interest back on.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use crate::devices::lock;

#[derive(Default)]
struct State {
    stop: bool,
    pause: bool,
    /// Workers parked by a pause.
    parked: usize,
    /// Workers whose thread still runs.
    alive: usize,
}

#[derive(Default)]
struct Control {
    state: Mutex<State>,
    cond: Condvar,
}

impl Control {
    /// Called by a worker after its wake eventfd fired: parks while a pause
    /// is in force; false when the worker must end.
    fn check_in(&self) -> bool {
        let mut s = lock(&self.state);
        if s.pause && !s.stop {
            s.parked += 1;
            self.cond.notify_all();
            while s.pause && !s.stop {
                s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        !s.stop
    }

    fn exited(&self) {
        let mut s = lock(&self.state);
        s.alive -= 1;
        self.cond.notify_all();
    }
}

struct Worker {
    /// Written to make the worker look at the control state.
    wake: EventFd,
    handle: JoinHandle<()>,
}

/// Every I/O thread of a VM.
#[derive(Default)]
pub struct Workers {
    control: Arc<Control>,
    workers: Vec<Worker>,
}

impl Workers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a thread serving `transport`'s queues, one eventfd per queue,
    /// and its device's `backend` descriptor if it has one.
    pub fn spawn(
        &mut self,
        name: String,
        transport: Arc<Mutex<MmioTransport>>,
        queue_evts: Vec<EventFd>,
        backend: Option<OwnedFd>,
    ) -> io::Result<()> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_wake = wake.try_clone()?;
        let control = self.control.clone();
        lock(&control.state).alive += 1;
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            serve(
                &transport,
                &queue_evts,
                backend.as_ref(),
                &thread_wake,
                &control,
            );
            control.exited();
        });
        match spawned {
            Ok(handle) => {
                self.workers.push(Worker { wake, handle });
                Ok(())
            }
            Err(e) => {
                self.control.exited();
                Err(e)
            }
        }
    }

    /// Returns once every worker is parked between requests. A request
    /// being served when this is called completes first.
    pub fn pause(&self) {
        let mut s = lock(&self.control.state);
        s.pause = true;
        drop(s);
        self.wake_all();
        let mut s = lock(&self.control.state);
        while s.parked < s.alive {
            s = self.control.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        lock(&self.control.state).pause = false;
        self.control.cond.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.control.state).pause
    }

    /// Stops every worker (after the request it is serving) and joins it.
    pub fn stop_and_join(&mut self) {
        lock(&self.control.state).stop = true;
        self.control.cond.notify_all();
        self.wake_all();
        for w in self.workers.drain(..) {
            let _ = w.handle.join();
        }
    }

    fn wake_all(&self) {
        for w in &self.workers {
            // A full counter (2^64-2 unread wakes) still reads as readable.
            let _ = w.wake.write(1);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Serves `transport` until told to stop.
fn serve(
    transport: &Mutex<MmioTransport>,
    queue_evts: &[EventFd],
    backend: Option<&OwnedFd>,
    wake: &EventFd,
    control: &Control,
) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
        .chain(queue_evts.iter().map(|e| e.as_raw_fd()))
        .chain(backend.map(|b| b.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let backend_at = backend.map(|_| fds.len() - 1);
    loop {
        if let Some(at) = backend_at {
            // A negative fd is skipped by poll: the backend failed for good.
            if fds[at].fd >= 0 {
                fds[at].events = lock(transport).backend_interest().poll_events();
            }
        }
        // SAFETY: `fds` is a valid array of pollfd for its length, and the
        // eventfds it names outlive this call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %io::Error::last_os_error(), "virtio worker: poll failed");
            return;
        }
        // The control state first: a pause must hold before any queue
        // notification is consumed.
        if fds[0].revents != 0 {
            let _ = wake.read();
            if !control.check_in() {
                return;
            }
            continue;
        }
        for (index, evt) in queue_evts.iter().enumerate() {
            if fds[index + 1].revents & libc::POLLIN != 0 && evt.read().is_ok() {
                lock(transport).notify(index);
            }
        }
        if let Some(at) = backend_at {
            let revents = fds[at].revents;
            if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // poll reports these whatever was asked, so polling on
                // would spin: the backend is gone (its interface deleted).
                tracing::warn!("virtio worker: the device's backend failed; no longer polling it");
                fds[at].fd = -1;
            } else if revents != 0 {
                lock(transport).device_event();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{activated_transport, Probe};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    fn setup(delay: Duration) -> (Workers, EventFd, Arc<Probe>) {
        let (transport, probe) = activated_transport(delay);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut w = Workers::new();
        w.spawn(
            "test-worker".into(),
            Arc::new(Mutex::new(transport)),
            vec![evt.try_clone().unwrap()],
            None,
        )
        .unwrap();
        (w, evt, probe)
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pause_waits_for_the_request_in_flight_and_holds_new_ones() {
        let (mut w, evt, probe) = setup(Duration::from_millis(300));
        evt.write(1).unwrap();
        wait_for("the request to start", || {
            probe.started.load(Ordering::SeqCst) == 1
        });
        let t0 = Instant::now();
        w.pause();
        // The request in flight finished before pause returned.
        assert_eq!(probe.finished.load(Ordering::SeqCst), 1);
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        assert!(w.is_paused());
        // A notification while paused is not served...
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(probe.started.load(Ordering::SeqCst), 1);
        // ...until resume.
        w.resume();
        wait_for("the held request", || {
            probe.finished.load(Ordering::SeqCst) == 2
        });
        w.stop_and_join();
    }

    #[test]
    fn pause_of_idle_workers_is_quick_and_stop_ends_a_paused_worker() {
        let (mut w, evt, probe) = setup(Duration::ZERO);
        for _ in 0..50 {
            let t0 = Instant::now();
            w.pause();
            assert!(t0.elapsed() < Duration::from_secs(2));
            w.resume();
        }
        evt.write(1).unwrap();
        wait_for("a request after the pauses", || {
            probe.finished.load(Ordering::SeqCst) == 1
        });
        w.pause();
        let t0 = Instant::now();
        w.stop_and_join();
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
