//! The plugin API versions this host links, and the calls of each kind
//! over whichever version a plugin was built against.
//!
//! The host implements `cocoon:plugin@0.2.1`. Image-source and
//! format-converter plugins built against 0.1.x keep loading: those
//! interfaces did not change, so the host links the 0.1 imports too and
//! converts 0.1 answers into the 0.2 types the rest of the host uses. Disk
//! policies must be 0.2 (their interface changed), layer readers 0.2.1 or
//! later 0.2.x (their world is new in 0.2.1); any other version is refused
//! with both versions named. 0.2.0 plugins load on this 0.2.1 host as they
//! are: wasmtime resolves 0.2.x names by semver, both ways.
//!
//! Everything here is unchecked plumbing: the checks on what a plugin
//! answers live in [`super::calls`], which every caller goes through.

use std::fmt;

use wasmtime::component::{HasSelf, Linker, Resource, ResourceAny};
use wasmtime::Store;

use super::bindings::{disk_policy, format_converter, image_source, layer_reader, v0_1, WitError};
use super::manifest::PluginKind;
use super::source::SourceFile;
use super::state::State;

use format_converter::exports::cocoon::plugin::converter::{
    Compressed, Extent, ExtentKind, ProbeResult,
};
use image_source::exports::cocoon::plugin::resolver::{Artifact, Platform};

/// A plugin API version, `cocoon:plugin@MAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion(pub u64, pub u64, pub u64);

/// The version this host implements.
pub const HOST_API: ApiVersion = ApiVersion(0, 2, 1);

impl ApiVersion {
    /// Parses `MAJOR.MINOR.PATCH` (pre-release and build suffixes ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let core = s.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|p| {
            if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
                None
            } else {
                p.parse::<u64>().ok()
            }
        });
        let v = ApiVersion(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }

    /// The version of a WIT name such as `cocoon:plugin/host@0.1.0`.
    pub fn of_wit_name(name: &str) -> Option<Self> {
        let (_, version) = name.split_once('@')?;
        Self::parse(version)
    }

    /// Whether a plugin of `kind` built against this version loads on this
    /// host. Within 0.x a minor version is a breaking one; patch releases
    /// only add host imports.
    pub fn supported_for(self, kind: PluginKind) -> bool {
        match (self.0, self.1) {
            (0, 2) if kind == PluginKind::LayerReader => self.2 >= 1,
            (0, 2) => true,
            (0, 1) => matches!(kind, PluginKind::ImageSource | PluginKind::FormatConverter),
            _ => false,
        }
    }

    /// What this host loads for `kind`, for messages.
    pub fn supported_text(kind: PluginKind) -> &'static str {
        match kind {
            PluginKind::DiskPolicy => "0.2.x",
            PluginKind::LayerReader => "0.2.x from 0.2.1",
            PluginKind::ImageSource | PluginKind::FormatConverter => "0.1.x and 0.2.x",
        }
    }

    fn is_v0_1(self) -> bool {
        (self.0, self.1) == (0, 1)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The WIT interface a plugin of `kind` must export.
pub fn export_interface(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::ImageSource => "cocoon:plugin/resolver",
        PluginKind::FormatConverter => "cocoon:plugin/converter",
        PluginKind::DiskPolicy => "cocoon:plugin/policy",
        PluginKind::LayerReader => "cocoon:plugin/layer",
    }
}

/// Links the host imports of every supported version.
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    image_source::cocoon::plugin::types::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?;
    image_source::cocoon::plugin::host::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?;
    image_source::cocoon::plugin::fetch::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?;
    format_converter::cocoon::plugin::source::add_to_linker::<State, HasSelf<State>>(
        linker,
        |s| s,
    )?;
    v0_1::image_source::cocoon::plugin::types::add_to_linker::<State, HasSelf<State>>(
        linker,
        |s| s,
    )?;
    v0_1::image_source::cocoon::plugin::host::add_to_linker::<State, HasSelf<State>>(
        linker,
        |s| s,
    )?;
    v0_1::image_source::cocoon::plugin::fetch::add_to_linker::<State, HasSelf<State>>(
        linker,
        |s| s,
    )?;
    v0_1::format_converter::cocoon::plugin::source::add_to_linker::<State, HasSelf<State>>(
        linker,
        |s| s,
    )?;
    Ok(())
}

/// A component prepared for instantiation as its kind, in its version.
#[derive(Clone)]
pub(crate) enum KindPre {
    ImageSource(image_source::ImageSourcePre<State>),
    ImageSourceV0_1(v0_1::image_source::ImageSourcePre<State>),
    FormatConverter(format_converter::FormatConverterPre<State>),
    FormatConverterV0_1(v0_1::format_converter::FormatConverterPre<State>),
    DiskPolicy(disk_policy::DiskPolicyPre<State>),
    LayerReader(layer_reader::LayerReaderPre<State>),
}

