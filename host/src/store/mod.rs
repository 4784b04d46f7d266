//! The image store: content-addressed blobs, the reference index, the
//! conversion cache.
//!
//! Layout under `STATE_DIR/images/`:
//!
//! | path | what |
//! |---|---|
//! | `blobs/sha256/<hex>` | verified blobs, mode 0400; only [`blob::Layout::commit`] puts files here |
//! | `refs/<sha256 of reference>.json` | the reference index: artifacts with digest, size, media type, ETag, Last-Modified |
//! | `converted/<source hex>/<target>/<converter sha256>/{image,image.digest}` | the conversion cache |
//! | `tmp/` | partial downloads (resumable) and their validators; never served |
//! | `locks/` | per-key flock files |
//!
//! The image store's rules (README, "Images") hold by construction:
//! - a [`blob::VerifiedBlob`] can only be made by hashing bytes; nothing
//!   else is ever handed to a caller;
//! - a pinned pull is satisfied by the blob of that digest, re-hashed, and
//!   never by what the index says a URL served last time ([`pull`]);
//! - converted images live in their own namespace keyed by (source digest,
//!   target, converter digest) and a [`convert_cache::ConvertedImage`] can
//!   only be made from a valid digest file; conversion never writes the
//!   reference index, so it cannot change how a source's freshness is
//!   checked.

use std::path::PathBuf;

pub mod blob;
pub mod convert_cache;
pub mod digest;
pub mod download;
pub mod files;
pub mod gc;
pub mod index;
pub mod local;
pub mod lock;
pub mod lookup;
pub mod pull;
pub mod settings;
pub mod sources;
pub mod verity;

pub use blob::{Layout, VerifiedBlob};
pub use convert_cache::{ConvertBackend, ConvertedImage, ConverterId, EngineBackend};
pub use digest::Digest;
pub use gc::{GcReport, NoRoots, RootSet};
pub use index::{ArtifactRecord, RefRecord};
pub use lookup::{DigestQuery, Found};
pub use pull::{HeldBlobs, PullPolicy, PullProgress, PullReport, PullRequest, Quiet};
pub use settings::StoreSettings;
pub use sources::{PluginSources, Resolved, Sources};

use crate::config::HostConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}; nothing was kept")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{url}: size mismatch: expected {expected} bytes, got {actual}; nothing was kept")]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}")]
    Transport {
        url: String,
        #[source]
        failure: download::Failure,
    },
    #[error("{url}: more than {limit} bytes{}", match announced { Some(n) => format!(" ({n} announced)"), None => String::new() })]
    TooLarge {
        url: String,
        limit: u64,
        announced: Option<u64>,
    },
    #[error(
        "{path}: {needed} bytes needed but only {available} are free (and {} are kept in reserve)",
        download::SPACE_RESERVE
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{path} is {kind}, not a regular file; refused (the store never follows or writes through one; remove it)")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is {kind}, not a directory; refused")]
    NotDirectory { path: PathBuf, kind: &'static str },
    #[error("{reference} is not in the store and the pull policy is `never`")]
    NotPresent { reference: String },
    #[error("{reference}: blob {digest} is missing or was corrupt (and removed), and the pull policy `never` forbids fetching it again")]
    LacksBlob { reference: String, digest: Digest },
    #[error("{query}: no image in the store has this digest (a digest alone does not say where to fetch it)")]
    UnknownDigest { query: String },
    #[error("{query} is ambiguous: {}", candidates.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))]
    Ambiguous {
        query: String,
        candidates: Vec<Digest>,
    },
    #[error("{reference}: no image-source plugin handles scheme {scheme:?}")]
    NoSource { reference: String, scheme: String },
    #[error("{reference}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{reference}: pinned digest {pinned} but the source resolved {resolved}")]
    PinConflict {
        reference: String,
        pinned: Digest,
        resolved: Digest,
    },
    #[error("resolving {reference}")]
    Resolve {
        reference: String,
        #[source]
        source: Box<crate::plugin::PluginError>,
    },
    #[error("{reference}: the source returned no artifacts")]
    NoArtifacts { reference: String },
    #[error("index file {path}")]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("converting {source_digest} to {target}")]
    Convert {
        source_digest: Digest,
        target: String,
        #[source]
        source: Box<crate::convert::ConvertError>,
    },
    #[error("{0}")]
    BadDigest(#[from] digest::BadDigest),
    #[error("source blob {digest} is missing or was corrupt (and removed); pull its image again")]
    SourceGone { digest: Digest },
    #[error("no format-converter plugin is available")]
    NoConverter,
    #[error("building a layer from {digest}")]
    Layer {
        digest: Digest,
        #[source]
        source: Box<crate::layer::LayerError>,
    },
}

impl StoreError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }

    /// Whether the server could not be reached at all (as opposed to
    /// answering wrongly): the case where a present blob is reused with a
    /// warning.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Transport { failure, .. } => failure.unreachable(),
            StoreError::Http { status, .. } => *status >= 500,
            StoreError::Resolve { source, .. } => {
                matches!(
                    &**source,
                    crate::plugin::PluginError::Returned {
                        kind: crate::plugin::bindings::ErrorKind::Io,
                        ..
                    }
                )
            }
            _ => false,
        }
    }
}

/// The store of one host.
pub struct Store {
    layout: Layout,
    settings: StoreSettings,
}

impl Store {
    /// The store under `config.state_dir/images`, created if missing,
    /// with the config file's `[store]` settings.
    pub fn open(config: &HostConfig) -> Result<Store, StoreError> {
        // The state dir holds VMs' disks and the store: the owner's alone.
        files::private_root(&config.state_dir, false)?;
        let mut store = Store::at(config.state_dir.join("images"))?;
        store.settings = config.store.clone();
        Ok(store)
    }

    /// The store at `root` with default settings.
    pub fn at(root: PathBuf) -> Result<Store, StoreError> {
        Ok(Store {
            layout: Layout::create(root)?,
            settings: StoreSettings::default(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }
}

/// An error and its causes on one line (the host's one error-chain format).
pub use crate::error_chain::error_chain as chain;

impl Store {
    /// Forgets a reference; its blobs stay until gc. False when it was
    /// not in the store.
    pub fn remove(&self, reference: &str) -> Result<bool, StoreError> {
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        let _lock = layout.lock(&index::ref_lock_name(reference))?;
        layout.remove_ref(reference)
    }
}

/// Test hook for crash-safety tests: with `COCOON_CRASH_AT=<point>` in the
/// environment, this process kills itself with SIGKILL when it reaches
/// that point, so tests can stop the real binary exactly between two
/// writes. Costs one environment lookup per point otherwise.
pub(crate) fn crash_point(point: &str) {
    if std::env::var_os("COCOON_CRASH_AT").is_some_and(|v| v == point) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(std::process::id().to_string())
            .status();
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}
