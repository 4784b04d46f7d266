//! Entry register state of the boot vCPU, for the two boot protocols.

use kvm_bindings::{kvm_fpu, kvm_regs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{kvm_segment, GDT_32, GDT_64};
use crate::memory::{BOOT_STACK_POINTER, GDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, identity-mapped first GiB,
    /// RSI = zero page.
    Linux64 { entry: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT or page tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("KVM rejected the {0} state")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// Writes the GDT (and page tables for long mode) and sets registers.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("sregs", e))?;
    let gdt: &[u64; 4] = match mode {
        EntryMode::Linux64 { .. } => &GDT_64,
        EntryMode::Pvh { .. } => &GDT_32,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit =
        u16::try_from(std::mem::size_of_val(gdt) - 1).expect("a GDT of a few entries");
    // No IDT: the kernel installs its own before enabling interrupts.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = kvm_segment(gdt[1], 1);
    let data = kvm_segment(gdt[2], 2);
    let tss = kvm_segment(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 { entry, zero_page } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        EntryMode::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("sregs", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("regs", e))?;
    Ok(())
}

/// FPU state every vCPU starts with (x87 control word and MXCSR defaults).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("fpu", e))
}

/// Local APIC LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(|e| RegsError::Kvm("lapic", e))?;
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("lapic", e))
}

/// Identity-maps the first GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(RegsError::GuestMemory)
    };
    w(PDPTE_ADDR | 0x03, PML4_ADDR)?;
    w(PDE_ADDR | 0x03, PDPTE_ADDR)?;
    for i in 0..512u64 {
        // Present, writable, page size (2 MiB).
        w((i << 21) | 0x83, PDE_ADDR + i * 8)?;
    }
    Ok(())
}
