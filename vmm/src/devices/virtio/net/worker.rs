//! The I/O thread of one network device: it waits with epoll on the
//! queue notifications (ioeventfds), the tap and the VM's stop eventfd.
//!
//! The tap is registered edge-triggered for input and output: the device
//! reads it only while the guest has room, and a new frame (or room to
//! write, after a send would have blocked) raises a new edge, while a
//! guest that posts receive buffers notifies the RX queue, which resumes
//! reading. So the thread never spins on a tap it cannot drain.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::lock;
use crate::devices::virtio::mmio::MmioTransport;

/// Starts the thread; it runs until `stop` becomes readable.
pub fn spawn(
    name: String,
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
    tap: OwnedFd,
    stop: EventFd,
) -> io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let tap_token = queue_evts.len() as u64;
    let stop_token = tap_token + 1;
    for (i, evt) in queue_evts.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        tap.as_raw_fd(),
        EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            tap_token,
        ),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, stop_token),
    )?;
    std::thread::Builder::new().name(name).spawn(move || {
        // Owned here so the descriptors outlive every wait on them.
        let _fds = (&tap, &stop);
        let mut events = vec![EpollEvent::default(); queue_evts.len() + 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-net: epoll_wait failed; the device stops");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    t if t == stop_token => return,
                    t if t == tap_token => lock(&transport).device_event(),
                    t => {
                        let index = t as usize;
                        if queue_evts.get(index).is_some_and(|e| e.read().is_ok()) {
                            lock(&transport).notify(index);
                        }
                    }
                }
            }
        }
    })
}
