//! Files a user names as output. A command replaces a regular file, or
//! creates a new one; anything else at the path (a character device such
//! as /dev/null, a disk's block device, a FIFO, a directory, a symlink) is
//! refused with its type named: renaming over it would destroy a system
//! file, or write through a link to somewhere else.

use std::io;
use std::path::Path;

use super::input::FileKind;

/// Why an output path was refused. The path is named by the caller.
#[derive(Debug, thiserror::Error)]
#[error("it is {kind}; only a regular file is replaced")]
pub struct NotReplaceable {
    pub kind: FileKind,
}

/// Ok when `path` does not exist or is a regular file (not a symlink).
pub fn check_replaceable(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            NotReplaceable {
                kind: FileKind::of(m.file_type()),
            },
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_and_new_paths_are_replaceable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o600)).unwrap();
        check_replaceable(&file).unwrap();
        check_replaceable(&dir.path().join("new")).unwrap();
        for (path, kind) in [
            (Path::new("/dev/null"), FileKind::CharDevice),
            (dir.path(), FileKind::Directory),
            (&link, FileKind::Symlink),
            (&fifo, FileKind::Fifo),
        ] {
            let e = check_replaceable(path).unwrap_err();
            let inner = e.get_ref().and_then(|i| i.downcast_ref::<NotReplaceable>());
            assert_eq!(inner.map(|n| n.kind), Some(kind), "{}", path.display());
        }
    }
}
