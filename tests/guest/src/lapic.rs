//! The local APIC timer, so that waits halt the CPU instead of spinning:
//! an idle guest then costs its host nothing, as an idle Linux does.
//!
//! The timer runs in TSC-deadline mode when CPUID.1:ECX[24] offers it (our
//! VMM on KVM, QEMU with KVM), else in one-shot mode with its rate measured
//! against the TSC (QEMU's TCG). The APIC is driven through the x2APIC MSRs
//! when CPUID.1:ECX[21] offers them (KVM always emulates them), else through
//! the xAPIC page, which the trampoline maps uncached with the rest of the
//! top GiB. Interrupts stay off except inside [`halt_until`]'s `sti; hlt`.
//! Besides the timer only the input devices' IOAPIC pins are unmasked
//! ([`route_input`]), so that host input ends a halt at once; LINT0 (the
//! 8259's ExtINT) is masked, and the IOAPIC's other pins stay masked from
//! reset.

use crate::cpu::{cpuid, rdmsr, wrmsr};
use crate::tsc;
use core::arch::asm;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// The vector of the timer's interrupt: the first one not reserved for
/// exceptions.
pub const TIMER_VECTOR: u8 = 0x20;
/// The vector the IOAPIC delivers the input devices' interrupts at: they
/// only wake a halt, the next look at the inputs reads them.
pub const INPUT_VECTOR: u8 = 0x21;
/// The vector of the APIC's spurious interrupt (no EOI for it).
pub const SPURIOUS_VECTOR: u8 = 0x2f;

/// The IOAPIC, where our VMM and QEMU's microvm both put it (MADT says so
/// too; this guest reads no ACPI tables), in the uncached top GiB.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WINDOW: u64 = 0x10;
const IOAPIC_VERSION: u32 = 0x01;
const IOAPIC_REDIRECTION: u32 = 0x10;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// x2APIC register MSRs: 0x800 + the xAPIC offset / 16.
const X2APIC_MSR_BASE: u32 = 0x800;

/// xAPIC register offsets.
const REG_ID: u32 = 0x20;
pub(crate) const REG_EOI: u32 = 0xb0;
/// The x2APIC EOI register's MSR.
pub(crate) const X2APIC_EOI_MSR: u32 = X2APIC_MSR_BASE + REG_EOI / 16;
const REG_SVR: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT0: u32 = 0x350;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const SVR_APIC_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_ONE_SHOT: u32 = 0b00 << 17;
const LVT_TIMER_TSC_DEADLINE: u32 = 0b10 << 17;
/// Divide configuration 0b1011: the timer counts at the bus rate.
const TIMER_DIVIDE_BY_1: u32 = 0b1011;

/// How long the one-shot timer's rate is measured against the TSC.
const CALIBRATE_MS: u64 = 10;

/// How the guest waits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No usable APIC timer: waits spin on the TSC.
    Spin = 0,
    /// Halts until the TSC-deadline timer fires.
    Deadline = 1,
    /// Halts until the one-shot timer, counting at a rate measured against
    /// the TSC, fires.
    OneShot = 2,
}

impl Mode {
    /// What the `tsc` report line says of it (`idle=`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Spin => "spin",
            Mode::Deadline => "hlt-tsc-deadline",
            Mode::OneShot => "hlt-one-shot",
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Spin as u8);
/// The xAPIC page's address, or 0 in x2APIC mode. The timer's interrupt
/// handler (traps.rs) writes its EOI through this: to the page when it is
/// non-zero, else to the x2APIC EOI MSR.
pub(crate) static LAPIC_XAPIC_BASE: AtomicU64 = AtomicU64::new(0);
/// One-shot mode: timer counts per TSC tick, as a 32.32 fixed-point ratio.
static COUNTS_PER_TICK: AtomicU64 = AtomicU64::new(0);

fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Deadline,
        2 => Mode::OneShot,
        _ => Mode::Spin,
    }
}

