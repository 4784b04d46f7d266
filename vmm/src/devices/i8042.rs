//! The i8042 keyboard controller, for its one job in a microVM: the CPU
//! reset command (0xfe on port 0x64).

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::vcpu::{Control, ExitReason};
use std::sync::Arc;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

pub struct ResetTrigger(pub Arc<Control>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(ExitReason::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(control: Arc<Control>) -> Self {
        I8042(I8042Device::new(ResetTrigger(control)))
    }
}

impl BusDevice for I8042 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the bus passes offsets inside the device's few ports"
    )]
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.0.read(offset as u8);
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
            let _ = self.0.write(offset as u8, *b);
        }
    }
}
