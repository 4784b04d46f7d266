//! The one layer of checked plugin calls. Every call into a plugin goes
//! through an [`Instance`] (a store and the bindings of the plugin's kind)
//! and every answer is checked here, by the pure `check_*` functions below,
//! before the rest of the host sees it: a plugin is untrusted, so its
//! answers are input like any other.
//!
//! Cold callers make a fresh instance per call (`LoadedPlugin::resolve`,
//! `probe`, …); warm callers (the decode pool) keep one instance across
//! calls. Both run the same checked methods.

use std::path::Path;

use wasmtime::component::ResourceAny;
use wasmtime::Store;

use super::api::{ConverterBindings, KindPre, SourceBindings};
use super::bindings::disk_policy::DiskPolicy as PolicyBindings;
use super::bindings::layer_reader::LayerReader as LayerBindings;
use super::bindings::{format_converter, image_source, layer_reader, WitError};
use super::error::PluginError;
use super::manifest::PluginKind;
use super::policy::{
    check_plan, PlannedDisk, PolicyRequest, PolicyViolation, MAX_ANSWER_STRING, MAX_VIOLATIONS,
};
use super::runtime::LoadedPlugin;
use super::source::SourceFile;
use super::state::State;

pub use format_converter::exports::cocoon::plugin::converter::{
    Compressed, Extent, ExtentKind, ProbeResult,
};
pub use image_source::exports::cocoon::plugin::resolver::{Artifact, Platform};
pub use layer_reader::exports::cocoon::plugin::layer::{
    Device, Entry as LayerEntry, EntryKind, Extent as TarExtent, Xattr,
};

/// Most artifacts one reference may resolve to (layers of an image).
pub const MAX_ARTIFACTS: usize = 1024;
/// Most schemes one image source may claim.
pub const MAX_SCHEMES: usize = 64;
/// Most extents one map page may hold.
pub const MAX_EXTENTS_PER_PAGE: u32 = 4096;
/// Largest decoded extent.
pub const MAX_DECODED: u32 = 16 << 20;
/// Most entries one page of a layer may hold.
pub const MAX_ENTRIES_PER_PAGE: u32 = 4096;
/// Longest entry name or link target a layer reader may answer (the host's
/// own path rules, in `crate::layer::check`, are stricter).
pub const MAX_LAYER_NAME: usize = 64 << 10;
/// Most extents of one file (a plain tar stores a file in one).
pub const MAX_FILE_EXTENTS: usize = 1024;
/// Most extended attributes of one entry, and their largest value.
pub const MAX_XATTRS: usize = 64;
pub const MAX_XATTR_VALUE: usize = 64 << 10;

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

/// An instantiated plugin: its store and the bindings of its kind. After a
/// call traps (or hits its deadline or memory cap) the instance is
/// poisoned: every later call fails and the caller makes a new one.
pub struct Instance<'p, B> {
    plugin: &'p LoadedPlugin,
    store: Store<State>,
    bindings: B,
    poisoned: bool,
}

/// An image source instance.
pub type SourceInstance<'p> = Instance<'p, SourceBindings>;
/// A format converter instance.
pub type ConverterInstance<'p> = Instance<'p, ConverterBindings>;
/// A disk policy instance.
pub type PolicyInstance<'p> = Instance<'p, PolicyBindings>;
/// A layer reader instance.
pub type LayerInstance<'p> = Instance<'p, LayerBindings>;

impl<'p, B> Instance<'p, B> {
    pub fn plugin(&self) -> &'p LoadedPlugin {
        self.plugin
    }

    /// Runs one call under the plugin's deadline.
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

    /// Like [`Self::run`] for calls that return `result<T, error>`.
    fn run_fallible<T>(
        &mut self,
        call: &str,
        f: impl FnOnce(&B, &mut Store<State>) -> wasmtime::Result<Result<T, WitError>>,
    ) -> Result<T, PluginError> {
        self.run(call, f)?
            .map_err(|e| self.plugin.returned(call, e))
    }

    fn invalid(&self, call: &str, detail: String) -> PluginError {
        self.plugin.invalid(call, detail)
    }
}

