//! VDI (VirtualBox): static and dynamic images, version 1.1.
//!
//! A 64-byte text banner (`<<< ... >>>`), then at 0x40 the signature
//! 0xbeda107f and the header: the block map offset, the data offset, the
//! disk size, the block size and count. The block map has one little-endian
//! u32 per virtual block: the index of the block in the data area, or
//! 0xffffffff (never written) / 0xfffffffe (discarded), both read as zeros.
//! Differencing images (a parent UUID) are refused.

use cocoon_format_common::bytes::{le32, le64};
use cocoon_format_common::{index, push_merged, read_range, Extent, FormatError, ReadAt, Run};

pub const FORMAT: &str = "vdi";

const SECTOR: u64 = 512;
const HEADER_LEN: u64 = 512;
const SIGNATURE: u32 = 0xbeda_107f;
const SIGNATURE_OFFSET: usize = 0x40;
const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// Block-map entries at or above this are unallocated (0xffffffff) or
/// discarded (0xfffffffe).
const FIRST_UNALLOCATED: u32 = 0xffff_fffe;
/// Largest block accepted: 256 MiB (VirtualBox and qemu use 1 MiB).
const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// How many blocks one `map` call looks at before returning what it has.
const SCAN_LIMIT: u64 = 1 << 16;
/// Block-map entries read per table read.
const BMAP_WINDOW: u64 = 8192;

/// Says whether `head` is a VDI: the signature at 0x40; the `<<<` banner
/// raises the confidence.
pub fn probe(head: &[u8]) -> Option<u8> {
    if head.len() < SIGNATURE_OFFSET + 4 || le32(head, SIGNATURE_OFFSET) != SIGNATURE {
        return None;
    }
    Some(if head.starts_with(b"<<< ") { 100 } else { 60 })
}

/// An opened VDI image.
#[derive(Debug, Clone)]
pub struct Vdi {
    virtual_size: u64,
    block_size: u64,
    /// Bytes before each block's data in the data area.
    block_extra: u64,
    bmap_offset: u64,
    data_offset: u64,
    blocks: u64,
    file_size: u64,
}

