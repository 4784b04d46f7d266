//! The raw output: a sparse file of the virtual size under a temp name in
//! the destination's directory, filled by copy_file_range (read/write when
//! the kernel or filesystem cannot), fsynced and renamed over the
//! destination. Zeros are never written: they stay holes. Dropped before
//! `finish` (or on a termination signal), the temp file is removed; a
//! SIGKILL leaves it locked by nobody, and the next conversion into the
//! directory removes it. The destination is replaced only when it is a
//! regular file or absent.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::fs::SeekFrom;

use super::ConvertError;
use crate::cast::usize_from;
use crate::fsutil::output::check_replaceable;
use crate::fsutil::temp::{self, Temp};

/// Largest single read of a data extent. Small enough that the buffer
/// stays in the CPU cache between the read, the zero scan and the write
/// (docs/benchmarks.md: an 8 MiB step made the qcow2 row slower).
const CHUNK: u64 = 256 << 10;
/// Runs at least this long are preallocated before they are written;
/// shorter ones (a decoded cluster) are left to delayed allocation.
const ALLOCATE_FROM: u64 = 1 << 20;
/// Bytes written between two requests to start writeback.
const FLUSH_EVERY: u64 = 8 << 20;

/// The directory a file lives in ("." for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub struct Output {
    tmp: Temp,
    dest: PathBuf,
    flusher: Flusher,
    /// The copy buffer of data extents, kept between extents: a fresh
    /// 8 MiB buffer per extent costs its page faults each time.
    buffer: Mutex<Vec<u8>>,
}

/// Starts writeback while the copy goes on, so the fsync at the end finds
/// little left to write: each time another [`FLUSH_EVERY`] bytes have been
/// written, a background thread asks the kernel to start writing the
/// file's dirty pages. A request still running absorbs the ones made
/// meanwhile. (Measured on 811 MiB of qcow2 data: 0.28 s against 0.32 s
/// with an fdatasync every 128 MiB and 0.48 s with the final fsync alone.)
struct Flusher {
    written: AtomicU64,
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    fn start(file: io::Result<File>) -> Self {
        let (kick, thread) = match file {
            Ok(file) => {
                let (tx, rx) = sync_channel::<()>(1);
                let thread = std::thread::Builder::new()
                    .name("cocoon-flush".into())
                    .spawn(move || {
                        while rx.recv().is_ok() {
                            // Errors surface at the final fsync.
                            start_writeback(&file);
                        }
                    })
                    .ok();
                (thread.is_some().then_some(tx), thread)
            }
            Err(_) => (None, None),
        };
        Flusher {
            written: AtomicU64::new(0),
            kick,
            thread,
        }
    }

    fn wrote(&self, bytes: u64) {
        let before = self.written.fetch_add(bytes, Ordering::Relaxed);
        if (before + bytes) / FLUSH_EVERY != before / FLUSH_EVERY {
            if let Some(kick) = &self.kick {
                let _ = kick.try_send(());
            }
        }
    }

