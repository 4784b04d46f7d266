//! Time from the TSC, and where its frequency came from.

use crate::cpu::{cpuid, wrmsr};
use crate::port::{inb, outb};
use core::arch::x86_64::_rdtsc;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// The TSC frequency once known (0 before, or when nothing told us).
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Reads the TSC after earlier instructions have finished, so a measured
/// interval does not start before the work it times.
pub fn now() -> u64 {
    // SAFETY: lfence and rdtsc only order execution and read a counter;
    // every x86-64 CPU has both (SSE2 is part of the base ISA).
    unsafe {
        core::arch::x86_64::_mm_lfence();
        _rdtsc()
    }
}

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum Source {
    /// CPUID leaf 0x40000010 (EAX = TSC kHz), set by KVM-based VMMs that
    /// know the frequency (VMware's timing leaf convention).
    HypervisorLeaf,
    /// KVM's paravirtual clock (CPUID 0x40000001 KVM_FEATURE_CLOCKSOURCE2 and
    /// MSR 0x4b564d01): the multiplier and shift KVM itself uses to turn guest
    /// TSC ticks into nanoseconds.
    KvmClock,
    /// CPUID leaf 0x15: crystal frequency times the TSC/crystal ratio.
    Cpuid15,
    /// The PIT's channel 0 counting down 50 ms, read back by latching.
    Pit,
    /// CPUID leaf 0x16: the processor base frequency, a nominal value.
    Cpuid16,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::HypervisorLeaf => "cpuid-40000010",
            Source::KvmClock => "kvmclock",
            Source::Cpuid15 => "cpuid-15",
            Source::Pit => "pit",
            Source::Cpuid16 => "cpuid-16",
        }
    }
}

/// Finds the TSC frequency in kHz, best source first, and remembers it.
pub fn calibrate() -> Option<(u64, Source)> {
    let found = hypervisor_leaf()
        .map(|khz| (khz, Source::HypervisorLeaf))
        .or_else(|| kvm_clock().map(|khz| (khz, Source::KvmClock)))
        .or_else(|| cpuid_15().map(|khz| (khz, Source::Cpuid15)))
        // A host that deschedules the vCPU for longer than one PIT period
        // (55 ms, seen under QEMU's TCG on a loaded machine) makes the
        // counter wrap mid-measurement; measure again rather than give up.
        .or_else(|| {
            (0..PIT_ATTEMPTS)
                .find_map(|_| pit())
                .map(|khz| (khz, Source::Pit))
        })
        .or_else(|| cpuid_16().map(|khz| (khz, Source::Cpuid16)));
    if let Some((khz, _)) = found {
        TSC_KHZ.store(khz, Ordering::Relaxed);
    }
    found
}

/// The remembered TSC frequency in kHz, if any.
pub fn khz() -> Option<u64> {
    Some(TSC_KHZ.load(Ordering::Relaxed)).filter(|&k| k != 0)
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64, khz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(khz.max(1))) as u64
}

/// Waits about `ms` milliseconds. With no known frequency it assumes
/// 3 GHz: the waits are only grace periods, and counting loop iterations
/// instead would take minutes under instruction emulation.
pub fn delay_ms(ms: u64) {
    let khz = khz().unwrap_or(3_000_000);
    wait_until(now().saturating_add(khz.saturating_mul(ms)));
}

/// Waits until the TSC reaches `until`: halted until the local APIC timer
/// says so once `lapic::init` found one, else busy.
pub fn wait_until(until: u64) {
    while now() < until {
        if !crate::lapic::halt_until(until) {
            core::hint::spin_loop();
        }
    }
}

fn hypervisor_leaf() -> Option<u64> {
    let (_, _, ecx, _) = cpuid(1);
    if ecx & (1 << 31) == 0 {
        return None; // no hypervisor: the 0x4000_0000 range is not ours
    }
    let (max, ..) = cpuid(0x4000_0000);
    if !(0x4000_0010..0x5000_0000).contains(&max) {
        return None;
    }
    let (khz, ..) = cpuid(0x4000_0010);
    Some(u64::from(khz)).filter(|&k| k != 0)
}

fn cpuid_15() -> Option<u64> {
    let (max, ..) = cpuid(0);
    if max < 0x15 {
        return None;
    }
    let (denominator, numerator, crystal_hz, _) = cpuid(0x15);
    if denominator == 0 || numerator == 0 || crystal_hz == 0 {
        return None;
    }
    Some(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000)
        .filter(|&k| k != 0)
}

fn cpuid_16() -> Option<u64> {
    let (max, ..) = cpuid(0);
    if max < 0x16 {
        return None;
    }
    let (mhz, ..) = cpuid(0x16);
    Some(u64::from(mhz & 0xffff) * 1000).filter(|&k| k != 0)
}

