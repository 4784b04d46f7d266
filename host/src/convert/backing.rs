//! Backing files. An image names its backing file; the name is untrusted:
//! it is checked here, then handed to the caller's [`BackingResolver`],
//! which maps it only onto images the host already holds. Never a path
//! the image chose.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use super::walk::Layer;
use super::{detect, BackingResolver, ConvertError, Converters, MAX_CHAIN_DEPTH};

/// Why a backing file name is refused, or None when it may be resolved.
pub fn check_backing_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.contains('\0') || name.contains('\n') {
        return Some("it contains a NUL or newline");
    }
    if name
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("json:"))
    {
        return Some("json: pseudo-protocol names are not files");
    }
    if name.starts_with('/') {
        return Some("it is an absolute path");
    }
    if Path::new(name)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Some("it climbs out of its directory with ..");
    }
    // qemu reads `proto:rest` (nbd:, http:, …) as a protocol, not a file.
    if name
        .split('/')
        .next()
        .is_some_and(|first| first.contains(':'))
    {
        return Some("it names a protocol (a ':' before the first '/')");
    }
    None
}

/// Resolves backing names inside one directory (the CLI's
/// `--backing-dir`): the name, joined to the directory, must stay inside
/// it after symlinks are followed and be a regular file.
pub struct DirResolver {
    dir: PathBuf,
}

impl DirResolver {
    /// Fails unless `dir` is a directory, saying what it is instead.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let dir = dir.canonicalize()?;
        let meta = std::fs::metadata(&dir)?;
        if !meta.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!(
                    "it is {}, not a directory",
                    crate::fsutil::input::FileKind::of(meta.file_type())
                ),
            ));
        }
        Ok(DirResolver { dir })
    }
}

impl BackingResolver for DirResolver {
    fn resolve(&self, _child: &Path, name: &str) -> Option<PathBuf> {
        if check_backing_name(name).is_some() {
            return None;
        }
        let path = self.dir.join(name).canonicalize().ok()?;
        (path.starts_with(&self.dir) && path.is_file()).then_some(path)
    }
}

/// Opens `source` (read from `path`, which differs when the source was
/// unpacked) and every image of its backing chain, nearest first.
pub fn open_chain<'c>(
    converters: &'c Converters,
    source: &Path,
    path: &Path,
    plugin: usize,
    format: &str,
    resolver: &dyn BackingResolver,
) -> Result<Vec<Layer<'c>>, ConvertError> {
    let mut layers = vec![Layer::open(converters, plugin, source, path, format)?];
    let mut seen = HashSet::new();
    seen.insert(
        path.canonicalize()
            .map_err(ConvertError::io("resolving", path))?,
    );
    loop {
        let child = layers.last_mut().expect("one layer at least");
        let Some(name) = child.session.backing()? else {
            return Ok(layers);
        };
        let image = child.path.clone();
        if let Some(reason) = check_backing_name(&name) {
            return Err(ConvertError::BackingName {
                image,
                name,
                reason,
            });
        }
        if layers.len() == MAX_CHAIN_DEPTH {
            return Err(ConvertError::ChainTooDeep {
                image: source.to_path_buf(),
            });
        }
        let resolved =
            resolver
                .resolve(&image, &name)
                .ok_or_else(|| ConvertError::BackingNotFound {
                    image: image.clone(),
                    name: name.clone(),
                })?;
        let canonical = resolved
            .canonicalize()
            .map_err(ConvertError::io("resolving", &resolved))?;
        if !seen.insert(canonical.clone()) {
            return Err(ConvertError::BackingLoop {
                image,
                again: canonical,
            });
        }
        let (plugin, format) = detect::choose(converters, &canonical, None)?;
        layers.push(Layer::open(
            converters, plugin, &canonical, &canonical, &format,
        )?);
    }
}

/// Opens a file for the host's own reads of data extents.
pub(crate) fn open_source(path: &Path) -> Result<File, ConvertError> {
    super::decompress::open_image(path).map(|i| i.file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names() {
        for (name, refused) in [
            ("base.qcow2", false),
            ("images/base.qcow2", false),
            ("./base.qcow2", false),
            ("", true),
            ("../../etc/passwd", true),
            ("a/../../b", true),
            ("/etc/passwd", true),
            ("json:{\"file\":{\"filename\":\"/etc/shadow\"}}", true),
            ("JSON:{}", true),
            ("nbd:localhost:10809", true),
            ("https://example.com/x", true),
            ("a\0b", true),
        ] {
            assert_eq!(check_backing_name(name).is_some(), refused, "{name:?}");
        }
    }

    #[test]
    fn dir_resolver_stays_inside() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("images");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("base"), b"x").unwrap();
        std::fs::write(root.path().join("outside"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("outside"), dir.join("link")).unwrap();
        let r = DirResolver::new(&dir).unwrap();
        let child = dir.join("child");
        assert_eq!(
            r.resolve(&child, "base"),
            Some(dir.canonicalize().unwrap().join("base"))
        );
        assert_eq!(r.resolve(&child, "link"), None);
        assert_eq!(r.resolve(&child, "../outside"), None);
        assert_eq!(r.resolve(&child, "missing"), None);
    }
}