impl KindPre {
    /// Prepares `pre` as a plugin of `kind` built against `version`
    /// (already checked to be supported).
    pub(crate) fn new(
        kind: PluginKind,
        version: ApiVersion,
        pre: wasmtime::component::InstancePre<State>,
    ) -> wasmtime::Result<Self> {
        Ok(match (kind, version.is_v0_1()) {
            (PluginKind::ImageSource, false) => {
                KindPre::ImageSource(image_source::ImageSourcePre::new(pre)?)
            }
            (PluginKind::ImageSource, true) => {
                KindPre::ImageSourceV0_1(v0_1::image_source::ImageSourcePre::new(pre)?)
            }
            (PluginKind::FormatConverter, false) => {
                KindPre::FormatConverter(format_converter::FormatConverterPre::new(pre)?)
            }
            (PluginKind::FormatConverter, true) => {
                KindPre::FormatConverterV0_1(v0_1::format_converter::FormatConverterPre::new(pre)?)
            }
            (PluginKind::DiskPolicy, _) => {
                KindPre::DiskPolicy(disk_policy::DiskPolicyPre::new(pre)?)
            }
            (PluginKind::LayerReader, _) => {
                KindPre::LayerReader(layer_reader::LayerReaderPre::new(pre)?)
            }
        })
    }

    pub(crate) fn source(
        &self,
        store: &mut Store<State>,
    ) -> Option<wasmtime::Result<SourceBindings>> {
        Some(match self {
            KindPre::ImageSource(p) => p.instantiate(store).map(SourceBindings::V0_2),
            KindPre::ImageSourceV0_1(p) => p.instantiate(store).map(SourceBindings::V0_1),
            _ => return None,
        })
    }

    pub(crate) fn converter(
        &self,
        store: &mut Store<State>,
    ) -> Option<wasmtime::Result<ConverterBindings>> {
        Some(match self {
            KindPre::FormatConverter(p) => p.instantiate(store).map(ConverterBindings::V0_2),
            KindPre::FormatConverterV0_1(p) => p.instantiate(store).map(ConverterBindings::V0_1),
            _ => return None,
        })
    }

    pub(crate) fn policy(
        &self,
        store: &mut Store<State>,
    ) -> Option<wasmtime::Result<disk_policy::DiskPolicy>> {
        match self {
            KindPre::DiskPolicy(p) => Some(p.instantiate(store)),
            _ => None,
        }
    }
}

impl KindPre {
    pub(crate) fn layer_reader(
        &self,
        store: &mut Store<State>,
    ) -> Option<wasmtime::Result<layer_reader::LayerReader>> {
        match self {
            KindPre::LayerReader(p) => Some(p.instantiate(store)),
            _ => None,
        }
    }
}

/// An instantiated image source, of either version.
pub enum SourceBindings {
    V0_2(image_source::ImageSource),
    V0_1(v0_1::image_source::ImageSource),
}

impl SourceBindings {
    pub(crate) fn schemes(&self, s: &mut Store<State>) -> wasmtime::Result<Vec<String>> {
        match self {
            Self::V0_2(b) => b.cocoon_plugin_resolver().call_schemes(s),
            Self::V0_1(b) => b.cocoon_plugin_resolver().call_schemes(s),
        }
    }

    pub(crate) fn resolve(
        &self,
        s: &mut Store<State>,
        reference: &str,
        platform: &Platform,
    ) -> wasmtime::Result<Result<Vec<Artifact>, WitError>> {
        match self {
            Self::V0_2(b) => b
                .cocoon_plugin_resolver()
                .call_resolve(s, reference, platform),
            Self::V0_1(b) => Ok(b
                .cocoon_plugin_resolver()
                .call_resolve(s, reference, &platform.clone().into())?
                .map(|a| a.into_iter().map(Into::into).collect())
                .map_err(Into::into)),
        }
    }
}

/// An instantiated format converter, of either version.
pub enum ConverterBindings {
    V0_2(format_converter::FormatConverter),
    V0_1(v0_1::format_converter::FormatConverter),
}

impl ConverterBindings {
    pub(crate) fn probe(
        &self,
        s: &mut Store<State>,
        head: &[u8],
        tail: &[u8],
        file_size: u64,
    ) -> wasmtime::Result<Option<ProbeResult>> {
        match self {
            Self::V0_2(b) => b
                .cocoon_plugin_converter()
                .call_probe(s, head, tail, file_size),
            Self::V0_1(b) => Ok(b
                .cocoon_plugin_converter()
                .call_probe(s, head, tail, file_size)?
                .map(Into::into)),
        }
    }

