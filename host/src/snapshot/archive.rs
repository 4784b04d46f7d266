//! Snapshots as tar streams: [`export`] writes one (optionally zstd
//! compressed), [`import`] reads one from a file or stdin into the
//! snapshots directory, every file verified against the sidecar's size and
//! sha256, all or nothing.
//!
//! The stream: `snapshot.json` first (so an importer knows what to expect
//! before any large file arrives), then every file the sidecar lists, in
//! its order. Files with holes (guest memory, sparse disks) are GNU sparse
//! entries (the old GNU format, which GNU tar, bsdtar and the `tar` crate
//! read): only their data runs are in the stream. Layers are not in it;
//! the importing host has or pulls them by digest (the preflight says).
//!
//! Import trusts nothing: the sidecar is parsed strictly, each entry must
//! be a regular (or sparse) file named in it, at most once, of its
//! recorded size and hash; links, devices and unknown names are refused.
//! Everything lands in a temp snapshot directory that is renamed into
//! place only when the whole stream checked out.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::preflight;
use super::sidecar::{Sidecar, SidecarError, DISKS_DIR, MAX_SIDECAR_BYTES, SIDECAR_FILE};
use super::store::{self, SnapshotDir, StoreError, TempSnapshot};
use crate::disk::copy;
use crate::store::digest::Digest;

const BLOCK: usize = 512;
const CHUNK: usize = 1 << 20;
/// zstd's frame magic, little-endian 0xFD2FB528.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the snapshot stream")]
    Read(#[source] io::Error),
    #[error("writing the snapshot stream")]
    Write(#[source] io::Error),
    #[error("the stream does not start with {SIDECAR_FILE} (it starts with {found:?}); not a cocoon snapshot export")]
    NoSidecar { found: String },
    #[error("the stream's {SIDECAR_FILE} is larger than {MAX_SIDECAR_BYTES} bytes")]
    SidecarTooLarge,
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Name(#[from] preflight::PreflightError),
    #[error("entry {path:?} is not a file the sidecar lists")]
    Unexpected { path: String },
    #[error("entry {path:?} appears twice")]
    Duplicate { path: String },
    #[error("entry {path:?} is a {kind:?} entry; only files are imported")]
    NotAFile { path: String, kind: String },
    #[error("{path} is {found} bytes in the stream; the sidecar records {recorded}")]
    Size {
        path: String,
        recorded: u64,
        found: u64,
    },
    #[error("{path} is corrupt: its sha256 is {computed}, the sidecar records {recorded}; nothing was imported")]
    Hash {
        path: String,
        recorded: Digest,
        computed: Digest,
    },
    #[error("the stream ended without {path}; nothing was imported")]
    Missing { path: String },
    #[error("the snapshot file {path} changed while it was exported")]
    Changed { path: PathBuf },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.to_path_buf();
    move |source| ArchiveError::Io { what, path, source }
}

/// How an export is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// zstd at this level (1 to 19; 3 is zstd's default).
    Zstd(i32),
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// Bytes of file data in the stream (holes excluded).
    pub data_bytes: u64,
    /// The files' apparent sizes.
    pub logical_bytes: u64,
}

/// A numeric header field of `N` bytes: octal while it fits, else the
/// GNU base-256 form (top bit set, big-endian), which every reader of
/// GNU archives takes for files over 8 GiB.
fn number<const N: usize>(v: u64) -> [u8; N] {
    let mut out = [0u8; N];
    let digits = N - 1;
    if v < 1u64 << u32::try_from(3 * digits).unwrap_or(63).min(63) {
        let s = format!("{v:0digits$o}");
        out[..digits].copy_from_slice(s.as_bytes());
    } else {
        out[0] = 0x80;
        let be = v.to_be_bytes();
        out[N - 8..].copy_from_slice(&be);
    }
    out
}

fn sparse_entry(offset: u64, len: u64) -> [u8; 24] {
    let mut e = [0u8; 24];
    e[..12].copy_from_slice(&number::<12>(offset));
    e[12..].copy_from_slice(&number::<12>(len));
    e
}

/// Writes one file of the snapshot: a plain entry when it has no holes,
/// else a GNU sparse entry of its data runs.
fn write_file<W: Write>(
    out: &mut W,
    name: &str,
    path: &Path,
    expect_size: u64,
) -> Result<(u64, u64), ArchiveError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len != expect_size {
        return Err(ArchiveError::Changed {
            path: path.to_path_buf(),
        });
    }
    let runs = copy::data_runs(&file, path, len).map_err(|e| ArchiveError::Io {
        what: "find the data in",
        path: path.to_path_buf(),
        source: io::Error::other(crate::error_chain(&e)),
    })?;
    let stored: u64 = runs.iter().map(|(s, e)| e - s).sum();
    let mut header = tar::Header::new_gnu();
    header
        .set_path(name)
        .map_err(io_err("name an entry for", path))?;
    header.set_mode(0o600);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    let dense = runs.len() == 1 && runs[0] == (0, len) || len == 0;
    let mut ext_blocks: Vec<[u8; BLOCK]> = Vec::new();
    if dense {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(len);
    } else {
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.set_size(stored);
        // A trailing hole is said by a last, empty run at the end.
        let mut map: Vec<(u64, u64)> = runs.iter().map(|&(s, e)| (s, e - s)).collect();
        if runs.last().is_none_or(|&(_, e)| e < len) {
            map.push((len, 0));
        }
        let gnu = header.as_gnu_mut().expect("a GNU header");
        gnu.realsize = number::<12>(len);
        let (first, rest) = map.split_at(map.len().min(4));
        for (slot, &(off, n)) in gnu.sparse.iter_mut().zip(first) {
            let e = sparse_entry(off, n);
            slot.offset.copy_from_slice(&e[..12]);
            slot.numbytes.copy_from_slice(&e[12..]);
        }
        gnu.isextended[0] = u8::from(!rest.is_empty());
        let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut b = [0u8; BLOCK];
            for (j, &(off, n)) in chunk.iter().enumerate() {
                b[j * 24..(j + 1) * 24].copy_from_slice(&sparse_entry(off, n));
            }
            b[504] = u8::from(i + 1 < chunks.len());
            ext_blocks.push(b);
        }
    }
    header.set_cksum();
    out.write_all(header.as_bytes())
        .map_err(ArchiveError::Write)?;
    for b in &ext_blocks {
        out.write_all(b).map_err(ArchiveError::Write)?;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let ranges: Vec<(u64, u64)> = if dense { vec![(0, len)] } else { runs };
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = crate::cast::usize_from((end - at).min(CHUNK as u64));
            file.read_exact_at(&mut buf[..n], at)
                .map_err(io_err("read", path))?;
            out.write_all(&buf[..n]).map_err(ArchiveError::Write)?;
            at += n as u64;
            written += n as u64;
        }
    }
    let pad = (BLOCK - crate::cast::usize_from(written % BLOCK as u64)) % BLOCK;
    out.write_all(&[0u8; BLOCK][..pad])
        .map_err(ArchiveError::Write)?;
    Ok((written, len))
}

