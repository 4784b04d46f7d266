//! Files a user names as input: the one place they are opened. An image
//! source is a regular file or a block device (sized by seeking to its
//! end: its metadata says 0); everything else (a FIFO, a character device
//! such as /dev/zero, a socket, a directory) is refused with its type
//! named, before anything is read from it. Opening never blocks: the open
//! is non-blocking (a FIFO without a writer would otherwise hang it), and
//! the type is checked again on the opened descriptor, so a path swapped
//! between the check and the open is caught too. Files read whole (a
//! manifest, a wasm, a kernel, an initrd, a config file) are regular files
//! with a size bound, checked before the read and enforced during it.
//!
//! Errors are `std::io::Error`s that carry an [`InputError`], so callers
//! keep their own error types and still say what the file is.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a path turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
    Directory,
    Symlink,
    Other,
}

impl FileKind {
    pub fn of(t: std::fs::FileType) -> Self {
        if t.is_file() {
            FileKind::Regular
        } else if t.is_dir() {
            FileKind::Directory
        } else if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_block_device() {
            FileKind::BlockDevice
        } else if t.is_char_device() {
            FileKind::CharDevice
        } else if t.is_fifo() {
            FileKind::Fifo
        } else if t.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Other
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "a regular file",
            FileKind::BlockDevice => "a block device",
            FileKind::CharDevice => "a character device",
            FileKind::Fifo => "a FIFO",
            FileKind::Socket => "a socket",
            FileKind::Directory => "a directory",
            FileKind::Symlink => "a symlink",
            FileKind::Other => "not a file",
        })
    }
}

/// Which kinds of file an input may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (manifests, wasm, kernels, config files).
    Regular,
    /// Regular files and block devices (disk images).
    RegularOrBlock,
}

impl Accept {
    fn allows(self, kind: FileKind) -> bool {
        match self {
            Accept::Regular => kind == FileKind::Regular,
            Accept::RegularOrBlock => matches!(kind, FileKind::Regular | FileKind::BlockDevice),
        }
    }

    fn wanted(self) -> &'static str {
        match self {
            Accept::Regular => "a regular file",
            Accept::RegularOrBlock => "a regular file or a block device",
        }
    }
}

/// Why an input was refused. The path is named by the caller's error.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("it is {kind}, not {wanted}")]
    Kind {
        kind: FileKind,
        wanted: &'static str,
    },
    #[error("it is over the {max}-byte limit ({size} bytes)")]
    TooLarge { size: u64, max: u64 },
    #[error("it grew past the {max}-byte limit while it was read")]
    Grew { max: u64 },
    /// A stream (stdin, a pipe) has no size to check first: it is read up
    /// to the limit and refused at the first byte past it.
    #[error("it is over the {max}-byte limit (more than {max} bytes were read)")]
    StreamTooLarge { max: u64 },
}

impl InputError {
    /// The input error inside `e`, if `e` carries one.
    pub fn of(e: &io::Error) -> Option<&InputError> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            InputError::Kind { .. } => io::ErrorKind::InvalidInput,
            InputError::TooLarge { .. }
            | InputError::Grew { .. }
            | InputError::StreamTooLarge { .. } => io::ErrorKind::FileTooLarge,
        };
        io::Error::new(kind, self)
    }
}

/// An opened input and its size in bytes.
#[derive(Debug)]
pub struct Input {
    pub file: File,
    pub size: u64,
    pub kind: FileKind,
}

/// Opens `path` for reading if it is of a kind `accept` allows; never
/// blocks, never reads.
pub fn open(path: &Path, accept: Accept) -> io::Result<Input> {
    // Refused before it is opened: opening a device can have effects of
    // its own (a tape rewinds, a terminal becomes the controlling one).
    let kind = FileKind::of(std::fs::metadata(path)?.file_type());
    check(kind, accept)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    // The path may have been replaced since the stat: what counts is the
    // file that was opened.
    let meta = file.metadata()?;
    let kind = FileKind::of(meta.file_type());
    check(kind, accept)?;
    clear_nonblocking(&file)?;
    let size = match kind {
        FileKind::BlockDevice => {
            let mut f = &file;
            let end = f.seek(SeekFrom::End(0))?;
            f.seek(SeekFrom::Start(0))?;
            end
        }
        _ => meta.len(),
    };
    Ok(Input { file, size, kind })
}

