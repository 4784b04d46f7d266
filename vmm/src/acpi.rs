//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with reset and sleep
//! registers), MADT (an IOAPIC and a LAPIC per vCPU) and a DSDT with COM1,
//! the i8042 keyboard (`PNP0303`), the `_S5_` sleep state and one `LNRO0005` device per virtio-mmio slot.
//!
//! The tables are written in the BIOS area at [`ACPI_START`], where a
//! kernel that is not told the RSDP address scans for it.

use acpi_tables::{aml, fadt, gas, madt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::acpi_pm::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::memory::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_MMIO_SIZE};

const OEM_ID: [u8; 6] = *b"COCOON";
const OEM_TABLE_ID: [u8; 8] = *b"COCOONVM";
const OEM_REVISION: u32 = 1;
const COM1_IRQ: u32 = 4;
const KEYBOARD_IRQ: u32 = crate::devices::i8042::KEYBOARD_GSI;

/// A virtio-mmio slot as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub addr: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables take {0} bytes, more than the {max} reserved", max = ACPI_END - ACPI_START)]
    TooLarge(u64),
    #[error("cannot write the ACPI tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML body.
fn dsdt_aml(slots: &[MmioSlot]) -> Vec<u8> {
    let mut body = Vec::new();

    // COM1: fixed I/O ports and an edge-triggered ISA interrupt.
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 0x8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    // The i8042, so that Linux's i8042 driver finds it through PNP (the
    // hardware-reduced FADT says nothing of an 8042) and atkbd gets the
    // host's Ctrl-Alt-Del on IRQ 1, an edge as every irqfd interrupt.
    let kbd_data = aml::IO::new(0x60, 0x60, 1, 1);
    let kbd_command = aml::IO::new(0x64, 0x64, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, KEYBOARD_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_command, &kbd_irq]);
    aml::Device::new(
        "_SB_.PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &kbd_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    // S5 so that a hardware-reduced guest knows the SLP_TYP of power-off.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8])).to_aml_bytes(&mut body);

    for (i, slot) in slots.iter().enumerate() {
        let name = format!("_SB_.V{i:03X}");
        // The virtio-mmio window sits in the MMIO gap below 4 GiB.
        #[allow(
            clippy::cast_possible_truncation,
            reason = "slots are in the 32-bit MMIO gap (memory::mmio_slot)"
        )]
        let window = aml::Memory32Fixed::new(true, slot.addr as u32, VIRTIO_MMIO_SIZE as u32);
        // irqfd interrupts are edge-triggered.
        let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let uid = u32::try_from(i).expect("at most a few dozen devices");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    body
}

/// The tables, laid out from `base`; returns (RSDP address, image).
pub fn build_tables(base: u64, cpus: u8, slots: &[MmioSlot]) -> (u64, Vec<u8>) {
    let mut image: Vec<u8> = Vec::new();
    let align = |image: &mut Vec<u8>| image.resize(image.len().next_multiple_of(16), 0);

    // RSDP first: it must sit on a 16-byte boundary in the BIOS area.
    let rsdp_at = base;
    image.resize(Rsdp::len(), 0);
    align(&mut image);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(slots));
    let dsdt_at = base + image.len() as u64;
    image.extend_from_slice(dsdt.as_slice());
    align(&mut image);

    let mut fadt = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::ResetRegSup)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton)
        .dsdt_64(dsdt_at);
    let io = |port: u16| {
        gas::GAS::new(
            gas::AddressSpace::SystemIo,
            8,
            0,
            gas::AccessSize::ByteAccess,
            port.into(),
        )
    };
    fadt.reset_reg = io(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io(SLEEP_STATUS_PORT);
    // "ACPI" in the hypervisor vendor identity is not required; leave 0.
    let fadt_at = base + image.len() as u64;
    image.extend_from_slice(&bytes(&fadt.finalize()));
    align(&mut image);

    let mut madt = madt::MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        madt::LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..cpus {
        madt.add_structure(madt::ProcessorLocalApic::new(
            cpu,
            cpu,
            madt::EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(madt::IoApic::new(0, IOAPIC_ADDR, 0));
    let madt_at = base + image.len() as u64;
    image.extend_from_slice(&bytes(&madt));
    align(&mut image);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_at = base + image.len() as u64;
    image.extend_from_slice(&bytes(&xsdt));

    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    image[..rsdp.len()].copy_from_slice(&rsdp);
    (rsdp_at, image)
}

/// Writes the tables into guest memory; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8, slots: &[MmioSlot]) -> Result<u64, AcpiError> {
    let (rsdp, image) = build_tables(ACPI_START, cpus, slots);
    if image.len() as u64 > ACPI_END - ACPI_START {
        return Err(AcpiError::TooLarge(image.len() as u64));
    }
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(AcpiError::GuestMemory)?;
    Ok(rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(image: &[u8], base: u64, addr: u64) -> &[u8] {
        let off = crate::cast::usize_from(addr - base);
        let len = u32::from_le_bytes(image[off + 4..off + 8].try_into().unwrap()) as usize;
        &image[off..off + len]
    }

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_link_up_and_checksum() {
        let base = 0xe0000;
        let slots = [
            MmioSlot {
                addr: 0xd000_0000,
                irq: 5,
            },
            MmioSlot {
                addr: 0xd000_1000,
                irq: 6,
            },
        ];
        let (rsdp, image) = build_tables(base, 4, &slots);
        assert_eq!(rsdp, base);
        assert_eq!(&image[0..8], b"RSD PTR ");
        assert!(checksum_ok(&image[0..20]));
        assert!(checksum_ok(&image[0..36]));
        let xsdt_addr = u64::from_le_bytes(image[24..32].try_into().unwrap());
        let xsdt = table_at(&image, base, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&image, base, entries[0]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(checksum_ok(fadt));
        // Flags: HW_REDUCED_ACPI (bit 20) and RESET_REG_SUP (bit 10).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // X_DSDT at offset 140.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&image, base, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        let lnro = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(lnro, 2);
        // The keyboard: PNP0303 as an EISA id (0x41d0_0303 -> 41 d0 03 03),
        // ports 0x60 and 0x64 (I/O descriptors 47 01 min max align len) and
        // the extended interrupt descriptor of IRQ 1 (89 06 00 flags 01 irq).
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x03, 0x03]));
        assert!(dsdt
            .windows(8)
            .any(|w| w == [0x47, 1, 0x60, 0, 0x60, 0, 1, 1]));
        assert!(dsdt
            .windows(8)
            .any(|w| w == [0x47, 1, 0x64, 0, 0x64, 0, 1, 1]));
        assert!(dsdt
            .windows(9)
            .any(|w| w[..3] == [0x89, 6, 0] && w[4..] == [1, 1, 0, 0, 0]));
        // SLEEP_CONTROL_REG at offset 244: System I/O, our port.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            SLEEP_CONTROL_PORT as u64
        );
        let madt = table_at(&image, base, entries[1]);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(checksum_ok(madt));
        // 44-byte header, 4 LAPICs of 8 bytes, 1 IOAPIC of 12.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
    }
}