fn write_all<W: Write>(snapshot: &SnapshotDir, out: &mut W) -> Result<ExportReport, ArchiveError> {
    let mut report = ExportReport {
        data_bytes: 0,
        logical_bytes: 0,
    };
    let sidecar_path = Sidecar::path_in(&snapshot.dir);
    let len = std::fs::metadata(&sidecar_path)
        .map_err(io_err("stat", &sidecar_path))?
        .len();
    write_file(out, SIDECAR_FILE, &sidecar_path, len)?;
    for f in &snapshot.sidecar.files {
        preflight::check_name(&f.name)?;
        let (data, logical) = write_file(out, &f.name, &snapshot.dir.join(&f.name), f.size)?;
        report.data_bytes += data;
        report.logical_bytes += logical;
    }
    out.write_all(&[0u8; 2 * BLOCK])
        .map_err(ArchiveError::Write)?;
    out.flush().map_err(ArchiveError::Write)?;
    Ok(report)
}

/// Writes `snapshot` as a tar stream to `out`. The snapshot is held open
/// (shared lock) by the caller's [`SnapshotDir`], so it is not removed
/// meanwhile.
pub fn export<W: Write>(
    snapshot: &SnapshotDir,
    out: W,
    compression: Compression,
) -> Result<ExportReport, ArchiveError> {
    match compression {
        Compression::None => {
            let mut out = io::BufWriter::with_capacity(CHUNK, out);
            write_all(snapshot, &mut out)
        }
        Compression::Zstd(level) => {
            let mut enc = zstd::Encoder::new(out, level).map_err(ArchiveError::Write)?;
            let report = write_all(snapshot, &mut io::BufWriter::with_capacity(CHUNK, &mut enc))?;
            enc.finish().map_err(ArchiveError::Write)?;
            Ok(report)
        }
    }
}

/// What [`import`] made.
#[derive(Debug, Clone)]
pub struct Imported {
    pub name: String,
    pub dir: PathBuf,
    pub sidecar: Sidecar,
}

