//! VMDK hosted sparse extents: monolithicSparse and streamOptimized.
//!
//! A sparse extent starts with a 512-byte header (`KDMV`), holds an embedded
//! text descriptor, a grain directory (GD) of grain-table (GT) sector
//! offsets, and grains. streamOptimized images compress each grain (zlib)
//! behind a 12-byte marker, and may write the GD at the end of the stream
//! with a footer copy of the header (`gdOffset == GD_AT_END`).
//!
//! Images made of several files (a text descriptor naming extent files,
//! split or flat extents) are refused: a plugin only ever sees the one file
//! the host hands it, and a descriptor must never steer the host towards
//! another path such as `/etc/shadow`.

use cocoon_format_common::bytes::{le16, le32, le64};
use cocoon_format_common::{
    fits, index, push_merged, read_range, ErrorKind, Extent, FormatError, ReadAt, Run,
};

pub const FORMAT: &str = "vmdk";

const SECTOR: u64 = 512;
const MAGIC_KDMV: &[u8; 4] = b"KDMV";
/// The VMware 3 (ESX "COWD") sparse magic: recognised to refuse it clearly.
const MAGIC_COWD: &[u8; 4] = b"COWD";
const DESCRIPTOR_SIGNATURE: &[u8] = b"# Disk DescriptorFile";

const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
const GD_AT_END: u64 = u64::MAX;
/// A grain-table entry meaning "reads as zeros" when the header's
/// zero-grain flag is set.
const GTE_ZEROED: u32 = 1;
/// Grain-table entry count qemu and VMware write; larger tables are
/// refused by qemu too.
const MAX_GTES_PER_GT: u32 = 512;
/// Largest grain accepted (in sectors): 2 MiB. VMware writes 64 KiB; a
/// bigger grain would only make decode buffers large.
const MAX_GRAIN_SECTORS: u64 = 4096;
/// The embedded descriptor is a few hundred bytes; more is not a VMDK.
const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;
/// Size of a grain marker: lba (u64) and compressed size (u32).
const GRAIN_MARKER_LEN: u64 = 12;
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// How many grains one `map` call looks at before returning what it has, so
/// that a call's time is bounded whatever the image holds.
const SCAN_LIMIT: u64 = 1 << 16;
/// Grain-directory entries read per table read.
const GD_WINDOW: u64 = 8192;

/// Codec tag of a streamOptimized grain: zlib, with the grain size in
/// sectors in bits 8.. so that `decode` (which is stateless) knows how large
/// the decompressed grain may be.
const CODEC_ZLIB: u32 = 1;

/// The codec tag for a zlib grain of `grain_sectors` sectors.
#[allow(
    clippy::cast_possible_truncation,
    reason = "grain_sectors <= MAX_GRAIN_SECTORS (checked at open), far below 2^24"
)]
pub fn zlib_codec(grain_sectors: u64) -> u32 {
    // grain_sectors <= MAX_GRAIN_SECTORS, so the shift cannot overflow.
    CODEC_ZLIB | ((grain_sectors as u32) << 8)
}

/// Says whether `head` (the first bytes of a file) looks like a VMDK:
/// a sparse header, or a text descriptor (recognised so that opening it is
/// refused clearly rather than the file being taken for a raw disk).
pub fn probe(head: &[u8]) -> Option<u8> {
    if head.starts_with(MAGIC_KDMV) || head.starts_with(MAGIC_COWD) {
        return Some(100);
    }
    if head.starts_with(DESCRIPTOR_SIGNATURE) {
        return Some(100);
    }
    // Descriptors written by other tools may start with a blank line or a
    // different comment; `createType=` in the first KiB of text is telling.
    let text = &head[..head.len().min(1024)];
    if !text.is_empty()
        && text
            .iter()
            .all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b))
        && find(text, b"createType=").is_some()
    {
        return Some(90);
    }
    None
}

