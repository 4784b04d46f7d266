//! The engine settings that decide how plugins are compiled, and the key
//! that names an engine's compiled artifacts. Shared, by path, between the
//! runtime and `host/build.rs`, which precompiles the built-in plugins with
//! these very settings: artifacts are only ever used by an engine whose
//! key is the one they were compiled under.

use std::hash::{Hash, Hasher};

/// Applies the settings that enter the engine's compatibility hash.
pub fn apply(config: &mut wasmtime::Config) {
    config
        .epoch_interruption(true)
        // Component calls are about 3x slower with it on, and plugins make
        // no async calls.
        .concurrency_support(false)
        .cranelift_opt_level(wasmtime::OptLevel::Speed);
}

/// The name compiled artifacts of `engine` are kept under: wasmtime's
/// major version and a hash of the engine's compatibility hash (target,
/// compiler flags, CPU features, tunables, wasm features).
pub fn engine_key(engine: &wasmtime::Engine) -> String {
    // DefaultHasher::new() has fixed keys, so the value is stable across
    // processes, and across the build script and the binary, which one
    // compiler builds; the version in the name covers changes of engine.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("wasmtime{WASMTIME_MAJOR}-{:016x}", h.finish())
}

/// The major version of the engine crate; its artifacts are not compatible
/// across versions.
pub const WASMTIME_MAJOR: &str = "48";
