//! The host's input, polled: lines on COM1 are echoed, and Ctrl-Alt-Del
//! from the i8042 powers the guest off. Between looks a wait halts the CPU
//! until the local APIC timer wakes it (lapic.rs), or spins on the TSC where
//! there is no such timer. Where the IOAPIC can route them, COM1's
//! receive interrupt and the keyboard's IRQ 1 end a halt too: input is read
//! as it comes, and a halt can last the whole wait.

use crate::port::{inb, outb};
use crate::{lapic, say, tsc};
use cocoon_test_guest::cmdline::Escaped;
use cocoon_test_guest::console::{CtrlAltDel, LineBuffer};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1_DATA: u16 = 0x3f8;
const COM1_IER: u16 = 0x3f9;
const COM1_MCR: u16 = 0x3fc;
const COM1_LSR: u16 = 0x3fd;
const LSR_DATA_READY: u8 = 1 << 0;
/// IER bit 0: interrupt when received data is available.
const IER_RECEIVED_DATA: u8 = 1 << 0;
/// MCR: DTR, RTS, and OUT2, which gates a PC UART's IRQ line.
const MCR_DTR_RTS_OUT2: u8 = 0x0b;
/// ISA IRQs (and IOAPIC pins) of COM1 and the i8042's keyboard.
const COM1_IRQ: u8 = 4;
const KEYBOARD_IRQ: u8 = 1;

const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const I8042_OUTPUT_FULL: u8 = 1 << 0;
/// The byte waiting is the mouse's (QEMU's i8042 has one), not the keyboard's.
const I8042_AUX_DATA: u8 = 1 << 5;

/// How often the waits look at the inputs: each look is two port reads,
/// which are VM exits, so not in every turn of a busy wait.
const POLL_MS: u64 = 2;
/// The same when the inputs' interrupts end a halt: the look is only a
/// backstop then (a line longer than one look reads leaves the UART's
/// interrupt raised with no new edge), and each look wakes the CPU.
const POLL_INTERRUPTS_MS: u64 = 100;

/// Whether the inputs' interrupts wake a halted wait ([`enable_interrupts`]).
static INTERRUPTS: AtomicBool = AtomicBool::new(false);

/// Routes COM1's receive interrupt and the keyboard's IRQ 1 to the local
/// APIC, so that input ends a halt; returns whether it could (it needs
/// `lapic::init` to have found a timer, and an IOAPIC). The interrupts only
/// wake the CPU: the handler reads nothing, the next look does.
pub fn enable_interrupts() -> bool {
    if !lapic::route_input(&[COM1_IRQ, KEYBOARD_IRQ]) {
        return false;
    }
    // SAFETY: COM1 belongs to this guest; enabling its receive interrupt
    // touches no memory, and the interrupt's vector has a gate.
    unsafe {
        outb(COM1_MCR, MCR_DTR_RTS_OUT2);
        outb(COM1_IER, IER_RECEIVED_DATA);
    }
    INTERRUPTS.store(true, Ordering::Relaxed);
    true
}

/// At most this many bytes per device per look: bounded, whatever a device
/// claims.
const MAX_BYTES_PER_POLL: usize = 64;

/// The input state: a partial line and the keys held.
pub struct Input {
    line: LineBuffer,
    keys: CtrlAltDel,
}

impl Input {
    pub const fn new() -> Self {
        Input {
            line: LineBuffer::new(),
            keys: CtrlAltDel::new(),
        }
    }

    /// Echoes the complete lines that arrived and acts on Ctrl-Alt-Del
    /// (powering off: it does not return then).
    pub fn poll(&mut self) {
        for _ in 0..MAX_BYTES_PER_POLL {
            // SAFETY: COM1's registers belong to this guest; reading the
            // line status and receive registers touches no memory.
            let byte = unsafe {
                if inb(COM1_LSR) & LSR_DATA_READY == 0 {
                    break;
                }
                inb(COM1_DATA)
            };
            if let Some(line) = self.line.push(byte) {
                say!("input: {}", Escaped(line));
            }
        }
        for _ in 0..MAX_BYTES_PER_POLL {
            // SAFETY: the i8042's ports belong to this guest; reading its
            // status and data touches no memory.
            let (status, byte) = unsafe {
                let status = inb(I8042_STATUS);
                if status & I8042_OUTPUT_FULL == 0 {
                    break;
                }
                (status, inb(I8042_DATA))
            };
            if status & I8042_AUX_DATA == 0 && self.keys.push(byte) {
                say!("ctrl-alt-del: powering off");
                crate::power_off();
            }
        }
    }

    /// Waits about `ms` milliseconds (by the TSC, as [`tsc::delay_ms`]),
    /// halted in between looks at the inputs: every [`POLL_MS`], or, when
    /// their interrupts wake the CPU, on each wake-up and at least every
    /// [`POLL_INTERRUPTS_MS`]. Spins where there is no timer to halt with.
    pub fn wait_ms(&mut self, ms: u64) {
        let khz = tsc::khz().unwrap_or(3_000_000);
        let end = tsc::now().saturating_add(khz.saturating_mul(ms));
        let interrupts = INTERRUPTS.load(Ordering::Relaxed);
        let poll_ms = if interrupts {
            POLL_INTERRUPTS_MS
        } else {
            POLL_MS
        };
        loop {
            self.poll();
            let now = tsc::now();
            if now >= end {
                return;
            }
            let until = now + khz.saturating_mul(poll_ms).min(end - now);
            if interrupts {
                // Back to the look after any wake-up: it may be input.
                lapic::halt_until(until);
            } else {
                tsc::wait_until(until);
            }
        }
    }
}
