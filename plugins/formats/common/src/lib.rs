//! What every disk-format parser shares. The parsers are plain Rust
//! libraries (no WIT, no wasm): the plugins wrap them, and they build
//! natively for unit tests and fuzz targets.

use std::fmt;

#[cfg(feature = "test-support")]
pub mod test_support;

/// Random-access reads of the source image. The plugin implements it over
/// the host's read-at handle; tests and fuzzers over a byte slice.
pub trait ReadAt {
    /// The source's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; a short source is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError>;
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(buf.len()));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.len() => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            _ => Err(FormatError::invalid(format!(
                "read of {} bytes at {offset} is past the end of the {}-byte file",
                buf.len(),
                self.len()
            ))),
        }
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        (**self).read_exact_at(offset, buf)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        self.as_slice().read_exact_at(offset, buf)
    }
}

/// Where one run of the virtual disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Reads as zeros.
    Zero,
    /// Stored as-is at this source offset.
    Data(u64),
    /// Stored compressed: `source_length` bytes at `source_offset`, decoded
    /// with `codec` (parser-defined) into the run's length.
    Compressed {
        source_offset: u64,
        source_length: u32,
        codec: u32,
    },
    /// Read from the backing image at the same virtual offset.
    Backing,
}

/// One run of the virtual disk: [offset, offset + length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub run: Run,
}

/// The category of a parser failure; maps 1:1 onto the WIT error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidInput,
    Unsupported,
    LimitExceeded,
    Io,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    pub kind: ErrorKind,
    pub message: String,
}

impl FormatError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        FormatError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for FormatError {}

/// Reads `len` bytes at `offset`, naming `what` when the range is not in
/// the file, so a table that points past the end is a clear error rather
/// than a short read.
pub fn read_range(
    src: &dyn ReadAt,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, FormatError> {
    if offset.checked_add(len).is_none_or(|e| e > src.size()) {
        return Err(FormatError::invalid(format!(
            "{what}: {len} bytes at offset {offset} are past the end of the {}-byte file",
            src.size()
        )));
    }
    let mut buf = vec![0u8; fits(len, what)?];
    src.read_exact_at(offset, &mut buf)?;
    Ok(buf)
}

/// A length from the file as a `usize`. Plugins run on wasm32, where a
/// u64 can exceed the address space: such a length is refused, never cut
/// to a smaller one that would read the wrong bytes.
pub fn fits(len: u64, what: &str) -> Result<usize, FormatError> {
    usize::try_from(len).map_err(|_| {
        FormatError::limit(format!(
            "{what}: {len} bytes do not fit in the plugin's memory"
        ))
    })
}

/// An index into a table already in memory. It saturates: a value past
/// `usize` can only be out of the table's bounds, so it must stay out of
/// them (and panic as any out-of-bounds index does) rather than wrap onto
/// another entry.
pub fn index(i: u64) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

/// Fixed-width integers at a byte offset of a header the caller has
/// already read in full (the slice bounds are the caller's check).
pub mod bytes {
    pub fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    pub fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    pub fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }
    pub fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    pub fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }
}

/// A disk format implemented natively. Each parser crate implements it for
/// its image type; the SDK turns any implementation into a converter
/// plugin, and [`check_walk`] fuzzes it.
pub trait Format: Sized + 'static {
    /// The format name probes answer and `open` expects, e.g. "vhdx".
    const NAME: &'static str;
    /// How sure the parser is that a file with this head and tail (up to
    /// 64 KiB each) is in its format, 0-100; None when it is not.
    fn probe(head: &[u8], tail: &[u8], file_size: u64) -> Option<u8>;
    /// Reads and checks the headers and tables.
    fn open(src: &dyn ReadAt) -> Result<Self, FormatError>;
    /// The virtual disk's size in bytes.
    fn virtual_size(&self) -> u64;
    /// The backing file name the image stores, if any.
    fn backing(&self) -> Option<&str> {
        None
    }
    /// Up to `max` extents covering the virtual disk from `offset`.
    fn map(&self, src: &dyn ReadAt, offset: u64, max: usize) -> Result<Vec<Extent>, FormatError>;
    /// Decodes one compressed run into exactly `length` bytes.
    fn decode(codec: u32, input: &[u8], length: u32) -> Result<Vec<u8>, FormatError> {
        let _ = input;
        Err(FormatError::invalid(format!(
            "{} images have no compressed extents (codec {codec}, {length} bytes)",
            Self::NAME
        )))
    }
}

