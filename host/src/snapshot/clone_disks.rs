//! `clone --data-disk name=NAME,path=FILE` (or `index=N,path=FILE`): a
//! clone whose data disk at that position is a copy of the user's file
//! instead of the snapshot's copy.
//!
//! What it cannot be: a new disk. The VMM has no disk hotplug, and a
//! restored guest's disk set is fixed by its memory (its drivers probed
//! every virtio-mmio device at its boot), so a clone has exactly the
//! snapshot's disks. The file given takes the place of one of them and
//! must pass every check a snapshot disk passes: the position is a data
//! disk, the file is a regular file (not a FIFO, a device, a directory),
//! of the snapshot disk's size (the guest knows it), and lockable: it is
//! locked with the clone's own disks, in sorted order, while it is copied,
//! so no VM or operation writes it meanwhile. The clone gets a copy in its
//! own directory (a reflink where the filesystem can): every disk path
//! stays under the VM's directory, and the clone never writes the user's
//! file.
//!
//! The guest's memory holds its view of the disk it had (a mounted
//! filesystem's metadata, its page cache): the file should be one that
//! view fits, such as a copy of that disk or a disk the guest does not
//! mount.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::disk::model::{DiskRole, StorageConfig};
use crate::fsutil::input::{self, Accept, Input};

/// Why a clone has no new disks (see the module doc).
pub const NO_HOTPLUG: &str = "this VMM has no disk hotplug, and a restored guest's disk set is \
                              fixed by its memory (its drivers found its disks at boot)";

#[derive(Debug, thiserror::Error)]
pub enum CloneDiskError {
    #[error("--data-disk {spec:?}: {part:?}: {reason}")]
    Part {
        spec: String,
        part: String,
        reason: String,
    },
    #[error("--data-disk {spec:?}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("--data-disk {spec:?}: a clone cannot get a new disk: {NO_HOTPLUG}; give name=NAME,path=FILE (or index=N,path=FILE) to put a file in place of one of the snapshot's data disks")]
    NewDisk { spec: String },
    #[error("--data-disk {spec:?}: snapshot {snapshot} has no {which} (its data disks: {have}); a clone cannot add a disk: {NO_HOTPLUG}")]
    NoSuchDisk {
        spec: String,
        snapshot: String,
        which: String,
        have: String,
    },
    #[error("--data-disk {spec:?}: disk {index} of snapshot {snapshot} is its {role} disk; only a data disk can be given")]
    NotData {
        spec: String,
        snapshot: String,
        index: usize,
        role: DiskRole,
    },
    #[error("--data-disk {spec:?}: disk {index} ({serial}) is given twice")]
    Twice {
        spec: String,
        index: usize,
        serial: String,
    },
    #[error("--data-disk {spec:?}: {path} is {found} bytes; the snapshot's data disk {serial} is {want} bytes, and the restored guest knows that size")]
    Size {
        spec: String,
        path: PathBuf,
        serial: String,
        found: u64,
        want: u64,
    },
    #[error("--data-disk {spec:?}: cannot use {path}")]
    File {
        spec: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which of the snapshot's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAt {
    /// By its name (its serial), as `snapshot inspect` shows it.
    Name(String),
    /// By its index among all the snapshot's disks, from 0.
    Index(usize),
}

/// One `clone --data-disk` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDiskFile {
    /// The flag as written, quoted in errors.
    pub text: String,
    pub at: DiskAt,
    pub path: PathBuf,
}

impl fmt::Display for DataDiskFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for DataDiskFile {
    type Err = CloneDiskError;