impl LoadedPlugin {
    pub(crate) fn returned(&self, call: &str, e: WitError) -> PluginError {
        PluginError::Returned {
            plugin: self.name().to_string(),
            call: call.to_string(),
            kind: e.kind,
            message: truncated(e.message),
        }
    }

    pub(crate) fn invalid(&self, call: &str, detail: String) -> PluginError {
        PluginError::InvalidAnswer {
            plugin: self.name().to_string(),
            call: call.to_string(),
            detail,
        }
    }

    /// A fresh store with the plugin instantiated as `kind`.
    fn instance<B>(
        &self,
        kind: PluginKind,
        pick: impl FnOnce(&KindPre, &mut Store<State>) -> Option<wasmtime::Result<B>>,
    ) -> Result<Instance<'_, B>, PluginError> {
        self.expect_kind(kind)?;
        let mut store = self.new_store();
        let bindings = self.call(&mut store, "instantiate", |s| {
            pick(&self.pre, s).expect("the kind was checked")
        })?;
        Ok(Instance {
            plugin: self,
            store,
            bindings,
            poisoned: false,
        })
    }

    /// A fresh image-source instance.
    pub fn source_instance(&self) -> Result<SourceInstance<'_>, PluginError> {
        self.instance(PluginKind::ImageSource, KindPre::source)
    }

    /// A fresh format-converter instance (the decode pool keeps one per
    /// worker).
    pub fn converter_instance(&self) -> Result<ConverterInstance<'_>, PluginError> {
        self.instance(PluginKind::FormatConverter, KindPre::converter)
    }

    /// A fresh disk-policy instance.
    pub fn policy_instance(&self) -> Result<PolicyInstance<'_>, PluginError> {
        self.instance(PluginKind::DiskPolicy, KindPre::policy)
    }

    /// A fresh layer-reader instance.
    pub fn layer_instance(&self) -> Result<LayerInstance<'_>, PluginError> {
        self.instance(PluginKind::LayerReader, KindPre::layer_reader)
    }

    /// layer-reader: opens the (uncompressed) tar at `path` in a session
    /// that keeps its store for the `next` calls that follow.
    pub fn open_layer(&self, path: &Path) -> Result<LayerSession<'_>, PluginError> {
        self.layer_instance()?.open(path)
    }

    /// image-source: the schemes the plugin resolves.
    pub fn schemes(&self) -> Result<Vec<String>, PluginError> {
        self.source_instance()?.schemes()
    }

    /// image-source: resolves `reference` into checked artifacts.
    pub fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<Vec<Artifact>, PluginError> {
        self.source_instance()?.resolve(reference, platform)
    }

    /// format-converter: what the plugin makes of a file's first and last
    /// bytes.
    pub fn probe(
        &self,
        head: &[u8],
        tail: &[u8],
        file_size: u64,
    ) -> Result<Option<ProbeResult>, PluginError> {
        self.converter_instance()?.probe(head, tail, file_size)
    }

    /// format-converter: opens `path` as `format` in a session that keeps
    /// its store for the map calls that follow.
    pub fn open_image(&self, path: &Path, format: &str) -> Result<ImageSession<'_>, PluginError> {
        self.converter_instance()?.open(path, format)
    }

    /// format-converter: decodes one compressed extent.
    pub fn decode(
        &self,
        extent: Compressed,
        input: &[u8],
        length: u32,
    ) -> Result<Vec<u8>, PluginError> {
        self.converter_instance()?.decode(extent, input, length)
    }
}

