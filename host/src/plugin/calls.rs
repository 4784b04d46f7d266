//! Typed calls per plugin kind. Every answer is checked here before the
//! rest of the host sees it: a plugin is untrusted, so its answers are
//! input like any other.

use std::path::Path;

use wasmtime::component::ResourceAny;
use wasmtime::Store;

use super::bindings::{disk_policy, format_converter, image_source, kind_name, WitError};
use super::error::PluginError;
use super::manifest::PluginKind;
use super::runtime::{KindPre, LoadedPlugin};
use super::source::SourceFile;
use super::state::State;

pub use disk_policy::exports::cocoon::plugin::policy::{
    DataDiskSpec, Disk, DiskRole, Violation, VmRequest,
};
pub use format_converter::exports::cocoon::plugin::converter::{
    Compressed, Extent, ExtentKind, ProbeResult,
};
pub use image_source::exports::cocoon::plugin::resolver::{Artifact, Platform};

/// Most artifacts one reference may resolve to (layers of an image).
const MAX_ARTIFACTS: usize = 1024;
/// Most extents one map page may hold.
pub const MAX_EXTENTS_PER_PAGE: u32 = 4096;
/// Largest decoded extent.
pub const MAX_DECODED: u32 = 16 << 20;

impl Platform {
    /// linux/amd64, what this host runs.
    pub fn host() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl LoadedPlugin {
    fn returned(&self, call: &str, e: WitError) -> PluginError {
        PluginError::Returned {
            plugin: self.name().to_string(),
            call: call.to_string(),
            kind: kind_name(e.kind).to_string(),
            message: e.message,
        }
    }

    fn invalid(&self, call: &str, detail: String) -> PluginError {
        PluginError::InvalidAnswer {
            plugin: self.name().to_string(),
            call: call.to_string(),
            detail,
        }
    }

    fn instantiate_err(&self, e: wasmtime::Error) -> PluginError {
        PluginError::Instantiate {
            plugin: self.name().to_string(),
            detail: format!("{e:#}"),
        }
    }

    /// A fresh store with the plugin instantiated as `kind`.
    fn instance<B>(
        &self,
        kind: PluginKind,
        pick: impl FnOnce(&KindPre, &mut Store<State>) -> Option<wasmtime::Result<B>>,
    ) -> Result<(Store<State>, B), PluginError> {
        self.expect_kind(kind)?;
        let mut store = self.new_store();
        let b = self.call(&mut store, "instantiate", |s| {
            pick(&self.pre, s).expect("the kind was checked")
        })?;
        Ok((store, b))
    }

    pub(crate) fn image_source(
        &self,
    ) -> Result<(Store<State>, image_source::ImageSource), PluginError> {
        self.instance(PluginKind::ImageSource, |pre, s| match pre {
            KindPre::ImageSource(p) => Some(p.instantiate(s)),
            _ => None,
        })
    }

    pub(crate) fn converter(
        &self,
    ) -> Result<(Store<State>, format_converter::FormatConverter), PluginError> {
        self.instance(PluginKind::FormatConverter, |pre, s| match pre {
            KindPre::FormatConverter(p) => Some(p.instantiate(s)),
            _ => None,
        })
    }

    fn policy(&self) -> Result<(Store<State>, disk_policy::DiskPolicy), PluginError> {
        self.instance(PluginKind::DiskPolicy, |pre, s| match pre {
            KindPre::DiskPolicy(p) => Some(p.instantiate(s)),
            _ => None,
        })
    }

    /// image-source: the schemes the plugin resolves.
    pub fn schemes(&self) -> Result<Vec<String>, PluginError> {
        let (mut store, b) = self.image_source()?;
        let schemes = self.call(&mut store, "schemes", |s| {
            b.cocoon_plugin_resolver().call_schemes(s)
        })?;
        for scheme in &schemes {
            let ok = !scheme.is_empty()
                && scheme.len() <= 32
                && scheme.bytes().all(|c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || c == b'+'
                        || c == b'-'
                        || c == b'.'
                });
            if !ok {
                return Err(self.invalid("schemes", format!("{scheme:?} is not a URL scheme")));
            }
        }
        Ok(schemes)
    }

