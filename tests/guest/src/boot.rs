//! PVH entry: from 32-bit protected mode with paging off to 64-bit Rust.
//!
//! The PVH boot protocol (used by QEMU's microvm through qboot and by our VMM)
//! enters at the address in the XEN_ELFNOTE_PHYS32_ENTRY note with flat 4 GiB
//! segments, paging and interrupts off, and %ebx holding the physical address
//! of `struct hvm_start_info`. The trampoline below loads its own GDT, LDT and
//! TR, zeroes .bss, points CR3 at identity page tables for the first 4 GiB
//! with 2 MiB pages (data in the image; the virtio-mmio windows live just
//! below 4 GiB), enables SSE
//! (sha2 may pick SHA-NI at run time), turns on long mode and calls
//! `rust_main` with the hvm_start_info address.
//!
//! The tables are written once and never touched again (with accessed and
//! dirty bits preset, so the CPU never writes them either): page-table writes
//! are expensive under shadow paging. Every instruction here also costs: the
//! test machines' KVM emulates this guest instruction by instruction (about
//! 1 µs each), so the code before the first serial line stays short.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz: QEMU reads a 64-bit address on ELF64 */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    .section .text.pvh_start, "ax", @progbits
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    /* %ebx (hvm_start_info) survives everything below except the final move. */

    /* First make the segment state fully valid: our own GDT with accessed
       bits set, every segment register reloaded, a null LDT and a busy TSS
       in TR. VMX without unrestricted-guest (no EPT, as in nested set-ups)
       checks all of these and falls back to emulating the guest when one is
       off, and the PVH spec leaves TR to the loader. */
    lgdt boot_gdt_ptr
    ljmp $0x18, $1f
1:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    xorl %eax, %eax
    lldt %ax
    /* TSS descriptor at GDT offset 0x20: base boot_tss, limit 0x67, present,
       type 9 (available; ltr marks it busy). The base is split into fields
       here because the assembler cannot shift a relocated address. */
    movl $boot_tss, %edx
    movl %edx, %eax
    shll $16, %eax
    orl $0x67, %eax
    movl %eax, boot_gdt + 0x20
    movl %edx, %eax
    andl $0xff000000, %eax
    movl %edx, %ecx
    shrl $16, %ecx
    andl $0xff, %ecx
    orl %ecx, %eax
    orl $0x8900, %eax
    movl %eax, boot_gdt + 0x24
    movw $0x20, %ax
    ltr %ax

    /* Zero .bss. It is kept small: the big buffers and the stack are in
       .noinit, because under instruction emulation every iteration of a
       string instruction costs, and this runs before the first serial line.
       Four bytes at a time, the linker script aligns both ends to 16. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* The page tables are data in the image (below), not built here: a
       nested KVM without EPT or NPT emulates this 32-bit code instruction by
       instruction (about 1 us each), and the loops that filled 2048 entries
       were 9,800 of them, 7 ms of every boot before its first line. */

    /* CR4: PAE, OSFXSR, OSXMMEXCPT. */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr

    /* CR0: PG, MP, PE on; EM, TS off (SSE must not trap); CD, NW off: the
       reset value has caching disabled, and PVH does not say the loader
       turns it on; left so, every access would be uncached. */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3) | (1 << 29) | (1 << 30)), %eax
    orl $((1 << 31) | (1 << 1) | 1), %eax
    movl %eax, %cr0

    ljmp $0x08, $pvh_long_mode

    .code64
pvh_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %ebx, %edi             /* zero-extends: hvm_start_info paddr */
    xorl %ebp, %ebp
    call rust_main
4:
    ud2
    jmp 4b

    /* Writable: the CPU sets the TSS busy bit in it. */
    .section .data.boot_gdt, "aw", @progbits
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code, accessed */
    .quad 0x00cf93000000ffff    /* 0x10: flat data, accessed */
    .quad 0x00cf9b000000ffff    /* 0x18: flat 32-bit code, accessed */
    .quad 0, 0                  /* 0x20: 64-bit TSS, filled in at entry */
boot_gdt_end:
    .balign 8
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    /* Identity page tables for 0 .. 4 GiB in 2 MiB pages, present,
       writable, accessed (and the pages dirty), so the CPU never writes
       them: page-table writes are expensive under shadow paging. Page-sized
       and page-aligned in a section of their own, so no other data shares
       their pages (a write there would be trapped as a page-table write). */
    .section .data.boot_page_tables, "aw", @progbits
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x23
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x23
    .quad boot_pd + 0x1000 + 0x23
    .quad boot_pd + 0x2000 + 0x23
    .quad boot_pd + 0x3000 + 0x23
    .fill 508, 8, 0
boot_pd:
    /* 0 .. 3 GiB: RAM. */
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0xe3
    .set page, page + 1
    .endr
    /* The top GiB (device windows, LAPIC, IOAPIC) uncached: PWT | PCD. */
    .rept 512
    .quad (page << 21) | 0xfb
    .set page, page + 1
    .endr

    .section .bss.boot, "aw", @nobits
    .balign 16
boot_tss:
    .skip 0x68

    /* Not zeroed: a stack needs no initial value. */
    .section .noinit.boot_stack, "aw", @nobits
    .balign 4096
boot_stack:
    .skip 0x40000
boot_stack_top:

    .text
"#,
    options(att_syntax)
);

/// `struct hvm_start_info` from Xen's public/arch-x86/hvm/start_info.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;

/// The longest command line we look at; Linux's x86 limit is 2048, ours is
/// generous so that eight disks with several actions each still fit.
pub const CMDLINE_MAX: usize = 4096;

/// What the guest takes from `hvm_start_info`.
pub struct StartInfo {
    pub cmdline: &'static [u8],
    pub rsdp_paddr: u64,
}

/// Identity mapping ends here; anything the loader points at must be below.
const MAPPED_END: u64 = 1 << 32;

/// Reads hvm_start_info at `paddr`.
///
/// # Safety
/// `paddr` must be the value the loader passed in %ebx, and memory below
/// 4 GiB must be identity mapped (the trampoline did that).
pub unsafe fn read_start_info(paddr: u64) -> Result<StartInfo, &'static str> {
    if paddr == 0 || paddr + size_of::<HvmStartInfo>() as u64 > MAPPED_END {
        return Err("hvm_start_info address out of range");
    }
    // SAFETY: the loader placed hvm_start_info at `paddr` in guest RAM, which
    // is identity mapped; read_unaligned because nothing guarantees alignment.
    let info = unsafe { core::ptr::read_unaligned(paddr as *const HvmStartInfo) };
    if info.magic != HVM_START_MAGIC {
        return Err("hvm_start_info has a bad magic");
    }
    let cmdline = if info.cmdline_paddr == 0 || info.cmdline_paddr >= MAPPED_END {
        &[][..]
    } else {
        let max = CMDLINE_MAX.min((MAPPED_END - info.cmdline_paddr) as usize);
        let base = info.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: the loader put a NUL-terminated string at cmdline_paddr in
        // guest RAM; we read at most `max` bytes, all below 4 GiB (mapped),
        // and nothing writes that memory while the guest runs.
        while len < max && unsafe { base.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: the `len` bytes just read are initialised guest RAM that
        // stays untouched for the rest of the run.
        unsafe { core::slice::from_raw_parts(base, len) }
    };
    Ok(StartInfo {
        cmdline,
        rsdp_paddr: info.rsdp_paddr,
    })
}
