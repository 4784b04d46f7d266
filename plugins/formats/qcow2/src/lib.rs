//! qcow2 (versions 2 and 3), read-only: the header is checked, then the
//! virtual disk is described as runs of zeros, stored data, compressed
//! clusters and backing-file reads. Refcounts and snapshots play no part in
//! reading the active layer and are not looked at.
//!
//! Everything here is untrusted input: every table offset and size is
//! checked against the file before it is read, every allocation is bounded
//! by the file's size or by fixed limits, and no walk is longer than the
//! tables the file actually holds.
//!
//! The layout follows qemu's docs/interop/qcow2.txt.

use std::cell::RefCell;

use cocoon_format_common::{fits, index};
pub use cocoon_format_common::{push_merged, ErrorKind, Extent, Format, FormatError, ReadAt, Run};

mod codec;
mod header;

pub use codec::{decode, CODEC_DEFLATE, CODEC_ZSTD};
pub use header::{Compression, Header, MAGIC};

/// An L1 table larger than this is refused (qemu's own limit, 32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// L2 tables one `map` call reads at most. Bounds the time of one call
/// whatever the image says; the caller asks again from where we stopped.
const MAX_L2_READS_PER_CALL: usize = 64;

/// Bits 9..=55 of an L1 entry or a standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Bits that must be zero in a standard (not compressed) L2 entry: 1..=8
/// and 56..=61.
const L2_STANDARD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits that must be zero in an L1 entry: 0..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// Whether `head` starts with the qcow2 magic and a version we read.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 8
        && head[..4] == MAGIC
        && matches!(
            u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
            2 | 3
        )
}

/// A cached L2 table: its file offset and its raw entries (pairs of words
/// with extended L2).
struct L2Cache {
    offset: u64,
    words: Vec<u64>,
}

/// An opened qcow2 image: its checked header, L1 table and backing name.
/// The source is passed to each `map` call, as [`Format`] has it.
pub struct Qcow2 {
    header: Header,
    l1: Vec<u64>,
    backing: Option<String>,
    l2: RefCell<Option<L2Cache>>,
}

