//! Which plugin reads a file. Every converter plugin probes the file's
//! first and last 64 KiB; the host also knows the magic numbers of the
//! formats it expects, so a file that carries one is never silently taken
//! for raw because its plugin is missing or declined it.
//!
//! Ties between equally sure probes follow the formats' own layout rules
//! ([`outranks`]): a VHD footer found at the end of the file, with no
//! copy at its start, is a fixed disk, whose data starts at offset 0; a
//! header another format finds at offset 0 is then inside that data (a
//! fixed VHD of a disk that holds a qcow2 image). `--format raw` reads any
//! file as raw whatever it starts with.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{ConvertError, Converters};

/// Bytes of the head and of the tail handed to probes.
pub const PROBE_BYTES: u64 = 64 << 10;

/// A compression wrapper around a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The compression `head` starts with, if any.
pub fn detect_compression(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else {
        None
    }
}

/// The disk formats whose magic `head` (the file's start) or `tail` (its
/// last bytes) carries, by the names converter plugins use.
pub fn detect_magics(head: &[u8], tail: &[u8]) -> Vec<&'static str> {
    let mut found = Vec::new();
    if head.starts_with(b"QFI\xfb") {
        found.push("qcow2");
    }
    // A sparse extent, or a descriptor file (which we refuse in the plugin
    // when it names other files, but it is still vmdk).
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        found.push("vmdk");
    }
    if head.starts_with(b"vhdxfile") {
        found.push("vhdx");
    }
    if head.len() >= 0x44 && head[0x40..0x44] == 0xbeda_107fu32.to_le_bytes() {
        found.push("vdi");
    }
    if head.starts_with(VHD_COOKIE) || vhd_footer_at_end(tail) {
        found.push("vpc");
    }
    found
}

const VHD_COOKIE: &[u8] = b"conectix";

/// Every VHD ends with its footer; a dynamic one also copies it at 0.
fn vhd_footer_at_end(tail: &[u8]) -> bool {
    tail.len() >= 512 && tail[tail.len() - 512..].starts_with(VHD_COOKIE)
}

/// Whether format `a` wins a tie with format `b` on this file by the
/// formats' own layout: a VHD known only by its footer is a fixed disk
/// whose data starts at offset 0, so `b`'s header there is guest data.
pub fn outranks(a: &str, b: &str, head: &[u8], tail: &[u8]) -> bool {
    a == "vpc" && b != "vpc" && !head.starts_with(VHD_COOKIE) && vhd_footer_at_end(tail)
}

/// The first and last [`PROBE_BYTES`] of `path`, and its size.
pub fn head_and_tail(path: &Path) -> Result<(Vec<u8>, Vec<u8>, u64), ConvertError> {
    let crate::fsutil::input::Input { file, size, .. } = super::decompress::open_image(path)?;
    let read = |offset: u64, len: u64| -> Result<Vec<u8>, ConvertError> {
        let mut buf = vec![0u8; crate::cast::usize_from(len)];
        file.read_exact_at(&mut buf, offset)
            .map_err(ConvertError::io("reading", path))?;
        Ok(buf)
    };
    let head = read(0, size.min(PROBE_BYTES))?;
    let tail_len = size.min(PROBE_BYTES);
    let tail = read(size - tail_len, tail_len)?;
    Ok((head, tail, size))
}

