//! Compressed downloads (xz, gzip, zstd) are unpacked by the host into a
//! temporary file before probing: a compressed image is never taken for
//! raw, and plugins only ever see the image itself. Streaming, so memory
//! stays bounded whatever the sizes. The temp is a locked
//! [`Temp`](crate::fsutil::temp::Temp): removed when dropped, on a
//! termination signal, and by the next conversion into the directory if a
//! SIGKILL left it.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use super::detect::{detect_compression, Compression};
use super::ConvertError;
use crate::fsutil::input::{self, Accept};
use crate::fsutil::temp::Temp;

/// Wrappers unpacked at most (a .tar.gz inside an .xz is not an image).
const MAX_LAYERS: usize = 2;

/// The unpacked image, when the source was compressed.
pub struct Unpacked {
    /// Deleted when dropped.
    pub file: Option<Temp>,
    /// The wrappers removed, outermost first.
    pub codecs: Vec<&'static str>,
}

/// Opens a source image: a regular file or a block device, nothing else.
pub(crate) fn open_image(path: &Path) -> Result<input::Input, ConvertError> {
    input::open(path, Accept::RegularOrBlock).map_err(ConvertError::io("opening", path))
}

fn magic_of(path: &Path) -> Result<Option<Compression>, ConvertError> {
    let mut head = [0u8; 8];
    let mut f = open_image(path)?.file;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConvertError::io("reading", path)(e)),
        }
    }
    Ok(detect_compression(&head[..n]))
}

/// Unpacks `source` into a temp file in `scratch` while it carries a
/// compression magic.
pub fn unpack(source: &Path, scratch: &Path) -> Result<Unpacked, ConvertError> {
    let mut out = Unpacked {
        file: None,
        codecs: Vec::new(),
    };
    loop {
        let current = out.file.as_ref().map_or(source, |t| t.path()).to_path_buf();
        let Some(codec) = magic_of(&current)? else {
            return Ok(out);
        };
        if out.codecs.len() == MAX_LAYERS {
            return Err(ConvertError::TooManyCompressionLayers {
                path: source.to_path_buf(),
                codec: codec.name(),
                layers: MAX_LAYERS,
            });
        }
        let input = open_image(&current)?.file;
        let mut tmp = Temp::create_in(scratch, ".unpack")
            .map_err(ConvertError::io("creating a temp file in", scratch))?;
        let path = current.clone();
        let failed = move |source| ConvertError::Decompress {
            path,
            codec: codec.name(),
            source,
        };
        copy_decoded(codec, input, tmp.as_file_mut()).map_err(failed)?;
        out.codecs.push(codec.name());
        out.file = Some(tmp);
    }
}

/// Streams `input` through the decoder of `codec` into `out`, keeping
/// runs of zeros as holes so a sparse image stays sparse.
fn copy_decoded(codec: Compression, input: File, out: &mut File) -> io::Result<()> {
    let input = BufReader::with_capacity(1 << 20, input);
    let mut reader: Box<dyn Read> = match codec {
        // Multi-stream files (pixz, pigz, zstd -T) are concatenations.
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(input)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
    };
    write_sparse(&mut reader, out)
}

/// Copies `reader` into `out`, seeking over all-zero 4 KiB blocks.
pub(crate) fn write_sparse(reader: &mut dyn Read, out: &mut File) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        for block in buf[..filled].chunks(4096) {
            if block.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(block.len() as i64))?;
            } else {
                out.write_all(block)?;
            }
        }
        len += filled as u64;
    }
    // Trailing holes need the length set explicitly.
    out.set_len(len)?;
    out.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn unpacks_each_codec_and_leaves_plain_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 3 << 20];
        data[..5].copy_from_slice(b"hello");
        let n = data.len();
        data[n - 3..].copy_from_slice(b"end");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, &data).unwrap();
        let u = unpack(&plain, dir.path()).unwrap();
        assert!(u.file.is_none() && u.codecs.is_empty());

        let gz = dir.path().join("x.gz");
        let mut e =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        e.write_all(&data).unwrap();
        e.finish().unwrap();
        let xz = dir.path().join("x.xz");
        let mut e = xz2::write::XzEncoder::new(File::create(&xz).unwrap(), 1);
        e.write_all(&std::fs::read(&gz).unwrap()).unwrap();
        e.finish().unwrap();
        let zst = dir.path().join("x.zst");
        std::fs::write(&zst, zstd::encode_all(&data[..], 1).unwrap()).unwrap();

        for (path, codecs) in [
            (&gz, vec!["gzip"]),
            (&xz, vec!["xz", "gzip"]),
            (&zst, vec!["zstd"]),
        ] {
            let u = unpack(path, dir.path()).unwrap();
            assert_eq!(u.codecs, codecs);
            assert_eq!(
                std::fs::read(u.file.as_ref().unwrap().path()).unwrap(),
                data
            );
        }
        let bad = dir.path().join("bad.xz");
        std::fs::write(&bad, [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3]).unwrap();
        assert!(matches!(
            unpack(&bad, dir.path()),
            Err(ConvertError::Decompress { codec: "xz", .. })
        ));
    }
}
