//! A vCPU's KVM state, saved and restored in the order KVM needs (the
//! order Firecracker's `vcpu.rs` documents).
//!
//! Save: MP state first (KVM_GET_MP_STATE makes KVM accept pending APIC
//! events, which changes the rest), then registers, special registers,
//! XSAVE, XCRs, debug registers, LAPIC, CPUID, MSRs, and vCPU events last.
//!
//! Restore: CPUID first (KVM decides from it which MSRs exist, and refuses a
//! change after the first KVM_RUN), MP state, registers, special registers
//! (which set the APIC base), XSAVE, XCRs, debug registers, LAPIC (after the
//! special registers, before the MSRs or the TSC deadline is lost), MSRs
//! with the TSC deadline after the TSC, vCPU events last (setting registers
//! clears pending exceptions, which the events put back).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// MSR_IA32_TSC_DEADLINE: restored after MSR_IA32_TSC, or KVM computes the
/// timer from the wrong TSC and the interrupt is lost.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Bytes of the legacy `kvm_xsave` region.
pub const XSAVE_LEGACY_LEN: usize = std::mem::size_of::<kvm_xsave>();
/// A saved XSAVE area beyond this is corrupt (AMX state is about 11 KiB).
pub const MAX_XSAVE_LEN: usize = 1 << 20;
/// More MSRs than any KVM lists.
pub const MAX_MSRS: usize = 4096;

/// Tolerance between a saved and the host's TSC frequency, as QEMU and
/// Firecracker allow for calibration differences: 250 ppm.
const TSC_TOLERANCE_PPM: u64 = 250;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as 32-bit words: the legacy 4 KiB region, then what
    /// KVM_CAP_XSAVE2 says lies beyond it, if anything.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused MSR {index:#x} (value {value:#x})")]
    Msr { index: u32, value: u64 },
    #[error("the saved XSAVE area is {saved} bytes; this host's is {host}")]
    XsaveSize { saved: usize, host: usize },
    #[error("the saved CPUID has {0} entries, more than KVM takes")]
    CpuidSize(usize),
}

