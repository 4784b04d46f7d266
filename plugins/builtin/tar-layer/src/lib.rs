//! OCI image layers: a plain tar (the host has already removed gzip or
//! zstd), read with the `tar` crate into the entries of the `layer`
//! interface. File contents are never read: each file is answered with the
//! extent of the tar that holds it, and the host copies the bytes itself.
//!
//! The tar crate's archive borrows its reader for as long as it iterates,
//! so each `next` call makes a new one over a window of the source that
//! starts at the header after the last entry answered; between calls the
//! layer keeps only that offset.
//!
//! Refused, with the entry named: names and link targets that are not
//! UTF-8, sparse files (GNU or PAX), ids beyond 32 bits, entry types no
//! layer has. The host checks everything else (names, links, limits).

use std::cell::Cell;
use std::io::{self, Read, Seek, SeekFrom};

use cocoon_plugin_sdk::layer_reader::*;
use tar::EntryType;

struct TarLayer;

struct Layer {
    src: Source,
    size: u64,
    /// Offset of the next header to read.
    next: Cell<u64>,
    done: Cell<bool>,
    /// Entries answered so far (for messages).
    count: Cell<u64>,
    /// The last entry's name (for messages about the one after it).
    last: std::cell::RefCell<String>,
}

/// Header reads are small and sequential: read ahead this much per host
/// call, and seek over file contents without reading them.
const WINDOW: u32 = 64 << 10;

/// `Read + Seek` over the source from `base` on, buffered. Positions seen
/// by the tar crate are relative to `base`.
struct Window<'a> {
    src: &'a Source,
    base: u64,
    size: u64,
    /// Absolute position.
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
    chunk: u32,
}

impl Read for Window<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        let end = self.buf_at + self.buf.len() as u64;
        if self.pos < self.buf_at || self.pos >= end {
            self.buf = self
                .src
                .read_at(self.pos, self.chunk)
                .map_err(|e| io::Error::other(e.message))?;
            self.buf_at = self.pos;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        // Inside the buffer (checked above), so it fits.
        let off = usize::try_from(self.pos - self.buf_at).unwrap_or(usize::MAX);
        let n = out.len().min(self.buf.len() - off);
        out[..n].copy_from_slice(&self.buf[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => self.base.checked_add(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
        };
        match target {
            Some(t) if t >= self.base => {
                self.pos = t;
                Ok(t - self.base)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start",
            )),
        }
    }
}

fn utf8(what: &str, bytes: &[u8]) -> Result<String, Error> {
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        Error::unsupported(format!(
            "{what} {:?} is not UTF-8",
            String::from_utf8_lossy(bytes)
        ))
    })
}

fn id(name: &str, what: &str, v: u64) -> Result<u32, Error> {
    u32::try_from(v)
        .map_err(|_| Error::unsupported(format!("entry {name:?}: {what} {v} is over 32 bits")))
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(511).map(|n| n & !511)
}