fn check(kind: FileKind, accept: Accept) -> io::Result<()> {
    if accept.allows(kind) {
        Ok(())
    } else {
        Err(InputError::Kind {
            kind,
            wanted: accept.wanted(),
        }
        .into_io())
    }
}

/// Regular files and block devices ignore O_NONBLOCK for reads today;
/// clearing it keeps any future kind from returning EAGAIN mid-copy.
fn clear_nonblocking(file: &File) -> io::Result<()> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let flags = fcntl_getfl(file)?;
    fcntl_setfl(file, flags - OFlags::NONBLOCK)?;
    Ok(())
}

/// The whole of the regular file at `path`, refused when it is larger
/// than `max` bytes (or grows past it while it is read).
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let input = open(path, Accept::Regular)?;
    if input.size > max {
        return Err(InputError::TooLarge {
            size: input.size,
            max,
        }
        .into_io());
    }
    let mut bytes = Vec::with_capacity(crate::cast::usize_from(input.size));
    input
        .file
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(InputError::Grew { max }.into_io());
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_to_string_bounded(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()))
}

/// The whole of a stream (stdin, a pipe), refused once more than `max`
/// bytes arrive: at most `max + 1` bytes are read, so a writer that never
/// stops costs no more memory than the limit.
pub fn read_stream_bounded(reader: impl Read, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(InputError::StreamTooLarge { max }.into_io());
    }
    Ok(bytes)
}

/// Size bounds of the files read whole.
pub mod limits {
    /// A plugin manifest or the host config file.
    pub const TOML: u64 = 1 << 20;
    /// A plugin's wasm component (first-party ones are under 3 MB).
    pub const WASM: u64 = 64 << 20;
    /// A VM request (JSON) for `plugin call … plan|validate`, from a file
    /// or from stdin. A request names a handful of disks and settings: a
    /// few KiB; 1 MiB leaves room for any real one.
    pub const REQUEST: u64 = 1 << 20;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(e: io::Error) -> FileKind {
        match InputError::of(&e) {
            Some(InputError::Kind { kind, .. }) => *kind,
            other => panic!("{e}: {other:?}"),
        }
    }

    #[test]
    fn regular_files_open_with_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        for accept in [Accept::Regular, Accept::RegularOrBlock] {
            let i = open(&p, accept).unwrap();
            assert_eq!((i.size, i.kind), (5, FileKind::Regular));
        }
        assert_eq!(read_bounded(&p, 5).unwrap(), b"hello");
        let e = read_bounded(&p, 4).unwrap_err();
        assert!(matches!(
            InputError::of(&e),
            Some(InputError::TooLarge { size: 5, max: 4 })
        ));
        assert!(e.to_string().contains("4-byte limit"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &p, rustix::fs::Mode::from(0o600)).unwrap();
        // No writer: a blocking open would hang here.
        for accept in [Accept::Regular, Accept::RegularOrBlock] {
            assert_eq!(kind_of(open(&p, accept).unwrap_err()), FileKind::Fifo);
        }
        let e = read_bounded(&p, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "it is a FIFO, not a regular file");
    }

    #[test]
    fn devices_directories_and_symlinks_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("zero-link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        for p in [Path::new("/dev/zero"), Path::new("/dev/null"), &link] {
            let e = open(p, Accept::RegularOrBlock).unwrap_err();
            assert_eq!(kind_of(e), FileKind::CharDevice, "{}", p.display());
            let e = read_bounded(p, u64::MAX - 1).unwrap_err();
            assert_eq!(
                e.to_string(),
                "it is a character device, not a regular file"
            );
        }
        let e = open(dir.path(), Accept::RegularOrBlock).unwrap_err();
        assert_eq!(kind_of(e), FileKind::Directory);
        assert_eq!(
            open(&dir.path().join("missing"), Accept::Regular)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn streams_are_read_up_to_the_limit_and_no_further() {
        assert_eq!(read_stream_bounded(&[7u8; 16][..], 16).unwrap(), [7; 16]);
        // An endless writer (io::repeat) is cut off one byte past the limit.
        let e = read_stream_bounded(io::repeat(b'x'), 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert!(matches!(
            InputError::of(&e),
            Some(InputError::StreamTooLarge { max: 16 })
        ));
        assert_eq!(
            e.to_string(),
            "it is over the 16-byte limit (more than 16 bytes were read)"
        );
    }
}
