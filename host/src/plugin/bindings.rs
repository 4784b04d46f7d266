//! Host-side bindings of the plugin worlds, for every plugin API version
//! the host links.
//!
//! The current version (0.2.1) is generated at the top level; its types are
//! the ones the rest of the host sees. The shared interfaces (types, host)
//! are generated once, with the image-source world, and reused by the
//! other worlds so one `Host` implementation serves every kind.
//!
//! [`v0_1`] holds the frozen 0.1 worlds the host still links
//! (image-source and format-converter: their interfaces did not change).
//! [`super::api`] converts between the two.

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
        with: {
            "cocoon:plugin/types": super::image_source::cocoon::plugin::types,
            "cocoon:plugin/host": super::image_source::cocoon::plugin::host,
        },
    });
}

pub mod layer_reader {
    wasmtime::component::bindgen!({
        world: "layer-reader",
        path: "../wit",
        additional_derives: [PartialEq, Eq],
        with: {
            "cocoon:plugin/types": super::image_source::cocoon::plugin::types,
            "cocoon:plugin/host": super::image_source::cocoon::plugin::host,
            "cocoon:plugin/source": super::format_converter::cocoon::plugin::source,
        },
    });
}

/// The frozen 0.1 worlds (`wit/v0.1.0`).
pub mod v0_1 {
    pub mod image_source {
        wasmtime::component::bindgen!({
            world: "image-source",
            path: "../wit/v0.1.0",
        });
    }

    pub mod format_converter {
        wasmtime::component::bindgen!({
            world: "format-converter",
            path: "../wit/v0.1.0",
            with: {
                "cocoon:plugin/types": super::image_source::cocoon::plugin::types,
                "cocoon:plugin/host": super::image_source::cocoon::plugin::host,
                "cocoon:plugin/source.source": crate::plugin::source::SourceFile,
            },
        });
    }
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

impl ErrorKind {
    /// The WIT name of the kind, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::LimitExceeded => "limit-exceeded",
            ErrorKind::Io => "io",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
