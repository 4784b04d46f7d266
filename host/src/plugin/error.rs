//! Errors of the plugin runtime. Every variant that concerns one plugin
//! names it, so a log line or CLI message says which plugin misbehaved.

use std::path::PathBuf;

use super::manifest::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("plugin {plugin}: wasm sha256 is {actual}, its manifest pins {expected}")]
    DigestMismatch {
        plugin: String,
        expected: String,
        actual: String,
    },
    #[error("plugin {plugin}: import {import} is refused: {reason}")]
    ImportRefused {
        plugin: String,
        import: String,
        reason: &'static str,
    },
    #[error("plugin {plugin}: does not export what a {kind} plugin must: {detail}")]
    WrongExports {
        plugin: String,
        kind: &'static str,
        detail: String,
    },
    #[error("plugin {plugin}: compiling the component failed: {detail}")]
    Compile { plugin: String, detail: String },
    #[error("plugin {plugin}: exceeded its {deadline_ms} ms deadline in {call}")]
    Deadline {
        plugin: String,
        call: String,
        deadline_ms: u64,
    },
    #[error("plugin {plugin}: exceeded its memory limit of {limit_mib} MiB in {call}")]
    MemoryLimit {
        plugin: String,
        call: String,
        limit_mib: u64,
    },
    #[error("plugin {plugin}: trapped in {call}: {detail}")]
    Trap {
        plugin: String,
        call: String,
        detail: String,
    },
    #[error("plugin {plugin}: {call} failed ({kind}): {message}")]
    Returned {
        plugin: String,
        call: String,
        kind: String,
        message: String,
    },
    #[error("plugin {plugin}: {call}: invalid answer: {detail}")]
    InvalidAnswer {
        plugin: String,
        call: String,
        detail: String,
    },
    #[error("plugin {plugin}: instantiating failed: {detail}")]
    Instantiate { plugin: String, detail: String },
    #[error("no plugin named {0:?} (see `cocoon-host plugin list`)")]
    NotFound(String),
    #[error("plugin {plugin} is a {actual} plugin, not a {wanted} one")]
    WrongKind {
        plugin: String,
        wanted: &'static str,
        actual: &'static str,
    },
    #[error("plugin {0}: a built-in plugin has this name and cannot be shadowed")]
    ShadowsBuiltin(String),
    #[error("plugin {0} is disabled in the host config")]
    Disabled(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the wasm engine: {0}")]
    Engine(String),
}

impl PluginError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| PluginError::Io { what, path, source }
    }
}