impl SourceInstance<'_> {
    /// schemes(), checked.
    pub fn schemes(&mut self) -> Result<Vec<String>, PluginError> {
        let schemes = self.run("schemes", |b, s| b.schemes(s))?;
        check_schemes(&schemes).map_err(|d| self.invalid("schemes", d))?;
        Ok(schemes)
    }

    /// resolve(), checked.
    pub fn resolve(
        &mut self,
        reference: &str,
        platform: &Platform,
    ) -> Result<Vec<Artifact>, PluginError> {
        let artifacts = self.run_fallible("resolve", |b, s| b.resolve(s, reference, platform))?;
        check_artifacts(&artifacts).map_err(|d| self.invalid("resolve", d))?;
        Ok(artifacts)
    }
}

impl<'p> ConverterInstance<'p> {
    /// probe(), checked.
    pub fn probe(
        &mut self,
        head: &[u8],
        tail: &[u8],
        file_size: u64,
    ) -> Result<Option<ProbeResult>, PluginError> {
        let r = self.run("probe", |b, s| b.probe(s, head, tail, file_size))?;
        if let Some(p) = &r {
            check_probe(p).map_err(|d| self.invalid("probe", d))?;
        }
        Ok(r)
    }

    /// Opens `path` as `format` on this instance, which the session keeps.
    pub fn open(mut self, path: &Path, format: &str) -> Result<ImageSession<'p>, PluginError> {
        let src = SourceFile::open(path).map_err(PluginError::io("opening source", path))?;
        let source_size = src.size();
        let handle =
            self.store
                .data_mut()
                .push_source(src)
                .map_err(|e| PluginError::Instantiate {
                    plugin: self.plugin.name().to_string(),
                    detail: format!("{e:#}"),
                })?;
        let image = self.run_fallible("open", |b, s| b.open(s, handle, format))?;
        let virtual_size = self.run("virtual-size", |b, s| b.virtual_size(s, image))?;
        Ok(ImageSession {
            instance: self,
            image,
            virtual_size,
            source_size,
        })
    }

    /// decode(), checked: `length` is bounded before the call and the
    /// answer must be exactly `length` bytes.
    pub fn decode(
        &mut self,
        extent: Compressed,
        input: &[u8],
        length: u32,
    ) -> Result<Vec<u8>, PluginError> {
        check_decode_length(length).map_err(|d| self.invalid("decode", d))?;
        let out = self.run_fallible("decode", |b, s| b.decode(s, extent, input, length))?;
        check_decoded(&out, length).map_err(|d| self.invalid("decode", d))?;
        Ok(out)
    }
}

impl PolicyInstance<'_> {
    /// validate(), checked.
    pub fn validate(
        &mut self,
        request: &PolicyRequest,
    ) -> Result<Vec<PolicyViolation>, PluginError> {
        let wit_request = request.into();
        let violations = self.run("validate", |b, s| {
            b.cocoon_plugin_policy().call_validate(s, &wit_request)
        })?;
        if violations.len() > MAX_VIOLATIONS {
            return Err(self.invalid(
                "validate",
                format!("{} violations, at most {MAX_VIOLATIONS}", violations.len()),
            ));
        }
        Ok(violations
            .into_iter()
            .map(|v| PolicyViolation {
                field: truncated(v.field),
                message: truncated(v.message),
            })
            .collect())
    }

    /// plan(), checked by [`check_plan`]: a plan that does not answer its
    /// request is refused with every problem listed.
    pub fn plan(&mut self, request: &PolicyRequest) -> Result<Vec<PlannedDisk>, PluginError> {
        let wit_request = request.into();
        let disks = self.run_fallible("plan", |b, s| {
            b.cocoon_plugin_policy().call_plan(s, &wit_request)
        })?;
        let plan: Vec<PlannedDisk> = disks.into_iter().map(Into::into).collect();
        let problems = check_plan(request, &plan);
        if !problems.is_empty() {
            return Err(PluginError::BadPlan {
                plugin: self.plugin.name().to_string(),
                problems,
            });
        }
        Ok(plan)
    }
}

