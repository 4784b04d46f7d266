//! Snapshots of running VMs on the host: saved under `STATE/snapshots/`,
//! cloned into new VMs, restored into existing ones, exported to and
//! imported from tar streams.
//!
//! A snapshot directory `STATE/snapshots/NAME/` holds:
//!
//! | file | what |
//! |---|---|
//! | `snapshot.json` | the [`sidecar`]: disks with roles, image digest, VMM state version, cpus, memory, every file's size and sha256 |
//! | `state` | the VMM's machine state ([`cocoon_vmm::snapshot`]) |
//! | `memory` | guest RAM, sparse; mapped `MAP_PRIVATE` by restored VMs |
//! | `disks/NAME` | copies of the cow, data and seed disks taken in the pause window |
//! | `kernel`, `initrd` | copies of the VM's boot files (sidecar 1.1), for clones' cold boots |
//!
//! Layers are not copied: the sidecar names them by digest and path in
//! the image store ([`SnapshotRoots`] keeps them from `image gc`); a
//! clone or restore on a store that lacks them builds them again from the
//! image and requires the digests the sidecar pins ([`layers`]).
//!
//! The operations, each one library call (the CLI and the monitor wire
//! them):
//!
//! - save: [`save::save`] (or [`save::capture`] inside the pause window
//!   and [`save::Captured::finish`] after resume);
//! - list / inspect / rm: [`store::list`], [`store::SnapshotDir::open`]
//!   (its `sidecar`), [`store::remove`]; [`store::clean_stale`] removes
//!   what interrupted saves left;
//! - preflight alone (`inspect --check`): [`preflight::preflight`]; the
//!   image it needs, pulled by digest when missing: [`base_image`]; its
//!   layers, hashed against their pinned digests and built again when
//!   missing or of other bytes: [`layers`];
//! - clone: [`clone::clone`] (`--data-disk`: [`clone_disks`]);
//! - restore: [`restore::prepare`], [`restore::Prepared::stage`],
//!   [`restore::Staged::commit`];
//! - export / import: [`archive::export`], [`archive::import`];
//! - push / pull: [`registry::push`], [`registry::pull`].

pub mod archive;
pub mod base_image;
pub mod clone;
pub mod clone_disks;
pub mod layers;
pub mod preflight;
pub mod registry;
pub mod restore;
pub mod save;
pub mod sidecar;
pub mod store;

use std::path::PathBuf;

pub use clone::{clone, CloneError, CloneOptions, Cloned};
pub use preflight::{preflight, Checked, PreflightError};
pub use save::{save, SaveError, SaveMeta, SnapshotInfo};
pub use sidecar::{ImageInfo, Sidecar, SidecarError};
pub use store::{SnapshotDir, StoreError};

/// The snapshots directory of a state directory.
pub fn snapshots_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// The image digests every snapshot under a snapshots directory keeps
/// alive: add it to `image gc`'s root set. A snapshot whose sidecar
/// cannot be read fails gc rather than losing its image.
pub struct SnapshotRoots {
    pub snapshots_dir: PathBuf,
}

impl crate::store::RootSet for SnapshotRoots {
    fn roots(&self) -> Result<Vec<crate::store::Digest>, crate::store::StoreError> {
        let listed =
            store::list(&self.snapshots_dir).map_err(|e| crate::store::StoreError::Io {
                op: "listing snapshots in",
                path: self.snapshots_dir.clone(),
                source: std::io::Error::other(crate::error_chain(&e)),
            })?;
        let mut out = Vec::new();
        for l in listed {
            let sidecar = l.sidecar.map_err(|e| crate::store::StoreError::Io {
                op: "reading the snapshot sidecar of",
                path: l.dir.clone(),
                source: std::io::Error::other(crate::error_chain(&e)),
            })?;
            out.extend(sidecar.store_roots());
        }
        Ok(out)
    }
}
