//! VHD (qemu's "vpc"): fixed and dynamic disks.
//!
//! Every VHD ends with a 512-byte big-endian footer (`conectix`). A fixed
//! disk is its data followed by the footer. A dynamic disk keeps a copy of
//! the footer at offset 0, a dynamic header (`cxsparse`) locating the block
//! allocation table (BAT), and blocks made of a sector bitmap followed by
//! the block's data. A sector whose bitmap bit is clear was never written
//! and reads as zeros.
//!
//! The virtual size is the footer's current size, rounded down to whole
//! sectors: what qemu does with `force_size` and for every image whose
//! creator writes an exact size. qemu sizes images from older creators
//! ("vpc ", "qemu") by their CHS geometry instead, which is never larger;
//! qemu-img itself writes a current size equal to the CHS size there.
//! Differencing disks are refused.

use cocoon_format_common::bytes::{be32, be64};
use cocoon_format_common::{index, push_merged, read_range, Extent, FormatError, ReadAt, Run};

pub const FORMAT: &str = "vpc";

const SECTOR: u64 = 512;
const FOOTER_LEN: u64 = 512;
const DYNAMIC_HEADER_LEN: u64 = 1024;
const COOKIE: &[u8; 8] = b"conectix";
const DYNAMIC_COOKIE: &[u8; 8] = b"cxsparse";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const UNALLOCATED: u32 = u32::MAX;
/// Largest block accepted: 256 MiB (the default is 2 MiB); its bitmap is
/// then 64 KiB.
const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// How many blocks one `map` call looks at before returning what it has.
const SCAN_LIMIT: u64 = 1 << 16;
/// BAT entries read per table read.
const BAT_WINDOW: u64 = 8192;

/// Says whether a file is a VHD: the footer cookie in the last 512 bytes
/// (every VHD), or its copy at 0 (dynamic disks).
///
/// Certainty (100) takes the footer's own rules: a dynamic disk's copy at
/// 0, or a footer whose checksum holds and that describes a fixed disk
/// fitting in the file. A cookie with a bad checksum or an impossible size
/// is a weak sign (50): likely guest data of some other image that happens
/// to end that way.
pub fn probe(head: &[u8], tail: &[u8], file_size: u64) -> Option<u8> {
    if head.starts_with(COOKIE) {
        return Some(100);
    }
    let footer = tail.get(tail.len().checked_sub(usize::try_from(FOOTER_LEN).ok()?)?..)?;
    if !footer.starts_with(COOKIE) {
        return None;
    }
    let valid = be32(footer, 64) == checksum(footer, 64);
    let fits = match be32(footer, 60) {
        TYPE_FIXED => be64(footer, 48) <= file_size.saturating_sub(FOOTER_LEN),
        _ => true,
    };
    Some(if valid && fits { 100 } else { 50 })
}

/// The VHD checksum: the ones' complement of the byte sum, with the
/// checksum field (at `field`) counted as zero.
fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

/// A valid footer at `offset`, or why not.
fn footer_at(src: &dyn ReadAt, offset: u64) -> Result<Vec<u8>, String> {
    let f = read_range(src, offset, FOOTER_LEN, "VHD footer").map_err(|e| e.message)?;
    if &f[..8] != COOKIE {
        return Err(format!("no conectix cookie at offset {offset}"));
    }
    let (stored, computed) = (be32(&f, 64), checksum(&f, 64));
    if stored != computed {
        return Err(format!(
            "footer at offset {offset} has checksum {stored:#010x}, computed {computed:#010x}"
        ));
    }
    Ok(f)
}

#[derive(Debug, Clone)]
enum Layout {
    Fixed,
    Dynamic {
        bat_offset: u64,
        block_size: u64,
        /// Bytes of sector bitmap before each block's data.
        bitmap_len: u64,
        /// Metadata ranges a block must not overlap: the footer copy, the
        /// dynamic header, the BAT.
        reserved: [(u64, u64); 3],
    },
}

/// An opened VHD.
#[derive(Debug, Clone)]
pub struct Vpc {
    virtual_size: u64,
    layout: Layout,
    file_size: u64,
}

