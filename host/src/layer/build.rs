//! The read-only filesystem of a layer, built from its checked [`Tree`]
//! by Debian's `mksquashfs`.
//!
//! squashfs-tools 4.5 reads a tar on its standard input (`-tar`); the tar
//! it is given is written here from the tree, never the layer's own: every
//! name is one the checks accepted, parents come before children, hard
//! links after what they link to, whiteouts are written as 0/0 character
//! devices and opaque directories carry `trusted.overlay.opaque=y` as a
//! PAX xattr record. File contents are copied from the layer's tar by
//! their extents (the kernel moves them: sendfile/splice into the pipe).
//! The root directory's mode and owner go on the command line
//! (`-root-mode/-uid/-gid`). Its time does not: in tar mode 4.5.1 ignores
//! `-root-time` and stamps the root with the build's wall clock, which
//! made a rebuild differ from the first build. So the inode table is
//! written uncompressed (`-noI`) and [`pin_root_time`] writes the root's
//! time into the built image: every byte then follows from the tree.
//! Debian 12's erofs-utils (1.5) has no tar input, so squashfs it is.
//!
//! The build is reproducible: the same layer, reader plugin and tool
//! build give the same bytes on any host, and a rebuild of a layer the
//! store lost gives back the squashfs a snapshot pinned by digest (the
//! clone/restore preflight rebuilds missing layers and requires exactly
//! that: [`crate::snapshot::layers`]), which also lets hosts of a fleet
//! share snapshots. What makes it so:
//! - the tar is written from the checked tree, whose nodes are sorted by
//!   path, hard links last; its times are the layer's own;
//! - `-reproducible` (the Debian build's default, given so another build's
//!   default does not matter): the output order does not depend on the
//!   threads, so `-processors` (the host's CPU count) changes nothing;
//! - `-mkfs-time 0`, the root's mode, owner and (pinned) time from the
//!   tree; `SOURCE_DATE_EPOCH` is removed from the tool's environment (set,
//!   it would clash with `-mkfs-time` and fail the build);
//! - gzip at the tool's default level. Another mksquashfs or zlib may
//!   compress differently: the tool's version is part of the cache key
//!   ([`Squashfs::builder_digest`]), and a snapshot's rebuilt layer is
//!   compared with its pinned digest, never trusted.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::Digest as _;

use super::check::{Attrs, Kind, Tree, OPAQUE_XATTR};
use super::LayerError;

/// The builder's tool.
pub const MKSQUASHFS: &str = "mksquashfs";

/// What changes the bytes of a built layer besides the tool's version: a
/// change here (flags, how the tar is written) must change this.
const RECIPE: &str = "cocoon layer recipe 3: tar from the checked tree; \
    mksquashfs - OUT -tar -no-strip -noappend -noI -reproducible -comp gzip -mkfs-time 0 \
    -root-*, no SOURCE_DATE_EPOCH; root inode time pinned";

/// The most stderr kept from a failed build.
const MAX_STDERR: usize = 8 << 10;

/// mksquashfs, found on PATH, with its version.
#[derive(Debug, Clone)]
pub struct Squashfs {
    pub tool: PathBuf,
    /// `mksquashfs -version`'s first line.
    pub version: String,
}

