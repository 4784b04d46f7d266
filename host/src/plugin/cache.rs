//! Compiled components: embedded in the binary for the built-in plugins,
//! and on disk for the rest. Deserialising a compiled artifact runs native
//! code the engine trusts blindly, so only artifacts this host produced are
//! ever loaded: the ones its own build embedded (used only when the running
//! engine's key is the one they were compiled under), and files it wrote,
//! which live in a 0700 directory owned by us, each 0600 and ours, named by
//! the wasm's sha256 and the engine key, so a different engine or
//! configuration never picks up a stale artifact. Artifacts are never
//! accepted from plugin authors.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::engine_settings;
use crate::fsutil;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now (and written to the cache when there is one).
    Compiled,
    /// Deserialised from the cache.
    Cached,
    /// Deserialised from the code the build embedded in the binary.
    Embedded,
}

/// Compiled code the build embedded in the binary for a built-in plugin,
/// and the engine key it was compiled under.
#[derive(Debug, Clone, Copy)]
pub struct Embedded {
    pub engine_key: &'static str,
    pub code: &'static [u8],
}

#[derive(Debug)]
pub struct CompiledCache {
    dir: Option<PathBuf>,
    engine_key: String,
}

impl CompiledCache {
    /// A cache in `dir` (created 0700), or none at all.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        CompiledCache {
            dir,
            engine_key: engine_settings::engine_key(engine),
        }
    }

    /// The key of this engine's artifacts.
    pub fn engine_key(&self) -> &str {
        &self.engine_key
    }

    /// The file a component with this wasm digest is cached in.
    pub fn path_for(&self, wasm_sha256: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{wasm_sha256}-{}.cwasm", self.engine_key)))
    }

    /// The component for `wasm`: the embedded code when it was compiled
    /// under this engine's key, else from the cache when a trusted entry
    /// exists, else compiled (and cached).
    pub fn load(
        &self,
        engine: &Engine,
        wasm_sha256: &str,
        wasm: &[u8],
        embedded: Option<Embedded>,
    ) -> Result<(Component, Origin), String> {
        if let Some(e) = embedded.filter(|e| e.engine_key == self.engine_key) {
            // SAFETY: this code was produced by `precompile_component` in
            // this binary's own build (host/build.rs), from the wasm
            // embedded beside it, with the engine settings this engine uses;
            // the matching engine key says this engine's compatibility hash
            // is the one it was compiled under. wasmtime checks its header.
            match unsafe { Component::deserialize(engine, e.code) } {
                Ok(c) => return Ok((c, Origin::Embedded)),
                Err(err) => tracing::warn!("compiling: embedded component unusable: {err}"),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_code_is_used_only_under_its_engine_key() {
        let engine = Engine::default();
        let cache = CompiledCache::new(&engine, None);
        // The smallest component there is: `(component)`.
        let wasm = b"\0asm\x0d\0\x01\0";
        let code: &'static [u8] = Box::leak(
            engine
                .precompile_component(wasm)
                .unwrap()
                .into_boxed_slice(),
        );
        let sha = "0".repeat(64);
        let ours = Embedded {
            engine_key: Box::leak(cache.engine_key().to_string().into_boxed_str()),
            code,
        };
        let (_, origin) = cache.load(&engine, &sha, wasm, Some(ours)).unwrap();
        assert_eq!(origin, Origin::Embedded);
        // Another engine's code is never deserialised, even if it would
        // load: it is compiled instead.
        let other = Embedded {
            engine_key: "wasmtime48-0000000000000000",
            code: b"not code at all",
        };
        let (_, origin) = cache.load(&engine, &sha, wasm, Some(other)).unwrap();
        assert_eq!(origin, Origin::Compiled);
        // Garbage under our key is refused by wasmtime and compiled over.
        let garbage = Embedded {
            code: b"not code at all",
            ..ours
        };
        let (_, origin) = cache.load(&engine, &sha, wasm, Some(garbage)).unwrap();
        assert_eq!(origin, Origin::Compiled);
    }
}
