//! Content-addressed blobs. A blob enters `blobs/sha256/` only through
//! [`Layout::commit`], which takes a [`Staged`] file whose digest was
//! computed from the bytes as they were written, compares it with the
//! expected digest, and renames the file into place. There is no other way
//! to obtain a [`VerifiedBlob`].

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::digest::{hash_reader, Digest, HashingWriter};
use super::files;
pub use super::files::Access;
use super::lock;
use super::verity;
use super::StoreError;
use crate::fsutil;

/// Write buffer of a staged file: small enough that a killed download
/// leaves most of what it received on disk for the resume.
const BUF: usize = 256 << 10;

/// Where everything of one store lives.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// A blob whose bytes were hashed by this process and matched `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBlob {
    digest: Digest,
    path: PathBuf,
    size: u64,
}

impl VerifiedBlob {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Layout {
    /// The store at `root`, its directories created if missing. Every
    /// one is private to its owner (0700) and a real directory, not a
    /// symlink to one.
    pub fn create(root: PathBuf) -> Result<Layout, StoreError> {
        files::private_root(&root, true)?;
        let layout = Layout { root };
        for dir in [
            layout.root.join("blobs"),
            layout.blobs_dir(),
            layout.refs_dir(),
            layout.tmp_dir(),
            layout.locks_dir(),
            layout.converted_dir(),
        ] {
            files::private_dir(&dir)?;
        }
        Ok(layout)
    }

    /// Opens `rel` (relative to the root) without following symlinks,
    /// regular files only; `None` when it does not exist.
    pub fn open_file(&self, rel: &Path, access: Access) -> Result<Option<File>, StoreError> {
        files::open(&self.root, rel, access)
    }

    /// Reads a small file under the root the same way.
    pub fn read_file(&self, rel: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        files::read(&self.root, rel)
    }

    fn blob_rel(digest: &Digest) -> PathBuf {
        Path::new("blobs/sha256").join(digest.hex())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }
    pub fn refs_dir(&self) -> PathBuf {
        self.root.join("refs")
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }
    pub fn converted_dir(&self) -> PathBuf {
        self.root.join("converted")
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// The lock of one key (`0-gc`, `0-ref-…`, `1-blob-…`, `1-stage-…`, `2-conv-…`).
    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.locks_dir().join(name)
    }

    /// Every writer holds this shared; gc holds it exclusively.
    pub fn writer_lock(&self) -> Result<lock::Held, StoreError> {
        let p = self.lock_path("0-gc");
        lock::shared(&p).map_err(StoreError::io("locking", p))
    }

    pub fn lock(&self, name: &str) -> Result<lock::Held, StoreError> {
        let p = self.lock_path(name);
        lock::exclusive(&p).map_err(StoreError::io("locking", p))
    }

    /// The blob of `digest` if it is present with the expected size. Blobs
    /// are only ever renamed into place after verification, so presence
    /// means verified at commit time; [`Layout::verified`] re-hashes.
    pub fn present(&self, digest: &Digest, size: Option<u64>) -> Option<VerifiedBlob> {
        let (kind, len) = files::lstat(&self.root, &Self::blob_rel(digest))?;
        if kind != rustix::fs::FileType::RegularFile || size.is_some_and(|s| s != len) {
            return None;
        }
        Some(VerifiedBlob {
            digest: digest.clone(),
            size: len,
            path: self.blob_path(digest),
        })
    }

