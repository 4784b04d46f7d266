//! Host-side bindings of the three plugin worlds. The shared interfaces
//! (types, host) are generated once, with the image-source world, and
//! reused by the others so one `Host` implementation serves every kind.

pub mod image_source {
    wasmtime::component::bindgen!({
        world: "image-source",
        path: "../wit",
        additional_derives: [serde::Serialize, serde::Deserialize],
    });
}

pub mod format_converter {
    wasmtime::component::bindgen!({
        world: "format-converter",
        path: "../wit",
        additional_derives: [serde::Serialize, serde::Deserialize],
        with: {
            "cocoon:plugin/types": super::image_source::cocoon::plugin::types,
            "cocoon:plugin/host": super::image_source::cocoon::plugin::host,
            "cocoon:plugin/source.source": crate::plugin::source::SourceFile,
        },
    });
}

pub mod disk_policy {
    wasmtime::component::bindgen!({
        world: "disk-policy",
        path: "../wit",
        additional_derives: [serde::Serialize, serde::Deserialize],
        with: {
            "cocoon:plugin/types": super::image_source::cocoon::plugin::types,
            "cocoon:plugin/host": super::image_source::cocoon::plugin::host,
        },
    });
}

pub use image_source::cocoon::plugin::types::{Error as WitError, ErrorKind};

impl WitError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WitError {
            kind,
            message: message.into(),
        }
    }
}

/// The WIT name of an error kind, for messages.
pub fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "invalid-input",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::LimitExceeded => "limit-exceeded",
        ErrorKind::Io => "io",
        ErrorKind::Internal => "internal",
    }
}
