//! Power-off: ACPI sleep control, then QEMU's isa-debug-exit, then a reset
//! through the i8042, then a triple fault (resets, which `-no-reboot` and our
//! VMM both treat as a stop).

use crate::port::{outb, outl, outw};
use crate::tsc;
use core::arch::asm;

/// `SLP_TYP = 5 (S5) << 2 | SLP_EN`, written to the FADT's SLEEP_CONTROL_REG.
const SLEEP_S5: u8 = (5 << 2) | (1 << 5);
/// QEMU's `-device isa-debug-exit,iobase=0xf4`: QEMU exits with (value << 1) | 1.
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The i8042 keyboard controller's command port and its "pulse reset" command.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Only the identity-mapped first 4 GiB can be touched.
const MAPPED_END: u64 = 1 << 32;

/// Stops the machine; never returns.
pub fn off(rsdp_paddr: u64) -> ! {
    let rsdp = Some(rsdp_paddr)
        .filter(|&p| p != 0)
        .or_else(scan_bios_area_for_rsdp);
    if let Some(reg) = rsdp.and_then(find_sleep_control) {
        write_register(reg, SLEEP_S5);
        // The VMM may act on the write from another thread: give it a moment
        // before trying the next way out.
        tsc::delay_ms(200);
    }
    // SAFETY: writing the debug-exit port has no memory effects; where no
    // such device exists the write is ignored.
    unsafe { outl(DEBUG_EXIT_PORT, 0) };
    tsc::delay_ms(200);
    // SAFETY: as above; 0xfe to the i8042 command port pulses the reset line
    // (our VMM has an i8042 for exactly this), ignored where there is none.
    unsafe { outb(I8042_COMMAND_PORT, I8042_RESET) };
    tsc::delay_ms(200);
    triple_fault()
}

/// A Generic Address Structure as ACPI defines it (12 bytes).
#[derive(Clone, Copy)]
struct Gas {
    space_id: u8,
    bit_width: u8,
    address: u64,
}

fn write_register(reg: Gas, value: u8) {
    match reg.space_id {
        // System memory: the address is below 4 GiB (checked when found),
        // hence identity mapped.
        0 => {
            // SAFETY: the firmware tables name this address as the sleep
            // control register, a device register outside guest RAM; the
            // write only asks the platform to power off.
            unsafe { (reg.address as *mut u8).write_volatile(value) }
        }
        // System I/O.
        1 => {
            let port = reg.address as u16;
            // SAFETY: port writes touch no memory; the firmware tables name
            // this port as the sleep control register.
            unsafe {
                match reg.bit_width {
                    16 => outw(port, value.into()),
                    32 => outl(port, value.into()),
                    _ => outb(port, value),
                }
            }
        }
        _ => {}
    }
}

/// Reads `N` bytes at physical address `paddr`, if they are in mapped memory.
fn read_bytes<const N: usize>(paddr: u64) -> Option<[u8; N]> {
    if paddr == 0 || paddr.checked_add(N as u64)? > MAPPED_END {
        return None;
    }
    // SAFETY: the range is below 4 GiB, identity mapped; ACPI tables and the
    // BIOS area are plain memory, and read_unaligned copes with any alignment.
    Some(unsafe { core::ptr::read_unaligned(paddr as *const [u8; N]) })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

fn checksum_ok(paddr: u64, len: u64) -> bool {
    if len == 0 || paddr.checked_add(len).is_none_or(|end| end > MAPPED_END) {
        return false;
    }
    // SAFETY: as in read_bytes: an identity-mapped range below 4 GiB.
    let bytes = unsafe { core::slice::from_raw_parts(paddr as *const u8, len as usize) };
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

/// Without hvm_start_info.rsdp_paddr (QEMU's qboot leaves it 0), firmware
/// puts the RSDP on a 16-byte boundary in 0xe0000..0x100000.
fn scan_bios_area_for_rsdp() -> Option<u64> {
    (0xe_0000u64..0x10_0000)
        .step_by(16)
        .find(|&p| read_bytes::<8>(p) == Some(*b"RSD PTR ") && checksum_ok(p, 20))
}

/// RSDP -> XSDT (or RSDT) -> FADT -> SLEEP_CONTROL_REG.
fn find_sleep_control(rsdp: u64) -> Option<Gas> {
    let r = read_bytes::<36>(rsdp)?;
    if &r[..8] != b"RSD PTR " {
        return None;
    }
    let revision = r[15];
    let xsdt = if revision >= 2 { u64_at(&r, 24) } else { 0 };
    let (table, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(u32_at(&r, 16)), 4)
    };
    let header = read_bytes::<36>(table)?;
    let len = u64::from(u32_at(&header, 4));
    if len < 36 || !checksum_ok(table, len) {
        return None;
    }
    let entries = (len - 36) / entry_size;
    let fadt = (0..entries).find_map(|i| {
        let at = table + 36 + i * entry_size;
        let addr = if entry_size == 8 {
            u64::from_le_bytes(read_bytes::<8>(at)?)
        } else {
            u64::from(u32::from_le_bytes(read_bytes::<4>(at)?))
        };
        (read_bytes::<4>(addr)? == *b"FACP").then_some(addr)
    })?;
    let fadt_header = read_bytes::<8>(fadt)?;
    // SLEEP_CONTROL_REG sits at offset 244 (ACPI 5.0+): the FADT must be long
    // enough to have it.
    if u32_at(&fadt_header, 4) < 256 {
        return None;
    }
    let g = read_bytes::<12>(fadt + 244)?;
    let reg = Gas {
        space_id: g[0],
        bit_width: g[1],
        address: u64_at(&g, 4),
    };
    let usable = match reg.space_id {
        0 => reg.address != 0 && reg.address < MAPPED_END,
        1 => reg.address != 0 && reg.address <= 0xffff,
        _ => false,
    };
    usable.then_some(reg)
}

/// Loads an empty IDT and raises an exception: with no way to deliver it the
/// CPU shuts down, which virtual machines treat as a reset. (Where KVM
/// emulates the guest's instructions, the emulator gives up on this instead
/// and the VMM sees an internal error, which stops the guest too.)
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr { limit: 0, base: 0 };
    loop {
        // SAFETY: deliberately crashes the CPU; nothing runs afterwards.
        unsafe { asm!("lidt [{}]", "int3", in(reg) &idtr, options(nostack)) };
    }
}