impl Vpc {
    /// Reads and checks the footer and, for dynamic disks, the dynamic
    /// header.
    pub fn open(src: &dyn ReadAt) -> Result<Vpc, FormatError> {
        let file_size = src.size();
        let Some(end_offset) = file_size.checked_sub(FOOTER_LEN) else {
            return Err(FormatError::invalid(format!(
                "VHD truncated: the file has {file_size} bytes, a footer needs 512"
            )));
        };
        // The footer at the end is authoritative; a dynamic disk's copy at 0
        // stands in when the end is damaged.
        let (footer, footer_at_end) = match footer_at(src, end_offset) {
            Ok(f) => (f, true),
            Err(end_err) => match footer_at(src, 0) {
                Ok(f) => (f, false),
                Err(head_err) => {
                    return Err(FormatError::invalid(format!(
                        "VHD has no valid footer: {end_err}; {head_err}"
                    )))
                }
            },
        };
        let disk_type = be32(&footer, 60);
        let current_size = be64(&footer, 48);
        let virtual_size = current_size - current_size % SECTOR;
        match disk_type {
            TYPE_FIXED => {
                if !footer_at_end {
                    return Err(FormatError::invalid(
                        "fixed VHD has no valid footer at the end of the file",
                    ));
                }
                if virtual_size > end_offset {
                    return Err(FormatError::invalid(format!(
                        "fixed VHD current size {current_size} is larger than the {end_offset} \
                         data bytes before the footer"
                    )));
                }
                Ok(Vpc {
                    virtual_size,
                    layout: Layout::Fixed,
                    file_size,
                })
            }
            TYPE_DYNAMIC => Self::open_dynamic(src, &footer, virtual_size),
            TYPE_DIFFERENCING => Err(FormatError::unsupported(
                "differencing VHD (disk type 4) is not supported",
            )),
            other => Err(FormatError::invalid(format!(
                "VHD disk type {other} is unknown (2 fixed, 3 dynamic, 4 differencing)"
            ))),
        }
    }

    fn open_dynamic(
        src: &dyn ReadAt,
        footer: &[u8],
        virtual_size: u64,
    ) -> Result<Vpc, FormatError> {
        let file_size = src.size();
        let header_offset = be64(footer, 16);
        if header_offset < FOOTER_LEN {
            return Err(FormatError::invalid(format!(
                "VHD data offset {header_offset} points into the footer copy"
            )));
        }
        let h = read_range(src, header_offset, DYNAMIC_HEADER_LEN, "VHD dynamic header")?;
        if &h[..8] != DYNAMIC_COOKIE {
            return Err(FormatError::invalid(format!(
                "VHD dynamic header at offset {header_offset} has no cxsparse cookie"
            )));
        }
        let (stored, computed) = (be32(&h, 36), checksum(&h, 36));
        if stored != computed {
            return Err(FormatError::invalid(format!(
                "VHD dynamic header checksum {stored:#010x}, computed {computed:#010x}"
            )));
        }
        let bat_offset = be64(&h, 16);
        let max_entries = u64::from(be32(&h, 28));
        let block_size = u64::from(be32(&h, 32));
        if !block_size.is_power_of_two() || !(SECTOR..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(FormatError::invalid(format!(
                "VHD block size {block_size} is not a power of two from 512 to {MAX_BLOCK_SIZE}"
            )));
        }
        let blocks = virtual_size.div_ceil(block_size);
        if blocks > max_entries {
            return Err(FormatError::invalid(format!(
                "VHD BAT has {max_entries} entries, a {virtual_size}-byte disk of \
                 {block_size}-byte blocks needs {blocks}"
            )));
        }
        // The BAT must lie in the file: that bounds the table by the file
        // size whatever the footer claims.
        let bat_len = blocks * 4;
        if bat_offset < FOOTER_LEN
            || bat_offset
                .checked_add(bat_len)
                .is_none_or(|e| e > file_size)
        {
            return Err(FormatError::invalid(format!(
                "VHD BAT of {blocks} entries at offset {bat_offset} is not inside the \
                 {file_size}-byte file"
            )));
        }
        // One bit per sector, padded to whole sectors.
        let bitmap_len = (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
        Ok(Vpc {
            virtual_size,
            layout: Layout::Dynamic {
                bat_offset,
                block_size,
                bitmap_len,
                reserved: [
                    (0, FOOTER_LEN),
                    (header_offset, DYNAMIC_HEADER_LEN),
                    (bat_offset, max_entries * 4),
                ],
            },
            file_size,
        })
    }

    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Up to `max` extents covering the virtual disk from `offset`, in
    /// order. Empty at or past the end.
    pub fn map(
        &self,
        src: &dyn ReadAt,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Extent>, FormatError> {
        if offset >= self.virtual_size || max == 0 {
            return Ok(Vec::new());
        }
        let Layout::Dynamic {
            bat_offset,
            block_size,
            bitmap_len,
            reserved,
        } = &self.layout
        else {
            return Ok(vec![Extent {
                offset,
                length: self.virtual_size - offset,
                run: Run::Data(offset),
            }]);
        };
        let (bat_offset, block_size, bitmap_len) = (*bat_offset, *block_size, *bitmap_len);
        let blocks = self.virtual_size.div_ceil(block_size);
        let mut out = Vec::new();
        let mut pos = offset;
        let mut window: (u64, Vec<u32>) = (0, Vec::new());
        let mut scanned = 0;
        'blocks: while pos < self.virtual_size && scanned < SCAN_LIMIT {
            scanned += 1;
            let block = pos / block_size;
            if block < window.0 || block >= window.0 + window.1.len() as u64 {
                let count = BAT_WINDOW.min(blocks - block);
                let raw = read_range(src, bat_offset + block * 4, count * 4, "VHD BAT")?;
                window = (block, raw.chunks_exact(4).map(|c| be32(c, 0)).collect());
            }
            let entry = window.1[index(block - window.0)];
            let start = block * block_size;
            let end = (start + block_size).min(self.virtual_size);
            if entry == UNALLOCATED {
                push_merged(
                    &mut out,
                    Extent {
                        offset: pos,
                        length: end - pos,
                        run: Run::Zero,
                    },
                );
                if out.len() > max {
                    out.pop();
                    break;
                }
                pos = end;
                continue;
            }
            let block_offset = u64::from(entry) * SECTOR;
            let data = block_offset + bitmap_len;
            let used = bitmap_len + (end - start);
            if let Some((r, len)) = reserved
                .iter()
                .find(|(r, len)| block_offset < r + len && *r < block_offset + used)
            {
                return Err(FormatError::invalid(format!(
                    "VHD BAT entry {block} (sector {entry}) overlaps metadata at {r}..{}",
                    r + len
                )));
            }
            if block_offset + used > self.file_size {
                return Err(FormatError::invalid(format!(
                    "VHD block {block} at offset {block_offset} ends past the end of the {}-byte file",
                    self.file_size
                )));
            }
            let bitmap = read_range(src, block_offset, bitmap_len, "VHD sector bitmap")?;
            // Sector by sector (bit 7 of byte 0 is the block's first
            // sector); push_merged joins neighbours into long runs.
            while pos < end {
                let s = (pos - start) / SECTOR;
                let present = bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
                let sector_end = (start + (s + 1) * SECTOR).min(end);
                let run = if present {
                    Run::Data(data + (pos - start))
                } else {
                    Run::Zero
                };
                push_merged(
                    &mut out,
                    Extent {
                        offset: pos,
                        length: sector_end - pos,
                        run,
                    },
                );
                if out.len() > max {
                    out.pop();
                    break 'blocks;
                }
                pos = sector_end;
            }
        }
        Ok(out)
    }
}

impl cocoon_format_common::Format for Vpc {
    const NAME: &'static str = FORMAT;

