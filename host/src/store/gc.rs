//! Garbage collection: delete blobs and conversions nothing references.
//!
//! The root set is every blob named by the reference index plus whatever
//! [`RootSet`] implementations add: VM records and snapshots will name the
//! blobs and converted images they use. gc holds the store's `gc` lock
//! exclusively, so no pull or conversion is half-way through.

use std::collections::BTreeSet;
use std::fs;

use super::digest::Digest;
use super::{Store, StoreError};
use crate::fsutil;

/// Digests (of blobs or of converted images) that must survive gc.
pub trait RootSet {
    fn roots(&self) -> Result<Vec<Digest>, StoreError>;
}

/// No roots beyond the reference index (until VMs and snapshots exist).
pub struct NoRoots;

impl RootSet for NoRoots {
    fn roots(&self) -> Result<Vec<Digest>, StoreError> {
        Ok(Vec::new())
    }
}

/// Several root sets as one.
impl RootSet for [&dyn RootSet] {
    fn roots(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for r in self {
            out.extend(r.roots()?);
        }
        Ok(out)
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub removed_blobs: Vec<Digest>,
    /// Converted images removed, as `source/target/converter`.
    pub removed_conversions: Vec<String>,
    pub removed_partials: usize,
    pub freed_bytes: u64,
    pub kept_blobs: usize,
    pub dry_run: bool,
}

impl Store {
    pub fn gc(&self, roots: &dyn RootSet, dry_run: bool) -> Result<GcReport, StoreError> {
        let layout = self.layout();
        let _all = layout.lock("0-gc")?;
        let mut live: BTreeSet<Digest> = roots.roots()?.into_iter().collect();
        for r in layout.list_refs()? {
            live.extend(r.artifacts.into_iter().map(|a| a.digest));
        }
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let dir = layout.blobs_dir();
        for e in fs::read_dir(&dir)
            .map_err(StoreError::io("listing", &dir))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            if live.contains(&d) {
                report.kept_blobs += 1;
                continue;
            }
            report.freed_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(e.path()).map_err(StoreError::io("removing", e.path()))?;
            }
            report.removed_blobs.push(d);
        }
        // A conversion lives while its source does, or while something
        // names the converted image itself.
        let conv = layout.converted_dir();
        report.freed_bytes += crate::fsutil::temp::remove_stale_below(&conv, 2, dry_run)
            .map_err(StoreError::io("removing stale temp files in", &conv))?
            .bytes;
        for src in fs::read_dir(&conv)
            .map_err(StoreError::io("listing", &conv))?
            .flatten()
        {
            let src_name = src.file_name().to_string_lossy().into_owned();
            let src_live = format!("sha256:{src_name}")
                .parse::<Digest>()
                .is_ok_and(|d| live.contains(&d));
            for target in fs::read_dir(src.path()).into_iter().flatten().flatten() {
                for conv in fs::read_dir(target.path()).into_iter().flatten().flatten() {
                    let image_digest = fs::read(conv.path().join("image.digest"))
                        .ok()
                        .and_then(|t| {
                            serde_json::from_slice::<super::convert_cache::DigestFile>(&t).ok()
                        })
                        .map(|d| d.digest);
                    if src_live && image_digest.is_some()
                        || image_digest.is_some_and(|d| live.contains(&d))
                    {
                        continue;
                    }
                    let size: u64 = fs::read_dir(conv.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter_map(|f| f.metadata().ok())
                        .map(|m| m.len())
                        .sum();
                    report.freed_bytes += size;
                    if !dry_run {
                        let p = conv.path();
                        if p.is_dir() {
                            fs::remove_dir_all(&p).map_err(StoreError::io("removing", &p))?;
                        } else {
                            fs::remove_file(&p).map_err(StoreError::io("removing", &p))?;
                        }
                    }
                    report.removed_conversions.push(format!(
                        "{src_name}/{}/{}",
                        target.file_name().to_string_lossy(),
                        conv.file_name().to_string_lossy()
                    ));
                }
                if !dry_run {
                    let _ = fs::remove_dir(target.path());
                }
            }
            if !dry_run {
                let _ = fs::remove_dir(src.path());
            }
        }
        // No writer holds the gc lock now, so partial downloads are
        // abandoned ones.
        let tmp = layout.tmp_dir();
        for e in fs::read_dir(&tmp)
            .map_err(StoreError::io("listing", &tmp))?
            .flatten()
        {
            report.freed_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            report.removed_partials += 1;
            if !dry_run {
                let _ = fs::remove_file(e.path());
            }
        }
        if !dry_run {
            for d in [dir, conv, tmp] {
                fsutil::sync_dir(&d).map_err(StoreError::io("syncing", &d))?;
            }
        }
        Ok(report)
    }
}
