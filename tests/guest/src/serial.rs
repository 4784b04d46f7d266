//! COM1, the 16550 UART at 0x3f8: the guest's only output.

use crate::port::{inb, outb};
use core::fmt;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Sets 115200 8N1 with FIFOs and interrupts off.
pub fn init() {
    // SAFETY: COM1 belongs to this guest; programming it touches no memory.
    unsafe {
        outb(COM1 + 1, 0x00); // no interrupts: the guest polls
        outb(COM1 + 3, 0x80); // DLAB on to set the divisor
        outb(COM1, 0x01); // divisor 1: 115200 baud
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8N1, DLAB off
        outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
        outb(COM1 + 4, 0x03); // DTR, RTS
    }
}

fn put(byte: u8) {
    // Bounded: an absent or stuck UART must not hang the guest. Emulated
    // UARTs report an empty holding register at once.
    for _ in 0..100_000 {
        // SAFETY: reading COM1's line status register has no memory effects.
        if unsafe { inb(LSR) } & LSR_THR_EMPTY != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: writing COM1's transmit register has no memory effects.
    unsafe { outb(COM1, byte) };
}

/// A `fmt::Write` over COM1 that keeps whatever it writes on one line: line
/// breaks in the text (a panic message has them) become spaces.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes()
            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b })
            .for_each(put);
        Ok(())
    }
}

/// Ends a protocol line.
pub fn newline() {
    put(b'\n');
}

/// Prints one protocol line: `cocoon-guest: ` + the arguments + newline.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut serial = $crate::serial::Serial;
        let _ = serial.write_str("cocoon-guest: ");
        let _ = serial.write_fmt(format_args!($($arg)*));
        $crate::serial::newline();
    }};
}
