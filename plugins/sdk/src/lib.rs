//! The cocoon-host plugin SDK.
//!
//! Enable the feature of the plugin kind you write (`image-source`,
//! `format-converter`, `disk-policy` or `layer-reader`), implement that
//! kind's trait, and
//! export your type with the kind's macro:
//!
//! ```ignore
//! use cocoon_plugin_sdk::image_source::*;
//!
//! struct Mine;
//! impl ImageSource for Mine {
//!     fn schemes() -> Vec<String> { vec!["mine".into()] }
//!     fn resolve(reference: &str, _platform: Platform) -> Result<Vec<Artifact>, Error> {
//!         Err(Error::unsupported(format!("no such image: {reference}")))
//!     }
//! }
//! cocoon_plugin_sdk::export_image_source!(Mine);
//! ```
//!
//! Each kind lives in its own module with its own generated bindings, so a
//! crate normally enables exactly one feature.

#[cfg(feature = "format-converter")]
mod reader;

/// Items every kind module gets: error constructors and host logging and
/// configuration. A macro because each kind's bindings have their own copy
/// of the shared WIT types.
macro_rules! common_api {
    () => {
        pub use bindings::cocoon::plugin::host::LogLevel;
        pub use bindings::cocoon::plugin::types::{Error, ErrorKind};

        impl Error {
            /// An error of `kind` with a one-line message.
            pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
                Error {
                    kind,
                    message: message.into(),
                }
            }
            /// The input is malformed.
            pub fn invalid_input(message: impl Into<String>) -> Self {
                Self::new(ErrorKind::InvalidInput, message)
            }
            /// The input uses something this plugin does not handle.
            pub fn unsupported(message: impl Into<String>) -> Self {
                Self::new(ErrorKind::Unsupported, message)
            }
            /// A size, count or depth went over a limit.
            pub fn limit_exceeded(message: impl Into<String>) -> Self {
                Self::new(ErrorKind::LimitExceeded, message)
            }
            /// A host I/O call failed.
            pub fn io(message: impl Into<String>) -> Self {
                Self::new(ErrorKind::Io, message)
            }
            /// A bug in the plugin.
            pub fn internal(message: impl Into<String>) -> Self {
                Self::new(ErrorKind::Internal, message)
            }
        }

        /// Writes a record into the host's log under this plugin's name.
        pub fn log(level: LogLevel, message: &str, fields: &[(&str, &str)]) {
            let fields: Vec<(String, String)> = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            bindings::cocoon::plugin::host::log(level, message, &fields);
        }

        /// Logs at info level.
        pub fn info(message: &str) {
            log(LogLevel::Info, message, &[]);
        }

        /// Logs at warn level.
        pub fn warn(message: &str) {
            log(LogLevel::Warn, message, &[]);
        }

        /// This plugin's configuration from the host's config file.
        pub fn config() -> Vec<(String, String)> {
            bindings::cocoon::plugin::host::config()
        }

        /// One configuration value.
        pub fn config_get(key: &str) -> Option<String> {
            bindings::cocoon::plugin::host::config_get(key)
        }
    };
}

