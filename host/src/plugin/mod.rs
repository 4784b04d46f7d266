//! The sandboxed plugin runtime: WASM components behind the WIT contract in
//! `wit/`, run by wasmtime with nothing granted but what the host hands in.
//!
//! - [`manifest`]: what a plugin says about itself, checked.
//! - [`api`]: the plugin API versions linked (0.1 and 0.2), per kind.
//! - [`imports`]: the allowlist of imports per plugin kind.
//! - [`cache`]: compiled components, embedded or on disk, keyed by engine.
//! - [`engine_settings`]: how plugins are compiled (shared with build.rs).
//! - [`runtime`]: the engine, its epoch ticker, loading and instantiating.
//! - [`state`]: what a store holds: WASI with nothing granted, limits, logs.
//! - [`fetch`], [`source`]: the host imports that do I/O for plugins.
//! - [`registry`]: embedded first-party plugins plus the plugin directory.
//! - [`calls`]: the one layer of checked calls, cold and warm.
//! - [`policy`]: disk policies in host types, called by name.
//! - layer readers are called through [`calls::LayerSession`] by
//!   [`crate::layer`].

pub mod api;
pub mod bindings;
pub mod cache;
pub mod calls;
pub mod engine_settings;
pub mod error;
pub mod fetch;
pub mod imports;
pub mod limits;
pub mod manifest;
pub mod policy;
pub mod registry;
pub mod runtime;
pub mod source;
pub mod state;
pub mod template;

pub use api::{ApiVersion, HOST_API};
pub use calls::{
    ConverterInstance, ImageSession, Instance, LayerInstance, LayerSession, PolicyInstance,
    SourceInstance,
};
pub use error::PluginError;
pub use limits::Limits;
pub use manifest::{Manifest, PluginKind};
pub use policy::{PlannedDisk, Policy, PolicyRequest};
pub use registry::{PluginInfo, PluginOrigin, Registry};
pub use runtime::{LoadedPlugin, Runtime, RuntimeOptions, RuntimeStats};