    fn stop(&mut self) {
        self.kick = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Output {
    /// A temp file beside `dest`, `size` bytes long and all hole.
    pub fn create(dest: &Path, size: u64) -> Result<Self, ConvertError> {
        check_destination(dest)?;
        let dir = parent_dir(dest);
        let tmp = Temp::create_in(dir, ".part")
            .map_err(ConvertError::io("creating a temp file in", dir))?;
        tmp.as_file()
            .set_len(size)
            .map_err(ConvertError::io("sizing", tmp.path()))?;
        let flusher = Flusher::start(tmp.as_file().try_clone());
        Ok(Output {
            tmp,
            dest: dest.to_path_buf(),
            flusher,
            buffer: Mutex::new(Vec::new()),
        })
    }

    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes `data` at `offset`, leaving its all-zero blocks as holes.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), ConvertError> {
        for (start, end) in nonzero_runs(data, offset) {
            let run = &data[start..end];
            let at = offset + start as u64;
            if run.len() as u64 >= ALLOCATE_FROM {
                allocate(self.file(), at, run.len() as u64);
            }
            self.file()
                .write_all_at(run, at)
                .map_err(ConvertError::io("writing", self.path()))?;
            self.flusher.wrote(run.len() as u64);
        }
        Ok(())
    }

    /// Copies `length` bytes at `src_offset` of `src` to `offset`, skipping
    /// the holes of the source (preallocated images are mostly holes) and
    /// leaving blocks of zeros inside its data as holes too, as qemu-img
    /// does: a disk's unused space is often written zeros.
    pub fn copy_from(
        &self,
        src: &File,
        src_path: &Path,
        src_offset: u64,
        offset: u64,
        length: u64,
    ) -> Result<(), ConvertError> {
        let end = src_offset + length;
        let mut at = src_offset;
        while at < end {
            let (data, hole) = match data_run(src, at) {
                Ok(Some(run)) => run,
                // Past the last data: the rest reads as zeros.
                Ok(None) => return Ok(()),
                // No SEEK_DATA on this filesystem: everything is data.
                Err(_) => (at, end),
            };
            if data >= end {
                return Ok(());
            }
            let stop = hole.min(end);
            self.copy_range(
                src,
                src_path,
                data,
                offset + (data - src_offset),
                stop - data,
            )?;
            at = stop;
        }
        Ok(())
    }

    /// Reads the range chunk by chunk and writes what is not zeros. The
    /// bytes must be looked at to find the zeros, so this reads and
    /// writes rather than asking the kernel to copy (copy_file_range).
    fn copy_range(
        &self,
        src: &File,
        src_path: &Path,
        mut from: u64,
        mut to: u64,
        mut length: u64,
    ) -> Result<(), ConvertError> {
        let mut buf = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        while length > 0 {
            let n = length.min(CHUNK) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            src.read_exact_at(&mut buf[..n], from)
                .map_err(ConvertError::io("reading", src_path))?;
            self.write_at(&buf[..n], to)?;
            from += n as u64;
            to += n as u64;
            length -= n as u64;
        }
        Ok(())
    }

    /// fsyncs the file, renames it over the destination, fsyncs the
    /// directory, and returns the bytes that are not holes.
    pub fn finish(mut self) -> Result<u64, ConvertError> {
        self.flusher.stop();
        let file = self.tmp.as_file();
        file.sync_all()
            .map_err(ConvertError::io("syncing", self.tmp.path()))?;
        let allocated =
            allocated_bytes(file).map_err(ConvertError::io("measuring", self.tmp.path()))?;
        let dir = parent_dir(&self.dest).to_path_buf();
        // Checked again: the path may have changed during the conversion.
        check_destination(&self.dest)?;
        self.tmp
            .persist(&self.dest)
            .map_err(ConvertError::io("renaming onto", &self.dest))?;
        crate::fsutil::sync_dir(&dir).map_err(ConvertError::io("syncing", &dir))?;
        Ok(allocated)
    }
}

/// Refuses a destination that is not a regular file (or absent).
pub fn check_destination(dest: &Path) -> Result<(), ConvertError> {
    check_replaceable(dest).map_err(ConvertError::io("refusing to replace", dest))
}

/// Removes the temps a killed conversion left in `dir` (only those no
/// live process holds), logging what it removed.
pub fn remove_stale_temps(dir: &Path) {
    match temp::remove_stale(dir, false) {
        Ok(r) if !r.paths.is_empty() => tracing::info!(
            dir = %dir.display(),
            files = r.paths.len(),
            bytes = r.bytes,
            "removed temp files a killed conversion left"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove stale temp files")
        }
    }
}

/// Allocates `length` bytes at `offset` of `file` before they are written.
/// Without it, ext4 reserves each page's block as it is written (delayed
/// allocation) and allocates at writeback; allocating a whole chunk at once
/// takes that work off both paths (docs/benchmarks.md images, fresh
/// output, medians of 10 in two runs: qcow2 0.29 to 0.32 s against 0.31
/// to 0.34 s, vhdx 0.34 to 0.37 s against 0.41 to 0.42 s, and fewer slow
/// outliers). A filesystem that cannot preallocate allocates
/// as it writes, as before; running out of space still fails the write.
fn allocate(file: &File, offset: u64, length: u64) {
    let _ = rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, offset, length);
}

/// The block size zeros are found in: qemu-img's default (`-S 4k`), and
/// the filesystem block size a hole needs.
pub const ZERO_BLOCK: u64 = 4096;

/// The runs of `data` (to be written at output offset `offset`) that hold
/// a non-zero byte, as index ranges: `data` cut at the output's
/// [`ZERO_BLOCK`] boundaries, all-zero blocks dropped, neighbours merged.
fn nonzero_runs(data: &[u8], offset: u64) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let next_boundary = ZERO_BLOCK - (offset + start as u64) % ZERO_BLOCK;
        let end = (start + usize_from(next_boundary)).min(data.len());
        if !is_zero(&data[start..end]) {
            match runs.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => runs.push((start, end)),
            }
        }
        start = end;
    }
    runs
}