    /// The blob of `digest`, re-hashed now. A blob whose bytes no longer
    /// match (disk corruption, tampering) is deleted and reported absent,
    /// so the caller downloads it again.
    pub fn verified(&self, digest: &Digest) -> Result<Option<VerifiedBlob>, StoreError> {
        let path = self.blob_path(digest);
        let file = match self.open_file(&Self::blob_rel(digest), Access::Read) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(StoreError::NotRegular { kind, .. }) => {
                // Not a blob the store wrote (a planted symlink or FIFO):
                // unlinked (never followed), and fetched again.
                tracing::warn!(blob = %path.display(), kind, "blob that is not a regular file removed");
                fs::remove_file(&path).map_err(StoreError::io("removing", &path))?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // Blobs of older stores were 0444: private now.
        use std::os::unix::fs::PermissionsExt;
        if file
            .metadata()
            .is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
        {
            file.set_permissions(fs::Permissions::from_mode(0o400))
                .map_err(StoreError::io("chmod", &path))?;
        }
        let (actual, size) = match hash_reader(file) {
            Ok(r) => r,
            // fs-verity refuses to return a changed block: corrupt.
            Err(e)
                if e.raw_os_error() == Some(libc::EIO)
                    && verity::is_enabled(&path) == Some(true) =>
            {
                tracing::warn!(blob = %path.display(), "fs-verity caught a corrupt blob; removed");
                fs::remove_file(&path).map_err(StoreError::io("removing corrupt blob", &path))?;
                return Ok(None);
            }
            Err(e) => return Err(StoreError::io("hashing", &path)(e)),
        };
        if actual != *digest {
            tracing::warn!(blob = %path.display(), expected = %digest, actual = %actual, "corrupt blob removed");
            fs::remove_file(&path).map_err(StoreError::io("removing corrupt blob", &path))?;
            return Ok(None);
        }
        Ok(Some(VerifiedBlob {
            digest: actual,
            path,
            size,
        }))
    }

    /// Moves a staged file into the store if it hashes to `expected` (when
    /// given) and has `expected_size` bytes (when given). On any mismatch
    /// the staged file is deleted: nothing is kept.
    pub fn commit(
        &self,
        staged: Staged,
        what: &str,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<VerifiedBlob, StoreError> {
        let (file, path, actual, size) = staged.finish()?;
        let fail = |e: StoreError| {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(Staged::meta_path_of(&path));
            Err(e)
        };
        if let Some(expected) = expected {
            if *expected != actual {
                return fail(StoreError::DigestMismatch {
                    what: what.to_string(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        if let Some(expected) = expected_size {
            if expected != size {
                return fail(StoreError::SizeMismatch {
                    url: what.to_string(),
                    expected,
                    actual: size,
                });
            }
        }
        file.sync_all().map_err(StoreError::io("syncing", &path))?;
        // Read-only, and the owner's alone: a pull of a secret file must
        // not make it readable to others.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400))
            .map_err(StoreError::io("chmod", &path))?;
        let dest = self.blob_path(&actual);
        super::crash_point("before-blob-rename");
        fs::rename(&path, &dest).map_err(StoreError::io("renaming into the store", &dest))?;
        fsutil::sync_dir(&self.blobs_dir()).map_err(StoreError::io("syncing", self.blobs_dir()))?;
        let _ = fs::remove_file(Staged::meta_path_of(&path));
        drop(file);
        let verity = verity::enable(&dest);
        tracing::debug!(blob = %dest.display(), ?verity, "fs-verity");
        Ok(VerifiedBlob {
            digest: actual,
            path: dest,
            size,
        })
    }
}

/// A file being written in `tmp/`, hashed as it is written. It can be
/// resumed after a crash: its existing bytes are re-hashed on open.
pub struct Staged {
    path: PathBuf,
    writer: HashingWriter<io::BufWriter<File>>,
}

impl Staged {
    /// `tmp/<key>.partial`, resumed if it exists (`resume`) or truncated.
    pub fn open(layout: &Layout, key: &str, resume: bool) -> Result<Staged, StoreError> {
        let rel = Path::new("tmp").join(format!("{key}.partial"));
        let path = layout.root().join(&rel);
        let mut file = layout
            .open_file(&rel, Access::ReadWriteCreate)?
            .ok_or_else(|| StoreError::io("creating", &path)(io::ErrorKind::NotFound.into()))?;
        let mut staged_len = 0;
        let mut hasher_seed = HashingWriter::new(());
        if resume {
            // Re-hash what an earlier attempt wrote: the digest covers the
            // whole file, and those bytes were not checked by anyone yet.
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(StoreError::io("reading", &path))?;
                if n == 0 {
                    break;
                }
                hasher_seed.absorb(&buf[..n]);
                staged_len += n as u64;
            }
        } else {
            file.set_len(0)
                .map_err(StoreError::io("truncating", &path))?;
        }
        file.seek(SeekFrom::Start(staged_len))
            .map_err(StoreError::io("seeking", &path))?;
        let mut writer = HashingWriter::new(io::BufWriter::with_capacity(BUF, file));
        writer.adopt(hasher_seed);
        Ok(Staged { path, writer })
    }

    pub fn meta_path_of(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".json");
        PathBuf::from(p)
    }

    /// Where resume validators of this file are kept.
    pub fn meta_path(&self) -> PathBuf {
        Self::meta_path_of(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.writer.written()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.writer
            .write_all(buf)
            .map_err(StoreError::io("writing", &self.path))
    }

    /// Drops everything written so far (the server restarted from 0).
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.writer
            .flush()
            .map_err(StoreError::io("writing", &self.path))?;
        let file = self.writer.get_ref().get_ref();
        file.set_len(0)
            .map_err(StoreError::io("truncating", &self.path))?;
        let mut file = file
            .try_clone()
            .map_err(StoreError::io("reopening", &self.path))?;
        file.seek(SeekFrom::Start(0))
            .map_err(StoreError::io("seeking", &self.path))?;
        self.writer = HashingWriter::new(io::BufWriter::with_capacity(BUF, file));
        Ok(())
    }

    /// Flushes, so a crash after this point keeps the bytes for a resume.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.writer
            .flush()
            .map_err(StoreError::io("writing", &self.path))
    }

    /// Deletes the staged file and its validators.
    pub fn discard(self) {
        let _ = fs::remove_file(self.meta_path());
        let _ = fs::remove_file(&self.path);
    }

    fn finish(self) -> Result<(File, PathBuf, Digest, u64), StoreError> {
        let path = self.path;
        let (buf, digest, size) = self.writer.finish();
        let file = buf
            .into_inner()
            .map_err(|e| StoreError::io("writing", &path)(e.into_error()))?;
        Ok((file, path, digest, size))
    }
}
