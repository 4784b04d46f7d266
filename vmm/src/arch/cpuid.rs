//! The guest's CPUID: what KVM supports, plus topology, APIC IDs and the
//! hypervisor bit.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const ECX_TSC_DEADLINE_BIT: u32 = 1 << 24;
const EDX_HTT_BIT: u32 = 1 << 28;

/// Topology level types of leaves 0xb/0x1f.
const LEVEL_TYPE_THREAD: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Adjusts `cpuid` for vCPU `index` of `count`: one socket, one thread per
/// core, APIC ID = index.
pub fn patch_cpuid(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    let count = u32::from(count.max(1));
    let index = u32::from(index);
    // Bits needed to hold `count` core IDs in the x2APIC ID.
    let core_shift = u32::BITS - (count - 1).leading_zeros();
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ecx |= ECX_HYPERVISOR_BIT;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE_BIT;
                }
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (index << 24) | (count << 16);
                if count > 1 {
                    entry.edx |= EDX_HTT_BIT;
                } else {
                    entry.edx &= !EDX_HTT_BIT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. Caches shared by all
                // cores (EAX[25:14]) follow the same count for L3.
                entry.eax &= 0x03ff_ffff;
                entry.eax |= (count - 1) << 26;
                let level = (entry.eax >> 5) & 0x7;
                entry.eax &= !(0xfff << 14);
                if level >= 3 {
                    entry.eax |= (count - 1) << 14;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = index;
                match entry.index {
                    0 => {
                        // Thread level: one thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = LEVEL_TYPE_THREAD << 8;
                    }
                    1 => {
                        entry.eax = core_shift;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_beef,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_count_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        patch_cpuid(&mut c, 3, 4, false);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xbeef);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
    }
}
