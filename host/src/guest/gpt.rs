//! GPT partition tables, as far as the host reads them on a disk image's
//! raw copy: where each partition starts and its unique GUID (the
//! guest's PARTUUID), to find the filesystem holding `/boot`
//! ([`super::kernel::from_disk_image`]) and the root partition the
//! cocoon init mounts ([`root_partition`]). Entries are read in table
//! order; a header or entry array that does not fit the file ends the
//! list rather than failing (a disk without a valid GPT has no
//! partitions here, and the callers fall back to the whole disk).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::cmdline::RootPartition;

/// Entries read at most (the usual array holds 128).
const MAX_ENTRIES: u32 = 256;
/// ext2/3/4's superblock magic, at byte 56 of the superblock that starts
/// 1024 bytes into the filesystem.
const EXT_MAGIC_AT: u64 = 1024 + 56;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

/// One used GPT entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// Linux's partition number: the entry's index in the table, from 1.
    pub number: u32,
    /// Byte offset of its first sector.
    pub start: u64,
    /// The unique partition GUID, as the on-disk 16 bytes.
    pub unique_guid: [u8; 16],
}

impl GptPartition {
    /// The unique GUID as `blkid` prints a PARTUUID (lower-case, the
    /// first three fields little-endian on disk).
    pub fn partuuid(&self) -> String {
        let g = &self.unique_guid;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let rev = |b: &[u8]| hex(&b.iter().rev().copied().collect::<Vec<u8>>());
        format!(
            "{}-{}-{}-{}-{}",
            rev(&g[0..4]),
            rev(&g[4..6]),
            rev(&g[6..8]),
            hex(&g[8..10]),
            hex(&g[10..16])
        )
    }
}

/// The used entries of `f`'s GPT (512-byte sectors), in table order; empty
/// when there is no GPT header at LBA 1.
pub fn partitions(f: &File) -> std::io::Result<Vec<GptPartition>> {
    let len = f.metadata()?.len();
    let mut hdr = [0u8; 92];
    if len < 1024 || f.read_exact_at(&mut hdr, 512).is_err() || &hdr[..8] != b"EFI PART" {
        return Ok(Vec::new());
    }
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let entries = u64_at(&hdr, 72);
    let count = u32_at(&hdr, 80).min(MAX_ENTRIES);
    let size = u64::from(u32_at(&hdr, 84));
    let mut out = Vec::new();
    if !(128..=4096).contains(&size) {
        return Ok(out);
    }
    let mut e = vec![0u8; crate::cast::usize_from(size)];
    for i in 0..count {
        let at = entries
            .saturating_mul(512)
            .saturating_add(u64::from(i) * size);
        if f.read_exact_at(&mut e, at).is_err() {
            break;
        }
        // A zero type GUID is an unused entry.
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let start = u64_at(&e, 32).saturating_mul(512);
        if start < len {
            out.push(GptPartition {
                number: i + 1,
                start,
                unique_guid: e[16..32].try_into().unwrap(),
            });
        }
    }
    Ok(out)
}

/// The root partition of a disk image as the cocoon init should find it:
/// the PARTUUID of the first GPT partition that holds an ext2/3/4
/// filesystem. `None` (no GPT, or no such partition) leaves the init to
/// its own fallback: the first partition that mounts as ext4, else the
/// whole disk.
pub fn root_partition(raw: &Path) -> std::io::Result<Option<RootPartition>> {
    let f = File::open(raw)?;
    for p in partitions(&f)? {
        let mut magic = [0u8; 2];
        if f.read_exact_at(&mut magic, p.start.saturating_add(EXT_MAGIC_AT))
            .is_ok()
            && magic == EXT_MAGIC
        {
            return Ok(Some(RootPartition::PartUuid(p.partuuid())));
        }
    }
    Ok(None)
}

/// Disks for the guest modules' tests, made by the real tools.
#[cfg(test)]
pub(crate) mod fixture {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    use crate::disk::create::find_tool;

    /// A minimal bzImage: a setup header whose kernel_version names
    /// `version`.
    pub fn bzimage(version: &str) -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        let off: u16 = 0x100;
        b[0x20e..0x210].copy_from_slice(&off.to_le_bytes());
        let s = format!("{version} (debian-kernel@lists.debian.org) #1 SMP\0");
        b[0x300..0x300 + s.len()].copy_from_slice(s.as_bytes());
        b
    }

    /// `dir/disk.img`, 12 MiB, partitioned by sfdisk from `table` (the
    /// lines after `label: gpt`); with `ext4 = Some((tree, sector))`, an
    /// 8 MiB ext4 made by `mkfs.ext4 -d tree` is written at that sector.
    /// `None` (the test skips) when sfdisk or mkfs.ext4 is missing.
    pub fn disk(dir: &Path, table: &str, ext4: Option<(&Path, u64)>) -> Option<PathBuf> {
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(12 << 20)
            .unwrap();
        let Ok(mut sfdisk) = Command::new(find_tool("sfdisk"))
            .arg("-q")
            .arg(&disk)
            .stdin(Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIPPED: no sfdisk");
            return None;
        };
        write!(sfdisk.stdin.take().unwrap(), "label: gpt\n{table}").unwrap();
        assert!(sfdisk.wait().unwrap().success());
        if let Some((tree, sector)) = ext4 {
            let part = dir.join("part.img");
            std::fs::File::create(&part)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            let Ok(s) = Command::new(find_tool("mkfs.ext4"))
                .args(["-q", "-F", "-d"])
                .arg(tree)
                .arg(&part)
                .status()
            else {
                eprintln!("SKIPPED: no mkfs.ext4");
                return None;
            };
            assert!(s.success());
            std::fs::OpenOptions::new()
                .write(true)
                .open(&disk)
                .unwrap()
                .write_all_at(&std::fs::read(&part).unwrap(), sector * 512)
                .unwrap();
        }
        Some(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPT made by sfdisk: a blank first partition, an ext4 second one
    /// with a chosen GUID; the root is the second, by that GUID as blkid
    /// spells it.
    #[test]
    fn the_root_is_the_first_partition_holding_ext4() {
        let d = tempfile::tempdir().unwrap();
        let uuid = "4C7F2B1E-93D5-4A86-B0E2-6F1D8A9C3E57";
        let Some(disk) = fixture::disk(
            d.path(),
            &format!(
                "start=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
                 start=4096, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid={uuid}\n"
            ),
            None,
        ) else {
            return;
        };
        let f = File::open(&disk).unwrap();
        let parts = partitions(&f).unwrap();
        assert_eq!(
            parts
                .iter()
                .map(|p| (p.number, p.start))
                .collect::<Vec<_>>(),
            [(1, 2048 * 512), (2, 4096 * 512)]
        );
        assert_eq!(parts[1].partuuid(), uuid.to_lowercase());
        // Neither holds a filesystem yet.
        assert_eq!(root_partition(&disk).unwrap(), None);
        let w = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        w.write_all_at(&EXT_MAGIC, 4096 * 512 + EXT_MAGIC_AT)
            .unwrap();
        assert_eq!(
            root_partition(&disk).unwrap(),
            Some(RootPartition::PartUuid(uuid.to_lowercase()))
        );
        // No GPT at all: no partitions, no root named.
        let blank = d.path().join("blank.img");
        File::create(&blank).unwrap().set_len(1 << 20).unwrap();
        assert!(partitions(&File::open(&blank).unwrap()).unwrap().is_empty());
        assert_eq!(root_partition(&blank).unwrap(), None);
    }
}
