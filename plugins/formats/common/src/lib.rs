//! What every disk-format parser shares. The parsers are plain Rust
//! libraries (no WIT, no wasm): the plugins wrap them, and they build
//! natively for unit tests and fuzz targets.

use std::fmt;

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