impl Layer {
    fn entry<R: Read>(&self, e: &mut tar::Entry<'_, R>, base: u64) -> Result<Option<Entry>, Error> {
        let name = utf8("entry name", &e.path_bytes())?;
        let header = e.header();
        let bad = |why: String| Error::invalid_input(format!("entry {name:?}: {why}"));
        let kind = match header.entry_type() {
            EntryType::Regular | EntryType::Continuous => EntryKind::File,
            EntryType::Directory => EntryKind::Directory,
            EntryType::Symlink => EntryKind::Symlink,
            EntryType::Link => EntryKind::Hardlink,
            EntryType::Char => EntryKind::CharDevice,
            EntryType::Block => EntryKind::BlockDevice,
            EntryType::Fifo => EntryKind::Fifo,
            // Global PAX records carry nothing a layer needs.
            EntryType::XGlobalHeader => return Ok(None),
            EntryType::GNUSparse => {
                return Err(Error::unsupported(format!(
                    "entry {name:?}: sparse files are not supported"
                )))
            }
            other => {
                return Err(Error::unsupported(format!(
                    "entry {name:?}: entry type {:?} ({:?})",
                    other,
                    other.as_byte() as char
                )))
            }
        };
        let mode = header.mode().map_err(|e| bad(format!("mode: {e}")))? & 0o7777;
        let mut uid = header.uid().map_err(|e| bad(format!("uid: {e}")))?;
        let mut gid = header.gid().map_err(|e| bad(format!("gid: {e}")))?;
        let mut mtime = header.mtime().map_err(|e| bad(format!("mtime: {e}")))? as i64;
        let device = match kind {
            EntryKind::CharDevice | EntryKind::BlockDevice => Some(Device {
                major: header
                    .device_major()
                    .map_err(|e| bad(format!("device major: {e}")))?
                    .unwrap_or(0),
                minor: header
                    .device_minor()
                    .map_err(|e| bad(format!("device minor: {e}")))?
                    .unwrap_or(0),
            }),
            _ => None,
        };
        let link_target = match kind {
            EntryKind::Symlink | EntryKind::Hardlink => {
                let t = e
                    .link_name_bytes()
                    .ok_or_else(|| bad("a link without a target".into()))?;
                Some(utf8(&format!("entry {name:?}: link target"), &t)?)
            }
            _ => None,
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = e
            .pax_extensions()
            .map_err(|e| bad(format!("PAX records: {e}")))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| bad(format!("PAX record: {e}")))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.split('.').next())
                        .and_then(|v| v.parse::<i64>().ok())
                        .ok_or_else(|| {
                            bad(format!(
                                "PAX {} = {:?} is not a number",
                                String::from_utf8_lossy(key),
                                String::from_utf8_lossy(value)
                            ))
                        })
                };
                match key {
                    b"uid" => {
                        uid = number()?
                            .try_into()
                            .map_err(|_| bad("negative uid".into()))?
                    }
                    b"gid" => {
                        gid = number()?
                            .try_into()
                            .map_err(|_| bad("negative gid".into()))?
                    }
                    b"mtime" => mtime = number()?,
                    k if k.starts_with(b"GNU.sparse.") => {
                        return Err(Error::unsupported(format!(
                            "entry {name:?}: sparse files are not supported"
                        )))
                    }
                    k if k.starts_with(b"SCHILY.xattr.") => xattrs.push(Xattr {
                        name: utf8(
                            &format!("entry {name:?}: xattr name"),
                            &k[b"SCHILY.xattr.".len()..],
                        )?,
                        value: value.to_vec(),
                    }),
                    _ => {}
                }
            }
        }
        let stored = e.size();
        let (size, extents) = match kind {
            EntryKind::File if stored > 0 => {
                let offset = base
                    .checked_add(e.raw_file_position())
                    .ok_or_else(|| bad("contents past 2^64".into()))?;
                (
                    stored,
                    vec![Extent {
                        offset,
                        length: stored,
                    }],
                )
            }
            _ => (0, Vec::new()),
        };
        Ok(Some(Entry {
            uid: id(&name, "uid", uid)?,
            gid: id(&name, "gid", gid)?,
            kind,
            name,
            mode,
            mtime,
            link_target,
            size,
            extents,
            device,
            xattrs,
        }))
    }
}

impl LayerReader for TarLayer {
    type Layer = Layer;

    fn open(src: Source) -> Result<Layer, Error> {
        let size = src.size();
        Ok(Layer {
            src,
            size,
            next: Cell::new(0),
            done: Cell::new(false),
            count: Cell::new(0),
            last: Default::default(),
        })
    }
}

impl ReaderLayer for Layer {
    fn next(&self, max: u32) -> Result<Vec<Entry>, Error> {
        let mut out = Vec::new();
        if self.done.get() {
            return Ok(out);
        }
        let base = self.next.get();
        let window = Window {
            src: &self.src,
            base,
            size: self.size,
            pos: base,
            buf: Vec::new(),
            buf_at: 0,
            chunk: WINDOW.min(max_read().max(512)),
        };
        let mut archive = tar::Archive::new(window);
        let where_ = |at: u64| {
            let last = self.last.borrow();
            if last.is_empty() {
                format!("at offset {at} (the first entry)")
            } else {
                format!("at offset {at}, after entry {last:?}")
            }
        };
        let mut entries = archive
            .entries_with_seek()
            .map_err(|e| Error::invalid_input(format!("tar {}: {e}", where_(base))))?;
        while out.len() < max as usize {
            let Some(e) = entries.next() else {
                self.done.set(true);
                break;
            };
            let mut e = e.map_err(|e| {
                Error::invalid_input(format!("tar header {}: {e}", where_(self.next.get())))
            })?;
            // Where the entry after this one starts: its contents are
            // padded to 512-byte blocks (sparse files, laid out otherwise,
            // are refused by `entry`).
            let after = base
                .checked_add(e.raw_file_position())
                .and_then(|p| p.checked_add(round_up(e.size())?))
                .ok_or_else(|| Error::invalid_input("tar entry past 2^64".to_string()))?;
            if let Some(entry) = self.entry(&mut e, base)? {
                *self.last.borrow_mut() = entry.name.clone();
                out.push(entry);
                self.count.set(self.count.get() + 1);
            }
            self.next.set(after);
        }
        Ok(out)
    }
}

cocoon_plugin_sdk::export_layer_reader!(TarLayer);