fn refused(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuStateError {
    move |source| CpuStateError::Kvm { what, source }
}

/// Words of the legacy XSAVE region.
pub const XSAVE_LEGACY_WORDS: usize = XSAVE_LEGACY_LEN / 4;

/// What the host can do that vCPU state depends on.
#[derive(Debug, Clone)]
pub struct HostCpu {
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Vec<u32>,
    /// KVM_CAP_XSAVE2's size, or 0 without it.
    pub xsave2_len: usize,
}

impl HostCpu {
    pub fn probe(kvm: &Kvm, vm: &kvm_ioctls::VmFd) -> Result<HostCpu, CpuStateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(refused("list the MSRs it saves"))?;
        let xsave2_len =
            usize::try_from(vm.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap_or(0);
        Ok(HostCpu {
            msr_indices: list.as_slice().to_vec(),
            xsave2_len,
        })
    }

    /// The XSAVE buffer KVM reads and writes on this host.
    fn xsave_len(&self) -> usize {
        self.xsave2_len.max(XSAVE_LEGACY_LEN)
    }
}

/// Saves a parked vCPU's state.
pub fn save(fd: &VcpuFd, host: &HostCpu) -> Result<VcpuState, CpuStateError> {
    let mp_state = fd.get_mp_state().map_err(refused("report the MP state"))?;
    let regs = fd.get_regs().map_err(refused("report the registers"))?;
    let sregs = fd
        .get_sregs()
        .map_err(refused("report the special registers"))?;
    let xsave = get_xsave(fd, host)?;
    let xcrs = fd.get_xcrs().map_err(refused("report the XCRs"))?;
    let debug_regs = fd
        .get_debug_regs()
        .map_err(refused("report the debug registers"))?;
    let lapic = fd.get_lapic().map_err(refused("report the LAPIC"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(refused("report the CPUID"))?;
    let msrs = get_msrs(fd, &host.msr_indices)?;
    let events = fd
        .get_vcpu_events()
        .map_err(refused("report the vCPU events"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

fn get_xsave(fd: &VcpuFd, host: &HostCpu) -> Result<Vec<u32>, CpuStateError> {
    if host.xsave2_len <= XSAVE_LEGACY_LEN {
        let legacy = fd.get_xsave().map_err(refused("report the XSAVE area"))?;
        return Ok(legacy.region.to_vec());
    }
    let mut xsave = new_xsave(host.xsave2_len)?;
    // SAFETY: the buffer holds KVM_CAP_XSAVE2's size, which is what
    // KVM_GET_XSAVE2 writes; the VMM enables no XSTATE feature after the
    // size was read.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(refused("report the XSAVE area"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// An Xsave wrapper of `len` bytes in all.
fn new_xsave(len: usize) -> Result<Xsave, CpuStateError> {
    let entries = (len - XSAVE_LEGACY_LEN).div_ceil(4);
    Xsave::new(entries).map_err(|_| CpuStateError::XsaveSize {
        saved: len,
        host: len,
    })
}

/// Every MSR of `indices` KVM can read: an MSR it refuses is left out and
/// the rest are read again, as Cloud Hypervisor does (KVM_GET_MSRS stops at
/// the first it cannot read).
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, CpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        // The chunk is at most KVM_MAX_MSR_ENTRIES long.
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| CpuStateError::Msr {
            index: chunk[0],
            value: 0,
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(refused("report the MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = if n < chunk.len() {
            tracing::debug!(
                msr = format!("{:#x}", chunk[n]),
                "KVM cannot read this MSR; not saved"
            );
            n + 1
        } else {
            n
        };
        rest = &rest[skip..];
    }
    Ok(out)
}

/// Puts a saved state into a new vCPU that has not run.
pub fn restore(fd: &VcpuFd, state: &VcpuState, host: &HostCpu) -> Result<(), CpuStateError> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| CpuStateError::CpuidSize(state.cpuid.len()))?;
    fd.set_cpuid2(&cpuid).map_err(refused("set CPUID"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(refused("set the MP state"))?;
    fd.set_regs(&state.regs)
        .map_err(refused("set the registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(refused("set the special registers"))?;
    set_xsave(fd, state, host)?;
    fd.set_xcrs(&state.xcrs).map_err(refused("set the XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(refused("set the debug registers"))?;
    fd.set_lapic(&state.lapic)
        .map_err(refused("set the LAPIC"))?;
    let (first, deferred): (Vec<_>, Vec<_>) = state
        .msrs
        .iter()
        .partition(|m| m.index != MSR_IA32_TSC_DEADLINE);
    set_msrs(fd, &first)?;
    set_msrs(fd, &deferred)?;
    fd.set_vcpu_events(&state.events)
        .map_err(refused("set the vCPU events"))?;
    Ok(())
}

fn set_xsave(fd: &VcpuFd, state: &VcpuState, host: &HostCpu) -> Result<(), CpuStateError> {
    let saved = 4 * state.xsave.len();
    let host_len = host.xsave_len();
    if saved > host_len || state.xsave.len() < XSAVE_LEGACY_WORDS {
        return Err(CpuStateError::XsaveSize {
            saved,
            host: host_len,
        });
    }
    let (region, extra) = state.xsave.split_at(XSAVE_LEGACY_WORDS);
    if host.xsave2_len <= XSAVE_LEGACY_LEN {
        let mut legacy = kvm_xsave::default();
        legacy.region.copy_from_slice(region);
        // SAFETY: without KVM_CAP_XSAVE2 beyond 4 KiB, KVM_SET_XSAVE reads
        // exactly the legacy struct passed here.
        return unsafe { fd.set_xsave(&legacy) }.map_err(refused("set the XSAVE area"));
    }
    let mut xsave = new_xsave(host_len)?;
    // SAFETY: only the fixed region is written, not the FAM length the
    // wrapper relies on.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: the buffer holds KVM_CAP_XSAVE2's size, all KVM reads.
    unsafe { fd.set_xsave2(&xsave) }.map_err(refused("set the XSAVE area"))
}

fn set_msrs(fd: &VcpuFd, entries: &[&kvm_msr_entry]) -> Result<(), CpuStateError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let list: Vec<kvm_msr_entry> = chunk.iter().map(|m| **m).collect();
        let msrs = Msrs::from_entries(&list).map_err(|_| CpuStateError::Msr {
            index: list[0].index,
            value: list[0].data,
        })?;
        let n = fd.set_msrs(&msrs).map_err(refused("set the MSRs"))?;
        if n < list.len() {
            return Err(CpuStateError::Msr {
                index: list[n].index,
                value: list[n].data,
            });
        }
    }
    Ok(())
}

/// What to do about the TSC frequency of a restored VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscPlan {
    /// The host runs the guest's TSC at its saved rate already (or the
    /// snapshot did not record one).
    Keep,
    /// Scale every vCPU's TSC to this rate (KVM_SET_TSC_KHZ).
    Scale(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TscError {
    #[error("the snapshot's TSC runs at {saved} kHz and this host's at {host} kHz, and this host's KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL): the guest's clock would run at the wrong speed")]
    CannotScale { saved: u32, host: u32 },
    #[error("the snapshot's TSC runs at {saved} kHz; this host's KVM cannot say its own TSC rate, nor scale it")]
    HostUnknown { saved: u32 },
}

/// Decides how a guest saved with TSC rate `saved` runs on a host whose
/// vCPUs run at `host` kHz, when `can_scale` (KVM_CAP_TSC_CONTROL).
pub fn plan_tsc(
    saved: Option<u32>,
    host: Option<u32>,
    can_scale: bool,
) -> Result<TscPlan, TscError> {
    let Some(saved) = saved else {
        return Ok(TscPlan::Keep);
    };
    match host {
        Some(host) if within_tolerance(saved, host) => Ok(TscPlan::Keep),
        _ if can_scale => Ok(TscPlan::Scale(saved)),
        Some(host) => Err(TscError::CannotScale { saved, host }),
        None => Err(TscError::HostUnknown { saved }),
    }
}

fn within_tolerance(saved: u32, host: u32) -> bool {
    u64::from(saved.abs_diff(host)) * 1_000_000 <= u64::from(saved) * TSC_TOLERANCE_PPM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_plans() {
        use TscPlan::*;
        type Case = (Option<u32>, Option<u32>, bool, Result<TscPlan, TscError>);
        let cases: &[Case] = &[
            // Same rate, or within 250 ppm (2.6 GHz: 650 kHz).
            (Some(2_600_000), Some(2_600_000), false, Ok(Keep)),
            (Some(2_600_000), Some(2_600_650), false, Ok(Keep)),
            (Some(2_600_000), Some(2_599_350), true, Ok(Keep)),
            // Beyond it: scaled where KVM can, refused naming both where not.
            (Some(2_600_000), Some(2_600_651), true, Ok(Scale(2_600_000))),
            (Some(2_600_000), Some(3_000_000), true, Ok(Scale(2_600_000))),
            (
                Some(2_600_000),
                Some(3_000_000),
                false,
                Err(TscError::CannotScale {
                    saved: 2_600_000,
                    host: 3_000_000,
                }),
            ),
            // The host cannot tell its rate.
            (Some(2_600_000), None, true, Ok(Scale(2_600_000))),
            (
                Some(2_600_000),
                None,
                false,
                Err(TscError::HostUnknown { saved: 2_600_000 }),
            ),
            // The snapshot recorded none: nothing to compare.
            (None, Some(3_000_000), false, Ok(Keep)),
        ];
        for (saved, host, scale, want) in cases {
            assert_eq!(
                &plan_tsc(*saved, *host, *scale),
                want,
                "{saved:?} on {host:?} (scale {scale})"
            );
        }
        let e = plan_tsc(Some(2_600_000), Some(3_000_000), false).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("2600000 kHz") && text.contains("3000000 kHz"),
            "{text}"
        );
    }
}