/// An opened sparse extent.
#[derive(Debug, Clone)]
pub struct Vmdk {
    /// Virtual size in bytes.
    capacity: u64,
    grain_sectors: u64,
    grain: u64,
    gtes_per_gt: u64,
    /// Grain directory: `gd_entries` u32 sector offsets of the grain
    /// tables (0: none) at `gd_offset`, read in windows by `map` so that
    /// memory stays bounded whatever the capacity.
    gd_offset: u64,
    gd_entries: u64,
    compressed: bool,
    zero_grain: bool,
    /// Grain tables must start at or after this offset: the header and the
    /// embedded descriptor live below it.
    min_table_offset: u64,
    /// Grains must start at or after this offset (overHead: the header,
    /// descriptor, and for monolithicSparse the GD and grain tables).
    min_data_offset: u64,
    file_size: u64,
    /// The parent named by a delta image's descriptor.
    backing: Option<String>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What the header of a sparse extent says.
struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_sectors: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes_per_gt: u32,
    gd_offset: u64,
    overhead: u64,
    compress_algorithm: u16,
}

impl Header {
    /// Parses a 512-byte sector holding the magic and the header.
    fn parse(b: &[u8]) -> Header {
        Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_sectors: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            compress_algorithm: le16(b, 77),
        }
    }
}

/// One extent line of a descriptor: `RW 4192256 SPARSE "disk.vmdk"`.
#[derive(Debug, PartialEq, Eq)]
struct ExtentLine {
    kind: String,
    file: String,
}

/// The descriptor fields this parser cares about.
#[derive(Debug, Default)]
struct Descriptor {
    create_type: Option<String>,
    parent_cid: Option<String>,
    parent_hint: Option<String>,
    extents: Vec<ExtentLine>,
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

fn parse_descriptor(bytes: &[u8]) -> Descriptor {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut d = Descriptor::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            match key.trim() {
                "createType" => d.create_type = Some(unquote(value).to_string()),
                "parentCID" => d.parent_cid = Some(unquote(value).to_string()),
                "parentFileNameHint" => d.parent_hint = Some(unquote(value).to_string()),
                _ => {}
            }
            continue;
        }
        // Extent lines: ACCESS SECTORS TYPE "FILE" [OFFSET].
        let mut words = line.splitn(4, ' ').filter(|w| !w.is_empty());
        let (Some(access), Some(sectors), Some(kind)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if !matches!(access, "RW" | "RDONLY" | "NOACCESS") || sectors.parse::<u64>().is_err() {
            continue;
        }
        let rest = words.next().unwrap_or("").trim();
        let file = match rest.strip_prefix('"').and_then(|r| r.split_once('"')) {
            Some((name, _)) => name.to_string(),
            None => rest.to_string(),
        };
        d.extents.push(ExtentLine {
            kind: kind.to_string(),
            file,
        });
    }
    d
}

/// The error for a descriptor that names extent files: this parser reads
/// only the file it was given.
fn external_extents(d: &Descriptor) -> FormatError {
    let names: Vec<String> = d
        .extents
        .iter()
        .map(|e| format!("{} \"{}\"", e.kind, e.file))
        .collect();
    FormatError::unsupported(format!(
        "VMDK descriptor (createType {}) names external extent files [{}]; only self-contained \
         monolithicSparse and streamOptimized images are read",
        d.create_type.as_deref().unwrap_or("unset"),
        names.join(", ")
    ))
}

