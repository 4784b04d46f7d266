//! OCI images as read-only layers: each layer tar of a pulled image
//! becomes a squashfs image the guest mounts under its overlay root.
//!
//! [`prepare`] is the one entry point. For every layer, base first:
//! 1. the conversion cache is asked for (layer digest, `squashfs`, builder
//!    digest): a hit is re-hashed against its digest file and rebuilt when
//!    it does not match;
//! 2. otherwise the layer blob, re-verified by the store, is decompressed
//!    by the host (gzip, zstd) into a temp beside the cache entry;
//! 3. a layer-reader plugin (the built-in `tar-layer`) parses the tar and
//!    answers pages of entries, each checked by the plugin call layer
//!    ([`crate::plugin::calls::check_entries`]) and then as a tree
//!    ([`check`]: names, links, limits, whiteouts);
//! 4. [`build`] writes the squashfs from the checked tree with
//!    `mksquashfs`, and the cache renames it into place with its digest
//!    file (temp, fsync, rename, as every conversion).
//!
//! A refused layer leaves nothing in the cache. The image's OCI config
//! (Entrypoint, Cmd, Env, WorkingDir, User) is the config blob the pull
//! stored with the image; [`prepare`] reads it into an [`OciConfig`].

pub mod build;
pub mod check;
pub mod config;

use std::path::PathBuf;

use crate::disk::plan::LayerImage;
use crate::plugin::calls::MAX_ENTRIES_PER_PAGE;
use crate::plugin::{LoadedPlugin, PluginError, PluginKind, Registry, Runtime};
use crate::store::convert_cache::{ConvertBackend, ConvertedImage, ConverterId};
use crate::store::index::RefRecord;
use crate::store::{Digest, Store, StoreError, VerifiedBlob};

pub use build::Squashfs;
pub use check::Tree;
pub use config::OciConfig;

/// The cache's target name of built layers.
pub const LAYER_FORMAT: &str = "squashfs";

/// Media types of image configs.
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Media types of layers (the host finds the compression by its magic).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer}: entry {entry} ({len} bytes): {reason}; the layer is refused")]
    Entry {
        layer: Digest,
        /// The name, quoted, cut to 200 bytes.
        entry: String,
        len: usize,
        reason: String,
    },
    #[error("layer {layer}: reading it with plugin {plugin}")]
    Reader {
        layer: Digest,
        plugin: String,
        #[source]
        source: Box<PluginError>,
    },
    #[error("layer {layer}: decompressing")]
    Decompress {
        layer: Digest,
        #[source]
        source: Box<crate::convert::ConvertError>,
    },
    #[error("{reference}: not an OCI image (no image config among its artifacts)")]
    NotAnImage { reference: String },
    #[error(
        "{reference}: artifact {digest} has media type {media_type:?}, not a layer this host reads"
    )]
    MediaType {
        reference: String,
        digest: Digest,
        media_type: String,
    },
    #[error("image config {digest}: {reason}")]
    Config { digest: Digest, reason: String },
    #[error("blob {digest} is missing or was corrupt (and removed); pull the image again")]
    BlobGone { digest: Digest },
    #[error("no layer-reader plugin is available (the built-in tar-layer is disabled?)")]
    NoReader,
    #[error("loading layer reader {plugin}")]
    LoadReader {
        plugin: String,
        #[source]
        source: Box<PluginError>,
    },
    #[error("running {tool} (install squashfs-tools: scripts/install-deps)")]
    Tool {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool}: unexpected version line {found:?}")]
    ToolVersion { tool: &'static str, found: String },
    #[error("{tool} failed ({status}): {stderr}")]
    Build {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{tool} wrote {path}, which is not the squashfs expected: {reason}")]
    Output {
        tool: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(Box<StoreError>),
}

impl From<StoreError> for LayerError {
    fn from(e: StoreError) -> Self {
        match e {
            // A build refused inside the cache: the layer's own error.
            StoreError::Layer { source, .. } => *source,
            other => LayerError::Store(Box::new(other)),
        }
    }
}

/// An entry's name for messages: quoted, at most 200 bytes of it.
fn shown(name: &str) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    if end < name.len() {
        format!("{:?}…", &name[..end])
    } else {
        format!("{name:?}")
    }
}

/// One built layer.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// The layer blob (compressed as pulled).
    pub source: Digest,
    pub media_type: String,
    /// The squashfs in the store, with its digest file's digest.
    pub image: ConvertedImage,
}

/// A layered image ready to boot: its layers as read-only disks and what
/// to run.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Base first; `digest` is the built image's (its digest file's), and
    /// `path` the built file in the store.
    pub layers: Vec<LayerImage>,
    pub config: OciConfig,
    /// The same layers with their sources, and whether this call built
    /// them.
    pub built: Vec<BuiltLayer>,
}