    pub(crate) fn open(
        &self,
        s: &mut Store<State>,
        src: Resource<SourceFile>,
        format: &str,
    ) -> wasmtime::Result<Result<ResourceAny, WitError>> {
        match self {
            Self::V0_2(b) => b
                .cocoon_plugin_converter()
                .image()
                .call_open(s, src, format),
            Self::V0_1(b) => Ok(b
                .cocoon_plugin_converter()
                .image()
                .call_open(s, src, format)?
                .map_err(Into::into)),
        }
    }

    pub(crate) fn virtual_size(
        &self,
        s: &mut Store<State>,
        image: ResourceAny,
    ) -> wasmtime::Result<u64> {
        match self {
            Self::V0_2(b) => b
                .cocoon_plugin_converter()
                .image()
                .call_virtual_size(s, image),
            Self::V0_1(b) => b
                .cocoon_plugin_converter()
                .image()
                .call_virtual_size(s, image),
        }
    }

    pub(crate) fn backing(
        &self,
        s: &mut Store<State>,
        image: ResourceAny,
    ) -> wasmtime::Result<Option<String>> {
        match self {
            Self::V0_2(b) => b.cocoon_plugin_converter().image().call_backing(s, image),
            Self::V0_1(b) => b.cocoon_plugin_converter().image().call_backing(s, image),
        }
    }

    pub(crate) fn map(
        &self,
        s: &mut Store<State>,
        image: ResourceAny,
        offset: u64,
        max: u32,
    ) -> wasmtime::Result<Result<Vec<Extent>, WitError>> {
        match self {
            Self::V0_2(b) => b
                .cocoon_plugin_converter()
                .image()
                .call_map(s, image, offset, max),
            Self::V0_1(b) => Ok(b
                .cocoon_plugin_converter()
                .image()
                .call_map(s, image, offset, max)?
                .map(|e| e.into_iter().map(Into::into).collect())
                .map_err(Into::into)),
        }
    }

    pub(crate) fn decode(
        &self,
        s: &mut Store<State>,
        extent: Compressed,
        input: &[u8],
        length: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, WitError>> {
        match self {
            Self::V0_2(b) => b
                .cocoon_plugin_converter()
                .call_decode(s, extent, input, length),
            Self::V0_1(b) => Ok(b
                .cocoon_plugin_converter()
                .call_decode(s, extent.into(), input, length)?
                .map_err(Into::into)),
        }
    }
}

/// `From` both ways between two generated records of the same shape.
macro_rules! same_record {
    ($a:ty, $b:ty { $($field:ident),* $(,)? }) => {
        impl From<$a> for $b {
            fn from(x: $a) -> Self {
                Self { $($field: x.$field.into()),* }
            }
        }
        impl From<$b> for $a {
            fn from(x: $b) -> Self {
                Self { $($field: x.$field.into()),* }
            }
        }
    };
}

/// `From` both ways between two generated enums with the same cases.
macro_rules! same_enum {
    ($a:ident, $b:ty { $($case:ident),* $(,)? }) => {
        impl From<$a> for $b {
            fn from(x: $a) -> Self {
                match x { $($a::$case => Self::$case),* }
            }
        }
        impl From<$b> for $a {
            fn from(x: $b) -> Self {
                type B = $b;
                match x { $(B::$case => Self::$case),* }
            }
        }
    };
}

mod convert_v0_1 {
    use super::super::bindings::image_source::cocoon::plugin::{fetch, host, types};
    use super::super::bindings::v0_1::format_converter::exports::cocoon::plugin::converter as old_conv;
    use super::super::bindings::v0_1::image_source::cocoon::plugin::{
        fetch as old_fetch, host as old_host, types as old_types,
    };
    use super::super::bindings::v0_1::image_source::exports::cocoon::plugin::resolver as old_res;
    use super::*;

    use types::ErrorKind;
    same_enum!(
        ErrorKind,
        old_types::ErrorKind {
            InvalidInput,
            Unsupported,
            LimitExceeded,
            Io,
            Internal
        }
    );
    same_record!(types::Error, old_types::Error { kind, message });
    use host::LogLevel;
    same_enum!(
        LogLevel,
        old_host::LogLevel {
            Trace,
            Debug,
            Info,
            Warn,
            Error
        }
    );
    use fetch::Method;
    same_enum!(Method, old_fetch::Method { Get, Head });
    same_record!(
        fetch::Request,
        old_fetch::Request {
            method,
            url,
            headers,
            max_bytes,
            follow_redirects
        }
    );
    same_record!(
        fetch::Response,
        old_fetch::Response {
            status,
            headers,
            body,
            final_url
        }
    );
    same_record!(
        Platform,
        old_res::Platform {
            os,
            architecture,
            variant
        }
    );
    same_record!(
        Artifact,
        old_res::Artifact {
            url,
            digest,
            size,
            media_type,
            format_hint,
            headers
        }
    );
    same_record!(ProbeResult, old_conv::ProbeResult { format, confidence });
    same_record!(
        Compressed,
        old_conv::Compressed {
            source_offset,
            source_length,
            codec
        }
    );
    same_record!(
        Extent,
        old_conv::Extent {
            offset,
            length,
            kind
        }
    );