impl Squashfs {
    /// Finds mksquashfs and reads its version (which is part of the cache
    /// key: another build of the tool makes other bytes).
    pub fn detect() -> Result<Self, LayerError> {
        let out = Command::new(MKSQUASHFS)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| LayerError::Tool {
                tool: MKSQUASHFS,
                source,
            })?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        if !version.starts_with("mksquashfs version ") {
            return Err(LayerError::ToolVersion {
                tool: MKSQUASHFS,
                found: version,
            });
        }
        Ok(Squashfs {
            tool: PathBuf::from(MKSQUASHFS),
            version,
        })
    }

    /// sha256 hex of everything that decides the bytes built from a tree:
    /// the reader plugin (it decides the tree), the tool, the recipe.
    pub fn builder_digest(&self, reader_sha256: &str) -> String {
        let mut h = sha2::Sha256::new();
        for part in [reader_sha256, &self.version, RECIPE] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Builds `dest` (which must not exist) from `tree`, whose file
    /// extents are in `tar`. On failure `dest` is removed.
    pub fn build(&self, tree: &Tree, tar: &File, dest: &Path) -> Result<(), LayerError> {
        let r = self.run(tree, tar, dest);
        if r.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        r
    }

    fn run(&self, tree: &Tree, tar: &File, dest: &Path) -> Result<(), LayerError> {
        let root = &tree.root;
        let mut child = Command::new(&self.tool)
            .arg("-")
            .arg(dest)
            .args([
                "-tar",
                "-no-strip",
                "-noappend",
                "-noI",
                "-reproducible",
                "-no-progress",
                "-quiet",
            ])
            .args(["-comp", "gzip", "-mkfs-time", "0", "-exit-on-error"])
            .args(["-root-mode", &format!("{:o}", root.mode)])
            .args(["-root-uid", &root.uid.to_string()])
            .args(["-root-gid", &root.gid.to_string()])
            .env_remove("SOURCE_DATE_EPOCH")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LayerError::Tool {
                tool: MKSQUASHFS,
                source,
            })?;
        let mut stderr = child.stderr.take().expect("piped");
        let errors = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(MAX_STDERR as u64).read_to_end(&mut buf);
            // Drain the rest so the tool never blocks on a full pipe.
            let _ = io::copy(&mut stderr, &mut io::sink());
            buf
        });
        let mut stdin = child.stdin.take().expect("piped");
        let written = write_tar(tree, tar, &mut stdin);
        drop(stdin);
        let status = child.wait().map_err(|source| LayerError::Tool {
            tool: MKSQUASHFS,
            source,
        })?;
        let stderr = String::from_utf8_lossy(&errors.join().unwrap_or_default()).into_owned();
        if !status.success() {
            return Err(LayerError::Build {
                tool: MKSQUASHFS,
                status: status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        // The tool succeeded: a write error is ours (reading the tar).
        written.map_err(|source| LayerError::Io {
            op: "writing the checked tar for",
            path: dest.to_path_buf(),
            source,
        })?;
        pin_root_time(dest, squash_time(root.mtime))
    }
}

/// squashfs superblock fields (little endian): flags, the root inode's
/// reference (metadata block offset << 16 | offset in the block), where
/// the inode table starts.
const SB_MAGIC: u32 = 0x7371_7368;
const SB_FLAGS: usize = 24;
const SB_ROOT_INODE: usize = 32;
const SB_INODE_TABLE: usize = 64;
const SB_LEN: usize = 96;
/// Superblock flag: inodes are stored uncompressed (`-noI`).
const NOI: u16 = 0x0001;
/// A metadata block header's bit for "stored uncompressed".
const META_UNCOMPRESSED: u16 = 0x8000;
/// In an inode's header: the type (u16 at 0) and the time (u32 at 8).
const INODE_MTIME: usize = 8;
const DIR_TYPES: [u16; 2] = [1, 8];

/// Writes `mtime` into the root inode of the image at `path`, which was
/// built with `-noI`, so the inode is stored as is in its metadata block
/// (or across two, when it starts near a block's end).
fn pin_root_time(path: &Path, mtime: u32) -> Result<(), LayerError> {
    let bad = |reason: String| LayerError::Output {
        tool: MKSQUASHFS,
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| LayerError::Io {
        op: "pinning the root time of",
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut sb = [0u8; SB_LEN];
    read_at(&f, 0, &mut sb).map_err(io)?;
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |at: usize| u64::from_le_bytes(sb[at..at + 8].try_into().expect("8 bytes"));
    if u32::from_le_bytes(sb[..4].try_into().expect("4 bytes")) != SB_MAGIC {
        return Err(bad("no squashfs magic".into()));
    }
    if u16_at(&sb, SB_FLAGS) & NOI == 0 {
        return Err(bad("its inodes are compressed".into()));
    }
    let root = u64_at(SB_ROOT_INODE);
    let mut block = u64_at(SB_INODE_TABLE) + (root >> 16);
    let mut offset = u64::from(u16::try_from(root & 0xffff).expect("masked"));
    // The inode's first 12 bytes (type .. mtime), gathered across blocks;
    // `at[i]` is where byte i lives in the file.
    let mut at = Vec::with_capacity(INODE_MTIME + 4);
    while at.len() < INODE_MTIME + 4 {
        let mut h = [0u8; 2];
        if block + 2 > len {
            return Err(bad(format!(
                "the root inode's block at {block} is past the end"
            )));
        }
        read_at(&f, block, &mut h).map_err(io)?;
        let h = u16::from_le_bytes(h);
        if h & META_UNCOMPRESSED == 0 {
            return Err(bad(format!("the metadata block at {block} is compressed")));
        }
        let size = u64::from(h & !META_UNCOMPRESSED);
        if offset >= size && at.is_empty() {
            return Err(bad(format!(
                "the root inode's offset {offset} is outside its block"
            )));
        }
        let data = block + 2;
        while offset < size && at.len() < INODE_MTIME + 4 {
            at.push(data + offset);
            offset += 1;
        }
        block = data + size;
        offset = 0;
    }
    if at.last().is_some_and(|&a| a >= len) {
        return Err(bad("the root inode runs past the end".into()));
    }
    let mut kind = [0u8; 2];
    for (i, b) in kind.iter_mut().enumerate() {
        let mut one = [0u8];
        read_at(&f, at[i], &mut one).map_err(io)?;
        *b = one[0];
    }
    let kind = u16::from_le_bytes(kind);
    if !DIR_TYPES.contains(&kind) {
        return Err(bad(format!(
            "the root inode has type {kind}, not a directory"
        )));
    }
    for (i, b) in mtime.to_le_bytes().into_iter().enumerate() {
        write_at(&f, at[INODE_MTIME + i], &[b]).map_err(io)?;
    }
    Ok(())
}

fn read_at(f: &File, at: u64, buf: &mut [u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, at)
}

fn write_at(f: &File, at: u64, buf: &[u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, at)
}

/// squashfs times are unsigned 32-bit seconds.
fn squash_time(t: i64) -> u32 {
    u32::try_from(t.clamp(0, i64::from(u32::MAX))).unwrap_or(u32::MAX)
}

/// The largest id an ustar/GNU octal field holds; larger ones go in PAX.
const MAX_OCTAL_ID: u32 = 0o7777777;

/// Writes the tree as a tar into `out`.
pub fn write_tar(tree: &Tree, tar: &File, out: &mut impl Write) -> io::Result<()> {
    let mut headers = tar::Builder::new(Vec::with_capacity(1 << 20));
    let mut links = Vec::new();
    for (path, node) in &tree.nodes {
        if let Kind::Hardlink(_) = node.kind {
            links.push((path, node));
            continue;
        }
        append(&mut headers, path, &node.kind, &node.attrs)?;
        if let Kind::File { size, extents } = &node.kind {
            out.write_all(headers.get_ref())?;
            headers.get_mut().clear();
            let mut f = tar;
            for x in extents {
                f.seek(SeekFrom::Start(x.offset))?;
                let n = io::copy(&mut f.take(x.length), out)?;
                if n != x.length {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the tar ends inside the contents of {path:?}"),
                    ));
                }
            }
            let pad = (512 - size % 512) % 512;
            out.write_all(&[0u8; 512][..pad as usize])?;
        } else if headers.get_ref().len() >= 1 << 20 {
            out.write_all(headers.get_ref())?;
            headers.get_mut().clear();
        }
    }
    for (path, node) in links {
        append(&mut headers, path, &node.kind, &node.attrs)?;
    }
    let mut rest = headers.into_inner()?;
    out.write_all(&rest)?;
    rest.clear();
    out.flush()
}

/// Appends the header(s) of one node; a file's contents follow, written
/// by the caller.
fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: &Kind, attrs: &Attrs) -> io::Result<()> {
    let mut pax: Vec<(String, Vec<u8>)> = attrs
        .xattrs
        .iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
        .collect();
    if let Kind::Dir { opaque: true } = kind {
        pax.push((format!("SCHILY.xattr.{OPAQUE_XATTR}"), b"y".to_vec()));
    }
    let mut h = tar::Header::new_gnu();
    let (uid, gid) = (attrs.uid, attrs.gid);
    if uid > MAX_OCTAL_ID {
        pax.push(("uid".into(), uid.to_string().into_bytes()));
    }
    if gid > MAX_OCTAL_ID {
        pax.push(("gid".into(), gid.to_string().into_bytes()));
    }
    h.set_uid(uid.min(MAX_OCTAL_ID).into());
    h.set_gid(gid.min(MAX_OCTAL_ID).into());
    h.set_mtime(squash_time(attrs.mtime).into());
    h.set_mode(attrs.mode);
    h.set_size(0);
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    match kind {
        Kind::Dir { .. } => {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, path, io::empty())
        }
        Kind::File { size, .. } => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(*size);
            // The contents are the caller's to write: append copies none.
            b.append_data(&mut h, path, io::empty())
        }
        Kind::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, path, target)
        }
        Kind::Hardlink(target) => {
            h.set_entry_type(tar::EntryType::Link);
            b.append_link(&mut h, path, target)
        }
        Kind::Device { char, major, minor } => {
            h.set_entry_type(if *char {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            h.set_device_major(*major)?;
            h.set_device_minor(*minor)?;
            b.append_data(&mut h, path, io::empty())
        }
        Kind::Fifo => {
            h.set_entry_type(tar::EntryType::Fifo);
            b.append_data(&mut h, path, io::empty())
        }
        Kind::Whiteout => {
            h.set_entry_type(tar::EntryType::Char);
            h.set_mode(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_device_major(0)?;
            h.set_device_minor(0)?;
            b.append_data(&mut h, path, io::empty())
        }
    }
}