/// Whether `image` is a container image to boot as layers: it has an
/// image config, and no artifact is a disk image (a disk pushed as an OCI
/// artifact names its format in its media type, and boots as a disk).
pub fn is_layered(image: &RefRecord) -> bool {
    image
        .artifacts
        .iter()
        .any(|a| CONFIG_TYPES.contains(&a.media_type.as_str()))
        && image.artifacts.iter().all(|a| a.format_hint.is_none())
}

/// The layer artifacts of an image, base first, and its config.
fn classify(image: &RefRecord) -> Result<(Digest, Vec<(Digest, String)>), LayerError> {
    let reference = crate::http::redact(&image.reference).into_owned();
    let Some(at) = image
        .artifacts
        .iter()
        .position(|a| CONFIG_TYPES.contains(&a.media_type.as_str()))
    else {
        return Err(LayerError::NotAnImage { reference });
    };
    let mut layers = Vec::new();
    for a in &image.artifacts[at + 1..] {
        if !LAYER_TYPES.contains(&a.media_type.as_str()) {
            return Err(LayerError::MediaType {
                reference,
                digest: a.digest.clone(),
                media_type: a.media_type.clone(),
            });
        }
        layers.push((a.digest.clone(), a.media_type.clone()));
    }
    Ok((image.artifacts[at].digest.clone(), layers))
}

/// Reads the image config blob (re-verified) into an [`OciConfig`].
pub fn read_config(store: &Store, digest: &Digest) -> Result<OciConfig, LayerError> {
    let blob = store
        .layout()
        .verified(digest)?
        .ok_or_else(|| LayerError::BlobGone {
            digest: digest.clone(),
        })?;
    let bytes =
        crate::fsutil::input::read_bounded(blob.path(), config::MAX_CONFIG).map_err(|source| {
            LayerError::Io {
                op: "reading",
                path: blob.path().to_path_buf(),
                source,
            }
        })?;
    OciConfig::parse(&bytes).map_err(|reason| LayerError::Config {
        digest: digest.clone(),
        reason,
    })
}

/// The layer reader to use: the first enabled one (the built-in
/// `tar-layer` unless the operator disabled it).
fn reader(runtime: &Runtime, registry: &Registry) -> Result<(LoadedPlugin, String), LayerError> {
    let info = registry
        .list()
        .find(|p| p.manifest.kind == PluginKind::LayerReader && !p.disabled)
        .ok_or(LayerError::NoReader)?;
    let plugin = registry
        .load(runtime, info.name())
        .map_err(|source| LayerError::LoadReader {
            plugin: info.name().to_string(),
            source: Box::new(source),
        })?;
    Ok((plugin, info.sha256.clone()))
}

/// Reads and checks every entry of the plain tar at `tar`.
pub fn read_tree(
    plugin: &LoadedPlugin,
    layer: &Digest,
    tar: &std::path::Path,
) -> Result<Tree, LayerError> {
    let reader_err = |source| LayerError::Reader {
        layer: layer.clone(),
        plugin: plugin.name().to_string(),
        source: Box::new(source),
    };
    let mut session = plugin.open_layer(tar).map_err(reader_err)?;
    let mut tree = Tree::default();
    loop {
        let page = session.next(MAX_ENTRIES_PER_PAGE).map_err(reader_err)?;
        if page.is_empty() {
            return Ok(tree);
        }
        for e in &page {
            tree.add(e).map_err(|reason| LayerError::Entry {
                layer: layer.clone(),
                entry: shown(&e.name),
                len: e.name.len(),
                reason,
            })?;
        }
    }
}

/// Builds layers for the conversion cache.
struct LayerBackend<'a> {
    plugin: &'a LoadedPlugin,
    builder: &'a Squashfs,
    id: ConverterId,
}

impl LayerBackend<'_> {
    fn build(&self, blob: &VerifiedBlob, dest: &std::path::Path) -> Result<(), LayerError> {
        let layer = blob.digest();
        let scratch = dest.parent().unwrap_or(dest);
        let unpacked =
            crate::convert::decompress::unpack(blob.path(), scratch).map_err(|source| {
                LayerError::Decompress {
                    layer: layer.clone(),
                    source: Box::new(source),
                }
            })?;
        let tar_path = unpacked.file.as_ref().map_or(blob.path(), |t| t.path());
        let tree = read_tree(self.plugin, layer, tar_path)?;
        let tar = std::fs::File::open(tar_path).map_err(|source| LayerError::Io {
            op: "opening",
            path: tar_path.to_path_buf(),
            source,
        })?;
        tracing::debug!(%layer, entries = tree.entries(), "building layer");
        self.builder.build(&tree, &tar, dest)
    }
}