/// Opens `data` as `F` and walks the whole map in bounded pages, asserting
/// the invariants the host relies on: extents contiguous, inside the
/// virtual disk, data and compressed runs inside the file, decodes of the
/// announced length. Panics on a violation; for fuzz targets and tests.
pub fn check_walk<F: Format>(data: &[u8]) {
    // Pages per input: enough for any image a fuzzer builds, and a bound
    // on the time one input may take.
    const MAX_PAGES: usize = 4096;
    const PAGE: usize = 64;
    // Compressed runs decoded per input: each may decode megabytes, and
    // the first few exercise the decoder as well as all of them would.
    const MAX_DECODES: usize = 8;
    let mut decodes = 0;
    let _ = F::probe(data, data, data.len() as u64);
    let size = data.len() as u64;
    let src = &data;
    let Ok(image) = F::open(src) else {
        return;
    };
    let virtual_size = image.virtual_size();
    let mut pos = 0u64;
    for _ in 0..MAX_PAGES {
        let Ok(page) = image.map(src, pos, PAGE) else {
            return;
        };
        if page.is_empty() {
            assert!(pos >= virtual_size, "map ended early at {pos}");
            return;
        }
        assert!(page.len() <= PAGE);
        for e in page {
            assert_eq!(e.offset, pos, "extents must be contiguous");
            assert!(e.length > 0);
            let end = e
                .offset
                .checked_add(e.length)
                .expect("extent end overflows");
            assert!(end <= virtual_size, "extent {e:?} past the virtual size");
            match e.run {
                Run::Data(at) => {
                    let data_end = at.checked_add(e.length);
                    assert!(
                        data_end.is_some_and(|x| x <= size),
                        "data run {e:?} past the end of the file"
                    );
                }
                Run::Compressed {
                    source_offset,
                    source_length,
                    codec,
                } => {
                    let data_end = source_offset.checked_add(u64::from(source_length));
                    assert!(
                        data_end.is_some_and(|x| x <= size),
                        "compressed run {e:?} past the end of the file"
                    );
                    if decodes < MAX_DECODES {
                        decodes += 1;
                        let start = index(source_offset);
                        let input = &data[start..start + index(source_length.into())];
                        let length = u32::try_from(e.length).expect("a compressed run's length");
                        if let Ok(out) = F::decode(codec, input, length) {
                            assert_eq!(out.len() as u64, e.length, "decode of {e:?}");
                        }
                    }
                }
                Run::Zero | Run::Backing => {}
            }
            pos = end;
        }
    }
}

/// Appends `e` to `out`, merging it into the previous extent when both are
/// zero runs, both backing runs, or contiguous data runs. Keeps maps short
/// for images with many small clusters.
pub fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.offset + last.length == e.offset {
            let merged = match (last.run, e.run) {
                (Run::Zero, Run::Zero) | (Run::Backing, Run::Backing) => true,
                (Run::Data(a), Run::Data(b)) => a.checked_add(last.length) == Some(b),
                _ => false,
            };
            if merged {
                last.length += e.length;
                return;
            }
        }
    }
    out.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_in_bounds_only() {
        let src: &[u8] = &[1, 2, 3, 4];
        let mut b = [0u8; 2];
        src.read_exact_at(2, &mut b).unwrap();
        assert_eq!(b, [3, 4]);
        assert!(src.read_exact_at(3, &mut b).is_err());
        assert!(src.read_exact_at(u64::MAX, &mut b).is_err());
    }

    #[test]
    fn merging() {
        let mut v = Vec::new();
        push_merged(
            &mut v,
            Extent {
                offset: 0,
                length: 10,
                run: Run::Data(100),
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 10,
                length: 10,
                run: Run::Data(110),
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 20,
                length: 10,
                run: Run::Data(500),
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 30,
                length: 5,
                run: Run::Zero,
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 35,
                length: 5,
                run: Run::Zero,
            },
        );
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].length, 20);
        assert_eq!(
            v[2],
            Extent {
                offset: 30,
                length: 10,
                run: Run::Zero
            }
        );
    }
}