/// Image sources: resolve a user reference into artifacts to download.
#[cfg(feature = "image-source")]
pub mod image_source {
    #[doc(hidden)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "image-source",
            path: "../../wit",
            pub_export_macro: true,
            export_macro_name: "__export_image_source_world",
        });
    }

    common_api!();

    pub use bindings::cocoon::plugin::fetch::{Method, Request, Response};
    pub use bindings::exports::cocoon::plugin::resolver::{Artifact, Platform};

    /// Asks the host to perform an HTTP request. The host allows only the
    /// hosts this plugin declared and the operator granted.
    pub fn fetch(request: &Request) -> Result<Response, Error> {
        bindings::cocoon::plugin::fetch::fetch(request)
    }

    /// A GET of `url` with a body of at most `max_bytes`, following
    /// redirects.
    pub fn get(url: &str, headers: &[(&str, &str)], max_bytes: u64) -> Result<Response, Error> {
        fetch(&Request {
            method: Method::Get,
            url: url.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            max_bytes,
            follow_redirects: true,
        })
    }

    /// An image-source plugin.
    pub trait ImageSource {
        /// URL schemes resolved by this plugin, without `://`.
        fn schemes() -> Vec<String>;
        /// Resolves `reference` into the artifacts the host downloads.
        fn resolve(reference: &str, platform: Platform) -> Result<Vec<Artifact>, Error>;
    }

    /// Exports a type implementing [`ImageSource`] as this component's
    /// image-source implementation.
    #[macro_export]
    macro_rules! export_image_source {
        ($t:ty) => {
            const _: () = {
                use $crate::image_source::bindings::exports::cocoon::plugin::resolver as __r;
                struct __CocoonExport;
                impl __r::Guest for __CocoonExport {
                    fn schemes() -> ::std::vec::Vec<::std::string::String> {
                        <$t as $crate::image_source::ImageSource>::schemes()
                    }
                    fn resolve(
                        reference: ::std::string::String,
                        platform: __r::Platform,
                    ) -> ::std::result::Result<
                        ::std::vec::Vec<__r::Artifact>,
                        $crate::image_source::Error,
                    > {
                        <$t as $crate::image_source::ImageSource>::resolve(&reference, platform)
                    }
                }
                $crate::image_source::bindings::__export_image_source_world!(
                    __CocoonExport with_types_in $crate::image_source::bindings
                );
            };
        };
    }
}

/// Format converters: map a disk image's virtual disk onto its file.
#[cfg(feature = "format-converter")]
pub mod format_converter {
    #[doc(hidden)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "format-converter",
            path: "../../wit",
            pub_export_macro: true,
            export_macro_name: "__export_format_converter_world",
        });
    }

    common_api!();

    #[cfg(feature = "native-format")]
    pub mod native;
    pub use crate::reader::SourceReader;
    pub use bindings::cocoon::plugin::source::{max_read, Source};
    pub use bindings::exports::cocoon::plugin::converter::{
        Compressed, Extent, ExtentKind, ProbeResult,
    };

    /// A format-converter plugin.
    pub trait FormatConverter {
        /// The opened image.
        type Image: ConverterImage;
        /// Says whether this plugin reads a file, from its first and last
        /// bytes.
        fn probe(head: &[u8], tail: &[u8], file_size: u64) -> Option<ProbeResult>;
        /// Opens `src` as `format`.
        fn open(src: Source, format: &str) -> Result<Self::Image, Error>;
        /// Decodes one compressed extent into exactly `length` bytes.
        fn decode(extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error>;
    }

    /// An opened image.
    pub trait ConverterImage: 'static {
        /// The virtual disk's size in bytes.
        fn virtual_size(&self) -> u64;
        /// The backing file name stored in the image, if any.
        fn backing(&self) -> Option<String>;
        /// Up to `max` extents covering the virtual disk from `offset`.
        fn map(&self, offset: u64, max: u32) -> Result<Vec<Extent>, Error>;
    }

    /// Exports a type implementing [`FormatConverter`] as this component's
    /// converter implementation.
    #[macro_export]
    macro_rules! export_format_converter {
        ($t:ty) => {
            const _: () = {
                use $crate::format_converter::bindings::exports::cocoon::plugin::converter as __c;
                use $crate::format_converter::{ConverterImage as _, FormatConverter as _};
                struct __CocoonExport;
                struct __CocoonImage(<$t as $crate::format_converter::FormatConverter>::Image);
                impl __c::GuestImage for __CocoonImage {
                    fn open(
                        src: $crate::format_converter::Source,
                        format: ::std::string::String,
                    ) -> ::std::result::Result<__c::Image, $crate::format_converter::Error>
                    {
                        <$t>::open(src, &format).map(|i| __c::Image::new(__CocoonImage(i)))
                    }
                    fn virtual_size(&self) -> u64 {
                        self.0.virtual_size()
                    }
                    fn backing(&self) -> ::std::option::Option<::std::string::String> {
                        self.0.backing()
                    }
                    fn map(
                        &self,
                        offset: u64,
                        max: u32,
                    ) -> ::std::result::Result<
                        ::std::vec::Vec<__c::Extent>,
                        $crate::format_converter::Error,
                    > {
                        self.0.map(offset, max)
                    }
                }
                impl __c::Guest for __CocoonExport {
                    type Image = __CocoonImage;
                    fn probe(
                        head: ::std::vec::Vec<u8>,
                        tail: ::std::vec::Vec<u8>,
                        file_size: u64,
                    ) -> ::std::option::Option<__c::ProbeResult> {
                        <$t>::probe(&head, &tail, file_size)
                    }
                    fn decode(
                        extent: __c::Compressed,
                        input: ::std::vec::Vec<u8>,
                        length: u32,
                    ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::format_converter::Error>
                    {
                        <$t>::decode(extent, input, length)
                    }
                }
                $crate::format_converter::bindings::__export_format_converter_world!(
                    __CocoonExport with_types_in $crate::format_converter::bindings
                );
            };
        };
    }
}