impl<'p> LayerInstance<'p> {
    /// Opens `path` on this instance, which the session keeps.
    pub fn open(mut self, path: &Path) -> Result<LayerSession<'p>, PluginError> {
        let src = SourceFile::open(path).map_err(PluginError::io("opening layer", path))?;
        let source_size = src.size();
        let handle =
            self.store
                .data_mut()
                .push_source(src)
                .map_err(|e| PluginError::Instantiate {
                    plugin: self.plugin.name().to_string(),
                    detail: format!("{e:#}"),
                })?;
        let layer = self.run_fallible("open", |b, s| {
            b.cocoon_plugin_layer().layer().call_open(s, handle)
        })?;
        Ok(LayerSession {
            instance: self,
            layer,
            source_size,
            done: false,
        })
    }
}

/// An opened layer: one instance kept across the `next` calls. After a
/// trap the session is spent.
pub struct LayerSession<'p> {
    instance: LayerInstance<'p>,
    layer: ResourceAny,
    source_size: u64,
    done: bool,
}

impl LayerSession<'_> {
    /// The next page of entries, checked by [`check_entries`]; empty at
    /// the end, and empty ever after.
    pub fn next(&mut self, max: u32) -> Result<Vec<LayerEntry>, PluginError> {
        if self.done {
            return Ok(Vec::new());
        }
        let max = max.clamp(1, MAX_ENTRIES_PER_PAGE);
        let layer = self.layer;
        let entries = self.instance.run_fallible("next", |b, s| {
            b.cocoon_plugin_layer().layer().call_next(s, layer, max)
        })?;
        check_entries(&entries, max, self.source_size)
            .map_err(|detail| self.instance.invalid("next", detail))?;
        self.done = entries.is_empty();
        Ok(entries)
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        self.instance.plugin
    }
}

/// An opened image: one instance kept across the map calls of a
/// conversion. After a trap the session is spent. The image resource
/// belongs to the store, so dropping the session frees it without calling
/// back into a possibly trapped instance.
pub struct ImageSession<'p> {
    instance: ConverterInstance<'p>,
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
        let image = self.image;
        let name = self.instance.run("backing", |b, s| b.backing(s, image))?;
        if let Some(n) = name.as_ref().filter(|n| n.len() > MAX_ANSWER_STRING) {
            return Err(self
                .instance
                .invalid("backing", format!("a backing name of {} bytes", n.len())));
        }
        Ok(name)
    }

    /// One page of extents from `offset`, checked by [`check_page`].
    pub fn map(&mut self, offset: u64, max: u32) -> Result<Vec<Extent>, PluginError> {
        let max = max.min(MAX_EXTENTS_PER_PAGE);
        let image = self.image;
        let extents = self
            .instance
            .run_fallible("map", |b, s| b.map(s, image, offset, max))?;
        check_page(&extents, offset, max, self.virtual_size, self.source_size)
            .map_err(|detail| self.instance.invalid("map", detail))?;
        Ok(extents)
    }
}

/// Plugin messages end up in logs and terminals: keep them bounded.
fn truncated(mut s: String) -> String {
    if s.len() > MAX_ANSWER_STRING {
        let mut end = MAX_ANSWER_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Schemes are URL schemes (RFC 3986, lower case), few and short.
pub fn check_schemes(schemes: &[String]) -> Result<(), String> {
    if schemes.len() > MAX_SCHEMES {
        return Err(format!("{} schemes, at most {MAX_SCHEMES}", schemes.len()));
    }
    for scheme in schemes {
        let ok = scheme.len() <= 32
            && scheme
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase())
            && scheme.bytes().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'+' || c == b'-' || c == b'.'
            });
        if !ok {
            return Err(format!("{scheme:?} is not a URL scheme"));
        }
    }
    Ok(())
}

