//! Errors of the plugin runtime. Every variant that concerns one plugin
//! names it, so a log line or CLI message says which plugin misbehaved.

use std::fmt;
use std::path::PathBuf;

use super::bindings::ErrorKind;
use super::manifest::ManifestError;
use super::policy::{PlanProblem, PolicyViolation};

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
        /// The WIT error kind the plugin gave.
        kind: ErrorKind,
        message: String,
    },
    #[error(
        "plugin {plugin}: built against cocoon:plugin@{plugin_api}; this host implements \
         cocoon:plugin@{host_api} and loads {kind} plugins of {supported}"
    )]
    ApiVersion {
        plugin: String,
        kind: &'static str,
        plugin_api: String,
        host_api: String,
        supported: &'static str,
    },
    #[error("plugin {plugin}: the request breaks site rules: {}", List(violations))]
    PolicyRefused {
        plugin: String,
        violations: Vec<PolicyViolation>,
    },
    #[error("plugin {plugin}: plan refused: {}", List(problems))]
    BadPlan {
        plugin: String,
        problems: Vec<PlanProblem>,
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

/// Items joined with "; " for one-line messages.
struct List<'a, T>(&'a [T]);

impl<T: fmt::Display> fmt::Display for List<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}
