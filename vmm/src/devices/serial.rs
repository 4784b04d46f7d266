//! COM1: a 16550A UART (vm-superio) at 0x3f8, IRQ 4 through an irqfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Raises a guest interrupt by writing an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialWriter = Box<dyn Write + Send>;

pub struct SerialDevice {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialWriter>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialWriter) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            // An output error (a closed log file) must not stop the guest.
            let _ = self.serial.write(offset as u8, *b);
            if offset == 0 {
                let _ = self.serial.writer_mut().flush();
            }
        }
    }
}
