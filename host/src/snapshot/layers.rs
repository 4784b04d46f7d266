//! The layers of a snapshot's VM, hashed, and built again before a clone
//! or restore changes anything when the image store lacks them or has
//! other bytes for them. A layer disk is a
//! squashfs the host built from one layer tar of an OCI image
//! ([`crate::layer::prepare`], cached in the conversion cache under
//! `converted/<layer tar>/squashfs/<builder>/image`); a snapshot does not
//! copy it, its sidecar names it by that path, its digest and its size.
//! The store can lack it on a host the snapshot was imported or pulled to,
//! or after gc or a removal.
//!
//! [`check`] first hashes every layer file the store has against the
//! digest the sidecar pins (streamed, `O_NOFOLLOW`, a regular file only):
//! the host never boots a disk whose digest it has not verified. A layer
//! whose bytes do not match is treated as `run` treats a corrupt cached
//! layer: its cache entry is removed (digest file first, as
//! [`Store::verify_conversion`] does) and it is built again with the
//! missing ones. The layers it hashed are handed to the preflight
//! ([`super::preflight::Options::hashed_layers`]) and to
//! [`layer::prepare_trusting`], so each is hashed once.
//!
//! [`rebuild_missing`], when a layer file is missing or did not match:
//! 1. the image's record, by a pull pinned to the sidecar's image digest
//!    (answered by the store when it has the image whole, else fetching
//!    what it lacks through the sidecar's reference: only blobs of the
//!    pinned manifest's digests are taken);
//! 2. every layer through the path `run` uses ([`crate::layer::prepare`]:
//!    the layer blob re-hashed, read by the layer-reader plugin, checked,
//!    built by `mksquashfs`, which builds reproducibly, see
//!    [`crate::layer::build`]; a cached squashfs re-hashed unless
//!    [`check`] just hashed it);
//! 3. per layer built again: the image's layer at its position must be
//!    the tar the sidecar's path names, and the rebuilt squashfs must have the
//!    digest and size the sidecar pins. Anything else is refused, naming
//!    the layer and both digests, and a squashfs this call built for it
//!    is removed again: no VM is made or touched, and nothing of another
//!    digest is left at a path the snapshot names;
//! 4. a rebuild filed under another builder's key (this host's reader
//!    plugin or mksquashfs is not the snapshot host's, yet gave the same
//!    bytes) is linked in at the sidecar's path too
//!    ([`Store::file_conversion_as`]).
//!
//! Everything else about layers (names, paths inside the store, files
//! that are not regular) is the preflight's, which runs after this and
//! before anything changes; it hashes any layer not hashed here.

use std::path::{Component, Path, PathBuf};

use super::preflight::{self, HashedLayer};
use super::store::SnapshotDir;
use crate::disk::model::DiskRole;
use crate::layer::{self, LayerError, LAYER_FORMAT};
use crate::plugin::{Registry, Runtime};
use crate::store::digest::Digest;
use crate::store::{Layout, PluginSources, PullPolicy, PullRequest, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LayerRebuildError {
    #[error("snapshot {snapshot}: layers {layers} are not in the image store, and image {digest}, which its VM was built from, could not be pulled by digest from {reference} to build them again (nothing was changed)")]
    Pull {
        snapshot: String,
        layers: String,
        digest: Digest,
        reference: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("snapshot {snapshot}: image {digest} is not a layered image, but the sidecar has layer disks (nothing was changed)")]
    NotLayered { snapshot: String, digest: Digest },
    #[error("snapshot {snapshot}: the sidecar has {sidecar} layer disks, image {digest} has {image} layers (nothing was changed)")]
    Count {
        snapshot: String,
        digest: Digest,
        sidecar: usize,
        image: usize,
    },
    #[error("snapshot {snapshot}: layer disk {index} is at {path}, which is not a layer of the image store's cache (converted/LAYER/squashfs/BUILDER/image) (nothing was changed)")]
    Path {
        snapshot: String,
        index: usize,
        path: String,
    },
    #[error("snapshot {snapshot}: layer disk {index} was built from layer sha256:{recorded}, but layer {position} of image {digest} is {found} (nothing was changed)")]
    Source {
        snapshot: String,
        index: usize,
        position: usize,
        digest: Digest,
        recorded: String,
        found: Digest,
    },
    #[error(
        "snapshot {snapshot}: rebuilding its layers from image {digest} (nothing was changed)"
    )]
    Build {
        snapshot: String,
        digest: Digest,
        #[source]
        source: Box<LayerError>,
    },
    #[error(transparent)]
    Digest(Box<DigestMismatch>),
    #[error("snapshot {snapshot}: removing layer disk {index}'s corrupt cache entry {path} (its bytes did not match the digest the sidecar pins)")]
    Remove {
        snapshot: String,
        index: usize,
        path: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("snapshot {snapshot}: filing rebuilt layer {digest} at {path}")]
    File {
        snapshot: String,
        digest: Digest,
        path: String,
        #[source]
        source: Box<StoreError>,
    },
}

