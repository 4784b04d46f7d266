//! Walking the extent maps of a backing chain into one ordered stream of
//! pieces of the output. Each image's map is read page by page, forwards
//! only, so memory stays at one page per image of the chain whatever the
//! images say. The runtime checks each page (contiguous from the asked
//! offset, inside the virtual size, data and compressed runs inside the
//! source); asking each page at the end of the last one makes the whole
//! map contiguous and free of overlaps.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::plugin::calls::{Compressed, Extent, ExtentKind, ImageSession, MAX_EXTENTS_PER_PAGE};

use super::{backing, ConvertError, Converters};

/// One piece of the output, resolved through the chain.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Reads as zeros: left as a hole.
    Zero { offset: u64, length: u64 },
    /// Bytes at `source_offset` of image `layer`.
    Data {
        offset: u64,
        length: u64,
        layer: usize,
        source_offset: u64,
    },
    /// `length` bytes from `skip` into the `decoded` bytes of a compressed
    /// extent of image `layer`.
    Compressed {
        offset: u64,
        length: u64,
        layer: usize,
        extent: Compressed,
        decoded: u64,
        skip: u64,
    },
}

/// One opened image of the chain and its read position in its map.
pub struct Layer<'c> {
    pub path: PathBuf,
    /// Index into the converters.
    pub plugin: usize,
    pub session: ImageSession<'c>,
    pub file: File,
    pub virtual_size: u64,
    page: VecDeque<Extent>,
    next: u64,
}

impl<'c> Layer<'c> {
    /// Opens `path` as `format` with plugin `plugin`; `name` is how errors
    /// call it (the original file when `path` is an unpacked copy).
    pub fn open(
        converters: &'c Converters,
        plugin: usize,
        name: &Path,
        path: &Path,
        format: &str,
    ) -> Result<Self, ConvertError> {
        let session = converters.plugins[plugin].open_image(path, format)?;
        Ok(Layer {
            path: name.to_path_buf(),
            plugin,
            virtual_size: session.virtual_size(),
            session,
            file: backing::open_source(path)?,
            page: VecDeque::new(),
            next: 0,
        })
    }

    /// The extent that covers `at`, fetching pages as needed. `at` never
    /// goes backwards between calls.
    fn extent_at(&mut self, at: u64) -> Result<Extent, ConvertError> {
        loop {
            while self.page.front().is_some_and(|e| e.offset + e.length <= at) {
                self.page.pop_front();
            }
            if let Some(e) = self.page.front() {
                if e.offset > at {
                    return Err(
                        self.invalid(format!("the walk went back to {at} after {}", e.offset))
                    );
                }
                return Ok(*e);
            }
            if self.next >= self.virtual_size {
                return Err(self.invalid(format!("offset {at} is past the map's end")));
            }
            let page = self.session.map(self.next, MAX_EXTENTS_PER_PAGE)?;
            let last = page
                .last()
                .expect("the runtime refuses empty pages below the virtual size");
            self.next = last.offset + last.length;
            self.page.extend(page);
        }
    }

    fn invalid(&self, detail: String) -> ConvertError {
        ConvertError::Invalid {
            image: self.path.clone(),
            detail,
        }
    }
}

/// Hands every piece of the virtual disk of `layers[0]`, in order, to
/// `emit`.
pub fn walk(
    layers: &mut [Layer<'_>],
    emit: &mut dyn FnMut(Piece) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let size = layers[0].virtual_size;
    resolve(layers, 0, 0, size, emit)
}

/// Emits the pieces of [a, b) of `chain[0]` (image number `level`),
/// reading backing runs from the rest of the chain.
fn resolve(
    chain: &mut [Layer<'_>],
    level: usize,
    mut a: u64,
    b: u64,
    emit: &mut dyn FnMut(Piece) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let (layer, below) = chain.split_first_mut().expect("a non-empty chain");
    // A backing image smaller than its overlay reads as zeros past its end.
    let end = b.min(layer.virtual_size);
    while a < end {
        let e = layer.extent_at(a)?;
        let stop = end.min(e.offset + e.length);
        let length = stop - a;
        let skip = a - e.offset;
        match e.kind {
            ExtentKind::Zero => emit(Piece::Zero { offset: a, length })?,
            ExtentKind::Data(src) => emit(Piece::Data {
                offset: a,
                length,
                layer: level,
                source_offset: src + skip,
            })?,
            ExtentKind::Compressed(c) => emit(Piece::Compressed {
                offset: a,
                length,
                layer: level,
                extent: c,
                decoded: e.length,
                skip,
            })?,
            ExtentKind::Backing => {
                if below.is_empty() {
                    return Err(ConvertError::UnexpectedBacking {
                        image: layer.path.clone(),
                        offset: a,
                        length,
                    });
                }
                resolve(below, level + 1, a, stop, emit)?;
            }
        }
        a = stop;
    }
    if a < b {
        emit(Piece::Zero {
            offset: a,
            length: b - a,
        })?;
    }
    Ok(())
}