/// The plugin (index into `converters`) and format that read `path`:
/// the forced format when its probe agrees, else the most confident probe.
pub fn choose(
    converters: &Converters,
    path: &Path,
    forced: Option<&str>,
) -> Result<(usize, String), ConvertError> {
    let (head, tail, size) = head_and_tail(path)?;
    let mut answers = Vec::new();
    for (i, plugin) in converters.plugins.iter().enumerate() {
        match plugin.probe(&head, &tail, size) {
            Ok(Some(p)) => answers.push((i, p.format, p.confidence)),
            Ok(None) => {}
            // A plugin that fails its probe says nothing about the file.
            Err(e) => tracing::warn!(plugin = plugin.name(), error = %e, "probe failed"),
        }
    }
    // Most confident first; ties by the formats' layout rules, then by the
    // plugin order (by name).
    answers.sort_by(|a, b| {
        b.2.cmp(&a.2)
            .then_with(|| {
                match (
                    outranks(&a.1, &b.1, &head, &tail),
                    outranks(&b.1, &a.1, &head, &tail),
                ) {
                    (true, false) => std::cmp::Ordering::Less,
                    (false, true) => std::cmp::Ordering::Greater,
                    _ => std::cmp::Ordering::Equal,
                }
            })
            .then(a.0.cmp(&b.0))
    });
    let best = answers
        .first()
        .map_or_else(|| "nothing".to_string(), |(_, f, c)| format!("{f} at {c}%"));
    if let Some(forced) = forced {
        return answers
            .into_iter()
            .find(|(_, f, _)| f == forced)
            .map(|(i, f, _)| (i, f))
            .ok_or_else(|| ConvertError::FormatMismatch {
                path: path.to_path_buf(),
                forced: forced.to_string(),
                probed: best,
            });
    }
    // A file carrying a magic is read as one of the formats it names,
    // never as raw because their plugins are missing or declined it.
    let magics = detect_magics(&head, &tail);
    match answers.into_iter().next() {
        Some((i, f, _)) if magics.is_empty() || magics.contains(&f.as_str()) => Ok((i, f)),
        _ if !magics.is_empty() => Err(ConvertError::MagicWithoutPlugin {
            path: path.to_path_buf(),
            magic: magics[0],
            probed: best,
        }),
        _ => Err(ConvertError::Unrecognised {
            path: path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        let mut vpc_tail = vec![0u8; 1024];
        vpc_tail[512..520].copy_from_slice(b"conectix");
        let cases: &[(&[u8], &[u8], &[&str])] = &[
            (b"QFI\xfb\0\0\0\x03", b"", &["qcow2"]),
            (b"KDMV\x01\0\0\0", b"", &["vmdk"]),
            (b"# Disk DescriptorFile\n", b"", &["vmdk"]),
            (b"vhdxfile", b"", &["vhdx"]),
            (&vdi, b"", &["vdi"]),
            (b"\0\0\0\0", &vpc_tail, &["vpc"]),
            (b"\0\0\0\0", &vpc_tail[..1000], &[]),
            // A fixed VHD of a disk that holds a qcow2 image.
            (b"QFI\xfb\0\0\0\x03", &vpc_tail, &["qcow2", "vpc"]),
            (b"hello", b"world", &[]),
        ];
        for (head, tail, want) in cases {
            assert_eq!(detect_magics(head, tail), *want, "{head:?}");
        }
        assert_eq!(
            detect_compression(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0]),
            Some(Compression::Xz)
        );
        assert_eq!(
            detect_compression(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            detect_compression(&[0x28, 0xb5, 0x2f, 0xfd]),
            Some(Compression::Zstd)
        );
        assert_eq!(detect_compression(b"QFI\xfb"), None);
    }

    #[test]
    fn ties_follow_the_formats_layout() {
        let qcow2: &[u8] = b"QFI\xfb\0\0\0\x03";
        let mut footer = vec![0u8; 1024];
        footer[512..520].copy_from_slice(b"conectix");
        let no_footer = vec![0u8; 1024];
        // (a, b, head, tail, whether a outranks b)
        type Case<'a> = (&'a str, &'a str, &'a [u8], &'a [u8], bool);
        let cases: &[Case] = &[
            // A fixed VHD whose data starts with a qcow2 header.
            ("vpc", "qcow2", qcow2, &footer, true),
            ("qcow2", "vpc", qcow2, &footer, false),
            // A dynamic VHD copies its footer at 0: no data at 0.
            ("vpc", "qcow2", b"conectix", &footer, false),
            // No footer at the end: nothing for vpc to claim.
            ("vpc", "qcow2", qcow2, &no_footer, false),
            ("vpc", "vpc", qcow2, &footer, false),
        ];
        for (a, b, head, tail, want) in cases {
            assert_eq!(outranks(a, b, head, tail), *want, "{a} over {b}");
        }
    }
}
