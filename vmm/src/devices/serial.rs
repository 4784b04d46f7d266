//! COM1: a 16550A UART (vm-superio) at 0x3f8, IRQ 4 through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
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

/// The UART's registers and unread input, for a snapshot (vm-superio's
/// `SerialState`, which is not serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// IIR bit 0: no interrupt pending.
const IIR_NO_INTERRUPT: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("the saved COM1 state does not load")]
pub struct UartStateError(#[source] vm_superio::serial::Error<std::io::Error>);

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialWriter) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A UART in a saved state, writing to `out`.
    pub fn from_state(
        irq: EventFd,
        out: SerialWriter,
        state: &UartState,
    ) -> Result<Self, UartStateError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(UartStateError)?;
        Ok(SerialDevice { serial })
    }

    pub fn state(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// After a restore, once the interrupt controllers have their state:
    /// raises the interrupt the UART says is pending, which may have been in
    /// flight when the state was saved.
    pub fn kick(&self) {
        if self.serial.state().interrupt_identification & IIR_NO_INTERRUPT == 0 {
            let _ = self.serial.interrupt_evt().trigger();
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the bus passes offsets inside the device's few ports"
    )]
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    #[allow(
        clippy::cast_possible_truncation,
        reason = "the bus passes offsets inside the device's few ports"
    )]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_state_round_trips_with_pending_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        // The guest enables the receive interrupt and sets the scratch
        // register; the host queues input.
        dev.write(1, &[0x01]);
        dev.write(7, &[0x5a]);
        assert_eq!(dev.enqueue_input(b"abc"), 3);
        let state = dev.state();
        assert_eq!(state.in_buffer, b"abc");
        assert_eq!(state.scratch, 0x5a);
        while irq.read().is_ok() {}

        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back =
            SerialDevice::from_state(irq2.try_clone().unwrap(), Box::new(std::io::sink()), &state)
                .unwrap();
        assert_eq!(back.state(), state);
        // A pending receive interrupt is raised again by the kick.
        while irq2.read().is_ok() {}
        back.kick();
        assert!(irq2.read().is_ok());
        let mut b = [0u8];
        back.read(0, &mut b);
        assert_eq!(b[0], b'a');

        let mut bad = state.clone();
        bad.in_buffer = vec![0; 4096];
        assert!(SerialDevice::from_state(irq2, Box::new(std::io::sink()), &bad).is_err());
    }
}
