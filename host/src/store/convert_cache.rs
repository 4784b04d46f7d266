//! The conversion cache: `converted/<source hex>/<target>/<converter
//! sha256>/image` with its digest file `image.digest` beside it.
//!
//! - The key is (source digest, target format, converter digest): a new
//!   converter build never serves an old conversion.
//! - The source is re-hashed before it is converted.
//! - The result is renamed into place, then its digest file is written
//!   atomically. A [`ConvertedImage`] is only made from a digest file that
//!   parses, names this key and matches the file's size; anything else is
//!   incomplete and is rebuilt.
//! - Nothing here touches the reference index: conversion cannot change
//!   how the source's freshness is checked.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::blob::{Layout, VerifiedBlob};
use super::digest::{hash_reader, Digest};
use super::{Store, StoreError};
use crate::fsutil;

/// A converter plugin as part of a cache key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConverterId {
    pub name: String,
    /// sha256 hex of the plugin's wasm.
    pub sha256: String,
}

/// What converts; the engine in production, a stand-in in tests.
pub trait ConvertBackend {
    /// The converters installed now: a cached result made by any other
    /// converter build is not used.
    fn installed(&self) -> Vec<ConverterId>;
    /// Converts `source` into a `target` file at `dest`, returning the
    /// converter that did it.
    fn convert(
        &self,
        source: &VerifiedBlob,
        dest: &Path,
        target: &str,
    ) -> Result<ConverterId, StoreError>;
}

/// The conversion engine with the registry's converter plugins.
pub struct EngineBackend<'a> {
    pub runtime: &'a crate::plugin::Runtime,
    pub registry: &'a crate::plugin::Registry,
}

impl ConvertBackend for EngineBackend<'_> {
    fn installed(&self) -> Vec<ConverterId> {
        self.registry
            .list()
            .filter(|p| {
                p.manifest.kind == crate::plugin::PluginKind::FormatConverter && !p.disabled
            })
            .map(|p| ConverterId {
                name: p.name().to_string(),
                sha256: p.sha256.clone(),
            })
            .collect()
    }

    fn convert(
        &self,
        blob: &VerifiedBlob,
        dest: &Path,
        target: &str,
    ) -> Result<ConverterId, StoreError> {
        let req = crate::convert::ConvertRequest {
            source: blob.path(),
            dest,
            format: None,
            backing: &crate::convert::NoBacking,
            jobs: 0,
        };
        let wrap = |e| StoreError::Convert {
            source_digest: blob.digest().clone(),
            target: target.to_string(),
            source: Box::new(e),
        };
        let report =
            crate::convert::convert(self.runtime, self.registry, &req, &crate::convert::Silent)
                .map_err(wrap)?;
        Ok(ConverterId {
            name: report.converter,
            sha256: report.converter_sha256,
        })
    }
}

/// The digest file of a converted image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DigestFile {
    pub digest: Digest,
    pub size: u64,
    pub source: Digest,
    pub target: String,
    pub converter: ConverterId,
}

impl DigestFile {
    /// Written crash-safely (temp, fsync, rename), 0600.
    fn write(&self, path: &Path) -> Result<(), StoreError> {
        fsutil::write_atomic(
            path,
            &serde_json::to_vec_pretty(self).expect("plain struct"),
            0o600,
        )
        .map_err(StoreError::io("writing", path))
    }
}

/// A converted image with a valid digest file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertedImage {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
    pub source: Digest,
    pub target: String,
    pub converter: ConverterId,
    /// Whether this call converted (false: served from the cache).
    pub converted_now: bool,
}

impl ConvertedImage {
    /// Re-hashes the image against its digest file.
    pub fn verify(&self) -> Result<bool, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)
            .map_err(StoreError::io("opening", &self.path))?;
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return Ok(false);
        }
        let (d, n) = hash_reader(f).map_err(StoreError::io("hashing", &self.path))?;
        Ok(d == self.digest && n == self.size)
    }
}

