//! A format converter built against the frozen 0.1.0 contract
//! (wit/v0.1.0), without the SDK. Its format: the magic `LEGACY01`, the
//! virtual size (u64, little-endian), then the disk's first bytes stored
//! as-is from offset 16; past the end of the file the disk reads as zeros.
//! "Compressed" extents are not used; decode copies its input (codec 0).

wit_bindgen::generate!({
    world: "format-converter",
    path: "../../../wit/v0.1.0",
});

use cocoon::plugin::source::Source;
use cocoon::plugin::types::{Error, ErrorKind};
use exports::cocoon::plugin::converter::{
    Compressed, Extent, ExtentKind, Guest, GuestImage, Image, ProbeResult,
};

const MAGIC: &[u8] = b"LEGACY01";
const HEADER: u64 = 16;
/// The header's length as a host read takes it.
const HEADER_LEN: u32 = 16;

struct LegacyConverter;

struct LegacyImage {
    virtual_size: u64,
    stored: u64,
}

fn err(kind: ErrorKind, message: String) -> Error {
    Error { kind, message }
}

impl Guest for LegacyConverter {
    type Image = LegacyImage;

    fn probe(head: Vec<u8>, _tail: Vec<u8>, _file_size: u64) -> Option<ProbeResult> {
        head.starts_with(MAGIC).then(|| ProbeResult {
            format: "legacy".into(),
            confidence: 100,
        })
    }

    fn decode(_extent: Compressed, input: Vec<u8>, length: u32) -> Result<Vec<u8>, Error> {
        if input.len() != length as usize {
            return Err(err(
                ErrorKind::InvalidInput,
                format!("{} bytes stored, {length} wanted", input.len()),
            ));
        }
        Ok(input)
    }
}

impl GuestImage for LegacyImage {
    fn open(src: Source, format: String) -> Result<Image, Error> {
        if format != "legacy" {
            return Err(err(ErrorKind::Unsupported, format!("format {format:?}")));
        }
        let header = src.read_at(0, HEADER_LEN)?;
        if header.len() < HEADER_LEN as usize || !header.starts_with(MAGIC) {
            return Err(err(ErrorKind::InvalidInput, "no LEGACY01 header".into()));
        }
        let virtual_size = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let stored = src.size().saturating_sub(HEADER).min(virtual_size);
        Ok(Image::new(LegacyImage {
            virtual_size,
            stored,
        }))
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn backing(&self) -> Option<String> {
        None
    }

    fn map(&self, offset: u64, max: u32) -> Result<Vec<Extent>, Error> {
        let mut out = Vec::new();
        if offset < self.stored && max > 0 {
            out.push(Extent {
                offset,
                length: self.stored - offset,
                kind: ExtentKind::Data(HEADER + offset),
            });
        }
        let from = offset.max(self.stored);
        if from < self.virtual_size && u32::try_from(out.len()).is_ok_and(|n| n < max) {
            out.push(Extent {
                offset: from,
                length: self.virtual_size - from,
                kind: ExtentKind::Zero,
            });
        }
        Ok(out)
    }
}

export!(LegacyConverter);
