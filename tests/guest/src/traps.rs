//! CPU exceptions: print which one and power off, instead of the silent
//! reset a triple fault would give. Also the interrupts the guest takes,
//! only ever while it halts (lapic.rs): the local APIC timer's and the input
//! devices' (through the IOAPIC), which just signal end-of-interrupt and
//! return (ending the `hlt`), and the APIC's spurious one, which returns.
//! Any other vector up to 47 is reported as an exception would be: nothing
//! should raise one.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

global_asm!(
    r#"
    .section .text.traps, "ax", @progbits
    .code64
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,34,35,36,37,38,39,40,41,42,43,44,45,46
trap_stub_\n:
    pushq $\n
    jmp trap_common
    .endr

/* The timer's and the inputs' interrupts: they only end a hlt. EOI, to
   the xAPIC page when LAPIC_XAPIC_BASE holds its address, else to the
   x2APIC EOI MSR; every register it uses is saved, and iretq restores
   RFLAGS. No red zone to step over: the target has none. */
lapic_eoi_stub:
    pushq %rax
    pushq %rcx
    pushq %rdx
    movq {xapic_base}(%rip), %rax
    testq %rax, %rax
    jz 1f
    movl $0, {eoi}(%rax)
    jmp 2f
1:
    movl ${eoi_msr}, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
2:
    popq %rdx
    popq %rcx
    popq %rax
    iretq

/* A spurious interrupt takes no EOI. */
lapic_spurious_stub:
    iretq

trap_common:
    /* Stack: vector, then (for some vectors) an error code, then RIP. Rust
       sorts out which: the handler never returns, so the frame is only read. */
    movq 0(%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    andq $-16, %rsp
    call rust_trap
1:
    ud2
    jmp 1b

    .section .rodata.trap_stubs, "a", @progbits
    .balign 8
    .global trap_stubs
trap_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_stub_\n
    .endr
    .quad lapic_eoi_stub        /* 32: lapic::TIMER_VECTOR */
    .quad lapic_eoi_stub        /* 33: lapic::INPUT_VECTOR */
    .irp n, 34,35,36,37,38,39,40,41,42,43,44,45,46
    .quad trap_stub_\n
    .endr
    .quad lapic_spurious_stub   /* 47: lapic::SPURIOUS_VECTOR */
    .text
"#,
    xapic_base = sym crate::lapic::LAPIC_XAPIC_BASE,
    eoi = const crate::lapic::REG_EOI,
    eoi_msr = const crate::lapic::X2APIC_EOI_MSR,
    options(att_syntax)
);

/// Vectors with a gate: the exceptions, then the timer's, the inputs' and
/// more up to the spurious vector.
const VECTORS: usize = crate::lapic::SPURIOUS_VECTOR as usize + 1;

// SAFETY: the global_asm above defines `trap_stubs` as 48 quads in .rodata.
unsafe extern "C" {
    /// The 48 handler addresses laid out above.
    static trap_stubs: [u64; VECTORS];
}

const _: () =
    assert!(VECTORS == 48 && crate::lapic::TIMER_VECTOR == 32 && crate::lapic::INPUT_VECTOR == 33);

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 2 * VECTORS]>);

// SAFETY: written once by `install`, before anything can fault into it, and
// only read by the CPU afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; 2 * VECTORS]));

/// Points vectors 0..48 at the stubs and handlers.
pub fn install() {
    // SAFETY: `trap_stubs` is an initialised table in .rodata (above).
    let stubs = unsafe { &trap_stubs };
    // SAFETY: single-threaded, and the CPU does not use this IDT until the
    // lidt below, so nothing else reads or writes it now.
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, &stub) in stubs.iter().enumerate() {
        // 64-bit interrupt gate: selector 0x08 (our code segment), present,
        // DPL 0, type 0xe.
        let low = (stub & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((stub >> 16) & 0xffff) << 48;
        idt[vector * 2] = low;
        idt[vector * 2 + 1] = stub >> 32;
    }
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (size_of::<[u64; 2 * VECTORS]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT above is complete, static and its gates point at code
    // that exists for the whole run.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}

/// Vectors that push an error code before RIP.
fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

// SAFETY (no_mangle): trap_common calls this name; nothing else defines it.
#[unsafe(no_mangle)]
extern "C" fn rust_trap(vector: u64, word1: u64, word2: u64) -> ! {
    let (error, rip) = if has_error_code(vector) {
        (word1, word2)
    } else {
        (0, word1)
    };
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::fatal(format_args!(
        "exception vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x}"
    ))
}