/// A rebuilt layer that is not the one the sidecar pins.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {snapshot}: layer disk {index} (from layer tar {source_layer}) was rebuilt as {rebuilt} ({rebuilt_size} bytes), but the sidecar pins {recorded} ({recorded_size} bytes); this host's layer builder ({tool}) does not make the bytes the snapshot's VM ran on, so the clone or restore is refused (nothing was changed)")]
pub struct DigestMismatch {
    pub snapshot: String,
    pub index: usize,
    pub source_layer: Digest,
    pub recorded: Digest,
    pub recorded_size: u64,
    pub rebuilt: Digest,
    pub rebuilt_size: u64,
    pub tool: String,
}

/// One layer built again.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuiltLayer {
    /// The disk's index in the sidecar (and the VM).
    pub index: usize,
    /// The layer tar it was built from.
    pub source: Digest,
    /// The squashfs: the digest and size the sidecar pins.
    pub digest: Digest,
    pub size: u64,
    /// Whether this call ran the builder (false: this host's cache had the
    /// same bytes under its own builder's key, linked in).
    pub built: bool,
    /// When the store had a file there whose bytes did not match: its
    /// sha256 (the file was removed and built again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<Digest>,
}

/// A layer file of the store whose bytes are not the ones the sidecar
/// pins for disk `index`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CorruptLayer {
    pub index: usize,
    /// Resolved.
    pub path: PathBuf,
    pub recorded: Digest,
    pub found: Digest,
    pub found_size: u64,
}

/// What [`check`] found of the sidecar's layers in the store.
#[derive(Debug, Clone, Default)]
pub struct LayerCheck {
    /// No file at the sidecar's path: (disk index, pinned digest).
    pub missing: Vec<(usize, Digest)>,
    /// A regular file there, hashed, of other bytes.
    pub corrupt: Vec<CorruptLayer>,
    /// Hashed (or built again) and found to be what the sidecar pins.
    pub hashed: Vec<HashedLayer>,
}

impl LayerCheck {
    /// Whether some layer must be built again.
    pub fn needs_rebuild(&self) -> bool {
        !self.missing.is_empty() || !self.corrupt.is_empty()
    }

    /// The layers to build again: (disk index, pinned digest, the corrupt
    /// file's digest).
    fn gone(&self) -> Vec<(usize, Digest, Option<Digest>)> {
        let mut v: Vec<_> = self
            .missing
            .iter()
            .map(|(i, d)| (*i, d.clone(), None))
            .chain(
                self.corrupt
                    .iter()
                    .map(|c| (c.index, c.recorded.clone(), Some(c.found.clone()))),
            )
            .collect();
        v.sort_by_key(|g| g.0);
        v
    }

    /// Records layers [`rebuild_missing`] built again as hashed: the build
    /// hashed them, and they have the digest and size the sidecar pins.
    pub fn rebuilt(&mut self, layout: &Layout, snapshot: &SnapshotDir, rebuilt: &[RebuiltLayer]) {
        let Ok(root) = std::fs::canonicalize(layout.root()) else {
            return;
        };
        for r in rebuilt {
            self.missing.retain(|(i, _)| *i != r.index);
            self.corrupt.retain(|c| c.index != r.index);
            let Some(d) = snapshot.sidecar.disks.get(r.index) else {
                continue;
            };
            if let Ok(Some((path, size))) =
                preflight::confine(&root, &d.config.path.to_string_lossy())
            {
                if size == r.size {
                    self.hashed.push(HashedLayer {
                        index: r.index,
                        path,
                        digest: r.digest.clone(),
                        size,
                    });
                }
            }
        }
    }
}

/// Hashes every layer file of the sidecar the store has against the
/// digest and size the sidecar pins; see the module documentation. A
/// layer the preflight will refuse for another reason (a name that is not
/// plain, a path out of the store, not a regular file, unreadable) is
/// left to it.
pub fn check(layout: &Layout, snapshot: &SnapshotDir) -> LayerCheck {
    let mut out = LayerCheck {
        missing: missing(layout, snapshot),
        ..LayerCheck::default()
    };
    let Ok(root) = std::fs::canonicalize(layout.root()) else {
        return out;
    };
    for (index, d) in snapshot.sidecar.disks.iter().enumerate() {
        if d.config.role != DiskRole::Layer || out.missing.iter().any(|(i, _)| *i == index) {
            continue;
        }
        let Some(pinned) = &d.layer else { continue };
        let name = d.config.path.to_string_lossy();
        if preflight::check_name(&name).is_err() {
            continue;
        }
        let Ok(Some((path, _))) = preflight::confine(&root, &name) else {
            continue;
        };
        let Ok((size, digest)) = preflight::hash_layer(&path) else {
            continue;
        };
        if digest == pinned.digest && size == pinned.size {
            out.hashed.push(HashedLayer {
                index,
                path,
                digest,
                size,
            });
        } else {
            out.corrupt.push(CorruptLayer {
                index,
                path,
                recorded: pinned.digest.clone(),
                found: digest,
                found_size: size,
            });
        }
    }
    out
}

