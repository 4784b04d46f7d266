//! Raw images: the virtual disk is the file. The host finds holes itself,
//! so the map is one data extent. Raw has no compression; decode passes
//! codec 0 ("stored") through unchanged and refuses every other codec.

use cocoon_plugin_sdk::format_converter::*;

struct Raw;

struct RawImage {
    size: u64,
}

/// Codec 0: bytes stored as they are.
const STORED: u32 = 0;

impl FormatConverter for Raw {
    type Image = RawImage;

    fn probe(_head: &[u8], _tail: &[u8], _file_size: u64) -> Option<ProbeResult> {
        // Anything can be raw; the lowest confidence lets every real format
        // plugin win.
        Some(ProbeResult {
            format: "raw".into(),
            confidence: 1,
        })
    }

    fn open(src: Source, format: &str) -> Result<RawImage, Error> {
        if format != "raw" {
            return Err(Error::unsupported(format!(
                "raw-converter does not read {format}"
            )));
        }
        Ok(RawImage { size: src.size() })
    }

    fn decode(extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error> {
        if extent.codec != STORED {
            return Err(Error::unsupported(format!(
                "codec {} is not raw's",
                extent.codec
            )));
        }
        if input.len() != length as usize {
            return Err(Error::invalid_input(format!(
                "stored extent has {} bytes, expected {length}",
                input.len()
            )));
        }
        Ok(input)
    }
}

impl ConverterImage for RawImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<String> {
        None
    }

    fn map(&self, offset: u64, max: u32) -> Result<Vec<Extent>, Error> {
        if offset >= self.size || max == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            length: self.size - offset,
            kind: ExtentKind::Data(offset),
        }])
    }
}

cocoon_plugin_sdk::export_format_converter!(Raw);
