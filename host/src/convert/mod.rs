//! The conversion engine: probe, map through a converter plugin, copy data
//! extents, decode compressed ones in parallel, write a sparse raw file.
//!
//! This is the API the image store calls; the conversion helper implements
//! it and may add to it, but keeps these names and fields.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::plugin::{PluginError, Registry, Runtime};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("not implemented yet: conversion")]
    NotImplemented,
}

/// Resolves a backing file name an image stores into a local image the
/// host already holds; never an arbitrary path.
pub trait BackingResolver {
    /// The path of the backing image named `name` by the image at `child`,
    /// or None when the host holds no such image.
    fn resolve(&self, child: &Path, name: &str) -> Option<PathBuf>;
}

/// Resolves no backing file at all.
pub struct NoBacking;

impl BackingResolver for NoBacking {
    fn resolve(&self, _child: &Path, _name: &str) -> Option<PathBuf> {
        None
    }
}

/// Progress of a long conversion, in bytes of the virtual disk.
pub trait Progress: Sync {
    fn start(&self, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}

pub struct ConvertRequest<'a> {
    /// The source image (already digest-verified by the caller when it
    /// comes from the store).
    pub source: &'a Path,
    /// The raw file to write (via a temp name, fsync, rename).
    pub dest: &'a Path,
    /// A forced format; the probe must agree.
    pub format: Option<&'a str>,
    pub backing: &'a dyn BackingResolver,
    /// Decoder instances in parallel; 0 means one per core.
    pub jobs: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertReport {
    pub format: String,
    pub virtual_size: u64,
    /// Bytes of the output that are not holes.
    pub allocated_bytes: u64,
    #[serde(serialize_with = "as_secs_f64")]
    pub duration: Duration,
    /// The converter plugin used, and the sha256 of its wasm: part of the
    /// conversion cache key.
    pub converter: String,
    pub converter_sha256: String,
}

fn as_secs_f64<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Converts `req.source` to a sparse raw file at `req.dest`.
pub fn convert(
    _runtime: &Runtime,
    _registry: &Registry,
    _req: &ConvertRequest<'_>,
    _progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    Err(ConvertError::NotImplemented)
}
