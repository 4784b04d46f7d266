//! The `cocoon-host` command line.

pub mod boot;
pub mod image;
pub mod output;
pub mod plugin;
