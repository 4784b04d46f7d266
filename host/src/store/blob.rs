//! Content-addressed blobs. A blob enters `blobs/sha256/` only through
//! [`Layout::commit`], which takes a [`Staged`] file whose digest was
//! computed from the bytes as they were written, compares it with the
//! expected digest, and renames the file into place. There is no other way
//! to obtain a [`VerifiedBlob`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::digest::{hash_reader, Digest, HashingWriter};
use super::lock;
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
    pub fn create(root: PathBuf) -> Result<Layout, StoreError> {
        let layout = Layout { root };
        for dir in [
            layout.blobs_dir(),
            layout.refs_dir(),
            layout.tmp_dir(),
            layout.locks_dir(),
            layout.converted_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(StoreError::io("creating", &dir))?;
        }
        Ok(layout)
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
        let path = self.blob_path(digest);
        let meta = fs::metadata(&path).ok()?;
        if !meta.is_file() || size.is_some_and(|s| s != meta.len()) {
            return None;
        }
        Some(VerifiedBlob {
            digest: digest.clone(),
            size: meta.len(),
            path,
        })
    }

    /// The blob of `digest`, re-hashed now. A blob whose bytes no longer
    /// match (disk corruption, tampering) is deleted and reported absent,
    /// so the caller downloads it again.
    pub fn verified(&self, digest: &Digest) -> Result<Option<VerifiedBlob>, StoreError> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("opening", &path)(e)),
        };
        let (actual, size) = hash_reader(io::BufReader::with_capacity(1 << 20, file))
            .map_err(StoreError::io("hashing", &path))?;
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
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
            .map_err(StoreError::io("chmod", &path))?;
        let dest = self.blob_path(&actual);
        super::crash_point("before-blob-rename");
        fs::rename(&path, &dest).map_err(StoreError::io("renaming into the store", &dest))?;
        fsutil::sync_dir(&self.blobs_dir()).map_err(StoreError::io("syncing", self.blobs_dir()))?;
        let _ = fs::remove_file(Staged::meta_path_of(&path));
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
        let path = layout.tmp_dir().join(format!("{key}.partial"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(StoreError::io("opening", &path))?;
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
