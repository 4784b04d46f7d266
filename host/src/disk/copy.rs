//! The per-VM copy of a disk image's converted base: the VM's writable
//! root. The cache file itself is never handed to a VM (a write would
//! change every later VM's base and break its digest file).
//!
//! A `FICLONE` reflink where the filesystem shares extents (btrfs, xfs,
//! bcachefs): instant, and blocks are copied only when the guest writes
//! them. Otherwise a sparse copy: only the source's data runs (SEEK_DATA /
//! SEEK_HOLE) are copied, by copy_file_range, holes stay holes. When the
//! store gives the base's digest, the bytes of the copy are hashed before
//! it gets its name (when asked: it reads the whole virtual size), so a
//! base that rotted in the cache never boots.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use sha2::{Digest as _, Sha256};

use super::newfile::NewFile;
use super::plan::BaseImage;
use crate::cast::usize_from;
use crate::convert::output::data_run;
use crate::store::digest::Digest;

const CHUNK: usize = 4 << 20;
/// Bytes per read when the bytes are hashed: small enough that a buffer
/// stays in the CPU's caches from the read through the hash and the write
/// (with 4 MiB chunks each pass went out to memory; copying and hashing
/// were half of `run`'s CPU time).
const HASH_CHUNK: usize = 128 << 10;
/// Chunks read ahead of the hash thread.
const IN_FLIGHT: usize = 4;
/// Bytes written to a copy after which their writeback is started, so the
/// device writes while the rest is read and hashed and the fsync of
/// [`NewFile::commit`] waits only for the tail.
const WRITEBACK_STEP: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("base image {path} is {actual} bytes; the store says {expected}")]
    Size {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "base image {path}: digest mismatch: expected {expected}, got {actual}; no copy was kept"
    )]
    Digest {
        path: PathBuf,
        expected: Digest,
        actual: String,
    },
    #[error("{dest} is smaller ({size} bytes) than its base image ({base} bytes)")]
    TooSmall { dest: PathBuf, size: u64, base: u64 },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.to_path_buf();
    move |source| CopyError::Io { what, path, source }
}

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub method: CopyMethod,
    /// Whether the copy's bytes were checked against the base's digest.
    pub verified: bool,
}

/// Copies `base` to `dest` (which must not exist), grown to `size` bytes,
/// crash-safely: nothing is at `dest` unless the whole, verified copy is.
pub fn copy_base(base: &BaseImage, dest: &Path, size: u64) -> Result<CopyReport, CopyError> {
    if size < base.size {
        return Err(CopyError::TooSmall {
            dest: dest.to_path_buf(),
            size,
            base: base.size,
        });
    }
    let src = File::open(&base.path).map_err(io_err("opening", &base.path))?;
    let actual = src.metadata().map_err(io_err("reading", &base.path))?.len();
    if actual != base.size {
        return Err(CopyError::Size {
            path: base.path.clone(),
            expected: base.size,
            actual,
        });
    }
    let out = NewFile::create(dest).map_err(io_err("creating a temp file for", dest))?;
    let mut hash = base.verify.then(Sha256::new);
    let method = match rustix::fs::ioctl_ficlone(out.file(), &src) {
        Ok(()) => {
            if let Some(h) = &mut hash {
                hash_file(out.file(), out.path(), base.size, h)?;
            }
            CopyMethod::Reflink
        }
        // Not the same filesystem, or one without shared extents.
        Err(_) => {
            out.file()
                .set_len(base.size)
                .map_err(io_err("sizing", out.path()))?;
            sparse_copy(
                &src,
                &base.path,
                out.file(),
                out.path(),
                base.size,
                hash.as_mut(),
            )?;
            CopyMethod::Sparse
        }
    };
    if let Some(h) = hash {
        let actual = format!("sha256:{}", hex::encode(h.finalize()));
        if actual != base.digest.to_string() {
            return Err(CopyError::Digest {
                path: base.path.clone(),
                expected: base.digest.clone(),
                actual,
            });
        }
    }
    if size > base.size {
        out.file()
            .set_len(size)
            .map_err(io_err("growing", out.path()))?;
    }
    out.commit().map_err(io_err("creating", dest))?;
    Ok(CopyReport {
        method,
        verified: base.verify,
    })
}

