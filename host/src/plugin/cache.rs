//! Compiled components on disk. Deserialising a compiled artifact runs
//! native code the engine trusts blindly, so only files this host wrote are
//! ever loaded: they live in a 0700 directory owned by us, each file is
//! 0600 and ours, and the name is keyed by the wasm's sha256 and the
//! engine's compatibility hash, so a different engine or configuration
//! never picks up a stale artifact. Artifacts are never accepted from
//! plugin authors.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

use crate::fsutil;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now (and written to the cache when there is one).
    Compiled,
    /// Deserialised from the cache.
    Cached,
}

#[derive(Debug)]
pub struct CompiledCache {
    dir: Option<PathBuf>,
    engine_key: String,
}

impl CompiledCache {
    /// A cache in `dir` (created 0700), or none at all.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        // DefaultHasher::new() has fixed keys, so the value is stable across
        // processes of one build; the crate version in the name covers
        // changes of hasher between builds.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("wasmtime{}-{:016x}", wasmtime_version(), h.finish());
        CompiledCache { dir, engine_key }
    }

    /// The file a component with this wasm digest is cached in.
    pub fn path_for(&self, wasm_sha256: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{wasm_sha256}-{}.cwasm", self.engine_key)))
    }

    /// The component for `wasm`, from the cache when a trusted entry exists,
    /// else compiled (and cached).
    pub fn load(
        &self,
        engine: &Engine,
        wasm_sha256: &str,
        wasm: &[u8],
    ) -> Result<(Component, Origin), String> {
        if let Some(path) = self.path_for(wasm_sha256) {
            if trusted(&path) {
                // SAFETY: the file is one this host wrote (a 0600 file owned
                // by our uid in our 0700 directory), named by the digest of
                // the wasm it was compiled from and by this engine's
                // compatibility hash; wasmtime also checks its header.
                match unsafe { Component::deserialize_file(engine, &path) } {
                    Ok(c) => return Ok((c, Origin::Cached)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "recompiling: cached component unusable: {e}")
                    }
                }
            }
        }
        let compiled = engine
            .precompile_component(wasm)
            .map_err(|e| format!("{e:?}"))?;
        if let Some(path) = self.path_for(wasm_sha256) {
            if let Err(e) = self.store(&path, &compiled) {
                tracing::warn!(path = %path.display(), "not caching compiled component: {e}");
            }
        }
        // SAFETY: these bytes were produced by `precompile_component` of this
        // very engine a moment ago.
        let component =
            unsafe { Component::deserialize(engine, &compiled) }.map_err(|e| format!("{e:?}"))?;
        Ok((component, Origin::Compiled))
    }

    fn store(&self, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().expect("cache paths have a directory");
        fsutil::create_private_dir(dir, 0o700)?;
        fsutil::write_atomic(path, compiled, 0o600)
    }
}

fn wasmtime_version() -> &'static str {
    // The major version of the engine crate we link; its artifacts are not
    // compatible across versions.
    "48"
}

/// Only a regular 0600 file owned by us, in a directory owned by us that
/// nobody else can write, is trusted.
fn trusted(path: &Path) -> bool {
    let uid = rustix::process::geteuid().as_raw();
    let (Ok(file), Some(Ok(dir))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    let ok = file.file_type().is_file()
        && file.uid() == uid
        && file.mode() & 0o077 == 0
        && dir.is_dir()
        && dir.uid() == uid
        && dir.mode() & 0o022 == 0;
    if !ok {
        tracing::warn!(path = %path.display(), "ignoring cached component not written by this host");
    }
    ok
}
