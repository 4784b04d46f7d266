//! cocoon-host: the trusted host of the cocoon microVM runtime.
//!
//! The host does every byte of I/O, every digest check and every lock;
//! plugins ([`plugin`]) run sandboxed behind the WIT contract in `wit/`.

pub mod cast;
pub mod config;
pub mod convert;
pub mod demo_kernel;
pub mod disk;
pub mod error_chain;
pub mod fsutil;
pub mod guest;
pub mod http;
pub mod layer;
pub mod net;
pub mod plugin;
pub mod snapshot;
pub mod store;
pub mod vm;

pub use error_chain::error_chain;
