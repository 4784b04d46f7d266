//! Garbage collection: delete blobs and conversions nothing references,
//! and the leftovers of interrupted work (partial downloads in `tmp/`,
//! partial conversions, temp files of interrupted record writes).
//!
//! The root set is every blob named by the reference index plus whatever
//! [`RootSet`] implementations add: VM records and snapshots will name the
//! blobs and converted images they use. gc holds the store's `gc` lock
//! exclusively, so no pull or conversion of this version is half-way
//! through; each leftover is also removed only under its own key's lock
//! (`1-stage-…`, `2-conv-…`), taken without waiting, so a file some live
//! process still holds is never removed.
//!
//! `freed_bytes` counts the blocks really given back (allocated size, so
//! a sparse 1 TiB conversion with 10 MiB of data frees 10 MiB).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::digest::Digest;
use super::lock;
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
    /// Leftovers of interrupted work: partial downloads, partial
    /// conversions, temp files.
    pub removed_partials: usize,
    /// Leftovers skipped because a live process holds their lock.
    pub busy_partials: usize,
    /// Allocated bytes given back to the filesystem.
    pub freed_bytes: u64,
    pub kept_blobs: usize,
    pub dry_run: bool,
}

/// The bytes `path` occupies on disk (all of a directory's contents),
/// not following symlinks.
pub fn allocated(path: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = m.blocks().saturating_mul(512);
    if !m.is_dir() {
        return own;
    }
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| allocated(&e.path()))
        .fold(own, u64::saturating_add)
}

/// The stage key of a file in `tmp/` (`<key>.partial`, `<key>.partial.json`).
pub fn stage_key(name: &str) -> Option<&str> {
    name.strip_suffix(".partial.json")
        .or_else(|| name.strip_suffix(".partial"))
        .filter(|k| !k.is_empty())
}

/// Removes a file or a directory tree, not following symlinks.
fn remove(path: &Path) -> Result<(), StoreError> {
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let r = if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("removing", path)(e)),
    }
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
        self.gc_blobs(&live, &mut report)?;
        self.gc_conversions(&live, &mut report)?;
        self.gc_leftovers(&mut report)?;
        if !dry_run {
            for d in [
                layout.blobs_dir(),
                layout.converted_dir(),
                layout.tmp_dir(),
                layout.refs_dir(),
            ] {
                fsutil::sync_dir(&d).map_err(StoreError::io("syncing", &d))?;
            }
        }
        Ok(report)
    }

    fn gc_blobs(&self, live: &BTreeSet<Digest>, report: &mut GcReport) -> Result<(), StoreError> {
        let dir = self.layout().blobs_dir();
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
            report.freed_bytes += allocated(&e.path());
            if !report.dry_run {
                remove(&e.path())?;
            }
            report.removed_blobs.push(d);
        }
        Ok(())
    }

    /// A conversion lives while its source does, or while something names
    /// the converted image itself. Plain files beside the conversion
    /// directories are partial conversions (`.work-PID`, the engine's
    /// temp files), removed unless their key's lock is held.
    fn gc_conversions(
        &self,
        live: &BTreeSet<Digest>,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let layout = self.layout();
        let conv = layout.converted_dir();
        report.freed_bytes += crate::fsutil::temp::remove_stale_below(&conv, 2, report.dry_run)
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
                let target_name = target.file_name().to_string_lossy().into_owned();
                let key_lock = layout.lock_path(&format!("2-conv-{src_name}-{target_name}"));
                for entry in fs::read_dir(target.path()).into_iter().flatten().flatten() {
                    let path = entry.path();
                    let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                    if !is_dir {
                        self.gc_leftover(&path, &key_lock, report)?;
                        continue;
                    }
                    let rel = path.strip_prefix(layout.root()).unwrap_or(&path);
                    let image_digest = layout
                        .read_file(&rel.join("image.digest"))
                        .ok()
                        .flatten()
                        .and_then(|t| {
                            serde_json::from_slice::<super::convert_cache::DigestFile>(&t).ok()
                        })
                        .map(|d| d.digest);
                    if src_live && image_digest.is_some()
                        || image_digest.is_some_and(|d| live.contains(&d))
                    {
                        continue;
                    }
                    report.freed_bytes += allocated(&path);
                    if !report.dry_run {
                        remove(&path)?;
                    }
                    report.removed_conversions.push(format!(
                        "{src_name}/{target_name}/{}",
                        entry.file_name().to_string_lossy()
                    ));
                }
                if !report.dry_run {
                    let _ = fs::remove_dir(target.path());
                }
            }
            if !report.dry_run {
                let _ = fs::remove_dir(src.path());
            }
        }
        Ok(())
    }

    /// Partial downloads in `tmp/` and temp files of record writes.
    fn gc_leftovers(&self, report: &mut GcReport) -> Result<(), StoreError> {
        let layout = self.layout();
        let tmp = layout.tmp_dir();
        for e in fs::read_dir(&tmp)
            .map_err(StoreError::io("listing", &tmp))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let lock = stage_key(&name).map(|k| layout.lock_path(&format!("1-stage-{k}")));
            match lock {
                Some(lock) => self.gc_leftover(&e.path(), &lock, report)?,
                None => {
                    report.freed_bytes += allocated(&e.path());
                    report.removed_partials += 1;
                    if !report.dry_run {
                        remove(&e.path())?;
                    }
                }
            }
        }
        // `.tmp-*` of a record write that was killed before its rename.
        let refs = layout.refs_dir();
        for e in fs::read_dir(&refs)
            .map_err(StoreError::io("listing", &refs))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                report.freed_bytes += allocated(&e.path());
                report.removed_partials += 1;
                if !report.dry_run {
                    remove(&e.path())?;
                }
            }
        }
        Ok(())
    }

    /// Removes one leftover file if no live process holds `key_lock`.
    fn gc_leftover(
        &self,
        path: &Path,
        key_lock: &Path,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let held = match lock::try_exclusive(key_lock) {
            Ok(h) => h,
            Err(e) => return Err(StoreError::io("locking", key_lock)(e)),
        };
        let Some(_held) = held else {
            report.busy_partials += 1;
            return Ok(());
        };
        report.freed_bytes += allocated(path);
        report.removed_partials += 1;
        if !report.dry_run {
            remove(path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_keys() {
        assert_eq!(stage_key("u-ab.partial"), Some("u-ab"));
        assert_eq!(stage_key("u-ab.partial.json"), Some("u-ab"));
        assert_eq!(stage_key(".partial"), None);
        assert_eq!(stage_key("other"), None);
    }

    #[test]
    fn allocated_counts_blocks_not_length() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse");
        let f = fs::File::create(&sparse).unwrap();
        f.set_len(1 << 30).unwrap();
        let dense = dir.path().join("d/dense");
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(&dense, vec![1u8; 1 << 20]).unwrap();
        assert!(allocated(&sparse) < 1 << 20, "{}", allocated(&sparse));
        let d = allocated(&dir.path().join("d"));
        assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&d), "{d}");
        assert_eq!(allocated(&dir.path().join("none")), 0);
    }
}
