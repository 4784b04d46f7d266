//! cocoon-test-guest: a PVH guest that reports its virtio-blk disks and
//! drives its virtio-net devices, on COM1.
//!
//! See PROTOCOL.md beside Cargo.toml for the command line it reads and the
//! lines it prints.

#![no_std]
#![no_main]

mod boot;
mod count;
mod cpu;
mod disk;
mod hal;
mod input;
mod lapic;
mod net;
mod port;
mod power;
mod serial;
mod traps;
mod tsc;

use cocoon_test_guest::cmdline::{self, Action, Escaped, MAX_DEVICES};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use disk::{Disk, Probe};
use net::{MAX_NICS, Nic};

/// hvm_start_info.rsdp_paddr, for powering off from anywhere.
static RSDP: AtomicU64 = AtomicU64::new(0);

/// Called by the trampoline in boot.rs on the boot stack, in long mode.
// SAFETY (no_mangle): the trampoline calls this name; nothing else defines it.
#[unsafe(no_mangle)]
extern "C" fn rust_main(start_info_paddr: u64) -> ! {
    serial::init();
    say!("start");
    traps::install();
    cpu::enable_write_back();
    // SAFETY: the trampoline passes the loader's %ebx unchanged and has
    // identity-mapped the first 4 GiB.
    let info = match unsafe { boot::read_start_info(start_info_paddr) } {
        Ok(info) => info,
        Err(e) => fatal(e),
    };
    RSDP.store(info.rsdp_paddr, Ordering::Relaxed);
    say!("cmdline {}", Escaped(info.cmdline));
    let cmdline = cmdline::parse(info.cmdline, |e| say!("error {e}"));

    let calibrated = tsc::calibrate();
    // After the TSC (one-shot mode measures its timer against it) and the
    // IDT (the timer's gate).
    let idle = lapic::init().name();
    let input = if input::enable_interrupts() {
        "irq"
    } else {
        "poll"
    };
    match calibrated {
        Some((khz, source)) => {
            say!(
                "tsc khz={khz} source={} idle={idle} input={input}",
                source.name()
            )
        }
        None => say!("tsc khz=0 source=none idle={idle} input={input}"),
    }

    let mut disks: [Option<Disk>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    let mut n_disks = 0;
    let mut nics: [Option<Nic>; MAX_NICS] = [const { None }; MAX_NICS];
    let mut n_nics = 0;
    let Some(mut net_buffers) = net::Buffers::take() else {
        fatal("network buffers already taken")
    };
    let devices = cmdline.devices();
    for (i, device) in devices.iter().enumerate() {
        match disk::probe(device, &devices[..i], n_disks) {
            Probe::Skip(reason) => say!("skip addr={:#x} reason={reason}", device.addr),
            Probe::Net(_) if n_nics == MAX_NICS => {
                say!("skip addr={:#x} reason=too-many-nics", device.addr)
            }
            Probe::Net(transport) => {
                match net::probe(n_nics, device.addr, transport, &mut net_buffers) {
                    Ok(nic) => nics[n_nics] = Some(nic),
                    Err(e) => say!("error nic index={n_nics} addr={:#x}: {e}", device.addr),
                }
                n_nics += 1;
            }
            Probe::Block(Ok(mut disk)) => {
                disk.report();
                disks[n_disks] = Some(disk);
                n_disks += 1;
            }
            Probe::Block(Err(e)) => {
                say!("error disk index={n_disks} addr={:#x}: {e}", device.addr);
                n_disks += 1;
            }
        }
    }

    let Some(buf) = disk::io_buffer() else {
        fatal("I/O buffer already taken")
    };
    let mut input = input::Input::new();
    for action in cmdline.actions() {
        // Between actions too, so input typed during a long one is seen.
        input.poll();
        let Some(index) = action.disk() else {
            match action {
                Action::Count { period_ms, ticks } => count::run(*period_ms, *ticks, &mut input),
                Action::Hang => hang(),
                Action::Net(net) => {
                    let index = net.nic();
                    match nics.get_mut(index).and_then(Option::as_mut) {
                        Some(nic) => nic.run(net, net_buffers.tx()),
                        None => say!("error {action}: no nic index={index}"),
                    }
                }
                _ => {}
            }
            continue;
        };
        let Some(disk) = disks.get_mut(index).and_then(Option::as_mut) else {
            say!("error {action}: no disk index={index}");
            continue;
        };
        match *action {
            Action::Hash { sector, count, .. } => disk.hash(sector, count, buf),
            Action::Write { sector, byte, .. } => disk.write_sector(sector, byte, buf),
            Action::SeqRead { bytes, .. } => disk.seqread(bytes, buf),
            Action::Count { .. } | Action::Hang | Action::Net(_) => {}
        }
    }

    if n_nics == 0 {
        say!("done disks={n_disks}");
    } else {
        say!("done disks={n_disks} nics={n_nics}");
    }
    power_off()
}

/// `cocoon.hang=0`: says so, then answers nothing more (no input is
/// looked at, no interrupt is taken) until the host stops the VM.
fn hang() -> ! {
    say!("hang");
    loop {
        // SAFETY: cli and hlt only stop this CPU; nothing runs after them.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Powers off the way `done` does.
pub fn power_off() -> ! {
    power::off(RSDP.load(Ordering::Relaxed))
}

/// Prints `error <what>` and powers off.
pub fn fatal(what: impl fmt::Display) -> ! {
    say!("error {what}");
    power_off()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::Relaxed) {
        // A panic while reporting a panic: no more printing, just stop.
        power::triple_fault();
    }
    fatal(format_args!("panic: {info}"))
}
