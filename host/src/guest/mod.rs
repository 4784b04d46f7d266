//! What boots a Linux guest: the kernel ([`kernel`]: from the command
//! line, the image or the config), the cocoon initramfs ([`initramfs`]:
//! busybox, the kernel's own modules and [`init.sh`](initramfs::INIT_SCRIPT),
//! built by the host and cached per kernel), and the plan its `/init` reads
//! from the kernel command line ([`cmdline`]) with the OCI process it runs
//! ([`exec`]).

pub mod cmdline;
mod cpio;
pub mod exec;
pub mod gpt;
pub mod initramfs;
pub mod kernel;
pub mod layer_kernel;
pub mod modules;

pub use cmdline::{BootPlan, GuestDisk, RootKind, RootPartition};
pub use exec::ExecConfig;
pub use initramfs::{Initramfs, InitramfsError};
pub use kernel::{KernelChoice, KernelError, KernelSource};