/// The sidecar's layer disks whose file the store lacks: (disk index,
/// digest). A name that is not a plain relative path is the preflight's
/// to refuse, not missing.
pub fn missing(layout: &Layout, snapshot: &SnapshotDir) -> Vec<(usize, Digest)> {
    snapshot
        .sidecar
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.config.role == DiskRole::Layer)
        .filter_map(|(i, d)| {
            let name = d.config.path.to_string_lossy();
            super::preflight::check_name(&name).ok()?;
            let gone = layout
                .root()
                .join(name.as_ref())
                .symlink_metadata()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
            let digest = d.layer.as_ref().map(|l| l.digest.clone())?;
            gone.then_some((i, digest))
        })
        .collect()
}

/// `converted/<64 hex>/squashfs/<64 hex>/image`: the layer tar's hex and
/// the builder's, or `None`.
fn cache_key(path: &Path) -> Option<(String, String)> {
    let parts: Vec<&str> = path
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match parts[..] {
        ["converted", src, target, builder, "image"]
            if target == LAYER_FORMAT && hex(src) && hex(builder) =>
        {
            Some((src.to_string(), builder.to_string()))
        }
        _ => None,
    }
}

/// Removes the cache entry of a corrupt layer as the store removes a
/// corrupt conversion (digest file first, under the key's lock). An entry
/// without a valid digest file is never served; the rebuild replaces its
/// image.
fn remove_corrupt(
    store: &Store,
    snapshot: &SnapshotDir,
    c: &CorruptLayer,
) -> Result<(), LayerRebuildError> {
    let Some(d) = snapshot.sidecar.disks.get(c.index) else {
        return Ok(());
    };
    let rel = d.config.path.as_path();
    // Not a cache path: refused as such by the rebuild.
    let Some((src_hex, _)) = cache_key(rel) else {
        return Ok(());
    };
    let Ok(source) = format!("sha256:{src_hex}").parse::<Digest>() else {
        return Ok(());
    };
    let at = store.layout().root().join(rel);
    let Some(entry) = store
        .layout()
        .conversions_of(&source)
        .into_iter()
        .find(|e| e.path == at)
    else {
        return Ok(());
    };
    tracing::warn!(image = %at.display(), expected = %c.recorded, found = %c.found, "corrupt layer removed");
    store
        .remove_conversion(&entry)
        .map_err(|source| LayerRebuildError::Remove {
            snapshot: snapshot.name.clone(),
            index: c.index,
            path: at.display().to_string(),
            source: Box::new(source),
        })
}