impl Vdi {
    /// Reads and checks the header.
    pub fn open(src: &dyn ReadAt) -> Result<Vdi, FormatError> {
        let file_size = src.size();
        if file_size < HEADER_LEN {
            return Err(FormatError::invalid(format!(
                "VDI truncated: the file has {file_size} bytes, the header needs {HEADER_LEN}"
            )));
        }
        let h = read_range(src, 0, HEADER_LEN, "VDI header")?;
        let signature = le32(&h, SIGNATURE_OFFSET);
        if signature != SIGNATURE {
            return Err(FormatError::invalid(format!(
                "not a VDI: signature {signature:#010x} at 0x40, expected {SIGNATURE:#010x}"
            )));
        }
        let version = le32(&h, 0x44);
        if version != VERSION_1_1 {
            return Err(FormatError::unsupported(format!(
                "VDI version {}.{} (1.1 is read)",
                version >> 16,
                version & 0xffff
            )));
        }
        let image_type = le32(&h, 0x4c);
        if image_type != TYPE_DYNAMIC && image_type != TYPE_STATIC {
            return Err(FormatError::unsupported(format!(
                "VDI image type {image_type} (1 dynamic and 2 static are read)"
            )));
        }
        let bmap_offset = u64::from(le32(&h, 0x154));
        let data_offset = u64::from(le32(&h, 0x158));
        let sector_size = le32(&h, 0x168);
        let disk_size = le64(&h, 0x170);
        let block_size = u64::from(le32(&h, 0x178));
        let block_extra = u64::from(le32(&h, 0x17c));
        let blocks = u64::from(le32(&h, 0x180));
        if h[0x1b8..0x1c8].iter().any(|&b| b != 0) {
            return Err(FormatError::unsupported(
                "differencing VDI images (non-null parent UUID) are not supported",
            ));
        }
        if u64::from(sector_size) != SECTOR {
            return Err(FormatError::unsupported(format!(
                "VDI sector size {sector_size} (512 is read)"
            )));
        }
        if !block_size.is_power_of_two() || !(SECTOR..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(FormatError::invalid(format!(
                "VDI block size {block_size} is not a power of two from 512 to {MAX_BLOCK_SIZE}"
            )));
        }
        if block_extra % SECTOR != 0 || block_extra > MAX_BLOCK_SIZE {
            return Err(FormatError::invalid(format!(
                "VDI block extra {block_extra} is not a multiple of 512 up to {MAX_BLOCK_SIZE}"
            )));
        }
        if bmap_offset % SECTOR != 0 || data_offset % SECTOR != 0 {
            return Err(FormatError::invalid(format!(
                "VDI block map offset {bmap_offset} or data offset {data_offset} is not \
                 sector aligned"
            )));
        }
        // Old qemu versions wrote sizes that were not whole sectors; qemu
        // rounds them up, so do the same.
        let Some(virtual_size) = disk_size.checked_next_multiple_of(SECTOR) else {
            return Err(FormatError::invalid(format!(
                "VDI disk size {disk_size} overflows"
            )));
        };
        if blocks * block_size < virtual_size {
            return Err(FormatError::invalid(format!(
                "VDI disk size {disk_size} needs more than its {blocks} blocks of {block_size} bytes"
            )));
        }
        // The block map lies in the file: bounds the table by the file size.
        let bmap_len = blocks * 4;
        if bmap_offset < HEADER_LEN || bmap_offset + bmap_len > file_size {
            return Err(FormatError::invalid(format!(
                "VDI block map of {blocks} entries at offset {bmap_offset} is not inside the \
                 {file_size}-byte file after the header"
            )));
        }
        // The data area follows the header and the block map, so no block
        // can overlap them.
        if data_offset < bmap_offset + bmap_len {
            return Err(FormatError::invalid(format!(
                "VDI data offset {data_offset} is before the end of the block map \
                 ({bmap_offset}..{})",
                bmap_offset + bmap_len
            )));
        }
        Ok(Vdi {
            virtual_size,
            block_size,
            block_extra,
            bmap_offset,
            data_offset,
            blocks,
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
        let mut out = Vec::new();
        let mut pos = offset;
        let mut window: (u64, Vec<u32>) = (0, Vec::new());
        let mut scanned = 0;
        while pos < self.virtual_size && max > 0 && scanned < SCAN_LIMIT {
            scanned += 1;
            let block = pos / self.block_size;
            if block < window.0 || block >= window.0 + window.1.len() as u64 {
                let count = BMAP_WINDOW.min(self.blocks - block);
                let raw = read_range(
                    src,
                    self.bmap_offset + block * 4,
                    count * 4,
                    "VDI block map",
                )?;
                window = (block, raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
            }
            let entry = window.1[index(block - window.0)];
            let start = block * self.block_size;
            let end = (start + self.block_size).min(self.virtual_size);
            let run = if entry >= FIRST_UNALLOCATED {
                Run::Zero
            } else {
                let off = self.data_offset
                    + u64::from(entry) * (self.block_size + self.block_extra)
                    + self.block_extra;
                if off + (end - start) > self.file_size {
                    return Err(FormatError::invalid(format!(
                        "VDI block {block} (data block {entry}, offset {off}) ends past the end \
                         of the {}-byte file",
                        self.file_size
                    )));
                }
                Run::Data(off + (pos - start))
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

impl cocoon_format_common::Format for Vdi {
    const NAME: &'static str = FORMAT;

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<u8> {
        probe(head)
    }

    fn open(src: &dyn ReadAt) -> Result<Self, FormatError> {
        Vdi::open(src)
    }

    fn virtual_size(&self) -> u64 {
        Vdi::virtual_size(self)
    }

    fn map(&self, src: &dyn ReadAt, offset: u64, max: usize) -> Result<Vec<Extent>, FormatError> {
        Vdi::map(self, src, offset, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_needs_the_signature() {
        let mut head = vec![0u8; 512];
        assert_eq!(probe(&head), None);
        head[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
        assert_eq!(probe(&head), Some(60));
        head[..4].copy_from_slice(b"<<< ");
        assert_eq!(probe(&head), Some(100));
        assert_eq!(probe(&head[..0x42]), None);
    }
}
