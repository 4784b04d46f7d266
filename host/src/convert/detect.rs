//! Which plugin reads a file. Every converter plugin probes the file's
//! first and last 64 KiB; the host also knows the magic numbers of the
//! formats it expects, so a file that carries one is never silently taken
//! for raw because its plugin is missing or declined it.

use std::fs::File;
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

/// The disk format whose magic `head` (the file's start) or `tail` (its
/// last bytes) carries, by the names converter plugins use.
pub fn detect_magic(head: &[u8], tail: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"QFI\xfb") {
        return Some("qcow2");
    }
    // A sparse extent, or a descriptor file (which we refuse in the plugin
    // when it names other files, but it is still vmdk).
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        return Some("vmdk");
    }
    if head.starts_with(b"vhdxfile") {
        return Some("vhdx");
    }
    if head.len() >= 0x44 && head[0x40..0x44] == 0xbeda_107fu32.to_le_bytes() {
        return Some("vdi");
    }
    // VHD: the footer in the last 512 bytes (dynamic disks also copy it at
    // the start).
    if head.starts_with(b"conectix")
        || (tail.len() >= 512 && tail[tail.len() - 512..].starts_with(b"conectix"))
    {
        return Some("vpc");
    }
    None
}

/// The first and last [`PROBE_BYTES`] of `path`, and its size.
pub fn head_and_tail(path: &Path) -> Result<(Vec<u8>, Vec<u8>, u64), ConvertError> {
    let file = File::open(path).map_err(ConvertError::io("opening", path))?;
    let size = file
        .metadata()
        .map_err(ConvertError::io("reading metadata of", path))?
        .len();
    let read = |offset: u64, len: u64| -> Result<Vec<u8>, ConvertError> {
        let mut buf = vec![0u8; len as usize];
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
    // Most confident first; the plugin order (by name) breaks ties.
    answers.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
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
    let magic = detect_magic(&head, &tail);
    match answers.into_iter().next() {
        Some((i, f, _)) if magic.is_none_or(|m| m == f) => Ok((i, f)),
        Some(_) | None if magic.is_some() => Err(ConvertError::MagicWithoutPlugin {
            path: path.to_path_buf(),
            magic: magic.expect("checked"),
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
        let cases: &[(&[u8], &[u8], Option<&str>)] = &[
            (b"QFI\xfb\0\0\0\x03", b"", Some("qcow2")),
            (b"KDMV\x01\0\0\0", b"", Some("vmdk")),
            (b"# Disk DescriptorFile\n", b"", Some("vmdk")),
            (b"vhdxfile", b"", Some("vhdx")),
            (&vdi, b"", Some("vdi")),
            (b"\0\0\0\0", &vpc_tail, Some("vpc")),
            (b"\0\0\0\0", &vpc_tail[..1000], None),
            (b"hello", b"world", None),
        ];
        for (head, tail, want) in cases {
            assert_eq!(detect_magic(head, tail), *want, "{head:?}");
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
}