    /// image-source: resolves `reference` into checked artifacts.
    pub fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<Vec<Artifact>, PluginError> {
        let (mut store, b) = self.image_source()?;
        let artifacts = self
            .call(&mut store, "resolve", |s| {
                b.cocoon_plugin_resolver()
                    .call_resolve(s, reference, platform)
            })?
            .map_err(|e| self.returned("resolve", e))?;
        if artifacts.len() > MAX_ARTIFACTS {
            return Err(self.invalid(
                "resolve",
                format!("{} artifacts, at most {MAX_ARTIFACTS}", artifacts.len()),
            ));
        }
        for a in &artifacts {
            if let Some(d) = &a.digest {
                if !valid_digest(d) {
                    return Err(self.invalid(
                        "resolve",
                        format!("digest {d:?} is not sha256:<64 lower-case hex>"),
                    ));
                }
            }
            if url::Url::parse(&a.url).is_err() {
                return Err(self.invalid(
                    "resolve",
                    format!("artifact URL {:?} does not parse", a.url),
                ));
            }
        }
        Ok(artifacts)
    }

    /// format-converter: what the plugin makes of a file's first and last
    /// bytes.
    pub fn probe(
        &self,
        head: &[u8],
        tail: &[u8],
        file_size: u64,
    ) -> Result<Option<ProbeResult>, PluginError> {
        let (mut store, b) = self.converter()?;
        let r = self.call(&mut store, "probe", |s| {
            b.cocoon_plugin_converter()
                .call_probe(s, head, tail, file_size)
        })?;
        if let Some(p) = &r {
            if p.confidence > 100 || p.format.is_empty() || p.format.len() > 32 {
                return Err(self.invalid("probe", format!("{p:?}")));
            }
        }
        Ok(r)
    }

    /// format-converter: opens `path` as `format` in a session that keeps
    /// its store for the map calls that follow.
    pub fn open_image(&self, path: &Path, format: &str) -> Result<ImageSession<'_>, PluginError> {
        let src = SourceFile::open(path).map_err(PluginError::io("opening source", path))?;
        let source_size = src.size();
        let (mut store, b) = self.converter()?;
        let handle = store
            .data_mut()
            .push_source(src)
            .map_err(|e| self.instantiate_err(e))?;
        let image = self
            .call(&mut store, "open", |s| {
                b.cocoon_plugin_converter()
                    .image()
                    .call_open(s, handle, format)
            })?
            .map_err(|e| self.returned("open", e))?;
        let virtual_size = self.call(&mut store, "virtual-size", |s| {
            b.cocoon_plugin_converter()
                .image()
                .call_virtual_size(s, image)
        })?;
        Ok(ImageSession {
            plugin: self,
            store,
            bindings: b,
            image,
            virtual_size,
            source_size,
        })
    }

    /// format-converter: decodes one compressed extent; the answer must be
    /// exactly `length` bytes.
    pub fn decode(
        &self,
        extent: Compressed,
        input: &[u8],
        length: u32,
    ) -> Result<Vec<u8>, PluginError> {
        if length > MAX_DECODED {
            return Err(self.invalid(
                "decode",
                format!("extent of {length} bytes is over {MAX_DECODED}"),
            ));
        }
        let (mut store, b) = self.converter()?;
        let out = self
            .call(&mut store, "decode", |s| {
                b.cocoon_plugin_converter()
                    .call_decode(s, extent, input, length)
            })?
            .map_err(|e| self.returned("decode", e))?;
        if out.len() != length as usize {
            return Err(self.invalid(
                "decode",
                format!("{} bytes decoded, {length} expected", out.len()),
            ));
        }
        Ok(out)
    }

    /// disk-policy: the ordered disk plan.
    pub fn plan(&self, request: &VmRequest) -> Result<Vec<Disk>, PluginError> {
        let (mut store, b) = self.policy()?;
        self.call(&mut store, "plan", |s| {
            b.cocoon_plugin_policy().call_plan(s, request)
        })?
        .map_err(|e| self.returned("plan", e))
    }

    /// disk-policy: the site rules a request breaks.
    pub fn validate(&self, request: &VmRequest) -> Result<Vec<Violation>, PluginError> {
        let (mut store, b) = self.policy()?;
        self.call(&mut store, "validate", |s| {
            b.cocoon_plugin_policy().call_validate(s, request)
        })
    }
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// An opened image: one store kept across the map calls of a conversion.
/// After any failed call the session is spent and must be dropped. The
/// image resource belongs to the store, so dropping the session frees it
/// without calling back into a possibly trapped instance.
pub struct ImageSession<'p> {
    plugin: &'p LoadedPlugin,
    store: Store<State>,
    bindings: format_converter::FormatConverter,
    image: ResourceAny,
    virtual_size: u64,
    source_size: u64,
}

