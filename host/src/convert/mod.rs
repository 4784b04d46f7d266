//! The conversion engine: probe, map through a converter plugin, copy data
//! extents, decode compressed ones in parallel, write a sparse raw file.
//!
//! This is the API the image store calls; the conversion helper implements
//! it and may add to it, but keeps these names and fields.
//!
//! - [`detect`]: magic numbers, and which plugin reads a file.
//! - [`decompress`]: xz, gzip and zstd downloads unpacked before probing.
//! - [`backing`]: backing-file names checked and resolved, the chain opened.
//! - [`walk`]: the extent maps of a chain, merged into one stream of pieces.
//! - [`decode`]: the pool of plugin instances that decode compressed pieces.
//! - [`output`]: the sparse raw file (temp name, copy_file_range, fsync,
//!   rename).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::plugin::{LoadedPlugin, PluginError, PluginKind, Registry, Runtime};

pub mod backing;
pub mod decode;
pub mod decompress;
pub mod detect;
pub mod output;
pub mod walk;

pub use backing::{check_backing_name, DirResolver};

/// Backing chains deeper than this are refused.
pub const MAX_CHAIN_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no format-converter plugin is available")]
    NoConverters,
    #[error("{}: no converter plugin reads this file", path.display())]
    Unrecognised { path: PathBuf },
    #[error("{}: forced format {forced} disagrees with the probe ({probed})", path.display())]
    FormatMismatch {
        path: PathBuf,
        forced: String,
        probed: String,
    },
    #[error("{}: the file starts like {magic} but no converter plugin claims it (best probe: {probed})", path.display())]
    MagicWithoutPlugin {
        path: PathBuf,
        magic: &'static str,
        probed: String,
    },
    #[error("{}: still compressed ({codec}) after {layers} layers of decompression", path.display())]
    TooManyCompressionLayers {
        path: PathBuf,
        codec: &'static str,
        layers: usize,
    },
    #[error("{}: decompressing {codec}", path.display())]
    Decompress {
        path: PathBuf,
        codec: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: backing file name {name:?} refused: {reason}", image.display())]
    BackingName {
        image: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error("{}: backing file {name:?} is not an image this host holds (give its directory with --backing-dir)", image.display())]
    BackingNotFound { image: PathBuf, name: String },
    #[error("{}: backing chain loops back to {}", image.display(), again.display())]
    BackingLoop { image: PathBuf, again: PathBuf },
    #[error("{}: backing chain deeper than {MAX_CHAIN_DEPTH} images", image.display())]
    ChainTooDeep { image: PathBuf },
    #[error("{}: the converter maps {offset}+{length} to a backing file, but the image has none", image.display())]
    UnexpectedBacking {
        image: PathBuf,
        offset: u64,
        length: u64,
    },
    #[error("{}: {detail}", image.display())]
    Invalid { image: PathBuf, detail: String },
    #[error("starting decoder thread {index} of {workers}")]
    Spawn {
        index: usize,
        workers: usize,
        #[source]
        source: std::io::Error,
    },
}

impl ConvertError {
    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| ConvertError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
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
    /// The compression the source came in (xz, gzip, zstd), unpacked
    /// before probing.
    pub decompressed: Vec<&'static str>,
    /// Images of the backing chain below the source, nearest first.
    pub backing_chain: Vec<PathBuf>,
}

fn as_secs_f64<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The enabled format-converter plugins, loaded, with their digests.
pub struct Converters {
    pub plugins: Vec<LoadedPlugin>,
    pub sha256: Vec<String>,
}

impl Converters {
    /// Loads every enabled converter plugin of `registry`. One that fails
    /// to load is logged and skipped: a broken third-party plugin must not
    /// stop conversions the others can do.
    pub fn load(runtime: &Runtime, registry: &Registry) -> Result<Self, ConvertError> {
        let mut plugins = Vec::new();
        let mut sha256 = Vec::new();
        for info in registry.list() {
            if info.manifest.kind != PluginKind::FormatConverter || info.disabled {
                continue;
            }
            match registry.load(runtime, info.name()) {
                Ok(p) => {
                    plugins.push(p);
                    sha256.push(info.sha256.clone());
                }
                Err(e) => {
                    tracing::warn!(plugin = info.name(), error = %e, "converter plugin skipped")
                }
            }
        }
        if plugins.is_empty() {
            return Err(ConvertError::NoConverters);
        }
        Ok(Converters { plugins, sha256 })
    }
}

/// Converts `req.source` to a sparse raw file at `req.dest`.
pub fn convert(
    runtime: &Runtime,
    registry: &Registry,
    req: &ConvertRequest<'_>,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let converters = Converters::load(runtime, registry)?;
    convert_with(&converters, req, progress)
}

/// [`convert`] with converters already loaded (callers converting many
/// images load them once).
pub fn convert_with(
    converters: &Converters,
    req: &ConvertRequest<'_>,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    // Before any work: a destination that cannot be replaced fails now,
    // not after minutes of conversion.
    output::check_destination(req.dest)?;
    let scratch_dir = output::parent_dir(req.dest);
    output::remove_stale_temps(scratch_dir);
    let unpacked = decompress::unpack(req.source, scratch_dir)?;
    let source = unpacked.file.as_ref().map_or(req.source, |t| t.path());
    let (top, format) = detect::choose(converters, source, req.format)?;
    let mut layers =
        backing::open_chain(converters, req.source, source, top, &format, req.backing)?;
    let virtual_size = layers[0].virtual_size;
    let out = output::Output::create(req.dest, virtual_size)?;
    let jobs = match req.jobs {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    progress.start(virtual_size);
    let plugins: Vec<&LoadedPlugin> = layers
        .iter()
        .map(|l| &converters.plugins[l.plugin])
        .collect();
    let sources: Vec<(PathBuf, std::fs::File)> = layers
        .iter()
        .map(|l| l.file.try_clone().map(|f| (l.path.clone(), f)))
        .collect::<Result<_, _>>()
        .map_err(ConvertError::io("opening", source))?;
    decode::run(jobs, &plugins, &sources, &out, progress, |pool| {
        walk::walk(&mut layers, &mut |piece| match piece {
            walk::Piece::Zero { length, .. } => {
                progress.advance(length);
                Ok(())
            }
            walk::Piece::Data {
                offset,
                length,
                layer,
                source_offset,
            } => {
                let (path, file) = &sources[layer];
                out.copy_from(file, path, source_offset, offset, length)?;
                progress.advance(length);
                Ok(())
            }
            walk::Piece::Compressed {
                offset,
                length,
                layer,
                extent,
                decoded,
                skip,
            } => pool.submit(decode::Job {
                layer,
                extent,
                decoded,
                skip,
                offset,
                length,
            }),
        })
    })?;
    let backing_chain = layers[1..].iter().map(|l| l.path.clone()).collect();
    drop(layers);
    let allocated_bytes = out.finish()?;
    progress.finish();
    Ok(ConvertReport {
        format,
        virtual_size,
        allocated_bytes,
        duration: started.elapsed(),
        converter: converters.plugins[top].name().to_string(),
        converter_sha256: converters.sha256[top].clone(),
        decompressed: unpacked.codecs,
        backing_chain,
    })
}