impl Qcow2 {
    /// Reads and checks the header, the backing file name and the L1 table.
    pub fn open(src: &dyn ReadAt) -> Result<Self, FormatError> {
        let header = Header::read(src)?;
        let backing = header.read_backing_name(src)?;
        let l1 = read_l1(src, &header)?;
        Ok(Qcow2 {
            header,
            l1,
            backing,
            l2: RefCell::new(None),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The virtual size in whole 512-byte sectors, as qemu reads it
    /// (`total_sectors = size / 512`): a header size of 1000 bytes is a
    /// 512-byte disk, and the bytes past the last whole sector are never
    /// part of it.
    pub fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    /// The backing file name exactly as the image stores it.
    pub fn backing(&self) -> Option<&str> {
        self.backing.as_deref()
    }

    /// The codec tag of this image's compressed clusters.
    pub fn codec(&self) -> u32 {
        match self.header.compression {
            Compression::Deflate => CODEC_DEFLATE,
            Compression::Zstd => CODEC_ZSTD,
        }
    }

    /// Up to `max` extents covering the virtual disk from `offset`, merged
    /// where possible. Fewer than `max` does not mean the end: only an empty
    /// answer does.
    pub fn map(
        &self,
        src: &dyn ReadAt,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Extent>, FormatError> {
        let size = self.virtual_size();
        let mut out: Vec<Extent> = Vec::new();
        if offset >= size || max == 0 {
            return Ok(out);
        }
        let cb = self.header.cluster_bits;
        let cluster = 1u64 << cb;
        let l2_entries = self.header.l2_entries();
        let l1_span = cluster * l2_entries;
        let mut pos = offset;
        let mut l2_reads = 0;
        'walk: while pos < size {
            let l1_index = pos / l1_span;
            let entry = self.l1[index(l1_index)];
            let span_end = ((l1_index + 1) * l1_span).min(size);
            if entry & L1_RESERVED != 0 {
                return Err(FormatError::invalid(format!(
                    "L1 entry {l1_index} ({entry:#x}) has reserved bits set"
                )));
            }
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                let e = Extent {
                    offset: pos,
                    length: span_end - pos,
                    run: self.unallocated(),
                };
                if !try_push(&mut out, e, max) {
                    break;
                }
                pos = span_end;
                continue;
            }
            let cached = self
                .l2
                .borrow()
                .as_ref()
                .is_some_and(|c| c.offset == l2_offset);
            if !cached {
                if l2_reads == MAX_L2_READS_PER_CALL && !out.is_empty() {
                    break;
                }
                l2_reads += 1;
                let words = self.read_l2(src, l1_index, l2_offset)?;
                *self.l2.borrow_mut() = Some(L2Cache {
                    offset: l2_offset,
                    words,
                });
            }
            let cache = self.l2.borrow();
            let words = &cache.as_ref().expect("filled above").words;
            while pos < span_end {
                let index = index((pos % l1_span) >> cb);
                let cluster_start = pos & !(cluster - 1);
                let cluster_end = (cluster_start + cluster).min(size);
                let runs = self.cluster_runs(src, words, index, cluster_start, cluster_end, pos)?;
                for e in runs {
                    if !try_push(&mut out, e, max) {
                        break 'walk;
                    }
                    pos = e.offset + e.length;
                }
            }
        }
        Ok(out)
    }

    /// What an unallocated range reads as: the backing file, or zeros.
    fn unallocated(&self) -> Run {
        if self.backing.is_some() {
            Run::Backing
        } else {
            Run::Zero
        }
    }

    fn read_l2(
        &self,
        src: &dyn ReadAt,
        l1_index: u64,
        l2_offset: u64,
    ) -> Result<Vec<u64>, FormatError> {
        let cluster = self.header.cluster_size();
        if !l2_offset.is_multiple_of(cluster) {
            return Err(FormatError::invalid(format!(
                "L1 entry {l1_index}: L2 table offset {l2_offset:#x} is not aligned to the {cluster}-byte cluster"
            )));
        }
        if l2_offset < cluster {
            return Err(FormatError::invalid(format!(
                "L1 entry {l1_index}: L2 table offset {l2_offset:#x} points into the header cluster"
            )));
        }
        let file = src.size();
        if l2_offset.checked_add(cluster).is_none_or(|end| end > file) {
            return Err(FormatError::invalid(format!(
                "L1 entry {l1_index}: L2 table at {l2_offset:#x} (+{cluster}) is past the end of the {file}-byte file"
            )));
        }
        let mut buf = vec![0u8; fits(cluster, "L2 table")?];
        src.read_exact_at(l2_offset, &mut buf)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunks")))
            .collect())
    }

    /// The runs of one cluster from `pos` (inside the cluster) to its end.
    fn cluster_runs(
        &self,
        src: &dyn ReadAt,
        words: &[u64],
        index: usize,
        cluster_start: u64,
        cluster_end: u64,
        pos: u64,
    ) -> Result<Vec<Extent>, FormatError> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let file = src.size();
        let (entry, bitmap) = if h.extended_l2 {
            (words[2 * index], words[2 * index + 1])
        } else {
            (words[index], 0)
        };
        let at = |msg: String| {
            FormatError::invalid(format!(
                "L2 entry for virtual offset {cluster_start:#x}: {msg}"
            ))
        };
        if entry & L2_COMPRESSED != 0 {
            if pos != cluster_start {
                return Err(at(format!(
                    "a compressed cluster cannot be mapped from inside it (offset {pos:#x})"
                )));
            }
            let shift = 62 - (h.cluster_bits - 8);
            let host = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
            if host < cluster {
                return Err(at(format!(
                    "compressed data at {host:#x} is inside the header cluster"
                )));
            }
            if host >= file {
                return Err(at(format!(
                    "compressed data at {host:#x} is past the end of the {file}-byte file"
                )));
            }
            // The sector count rounds up to 512-byte sectors, so the last
            // compressed cluster of a file may claim bytes past its end.
            let claimed = sectors * 512 - (host & 511);
            let length = claimed.min(file - host);
            let length = u32::try_from(length)
                .map_err(|_| at(format!("a compressed length of {length} bytes")))?;
            return Ok(vec![Extent {
                offset: pos,
                length: cluster_end - pos,
                run: Run::Compressed {
                    source_offset: host,
                    source_length: length,
                    codec: self.codec(),
                },
            }]);
        }
        if entry & L2_STANDARD_RESERVED != 0 {
            return Err(at(format!("entry {entry:#x} has reserved bits set")));
        }
        let host = entry & OFFSET_MASK;
        if host != 0 {
            if !host.is_multiple_of(cluster) {
                return Err(at(format!("data offset {host:#x} is not cluster-aligned")));
            }
            if host < cluster {
                return Err(at(format!(
                    "data offset {host:#x} points into the header cluster"
                )));
            }
            // A cluster may extend past the end of the file only in the
            // part beyond the virtual size; the host checks each data run.
            if host >= file {
                return Err(at(format!(
                    "data cluster at {host:#x} is past the end of the {file}-byte file"
                )));
            }
        }
        if !h.extended_l2 {
            let run = if entry & L2_ZERO != 0 {
                Run::Zero
            } else if host != 0 {
                Run::Data(host + (pos - cluster_start))
            } else {
                self.unallocated()
            };
            let runs = vec![Extent {
                offset: pos,
                length: cluster_end - pos,
                run,
            }];
            return check_data_in_file(runs, file, cluster_start);
        }
        // Extended L2: 32 subclusters, an allocation bit (low word half)
        // and a zero bit (high half) each.
        let alloc = (bitmap & 0xffff_ffff) as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(at(format!(
                "subcluster bitmap {bitmap:#x} marks subclusters both allocated and zero"
            )));
        }
        if host == 0 && alloc != 0 {
            return Err(at(format!(
                "subcluster bitmap {bitmap:#x} allocates subclusters of an unallocated cluster"
            )));
        }
        let sub = cluster / 32;
        let mut runs = Vec::new();
        // Below 32 (pos is inside the cluster); saturated, the loop is empty.
        let first = u32::try_from((pos - cluster_start) / sub).unwrap_or(u32::MAX);
        for i in first..32 {
            let start = (cluster_start + i as u64 * sub).max(pos);
            let end = (cluster_start + (i as u64 + 1) * sub).min(cluster_end);
            if start >= end {
                break;
            }
            let run = if alloc & (1 << i) != 0 {
                Run::Data(host + (start - cluster_start))
            } else if zero & (1 << i) != 0 {
                Run::Zero
            } else {
                self.unallocated()
            };
            push_merged(
                &mut runs,
                Extent {
                    offset: start,
                    length: end - start,
                    run,
                },
            );
        }
        check_data_in_file(runs, file, cluster_start)
    }
}

