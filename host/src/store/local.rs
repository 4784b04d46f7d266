//! Local files as image references: which references name one, the one
//! call that opens it, and its copy into the store.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::fsutil::input;

use super::blob::{Layout, Staged};
use super::digest::Digest;
use super::download::{check_space, Outcome, Progress, Validators, CHUNK};
use super::StoreError;

/// A local file reference made absolute: `file:///abs`, an absolute path,
/// or a relative path (`./x`, `../x`, or a bare name like `disk.img`)
/// that exists. Anything with `://` is not local; a bare name that does
/// not exist is not either (it may be a digest, or a typo reported by the
/// caller).
pub fn local_path(reference: &str) -> Option<PathBuf> {
    let p = if let Some(rest) = reference.strip_prefix("file://") {
        PathBuf::from(rest)
    } else if reference.contains("://") || reference.is_empty() {
        return None;
    } else if reference.starts_with('/')
        || reference.starts_with("./")
        || reference.starts_with("../")
        || Path::new(reference).symlink_metadata().is_ok()
    {
        PathBuf::from(reference)
    } else {
        return None;
    };
    std::path::absolute(p).ok()
}

/// An opened local input with its size.
pub struct LocalInput {
    pub file: File,
    pub stat: rustix::fs::Stat,
    pub size: u64,
}

/// Opens a user-named local file to copy into the store through the
/// host's one input opener: a regular file or a block device (sized by
/// seeking), never a FIFO (it would block) or a character device such as
/// /dev/zero (it would read without end).
pub fn open_input(path: &Path) -> Result<LocalInput, StoreError> {
    let input = input::open(path, input::Accept::RegularOrBlock)
        .map_err(StoreError::io("opening", path))?;
    let stat = rustix::fs::fstat(&input.file)
        .map_err(|e| StoreError::io("reading metadata of", path)(e.into()))?;
    Ok(LocalInput {
        file: input.file,
        stat,
        size: input.size,
    })
}

/// How a file type is named in messages.
pub fn file_type_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// The validator of a local file: it changed if any of these did.
pub fn local_validator(meta: &rustix::fs::Stat) -> String {
    format!(
        "local:{}:{}.{}:{}",
        meta.st_size, meta.st_mtime, meta.st_mtime_nsec, meta.st_ino
    )
}

/// Copies a local file into the store, hashing it on the way. `known` is
/// the validator of the copy we hold: when the file still matches it,
/// nothing is read.
pub fn copy_local(
    layout: &Layout,
    path: &Path,
    expected: Option<&Digest>,
    known: Option<&str>,
    progress: &dyn Progress,
) -> Result<(Outcome, String), StoreError> {
    let input = open_input(path)?;
    let validator = local_validator(&input.stat);
    if known == Some(validator.as_str()) {
        return Ok((Outcome::NotModified, validator));
    }
    check_space(&layout.tmp_dir(), input.size)?;
    let key = format!("l-{}", super::index::key(&path.to_string_lossy()));
    let _stage_lock = layout.lock(&format!("1-stage-{key}"))?;
    let mut staged = Staged::open(layout, &key, false)?;
    let what = path.display().to_string();
    progress.start(&what, Some(input.size), 0);
    let mut file = input.file;
    let mut buf = vec![0u8; CHUNK];
    let copied = loop {
        let n = match std::io::Read::read(&mut file, &mut buf) {
            Ok(n) => n,
            Err(e) => break Err(StoreError::io("reading", path)(e)),
        };
        if n == 0 {
            break Ok(());
        }
        if let Err(e) = staged.write_all(&buf[..n]) {
            break Err(e);
        }
        progress.advance(n as u64);
    };
    progress.stop();
    if let Err(e) = copied {
        staged.discard();
        return Err(e);
    }
    let blob = layout.commit(staged, &what, expected, None)?;
    progress.stored(&what, &blob);
    let validators = Validators {
        etag: Some(validator.clone()),
        last_modified: None,
    };
    Ok((Outcome::Fetched { blob, validators }, validator))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_references_are_local() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(local_path("file:///a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(local_path("/a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(local_path("./x"), Some(cwd.join("x")));
        assert_eq!(local_path("../x"), Some(cwd.join("../x")));
        assert!(local_path("https://a/b").is_none());
        assert!(local_path("site://x").is_none());
        assert!(local_path("").is_none());
        assert!(local_path("no-such-file-here.img").is_none());
        // A bare relative name that exists is a file (tests run in the
        // crate's directory).
        assert_eq!(local_path("Cargo.toml"), Some(cwd.join("Cargo.toml")));
        assert_eq!(local_path("src/lib.rs"), Some(cwd.join("src/lib.rs")));
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(open_input(&f).unwrap().size, 3);
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let cases: [(&Path, &str); 3] = [
            (&fifo, "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ];
        for (p, kind) in cases {
            match open_input(p) {
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    assert!(msg.contains(&format!("it is {kind}")), "{p:?}: {msg}");
                }
                Ok(i) => panic!("{p:?} opened, size {}", i.size),
            }
        }
    }
}
