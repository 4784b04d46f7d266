//! The `cocoon-host` command line.

pub mod boot;
pub mod demo;
pub mod image;
pub mod output;
pub mod plugin;
pub mod vm;
pub mod vm_console;
pub mod vm_guest;
