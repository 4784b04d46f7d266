//! The i8042 keyboard controller, for its two jobs in a microVM: the
//! guest's CPU reset command (0xfe on port 0x64), and the host's
//! Ctrl-Alt-Del, the graceful shutdown request Firecracker sends
//! (`SendCtrlAltDel`): the keys' scan codes in the output buffer and IRQ 1.
//!
//! As Firecracker's i8042 (vm-superio's knows only the reset): enough of a
//! controller for Linux's i8042 and atkbd drivers to find a keyboard (the
//! control register, the output port, the self tests, an ACK to every
//! keyboard command). Keys are scan code set 2: the control register starts
//! with translation off, so Linux reads set 2 as it comes.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::vcpu::{Control, ExitReason};

pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's ISA interrupt.
pub const KEYBOARD_GSI: u32 = 1;

/// Register offsets from [`I8042_PORT`]: data (0x60) and status/command
/// (0x64).
const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Controller commands, written to 0x64.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const KBD_TEST_PASSED: u8 = 0x00;
/// What a keyboard answers to a command it took.
const KBD_ACK: u8 = 0xfa;

// Status register bits.
/// A byte waits at 0x60.
pub const STATUS_OUTPUT_FULL: u8 = 0x01;
/// The next write to 0x60 is a controller command's parameter.
const STATUS_COMMAND_PARAM: u8 = 0x08;
/// The keyboard is not inhibited.
const STATUS_KBD_UNLOCKED: u8 = 0x10;

// Control register ("command byte") bits.
const CTR_KBD_INTERRUPT: u8 = 0x01;
/// The POST passed.
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;

/// The controller's output buffer, as Firecracker's.
pub const BUFFER_LEN: usize = 16;

/// Ctrl, Alt and Delete pressed, then released, in scan code set 2. The
/// releases matter to a guest that chose to ignore one request: its
/// keyboard state says the keys are up, so a second request is new key
/// presses again (Firecracker sends the presses alone).
pub const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // Ctrl, Alt, Delete (extended) down
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // and up again
];

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the guest has not read {queued} bytes of the i8042's {BUFFER_LEN}-byte buffer (an earlier request?); Ctrl-Alt-Del needs {need} free")]
    BufferFull { queued: usize, need: usize },
    #[error("cannot raise the keyboard interrupt")]
    Interrupt(#[source] std::io::Error),
}

/// The controller's registers and unread output, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub output_port: u8,
    /// The controller command whose parameter is awaited at 0x60.
    pub command: u8,
    pub buffer: Vec<u8>,
}

impl Default for I8042State {
    /// At power-on: keyboard enabled with its interrupt, nothing queued.
    fn default() -> Self {
        I8042State {
            status: STATUS_KBD_UNLOCKED,
            control: CTR_KBD_INTERRUPT | CTR_SYSTEM,
            output_port: 0,
            command: 0,
            buffer: Vec::new(),
        }
    }
}

impl I8042State {
    /// What decoding cannot check.
    pub fn validate(&self) -> Result<(), String> {
        if self.buffer.len() > BUFFER_LEN {
            return Err(format!(
                "the i8042 holds {} bytes; its buffer has {BUFFER_LEN}",
                self.buffer.len()
            ));
        }
        Ok(())
    }
}

pub struct I8042 {
    control: Arc<Control>,
    /// IRQ 1, through an irqfd.
    irq: EventFd,
    status: u8,
    ctr: u8,
    output_port: u8,
    command: u8,
    buffer: VecDeque<u8>,
}

impl I8042 {
    pub fn new(control: Arc<Control>, irq: EventFd) -> Self {
        let mut dev = I8042 {
            control,
            irq,
            status: 0,
            ctr: 0,
            output_port: 0,
            command: 0,
            buffer: VecDeque::with_capacity(BUFFER_LEN),
        };
        dev.restore(&I8042State::default());
        dev
    }

    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.ctr,
            output_port: self.output_port,
            command: self.command,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Puts back a saved state (checked by [`I8042State::validate`]).
    pub fn restore(&mut self, state: &I8042State) {
        self.status = state.status;
        self.ctr = state.control;
        self.output_port = state.output_port;
        self.command = state.command;
        self.buffer = state.buffer.iter().copied().take(BUFFER_LEN).collect();
        self.sync_output_full();
    }

    /// After a restore: raises the interrupt for bytes that wait, which may
    /// have been in flight when the state was saved.
    pub fn kick(&self) {
        if !self.buffer.is_empty() {
            let _ = self.raise_interrupt();
        }
    }