/// Removes a conversion's directory, the digest file first: without it
/// the image is incomplete, and never served, even if the removal of the
/// rest is interrupted. The caller holds the key's lock.
fn remove_entry(c: &ConvertedImage) -> Result<(), StoreError> {
    let dir = c.path.parent().unwrap_or(&c.path);
    let digest_path = dir.join("image.digest");
    fs::remove_file(&digest_path).map_err(StoreError::io("removing", &digest_path))?;
    fsutil::sync_dir(dir).map_err(StoreError::io("syncing", dir))?;
    fs::remove_dir_all(dir).map_err(StoreError::io("removing", dir))
}

/// Creates `dir` and its missing parents with mode 0700.
fn private_dirs(dir: &Path) -> Result<(), StoreError> {
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(StoreError::io("creating", dir))
}

fn safe_target(target: &str) -> bool {
    !target.is_empty()
        && target.len() <= 32
        && target
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Layout {
    fn conv_dir(&self, source: &Digest, target: &str) -> PathBuf {
        self.converted_dir().join(source.hex()).join(target)
    }

    /// The cached conversion in `dir`, if its digest file is valid for
    /// this key.
    fn valid_conversion(
        &self,
        dir: &Path,
        source: &Digest,
        target: &str,
        converter: &ConverterId,
    ) -> Option<ConvertedImage> {
        let image = dir.join("image");
        let rel = dir.strip_prefix(self.root()).ok()?;
        let text = self.read_file(&rel.join("image.digest")).ok()??;
        let df: DigestFile = serde_json::from_slice(&text).ok()?;
        let (kind, size) = super::files::lstat(self.root(), &rel.join("image"))?;
        if kind != rustix::fs::FileType::RegularFile {
            return None;
        }
        let valid = df.source == *source
            && df.target == target
            && df.converter == *converter
            && df.size == size;
        valid.then_some(ConvertedImage {
            path: image,
            digest: df.digest,
            size,
            source: df.source,
            target: df.target,
            converter: df.converter,
            converted_now: false,
        })
    }
}

impl Layout {
    /// Every cached conversion of `source` with a digest file that parses
    /// and matches its image's size, sorted by target and converter.
    pub fn conversions_of(&self, source: &Digest) -> Vec<ConvertedImage> {
        let mut out = Vec::new();
        let base = self.converted_dir().join(source.hex());
        for target in fs::read_dir(&base).into_iter().flatten().flatten() {
            let target_name = target.file_name().to_string_lossy().into_owned();
            if !safe_target(&target_name) {
                continue;
            }
            for conv in fs::read_dir(target.path()).into_iter().flatten().flatten() {
                let rel = conv
                    .path()
                    .strip_prefix(self.root())
                    .map(|r| r.join("image.digest"));
                let Ok(Ok(Some(text))) = rel.map(|r| self.read_file(&r)) else {
                    continue;
                };
                let Ok(df) = serde_json::from_slice::<DigestFile>(&text) else {
                    continue;
                };
                if let Some(c) =
                    self.valid_conversion(&conv.path(), source, &target_name, &df.converter)
                {
                    out.push(c);
                }
            }
        }
        out.sort_by(|a, b| (&a.target, &a.converter.sha256).cmp(&(&b.target, &b.converter.sha256)));
        out
    }
}

impl Store {
    /// Re-hashes a cached conversion; one that no longer matches its
    /// digest file is removed (the next conversion rebuilds it). True when
    /// it verified.
    pub fn verify_conversion(&self, c: &ConvertedImage) -> Result<bool, StoreError> {
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        let _lock = layout.lock(&format!("2-conv-{}-{}", c.source.hex(), c.target))?;
        if c.verify()? {
            return Ok(true);
        }
        tracing::warn!(image = %c.path.display(), expected = %c.digest, "corrupt conversion removed");
        remove_entry(c)?;
        Ok(false)
    }

    /// Removes a cached conversion (its digest file first), e.g. one a
    /// caller built and then refused.
    pub fn remove_conversion(&self, c: &ConvertedImage) -> Result<(), StoreError> {
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        let _lock = layout.lock(&format!("2-conv-{}-{}", c.source.hex(), c.target))?;
        remove_entry(c)
    }

    /// Files the conversion `c` under the key of another converter build
    /// too (`converter_sha256`, 64 hex digits): a hard link of the image
    /// and a digest file naming that key. For a caller that knows the
    /// bytes are what that build made (a snapshot pins the digest of the
    /// layer its VM used, at that build's path, and a rebuild here gave
    /// the same digest and size). Such an entry is never served to
    /// [`Store::converted`] unless that build is installed; gc keeps it
    /// while its source or its image digest is a root. An entry already
    /// there with the same digest file is left as it is.
    pub fn file_conversion_as(
        &self,
        c: &ConvertedImage,
        converter_sha256: &str,
    ) -> Result<ConvertedImage, StoreError> {
        if converter_sha256.len() != 64 || !converter_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(StoreError::BadReference {
                reference: converter_sha256.into(),
                reason: "not a converter's sha256".into(),
            });
        }
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        let _lock = layout.lock(&format!("2-conv-{}-{}", c.source.hex(), c.target))?;
        let converter = ConverterId {
            name: c.converter.name.clone(),
            sha256: converter_sha256.to_string(),
        };
        let dir = layout.conv_dir(&c.source, &c.target).join(converter_sha256);
        if let Some(hit) = layout.valid_conversion(&dir, &c.source, &c.target, &converter) {
            if hit.digest == c.digest {
                return Ok(hit);
            }
        }
        private_dirs(&dir)?;
        let digest_path = dir.join("image.digest");
        let image = dir.join("image");
        for p in [&digest_path, &image] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("removing", p)(e)),
            }
        }
        fs::hard_link(&c.path, &image).map_err(StoreError::io("linking into the cache", &image))?;
        fsutil::sync_dir(&dir).map_err(StoreError::io("syncing", &dir))?;
        let df = DigestFile {
            digest: c.digest.clone(),
            size: c.size,
            source: c.source.clone(),
            target: c.target.clone(),
            converter: converter.clone(),
        };
        df.write(&digest_path)?;
        Ok(ConvertedImage {
            path: image,
            converter,
            converted_now: true,
            ..c.clone()
        })
    }

    /// The `target` conversion of `source`, from the cache or made now.
    pub fn converted(
        &self,
        source: &Digest,
        target: &str,
        backend: &dyn ConvertBackend,
    ) -> Result<ConvertedImage, StoreError> {
        if !safe_target(target) {
            return Err(StoreError::BadReference {
                reference: target.into(),
                reason: "not a format name".into(),
            });
        }
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        let _lock = layout.lock(&format!("2-conv-{}-{target}", source.hex()))?;
        let base = layout.conv_dir(source, target);
        for c in backend.installed() {
            if let Some(hit) = layout.valid_conversion(&base.join(&c.sha256), source, target, &c) {
                return Ok(hit);
            }
        }
        // Verified now, not at some earlier pull: the bytes converted are
        // the bytes the digest names.
        let blob: VerifiedBlob =
            layout
                .verified(source)?
                .ok_or_else(|| StoreError::SourceGone {
                    digest: source.clone(),
                })?;
        private_dirs(&base)?;
        // Leftovers of a conversion that was killed.
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                // Ours (`.work-PID`) and the engine's own temp files.
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let work = base.join(format!(".work-{}", std::process::id()));
        let converter = match backend.convert(&blob, &work, target) {
            Ok(c) => c,
            Err(e) => {
                // A refused source leaves nothing: no work file, and no
                // empty key directories when nothing else is there.
                let _ = fs::remove_file(&work);
                if fs::remove_dir(&base).is_ok() {
                    if let Some(parent) = base.parent() {
                        let _ = fs::remove_dir(parent);
                    }
                }
                return Err(e);
            }
        };
        if !converter.sha256.bytes().all(|b| b.is_ascii_hexdigit()) || converter.sha256.len() != 64
        {
            let _ = fs::remove_file(&work);
            return Err(StoreError::NoConverter);
        }
        let f = fs::File::open(&work).map_err(StoreError::io("opening", &work))?;
        f.sync_all().map_err(StoreError::io("syncing", &work))?;
        let (digest, size) = hash_reader(f).map_err(StoreError::io("hashing", &work))?;
        let dir = base.join(&converter.sha256);
        private_dirs(&dir)?;
        // Read-only and private, like the blobs.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&work, fs::Permissions::from_mode(0o400))
                .map_err(StoreError::io("chmod", &work))?;
        }
        let digest_path = dir.join("image.digest");
        // An old digest file must not describe the new image for even a
        // moment: remove it before the image is replaced.
        match fs::remove_file(&digest_path) {
            Ok(()) => fsutil::sync_dir(&dir).map_err(StoreError::io("syncing", &dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("removing", &digest_path)(e)),
        }
        let image = dir.join("image");
        fs::rename(&work, &image).map_err(StoreError::io("renaming into the cache", &image))?;
        fsutil::sync_dir(&dir).map_err(StoreError::io("syncing", &dir))?;
        let verity = super::verity::enable(&image);
        tracing::debug!(image = %image.display(), ?verity, "fs-verity");
        fsutil::sync_dir(&base).map_err(StoreError::io("syncing", &base))?;
        super::crash_point("before-digest-file");
        let df = DigestFile {
            digest: digest.clone(),
            size,
            source: source.clone(),
            target: target.into(),
            converter: converter.clone(),
        };
        df.write(&digest_path)?;
        Ok(ConvertedImage {
            path: image,
            digest,
            size,
            source: source.clone(),
            target: target.into(),
            converter,
            converted_now: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the source's bytes reversed, as converter `sha256`.
    struct Reverse(String);

    impl ConvertBackend for Reverse {
        fn installed(&self) -> Vec<ConverterId> {
            vec![self.id()]
        }
        fn convert(
            &self,
            source: &VerifiedBlob,
            dest: &Path,
            _: &str,
        ) -> Result<ConverterId, StoreError> {
            let mut b = fs::read(source.path()).unwrap();
            b.reverse();
            fs::write(dest, b).unwrap();
            Ok(self.id())
        }
    }

    impl Reverse {
        fn id(&self) -> ConverterId {
            ConverterId {
                name: "reverse".into(),
                sha256: self.0.clone(),
            }
        }
    }

    #[test]
    fn a_conversion_filed_under_another_key_is_served_to_that_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::at(dir.path().join("images")).unwrap();
        let file = dir.path().join("src");
        fs::write(&file, b"some source bytes").unwrap();
        let req = crate::store::PullRequest {
            reference: file.to_str().unwrap().into(),
            digest: None,
            policy: crate::store::PullPolicy::Missing,
            force: false,
        };
        struct NoSources;
        impl crate::store::Sources for NoSources {
            fn resolve(&self, r: &str) -> Result<crate::store::Resolved, StoreError> {
                panic!("no network for {r}")
            }
        }
        let pulled = store.pull(&NoSources, &req, &crate::store::Quiet).unwrap();
        let ours = Reverse("a".repeat(64));
        let theirs = Reverse("b".repeat(64));
        let c = store.converted(&pulled.digest, "rev", &ours).unwrap();
        assert!(c.converted_now);

        let filed = store.file_conversion_as(&c, &theirs.0).unwrap();
        assert_eq!(
            filed.path.parent().unwrap().file_name().unwrap(),
            "b".repeat(64).as_str()
        );
        assert_eq!(
            (filed.digest.clone(), filed.size),
            (c.digest.clone(), c.size)
        );
        assert!(filed.verify().unwrap());
        // The other build's key serves it now, from the cache.
        let hit = store.converted(&pulled.digest, "rev", &theirs).unwrap();
        assert!(!hit.converted_now);
        assert_eq!(
            (hit.path.clone(), hit.digest.clone()),
            (filed.path.clone(), c.digest.clone())
        );
        // Filing it again leaves it.
        let again = store.file_conversion_as(&c, &theirs.0).unwrap();
        assert!(!again.converted_now);
        assert!(store.file_conversion_as(&c, "../x").is_err());

        // Removed: ours goes, theirs stays.
        store.remove_conversion(&c).unwrap();
        assert!(!c.path.exists() && !c.path.parent().unwrap().exists());
        assert!(filed.path.exists());
        let rebuilt = store.converted(&pulled.digest, "rev", &ours).unwrap();
        assert!(rebuilt.converted_now);
        assert_eq!(rebuilt.digest, c.digest);
    }
}