impl ConvertBackend for LayerBackend<'_> {
    fn installed(&self) -> Vec<ConverterId> {
        vec![self.id.clone()]
    }

    fn convert(
        &self,
        blob: &VerifiedBlob,
        dest: &std::path::Path,
        _target: &str,
    ) -> Result<ConverterId, StoreError> {
        self.build(blob, dest).map_err(|e| StoreError::Layer {
            digest: blob.digest().clone(),
            source: Box::new(e),
        })?;
        Ok(self.id.clone())
    }
}

/// Prepares the layered image `image` (a pulled OCI image's record, as
/// [`Store::pull`] returns it in its report, or as the index holds it):
/// every layer built (or found in the cache, verified), base first, and
/// its config.
pub fn prepare(
    store: &Store,
    image: &RefRecord,
    runtime: &Runtime,
    registry: &Registry,
) -> Result<PreparedImage, LayerError> {
    prepare_trusting(store, image, runtime, registry, &[])
}

/// [`prepare`], but a cache hit at one of the `hashed` paths with its
/// digest is not re-hashed: the caller hashed those bytes itself just
/// before (a clone's check of a snapshot's layers), and hashes them once.
pub fn prepare_trusting(
    store: &Store,
    image: &RefRecord,
    runtime: &Runtime,
    registry: &Registry,
    hashed: &[(std::path::PathBuf, Digest)],
) -> Result<PreparedImage, LayerError> {
    let (config_digest, layers) = classify(image)?;
    let config = read_config(store, &config_digest)?;
    let (plugin, reader_sha256) = reader(runtime, registry)?;
    let builder = Squashfs::detect()?;
    let backend = LayerBackend {
        plugin: &plugin,
        builder: &builder,
        id: ConverterId {
            name: format!("{}+{}", plugin.name(), build::MKSQUASHFS),
            sha256: builder.builder_digest(&reader_sha256),
        },
    };
    let mut out = PreparedImage {
        layers: Vec::new(),
        config,
        built: Vec::new(),
    };
    for (digest, media_type) in layers {
        let mut image = store.converted(&digest, LAYER_FORMAT, &backend)?;
        // A cache hit is only as good as its bytes: re-hashed, and a
        // tampered or corrupt one removed and built again.
        let trusted = hashed
            .iter()
            .any(|(p, d)| *p == image.path && *d == image.digest);
        if !image.converted_now && !trusted && !store.verify_conversion(&image)? {
            image = store.converted(&digest, LAYER_FORMAT, &backend)?;
        }
        out.layers.push(LayerImage {
            digest: image.digest.clone(),
            path: image.path.clone(),
        });
        out.built.push(BuiltLayer {
            source: digest,
            media_type,
            image,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::index::ArtifactRecord;

    fn art(media_type: &str, n: u8) -> ArtifactRecord {
        ArtifactRecord {
            url: "https://r/x".into(),
            digest: format!("sha256:{}", hex::encode([n; 32])).parse().unwrap(),
            size: 1,
            media_type: media_type.into(),
            format_hint: None,
            pinned: true,
            etag: None,
            last_modified: None,
        }
    }

    #[test]
    fn layers_follow_the_config_in_order() {
        let rec = |artifacts| RefRecord {
            reference: "oci://r/x".into(),
            source: "oci-source".into(),
            pulled_at: 0,
            artifacts,
        };
        let (config, layers) = classify(&rec(vec![
            art("application/vnd.oci.image.manifest.v1+json", 1),
            art(CONFIG_TYPES[0], 2),
            art(LAYER_TYPES[1], 3),
            art(LAYER_TYPES[0], 4),
        ]))
        .unwrap();
        assert_eq!(config, art("", 2).digest);
        assert_eq!(
            layers.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            [art("", 3).digest, art("", 4).digest]
        );
        assert!(is_layered(&rec(vec![
            art(CONFIG_TYPES[0], 2),
            art(LAYER_TYPES[1], 3)
        ])));
        let mut disk = art("application/vnd.cocoon.disk.qcow2", 3);
        disk.format_hint = Some("qcow2".into());
        assert!(!is_layered(&rec(vec![art(CONFIG_TYPES[0], 2), disk])));
        assert!(!is_layered(&rec(vec![art("application/octet-stream", 1)])));
        let err = classify(&rec(vec![art("application/octet-stream", 1)])).unwrap_err();
        assert!(matches!(err, LayerError::NotAnImage { .. }), "{err}");
        let err = classify(&rec(vec![
            art(CONFIG_TYPES[1], 2),
            art("application/vnd.example.thing", 3),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("vnd.example.thing"), "{err}");
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        assert_eq!(shown("a/b"), "\"a/b\"");
        let long = "é".repeat(300);
        let s = shown(&long);
        assert!(s.len() < 210 && s.ends_with('…'), "{s}");
    }
}