/// `struct pvclock_vcpu_time_info` (Linux's arch/x86/include/asm/pvclock-abi.h).
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

struct PvClockCell(UnsafeCell<PvClock>);

// SAFETY: only `kvm_clock` touches it, on the single CPU this guest runs.
unsafe impl Sync for PvClockCell {}

static PVCLOCK: PvClockCell = PvClockCell(UnsafeCell::new(PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
}));

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

fn kvm_clock() -> Option<u64> {
    let (_, _, ecx, _) = cpuid(1);
    if ecx & (1 << 31) == 0 {
        return None;
    }
    let (_, b, c, d) = cpuid(0x4000_0000);
    let mut signature = [0u8; 12];
    signature[..4].copy_from_slice(&b.to_le_bytes());
    signature[4..8].copy_from_slice(&c.to_le_bytes());
    signature[8..].copy_from_slice(&d.to_le_bytes());
    if &signature != b"KVMKVMKVM\0\0\0" {
        return None;
    }
    let (features, ..) = cpuid(0x4000_0001);
    if features & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let area = PVCLOCK.0.get();
    let paddr = area as u64; // identity mapped
    // SAFETY: CPUID says the MSR exists; it makes KVM write the 32-byte
    // record into PVCLOCK, a static that nothing else uses.
    unsafe { wrmsr(MSR_KVM_SYSTEM_TIME_NEW, paddr | 1) };
    let mut found = None;
    for _ in 0..1000 {
        // SAFETY: KVM updates the record between an odd and an even version;
        // volatile reads, checked against the version, see a consistent copy.
        let (v1, mul, shift, v2) = unsafe {
            let v1 = (&raw const (*area).version).read_volatile();
            let mul = (&raw const (*area).tsc_to_system_mul).read_volatile();
            let shift = (&raw const (*area).tsc_shift).read_volatile();
            let v2 = (&raw const (*area).version).read_volatile();
            (v1, mul, shift, v2)
        };
        if v1 == v2 && v1 % 2 == 0 && v1 != 0 && mul != 0 {
            found = Some((mul, shift));
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: turning the clock off again, so KVM stops writing the record.
    unsafe { wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0) };
    let (mul, shift) = found?;
    // ns = ((ticks << shift) * mul) >> 32, so ticks per ms = 1e6 << 32 / (mul << shift).
    let numerator = 1_000_000u128 << 32;
    let khz = if shift >= 0 {
        numerator / (u128::from(mul) << shift)
    } else {
        (numerator << -shift) / u128::from(mul)
    };
    u64::try_from(khz).ok().filter(|&k| k != 0)
}

const PIT_HZ: u64 = 1_193_182;
/// How many times a PIT calibration that wrapped is tried again.
const PIT_ATTEMPTS: u32 = 5;

/// Latches and reads PIT channel 0's counter.
fn pit_count() -> u16 {
    // SAFETY: ports 0x40 and 0x43 are the PIT's; no memory is touched.
    unsafe {
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40);
        let hi = inb(0x40);
        u16::from_le_bytes([lo, hi])
    }
}

/// Counts TSC ticks while PIT channel 0 counts down 50 ms. Channel 2 would be
/// the usual choice, but its gate (port 0x61) is not emulated by KVM's
/// in-kernel PIT as QEMU sets it up, and microvm has no speaker device.
fn pit() -> Option<u64> {
    const CALIBRATE_MS: u64 = 50;
    let wanted = (PIT_HZ * CALIBRATE_MS / 1000) as u16;
    // SAFETY: ports 0x40/0x43 belong to this guest's PIT. Interrupts are off,
    // so the IRQ 0 that mode 0 raises at terminal count goes nowhere.
    unsafe {
        outb(0x43, 0x30); // channel 0, low then high byte, mode 0, binary
        outb(0x40, 0xff);
        outb(0x40, 0xff);
    }
    let first = pit_count();
    let start = now();
    let mut moved = false;
    // Bounded: each read is a few VM exits; far fewer fit in 50 ms.
    for i in 0..5_000_000u32 {
        let count = pit_count();
        if count > first {
            return None; // wrapped or garbage: not a PIT counting down
        }
        moved |= count != first;
        if !moved && i > 10_000 {
            return None; // a port with no PIT behind it
        }
        if first - count >= wanted {
            let ticks = now() - start;
            let pit_ticks = u64::from(first - count);
            let khz = ticks * PIT_HZ / pit_ticks / 1000;
            return Some(khz).filter(|&k| k >= 1000);
        }
    }
    None
}
