//! Debian's cloud kernel (uncompressed vmlinux, PVH entry) boots far enough
//! to show, in its own log, that it read our command line, our E820 map,
//! our ACPI tables (RSDP, XSDT, FACP, DSDT, APIC), our IOAPIC and every
//! LAPIC. Then the host stops it.
//!
//! The machines here run nested KVM without EPT: Linux gets this far in
//! seconds and then crawls and faults, so the test stops at the line it
//! needs and never waits for a full boot.

mod support;

use std::time::{Duration, Instant};

use cocoon_vmm::acpi::{build_tables, MmioSlot};
use cocoon_vmm::builder::full_cmdline;
use cocoon_vmm::memory::{virtio_mmio_slot, ACPI_START};
use cocoon_vmm::{DiskConfig, ExitReason, SerialOutput, Vm, VmConfig};
use support::{fetch_linux, kvm_or_skip, require_kvm};

const CPUS: u8 = 3;
const MEMORY: u64 = 512 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);
/// The last line we need: the CPU count from the MADT's LAPICs.
const LAST_LINE: &str = "smpboot: Allowing 3 CPUs, 0 hotplug CPUs";

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Table addresses as our builder lays them out: (XSDT, FACP, APIC, DSDT).
fn table_addresses(slots: &[MmioSlot]) -> (u64, u64, u64, u64) {
    let (rsdp, image) = build_tables(ACPI_START, CPUS, slots);
    let at = |addr: u64| cocoon_vmm::cast::usize_from(addr - ACPI_START);
    let xsdt = u64_at(&image, at(rsdp) + 24);
    let facp = u64_at(&image, at(xsdt) + 36);
    let apic = u64_at(&image, at(xsdt) + 44);
    let dsdt = u64_at(&image, at(facp) + 140);
    (xsdt, facp, apic, dsdt)
}

#[test]
fn linux_reads_our_cmdline_e820_acpi_ioapic_and_lapics() {
    if !kvm_or_skip("Linux early boot") {
        return;
    }
    let vmlinux = match fetch_linux() {
        Ok(p) => p,
        Err(e) if !require_kvm() => {
            support::skip("Linux early boot", &e.to_string());
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let log = dir.path().join("serial.log");
    let user_cmdline = "earlyprintk=serial,ttyS0 console=ttyS0 cocoon.test=linux-early";
    let mut config = VmConfig::new(&vmlinux);
    config.cpus = CPUS;
    config.memory = MEMORY;
    config.cmdline = user_cmdline.into();
    config.disks.push(DiskConfig::new(&disk));
    config.serial = SerialOutput::File(log.clone());

    let mut vm = Vm::start(config).expect("start Linux");
    let t0 = Instant::now();
    let mut out = String::new();
    while t0.elapsed() < TIMEOUT && vm.exit_reason().is_none() {
        out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains(LAST_LINE) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.stop();
    let reason = vm.wait();
    out = std::fs::read_to_string(&log).unwrap_or(out);
    assert_eq!(reason, ExitReason::HostRequest, "kernel log:\n{out}");

    let has = |needle: &str| {
        assert!(out.contains(needle), "kernel log lacks {needle:?}:\n{out}");
    };
    has("Linux version 6.");
    let (addr, irq) = virtio_mmio_slot(0);
    let slots = [MmioSlot { addr, irq }];
    has(&format!(
        "Command line: {}",
        full_cmdline(user_cmdline, &slots)
    ));
    // The RAM entries of our E820 map, as the kernel echoes them.
    has("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable");
    has(&format!(
        "BIOS-e820: [mem 0x0000000000100000-{:#018x}] usable",
        MEMORY - 1
    ));
    // Our ACPI tables, at the addresses we put them, with our OEM IDs.
    let (xsdt, facp, apic, dsdt) = table_addresses(&slots);
    has(&format!(
        "ACPI: RSDP 0x{ACPI_START:016X} 000024 (v02 COCOON)"
    ));
    has(&format!(
        "ACPI: XSDT 0x{xsdt:016X} 000034 (v01 COCOON COCOONVM 00000001"
    ));
    has(&format!(
        "ACPI: FACP 0x{facp:016X} 000114 (v06 COCOON COCOONVM 00000001"
    ));
    has(&format!("ACPI: DSDT 0x{dsdt:016X}"));
    // MADT: 44-byte header, one 8-byte LAPIC entry per vCPU, one IOAPIC.
    let madt_len = 44 + 8 * usize::from(CPUS) + 12;
    has(&format!(
        "ACPI: APIC 0x{apic:016X} {madt_len:06X} (v01 COCOON COCOONVM 00000001"
    ));
    has("IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23");
    has("ACPI: Using ACPI (MADT) for SMP configuration information");
    // Every LAPIC of the MADT became a possible CPU.
    has(LAST_LINE);
}
