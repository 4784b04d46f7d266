//! The qcow2 converter: a thin wrapper that runs the cocoon-format-qcow2
//! parser over the host's read-at source. The parser owns its source (it
//! keeps L1 and refcount state alongside), so it uses the SDK's
//! native-format helpers rather than the generic `Native` adapter.

use cocoon_format_qcow2::Qcow2;
use cocoon_plugin_sdk::format_converter::native::{wit_error, wit_extent, HostSource};
use cocoon_plugin_sdk::format_converter::*;

const FORMAT: &str = "qcow2";

struct Converter;

struct Image(Qcow2<HostSource>);

impl FormatConverter for Converter {
    type Image = Image;

    fn probe(head: &[u8], _tail: &[u8], _file_size: u64) -> Option<ProbeResult> {
        cocoon_format_qcow2::probe(head).then(|| ProbeResult {
            format: FORMAT.into(),
            confidence: 100,
        })
    }

    fn open(src: Source, format: &str) -> Result<Image, Error> {
        if format != FORMAT {
            return Err(Error::unsupported(format!(
                "the {FORMAT} converter does not read {format}"
            )));
        }
        Qcow2::open(HostSource::new(src))
            .map(Image)
            .map_err(|e| wit_error(FORMAT, e))
    }

    fn decode(extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error> {
        cocoon_format_qcow2::decode(extent.codec, &input, length as usize)
            .map_err(|e| wit_error(FORMAT, e))
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
        let extents = self.0.map(offset, max).map_err(|e| wit_error(FORMAT, e))?;
        Ok(extents.into_iter().map(wit_extent).collect())
    }
}

cocoon_plugin_sdk::export_format_converter!(Converter);