/// Reads an APIC register (xAPIC offset `reg`).
fn read(reg: u32) -> u32 {
    let base = LAPIC_XAPIC_BASE.load(Ordering::Relaxed);
    if base == 0 {
        // SAFETY: `init` only leaves the base at 0 after switching the APIC
        // to x2APIC mode, where every register used here is an MSR.
        unsafe { rdmsr(X2APIC_MSR_BASE + reg / 16) as u32 }
    } else {
        // SAFETY: `init` set the base from IA32_APIC_BASE and checked that it
        // lies in the identity-mapped, uncached top GiB; `reg` is one of the
        // register offsets above, inside the 4 KiB page.
        unsafe { ((base + u64::from(reg)) as *const u32).read_volatile() }
    }
}

/// Writes an APIC register (xAPIC offset `reg`).
fn write(reg: u32, value: u32) {
    let base = LAPIC_XAPIC_BASE.load(Ordering::Relaxed);
    if base == 0 {
        // SAFETY: as in `read`; these registers touch no memory of ours.
        unsafe { wrmsr(X2APIC_MSR_BASE + reg / 16, u64::from(value)) }
    } else {
        // SAFETY: as in `read`.
        unsafe { ((base + u64::from(reg)) as *mut u32).write_volatile(value) }
    }
}

/// Finds and enables the local APIC and picks how waits halt. Call once,
/// after traps::install (the vectors' gates must exist) and after
/// tsc::calibrate (one-shot mode measures against the TSC).
pub fn init() -> Mode {
    let mode = setup().unwrap_or(Mode::Spin);
    MODE.store(mode as u8, Ordering::Relaxed);
    mode
}

fn setup() -> Option<Mode> {
    let (_, _, ecx, edx) = cpuid(1);
    if edx & (1 << 9) == 0 {
        return None; // no local APIC
    }
    let x2apic = ecx & (1 << 21) != 0;
    let deadline = ecx & (1 << 24) != 0;
    // SAFETY: CPUID says there is an APIC, hence IA32_APIC_BASE.
    let mut apic_base = unsafe { rdmsr(IA32_APIC_BASE) };
    if apic_base & APIC_BASE_ENABLE == 0 {
        apic_base |= APIC_BASE_ENABLE;
        // SAFETY: enabling the APIC at the address it already has; nothing
        // is mapped there but the APIC (it is in the device window).
        unsafe { wrmsr(IA32_APIC_BASE, apic_base) };
    }
    if x2apic {
        if apic_base & APIC_BASE_X2APIC == 0 {
            // SAFETY: CPUID offers x2APIC mode, and the APIC is enabled: the
            // xAPIC -> x2APIC transition is the architectural one.
            unsafe { wrmsr(IA32_APIC_BASE, apic_base | APIC_BASE_X2APIC) };
        }
        LAPIC_XAPIC_BASE.store(0, Ordering::Relaxed);
    } else {
        let addr = apic_base & APIC_BASE_ADDR_MASK;
        // The trampoline maps 3..4 GiB uncached; the APIC page must be there.
        if !(0xc000_0000..0x1_0000_0000 - 0x1000).contains(&addr) {
            return None;
        }
        LAPIC_XAPIC_BASE.store(addr, Ordering::Relaxed);
    }
    // Software-enable the APIC (which unmasks nothing by itself), mask the
    // 8259's ExtINT path, which this guest never serves.
    write(REG_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_LVT_LINT0, read(REG_LVT_LINT0) | LVT_MASKED);
    if deadline {
        write(
            REG_LVT_TIMER,
            LVT_TIMER_TSC_DEADLINE | u32::from(TIMER_VECTOR),
        );
        // SDM 10.5.4.1: the LVT write must be done before the first deadline
        // write, which an MFENCE between them guarantees.
        // SAFETY: mfence only orders memory accesses.
        unsafe { asm!("mfence", options(nostack, preserves_flags)) };
        return Some(Mode::Deadline);
    }
    let khz = tsc::khz()?;
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    write(
        REG_LVT_TIMER,
        LVT_MASKED | LVT_TIMER_ONE_SHOT | u32::from(TIMER_VECTOR),
    );
    // The timer's rate against the TSC's: count down from the top for
    // CALIBRATE_MS by the TSC.
    write(REG_TIMER_INITIAL, u32::MAX);
    let t0 = tsc::now();
    let c0 = read(REG_TIMER_CURRENT);
    let until = t0 + khz * CALIBRATE_MS;
    while tsc::now() < until {
        core::hint::spin_loop();
    }
    let c1 = read(REG_TIMER_CURRENT);
    let t1 = tsc::now();
    write(REG_TIMER_INITIAL, 0);
    let counts = u64::from(c0.checked_sub(c1)?);
    let ticks = t1 - t0;
    if counts == 0 || c1 == 0 || ticks == 0 {
        return None; // a timer that does not count, or ran out: unusable
    }
    let ratio = (u128::from(counts) << 32) / u128::from(ticks);
    COUNTS_PER_TICK.store(u64::try_from(ratio).ok()?.max(1), Ordering::Relaxed);
    write(REG_LVT_TIMER, LVT_TIMER_ONE_SHOT | u32::from(TIMER_VECTOR));
    Some(Mode::OneShot)
}

