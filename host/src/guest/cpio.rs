//! A writer of `newc` cpio archives, the format the kernel unpacks into
//! its initramfs (Documentation/driver-api/early-userspace/buffer-format).
//! The entries are ours (busybox, modules, the init script), so this writes
//! exactly what the kernel reads: regular files, directories and device
//! nodes, all owned by root, mtime 0 (the archive is reproducible).

use std::io::{self, Write};

/// Builds an archive in memory; [`Archive::finish`] adds the trailer.
pub struct Archive {
    out: Vec<u8>,
    next_ino: u32,
}

/// What one entry is.
pub enum Kind<'a> {
    Dir,
    File(&'a [u8]),
    /// A character device (major, minor).
    Char(u32, u32),
}

impl Archive {
    pub fn new() -> Self {
        Archive {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds `name` (relative, no leading `/`) with permission bits `perm`.
    pub fn add(&mut self, name: &str, perm: u32, kind: Kind<'_>) {
        let (ftype, data, rdev): (u32, &[u8], (u32, u32)) = match kind {
            Kind::Dir => (0o040000, &[], (0, 0)),
            Kind::File(d) => (0o100000, d, (0, 0)),
            Kind::Char(major, minor) => (0o020000, &[], (major, minor)),
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if ftype == 0o040000 { 2 } else { 1 };
        self.header(ino, ftype | (perm & 0o7777), nlink, data.len(), rdev, name);
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
        name: &str,
    ) {
        let size = u32::try_from(size).expect("an initramfs entry under 4 GiB");
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1)
                .expect("the initramfs holds host-chosen paths of a few dozen bytes"),
            0, // check (newc has none)
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, 1, 0, (0, 0), "TRAILER!!!");
        self.out
    }
}

/// `data` gzip'd (the kernel's initramfs decompressors always include
/// gzip). mtime 0 in the gzip header too.
pub fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// busybox's cpio (a real reader) lists and extracts what we wrote.
    #[test]
    fn busybox_cpio_reads_it_back() {
        let Ok(busybox) = which("busybox") else {
            eprintln!("SKIPPED: no busybox");
            return;
        };
        let mut a = Archive::new();
        a.add("bin", 0o755, Kind::Dir);
        a.add("bin/hello", 0o755, Kind::File(b"#!/bin/sh\necho hi\n"));
        a.add("odd", 0o644, Kind::File(b"abc")); // unaligned size
        a.add("dev", 0o755, Kind::Dir);
        let bytes = a.finish();
        assert!(bytes.len().is_multiple_of(4));
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(&busybox)
            .args(["cpio", "-i", "-d"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        use std::os::unix::fs::PermissionsExt;
        let hello = dir.path().join("bin/hello");
        assert_eq!(std::fs::read(&hello).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(
            std::fs::metadata(&hello).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(std::fs::read(dir.path().join("odd")).unwrap(), b"abc");
        assert!(dir.path().join("dev").is_dir());
    }

    fn which(name: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