    impl From<old_conv::ExtentKind> for ExtentKind {
        fn from(k: old_conv::ExtentKind) -> Self {
            match k {
                old_conv::ExtentKind::Zero => ExtentKind::Zero,
                old_conv::ExtentKind::Data(at) => ExtentKind::Data(at),
                old_conv::ExtentKind::Compressed(c) => ExtentKind::Compressed(c.into()),
                old_conv::ExtentKind::Backing => ExtentKind::Backing,
            }
        }
    }

    impl From<ExtentKind> for old_conv::ExtentKind {
        fn from(k: ExtentKind) -> Self {
            match k {
                ExtentKind::Zero => old_conv::ExtentKind::Zero,
                ExtentKind::Data(at) => old_conv::ExtentKind::Data(at),
                ExtentKind::Compressed(c) => old_conv::ExtentKind::Compressed(c.into()),
                ExtentKind::Backing => old_conv::ExtentKind::Backing,
            }
        }
    }

    // The 0.1 host imports, served by the 0.2 implementations.

    impl old_types::Host for State {}

    impl old_host::Host for State {
        fn log(
            &mut self,
            level: old_host::LogLevel,
            message: String,
            fields: Vec<(String, String)>,
        ) {
            host::Host::log(self, level.into(), message, fields)
        }

        fn config(&mut self) -> Vec<(String, String)> {
            host::Host::config(self)
        }

        fn config_get(&mut self, key: String) -> Option<String> {
            host::Host::config_get(self, key)
        }
    }

    impl old_fetch::Host for State {
        fn fetch(
            &mut self,
            req: old_fetch::Request,
        ) -> Result<old_fetch::Response, old_types::Error> {
            fetch::Host::fetch(self, req.into())
                .map(Into::into)
                .map_err(Into::into)
        }
    }

    use super::super::bindings::format_converter::cocoon::plugin::source;
    use super::super::bindings::v0_1::format_converter::cocoon::plugin::source as old_source;

    impl old_source::Host for State {
        fn max_read(&mut self) -> u32 {
            source::Host::max_read(self)
        }
    }

    impl old_source::HostSource for State {
        fn size(&mut self, this: Resource<SourceFile>) -> u64 {
            source::HostSource::size(self, this)
        }

        fn read_at(
            &mut self,
            this: Resource<SourceFile>,
            offset: u64,
            len: u32,
        ) -> Result<Vec<u8>, old_types::Error> {
            source::HostSource::read_at(self, this, offset, len).map_err(Into::into)
        }

        fn drop(&mut self, this: Resource<SourceFile>) -> wasmtime::Result<()> {
            source::HostSource::drop(self, this)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PluginKind::*;

    #[test]
    fn versions_parse() {
        assert_eq!(ApiVersion::parse("0.1.7"), Some(ApiVersion(0, 1, 7)));
        assert_eq!(ApiVersion::parse("1.2.3-rc.1"), Some(ApiVersion(1, 2, 3)));
        for bad in ["", "1", "1.2", "1.2.3.4", "01.2.3", "a.b.c"] {
            assert_eq!(ApiVersion::parse(bad), None, "{bad}");
        }
        assert_eq!(
            ApiVersion::of_wit_name("cocoon:plugin/resolver@0.1.0"),
            Some(ApiVersion(0, 1, 0))
        );
        assert_eq!(ApiVersion::of_wit_name("cocoon:plugin/resolver"), None);
    }

    #[test]
    fn supported_versions_per_kind() {
        let cases = [
            (ApiVersion(0, 2, 0), DiskPolicy, true),
            (ApiVersion(0, 2, 9), ImageSource, true),
            (ApiVersion(0, 1, 0), ImageSource, true),
            (ApiVersion(0, 1, 3), FormatConverter, true),
            (ApiVersion(0, 1, 0), DiskPolicy, false),
            (ApiVersion(0, 3, 0), ImageSource, false),
            (ApiVersion(1, 2, 0), FormatConverter, false),
            (ApiVersion(0, 0, 1), DiskPolicy, false),
            (ApiVersion(0, 2, 1), LayerReader, true),
            (ApiVersion(0, 2, 5), LayerReader, true),
            (ApiVersion(0, 2, 0), LayerReader, false),
            (ApiVersion(0, 1, 0), LayerReader, false),
            (ApiVersion(0, 2, 0), FormatConverter, true),
        ];
        for (v, kind, ok) in cases {
            assert_eq!(v.supported_for(kind), ok, "{v} {kind}");
        }
        for kind in PluginKind::ALL {
            assert!(HOST_API.supported_for(kind), "{kind}");
        }
    }
}
