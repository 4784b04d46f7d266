//! cocoon-vmm: the virtual machine monitor of cocoon-host.
//!
//! A KVM microVM on the rust-vmm crates: guest memory with an MMIO gap,
//! Linux/PVH kernel loading, ACPI tables (hardware-reduced), a COM1 serial
//! console, an i8042 for reset, an ACPI sleep/reset device, and virtio-mmio
//! block and network (tap) devices served by one I/O thread each.
//!
//! The library API is [`VmConfig`] → [`Vm::start`] → a running [`Vm`] with
//! [`Vm::pause`], [`Vm::resume`], [`Vm::stop`] and [`Vm::wait`]; a paused
//! VM writes a snapshot with [`Vm::snapshot`], and [`Vm::restore`] runs one
//! again (see [`snapshot`] for the files, the checks and the host's
//! preflight). [`builder`] has the steps a VM is built from.

#![cfg(target_arch = "x86_64")]

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod cast;
pub mod config;
pub mod devices;
pub mod memory;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use config::{
    parse_memory_size, DiskConfig, NetConfig, OutputHandler, SerialOutput, SpecError, VmConfig,
};
pub use vm::{check_kvm, ExitReason, StopHandle, Vm, VmError};