/// At most [`MAX_ARTIFACTS`], each with a URL that parses and, when given,
/// a well-formed digest.
pub fn check_artifacts(artifacts: &[Artifact]) -> Result<(), String> {
    if artifacts.len() > MAX_ARTIFACTS {
        return Err(format!(
            "{} artifacts, at most {MAX_ARTIFACTS}",
            artifacts.len()
        ));
    }
    for a in artifacts {
        if let Some(d) = &a.digest {
            if !valid_digest(d) {
                return Err(format!("digest {d:?} is not sha256:<64 lower-case hex>"));
            }
        }
        if a.url.len() > MAX_ANSWER_STRING || url::Url::parse(&a.url).is_err() {
            return Err(format!("artifact URL {:?} does not parse", a.url));
        }
    }
    Ok(())
}

/// A confidence of 0 to 100 and a short format name.
pub fn check_probe(p: &ProbeResult) -> Result<(), String> {
    if p.confidence > 100 || p.format.is_empty() || p.format.len() > 32 {
        return Err(format!("{p:?}"));
    }
    Ok(())
}

/// The host never asks for, nor allocates, more than [`MAX_DECODED`].
pub fn check_decode_length(length: u32) -> Result<(), String> {
    if length > MAX_DECODED {
        return Err(format!("extent of {length} bytes is over {MAX_DECODED}"));
    }
    Ok(())
}

