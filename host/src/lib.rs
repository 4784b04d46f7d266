//! cocoon-host: the trusted host of the cocoon microVM runtime.
//!
//! The host does every byte of I/O, every digest check and every lock;
//! plugins ([`plugin`]) run sandboxed behind the WIT contract in `wit/`.

pub mod config;
pub mod convert;
pub mod disk;
pub mod error_chain;
pub mod fsutil;
pub mod http;
pub mod layer;
pub mod net;
pub mod plugin;
pub mod store;

pub use error_chain::error_chain;