impl Vmdk {
    /// Reads and checks the header, the embedded descriptor and the grain
    /// directory.
    pub fn open(src: &dyn ReadAt) -> Result<Vmdk, FormatError> {
        let file_size = src.size();
        let head = read_range(src, 0, SECTOR.min(file_size), "VMDK header")?;
        if head.starts_with(MAGIC_COWD) {
            return Err(FormatError::unsupported(
                "VMDK version 3 (COWD, ESX vmfsSparse) extents are not supported",
            ));
        }
        if !head.starts_with(MAGIC_KDMV) {
            if probe(&head).is_some() {
                // A text descriptor: everything it describes lives in other
                // files.
                let text = read_range(
                    src,
                    0,
                    file_size.min(MAX_DESCRIPTOR_BYTES),
                    "VMDK descriptor",
                )?;
                return Err(external_extents(&parse_descriptor(&text)));
            }
            return Err(FormatError::invalid(
                "not a VMDK: no KDMV magic at offset 0",
            ));
        }
        if (head.len() as u64) < SECTOR {
            return Err(FormatError::invalid(format!(
                "VMDK header truncated: the file has {file_size} bytes, the header needs 512"
            )));
        }
        let mut h = Header::parse(&head);

        // A delta or multi-extent image can embed a full descriptor; qemu
        // even follows one when capacity is 0. Read it to refuse those.
        let mut descriptor_end = SECTOR;
        let descriptor = if h.desc_offset != 0 {
            let off = h.desc_offset.checked_mul(SECTOR);
            let len = h.desc_size.checked_mul(SECTOR);
            let end = off.zip(len).and_then(|(o, l)| o.checked_add(l));
            let (Some(off), Some(len), Some(end)) = (off, len, end) else {
                return Err(FormatError::invalid(format!(
                    "VMDK descriptorOffset {} / descriptorSize {} overflow",
                    h.desc_offset, h.desc_size
                )));
            };
            if len > MAX_DESCRIPTOR_BYTES {
                return Err(FormatError::limit(format!(
                    "VMDK descriptorSize {} sectors is over the {MAX_DESCRIPTOR_BYTES}-byte limit",
                    h.desc_size
                )));
            }
            descriptor_end = descriptor_end.max(end);
            Some(parse_descriptor(&read_range(
                src,
                off,
                len,
                "VMDK embedded descriptor",
            )?))
        } else {
            None
        };
        if let Some(d) = &descriptor {
            let self_contained = matches!(
                d.create_type.as_deref(),
                None | Some("monolithicSparse") | Some("streamOptimized")
            ) && d.extents.len() <= 1
                && d.extents.iter().all(|e| e.kind == "SPARSE")
                // The one extent of a self-contained image is the file
                // itself, named by its base name: a path names another file.
                && d.extents.iter().all(|e| !e.file.contains(['/', '\\']));
            if !self_contained || h.capacity == 0 {
                return Err(external_extents(d));
            }
        }

        if h.gd_offset == GD_AT_END {
            h = Self::footer(src)?;
        }

        if h.version == 0 || h.version > 3 {
            return Err(FormatError::unsupported(format!(
                "VMDK version {} is not supported (1 to 3 are)",
                h.version
            )));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(FormatError::invalid(format!(
                "VMDK numGTEsPerGT {} is out of range (1 to {MAX_GTES_PER_GT})",
                h.gtes_per_gt
            )));
        }
        if h.grain_sectors == 0 || h.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(FormatError::unsupported(format!(
                "VMDK grainSize {} sectors is out of range (1 to {MAX_GRAIN_SECTORS})",
                h.grain_sectors
            )));
        }
        let compressed = h.compress_algorithm == COMPRESSION_DEFLATE;
        if h.compress_algorithm > COMPRESSION_DEFLATE {
            return Err(FormatError::unsupported(format!(
                "VMDK compressAlgorithm {} is not supported (0 none, 1 deflate)",
                h.compress_algorithm
            )));
        }
        if compressed && h.flags & FLAG_MARKERS == 0 {
            // Without markers the compressed length of a grain is unknown.
            return Err(FormatError::unsupported(format!(
                "VMDK compressed grains without markers (flags {:#x}) are not supported",
                h.flags
            )));
        }
        if compressed && h.flags & FLAG_COMPRESSED == 0 {
            return Err(FormatError::invalid(format!(
                "VMDK compressAlgorithm is deflate but flags {:#x} lack the compressed-grains bit",
                h.flags
            )));
        }
        let capacity = h.capacity.checked_mul(SECTOR).ok_or_else(|| {
            FormatError::invalid(format!("VMDK capacity {} sectors overflows", h.capacity))
        })?;
        let grain = h.grain_sectors * SECTOR;
        let gtes_per_gt = u64::from(h.gtes_per_gt);
        // Bytes of virtual disk one grain table covers (at most 512 * 2 MiB).
        let gt_span = gtes_per_gt * grain;
        let gd_entries = capacity.div_ceil(gt_span);
        let gd_bytes = gd_entries * 4;
        let gd_off = h.gd_offset.checked_mul(SECTOR).ok_or_else(|| {
            FormatError::invalid(format!("VMDK gdOffset {} overflows", h.gd_offset))
        })?;
        if gd_entries > 0 && gd_off < descriptor_end {
            return Err(FormatError::invalid(format!(
                "VMDK gdOffset {} points into the header or descriptor",
                h.gd_offset
            )));
        }
        // The GD must be in the file, which bounds its allocation by the
        // file size whatever capacity the header claims.
        if gd_off.checked_add(gd_bytes).is_none_or(|e| e > file_size) {
            return Err(FormatError::invalid(format!(
                "VMDK grain directory of {gd_entries} entries at offset {gd_off} (for capacity \
                 {capacity} bytes) does not fit in the {file_size}-byte file"
            )));
        }

