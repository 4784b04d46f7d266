//! The image a snapshot's VM was built from, brought back into the store
//! before a clone or restore changes anything. The store can lack it on
//! the host a snapshot was imported or pulled to, or after its blob went
//! (gc on a host that once held no snapshot of it). The sidecar names the
//! image by digest and the reference it was pulled by; the pull is pinned
//! to that digest, so only a blob of exactly that digest, hashed while it
//! is stored, satisfies it (the store's rules for a pinned pull).
//!
//! Only the image itself: a layer the store also lacks is built again
//! from the image afterwards ([`super::layers::rebuild_missing`], which
//! pulls the image's missing layer blobs the same way, pinned, and holds
//! each rebuilt layer to the digest the sidecar pins), and a clone needs
//! no converted base (its cow is the snapshot's copy).

use super::store::SnapshotDir;
use crate::store::digest::Digest;
use crate::store::{Layout, PullPolicy, PullReport, PullRequest, Sources, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    #[error("snapshot {snapshot}: image {digest}, which its VM was built from, is not in the store, and the sidecar records no reference to pull it from; pull it by digest first (nothing was changed)")]
    NoReference { snapshot: String, digest: Digest },
    #[error("snapshot {snapshot}: image {digest}, which its VM was built from, is not in the store and could not be pulled by digest from {reference} (nothing was changed)")]
    Pull {
        snapshot: String,
        digest: Digest,
        reference: String,
        #[source]
        source: Box<StoreError>,
    },
}

/// Whether the store has the snapshot's image (its blob, of that digest).
pub fn present(layout: &Layout, snapshot: &SnapshotDir) -> bool {
    layout
        .present(&snapshot.sidecar.image.digest, None)
        .is_some()
}

/// An image pulled for a snapshot.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub digest: Digest,
    /// As it may be shown (credentials removed).
    pub reference: String,
    /// Artifacts downloaded (0 when another process had just pulled it).
    pub downloaded: usize,
}

/// Pulls the snapshot's image by digest from the reference its sidecar
/// records, unless the store has it; `Ok(None)` when it had.
pub fn pull_missing(
    store: &Store,
    sources: &dyn Sources,
    snapshot: &SnapshotDir,
) -> Result<Option<PulledImage>, BaseImageError> {
    if present(store.layout(), snapshot) {
        return Ok(None);
    }
    let image = &snapshot.sidecar.image;
    let Some(reference) = image.reference.clone() else {
        return Err(BaseImageError::NoReference {
            snapshot: snapshot.name.clone(),
            digest: image.digest.clone(),
        });
    };
    let shown = crate::http::redact(&reference).into_owned();
    let req = PullRequest {
        reference,
        digest: Some(image.digest.clone()),
        policy: PullPolicy::Missing,
        force: false,
    };
    let pull_err = |source| BaseImageError::Pull {
        snapshot: snapshot.name.clone(),
        digest: image.digest.clone(),
        reference: shown.clone(),
        source: Box::new(source),
    };
    let report: PullReport = store
        .pull(sources, &req, &crate::store::Quiet)
        .map_err(pull_err)?;
    // The pin makes the store refuse any other digest; this is the check
    // that nothing upstream of it changed that rule.
    if report.digest != image.digest || !present(store.layout(), snapshot) {
        return Err(pull_err(StoreError::UnknownDigest {
            query: image.digest.to_string(),
        }));
    }
    Ok(Some(PulledImage {
        digest: report.digest,
        reference: shown,
        downloaded: report.downloaded,
    }))
}
