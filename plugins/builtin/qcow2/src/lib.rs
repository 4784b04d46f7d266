//! The qcow2 converter: a thin wrapper that runs the cocoon-format-qcow2
//! parser over the host's read-at source.

use cocoon_format_common::{ErrorKind as FmtKind, FormatError, ReadAt, Run};
use cocoon_format_qcow2::Qcow2;
use cocoon_plugin_sdk::format_converter::*;

struct Converter;

/// The host's source as the parser's [`ReadAt`].
struct HostSource(SourceReader);

impl ReadAt for HostSource {
    fn size(&self) -> u64 {
        self.0.len()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        self.0.read_exact_at(offset, buf).map_err(|e| {
            let kind = match e.kind {
                ErrorKind::Io => FmtKind::Io,
                ErrorKind::LimitExceeded => FmtKind::LimitExceeded,
                _ => FmtKind::InvalidInput,
            };
            FormatError::new(kind, e.message)
        })
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
    Error::new(kind, format!("qcow2: {}", e.message))
}

struct Image(Qcow2<HostSource>);

impl FormatConverter for Converter {
    type Image = Image;

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<ProbeResult> {
        cocoon_format_qcow2::probe(head).then(|| ProbeResult {
            format: "qcow2".into(),
            confidence: 100,
        })
    }

    fn open(src: Source, format: &str) -> Result<Image, Error> {
        if format != "qcow2" {
            return Err(Error::unsupported(format!(
                "the qcow2 converter does not read {format}"
            )));
        }
        Qcow2::open(HostSource(SourceReader::new(src)))
            .map(Image)
            .map_err(wit_error)
    }

    fn decode(extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error> {
        cocoon_format_qcow2::decode(extent.codec, &input, length as usize).map_err(wit_error)
    }
}

impl ConverterImage for Image {
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }

    fn backing(&self) -> Option<String> {
        self.0.backing().map(str::to_string)
    }

    fn map(&self, offset: u64, max: u32) -> Result<Vec<Extent>, Error> {
        let extents = self.0.map(offset, max).map_err(wit_error)?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
                kind: match e.run {
                    Run::Zero => ExtentKind::Zero,
                    Run::Data(at) => ExtentKind::Data(at),
                    Run::Backing => ExtentKind::Backing,
                    Run::Compressed {
                        source_offset,
                        source_length,
                        codec,
                    } => ExtentKind::Compressed(Compressed {
                        source_offset,
                        source_length,
                        codec,
                    }),
                },
            })
            .collect())
    }
}

cocoon_plugin_sdk::export_format_converter!(Converter);
