//! Opening files under the store's root. Nothing under the root is
//! reached through a symbolic link (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, every component; `O_NOFOLLOW` on the last one
//! where the kernel has no `openat2`), and only regular files are opened:
//! a symlink planted in `tmp/` never redirects a write outside the store,
//! and a FIFO never blocks a pull (files are opened non-blocking and
//! checked with `fstat` before any read or write).
//!
//! The root itself may be a symlink (`/var/lib/cocoon-host` on another
//! disk): it is the operator's choice, and everything is resolved beneath
//! it.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::local::file_type_name;
use super::StoreError;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Read and write; created with mode 0600 if missing.
    ReadWriteCreate,
}

/// A file under `root` (a relative path), without following symlinks,
/// regular files only. `Ok(None)` when it does not exist.
pub fn open(root: &Path, rel: &Path, access: Access) -> Result<Option<File>, StoreError> {
    let full = root.join(rel);
    let flags = match access {
        Access::Read => OFlags::RDONLY,
        Access::ReadWriteCreate => OFlags::RDWR | OFlags::CREATE,
    } | OFlags::NOFOLLOW
        | OFlags::NONBLOCK
        | OFlags::NOCTTY
        | OFlags::CLOEXEC;
    // openat2 refuses a mode without O_CREAT.
    let mode = match access {
        Access::Read => Mode::empty(),
        Access::ReadWriteCreate => Mode::from_raw_mode(0o600),
    };
    let fd = match open_beneath(root, rel, flags, mode) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e @ (Errno::LOOP | Errno::XDEV | Errno::NXIO | Errno::ISDIR)) => {
            // A symlink (the last component or one above it), a socket,
            // or a FIFO without a reader: name what is there.
            return Err(match kind_at(root, rel) {
                Some(kind) if kind != FileType::RegularFile => StoreError::NotRegular {
                    path: full,
                    kind: file_type_name(kind),
                },
                _ => StoreError::io("opening", &full)(e.into()),
            });
        }
        Err(e) => return Err(StoreError::io("opening", &full)(e.into())),
    };
    let kind = rustix::fs::fstat(&fd)
        .map(|st| FileType::from_raw_mode(st.st_mode))
        .map_err(|e| StoreError::io("reading metadata of", &full)(e.into()))?;
    if kind != FileType::RegularFile {
        return Err(StoreError::NotRegular {
            path: full,
            kind: file_type_name(kind),
        });
    }
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())
        .map_err(|e| StoreError::io("opening", &full)(e.into()))?;
    Ok(Some(File::from(fd)))
}

/// Reads a whole small file under `root` (records, validators, digest
/// files) the same way. `Ok(None)` when it does not exist.
pub fn read(root: &Path, rel: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(mut f) = open(root, rel, Access::Read)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    io::Read::read_to_end(&mut f, &mut out).map_err(StoreError::io("reading", root.join(rel)))?;
    Ok(Some(out))
}

/// The type and size of `rel` under `root`, not following a symlink at
/// the end. `None` when it does not exist.
pub fn lstat(root: &Path, rel: &Path) -> Option<(FileType, u64)> {
    let st = rustix::fs::statat(rustix::fs::CWD, root.join(rel), AtFlags::SYMLINK_NOFOLLOW).ok()?;
    Some((
        FileType::from_raw_mode(st.st_mode),
        u64::try_from(st.st_size).unwrap_or(0),
    ))
}

fn kind_at(root: &Path, rel: &Path) -> Option<FileType> {
    lstat(root, rel).map(|(k, _)| k)
}

fn open_beneath(root: &Path, rel: &Path, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    match rustix::fs::openat2(
        &dir,
        rel,
        flags,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    ) {
        // No openat2 (a kernel before 5.6, or a seccomp filter): the
        // last component is still never followed.
        Err(Errno::NOSYS) => rustix::fs::openat(&dir, rel, flags, mode),
        r => r,
    }
}

