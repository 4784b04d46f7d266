//! A KVM VM made ahead of a restore: the part of a restore that does not
//! depend on the snapshot, only on its memory size.
//!
//! Creating a KVM VM with its irqchip, PIT and memory slots is the part of
//! a restore that KVM's own costs decide: 0.5 ms on the nested KVM here,
//! with the slots registered before the irqchip, and 5 to 10 ms more per
//! slot the other way round (see [`crate::builder::create_vm`] and
//! docs/benchmarks.md). A host that knows a restore is coming (a clone
//! service, a monitor process started before its snapshot is checked) makes
//! a [`VmShell`] first and hands it to [`crate::Vm::restore_with_shell`];
//! the memory slots then point at reserved address space, over which the
//! snapshot's memory file is mapped when it is known.

use kvm_ioctls::{Kvm, VmFd};

use crate::builder;
use crate::memory::{self, Reservation};
use crate::vm::VmError;

pub struct VmShell {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) memory: Reservation,
    memory_bytes: u64,
}

impl VmShell {
    /// A KVM VM (irqchip, PIT) whose memory slots cover `memory_bytes` of
    /// reserved address space.
    pub fn new(memory_bytes: u64) -> Result<VmShell, VmError> {
        memory::check_fits_this_host(memory_bytes)?;
        let kvm = builder::open_kvm()?;
        let vm = builder::create_vm(&kvm)?;
        let memory = Reservation::new(memory_bytes)?;
        builder::register_reserved(&vm, &memory)?;
        builder::create_irqchip(&vm)?;
        Ok(VmShell {
            kvm,
            vm,
            memory,
            memory_bytes,
        })
    }

    /// The guest memory size this shell takes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }
}
