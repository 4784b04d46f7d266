//! The hardware-reduced ACPI power device: the FADT's sleep control,
//! sleep status and reset registers, as I/O ports.

use std::sync::Arc;

use super::BusDevice;
use crate::vcpu::{Control, ExitReason};

pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
pub const RESET_PORT: u16 = 0x602;
pub const RESET_VALUE: u8 = 0x1;
pub const ACPI_PM_PORT_BASE: u64 = SLEEP_CONTROL_PORT as u64;
pub const ACPI_PM_PORT_LEN: u64 = 3;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The SLP_TYP our DSDT's `_S5_` package names.
const S5_SLP_TYP: u8 = 5;

pub struct AcpiPowerDevice {
    control: Arc<Control>,
}

impl AcpiPowerDevice {
    pub fn new(control: Arc<Control>) -> Self {
        AcpiPowerDevice { control }
    }
}

/// What a byte written to a register asks for.
pub fn decode_write(port: u16, value: u8) -> Option<ExitReason> {
    match port {
        SLEEP_CONTROL_PORT
            if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP =>
        {
            Some(ExitReason::PowerOff)
        }
        RESET_PORT if value == RESET_VALUE => Some(ExitReason::Reset),
        _ => None,
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, no wake event pending.
        data.fill(0);
    }

    #[allow(
        clippy::cast_possible_truncation,
        reason = "the bus passes offsets inside the device's few ports"
    )]
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [v] = data {
            if let Some(reason) = decode_write(SLEEP_CONTROL_PORT + offset as u16, *v) {
                self.control.request_exit(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_s5_and_reset_only() {
        assert_eq!(
            decode_write(SLEEP_CONTROL_PORT, (5 << 2) | (1 << 5)),
            Some(ExitReason::PowerOff)
        );
        // S5 without SLP_EN, or another sleep state, is not a power-off.
        assert_eq!(decode_write(SLEEP_CONTROL_PORT, 5 << 2), None);
        assert_eq!(decode_write(SLEEP_CONTROL_PORT, (3 << 2) | (1 << 5)), None);
        assert_eq!(
            decode_write(RESET_PORT, RESET_VALUE),
            Some(ExitReason::Reset)
        );
        assert_eq!(decode_write(RESET_PORT, 0), None);
        assert_eq!(decode_write(SLEEP_STATUS_PORT, 0xff), None);
    }
}