/// Copies the regular file `src` to `dest` (which must not exist), whole
/// and crash-safely: a reflink where the filesystem shares extents, else
/// a sparse copy of its data runs. Nothing is at `dest` unless the whole
/// copy is. Snapshots copy a VM's writable disks with it, and clones
/// their snapshot's.
pub fn copy_file(src: &Path, dest: &Path) -> Result<CopyMethod, CopyError> {
    let from = File::open(src).map_err(io_err("opening", src))?;
    copy_open_file(&from, src, dest)
}

/// [`copy_file`] of a file the caller opened (as a checked input: a
/// user's file, which must not be swapped for a FIFO between its check
/// and its read).
pub fn copy_open_file(from: &File, src: &Path, dest: &Path) -> Result<CopyMethod, CopyError> {
    let len = from.metadata().map_err(io_err("reading", src))?.len();
    let out = NewFile::create(dest).map_err(io_err("creating a temp file for", dest))?;
    let method = match rustix::fs::ioctl_ficlone(out.file(), from) {
        Ok(()) => CopyMethod::Reflink,
        Err(_) => {
            out.file()
                .set_len(len)
                .map_err(io_err("sizing", out.path()))?;
            sparse_copy(from, src, out.file(), out.path(), len, None)?;
            CopyMethod::Sparse
        }
    };
    out.commit().map_err(io_err("creating", dest))?;
    Ok(method)
}

/// Copies the open regular file `src` into the open, empty file `dst`
/// (a staged temp the caller names and renames), then fsyncs it: a
/// reflink where the filesystem shares extents, else a sparse copy. With
/// `hashed`, the bytes are hashed on the way (after a reflink, the copy
/// is read) and the copy's sha256 is returned, for the caller to compare
/// with the one it recorded.
pub fn copy_into(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    hashed: bool,
) -> Result<(CopyMethod, Option<Digest>), CopyError> {
    let len = src.metadata().map_err(io_err("reading", src_path))?.len();
    let mut hash = hashed.then(Sha256::new);
    let method = match rustix::fs::ioctl_ficlone(dst, src) {
        Ok(()) => {
            if let Some(h) = &mut hash {
                hash_file(dst, dst_path, len, h)?;
            }
            CopyMethod::Reflink
        }
        Err(_) => {
            dst.set_len(len).map_err(io_err("sizing", dst_path))?;
            sparse_copy(src, src_path, dst, dst_path, len, hash.as_mut())?;
            CopyMethod::Sparse
        }
    };
    let digest = hash.map(|h| {
        format!("sha256:{}", hex::encode(h.finalize()))
            .parse()
            .expect("a sha256 is a digest")
    });
    dst.sync_all().map_err(io_err("fsync of", dst_path))?;
    Ok((method, digest))
}

/// The length of `path` and the sha256 of all of it, reading only its
/// data runs (a hole hashes as the zeros it reads as).
pub fn sha256_file(path: &Path) -> Result<(u64, Digest), CopyError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    sha256_open(&file, path)
}

/// [`sha256_file`] of a file the caller opened (e.g. with `O_NOFOLLOW`,
/// and checked to be a regular file): streamed, never read whole.
pub fn sha256_open(file: &File, path: &Path) -> Result<(u64, Digest), CopyError> {
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    let mut hash = Sha256::new();
    hash_file(file, path, len, &mut hash)?;
    let digest = format!("sha256:{}", hex::encode(hash.finalize()))
        .parse()
        .expect("a sha256 is a digest");
    Ok((len, digest))
}

/// Feeds `len` zero bytes to `hash` (a hole reads as zeros).
fn hash_zeros(hash: &mut Sha256, mut len: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = usize_from(len.min(ZEROS.len() as u64));
        hash.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// The data runs of the first `len` bytes of `file`, in order (all of it
/// where the filesystem cannot tell).
pub fn data_runs(file: &File, path: &Path, len: u64) -> Result<Vec<(u64, u64)>, CopyError> {
    let mut runs = Vec::new();
    let mut at = 0;
    while at < len {
        match data_run(file, at) {
            Ok(Some((s, e))) if s < len => {
                runs.push((s, e.min(len)));
                at = e;
            }
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                runs.push((at, len));
                break;
            }
            Err(e) => return Err(io_err("finding the data in", path)(e)),
        }
    }
    Ok(runs)
}