/// A decoded extent is exactly the length asked for.
pub fn check_decoded(out: &[u8], length: u32) -> Result<(), String> {
    if out.len() != length as usize {
        return Err(format!("{} bytes decoded, {length} expected", out.len()));
    }
    Ok(())
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The rules a map page must satisfy: at most `max` extents, contiguous
/// from `offset`, non-empty, inside the virtual size, data and compressed
/// bytes inside the source, compressed extents at most [`MAX_DECODED`].
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

/// The shape of a page of layer entries: at most `max`; names and link
/// targets non-empty and at most [`MAX_LAYER_NAME`] bytes; a link target
/// exactly on links, a device exactly on devices; a file's extents inside
/// the tar, in order, not overlapping, adding up to its size; nothing but
/// files with a size or extents; bounded xattrs. Names, links between
/// entries and limits over the whole layer are checked by
/// `crate::layer::check`, which every page goes through next.
pub fn check_entries(entries: &[LayerEntry], max: u32, source_size: u64) -> Result<(), String> {
    if entries.len() > max as usize {
        return Err(format!(
            "{} entries, asked for at most {max}",
            entries.len()
        ));
    }
    for e in entries {
        check_entry(e, source_size).map_err(|why| {
            let mut name = e.name.clone();
            if name.len() > 256 {
                let mut end = 256;
                while !name.is_char_boundary(end) {
                    end -= 1;
                }
                name.truncate(end);
                name.push('…');
            }
            format!("entry {name:?}: {why}")
        })?;
    }
    Ok(())
}

fn check_entry(e: &LayerEntry, source_size: u64) -> Result<(), String> {
    if e.name.is_empty() || e.name.len() > MAX_LAYER_NAME {
        return Err(format!(
            "a name of {} bytes (1 to {MAX_LAYER_NAME})",
            e.name.len()
        ));
    }
    if e.mode > 0o7777 {
        return Err(format!("mode {:o} has bits beyond 07777", e.mode));
    }
    let is_link = matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink);
    match (&e.link_target, is_link) {
        (Some(t), true) if t.is_empty() || t.len() > MAX_LAYER_NAME => {
            return Err(format!(
                "a link target of {} bytes (1 to {MAX_LAYER_NAME})",
                t.len()
            ))
        }
        (Some(_), true) | (None, false) => {}
        (None, true) => return Err(format!("a {:?} without a target", e.kind)),
        (Some(_), false) => return Err(format!("a {:?} with a link target", e.kind)),
    }
    let is_device = matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice);
    if e.device.is_some() != is_device {
        return Err(format!("a {:?} with device {:?}", e.kind, e.device));
    }
    if e.kind != EntryKind::File && (e.size != 0 || !e.extents.is_empty()) {
        return Err(format!("a {:?} with contents", e.kind));
    }
    if e.extents.len() > MAX_FILE_EXTENTS {
        return Err(format!(
            "{} extents, at most {MAX_FILE_EXTENTS}",
            e.extents.len()
        ));
    }
    let mut total = 0u64;
    let mut at = 0u64;
    for x in &e.extents {
        let end = x
            .offset
            .checked_add(x.length)
            .filter(|&end| end <= source_size)
            .ok_or_else(|| {
                format!(
                    "contents at {}+{} are past the end of the tar ({source_size} bytes)",
                    x.offset, x.length
                )
            })?;
        if x.offset < at {
            return Err(format!("extents overlap or go backwards at {}", x.offset));
        }
        at = end;
        total += x.length;
    }
    if total != e.size {
        return Err(format!("extents of {total} bytes for a size of {}", e.size));
    }
    if e.xattrs.len() > MAX_XATTRS {
        return Err(format!("{} xattrs, at most {MAX_XATTRS}", e.xattrs.len()));
    }
    for x in &e.xattrs {
        if x.name.is_empty()
            || x.name.len() > 255
            || x.name.contains('\0')
            || x.value.len() > MAX_XATTR_VALUE
        {
            return Err(format!(
                "xattr {:?} of {} bytes",
                x.name.chars().take(64).collect::<String>(),
                x.value.len()
            ));
        }
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
        let compressed = |source_offset, length| {
            ext(
                0,
                length,
                Compressed(super::Compressed {
                    source_offset,
                    source_length: 1,
                    codec: 0,
                }),
            )
        };
        let bad: &[(&[Extent], &str)] = &[
            (&ok, "asked for at most"),
            (&[ext(0, 512, Data(0)), ext(1024, 512, Zero)], "gap"),
            (&[ext(0, 512, Data(0)), ext(256, 512, Zero)], "overlap"),
            (&[ext(0, 0, Zero)], "empty"),
            (&[ext(0, vs + 1, Zero)], "past the virtual size"),
            (&[ext(0, 512, Data(src - 100))], "past the source"),
            (&[ext(0, 512, Data(u64::MAX))], "past the source"),
            (&[compressed(src, 512)], "past the source"),
            (&[], "no extents"),
        ];
        for (page, want) in bad {
            let max = if *want == "asked for at most" { 2 } else { 10 };
            let err = check_page(page, 0, max, vs, src).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let big = u64::from(MAX_DECODED) + 1;
        let err = check_page(&[compressed(0, big)], 0, 10, 1 << 30, src).unwrap_err();
        assert!(err.contains("over"), "{err}");
    }

    #[test]
    fn scheme_rules() {
        let ok = |s: &[&str]| check_schemes(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["oci", "site+v2", "a.b-c"]).is_ok());
        assert!(ok(&[]).is_ok());
        for bad in ["", "OCI", "1abc", "a/b", "a:b", &"a".repeat(33)] {
            assert!(
                ok(&[bad]).unwrap_err().contains("not a URL scheme"),
                "{bad}"
            );
        }
        let many: Vec<String> = (0..=MAX_SCHEMES).map(|i| format!("s{i}")).collect();
        assert!(check_schemes(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn artifact_rules() {
        let a = |url: &str, digest: Option<&str>| Artifact {
            url: url.into(),
            digest: digest.map(Into::into),
            size: None,
            media_type: String::new(),
            format_hint: None,
            headers: Vec::new(),
        };
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(check_artifacts(&[a("https://x/y", Some(&good))]).is_ok());
        let bad_digest = format!("sha256:{}", "A".repeat(64));
        let cases = [
            (a("not a url", None), "does not parse"),
            (a("https://x/y", Some(&bad_digest)), "is not sha256"),
            (a("https://x/y", Some("sha512:aa")), "is not sha256"),
        ];
        for (art, want) in cases {
            let err = check_artifacts(&[art]).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let many = vec![a("https://x/y", None); MAX_ARTIFACTS + 1];
        assert!(check_artifacts(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn probe_and_decode_rules() {
        let p = |format: &str, confidence| ProbeResult {
            format: format.into(),
            confidence,
        };
        assert!(check_probe(&p("qcow2", 100)).is_ok());
        assert!(check_probe(&p("qcow2", 101)).is_err());
        assert!(check_probe(&p("", 50)).is_err());
        assert!(check_probe(&p(&"x".repeat(33), 50)).is_err());
        assert!(check_decode_length(MAX_DECODED).is_ok());
        assert!(check_decode_length(MAX_DECODED + 1).is_err());
        assert!(check_decoded(&[0; 4], 4).is_ok());
        assert!(check_decoded(&[0; 3], 4).is_err());
    }

    #[test]
    fn layer_entry_rules() {
        let file = |name: &str, size: u64, extents: Vec<TarExtent>| LayerEntry {
            kind: EntryKind::File,
            name: name.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            link_target: None,
            size,
            extents,
            device: None,
            xattrs: Vec::new(),
        };
        let x = |offset, length| TarExtent { offset, length };
        let tar = 10_240;
        assert!(check_entries(&[file("a", 5, vec![x(512, 5)])], 4, tar).is_ok());
        assert!(check_entries(&[file("empty", 0, vec![])], 4, tar).is_ok());
        let symlink = LayerEntry {
            kind: EntryKind::Symlink,
            link_target: Some("b".into()),
            ..file("l", 0, vec![])
        };
        assert!(check_entries(std::slice::from_ref(&symlink), 4, tar).is_ok());
        let long = "n".repeat(MAX_LAYER_NAME + 1);
        let cases: Vec<(LayerEntry, &str)> = vec![
            (
                file("a", 5, vec![x(10_000, 500)]),
                "past the end of the tar",
            ),
            (
                file("a", 5, vec![x(u64::MAX, 5)]),
                "past the end of the tar",
            ),
            (
                file("a", 6, vec![x(512, 5)]),
                "extents of 5 bytes for a size of 6",
            ),
            (file("a", 10, vec![x(512, 5), x(514, 5)]), "overlap"),
            (file("", 0, vec![]), "a name of 0 bytes"),
            (file(&long, 0, vec![]), "a name of 65537 bytes"),
            (
                LayerEntry {
                    mode: 0o17777,
                    ..file("m", 0, vec![])
                },
                "beyond 07777",
            ),
            (
                LayerEntry {
                    link_target: None,
                    ..symlink.clone()
                },
                "without a target",
            ),
            (
                LayerEntry {
                    kind: EntryKind::Directory,
                    ..symlink.clone()
                },
                "with a link target",
            ),
            (
                LayerEntry {
                    kind: EntryKind::Directory,
                    ..file("d", 5, vec![x(512, 5)])
                },
                "with contents",
            ),
            (
                LayerEntry {
                    kind: EntryKind::CharDevice,
                    ..file("c", 0, vec![])
                },
                "with device None",
            ),
        ];
        for (e, want) in cases {
            let err = check_entries(std::slice::from_ref(&e), 4, tar).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
            if !e.name.is_empty() && e.name.len() < 100 {
                assert!(err.starts_with(&format!("entry {:?}", e.name)), "{err}");
            }
        }
        let page = vec![file("a", 0, vec![]); 5];
        assert!(check_entries(&page, 4, tar)
            .unwrap_err()
            .contains("at most 4"));
    }

    #[test]
    fn digests() {
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!valid_digest(&format!("sha512:{}", "a".repeat(64))));
        assert!(!valid_digest("sha256:abc"));
    }
}