/// Every data run of a cluster must lie wholly inside the file: its start
/// being inside is not enough (a subcluster or the cluster's tail may not).
fn check_data_in_file(
    runs: Vec<Extent>,
    file: u64,
    cluster_start: u64,
) -> Result<Vec<Extent>, FormatError> {
    for e in &runs {
        if let Run::Data(at) = e.run {
            if at.checked_add(e.length).is_none_or(|end| end > file) {
                return Err(FormatError::invalid(format!(
                    "L2 entry for virtual offset {cluster_start:#x}: data at {at:#x}+{} is past the end of the {file}-byte file",
                    e.length
                )));
            }
        }
    }
    Ok(runs)
}

/// Pushes `e` (merged when possible); false when the page already holds
/// `max` extents and `e` would need another one.
fn try_push(out: &mut Vec<Extent>, e: Extent, max: usize) -> bool {
    if out.len() >= max && !out.last().is_some_and(|last| mergeable(last, &e)) {
        return false;
    }
    push_merged(out, e);
    true
}

/// Whether `push_merged` would fold `e` into `last`.
fn mergeable(last: &Extent, e: &Extent) -> bool {
    last.offset + last.length == e.offset
        && match (last.run, e.run) {
            (Run::Zero, Run::Zero) | (Run::Backing, Run::Backing) => true,
            (Run::Data(a), Run::Data(b)) => a.checked_add(last.length) == Some(b),
            _ => false,
        }
}

fn read_l1(src: &dyn ReadAt, h: &Header) -> Result<Vec<u64>, FormatError> {
    let needed = h.l1_entries_needed();
    if (h.l1_size as u64) < needed {
        return Err(FormatError::invalid(format!(
            "header field l1_size is {}, but a virtual size of {} bytes needs {needed} entries",
            h.l1_size, h.size
        )));
    }
    let bytes = needed * 8;
    if bytes > MAX_L1_BYTES {
        return Err(FormatError::limit(format!(
            "L1 table of {bytes} bytes for a virtual size of {} bytes is over the {MAX_L1_BYTES}-byte limit",
            h.size
        )));
    }
    if needed == 0 {
        return Ok(Vec::new());
    }
    let cluster = h.cluster_size();
    if !h.l1_table_offset.is_multiple_of(cluster) || h.l1_table_offset < cluster {
        return Err(FormatError::invalid(format!(
            "header field l1_table_offset {:#x} is not a cluster-aligned offset past the header",
            h.l1_table_offset
        )));
    }
    let file = src.size();
    if h.l1_table_offset
        .checked_add(bytes)
        .is_none_or(|end| end > file)
    {
        return Err(FormatError::invalid(format!(
            "L1 table at {:#x} (+{bytes}) is past the end of the {file}-byte file",
            h.l1_table_offset
        )));
    }
    // Only the entries the virtual size needs are read: the rest can never
    // be reached.
    let mut buf = vec![0u8; fits(bytes, "L1 table")?];
    src.read_exact_at(h.l1_table_offset, &mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunks")))
        .collect())
}

impl Format for Qcow2 {
    const NAME: &'static str = "qcow2";

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<u8> {
        probe(head).then_some(100)
    }

    fn open(src: &dyn ReadAt) -> Result<Self, FormatError> {
        Qcow2::open(src)
    }

    fn virtual_size(&self) -> u64 {
        Qcow2::virtual_size(self)
    }

    fn backing(&self) -> Option<&str> {
        Qcow2::backing(self)
    }

    fn map(&self, src: &dyn ReadAt, offset: u64, max: usize) -> Result<Vec<Extent>, FormatError> {
        Qcow2::map(self, src, offset, max)
    }

    fn decode(codec: u32, input: &[u8], length: u32) -> Result<Vec<u8>, FormatError> {
        decode(codec, input, length as usize)
    }
}

#[cfg(test)]
mod tests;