/// Halts until the TSC reaches `until` or an input interrupt comes,
/// whichever is first, waking by the timer. Returns false, having waited not
/// at all, when there is no APIC timer to wake it (the caller spins then).
/// Returns true at once when `until` has passed; a wake-up early (an input
/// interrupt, or a one-shot timer whose rate was measured a little fast)
/// returns true too: the caller looks at the TSC and halts again.
pub fn halt_until(until: u64) -> bool {
    let mode = mode();
    if mode == Mode::Spin {
        return false;
    }
    let now = tsc::now();
    if now >= until {
        return true;
    }
    match mode {
        // SAFETY: `init` found the TSC-deadline timer (CPUID.1:ECX[24]) and
        // put the LVT in its mode; the MSR only arms the timer.
        Mode::Deadline => unsafe { wrmsr(IA32_TSC_DEADLINE, until) },
        _ => {
            let ratio = u128::from(COUNTS_PER_TICK.load(Ordering::Relaxed));
            let counts = (u128::from(until - now) * ratio) >> 32;
            write(
                REG_TIMER_INITIAL,
                counts.clamp(1, u128::from(u32::MAX)) as u32,
            );
        }
    }
    // Interrupts are off here, so one that comes before the hlt stays
    // pending; sti enables them only after the next instruction, so the
    // pending interrupt ends that hlt instead of slipping in before it. The
    // handler EOIs and returns after the hlt; cli closes the window again
    // before the caller looks at the TSC or the inputs.
    // SAFETY: the IDT has gates for every vector the APIC and IOAPIC are set
    // to deliver (traps::install), and their handlers preserve every
    // register.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    true
}

/// This CPU's APIC ID, as the IOAPIC's physical destination field takes it.
fn apic_id() -> u32 {
    if LAPIC_XAPIC_BASE.load(Ordering::Relaxed) == 0 {
        read(REG_ID) // x2APIC: the whole register is the ID
    } else {
        read(REG_ID) >> 24
    }
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC's two registers are in the identity-mapped,
    // uncached top GiB; selecting and reading one touches no RAM.
    unsafe {
        ((IOAPIC_BASE + IOAPIC_REGSEL) as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + IOAPIC_WINDOW) as *const u32).read_volatile()
    }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: as in `ioapic_read`.
    unsafe {
        ((IOAPIC_BASE + IOAPIC_REGSEL) as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + IOAPIC_WINDOW) as *mut u32).write_volatile(value);
    }
}

/// Routes the IOAPIC's `pins` (ISA IRQs, identity-mapped to pins on both
/// VMMs) to [`INPUT_VECTOR`] on this CPU: fixed delivery, physical
/// destination, edge-triggered, active high. Returns false, routing none,
/// when halts have no timer (the guest spins then and interrupts stay off),
/// when no IOAPIC answers, or when it has too few pins.
pub fn route_input(pins: &[u8]) -> bool {
    if mode() == Mode::Spin {
        return false;
    }
    let version = ioapic_read(IOAPIC_VERSION);
    let max_entry = (version >> 16) & 0xff;
    if version == u32::MAX || version & 0xff == 0 {
        return false; // nothing there: reads of no device give all ones or 0
    }
    let id = apic_id();
    if id > 0xff || pins.iter().any(|&p| u32::from(p) > max_entry) {
        return false;
    }
    for &pin in pins {
        let reg = IOAPIC_REDIRECTION + 2 * u32::from(pin);
        ioapic_write(reg + 1, id << 24);
        ioapic_write(reg, u32::from(INPUT_VECTOR));
    }
    true
}
