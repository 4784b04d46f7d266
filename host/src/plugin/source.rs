//! The read-at source a converter sees: a host file, read with pread, each
//! read capped so a plugin cannot make the host allocate without bound.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::bindings::{ErrorKind, WitError};

/// The largest single read a plugin may ask for.
pub const MAX_READ: u32 = 4 << 20;

/// A source file handed to a plugin as a `source` resource.
#[derive(Debug)]
pub struct SourceFile {
    file: File,
    size: u64,
    path: PathBuf,
}

impl SourceFile {
    /// Opens an image: a regular file or a block device (sized by
    /// seeking), never a FIFO or character device (see fsutil::input).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let crate::fsutil::input::Input { file, size, .. } =
            crate::fsutil::input::open(path, crate::fsutil::input::Accept::RegularOrBlock)?;
        Ok(SourceFile {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Up to `len` bytes at `offset`; short only at the end of the file.
    pub fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, WitError> {
        if len > MAX_READ {
            return Err(WitError::new(
                ErrorKind::LimitExceeded,
                format!("read of {len} bytes is over the {MAX_READ}-byte limit"),
            ));
        }
        let end = offset.saturating_add(len as u64).min(self.size);
        let want = crate::cast::usize_from(end.saturating_sub(offset));
        let mut buf = vec![0u8; want];
        let mut done = 0;
        while done < want {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(WitError::new(
                        ErrorKind::Io,
                        format!("reading {} at {offset}: {e}", self.path.display()),
                    ))
                }
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_capped_and_short_only_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, (0..100u8).collect::<Vec<_>>()).unwrap();
        let s = SourceFile::open(&p).unwrap();
        assert_eq!(s.size(), 100);
        assert_eq!(s.read_at(10, 3).unwrap(), vec![10, 11, 12]);
        assert_eq!(s.read_at(98, 10).unwrap(), vec![98, 99]);
        assert!(s.read_at(100, 10).unwrap().is_empty());
        assert!(s.read_at(u64::MAX, 10).unwrap().is_empty());
        let e = s.read_at(0, MAX_READ + 1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::LimitExceeded);
    }
}
