//! A disk file being made: written under `.NAME.tmp-…` beside its final
//! name, fsynced, then linked into place only if nothing is there (a disk
//! is never overwritten by creation). Dropped before [`NewFile::commit`],
//! the temp file is removed; after a crash, the next holder of the disk's
//! lock removes it (the name is the one [`super::lock`] repairs).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::fsutil;

pub struct NewFile {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl NewFile {
    /// An empty temp file for `dest`, mode 0600.
    pub fn create(dest: &Path) -> io::Result<NewFile> {
        let tmp = super::lock::temp_path(dest)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(NewFile {
            file,
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temp file's path (for tools such as mkfs.ext4).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// fsyncs the file, gives it its final name unless that exists
    /// (`AlreadyExists`), and fsyncs the directory.
    pub fn commit(mut self) -> io::Result<PathBuf> {
        self.file.sync_all()?;
        fs::hard_link(&self.tmp, &self.dest)?;
        self.done = true;
        fs::remove_file(&self.tmp)?;
        let dir = match self.dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fsutil::sync_dir(dir)?;
        Ok(self.dest.clone())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn commit_never_overwrites_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d.raw");
        let n = NewFile::create(&dest).unwrap();
        assert!(n
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".d.raw.tmp-"));
        n.file().write_all(b"one").unwrap();
        n.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"one");

        let n = NewFile::create(&dest).unwrap();
        n.file().write_all(b"two").unwrap();
        let e = n.commit().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&dest).unwrap(), b"one");

        drop(NewFile::create(&dir.path().join("other.raw")).unwrap());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["d.raw"]);
    }
}