    /// Queues the Ctrl-Alt-Del keys, whole or not at all, and raises IRQ 1
    /// (unless the guest turned the keyboard interrupt off: then it polls).
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let need = CTRL_ALT_DEL.len();
        if BUFFER_LEN - self.buffer.len() < need {
            return Err(I8042Error::BufferFull {
                queued: self.buffer.len(),
                need,
            });
        }
        self.buffer.extend(CTRL_ALT_DEL);
        self.sync_output_full();
        self.raise_interrupt().map_err(I8042Error::Interrupt)
    }

    fn raise_interrupt(&self) -> std::io::Result<()> {
        if self.ctr & CTR_KBD_INTERRUPT == 0 {
            return Ok(());
        }
        self.irq.write(1)
    }

    fn sync_output_full(&mut self) {
        if self.buffer.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        } else {
            self.status |= STATUS_OUTPUT_FULL;
        }
    }

    /// A controller's answer: it replaces whatever was unread.
    fn answer(&mut self, byte: u8) {
        self.buffer.clear();
        self.buffer.push_back(byte);
        self.sync_output_full();
    }

    fn read_data(&mut self) -> u8 {
        // An empty buffer reads 0, as Firecracker's.
        let byte = self.buffer.pop_front().unwrap_or(0);
        self.sync_output_full();
        // The guest's handler reads one byte per interrupt (Linux's does):
        // the next byte needs an interrupt of its own. irqfd interrupts are
        // edges, so raising one while the last is being handled is fine.
        if !self.buffer.is_empty() {
            let _ = self.raise_interrupt();
        }
        byte
    }

    fn write_command(&mut self, command: u8) {
        match command {
            CMD_RESET_CPU => self.control.request_exit(ExitReason::Reset),
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => {
                self.status |= STATUS_COMMAND_PARAM;
                self.command = command;
            }
            CMD_SELF_TEST => self.answer(SELF_TEST_PASSED),
            CMD_KBD_TEST => self.answer(KBD_TEST_PASSED),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        if self.status & STATUS_COMMAND_PARAM != 0 {
            self.status &= !STATUS_COMMAND_PARAM;
            match self.command {
                CMD_WRITE_CTR => self.ctr = byte,
                CMD_WRITE_OUTPUT_PORT => self.output_port = byte,
                _ => {}
            }
            return;
        }
        // A command for the keyboard itself: ours takes every one.
        self.answer(KBD_ACK);
        let _ = self.raise_interrupt();
    }
}

impl BusDevice for I8042 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the bus passes offsets inside the device's few ports"
    )]
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, &mut *data) {
            (DATA, [b]) => *b = self.read_data(),
            (COMMAND, [b]) => *b = self.status,
            _ => data.fill(0xff),
        }
    }

    #[allow(
        clippy::cast_possible_truncation,
        reason = "the bus passes offsets inside the device's few ports"
    )]
    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA, [b]) => self.write_data(*b),
            (COMMAND, [b]) => self.write_command(*b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, EventFd, Arc<Control>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let control = Arc::new(Control::default());
        let dev = I8042::new(control.clone(), irq.try_clone().unwrap());
        (dev, irq, control)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    /// How many interrupts were raised since the last look.
    fn interrupts(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn ctrl_alt_del_is_read_byte_by_byte_one_interrupt_each() {
        let (mut dev, irq, control) = device();
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.trigger_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL != 0 {
            assert_eq!(interrupts(&irq), 1, "after {got:x?}");
            got.push(inb(&mut dev, DATA));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        assert_eq!(interrupts(&irq), 0);
        assert_eq!(inb(&mut dev, DATA), 0);
        assert_eq!(control.exit_reason(), None);
    }

    #[test]
    fn unread_keys_refuse_a_second_request_and_the_interrupt_can_be_off() {
        let (mut dev, irq, _) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        let e = dev.trigger_ctrl_alt_del().unwrap_err();
        assert!(
            matches!(
                e,
                I8042Error::BufferFull {
                    queued: 11,
                    need: 11
                }
            ),
            "{e}"
        );
        while inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL != 0 {
            inb(&mut dev, DATA);
        }
        // The guest turns the keyboard interrupt off and polls instead.
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[CTR_SYSTEM]);
        while irq.read().is_ok() {}
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(interrupts(&irq), 0);
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(inb(&mut dev, DATA), 0x14);
    }

    #[test]
    fn controller_commands_and_keyboard_acks() {
        let (mut dev, irq, control) = device();
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut dev, DATA), CTR_KBD_INTERRUPT | CTR_SYSTEM);
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        assert_ne!(inb(&mut dev, COMMAND) & STATUS_COMMAND_PARAM, 0);
        dev.write(DATA, &[0x47]);
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_COMMAND_PARAM, 0);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut dev, DATA), 0x47);
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0xdf]);
        dev.write(COMMAND, &[CMD_READ_OUTPUT_PORT]);
        assert_eq!(inb(&mut dev, DATA), 0xdf);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(inb(&mut dev, DATA), SELF_TEST_PASSED);
        dev.write(COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(inb(&mut dev, DATA), KBD_TEST_PASSED);
        dev.write(COMMAND, &[CMD_KBD_DISABLE]);
        assert_ne!(dev.state().control & CTR_KBD_DISABLED, 0);
        dev.write(COMMAND, &[CMD_KBD_ENABLE]);
        assert_eq!(dev.state().control & CTR_KBD_DISABLED, 0);
        // A keyboard command (set LEDs) gets an ACK and an interrupt.
        while irq.read().is_ok() {}
        dev.write(DATA, &[0xed]);
        assert_eq!(interrupts(&irq), 1);
        assert_eq!(inb(&mut dev, DATA), KBD_ACK);
        // Wider accesses go nowhere.
        let mut w = [0u8; 2];
        dev.read(COMMAND, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(control.exit_reason(), None);
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(control.exit_reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn state_round_trips_with_unread_keys() {
        let (mut dev, _irq, _) = device();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x45]);
        dev.trigger_ctrl_alt_del().unwrap();
        inb(&mut dev, DATA);
        let state = dev.state();
        state.validate().unwrap();
        assert_eq!(state.buffer, CTRL_ALT_DEL[1..]);

        let (mut back, irq2, _) = device();
        back.restore(&state);
        assert_eq!(back.state(), state);
        assert_eq!(inb(&mut back, COMMAND) & STATUS_OUTPUT_FULL, 1);
        back.kick();
        assert_eq!(interrupts(&irq2), 1);
        assert_eq!(inb(&mut back, DATA), CTRL_ALT_DEL[1]);

        let mut bad = state;
        bad.buffer = vec![0; BUFFER_LEN + 1];
        assert!(bad.validate().unwrap_err().contains("17 bytes"));
    }
}