/// Whether every byte of `block` is zero; 16 bytes at a time, stopping at
/// the first 64 bytes that are not (data blocks usually fail at once).
fn is_zero(block: &[u8]) -> bool {
    let mut groups = block.chunks_exact(64);
    for g in &mut groups {
        let word = |i: usize| u128::from_ne_bytes(g[i..i + 16].try_into().expect("16 bytes"));
        if word(0) | word(16) | word(32) | word(48) != 0 {
            return false;
        }
    }
    groups.remainder().iter().all(|&b| b == 0)
}

/// Starts writeback of every dirty page of `file` without waiting for it
/// (sync_file_range with SYNC_FILE_RANGE_WRITE: no metadata, no journal
/// commit, unlike fdatasync). Durability still comes from the fsync in
/// [`Output::finish`].
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is
    // open for as long as `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// The data run at or after `at`: (start, end), or None past the last one.
pub fn data_run(file: &File, at: u64) -> io::Result<Option<(u64, u64)>> {
    let data = match rustix::fs::seek(file, SeekFrom::Data(at)) {
        Ok(d) => d,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?;
    Ok(Some((data, hole)))
}

/// Bytes of `file` that are not holes, by walking SEEK_DATA / SEEK_HOLE.
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    let mut total = 0;
    let mut at = 0;
    while let Some((data, hole)) = data_run(file, at)? {
        total += hole - data;
        at = hole;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_skip_holes_and_zeros_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        src.set_len(4 << 20).unwrap();
        src.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let src = File::open(&src_path).unwrap();
        let dest = dir.path().join("out.raw");
        let out = Output::create(&dest, 8 << 20).unwrap();
        out.copy_from(&src, &src_path, 0, 4 << 20, 4 << 20).unwrap();
        out.write_at(&[0u8; 65536], 0).unwrap();
        out.write_at(&[1u8; 10], 100).unwrap();
        let allocated = out.finish().unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temp file left"
        );
        let bytes = std::fs::read(&dest).unwrap();
        assert_eq!(bytes.len(), 8 << 20);
        assert_eq!(bytes[100..110], [1u8; 10]);
        assert_eq!(bytes[(5 << 20)..(5 << 20) + 4096], [7u8; 4096]);
        assert_eq!(bytes.iter().map(|&b| b as u64).sum::<u64>(), 10 + 7 * 4096);
        // Two written blocks; the filesystem may round up, but not to the
        // whole file.
        assert!((8192..=(1 << 20)).contains(&allocated), "{allocated}");
    }

    #[test]
    fn zero_blocks_inside_data_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        // Written zeros: the source's filesystem reports them as data.
        src.write_all_at(&vec![0u8; usize_from(CHUNK) + 8192], 0)
            .unwrap();
        src.write_all_at(&[7u8; 4096], CHUNK).unwrap();
        let src = File::open(&src_path).unwrap();
        let dest = dir.path().join("out.raw");
        let out = Output::create(&dest, 2 * CHUNK).unwrap();
        out.copy_from(&src, &src_path, 0, 0, CHUNK + 8192).unwrap();
        let allocated = out.finish().unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        let chunk = usize_from(CHUNK);
        assert_eq!(bytes[chunk..chunk + 4096], [7u8; 4096]);
        assert!(bytes[..chunk].iter().all(|&b| b == 0));
        assert!(bytes[chunk + 4096..].iter().all(|&b| b == 0));
        // Blocks really on disk (st_blocks counts preallocated ones too):
        // the 4 KiB of sevens, not the 8 MiB of zeros.
        let on_disk = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(on_disk <= 64 << 10, "{on_disk} bytes on disk");
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated");
    }

    #[test]
    fn nonzero_runs_follow_output_blocks() {
        let b = usize_from(ZERO_BLOCK);
        let mut data = vec![0u8; 4 * b];
        // Blocks 1 and 2 hold data, and merge into one run.
        data[b + 5] = 1;
        data[2 * b] = 1;
        // (data, its output offset, the runs written)
        type Case<'a> = (&'a [u8], u64, &'a [(usize, usize)]);
        let cases: &[Case] = &[
            (&data, 0, &[(b, 3 * b)]),
            (&[0u8; 8192], 0, &[]),
            (&[], 0, &[]),
            // An unaligned start: blocks are cut at the output's
            // boundaries, so the first one is 96 bytes long.
            (&data[..b], (b - 96) as u64, &[]),
            (&data[b..2 * b], (b - 96) as u64, &[(0, 96)]),
            (&[1u8; 10], 100, &[(0, 10)]),
        ];
        for (data, offset, want) in cases {
            assert_eq!(nonzero_runs(data, *offset), *want, "offset {offset}");
        }
        let mut tail_only = vec![0u8; 100];
        tail_only[99] = 1;
        assert!(!is_zero(&tail_only));
        assert!(is_zero(&[0u8; 100]));
    }
}