    fn from_str(text: &str) -> Result<Self, CloneDiskError> {
        let part_err = |part: &str, reason: &str| CloneDiskError::Part {
            spec: text.into(),
            part: part.into(),
            reason: reason.into(),
        };
        let mut at = None;
        let mut path = None;
        for part in text.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(part_err(
                    part,
                    "expected key=value (keys: name or index, path)",
                ));
            };
            let slot_taken = match key {
                "name" | "index" => at.is_some(),
                "path" => path.is_some(),
                _ => false,
            };
            if slot_taken {
                return Err(part_err(part, "names the disk or the file a second time"));
            }
            match key {
                "name" if value.is_empty() => return Err(part_err(part, "the name is empty")),
                "name" => at = Some(DiskAt::Name(value.into())),
                "index" => {
                    let i = value
                        .parse()
                        .map_err(|_| part_err(part, "expected a disk index (0, 1, …)"))?;
                    at = Some(DiskAt::Index(i));
                }
                "path" if value.is_empty() => return Err(part_err(part, "the path is empty")),
                "path" => path = Some(PathBuf::from(value)),
                // `run --data-disk`'s keys make a new disk.
                "size" | "fstype" | "mount" | "directio" => {
                    return Err(CloneDiskError::NewDisk { spec: text.into() })
                }
                _ => return Err(part_err(part, "unknown key (keys: name or index, path)")),
            }
        }
        let spec_err = |reason: &str| CloneDiskError::Spec {
            spec: text.into(),
            reason: reason.into(),
        };
        Ok(DataDiskFile {
            text: text.into(),
            at: at.ok_or_else(|| spec_err("which disk? add name=NAME or index=N"))?,
            path: path.ok_or_else(|| spec_err("no file; add path=FILE"))?,
        })
    }
}

/// A flag matched to its disk: the file in place of disk `index`.
#[derive(Debug)]
pub struct Replacement {
    pub index: usize,
    pub text: String,
    /// As given (for messages) and resolved (for the lock).
    pub path: PathBuf,
    pub resolved: PathBuf,
}

/// Matches each flag to one of the snapshot's data disks (`storage`, in
/// disk order): refuses a disk the snapshot lacks, a disk that is not a
/// data disk, a disk given twice.
pub fn resolve(
    snapshot: &str,
    storage: &[StorageConfig],
    flags: &[DataDiskFile],
) -> Result<Vec<Replacement>, CloneDiskError> {
    let mut out: Vec<Replacement> = Vec::new();
    for f in flags {
        let index = match &f.at {
            DiskAt::Index(i) if *i < storage.len() => Some(*i),
            DiskAt::Index(_) => None,
            DiskAt::Name(n) => storage.iter().position(|d| &d.serial == n),
        };
        let Some(index) = index else {
            let have: Vec<String> = storage
                .iter()
                .enumerate()
                .filter(|(_, d)| d.role == DiskRole::Data)
                .map(|(i, d)| format!("{i} {}", d.serial))
                .collect();
            return Err(CloneDiskError::NoSuchDisk {
                spec: f.text.clone(),
                snapshot: snapshot.into(),
                which: match &f.at {
                    DiskAt::Index(i) => format!("disk {i}"),
                    DiskAt::Name(n) => format!("disk named {n}"),
                },
                have: if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                },
            });
        };
        let d = &storage[index];
        if d.role != DiskRole::Data {
            return Err(CloneDiskError::NotData {
                spec: f.text.clone(),
                snapshot: snapshot.into(),
                index,
                role: d.role,
            });
        }
        if out.iter().any(|r| r.index == index) {
            return Err(CloneDiskError::Twice {
                spec: f.text.clone(),
                index,
                serial: d.serial.clone(),
            });
        }
        let resolved = std::fs::canonicalize(&f.path).map_err(|source| CloneDiskError::File {
            spec: f.text.clone(),
            path: f.path.clone(),
            source,
        })?;
        out.push(Replacement {
            index,
            text: f.text.clone(),
            path: f.path.clone(),
            resolved,
        });
    }
    Ok(out)
}