/// Hashes the first `len` bytes of `file`, reading only its data runs.
fn hash_file(file: &File, path: &Path, len: u64, hash: &mut Sha256) -> Result<(), CopyError> {
    let runs = data_runs(file, path, len)?;
    read_hashed(file, path, &runs, len, hash, |_, _| Ok(()))
}

/// A part of the bytes being hashed, in order: a chunk that was read, or
/// a hole's zeros.
enum Piece {
    Read(Arc<Vec<u8>>, usize),
    Zeros(u64),
}

/// Reads the data runs `runs` of the first `len` bytes of `file` in
/// chunks, handing each to `sink(offset, bytes)`, and hashes all `len`
/// bytes (the holes between the runs as zeros). The hash runs on a thread
/// of its own over the very buffers the sink gets, so a copy is hashed
/// while it is written: sha256 and the write each took about half of
/// `run`'s copy when one thread did both.
fn read_hashed(
    file: &File,
    path: &Path,
    runs: &[(u64, u64)],
    len: u64,
    hash: &mut Sha256,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), CopyError>,
) -> Result<(), CopyError> {
    let (to_hash, pieces) = mpsc::sync_channel::<Piece>(IN_FLIGHT);
    let (hashed, free) = mpsc::channel::<Arc<Vec<u8>>>();
    std::thread::scope(|scope| {
        let hasher = std::thread::Builder::new()
            .name("sha256".into())
            .spawn_scoped(scope, move || {
                for piece in pieces {
                    match piece {
                        Piece::Zeros(n) => hash_zeros(hash, n),
                        Piece::Read(buf, n) => {
                            hash.update(&buf[..n]);
                            // The reader may be gone after an error.
                            let _ = hashed.send(buf);
                        }
                    }
                }
            })
            .map_err(io_err("starting a thread to hash", path))?;
        let mut fresh = IN_FLIGHT;
        let mut next_buffer = || -> Arc<Vec<u8>> {
            if fresh > 0 {
                fresh -= 1;
            } else if let Ok(buf) = free.recv() {
                return buf;
            }
            Arc::new(vec![0u8; HASH_CHUNK])
        };
        // A send fails only when the hasher panicked; its join says so.
        let mut read = || -> Result<(), CopyError> {
            let mut at = 0;
            for &(start, end) in runs {
                if start > at {
                    let _ = to_hash.send(Piece::Zeros(start - at));
                }
                let mut off = start;
                while off < end {
                    let n = usize_from((end - off).min(HASH_CHUNK as u64));
                    let mut buf = next_buffer();
                    // Unique: the hasher hands a buffer back only once it
                    // holds no reference to it, and this loop drops its own
                    // at the end of each turn (make_mut would copy if not).
                    let bytes = Arc::make_mut(&mut buf);
                    file.read_exact_at(&mut bytes[..n], off)
                        .map_err(io_err("reading", path))?;
                    let _ = to_hash.send(Piece::Read(buf.clone(), n));
                    sink(off, &buf[..n])?;
                    off += n as u64;
                }
                at = end;
            }
            if len > at {
                let _ = to_hash.send(Piece::Zeros(len - at));
            }
            Ok(())
        };
        let result = read();
        drop(to_hash);
        if let Err(panic) = hasher.join() {
            std::panic::resume_unwind(panic);
        }
        result
    })
}

/// Copies the data runs of `src` into `dst` (already `len` bytes of
/// hole). Unhashed, the kernel copies (copy_file_range); hashed, the bytes
/// pass through buffers that are hashed and written at once, all-zero
/// chunks left as holes.
fn sparse_copy(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
    hash: Option<&mut Sha256>,
) -> Result<(), CopyError> {
    let runs = data_runs(src, src_path, len)?;
    let Some(hash) = hash else {
        for (start, end) in runs {
            kernel_copy(src, src_path, dst, dst_path, start, end)?;
        }
        return Ok(());
    };
    // Start of the written range whose writeback is not started yet.
    let mut unflushed = 0;
    read_hashed(src, src_path, &runs, len, hash, |off, bytes| {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(());
        }
        dst.write_all_at(bytes, off)
            .map_err(io_err("writing", dst_path))?;
        let written = off + bytes.len() as u64;
        if written - unflushed >= WRITEBACK_STEP {
            start_writeback(dst, unflushed, written);
            unflushed = written;
        }
        Ok(())
    })
}

