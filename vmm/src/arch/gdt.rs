//! A flat GDT for the boot vCPU, in the encoding the CPU reads.

/// A segment descriptor from its flags, base and limit (Intel SDM 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Null, 64-bit code, data, TSS (selectors 0x0, 0x8, 0x10, 0x18).
pub const GDT_64: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Null, 32-bit code, data, TSS: the PVH entry runs in 32-bit protected
/// mode with flat segments.
pub const GDT_32: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// The KVM segment register matching a descriptor at `table_index`.
pub fn kvm_segment(entry: u64, table_index: u8) -> kvm_bindings::kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    #[allow(
        clippy::cast_possible_truncation,
        reason = "masked to the 20 bits of a descriptor's limit"
    )]
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        // Granularity in 4 KiB pages: KVM wants the limit in bytes.
        limit = (limit << 12) | 0xfff;
    }
    kvm_bindings::kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_present() {
        let s = kvm_segment(GDT_64[1], 1);
        assert_eq!(s.selector, 8);
        assert_eq!((s.l, s.present, s.type_, s.s), (1, 1, 0xb, 1));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn code32_segment_is_flat_4g() {
        let s = kvm_segment(GDT_32[1], 1);
        assert_eq!((s.base, s.limit, s.db, s.l), (0, 0xffff_ffff, 1, 0));
        let d = kvm_segment(GDT_32[2], 2);
        assert_eq!((d.type_, d.selector), (3, 16));
    }

    #[test]
    fn known_encoding_matches_firecracker_layout() {
        // 64-bit code segment as every Linux direct-boot VMM encodes it.
        assert_eq!(GDT_64[1], 0x00af_9b00_0000_ffff);
    }
}
