//! Decoding compressed clusters. Both codecs stop as soon as `length`
//! bytes are out: the stored run is padded to 512-byte sectors, and the
//! last cluster of an image whose size is not cluster-aligned is asked for
//! only up to the virtual size.

use cocoon_format_common::FormatError;
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Codec tag of raw deflate clusters (compression_type 0, "zlib").
pub const CODEC_DEFLATE: u32 = 1;
/// Codec tag of zstd clusters (compression_type 1).
pub const CODEC_ZSTD: u32 = 2;

/// Decodes `input` (one compressed cluster) into exactly `length` bytes.
pub fn decode(codec: u32, input: &[u8], length: usize) -> Result<Vec<u8>, FormatError> {
    match codec {
        CODEC_DEFLATE => inflate(input, length),
        CODEC_ZSTD => unzstd(input, length),
        other => Err(FormatError::unsupported(format!(
            "codec tag {other} is not a qcow2 codec"
        ))),
    }
}

fn inflate(input: &[u8], length: usize) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; length];
    if length == 0 {
        return Ok(out);
    }
    // Decoder state is reused across calls: a plugin instance decodes many
    // clusters, and setting up the tables is a visible share of one.
    thread_local! {
        static STATE: std::cell::RefCell<Box<DecompressorOxide>> = Default::default();
    }
    STATE.with_borrow_mut(|state| {
        state.init();
        inflate_with(state, input, &mut out)
    })?;
    Ok(out)
}

fn inflate_with(
    state: &mut DecompressorOxide,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), FormatError> {
    let length = out.len();
    // The whole input is given at once and the output buffer is the whole
    // cluster, so one call either fills it or fails.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(state, input, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == length => Ok(()),
        TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
            Err(FormatError::invalid(format!(
                "deflate cluster of {} bytes decodes to {written} bytes, {length} expected",
                input.len()
            )))
        }
        other => Err(FormatError::invalid(format!(
            "deflate cluster of {} bytes is corrupt ({other:?} after {written} bytes)",
            input.len()
        ))),
    }
}

/// Largest zstd window accepted, as a power of two: 8 MiB. A cluster is at
/// most 2 MiB, and qemu's frames declare their size, so their windows are
/// no larger; 8 MiB also covers an encoder at its highest levels that did
/// not know the size. A frame asking for more (libzstd would allocate up
/// to 128 MiB) is refused before anything is allocated.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

fn unzstd(input: &[u8], length: usize) -> Result<Vec<u8>, FormatError> {
    // As for deflate: one decompression context per instance, reused.
    thread_local! {
        static DCTX: std::cell::RefCell<zstd_safe::DCtx<'static>> = {
            let mut dctx = zstd_safe::DCtx::create();
            dctx.set_parameter(zstd_safe::DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                .expect("a window limit within libzstd's range");
            std::cell::RefCell::new(dctx)
        };
    }
    DCTX.with_borrow_mut(|dctx| unzstd_with(dctx, input, length))
}

fn unzstd_with(
    dctx: &mut zstd_safe::DCtx<'_>,
    input: &[u8],
    length: usize,
) -> Result<Vec<u8>, FormatError> {
    // A context left mid-frame by a failed cluster must not leak into this one.
    dctx.reset(zstd_safe::ResetDirective::SessionOnly)
        .map_err(|code| zstd_error(input, code))?;
    let mut out = vec![0u8; length];
    let mut src = zstd_safe::InBuffer::around(input);
    let mut dst = zstd_safe::OutBuffer::around(&mut out[..]);
    // qemu may write a cluster as several frames and pads the run to whole
    // sectors: decode frame after frame (the streaming API moves on to the
    // next frame by itself) and stop as soon as the cluster is full, so
    // the padding is never read as a frame.
    while dst.pos() < length {
        let before = (src.pos(), dst.pos());
        dctx.decompress_stream(&mut dst, &mut src)
            .map_err(|code| zstd_error(input, code))?;
        if (src.pos(), dst.pos()) == before {
            return Err(FormatError::invalid(format!(
                "zstd cluster of {} bytes decodes to {} bytes, {length} expected",
                input.len(),
                dst.pos()
            )));
        }
    }
    Ok(out)
}

fn zstd_error(input: &[u8], code: zstd_safe::ErrorCode) -> FormatError {
    FormatError::invalid(format!(
        "zstd cluster of {} bytes is corrupt: {}",
        input.len(),
        zstd_safe::get_error_name(code)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trip_and_truncation() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        assert_eq!(decode(CODEC_DEFLATE, &packed, data.len()).unwrap(), data);
        // Sector padding after the stream is ignored.
        let mut padded = packed.clone();
        padded.extend_from_slice(&[0xAA; 300]);
        assert_eq!(decode(CODEC_DEFLATE, &padded, data.len()).unwrap(), data);
        // The last cluster of an unaligned image is wanted only in part.
        assert_eq!(decode(CODEC_DEFLATE, &packed, 1000).unwrap(), data[..1000]);
        let short = decode(CODEC_DEFLATE, &packed, data.len() + 1).unwrap_err();
        assert!(short.message.contains("expected"), "{short}");
        assert!(decode(CODEC_DEFLATE, &[0xff; 64], 4096).is_err());
        assert!(decode(CODEC_DEFLATE, &packed[..packed.len() / 2], data.len()).is_err());
    }

    #[test]
    fn zstd_round_trip_over_several_frames_with_a_reused_decoder() {
        let compress_to_vec = |data: &[u8]| {
            let mut out = vec![0u8; zstd_safe::compress_bound(data.len())];
            let n = zstd_safe::compress(&mut out[..], data, 1).unwrap();
            out.truncate(n);
            out
        };
        let a: Vec<u8> = (0..40_000u32).map(|i| (i % 97) as u8).collect();
        let b: Vec<u8> = (0..25_536u32).map(|i| (i % 13) as u8).collect();
        let mut packed = compress_to_vec(&a);
        packed.extend(compress_to_vec(&b));
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        for _ in 0..3 {
            assert_eq!(decode(CODEC_ZSTD, &packed, whole.len()).unwrap(), whole);
            assert_eq!(decode(CODEC_ZSTD, &packed, 1000).unwrap(), whole[..1000]);
        }
        assert!(decode(CODEC_ZSTD, &packed, whole.len() + 1).is_err());
        // A failed decode leaves nothing behind for the next one.
        assert_eq!(decode(CODEC_ZSTD, &packed, whole.len()).unwrap(), whole);
    }

    #[test]
    fn zstd_frames_asking_for_a_huge_window_are_refused() {
        // Magic, a descriptor with no content size, a window of 2^27
        // bytes, then one raw last block of 4 bytes.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (27 - 10) << 3];
        frame.extend_from_slice(&[0x01 | (4 << 3), 0, 0]);
        frame.extend_from_slice(b"abcd");
        let err = decode(CODEC_ZSTD, &frame, 4).unwrap_err();
        assert!(err.message.contains("too much memory"), "{err}");
        // The same frame with a window of 2^20 decodes.
        frame[5] = (20 - 10) << 3;
        assert_eq!(decode(CODEC_ZSTD, &frame, 4).unwrap(), b"abcd");
    }

    #[test]
    fn zstd_garbage_is_an_error() {
        assert!(decode(CODEC_ZSTD, &[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff], 4096).is_err());
        assert!(decode(CODEC_ZSTD, &[], 4096).is_err());
        assert!(decode(99, &[], 4096).is_err());
    }
}
