//! VHDX: fixed and dynamic images, every block size.
//!
//! Layout: a file-type identifier (`vhdxfile`) at 0, two headers (64 KiB,
//! 128 KiB) of which the valid one with the higher sequence number wins, two
//! region-table copies (192 KiB, 256 KiB) locating the BAT and the metadata
//! region, then the log, metadata and payload blocks, all 1 MiB aligned.
//! The BAT interleaves one sector-bitmap entry after every `chunk_ratio`
//! payload entries; bitmaps only matter to differencing images, which are
//! refused (as qemu does on read).
//!
//! A non-empty log (a non-zero log GUID in the current header, and log
//! entries carrying that GUID) means the metadata may be stale until the log
//! is replayed. Replaying is not implemented: such images are refused with a
//! clear error. A non-zero GUID with no entries of its own (a writer opened
//! the file and crashed before logging anything) has nothing to replay and
//! is read, as qemu does.

use cocoon_format_common::bytes::{le16, le32, le64};
use cocoon_format_common::{index, push_merged, read_range, Extent, FormatError, ReadAt, Run};

pub const FORMAT: &str = "vhdx";

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: u64 = 4 * KIB;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_LEN: u64 = 64 * KIB;
/// The header section (identifier, headers, region tables) is the first
/// MiB; nothing else may live there.
const HEADER_SECTION: u64 = MIB;
const MAX_TABLE_ENTRIES: u32 = 2047;
/// Log entries start on 4 KiB boundaries of the log region.
const LOG_SECTOR: u64 = 4 * KIB;
/// Signature, checksum, lengths, sequence, counts and the log GUID.
const LOG_ENTRY_HEADER_LEN: u64 = 48;
/// The largest log scanned for entries (qemu and Hyper-V write 1 MiB).
const MAX_LOG_SCAN: u64 = 64 * MIB;
const METADATA_TABLE_LEN: u64 = 64 * KIB;
/// The largest virtual disk the specification allows: 64 TiB.
const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// How many blocks one `map` call looks at before returning what it has.
const SCAN_LIMIT: u64 = 1 << 16;
/// BAT entries read per table read.
const BAT_WINDOW: u64 = 4096;

