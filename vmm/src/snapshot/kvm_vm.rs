//! The VM-wide KVM state: the PIT, kvmclock, and the interrupt controllers
//! (PIC master and slave, IOAPIC).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

#[derive(Debug, thiserror::Error)]
#[error("KVM refused to {what}")]
pub struct KvmVmError {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError { what, source }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmVmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm("report an interrupt controller"))?;
    Ok(chip)
}

/// Saves the VM-wide state of a paused VM.
pub fn save(vm: &VmFd) -> Result<KvmVmState, KvmVmError> {
    let pit = vm.get_pit2().map_err(kvm("report the PIT"))?;
    let mut clock = vm.get_clock().map_err(kvm("report kvmclock"))?;
    // Restored without KVM_CLOCK_REALTIME: the guest's clock goes on from
    // where it stopped, as its TSC does. The other flags are only reports
    // (and KVM refuses KVM_CLOCK_TSC_STABLE on set).
    clock.flags = 0;
    clock.realtime = 0;
    clock.host_tsc = 0;
    Ok(KvmVmState {
        pit,
        clock,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Puts the state back, after the vCPUs' (as Firecracker orders it).
pub fn restore(vm: &VmFd, state: &KvmVmState) -> Result<(), KvmVmError> {
    vm.set_pit2(&state.pit).map_err(kvm("set the PIT"))?;
    vm.set_clock(&state.clock).map_err(kvm("set kvmclock"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip)
            .map_err(kvm("set an interrupt controller"))?;
    }
    Ok(())
}

impl KvmVmState {
    /// Each controller is the one its field names (the chip id decides
    /// which one KVM_SET_IRQCHIP writes).
    pub fn validate(&self) -> Result<(), String> {
        for (chip, id, name) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
        ] {
            if chip.chip_id != id {
                return Err(format!(
                    "the {name} state has chip id {}, not {id}",
                    chip.chip_id
                ));
            }
        }
        Ok(())
    }
}
