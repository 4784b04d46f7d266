//! x86_64 vCPU set-up: CPUID, MSRs, registers and the boot GDT.

pub mod cpuid;
pub mod gdt;
pub mod msrs;
pub mod regs;
