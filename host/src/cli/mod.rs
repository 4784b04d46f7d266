//! The `cocoon-host` command line.

pub mod boot;
pub mod demo;
pub mod image;
pub mod net;
pub mod output;
pub mod plugin;
pub mod snapshot;
pub mod vm;
pub mod vm_console;
pub mod vm_guest;