impl ImageSession<'_> {
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The backing file name the image stores, unresolved.
    pub fn backing(&mut self) -> Result<Option<String>, PluginError> {
        let (b, image) = (&self.bindings, self.image);
        self.plugin.call(&mut self.store, "backing", |s| {
            b.cocoon_plugin_converter().image().call_backing(s, image)
        })
    }

    /// One page of extents from `offset`, checked: contiguous from
    /// `offset`, non-empty, inside the virtual size, data inside the source.
    pub fn map(&mut self, offset: u64, max: u32) -> Result<Vec<Extent>, PluginError> {
        let max = max.min(MAX_EXTENTS_PER_PAGE);
        let (b, image) = (&self.bindings, self.image);
        let extents = self
            .plugin
            .call(&mut self.store, "map", |s| {
                b.cocoon_plugin_converter()
                    .image()
                    .call_map(s, image, offset, max)
            })?
            .map_err(|e| self.plugin.returned("map", e))?;
        check_page(&extents, offset, max, self.virtual_size, self.source_size)
            .map_err(|detail| self.plugin.invalid("map", detail))?;
        Ok(extents)
    }
}

/// The rules a map page must satisfy.
pub fn check_page(
    extents: &[Extent],
    offset: u64,
    max: u32,
    virtual_size: u64,
    source_size: u64,
) -> Result<(), String> {
    if extents.len() > max as usize {
        return Err(format!(
            "{} extents, asked for at most {max}",
            extents.len()
        ));
    }
    if extents.is_empty() && offset < virtual_size {
        return Err(format!(
            "no extents at offset {offset} below the virtual size {virtual_size}"
        ));
    }
    let mut at = offset;
    for e in extents {
        if e.offset != at {
            return Err(format!(
                "extent at {} leaves a gap or overlap at {at}",
                e.offset
            ));
        }
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|&end| e.length > 0 && end <= virtual_size)
            .ok_or_else(|| {
                format!(
                    "extent {}+{} is empty or past the virtual size {virtual_size}",
                    e.offset, e.length
                )
            })?;
        match &e.kind {
            ExtentKind::Data(src) => {
                if src.checked_add(e.length).is_none_or(|s| s > source_size) {
                    return Err(format!(
                        "data extent at source {src}+{} is past the source's {source_size} bytes",
                        e.length
                    ));
                }
            }
            ExtentKind::Compressed(c) => {
                if c.source_offset
                    .checked_add(c.source_length as u64)
                    .is_none_or(|s| s > source_size)
                {
                    return Err(format!(
                        "compressed extent at source {}+{} is past the source's {source_size} bytes",
                        c.source_offset, c.source_length
                    ));
                }
                if e.length > MAX_DECODED as u64 {
                    return Err(format!(
                        "compressed extent decodes to {} bytes, over {MAX_DECODED}",
                        e.length
                    ));
                }
            }
            ExtentKind::Zero | ExtentKind::Backing => {}
        }
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, kind: ExtentKind) -> Extent {
        Extent {
            offset,
            length,
            kind,
        }
    }

    #[test]
    fn page_rules() {
        use ExtentKind::*;
        let vs = 1 << 20;
        let src = 4096;
        let ok = [
            ext(0, 512, Data(0)),
            ext(512, 1024, Zero),
            ext(1536, vs - 1536, Backing),
        ];
        assert!(check_page(&ok, 0, 10, vs, src).is_ok());
        assert!(check_page(&[], vs, 10, vs, src).is_ok());
        let bad: &[(&[Extent], &str)] = &[
            (&ok, "asked for at most"),
            (&[ext(0, 512, Data(0)), ext(1024, 512, Zero)], "gap"),
            (&[ext(0, 512, Data(0)), ext(256, 512, Zero)], "overlap"),
            (&[ext(0, 0, Zero)], "empty"),
            (&[ext(0, vs + 1, Zero)], "past the virtual size"),
            (&[ext(0, 512, Data(src - 100))], "past the source"),
            (&[ext(0, 512, Data(u64::MAX))], "past the source"),
            (
                &[ext(
                    0,
                    512,
                    Compressed(super::Compressed {
                        source_offset: src,
                        source_length: 1,
                        codec: 0,
                    }),
                )],
                "past the source",
            ),
            (&[], "no extents"),
        ];
        for (page, want) in bad {
            let max = if *want == "asked for at most" { 2 } else { 10 };
            let err = check_page(page, 0, max, vs, src).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn digests() {
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!valid_digest(&format!("sha512:{}", "a".repeat(64))));
        assert!(!valid_digest("sha256:abc"));
    }
}
