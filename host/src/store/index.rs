//! The reference index: what each reference resolved to when it was last
//! pulled, with the freshness data needed to revalidate it. One JSON file
//! per reference, written atomically and only after every blob it names
//! is in the store.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::blob::Layout;
use super::digest::Digest;
use super::StoreError;
use crate::fsutil;
use crate::http::redact;

/// One artifact of a reference, as last pulled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactRecord {
    pub url: String,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    #[serde(default)]
    pub format_hint: Option<String>,
    /// Whether the source pinned this digest (then it never needs
    /// revalidation) or the host learned it by hashing what the URL served.
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefRecord {
    pub reference: String,
    /// The plugin that resolved it, or `file` for local files.
    pub source: String,
    /// Seconds since the epoch of the pull that wrote this record: the
    /// last that found something new (a pull that only confirms what the
    /// record says leaves it as it is).
    pub pulled_at: u64,
    pub artifacts: Vec<ArtifactRecord>,
}

impl RefRecord {
    /// The digest the reference is known by: its first artifact's (the
    /// file of a URL, the manifest of an OCI image).
    pub fn digest(&self) -> &Digest {
        &self.artifacts[0].digest
    }

    /// The artifact that is a disk image: the one with a format hint
    /// (the last, for layered images), or the only artifact there is. An
    /// OCI manifest or config is never a disk.
    pub fn disk(&self) -> Option<&ArtifactRecord> {
        match self
            .artifacts
            .iter()
            .rev()
            .find(|a| a.format_hint.is_some())
        {
            Some(a) => Some(a),
            None if self.artifacts.len() == 1 => self.artifacts.first(),
            None => None,
        }
    }

    pub fn size(&self) -> u64 {
        self.artifacts.iter().map(|a| a.size).sum()
    }
}

/// The file name of a reference's record: references contain `/` and `:`.
pub fn key(reference: &str) -> String {
    Digest::of(reference.as_bytes()).hex().to_string()
}

/// The lock of one reference's pulls. Like its record, it is named by
/// the reference without credentials.
pub fn ref_lock_name(reference: &str) -> String {
    format!("0-ref-{}", key(&redact(reference)))
}

impl Layout {
    /// A reference's record is filed under the reference as it may be
    /// shown (credentials replaced), so a password never reaches a file
    /// name or a record, and a reference with credentials finds the
    /// record it wrote.
    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root().join(Self::ref_rel(reference))
    }

    fn ref_rel(reference: &str) -> PathBuf {
        Path::new("refs").join(format!("{}.json", key(&redact(reference))))
    }

    pub fn read_ref(&self, reference: &str) -> Result<Option<RefRecord>, StoreError> {
        let path = self.ref_path(reference);
        let Some(text) = self.read_file(&Self::ref_rel(reference))? else {
            return Ok(None);
        };
        let record: RefRecord =
            serde_json::from_slice(&text).map_err(|source| StoreError::Index {
                path: path.clone(),
                source,
            })?;
        if record.reference != redact(reference) || record.artifacts.is_empty() {
            // A hash collision is not plausible; a hand-edited or
            // truncated-by-hand file is. Treat it as absent.
            return Ok(None);
        }
        Ok(Some(record))
    }

    pub fn write_ref(&self, record: &RefRecord) -> Result<(), StoreError> {
        let path = self.ref_path(&record.reference);
        let text = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Index {
            path: path.clone(),
            source,
        })?;
        fsutil::write_atomic(&path, &text, 0o600).map_err(StoreError::io("writing", &path))
    }

    /// Removes a reference's record; false when there was none.
    pub fn remove_ref(&self, reference: &str) -> Result<bool, StoreError> {
        let path = self.ref_path(reference);
        match fs::remove_file(&path) {
            Ok(()) => {
                fsutil::sync_dir(&self.refs_dir())
                    .map_err(StoreError::io("syncing", self.refs_dir()))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("removing", &path)(e)),
        }
    }

    /// Every record, sorted by reference. Unreadable files are skipped
    /// with a warning: one bad file must not hide the others.
    pub fn list_refs(&self) -> Result<Vec<RefRecord>, StoreError> {
        let dir = self.refs_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io("listing", &dir))? {
            let entry = entry.map_err(StoreError::io("listing", &dir))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let rel = Path::new("refs").join(entry.file_name());
            match self
                .read_file(&rel)
                .map(|t| t.map(|t| serde_json::from_slice::<RefRecord>(&t)))
            {
                Ok(Some(Ok(r))) if !r.artifacts.is_empty() => out.push(r),
                _ => tracing::warn!(file = %path.display(), "unreadable reference record skipped"),
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(n: u8, hint: Option<&str>) -> ArtifactRecord {
        ArtifactRecord {
            url: format!("https://r/{n}"),
            digest: Digest::of(&[n]),
            size: 1,
            media_type: "x".into(),
            format_hint: hint.map(str::to_string),
            pinned: true,
            etag: None,
            last_modified: None,
        }
    }

    #[test]
    fn the_disk_artifact() {
        let rec = |arts: Vec<ArtifactRecord>| RefRecord {
            reference: "r".into(),
            source: "s".into(),
            pulled_at: 0,
            artifacts: arts,
        };
        assert_eq!(rec(vec![art(1, None)]).disk().unwrap().url, "https://r/1");
        assert!(rec(vec![art(1, None), art(2, None)]).disk().is_none());
        let r = rec(vec![
            art(1, None),
            art(2, Some("qcow2")),
            art(3, Some("raw")),
            art(4, None),
        ]);
        assert_eq!(r.disk().unwrap().url, "https://r/3");
    }
}
