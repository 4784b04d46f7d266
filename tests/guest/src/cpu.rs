//! CPUID, MSRs and the memory-type set-up the firmware may have skipped.

use core::arch::asm;
use core::arch::x86_64::__cpuid;

/// CPUID `leaf` (sub-leaf 0) as (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    // cpuid is unprivileged and every x86-64 CPU has it.
    let r = __cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist, or the CPU raises #GP.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches that the MSR exists; rdmsr touches no memory.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist (or the CPU raises #GP) and the write must not break
/// memory safety.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags));
    }
}

const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MEMORY_TYPE_WB: u64 = 6;

/// Makes RAM write-back if the MTRRs are off.
///
/// With MTRRs disabled every access is uncached. QEMU's microvm firmware
/// (qboot) leaves them so on a PVH boot, and uncached RAM made hashing run at
/// about 20 KB/s. Default type WB with no variable ranges is right for RAM;
/// the device windows stay uncached through PCD|PWT in the page tables
/// (PAT entry 3 is UC, and UC in the PAT wins over WB in the MTRRs).
/// Returns whether it changed anything.
pub fn enable_write_back() -> bool {
    let (_, _, _, edx) = cpuid(1);
    if edx & (1 << 12) == 0 {
        return false; // no MTRRs: nothing to enable, nothing to fix
    }
    // SAFETY: CPUID says MTRRs, hence IA32_MTRR_DEF_TYPE, exist.
    let def = unsafe { rdmsr(IA32_MTRR_DEF_TYPE) };
    if def & MTRR_ENABLE != 0 {
        return false;
    }
    // SAFETY: as above; changing RAM from UC to WB on the only CPU, with no
    // device caching anything of ours, keeps memory coherent (DMA under
    // KVM is coherent with the CPU caches).
    unsafe { wrmsr(IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MEMORY_TYPE_WB) };
    true
}
