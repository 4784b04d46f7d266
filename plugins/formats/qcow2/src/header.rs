//! The qcow2 header: fixed fields of versions 2 and 3, checked before any
//! table is read.

use cocoon_format_common::bytes::{be32, be64};
use cocoon_format_common::{FormatError, ReadAt};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Header bytes of version 2 (version 3 images say their own length).
const V2_HEADER: u32 = 72;
/// The shortest version-3 header (up to refcount_order and header_length).
const V3_MIN_HEADER: u32 = 104;
/// qemu's limit on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits (version 3).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: refcounts may be stale (we never read them).
const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (RFC 1951), no zlib wrapper; qemu's default.
    Deflate,
    Zstd,
}

/// The checked header fields the reader needs.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// The virtual disk's size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub header_length: u32,
    pub compression: Compression,
    pub extended_l2: bool,
    /// Left set by a writer that crashed with lazy refcounts: the
    /// refcounts may be wrong, the mapping is not, so it is readable.
    pub dirty: bool,
    pub lazy_refcounts: bool,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of one L2 table (16-byte entries with extended L2).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    /// L1 entries the virtual size needs.
    pub fn l1_entries_needed(&self) -> u64 {
        let span = self.cluster_size() * self.l2_entries();
        self.size.div_ceil(span)
    }

    /// Reads and checks the header of `src`.
    pub fn read<R: ReadAt + ?Sized>(src: &R) -> Result<Self, FormatError> {
        let file = src.size();
        if file < V2_HEADER as u64 {
            return Err(FormatError::invalid(format!(
                "truncated header: the file has {file} bytes, a qcow2 header needs at least {V2_HEADER}"
            )));
        }
        let mut b = [0u8; V3_MIN_HEADER as usize + 8];
        let have = b.len().min(usize::try_from(file).unwrap_or(usize::MAX));
        src.read_exact_at(0, &mut b[..have])?;
        if b[..4] != MAGIC {
            return Err(FormatError::invalid(format!(
                "magic is {:02x?}, not qcow2's {MAGIC:02x?}",
                &b[..4]
            )));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::unsupported(format!(
                "header field version is {version}; only versions 2 and 3 are read"
            )));
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(FormatError::invalid(format!(
                "header field cluster_bits is {cluster_bits}, outside 9..=21 (512 B to 2 MiB clusters)"
            )));
        }
        let crypt_method = be32(&b, 32);
        if crypt_method != 0 {
            return Err(FormatError::unsupported(format!(
                "the image is encrypted (header field crypt_method is {crypt_method}); encrypted images are not read"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits,
            size: be64(&b, 24),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            incompatible_features: 0,
            compatible_features: 0,
            header_length: V2_HEADER,
            compression: Compression::Deflate,
            extended_l2: false,
            dirty: false,
            lazy_refcounts: false,
        };
        if version == 2 {
            return Ok(h);
        }
        if (have as u64) < V3_MIN_HEADER as u64 {
            return Err(FormatError::invalid(format!(
                "truncated header: the file has {file} bytes, a version 3 header needs at least {V3_MIN_HEADER}"
            )));
        }
        h.incompatible_features = be64(&b, 72);
        h.compatible_features = be64(&b, 80);
        let refcount_order = be32(&b, 96);
        h.header_length = be32(&b, 100);
        if h.header_length < V3_MIN_HEADER || h.header_length as u64 > h.cluster_size() {
            return Err(FormatError::invalid(format!(
                "header field header_length is {}, outside {V3_MIN_HEADER}..={}",
                h.header_length,
                h.cluster_size()
            )));
        }
        if h.header_length as u64 > file {
            return Err(FormatError::invalid(format!(
                "truncated header: header_length is {} but the file has {file} bytes",
                h.header_length
            )));
        }
        if refcount_order > 6 {
            return Err(FormatError::invalid(format!(
                "header field refcount_order is {refcount_order}, over 6"
            )));
        }
        let incompat = h.incompatible_features;
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(FormatError::unsupported(format!(
                "unknown incompatible feature bits {unknown:#x} (header field incompatible_features is {incompat:#x})"
            )));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(FormatError::unsupported(
                "the image keeps its data in an external data file (incompatible feature bit 2); external data files are not read",
            ));
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(FormatError::invalid(
                "the image is marked corrupt (incompatible feature bit 1); repair it with qemu-img check -r all first",
            ));
        }
        h.dirty = incompat & INCOMPAT_DIRTY != 0;
        h.lazy_refcounts = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
        h.extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
        if h.extended_l2 && cluster_bits < 14 {
            return Err(FormatError::invalid(format!(
                "extended L2 entries need clusters of at least 16 KiB; cluster_bits is {cluster_bits}"
            )));
        }
        let compression_type = if h.header_length > V3_MIN_HEADER {
            b[104]
        } else {
            0
        };
        if incompat & INCOMPAT_COMPRESSION == 0 && compression_type != 0 {
            return Err(FormatError::invalid(format!(
                "header field compression_type is {compression_type} but incompatible feature bit 3 is clear"
            )));
        }
        h.compression = match compression_type {
            0 => Compression::Deflate,
            1 => Compression::Zstd,
            other => {
                return Err(FormatError::unsupported(format!(
                    "header field compression_type is {other}; only 0 (zlib) and 1 (zstd) are read"
                )))
            }
        };
        Ok(h)
    }

    /// The backing file name, checked to lie inside the file and to be
    /// UTF-8. Whether the name is acceptable is the host's decision.
    pub fn read_backing_name<R: ReadAt + ?Sized>(
        &self,
        src: &R,
    ) -> Result<Option<String>, FormatError> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        let (off, len) = (self.backing_file_offset, self.backing_file_size);
        if len == 0 || len > MAX_BACKING_NAME {
            return Err(FormatError::invalid(format!(
                "header field backing_file_size is {len}, outside 1..={MAX_BACKING_NAME}"
            )));
        }
        let file = src.size();
        if off < self.header_length as u64
            || off
                .checked_add(len as u64)
                .is_none_or(|e| e > file.min(self.cluster_size()))
        {
            return Err(FormatError::invalid(format!(
                "backing file name at {off}+{len} is outside the header cluster of this {file}-byte file"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        src.read_exact_at(off, &mut buf)?;
        String::from_utf8(buf).map(Some).map_err(|_| {
            FormatError::invalid(format!("backing file name at {off}+{len} is not UTF-8"))
        })
    }
}
