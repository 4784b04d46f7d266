//! The vmdk converter: a thin wrapper that runs the cocoon-format-vmdk
//! parser over the host's read-at source.

use std::cell::RefCell;

use cocoon_format_common::{ErrorKind as FmtKind, FormatError, ReadAt, Run};
use cocoon_format_vmdk::Vmdk;
use cocoon_plugin_sdk::format_converter::*;

const FORMAT: &str = cocoon_format_vmdk::FORMAT;

/// Reads of at most this many bytes are served from a read-ahead window:
/// parsers read many small table entries and markers, and each host call
/// costs more than copying a few KiB.
const SMALL_READ: usize = 4096;
const WINDOW: u64 = 64 * 1024;

/// The host's source as the parser's [`ReadAt`], with a read-ahead window.
struct HostSource {
    reader: SourceReader,
    /// (offset, bytes) of the last window read.
    window: RefCell<(u64, Vec<u8>)>,
}

impl HostSource {
    fn new(src: Source) -> Self {
        HostSource {
            reader: SourceReader::new(src),
            window: RefCell::new((0, Vec::new())),
        }
    }

    fn host_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        self.reader.read_exact_at(offset, buf).map_err(|e| {
            let kind = match e.kind {
                ErrorKind::Io => FmtKind::Io,
                ErrorKind::LimitExceeded => FmtKind::LimitExceeded,
                _ => FmtKind::InvalidInput,
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
            let len = WINDOW.min(size - offset) as usize;
            let mut fresh = vec![0u8; len];
            self.host_read(offset, &mut fresh)?;
            *window = (offset, fresh);
        }
        let (start, bytes) = &*window;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    }
}

fn wit_error(e: FormatError) -> Error {
    let kind = match e.kind {
        FmtKind::InvalidInput => ErrorKind::InvalidInput,
        FmtKind::Unsupported => ErrorKind::Unsupported,
        FmtKind::LimitExceeded => ErrorKind::LimitExceeded,
        FmtKind::Io => ErrorKind::Io,
        FmtKind::Internal => ErrorKind::Internal,
    };
    Error::new(kind, format!("{FORMAT}: {}", e.message))
}

struct Converter;

struct Image {
    src: HostSource,
    image: Vmdk,
}

impl FormatConverter for Converter {
    type Image = Image;

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<ProbeResult> {
        cocoon_format_vmdk::probe(head).map(|confidence| ProbeResult {
            format: FORMAT.into(),
            confidence,
        })
    }

    fn open(src: Source, format: &str) -> Result<Image, Error> {
        if format != FORMAT {
            return Err(Error::unsupported(format!(
                "the {FORMAT} converter does not read {format}"
            )));
        }
        let src = HostSource::new(src);
        let image = Vmdk::open(&src).map_err(wit_error)?;
        Ok(Image { src, image })
    }

    fn decode(extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error> {
        cocoon_format_vmdk::decode(extent.codec, &input, length).map_err(wit_error)
    }
}

impl ConverterImage for Image {
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
            .map_err(wit_error)?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
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
            })
            .collect())
    }
}

cocoon_plugin_sdk::export_format_converter!(Converter);