/// Disk policies: decide the ordered disk plan of a VM.
#[cfg(feature = "disk-policy")]
pub mod disk_policy {
    #[doc(hidden)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "disk-policy",
            path: "../../wit",
            pub_export_macro: true,
            export_macro_name: "__export_disk_policy_world",
        });
    }

    common_api!();

    pub use bindings::exports::cocoon::plugin::policy::{
        DataDiskSpec, Disk, DiskImage, DiskRole, FsType, ImageKind, Violation, VmRequest,
    };

    /// The prefix of the host's own disks (layers, the root, the seed);
    /// data disks may not use it.
    pub const RESERVED_PREFIX: &str = "cocoon-";

    impl VmRequest {
        /// A site setting by key.
        pub fn setting(&self, key: &str) -> Option<&str> {
            self.settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }

        /// The layer digests of a layered image, base first (none for a
        /// disk image).
        pub fn layers(&self) -> &[String] {
            match &self.image {
                ImageKind::Layered(layers) => layers,
                ImageKind::Disk(_) => &[],
            }
        }
    }

    impl Disk {
        /// Layer `index` of a layered image (`cocoon-layerN`), read-only.
        pub fn layer(index: usize) -> Self {
            Disk {
                name: format!("{RESERVED_PREFIX}layer{index}"),
                role: DiskRole::Layer,
                read_only: true,
                size_bytes: None,
                mount_point: None,
                fstype: None,
                direct_io: None,
                file: None,
            }
        }

        /// The writable root, `cocoon-root`, of `size` bytes (none: a disk
        /// image's own size).
        pub fn root(size: Option<u64>) -> Self {
            Disk {
                name: format!("{RESERVED_PREFIX}root"),
                role: DiskRole::Cow,
                read_only: false,
                size_bytes: size,
                ..Disk::layer(0)
            }
        }

        /// The data disk the user asked for, as asked.
        pub fn data(spec: &DataDiskSpec) -> Self {
            Disk {
                name: spec.name.clone(),
                role: DiskRole::Data,
                read_only: false,
                size_bytes: Some(spec.size_bytes),
                mount_point: spec.mount_point.clone(),
                fstype: Some(spec.fstype),
                direct_io: spec.direct_io,
                file: None,
            }
        }

        /// The cloud-init seed, `cocoon-cidata`, read-only.
        pub fn cidata() -> Self {
            Disk {
                name: format!("{RESERVED_PREFIX}cidata"),
                role: DiskRole::Cidata,
                ..Disk::layer(0)
            }
        }
    }

    impl Violation {
        pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
            Violation {
                field: field.into(),
                message: message.into(),
            }
        }
    }

    /// A size setting: bytes, or a number with a K, M, G or T suffix
    /// (powers of 1024), e.g. `"100G"`.
    pub fn parse_size(text: &str) -> Option<u64> {
        let text = text.trim();
        let (digits, shift) = match text.char_indices().last()? {
            (i, 'K' | 'k') => (&text[..i], 10),
            (i, 'M' | 'm') => (&text[..i], 20),
            (i, 'G' | 'g') => (&text[..i], 30),
            (i, 'T' | 't') => (&text[..i], 40),
            _ => (text, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse::<u64>().ok()?.checked_mul(1 << shift)
    }

    /// The plan every policy starts from: the layers of a layered image,
    /// the root, the data disks as asked, the seed last when asked for.
    pub fn standard_plan(request: &VmRequest, root_size: Option<u64>) -> Vec<Disk> {
        let mut disks: Vec<Disk> = (0..request.layers().len()).map(Disk::layer).collect();
        disks.push(Disk::root(root_size));
        disks.extend(request.data_disks.iter().map(Disk::data));
        if request.cidata {
            disks.push(Disk::cidata());
        }
        disks
    }

    /// A disk-policy plugin.
    pub trait DiskPolicy {
        /// The ordered disk plan for `request`.
        fn plan(request: VmRequest) -> Result<Vec<Disk>, Error>;
        /// The site rules `request` breaks; empty when acceptable.
        fn validate(request: &VmRequest) -> Vec<Violation>;
    }

    /// Exports a type implementing [`DiskPolicy`] as this component's policy.
    #[macro_export]
    macro_rules! export_disk_policy {
        ($t:ty) => {
            const _: () = {
                use $crate::disk_policy::bindings::exports::cocoon::plugin::policy as __p;
                struct __CocoonExport;
                impl __p::Guest for __CocoonExport {
                    fn plan(
                        request: __p::VmRequest,
                    ) -> ::std::result::Result<::std::vec::Vec<__p::Disk>, $crate::disk_policy::Error>
                    {
                        <$t as $crate::disk_policy::DiskPolicy>::plan(request)
                    }
                    fn validate(request: __p::VmRequest) -> ::std::vec::Vec<__p::Violation> {
                        <$t as $crate::disk_policy::DiskPolicy>::validate(&request)
                    }
                }
                $crate::disk_policy::bindings::__export_disk_policy_world!(
                    __CocoonExport with_types_in $crate::disk_policy::bindings
                );
            };
        };
    }
}

/// Layer readers: read an image layer (a plain tar) into entries whose
/// contents are extents of the tar. The host checks them and builds the
/// filesystem.
#[cfg(feature = "layer-reader")]
pub mod layer_reader {
    #[doc(hidden)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "layer-reader",
            path: "../../wit",
            pub_export_macro: true,
            export_macro_name: "__export_layer_reader_world",
        });
    }

    common_api!();

    pub use bindings::cocoon::plugin::source::{max_read, Source};
    pub use bindings::exports::cocoon::plugin::layer::{Device, Entry, EntryKind, Extent, Xattr};

    /// A layer-reader plugin.
    pub trait LayerReader {
        /// The opened layer.
        type Layer: ReaderLayer;
        /// Opens `src`, a plain tar.
        fn open(src: Source) -> Result<Self::Layer, Error>;
    }

    /// An opened layer: a cursor over its entries.
    pub trait ReaderLayer: 'static {
        /// The next entries, at most `max`; empty at the end.
        fn next(&self, max: u32) -> Result<Vec<Entry>, Error>;
    }

    /// Exports a type implementing [`LayerReader`] as this component's
    /// layer implementation.
    #[macro_export]
    macro_rules! export_layer_reader {
        ($t:ty) => {
            const _: () = {
                use $crate::layer_reader::bindings::exports::cocoon::plugin::layer as __l;
                use $crate::layer_reader::{LayerReader as _, ReaderLayer as _};
                struct __CocoonExport;
                struct __CocoonLayer(<$t as $crate::layer_reader::LayerReader>::Layer);
                impl __l::GuestLayer for __CocoonLayer {
                    fn open(
                        src: $crate::layer_reader::Source,
                    ) -> ::std::result::Result<__l::Layer, $crate::layer_reader::Error> {
                        <$t>::open(src).map(|l| __l::Layer::new(__CocoonLayer(l)))
                    }
                    fn next(
                        &self,
                        max: u32,
                    ) -> ::std::result::Result<
                        ::std::vec::Vec<__l::Entry>,
                        $crate::layer_reader::Error,
                    > {
                        self.0.next(max)
                    }
                }
                impl __l::Guest for __CocoonExport {
                    type Layer = __CocoonLayer;
                }
                $crate::layer_reader::bindings::__export_layer_reader_world!(
                    __CocoonExport with_types_in $crate::layer_reader::bindings
                );
            };
        };
    }
}
