//! Converter plugins from native parsers: a parser written against
//! `cocoon-format-common` (plain Rust, testable and fuzzable natively)
//! becomes a converter plugin with one line:
//!
//! ```ignore
//! cocoon_plugin_sdk::export_format_converter!(
//!     cocoon_plugin_sdk::format_converter::native::Native<my_format::MyImage>
//! );
//! ```

use std::cell::RefCell;
use std::marker::PhantomData;

use cocoon_format_common as common;
use cocoon_format_common::{FormatError, ReadAt, Run};

use crate::format_converter::{
    Compressed, ConverterImage, Error, ErrorKind, Extent, ExtentKind, FormatConverter, ProbeResult,
    Source, SourceReader,
};

/// Reads of at most this many bytes are served from a read-ahead window:
/// parsers read many small table entries and markers, and each host call
/// costs more than copying a few KiB.
const SMALL_READ: usize = 4096;
const WINDOW: u64 = 64 * 1024;

/// The host's source as a parser's [`ReadAt`], with a read-ahead window.
pub struct HostSource {
    reader: SourceReader,
    /// (offset, bytes) of the last window read.
    window: RefCell<(u64, Vec<u8>)>,
}

impl HostSource {
    pub fn new(src: Source) -> Self {
        HostSource {
            reader: SourceReader::new(src),
            window: RefCell::new((0, Vec::new())),
        }
    }

    fn host_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        self.reader.read_exact_at(offset, buf).map_err(|e| {
            let kind = match e.kind {
                ErrorKind::Io => common::ErrorKind::Io,
                ErrorKind::LimitExceeded => common::ErrorKind::LimitExceeded,
                _ => common::ErrorKind::InvalidInput,
            };
            FormatError::new(kind, e.message)
        })
    }
}

impl ReadAt for HostSource {
    fn size(&self) -> u64 {
        self.reader.len()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        let size = self.size();
        let end = offset.checked_add(buf.len() as u64);
        if buf.len() > SMALL_READ || end.is_none_or(|e| e > size) {
            return self.host_read(offset, buf);
        }
        let mut window = self.window.borrow_mut();
        let (start, bytes) = &*window;
        let hit = offset >= *start && offset + buf.len() as u64 <= start + bytes.len() as u64;
        if !hit {
            let len = cocoon_format_common::index(WINDOW.min(size - offset));
            let mut fresh = vec![0u8; len];
            self.host_read(offset, &mut fresh)?;
            *window = (offset, fresh);
        }
        let (start, bytes) = &*window;
        let at = cocoon_format_common::index(offset - start);
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    }
}

/// A parser error as a WIT error, prefixed with the format's name.
pub fn wit_error(format: &str, e: FormatError) -> Error {
    let kind = match e.kind {
        common::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
        common::ErrorKind::Unsupported => ErrorKind::Unsupported,
        common::ErrorKind::LimitExceeded => ErrorKind::LimitExceeded,
        common::ErrorKind::Io => ErrorKind::Io,
        common::ErrorKind::Internal => ErrorKind::Internal,
    };
    Error::new(kind, format!("{format}: {}", e.message))
}

/// A parser extent as a WIT extent.
pub fn wit_extent(e: common::Extent) -> Extent {
    Extent {
        offset: e.offset,
        length: e.length,
        kind: match e.run {
            Run::Zero => ExtentKind::Zero,
            Run::Data(at) => ExtentKind::Data(at),
            Run::Compressed {
                source_offset,
                source_length,
                codec,
            } => ExtentKind::Compressed(Compressed {
                source_offset,
                source_length,
                codec,
            }),
            Run::Backing => ExtentKind::Backing,
        },
    }
}

/// The converter plugin of native format `F`.
pub struct Native<F>(PhantomData<F>);

/// An image opened by [`Native`].
pub struct NativeImage<F> {
    src: HostSource,
    image: F,
}

impl<F: common::Format> FormatConverter for Native<F> {
    type Image = NativeImage<F>;

    fn probe(head: &[u8], tail: &[u8], file_size: u64) -> Option<ProbeResult> {
        F::probe(head, tail, file_size).map(|confidence| ProbeResult {
            format: F::NAME.into(),
            confidence,
        })
    }

    fn open(src: Source, format: &str) -> Result<NativeImage<F>, Error> {
        if format != F::NAME {
            return Err(Error::unsupported(format!(
                "the {} converter does not read {format}",
                F::NAME
            )));
        }
        let src = HostSource::new(src);
        let image = F::open(&src).map_err(|e| wit_error(F::NAME, e))?;
        Ok(NativeImage { src, image })
    }

    fn decode(extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error> {
        F::decode(extent.codec, &input, length).map_err(|e| wit_error(F::NAME, e))
    }
}

impl<F: common::Format> ConverterImage for NativeImage<F> {
    fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn backing(&self) -> Option<String> {
        self.image.backing().map(str::to_string)
    }

    fn map(&self, offset: u64, max: u32) -> Result<Vec<Extent>, Error> {
        let extents = self
            .image
            .map(&self.src, offset, max as usize)
            .map_err(|e| wit_error(F::NAME, e))?;
        Ok(extents.into_iter().map(wit_extent).collect())
    }
}