/// Checks that `dir` is a directory and not a symlink to one, creating it
/// (mode 0700) if missing, and takes group and other permissions away.
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    let not_dir = |m: &std::fs::Metadata| StoreError::NotDirectory {
        path: dir.to_path_buf(),
        kind: file_type_name(FileType::from_raw_mode(
            std::os::unix::fs::MetadataExt::mode(m),
        )),
    };
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => return Err(not_dir(&m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(dir)
            {
                Ok(()) => {}
                // Another process opening a new store made it first (eight
                // concurrent first pulls did): a directory is all we need.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let m = std::fs::symlink_metadata(dir)
                        .map_err(StoreError::io("reading metadata of", dir))?;
                    if !m.is_dir() {
                        return Err(not_dir(&m));
                    }
                }
                Err(e) => return Err(StoreError::io("creating", dir)(e)),
            }
        }
        Err(e) => return Err(StoreError::io("reading metadata of", dir)(e)),
    }
    tighten(dir, 0o700)
}

/// Like [`private_dir`] for a root, which may be a symlink to a
/// directory elsewhere: created (0700) if missing. An existing one is
/// tightened when `ours` (the store's own root); a directory the operator
/// named (the state dir) is never chmod-ed behind their back (it could be
/// a shared one): a warning says it is open.
pub fn private_root(dir: &Path, ours: bool) -> Result<(), StoreError> {
    if !dir.exists() {
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .recursive(true)
            .create(dir)
            .map_err(StoreError::io("creating", dir))?;
        return Ok(());
    }
    let real = std::fs::canonicalize(dir).map_err(StoreError::io("resolving", dir))?;
    if !real.is_dir() {
        return Err(StoreError::NotDirectory {
            path: dir.to_path_buf(),
            kind: "not a directory",
        });
    }
    if ours {
        return tighten(&real, 0o700);
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&real)
        .map_err(StoreError::io("reading metadata of", &real))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o7777),
            "the state directory is open to others (the store inside it is private); chmod 700 it"
        );
    }
    Ok(())
}

/// Clears group and other permission bits of `path` (which exists), and
/// caps the owner's at `max`.
pub fn tighten(path: &Path, max: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::symlink_metadata(path).map_err(StoreError::io("reading metadata of", path))?;
    let mode = m.permissions().mode() & 0o7777;
    let want = mode & max & 0o700;
    if mode != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))
            .map_err(StoreError::io("chmod", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fifo(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    #[test]
    fn only_regular_files_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::fs::write(root.join("sub/ok"), b"ok").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sub/link")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("dirlink")).unwrap();
        fifo(&root.join("sub/fifo"));

        assert_eq!(read(&root, Path::new("sub/ok")).unwrap().unwrap(), b"ok");
        assert!(read(&root, Path::new("sub/none")).unwrap().is_none());
        for (rel, kind) in [
            ("sub/link", "a symbolic link"),
            ("sub/fifo", "a FIFO"),
            ("sub", "a directory"),
        ] {
            for access in [Access::Read, Access::ReadWriteCreate] {
                match open(&root, Path::new(rel), access) {
                    Err(StoreError::NotRegular { kind: k, path }) => {
                        assert_eq!((k, path), (kind, root.join(rel)), "{rel} {access:?}")
                    }
                    other => panic!("{rel} {access:?}: {:?}", other.map(|_| ())),
                }
            }
        }
        // A symlinked directory on the way is not followed either.
        assert!(open(&root, Path::new("dirlink/ok"), Access::Read).is_err());
        assert!(open(&root, Path::new("../outside"), Access::Read).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        // Created files are private.
        open(&root, Path::new("sub/new"), Access::ReadWriteCreate)
            .unwrap()
            .unwrap();
        let mode = std::fs::metadata(root.join("sub/new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    #[test]
    fn private_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        private_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(matches!(
            private_dir(&link),
            Err(StoreError::NotDirectory { .. })
        ));
    }
}