    fn probe(head: &[u8], tail: &[u8], file_size: u64) -> Option<u8> {
        probe(head, tail, file_size)
    }

    fn open(src: &dyn ReadAt) -> Result<Self, FormatError> {
        Vpc::open(src)
    }

    fn virtual_size(&self) -> u64 {
        Vpc::virtual_size(self)
    }

    fn map(&self, src: &dyn ReadAt, offset: u64, max: usize) -> Result<Vec<Extent>, FormatError> {
        Vpc::map(self, src, offset, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_skips_its_field() {
        let mut b = [1u8; 16];
        b[4..8].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(checksum(&b, 4), !12u32);
    }

    #[test]
    fn probe_weighs_the_footer_by_its_own_rules() {
        // A fixed disk of 1 MiB: the footer's checksum holds and its size
        // fits the file.
        let file_size = (1 << 20) + 512;
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(COOKIE);
        footer[48..56].copy_from_slice(&(1u64 << 20).to_be_bytes());
        footer[60..64].copy_from_slice(&TYPE_FIXED.to_be_bytes());
        let sum = checksum(&footer, 64);
        footer[64..68].copy_from_slice(&sum.to_be_bytes());
        let mut tail = vec![0u8; 512];
        tail.extend_from_slice(&footer);
        assert_eq!(probe(&[], &tail, file_size), Some(100));
        // The same footer claiming more than the file holds.
        assert_eq!(probe(&[], &tail, 4096), Some(50));
        // A bad checksum.
        let mut bad = tail.clone();
        bad[512 + 48] ^= 1;
        assert_eq!(probe(&[], &bad, file_size), Some(50));
        // A dynamic disk's copy at the start.
        assert_eq!(probe(COOKIE, &[], 0), Some(100));
        assert_eq!(probe(b"nothing", &tail[..512], file_size), None);
        assert_eq!(probe(b"", b"short", 5), None);
    }
}