/// Starts the writeback of bytes [from, to) of `file` without waiting for
/// it. Only a head start for the fsync that follows, which is what makes
/// the copy durable: a failure here loses the overlap, nothing else.
fn start_writeback(file: &File, from: u64, to: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return;
    };
    // SAFETY: sync_file_range takes no pointers, only the descriptor of a
    // file open for the duration of the call and two integers.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

fn kernel_copy(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    start: u64,
    end: u64,
) -> Result<(), CopyError> {
    let (mut from, mut to) = (start, start);
    while from < end {
        let step = usize_from((end - from).min(CHUNK as u64 * 16));
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), step) {
            Ok(0) => {
                return Err(io_err("copying from", src_path)(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends before {from}"),
                )))
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            // Old kernels and some filesystems: through a buffer.
            Err(_) => {
                let mut buf = vec![0u8; CHUNK];
                while from < end {
                    let n = usize_from((end - from).min(CHUNK as u64));
                    src.read_exact_at(&mut buf[..n], from)
                        .map_err(io_err("reading", src_path))?;
                    dst.write_all_at(&buf[..n], from)
                        .map_err(io_err("writing", dst_path))?;
                    from += n as u64;
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::output::allocated_bytes;

    fn base(dir: &Path, digest: bool) -> (BaseImage, Vec<u8>) {
        let path = dir.join("image");
        let f = File::create(&path).unwrap();
        let len = 8u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        let d = Digest::of(&bytes);
        (
            BaseImage {
                path,
                digest: d,
                size: len,
                verify: digest,
            },
            bytes,
        )
    }

    #[test]
    fn sparse_copy_verified_and_unverified() {
        for verify in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (b, bytes) = base(dir.path(), verify);
            let dest = dir.path().join("cow.raw");
            let r = copy_base(&b, &dest, 16 << 20).unwrap();
            assert_eq!(r.verified, verify);
            let got = std::fs::read(&dest).unwrap();
            assert_eq!(got.len(), 16 << 20, "grown to the planned size");
            assert_eq!(&got[..bytes.len()], &bytes[..]);
            assert!(got[bytes.len()..].iter().all(|&b| b == 0));
            let f = File::open(&dest).unwrap();
            if r.method == CopyMethod::Sparse {
                assert!(allocated_bytes(&f).unwrap() < 1 << 20, "holes stay holes");
            }
            // A write to the copy leaves the base alone.
            f.metadata().unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&dest)
                .unwrap()
                .write_all_at(b"guest", 0)
                .unwrap();
            assert_eq!(std::fs::read(&b.path).unwrap(), bytes);
        }
    }

    #[test]
    fn a_rotten_base_leaves_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = base(dir.path(), true);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&b.path)
            .unwrap()
            .write_all_at(b"X", 3 << 20)
            .unwrap();
        let dest = dir.path().join("cow.raw");
        let e = copy_base(&b, &dest, b.size).unwrap_err();
        assert!(matches!(e, CopyError::Digest { .. }), "{e}");
        assert!(e.to_string().contains(&b.digest.to_string()), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["image"], "no copy, no temp file");
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let (mut b, _) = base(dir.path(), false);
        let dest = dir.path().join("cow.raw");
        assert!(matches!(
            copy_base(&b, &dest, 1 << 20),
            Err(CopyError::TooSmall { .. })
        ));
        std::fs::write(&dest, b"mine").unwrap();
        let e = copy_base(&b, &dest, b.size).unwrap_err();
        assert!(
            matches!(&e, CopyError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{e}"
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"mine", "never overwritten");
        b.size += 1;
        assert!(matches!(
            copy_base(&b, &dir.path().join("x"), b.size),
            Err(CopyError::Size { .. })
        ));
    }
}
