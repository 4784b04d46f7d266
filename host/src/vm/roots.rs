//! VMs as `image gc` roots: the image each VM was made from, its
//! converted base and its layers stay in the store while the VM exists.

use super::record::VmRecord;
use super::vms::Vms;
use crate::store::{Digest, RootSet, StoreError};

pub struct VmRoots<'a>(pub &'a Vms);

impl RootSet for VmRoots<'_> {
    fn roots(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(self.0.root()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreError::io("listing", self.0.root())(e)),
        };
        for e in rd.flatten() {
            // VM directories only (not `.lock`).
            if e.file_name().to_string_lossy().starts_with('.')
                || !e.file_type().is_ok_and(|t| t.is_dir())
            {
                continue;
            }
            // Every record counts, `creating` ones too: a create in
            // progress is about to copy its base. A record that cannot be
            // read stops gc rather than risk a VM's image.
            match VmRecord::load(&e.path()) {
                Ok(Some(r)) => {
                    if let Some(i) = r.image {
                        out.push(i.digest);
                        out.extend(i.base);
                        out.extend(i.layers);
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    return Err(StoreError::io("reading the VM record in", &e.path())(
                        std::io::Error::other(crate::error_chain(&err)),
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// Everything on this host that keeps images: VMs and snapshots.
pub struct HostRoots<'a> {
    pub vms: VmRoots<'a>,
    pub snapshots: crate::snapshot::SnapshotRoots,
}

impl RootSet for HostRoots<'_> {
    fn roots(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = self.vms.roots()?;
        out.extend(self.snapshots.roots()?);
        Ok(out)
    }
}