        let overhead = h.overhead.checked_mul(SECTOR).filter(|&o| o <= file_size);
        let Some(overhead) = overhead else {
            return Err(FormatError::invalid(format!(
                "VMDK overHead {} sectors is past the end of the {file_size}-byte file",
                h.overhead
            )));
        };

        let backing = descriptor.as_ref().and_then(|d| {
            let has_parent = d
                .parent_cid
                .as_deref()
                .is_some_and(|c| !c.eq_ignore_ascii_case("ffffffff"));
            if has_parent {
                d.parent_hint.clone()
            } else {
                None
            }
        });
        Ok(Vmdk {
            capacity,
            grain_sectors: h.grain_sectors,
            grain,
            gtes_per_gt,
            gd_offset: gd_off,
            gd_entries,
            compressed,
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            min_table_offset: descriptor_end,
            min_data_offset: overhead.max(descriptor_end),
            file_size,
            backing,
        })
    }

    /// Reads the footer of a stream whose header says `GD_AT_END`: a footer
    /// marker, a copy of the header with the real gdOffset, and an
    /// end-of-stream marker, in the last three sectors.
    fn footer(src: &dyn ReadAt) -> Result<Header, FormatError> {
        let size = src.size();
        let Some(at) = size.checked_sub(3 * SECTOR) else {
            return Err(FormatError::invalid(format!(
                "VMDK gdOffset is GD_AT_END but the {size}-byte file has no room for a footer"
            )));
        };
        let b = read_range(src, at, 3 * SECTOR, "VMDK footer")?;
        let marker_size = le32(&b, 8);
        let marker_type = le32(&b, 12);
        let footer = &b[512..1024];
        let eos = &b[1024..];
        if marker_size != 0
            || marker_type != MARKER_FOOTER
            || !footer.starts_with(MAGIC_KDMV)
            || le64(eos, 0) != 0
            || le32(eos, 8) != 0
            || le32(eos, 12) != MARKER_EOS
        {
            return Err(FormatError::invalid(format!(
                "VMDK gdOffset is GD_AT_END but no valid footer ends the file (footer marker \
                 type {marker_type}, size {marker_size})"
            )));
        }
        let h = Header::parse(footer);
        if h.gd_offset == GD_AT_END {
            return Err(FormatError::invalid(
                "VMDK footer's gdOffset is GD_AT_END too",
            ));
        }
        Ok(h)
    }

    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.capacity
    }

    /// The parent file named by a delta image, as stored.
    pub fn backing(&self) -> Option<&str> {
        self.backing.as_deref()
    }

    /// What unallocated grains read as.
    fn unallocated(&self) -> Run {
        if self.backing.is_some() {
            Run::Backing
        } else {
            Run::Zero
        }
    }

    /// Reads grain table `gd_index`, at `sector`.
    fn grain_table(
        &self,
        src: &dyn ReadAt,
        gd_index: u64,
        sector: u32,
    ) -> Result<Vec<u32>, FormatError> {
        let sector = u64::from(sector);
        let off = sector * SECTOR;
        if off < self.min_table_offset {
            return Err(FormatError::invalid(format!(
                "VMDK grain directory entry {gd_index} (sector {sector}) points into the header"
            )));
        }
        let raw = read_range(
            src,
            off,
            self.gtes_per_gt * 4,
            &format!("VMDK grain table {gd_index}"),
        )?;
        Ok(raw.chunks_exact(4).map(|c| le32(c, 0)).collect())
    }

    /// Where the grain holding `pos` comes from; returns the run and where
    /// it ends.
    fn grain_run(
        &self,
        src: &dyn ReadAt,
        pos: u64,
        grain_index: u64,
        entry: u32,
    ) -> Result<(Run, u64), FormatError> {
        let start = grain_index * self.grain;
        let end = start.saturating_add(self.grain).min(self.capacity);
        if entry == 0 {
            return Ok((self.unallocated(), end));
        }
        if entry == GTE_ZEROED && self.zero_grain {
            return Ok((Run::Zero, end));
        }
        let off = u64::from(entry) * SECTOR;
        if off < self.min_data_offset {
            return Err(FormatError::invalid(format!(
                "VMDK grain {grain_index} (sector {entry}) points into the metadata below \
                 overHead ({} bytes)",
                self.min_data_offset
            )));
        }
        if self.compressed {
            if pos != start {
                return Err(FormatError::invalid(format!(
                    "map offset {pos} is inside compressed grain {grain_index} (starting at \
                     {start}); compressed grains map from their start"
                )));
            }
            let marker = read_range(
                src,
                off,
                GRAIN_MARKER_LEN,
                &format!("VMDK grain {grain_index} marker"),
            )?;
            let size = le32(&marker, 8);
            // qemu reads at most two grains of compressed data per grain.
            if size == 0 || u64::from(size) > 2 * self.grain {
                return Err(FormatError::invalid(format!(
                    "VMDK grain {grain_index} compressed size {size} is out of range (1 to {})",
                    2 * self.grain
                )));
            }
            let data = off + GRAIN_MARKER_LEN;
            if data + u64::from(size) > self.file_size {
                return Err(FormatError::invalid(format!(
                    "VMDK grain {grain_index}: {size} compressed bytes at offset {data} are past \
                     the end of the {}-byte file",
                    self.file_size
                )));
            }
            let run = Run::Compressed {
                source_offset: data,
                source_length: size,
                codec: zlib_codec(self.grain_sectors),
            };
            return Ok((run, end));
        }
        let used_end = off + (end - start);
        if used_end > self.file_size {
            return Err(FormatError::invalid(format!(
                "VMDK grain {grain_index} at offset {off} ends past the end of the {}-byte file",
                self.file_size
            )));
        }
        Ok((Run::Data(off + (pos - start)), end))
    }

    /// Up to `max` extents covering the virtual disk from `offset`, in
    /// order. Empty at or past the end.
    pub fn map(
        &self,
        src: &dyn ReadAt,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Extent>, FormatError> {
        let mut out = Vec::new();
        let mut pos = offset;
        let mut table: Option<(u64, Vec<u32>)> = None;
        let mut gd_window: (u64, Vec<u32>) = (0, Vec::new());
        let mut scanned = 0u64;
        while pos < self.capacity && max > 0 {
            if scanned >= SCAN_LIMIT {
                break;
            }
            scanned += 1;
            let grain_index = pos / self.grain;
            let gd_index = grain_index / self.gtes_per_gt;
            if gd_index < gd_window.0 || gd_index >= gd_window.0 + gd_window.1.len() as u64 {
                let count = GD_WINDOW.min(self.gd_entries - gd_index);
                let raw = read_range(
                    src,
                    self.gd_offset + gd_index * 4,
                    count * 4,
                    "VMDK grain directory",
                )?;
                gd_window = (gd_index, raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
            }
            let gt_sector = gd_window.1[index(gd_index - gd_window.0)];
            let (run, end) = if gt_sector == 0 {
                // No grain table: the whole span it would cover is
                // unallocated.
                let end = (gd_index + 1)
                    .saturating_mul(self.gtes_per_gt * self.grain)
                    .min(self.capacity);
                (self.unallocated(), end)
            } else {
                if table.as_ref().is_none_or(|(i, _)| *i != gd_index) {
                    table = Some((gd_index, self.grain_table(src, gd_index, gt_sector)?));
                }
                let gt = &table.as_ref().expect("loaded above").1;
                let entry = gt[index(grain_index % self.gtes_per_gt)];
                self.grain_run(src, pos, grain_index, entry)?
            };
            push_merged(
                &mut out,
                Extent {
                    offset: pos,
                    length: end - pos,
                    run,
                },
            );
            if out.len() > max {
                out.pop();
                break;
            }
            pos = end;
        }
        Ok(out)
    }
}

/// Decodes one compressed grain into exactly `length` bytes (the grain's
/// part inside the virtual disk).
pub fn decode(codec: u32, input: &[u8], length: u32) -> Result<Vec<u8>, FormatError> {
    if codec & 0xff != CODEC_ZLIB {
        return Err(FormatError::unsupported(format!(
            "codec {codec:#x} is not a VMDK codec"
        )));
    }
    let grain_sectors = u64::from(codec >> 8);
    if grain_sectors == 0 || grain_sectors > MAX_GRAIN_SECTORS {
        return Err(FormatError::invalid(format!(
            "codec {codec:#x} names a grain of {grain_sectors} sectors (1 to {MAX_GRAIN_SECTORS})"
        )));
    }
    let grain = fits(grain_sectors * SECTOR, "a grain")?;
    if length as usize > grain {
        return Err(FormatError::invalid(format!(
            "decode length {length} is larger than the {grain}-byte grain"
        )));
    }
    // Like qemu: the stream must end within one grain; a grain that
    // decodes to less than asked for is corrupt.
    let mut out =
        miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(input, grain).map_err(|e| {
            FormatError::new(
                ErrorKind::InvalidInput,
                format!(
                    "VMDK grain does not inflate within {grain} bytes: {:?}",
                    e.status
                ),
            )
        })?;
    if out.len() < length as usize {
        return Err(FormatError::invalid(format!(
            "VMDK grain inflates to {} bytes, {length} needed",
            out.len()
        )));
    }
    out.truncate(length as usize);
    Ok(out)
}

impl cocoon_format_common::Format for Vmdk {
    const NAME: &'static str = FORMAT;

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<u8> {
        probe(head)
    }

    fn open(src: &dyn ReadAt) -> Result<Self, FormatError> {
        Vmdk::open(src)
    }

    fn virtual_size(&self) -> u64 {
        Vmdk::virtual_size(self)
    }

    fn backing(&self) -> Option<&str> {
        Vmdk::backing(self)
    }

    fn decode(codec: u32, input: &[u8], length: u32) -> Result<Vec<u8>, FormatError> {
        decode(codec, input, length)
    }

    fn map(&self, src: &dyn ReadAt, offset: u64, max: usize) -> Result<Vec<Extent>, FormatError> {
        Vmdk::map(self, src, offset, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_lines() {
        let d = parse_descriptor(
            b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
              createType=\"monolithicFlat\"\n\n# Extent description\n\
              RW 2048 FLAT \"/etc/shadow\" 0\nRDONLY 10 SPARSE \"b c.vmdk\"\n\0junk",
        );
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(
            d.extents,
            vec![
                ExtentLine {
                    kind: "FLAT".into(),
                    file: "/etc/shadow".into()
                },
                ExtentLine {
                    kind: "SPARSE".into(),
                    file: "b c.vmdk".into()
                },
            ]
        );
    }

    #[test]
    fn codec_carries_the_grain_size() {
        assert_eq!(zlib_codec(128) >> 8, 128);
        assert!(decode(2, &[], 0).is_err());
        assert!(decode(zlib_codec(128), &[], 65537).is_err());
    }
}
