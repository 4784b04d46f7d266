//! Warm instances: one store kept across many calls, for callers that make
//! many small calls (decode pools, benchmarks). A trap poisons the store:
//! every later call fails and the caller must make a new instance.

use wasmtime::Store;

use super::bindings::{format_converter, image_source};
use super::calls::Compressed;
use super::error::PluginError;
use super::runtime::LoadedPlugin;
use super::state::State;

/// An instantiated plugin and its store.
pub struct Warm<'p, B> {
    plugin: &'p LoadedPlugin,
    store: Store<State>,
    bindings: B,
    poisoned: bool,
}

impl<'p, B> Warm<'p, B> {
    fn new(plugin: &'p LoadedPlugin, store: Store<State>, bindings: B) -> Self {
        Warm {
            plugin,
            store,
            bindings,
            poisoned: false,
        }
    }

    fn run<T>(
        &mut self,
        call: &str,
        f: impl FnOnce(&B, &mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        if self.poisoned {
            return Err(PluginError::Trap {
                plugin: self.plugin.name().to_string(),
                call: call.to_string(),
                detail: "instance unusable after an earlier trap".into(),
            });
        }
        let bindings = &self.bindings;
        let r = self.plugin.call(&mut self.store, call, |s| f(bindings, s));
        self.poisoned = r.is_err();
        r
    }
}

impl LoadedPlugin {
    /// A warm image-source instance.
    pub fn warm_image_source(&self) -> Result<Warm<'_, image_source::ImageSource>, PluginError> {
        let (store, bindings) = self.image_source()?;
        Ok(Warm::new(self, store, bindings))
    }

    /// A warm format-converter instance.
    pub fn warm_converter(
        &self,
    ) -> Result<Warm<'_, format_converter::FormatConverter>, PluginError> {
        let (store, bindings) = self.converter()?;
        Ok(Warm::new(self, store, bindings))
    }
}

impl Warm<'_, image_source::ImageSource> {
    /// schemes() on the warm instance.
    pub fn schemes(&mut self) -> Result<Vec<String>, PluginError> {
        self.run("schemes", |b, s| b.cocoon_plugin_resolver().call_schemes(s))
    }
}

impl Warm<'_, format_converter::FormatConverter> {
    /// decode() on the warm instance; the answer must be `length` bytes.
    pub fn decode(
        &mut self,
        extent: Compressed,
        input: &[u8],
        length: u32,
    ) -> Result<Vec<u8>, PluginError> {
        let name = self.plugin.name().to_string();
        let out = self
            .run("decode", |b, s| {
                b.cocoon_plugin_converter()
                    .call_decode(s, extent, input, length)
            })?
            .map_err(|e| PluginError::Returned {
                plugin: name.clone(),
                call: "decode".into(),
                kind: super::bindings::kind_name(e.kind).into(),
                message: e.message,
            })?;
        if out.len() != length as usize {
            return Err(PluginError::InvalidAnswer {
                plugin: name,
                call: "decode".into(),
                detail: format!("{} bytes decoded, {length} expected", out.len()),
            });
        }
        Ok(out)
    }
}