/// Writes `reader`'s bytes into `file`, leaving all-zero blocks as holes,
/// and returns (bytes, sha256).
pub(crate) fn copy_sparse(
    reader: &mut impl Read,
    file: &File,
    path: &Path,
) -> Result<(u64, Digest), ArchiveError> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ArchiveError::Read(e)),
            }
        }
        if filled == 0 {
            break;
        }
        let data = &buf[..filled];
        hash.update(data);
        for (i, block) in data.chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                file.write_all_at(block, at + (i * 4096) as u64)
                    .map_err(io_err("write", path))?;
            }
        }
        at += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    file.set_len(at).map_err(io_err("size", path))?;
    let digest = format!("sha256:{}", hex::encode(hash.finalize()))
        .parse()
        .expect("a sha256 is a digest");
    Ok((at, digest))
}

/// Reads a snapshot stream (plain or zstd, told apart by its first bytes)
/// into `snapshots_dir`, as `name` or the name its sidecar records.
pub fn import<R: Read>(
    input: R,
    snapshots_dir: &Path,
    name: Option<&str>,
) -> Result<Imported, ArchiveError> {
    let mut buffered = BufReader::with_capacity(CHUNK, input);
    let compressed = buffered
        .fill_buf()
        .map_err(ArchiveError::Read)?
        .starts_with(&ZSTD_MAGIC);
    let reader: Box<dyn Read> = if compressed {
        Box::new(zstd::Decoder::with_buffer(buffered).map_err(ArchiveError::Read)?)
    } else {
        Box::new(buffered)
    };
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(ArchiveError::Read)?;

    let first = entries.next().transpose().map_err(ArchiveError::Read)?;
    let Some(mut first) = first else {
        return Err(ArchiveError::NoSidecar {
            found: "nothing".into(),
        });
    };
    let first_name = String::from_utf8_lossy(&first.path_bytes()).into_owned();
    if first_name != SIDECAR_FILE {
        return Err(ArchiveError::NoSidecar { found: first_name });
    }
    let mut bytes = Vec::new();
    (&mut first)
        .take(MAX_SIDECAR_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ArchiveError::Read)?;
    if bytes.len() as u64 > MAX_SIDECAR_BYTES {
        return Err(ArchiveError::SidecarTooLarge);
    }
    drop(first);
    let mut sidecar = Sidecar::parse(Path::new(SIDECAR_FILE), &bytes)?;
    let name = name.unwrap_or(&sidecar.name).to_string();
    store::check_name(&name)?;
    for f in &sidecar.files {
        preflight::check_name(&f.name)?;
    }
    let (temp, disks_dir) = TempSnapshot::for_import(snapshots_dir, &name)?;

    let mut seen = HashSet::new();
    for entry in entries {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() && path.trim_end_matches('/') == DISKS_DIR {
            continue;
        }
        if !(kind.is_file() || kind.is_gnu_sparse()) {
            return Err(ArchiveError::NotAFile {
                path,
                kind: format!("{kind:?}"),
            });
        }
        let Some(rec) = sidecar.file(&path) else {
            return Err(ArchiveError::Unexpected { path });
        };
        if !seen.insert(path.clone()) {
            return Err(ArchiveError::Duplicate { path });
        }
        let dest = temp.path().join(&path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
            .map_err(io_err("create", &dest))?;
        let mut limited = (&mut entry).take(rec.size + 1);
        let (found, computed) = copy_sparse(&mut limited, &file, &dest)?;
        if found != rec.size {
            return Err(ArchiveError::Size {
                path,
                recorded: rec.size,
                found,
            });
        }
        if computed != rec.sha256 {
            return Err(ArchiveError::Hash {
                path,
                recorded: rec.sha256.clone(),
                computed,
            });
        }
        file.sync_all().map_err(io_err("fsync", &dest))?;
    }
    if let Some(f) = sidecar.files.iter().find(|f| !seen.contains(&f.name)) {
        return Err(ArchiveError::Missing {
            path: f.name.clone(),
        });
    }
    crate::fsutil::sync_dir(&disks_dir).map_err(io_err("fsync", &disks_dir))?;
    sidecar.name = name.clone();
    sidecar.write(temp.path())?;
    let dir = temp.commit(&name)?;
    Ok(Imported { name, dir, sidecar })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_octal_and_base_256() {
        assert_eq!(&number::<12>(0o755), b"00000000755\0");
        assert_eq!(&number::<12>((1 << 33) - 1), b"77777777777\0");
        let big = number::<12>(1 << 40);
        assert_eq!(big[0], 0x80);
        assert_eq!(u64::from_be_bytes(big[4..].try_into().unwrap()), 1 << 40);
    }
}
