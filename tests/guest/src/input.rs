//! The host's input, polled (the guest never enables interrupts): lines on
//! COM1 are echoed, and Ctrl-Alt-Del from the i8042 powers the guest off.

use crate::port::inb;
use crate::{say, tsc};
use cocoon_test_guest::cmdline::Escaped;
use cocoon_test_guest::console::{CtrlAltDel, LineBuffer};

const COM1_DATA: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
const LSR_DATA_READY: u8 = 1 << 0;

const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const I8042_OUTPUT_FULL: u8 = 1 << 0;
/// The byte waiting is the mouse's (QEMU's i8042 has one), not the keyboard's.
const I8042_AUX_DATA: u8 = 1 << 5;

/// How often the waits look at the inputs: each look is two port reads,
/// which are VM exits, so not in every turn of a busy wait.
const POLL_MS: u64 = 2;

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
    /// polling the inputs every [`POLL_MS`].
    pub fn wait_ms(&mut self, ms: u64) {
        let khz = tsc::khz().unwrap_or(3_000_000);
        let end = tsc::now().saturating_add(khz.saturating_mul(ms));
        loop {
            self.poll();
            let now = tsc::now();
            if now >= end {
                return;
            }
            let step = khz.saturating_mul(POLL_MS).min(end - now);
            let until = now + step;
            while tsc::now() < until {
                core::hint::spin_loop();
            }
        }
    }
}
