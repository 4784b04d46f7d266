//! The `cocoon-host` command line.

pub mod boot;
pub mod output;
pub mod plugin;