impl Replacement {
    /// Opens the file (under its lock) as an input: a regular file only,
    /// never blocking on a FIFO, of the size of the disk it replaces.
    pub fn open(&self, replaced: &StorageConfig, want: u64) -> Result<Input, CloneDiskError> {
        let file_err = |source| CloneDiskError::File {
            spec: self.text.clone(),
            path: self.path.clone(),
            source,
        };
        let input = input::open(&self.resolved, Accept::Regular).map_err(file_err)?;
        if input.size != want {
            return Err(CloneDiskError::Size {
                spec: self.text.clone(),
                path: self.path.clone(),
                serial: replaced.serial.clone(),
                found: input.size,
                want,
            });
        }
        Ok(input)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(role: DiskRole, serial: &str) -> StorageConfig {
        StorageConfig {
            path: format!("/snap/disks/{serial}.raw").into(),
            read_only: role.read_only(),
            serial: serial.into(),
            role,
            mount_point: None,
            fstype: None,
            direct_io: None,
        }
    }

    #[test]
    fn flags_parse_and_refuse_new_disks() {
        let f: DataDiskFile = "name=logs,path=/srv/logs.raw".parse().unwrap();
        assert_eq!(f.at, DiskAt::Name("logs".into()));
        assert_eq!(f.path, PathBuf::from("/srv/logs.raw"));
        let f: DataDiskFile = "path=x.raw,index=2".parse().unwrap();
        assert_eq!(f.at, DiskAt::Index(2));
        for (bad, want) in [
            ("size=20G", "cannot get a new disk"),
            ("size=20G,name=new", "no disk hotplug"),
            ("name=logs", "no file; add path=FILE"),
            ("path=/x", "which disk?"),
            ("name=a,index=1,path=/x", "second time"),
            ("index=two,path=/x", "expected a disk index"),
            ("logs=/x", "unknown key"),
            ("logs", "expected key=value"),
        ] {
            let e = bad.parse::<DataDiskFile>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn flags_resolve_to_data_disks_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mine.raw");
        std::fs::write(&file, b"x").unwrap();
        let p = file.to_str().unwrap();
        let storage = [
            disk(DiskRole::Layer, "cocoon-layer0"),
            disk(DiskRole::Cow, "cocoon-root"),
            disk(DiskRole::Data, "logs"),
            disk(DiskRole::Cidata, "cocoon-cidata"),
        ];
        let flag = |s: String| -> DataDiskFile { s.parse().unwrap() };
        let r = resolve("s1", &storage, &[flag(format!("name=logs,path={p}"))]).unwrap();
        assert_eq!(r[0].index, 2);
        let r = resolve("s1", &storage, &[flag(format!("index=2,path={p}"))]).unwrap();
        assert_eq!(r[0].index, 2);
        for (spec, want) in [
            (
                format!("index=9,path={p}"),
                "snapshot s1 has no disk 9 (its data disks: 2 logs); a clone cannot add a disk",
            ),
            (format!("name=cache,path={p}"), "has no disk named cache"),
            (
                format!("index=1,path={p}"),
                "disk 1 of snapshot s1 is its cow disk",
            ),
            (format!("name=cocoon-cidata,path={p}"), "is its cidata disk"),
            (
                "name=logs,path=/nonexistent/x".to_string(),
                "cannot use /nonexistent/x",
            ),
        ] {
            let e = resolve("s1", &storage, &[flag(spec.clone())]).unwrap_err();
            let msg = crate::error_chain(&e);
            assert!(msg.contains(want), "{spec}: {msg}");
        }
        let twice = [
            flag(format!("name=logs,path={p}")),
            flag(format!("index=2,path={p}")),
        ];
        let e = resolve("s1", &storage, &twice).unwrap_err().to_string();
        assert!(e.contains("disk 2 (logs) is given twice"), "{e}");
    }

    #[test]
    fn the_file_must_be_regular_and_of_the_disks_size() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mine.raw");
        std::fs::write(&file, [0u8; 4096]).unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(fifo.as_os_str()))
            .unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only during the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let storage = [disk(DiskRole::Data, "logs")];
        let at = |p: &Path| {
            let f: DataDiskFile = format!("name=logs,path={}", p.display()).parse().unwrap();
            resolve("s1", &storage, &[f]).unwrap().remove(0)
        };
        at(&file).open(&storage[0], 4096).unwrap();
        let e = at(&file).open(&storage[0], 8192).unwrap_err().to_string();
        assert!(
            e.contains("is 4096 bytes; the snapshot's data disk logs is 8192 bytes"),
            "{e}"
        );
        let e = crate::error_chain(&at(&fifo).open(&storage[0], 4096).unwrap_err());
        assert!(e.contains("it is a FIFO, not a regular file"), "{e}");
    }
}