// GUIDs as stored on disk (the first three fields little-endian).
const GUID_BAT: [u8; 16] = guid(
    0x2dc27766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
const GUID_METADATA: [u8; 16] = guid(
    0x8b7ca206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
const GUID_FILE_PARAMETERS: [u8; 16] = guid(
    0xcaa16737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const GUID_VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2fa54224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const GUID_VIRTUAL_DISK_ID: [u8; 16] = guid(
    0xbeca12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const GUID_LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const GUID_PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xcda348c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const GUID_PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d35f2d,
    0xb30b,
    0x454d,
    [0xab, 0xd3, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

fn fmt_guid(g: &[u8]) -> String {
    let a = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let b = u16::from_le_bytes([g[4], g[5]]);
    let c = u16::from_le_bytes([g[6], g[7]]);
    let d: String = g[8..10].iter().map(|x| format!("{x:02x}")).collect();
    let e: String = g[10..16].iter().map(|x| format!("{x:02x}")).collect();
    format!("{a:08x}-{b:04x}-{c:04x}-{d}-{e}")
}

// Payload block states (BAT entry bits 0..3).
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
/// Written by pre-1.0 (v0.95) implementations for unmapped blocks.
const PAYLOAD_UNMAPPED_V095: u64 = 5;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

/// Says whether `head` starts with the VHDX file-type identifier.
pub fn probe(head: &[u8]) -> Option<u8> {
    head.starts_with(SIGNATURE).then_some(100)
}

/// CRC-32C (Castagnoli), reflected, as the VHDX checksums use. Public for
/// tests and tools that build or patch images.
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i: u32 = 0;
        while i < 256 {
            let mut c = i;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i as usize] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Checks the CRC-32C at bytes 4..8 of `buf`, computed with that field
/// zeroed.
fn checksum_ok(buf: &[u8]) -> bool {
    let stored = le32(buf, 4);
    let mut copy = buf.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == stored
}

/// A region of the file: [offset, offset + length).
#[derive(Debug, Clone, Copy)]
struct Region {
    offset: u64,
    length: u64,
}

impl Region {
    fn overlaps(&self, offset: u64, length: u64) -> bool {
        offset < self.offset.saturating_add(self.length)
            && self.offset < offset.saturating_add(length)
    }
}

/// An opened VHDX image.
#[derive(Debug, Clone)]
pub struct Vhdx {
    virtual_size: u64,
    block_size: u64,
    chunk_ratio: u64,
    bat: Region,
    /// Metadata the payload blocks must not overlap: header section, log,
    /// BAT, metadata region.
    reserved: Vec<Region>,
    file_size: u64,
}

impl Vhdx {
    /// Reads and checks the headers, the region table and the metadata.
    pub fn open(src: &dyn ReadAt) -> Result<Vhdx, FormatError> {
        let file_size = src.size();
        let ident = read_range(src, 0, SIGNATURE.len() as u64, "VHDX file identifier")?;
        if ident != SIGNATURE {
            return Err(FormatError::invalid(
                "not a VHDX: no vhdxfile signature at offset 0",
            ));
        }

        // The current header: valid signature and checksum, highest sequence.
        let mut current: Option<Vec<u8>> = None;
        for off in HEADER_OFFSETS {
            let Ok(h) = read_range(src, off, HEADER_LEN, "VHDX header") else {
                continue;
            };
            if &h[..4] != b"head" || !checksum_ok(&h) {
                continue;
            }
            if current.as_ref().is_none_or(|c| le64(&h, 8) > le64(c, 8)) {
                current = Some(h);
            }
        }
        let Some(header) = current else {
            return Err(FormatError::invalid(
                "VHDX has no valid header (signature \"head\" and CRC-32C) at 64 KiB or 128 KiB",
            ));
        };
        let version = le16(&header, 66);
        if version != 1 {
            return Err(FormatError::unsupported(format!(
                "VHDX header version {version} (1 is read)"
            )));
        }
        let log = Region {
            offset: le64(&header, 72),
            length: u64::from(le32(&header, 68)),
        };
        let log_guid = &header[48..64];
        if log_guid.iter().any(|&b| b != 0) && log_has_entries(src, log, log_guid)? {
            return Err(FormatError::unsupported(format!(
                "VHDX log is not empty (log GUID {} has entries): replaying the log is not \
                 supported; open the image read-write once in Hyper-V or QEMU to replay it",
                fmt_guid(log_guid)
            )));
        }

        // The region table: the first copy with a valid checksum.
        let mut table = None;
        for off in REGION_TABLE_OFFSETS {
            let Ok(t) = read_range(src, off, REGION_TABLE_LEN, "VHDX region table") else {
                continue;
            };
            if &t[..4] == b"regi" && checksum_ok(&t) {
                table = Some(t);
                break;
            }
        }
        let Some(table) = table else {
            return Err(FormatError::invalid(
                "VHDX has no valid region table (signature \"regi\" and CRC-32C) at 192 KiB or 256 KiB",
            ));
        };
        let entries = le32(&table, 8);
        if entries > MAX_TABLE_ENTRIES {
            return Err(FormatError::invalid(format!(
                "VHDX region table EntryCount {entries} is over {MAX_TABLE_ENTRIES}"
            )));
        }
        let (mut bat, mut metadata) = (None, None);
        for i in 0..entries as usize {
            let e = &table[16 + i * 32..16 + (i + 1) * 32];
            let region = Region {
                offset: le64(e, 16),
                length: u64::from(le32(e, 24)),
            };
            let required = le32(e, 28) & 1 != 0;
            let id = &e[..16];
            let slot = if id == GUID_BAT {
                &mut bat
            } else if id == GUID_METADATA {
                &mut metadata
            } else if required {
                return Err(FormatError::unsupported(format!(
                    "VHDX requires unknown region {}",
                    fmt_guid(id)
                )));
            } else {
                continue;
            };
            if region.offset < HEADER_SECTION
                || region
                    .offset
                    .checked_add(region.length)
                    .is_none_or(|e| e > file_size)
            {
                return Err(FormatError::invalid(format!(
                    "VHDX region {} at offset {} length {} is not inside the file after the \
                     header section ({file_size} bytes)",
                    fmt_guid(id),
                    region.offset,
                    region.length
                )));
            }
            if slot.replace(region).is_some() {
                return Err(FormatError::invalid(format!(
                    "VHDX region table lists region {} twice",
                    fmt_guid(id)
                )));
            }
        }
        let (Some(bat), Some(metadata)) = (bat, metadata) else {
            return Err(FormatError::invalid(
                "VHDX region table lacks the BAT or the metadata region",
            ));
        };

        let meta = Metadata::read(src, metadata)?;
        if meta.has_parent {
            return Err(FormatError::unsupported(
                "differencing VHDX images (file parameters HasParent) are not supported",
            ));
        }
        let block_size = u64::from(meta.block_size);
        if !meta.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(FormatError::invalid(format!(
                "VHDX BlockSize {} is not a power of two from 1 MiB to 256 MiB",
                meta.block_size
            )));
        }
        let sector = u64::from(meta.logical_sector_size);
        if sector != 512 && sector != 4096 {
            return Err(FormatError::invalid(format!(
                "VHDX LogicalSectorSize {sector} (512 or 4096)"
            )));
        }
        if meta.virtual_size > MAX_VIRTUAL_SIZE || meta.virtual_size % sector != 0 {
            return Err(FormatError::invalid(format!(
                "VHDX VirtualDiskSize {} is over 64 TiB or not a multiple of the {sector}-byte sector",
                meta.virtual_size
            )));
        }
        // Payload blocks per sector-bitmap block: 2^23 sectors' worth.
        let chunk_ratio = ((1u64 << 23) * sector) / block_size;
        let data_blocks = meta.virtual_size.div_ceil(block_size);
        let bat_entries = if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        // The BAT lies in the file (checked above), which bounds the table
        // whatever virtual size the metadata claims.
        if bat_entries * 8 > bat.length {
            return Err(FormatError::invalid(format!(
                "VHDX BAT region of {} bytes cannot hold the {bat_entries} entries a {}-byte disk \
                 with {block_size}-byte blocks needs",
                bat.length, meta.virtual_size
            )));
        }
        Ok(Vhdx {
            virtual_size: meta.virtual_size,
            block_size,
            chunk_ratio,
            bat,
            reserved: vec![
                Region {
                    offset: 0,
                    length: HEADER_SECTION,
                },
                log,
                bat,
                metadata,
            ],
            file_size,
        })
    }

    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Reads BAT entries [first, first + count).
    fn bat_window(
        &self,
        src: &dyn ReadAt,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, FormatError> {
        let raw = read_range(src, self.bat.offset + first * 8, count * 8, "VHDX BAT")?;
        Ok(raw.chunks_exact(8).map(|c| le64(c, 0)).collect())
    }

    /// Where payload block `block` comes from, for the part from `pos` on.
    fn block_run(&self, block: u64, entry: u64, pos: u64, end: u64) -> Result<Run, FormatError> {
        let state = entry & 7;
        match state {
            PAYLOAD_NOT_PRESENT
            | PAYLOAD_UNDEFINED
            | PAYLOAD_ZERO
            | PAYLOAD_UNMAPPED
            | PAYLOAD_UNMAPPED_V095 => Ok(Run::Zero),
            PAYLOAD_FULLY_PRESENT => {
                let start = block * self.block_size;
                // FileOffsetMB: bits 20..64.
                let off = (entry >> 20) * MIB;
                let used = end - start;
                if let Some(r) = self.reserved.iter().find(|r| r.overlaps(off, used)) {
                    return Err(FormatError::invalid(format!(
                        "VHDX BAT entry for block {block} points at offset {off}, into metadata \
                         at {}..{}",
                        r.offset,
                        r.offset + r.length
                    )));
                }
                if off.checked_add(used).is_none_or(|e| e > self.file_size) {
                    return Err(FormatError::invalid(format!(
                        "VHDX block {block} at offset {off} ends past the end of the {}-byte file",
                        self.file_size
                    )));
                }
                Ok(Run::Data(off + (pos - start)))
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(FormatError::invalid(format!(
                "VHDX block {block} is partially present, which only differencing images may be"
            ))),
            _ => Err(FormatError::invalid(format!(
                "VHDX BAT entry for block {block} has unknown state {state}"
            ))),
        }
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
        // (first BAT index, entries)
        let mut window: (u64, Vec<u64>) = (0, Vec::new());
        let mut scanned = 0;
        let bat_entries = self.bat.length / 8;
        while pos < self.virtual_size && max > 0 && scanned < SCAN_LIMIT {
            scanned += 1;
            let block = pos / self.block_size;
            // One sector-bitmap entry follows every chunk_ratio payload
            // entries.
            let index = block + block / self.chunk_ratio;
            if index < window.0 || index >= window.0 + window.1.len() as u64 {
                let count = BAT_WINDOW.min(bat_entries - index);
                window = (index, self.bat_window(src, index, count)?);
            }
            let entry = window.1[self::index(index - window.0)];
            let end = ((block + 1) * self.block_size).min(self.virtual_size);
            let run = self.block_run(block, entry, pos, end)?;
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

/// Whether the log region holds an entry header of the log `guid`. Entries
/// are 4 KiB aligned; an entry of the current GUID means updates that may
/// not be in the metadata yet. Only signatures and GUIDs are compared
/// (not checksums): an entry that looks current is refused, never ignored.
fn log_has_entries(src: &dyn ReadAt, log: Region, guid: &[u8]) -> Result<bool, FormatError> {
    if log.offset < HEADER_SECTION
        || log
            .offset
            .checked_add(log.length)
            .is_none_or(|e| e > src.size())
    {
        return Err(FormatError::invalid(format!(
            "VHDX log at offset {} length {} is not inside the file after the header section",
            log.offset, log.length
        )));
    }
    if log.length > MAX_LOG_SCAN {
        return Err(FormatError::unsupported(format!(
            "VHDX log of {} bytes with a non-zero GUID is over the {MAX_LOG_SCAN}-byte scan limit",
            log.length
        )));
    }
    for at in (0..log.length / LOG_SECTOR).map(|i| log.offset + i * LOG_SECTOR) {
        let h = read_range(src, at, LOG_ENTRY_HEADER_LEN, "VHDX log entry")?;
        if &h[..4] == b"loge" && &h[32..48] == guid {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The metadata items this parser needs.
struct Metadata {
    block_size: u32,
    has_parent: bool,
    virtual_size: u64,
    logical_sector_size: u32,
}

impl Metadata {
    fn read(src: &dyn ReadAt, region: Region) -> Result<Metadata, FormatError> {
        if region.length < METADATA_TABLE_LEN {
            return Err(FormatError::invalid(format!(
                "VHDX metadata region of {} bytes is smaller than its 64 KiB table",
                region.length
            )));
        }
        let t = read_range(
            src,
            region.offset,
            METADATA_TABLE_LEN,
            "VHDX metadata table",
        )?;
        if &t[..8] != b"metadata" {
            return Err(FormatError::invalid(
                "VHDX metadata table has no \"metadata\" signature",
            ));
        }
        let count = le16(&t, 10);
        if u32::from(count) > MAX_TABLE_ENTRIES {
            return Err(FormatError::invalid(format!(
                "VHDX metadata EntryCount {count} is over {MAX_TABLE_ENTRIES}"
            )));
        }
        let (mut params, mut size, mut sector) = (None, None, None);
        for i in 0..count as usize {
            let e = &t[32 + i * 32..32 + (i + 1) * 32];
            let id = &e[..16];
            let offset = u64::from(le32(e, 16));
            let length = u64::from(le32(e, 20));
            let required = le32(e, 24) & 4 != 0;
            let want = if id == GUID_FILE_PARAMETERS {
                Some((&mut params, 8))
            } else if id == GUID_VIRTUAL_DISK_SIZE {
                Some((&mut size, 8))
            } else if id == GUID_LOGICAL_SECTOR_SIZE {
                Some((&mut sector, 4))
            } else if id == GUID_VIRTUAL_DISK_ID
                || id == GUID_PHYSICAL_SECTOR_SIZE
                || id == GUID_PARENT_LOCATOR
            {
                None
            } else if required {
                return Err(FormatError::unsupported(format!(
                    "VHDX requires unknown metadata item {}",
                    fmt_guid(id)
                )));
            } else {
                None
            };
            let Some((slot, len)) = want else { continue };
            if length < len
                || offset < METADATA_TABLE_LEN
                || offset.checked_add(len).is_none_or(|e| e > region.length)
            {
                return Err(FormatError::invalid(format!(
                    "VHDX metadata item {} at offset {offset} length {length} is outside the \
                     {}-byte metadata region",
                    fmt_guid(id),
                    region.length
                )));
            }
            *slot = Some(read_range(
                src,
                region.offset + offset,
                len,
                "VHDX metadata item",
            )?);
        }
        let (Some(params), Some(size), Some(sector)) = (params, size, sector) else {
            return Err(FormatError::invalid(
                "VHDX metadata lacks file parameters, virtual disk size or logical sector size",
            ));
        };
        Ok(Metadata {
            block_size: le32(&params, 0),
            has_parent: le32(&params, 4) & 2 != 0,
            virtual_size: le64(&size, 0),
            logical_sector_size: le32(&sector, 0),
        })
    }
}

impl cocoon_format_common::Format for Vhdx {
    const NAME: &'static str = FORMAT;

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<u8> {
        probe(head)
    }

    fn open(src: &dyn ReadAt) -> Result<Self, FormatError> {
        Vhdx::open(src)
    }

    fn virtual_size(&self) -> u64 {
        Vhdx::virtual_size(self)
    }

    fn map(&self, src: &dyn ReadAt, offset: u64, max: usize) -> Result<Vec<Extent>, FormatError> {
        Vhdx::map(self, src, offset, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text() {
        assert_eq!(fmt_guid(&GUID_BAT), "2dc27766-f623-4200-9d64-115e9bfd4a08");
    }
}