/// Builds again every layer of the snapshot that [`check`] found missing
/// or corrupt, as the module documentation says; `Ok(vec![])` when there
/// is none (nothing is read or built then).
pub fn rebuild_missing(
    store: &Store,
    runtime: &Runtime,
    registry: &Registry,
    snapshot: &SnapshotDir,
    checked: &LayerCheck,
) -> Result<Vec<RebuiltLayer>, LayerRebuildError> {
    let layout = store.layout();
    let gone = checked.gone();
    if gone.is_empty() {
        return Ok(Vec::new());
    }
    for c in &checked.corrupt {
        remove_corrupt(store, snapshot, c)?;
    }
    let name = snapshot.name.clone();
    let image = &snapshot.sidecar.image;
    // Through the reference the sidecar records, or the store's own
    // records of the digest; pinned either way.
    let reference = image
        .reference
        .clone()
        .unwrap_or_else(|| image.digest.to_string());
    let shown = crate::http::redact(&reference).into_owned();
    let pull_err = |source| LayerRebuildError::Pull {
        snapshot: name.clone(),
        layers: gone
            .iter()
            .map(|(i, d, corrupt)| match corrupt {
                None => format!("{d} (disk {i})"),
                Some(found) => format!("{d} (disk {i}, whose file had sha256 {found})"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        digest: image.digest.clone(),
        reference: shown.clone(),
        source: Box::new(source),
    };
    let sources = PluginSources { runtime, registry };
    let req = PullRequest {
        reference,
        digest: Some(image.digest.clone()),
        policy: PullPolicy::Missing,
        force: false,
    };
    // Every held blob re-hashed: a rotten layer blob is fetched again
    // here, not found rotten by the build.
    let report = store
        .pull(&sources, &req, &crate::store::Quiet)
        .map_err(pull_err)?;
    if report.digest != image.digest {
        return Err(pull_err(StoreError::UnknownDigest {
            query: image.digest.to_string(),
        }));
    }
    if !layer::is_layered(&report.record) {
        return Err(LayerRebuildError::NotLayered {
            snapshot: name,
            digest: image.digest.clone(),
        });
    }
    // The layers check() hashed just now are not hashed again.
    let hashed: Vec<(PathBuf, Digest)> = checked
        .hashed
        .iter()
        .filter_map(|h| {
            let d = snapshot.sidecar.disks.get(h.index)?;
            Some((layout.root().join(&d.config.path), h.digest.clone()))
        })
        .collect();
    let prepared = layer::prepare_trusting(store, &report.record, runtime, registry, &hashed)
        .map_err(|source| LayerRebuildError::Build {
            snapshot: name.clone(),
            digest: image.digest.clone(),
            source: Box::new(source),
        })?;
    let disks: Vec<(usize, &super::sidecar::SnapshotDisk)> = snapshot
        .sidecar
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.config.role == DiskRole::Layer)
        .collect();
    if disks.len() != prepared.built.len() {
        return Err(LayerRebuildError::Count {
            snapshot: name,
            digest: image.digest.clone(),
            sidecar: disks.len(),
            image: prepared.built.len(),
        });
    }

    // Every check before any filing; a refusal removes what this call
    // built for a missing layer.
    let refuse = |e: LayerRebuildError| {
        for ((index, _), b) in disks.iter().zip(&prepared.built) {
            if b.image.converted_now && gone.iter().any(|g| g.0 == *index) {
                let _ = store.remove_conversion(&b.image);
            }
        }
        e
    };
    let mut plan = Vec::new();
    for (position, ((index, d), b)) in disks.iter().zip(&prepared.built).enumerate() {
        let Some(was) = gone.iter().find(|g| g.0 == *index) else {
            continue;
        };
        let rel = d.config.path.as_path();
        let Some((src_hex, builder)) = cache_key(rel) else {
            return Err(refuse(LayerRebuildError::Path {
                snapshot: name,
                index: *index,
                path: rel.display().to_string(),
            }));
        };
        if src_hex != b.source.hex() {
            return Err(refuse(LayerRebuildError::Source {
                snapshot: name,
                index: *index,
                position,
                digest: image.digest.clone(),
                recorded: src_hex,
                found: b.source.clone(),
            }));
        }
        let pinned = d
            .layer
            .as_ref()
            .expect("missing() lists layers with a digest");
        if b.image.digest != pinned.digest || b.image.size != pinned.size {
            let tool = layer::Squashfs::detect().map_or_else(|_| "?".into(), |s| s.version);
            return Err(refuse(LayerRebuildError::Digest(Box::new(
                DigestMismatch {
                    snapshot: name,
                    index: *index,
                    source_layer: b.source.clone(),
                    recorded: pinned.digest.clone(),
                    recorded_size: pinned.size,
                    rebuilt: b.image.digest.clone(),
                    rebuilt_size: b.image.size,
                    tool,
                },
            ))));
        }
        plan.push((*index, b, builder, layout.root().join(rel), was.2.clone()));
    }
    let mut out = Vec::new();
    for (index, b, builder, at, corrupt) in plan {
        if b.image.path != at {
            store
                .file_conversion_as(&b.image, &builder)
                .map_err(|source| LayerRebuildError::File {
                    snapshot: name.clone(),
                    digest: b.image.digest.clone(),
                    path: at.display().to_string(),
                    source: Box::new(source),
                })?;
        }
        out.push(RebuiltLayer {
            index,
            source: b.source.clone(),
            digest: b.image.digest.clone(),
            size: b.image.size,
            built: b.image.converted_now,
            corrupt,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layer_cache_paths_are_keys() {
        let a = "a".repeat(64);
        let b = "0".repeat(64);
        let ok = format!("converted/{a}/squashfs/{b}/image");
        assert_eq!(cache_key(Path::new(&ok)), Some((a.clone(), b.clone())));
        for bad in [
            format!("converted/{a}/raw/{b}/image"),
            format!("converted/{a}/squashfs/{b}/image.digest"),
            format!("converted/{a}/squashfs/{b}"),
            format!("blobs/sha256/{a}"),
            format!("converted/{}/squashfs/{b}/image", "A".repeat(64)),
            format!("converted/{a}/squashfs/short/image"),
            format!("converted/{a}/squashfs/../{b}/image"),
            format!("/converted/{a}/squashfs/{b}/image"),
            format!("x/converted/{a}/squashfs/{b}/image"),
        ] {
            assert_eq!(cache_key(Path::new(&bad)), None, "{bad}");
        }
    }
}
