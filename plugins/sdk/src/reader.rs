//! The host's read-at source as `std::io::Read + Seek`, so parsers written
//! against the standard traits run unchanged inside a plugin.

use std::io::{self, Read, Seek, SeekFrom};

use crate::format_converter::{max_read, Error, Source};

/// A cursor over a host [`Source`]. Each `read` is one host call of at most
/// the host's `max-read` bytes.
pub struct SourceReader {
    src: Source,
    pos: u64,
    size: u64,
    max: usize,
}

impl SourceReader {
    /// A reader positioned at the start of `src`.
    pub fn new(src: Source) -> Self {
        let size = src.size();
        SourceReader {
            src,
            pos: 0,
            size,
            max: max_read().max(1) as usize,
        }
    }

    /// The source's size in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the source is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The underlying source.
    pub fn source(&self) -> &Source {
        &self.src
    }

    /// Fills `buf` from `offset` without moving the cursor; a short source
    /// is an error of kind invalid-input naming the range.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let mut done = 0;
        while done < buf.len() {
            // One host call reads at most u32::MAX bytes: saturate, then loop.
            let want = u32::try_from((buf.len() - done).min(self.max)).unwrap_or(u32::MAX);
            let at = offset + done as u64;
            let chunk = self.src.read_at(at, want)?;
            if chunk.is_empty() {
                return Err(Error::invalid_input(format!(
                    "source ends at {} bytes, wanted {} bytes at offset {offset}",
                    self.size,
                    buf.len()
                )));
            }
            buf[done..done + chunk.len()].copy_from_slice(&chunk);
            done += chunk.len();
        }
        Ok(())
    }
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        let want = u32::try_from(buf.len().min(self.max)).unwrap_or(u32::MAX);
        let chunk = self
            .src
            .read_at(self.pos, want)
            .map_err(|e| io::Error::other(e.message))?;
        buf[..chunk.len()].copy_from_slice(&chunk);
        self.pos += chunk.len() as u64;
        Ok(chunk.len())
    }
}

impl Seek for SourceReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}
