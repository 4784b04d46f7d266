//! The snapshot sidecar, `snapshot.json`: what a snapshot is, beside the
//! VMM's own files. It is written last (temp name, fsync, rename), so a
//! snapshot directory with a sidecar is complete; it is read back strictly
//! (unknown fields refused, size bounded), because an imported or pulled
//! snapshot is untrusted input until [`super::preflight`] has passed it.
//!
//! Paths in it are relative, so a snapshot moves between hosts (export,
//! import, push, pull): a snapshot-resident disk's path is relative to the
//! snapshot directory (`disks/cow.raw`), a layer's to the image store's
//! root (the layer itself stays a shared blob of the store, named by its
//! digest). [`Sidecar::storage`] makes them absolute for one host.
//!
//! Versioning: `version` is `MAJOR.MINOR`. This host reads its own major,
//! up to its own minor: a newer minor may record something this host
//! would silently drop, so it is refused like another major, naming both.
//! 1.1 adds the VM's NICs ([`Sidecar::nics`]); a snapshot without NICs is
//! still written as 1.0, so older hosts keep reading it.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::disk::model::{DiskRole, StorageConfig};
use crate::fsutil;
use crate::store::digest::Digest;

/// The sidecar's file name inside a snapshot directory.
pub const SIDECAR_FILE: &str = "snapshot.json";
/// Where snapshot-resident disks live inside a snapshot directory.
pub const DISKS_DIR: &str = "disks";
/// No sidecar is anywhere near this (a few KiB); a bigger one is refused
/// before it is parsed.
pub const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// The sidecar version this host writes (and the newest it reads). 1.1
/// added `nics` (the VM's NICs) and `boot` (its kernel, initrd and command
/// line, carried as files of the snapshot); a 1.0 sidecar has neither and
/// reads as before.
pub const SIDECAR_VERSION: SidecarVersion = SidecarVersion { major: 1, minor: 1 };
/// The version of a sidecar with neither NICs nor boot files: what 1.0 was,
/// so that an older host still reads it.
pub const SIDECAR_VERSION_1_0: SidecarVersion = SidecarVersion { major: 1, minor: 0 };
/// The names of the boot files in a snapshot directory.
pub const KERNEL_FILE: &str = "kernel";
pub const INITRD_FILE: &str = "initrd";

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot {what} the snapshot sidecar {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot sidecar {path} is larger than {MAX_SIDECAR_BYTES} bytes; it is not one")]
    TooLarge { path: PathBuf },
    #[error("the snapshot sidecar {path} has version {found}; this cocoon-host reads {}.0 to {}", SIDECAR_VERSION.major, SIDECAR_VERSION)]
    UnsupportedVersion {
        path: PathBuf,
        found: SidecarVersion,
    },
    #[error("the snapshot sidecar {path} does not parse")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `MAJOR.MINOR`, serialised as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SidecarVersion {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for SidecarVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for SidecarVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('.')
            .ok_or_else(|| format!("version {s:?} is not MAJOR.MINOR"))?;
        let n = |x: &str| {
            x.parse::<u16>()
                .map_err(|_| format!("version {s:?} is not MAJOR.MINOR"))
        };
        Ok(SidecarVersion {
            major: n(a)?,
            minor: n(b)?,
        })
    }
}

impl Serialize for SidecarVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SidecarVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The VMM state file's format version (`MAJOR.MINOR.PATCH`), as the
/// sidecar records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateVersion(pub cocoon_vmm::snapshot::FormatVersion);

impl Serialize for StateVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StateVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("{s:?} is not MAJOR.MINOR.PATCH"));
        let parts: Vec<u16> = s
            .split('.')
            .map(|p| p.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        match parts[..] {
            [major, minor, patch] => Ok(StateVersion(cocoon_vmm::snapshot::FormatVersion {
                major,
                minor,
                patch,
            })),
            _ => Err(bad()),
        }
    }
}

/// The image the snapshotted VM was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// The image's digest in the store (a manifest's, or a disk image's
    /// blob): a gc root while the snapshot exists.
    pub digest: Digest,
    /// The reference it was pulled by, when known (for people, and to pull
    /// it again on another host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A layer disk: a blob of the image store, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
}

/// One disk of the snapshotted VM, in the VM's disk order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDisk {
    /// The disk as the VM had it, with a relative path: under the snapshot
    /// directory for a snapshot-resident disk (cow, data, cidata), under
    /// the image store's root for a layer.
    pub config: StorageConfig,
    /// Set exactly for layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerRef>,
}

impl SnapshotDisk {
    /// Whether the disk's file is inside the snapshot (not a store layer).
    pub fn resident(&self) -> bool {
        self.config.role != DiskRole::Layer
    }
}

/// What the snapshotted VM boots, for a clone's later cold boots (its
/// first start restores the snapshot and boots nothing): carried in the
/// snapshot, so a clone on another host (after export, import, push,
/// pull) or after its source VM is gone still has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBoot {
    /// A resident file's name ([`KERNEL_FILE`]).
    pub kernel: String,
    /// A resident file's name ([`INITRD_FILE`]), when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub cmdline: String,
}

/// A file inside the snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidentFile {
    /// Relative to the snapshot directory: `state`, `memory`,
    /// `disks/NAME`.
    pub name: String,
    /// Bytes (the apparent size: holes count).
    pub size: u64,
    /// sha256 of all `size` bytes (holes read as zeros).
    pub sha256: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    pub version: SidecarVersion,
    /// The snapshot's name (its directory's name under `snapshots/`).
    pub name: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// The VM it was taken from.
    pub source_vm: String,
    pub image: ImageInfo,
    /// The VMM state file's format version.
    pub vmm_state_version: StateVersion,
    pub cpus: u8,
    pub memory_bytes: u64,
    /// In the VM's disk order.
    pub disks: Vec<SnapshotDisk>,
    /// The VM's NICs in device order (since 1.1; absent when there are
    /// none): each MAC as the network saw it, and how its tap was given
    /// (`--nic tap=` or `--network bridge=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::net::Nic>,
    /// The VM's boot files (sidecar 1.1; absent from 1.0 sidecars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<SnapshotBoot>,
    /// Every file of the snapshot directory but the sidecar: the VMM's
    /// state and memory, the resident disks in disk order, then the boot
    /// files.
    pub files: Vec<ResidentFile>,
}

/// Only the version, read before the strict parse so that another
/// version's sidecar is refused for its version, not for a field.
#[derive(Deserialize)]
struct VersionOnly {
    version: SidecarVersion,
}

impl Sidecar {
    /// The version a sidecar with these NICs, and boot files or none, is
    /// written as: the oldest that has its fields.
    pub fn version_for(nics: &[crate::net::Nic], boot: bool) -> SidecarVersion {
        if nics.is_empty() && !boot {
            SIDECAR_VERSION_1_0
        } else {
            SIDECAR_VERSION
        }
    }

    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(SIDECAR_FILE)
    }

    /// Reads and parses `dir/snapshot.json`, strictly.
    pub fn read(dir: &Path) -> Result<Sidecar, SidecarError> {
        let path = Self::path_in(dir);
        let io = |what| {
            let path = path.clone();
            move |source| SidecarError::Io { what, path, source }
        };
        let file = std::fs::File::open(&path).map_err(io("open"))?;
        let mut bytes = Vec::new();
        file.take(MAX_SIDECAR_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io("read"))?;
        if bytes.len() as u64 > MAX_SIDECAR_BYTES {
            return Err(SidecarError::TooLarge { path });
        }
        Self::parse(&path, &bytes)
    }

    /// Parses a sidecar's bytes (`path` names it in errors).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Sidecar, SidecarError> {
        let parse_err = |source| SidecarError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(parse_err)?;
        if v.version.major != SIDECAR_VERSION.major || v.version > SIDECAR_VERSION {
            return Err(SidecarError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: v.version,
            });
        }
        serde_json::from_slice(bytes).map_err(parse_err)
    }

    /// The sidecar as JSON (pretty, newline-terminated).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a sidecar serialises");
        v.push(b'\n');
        v
    }

    /// Writes `dir/snapshot.json`: temp name, fsync, rename, fsync `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), SidecarError> {
        let path = Self::path_in(dir);
        fsutil::write_atomic(&path, &self.to_json(), 0o600).map_err(|source| SidecarError::Io {
            what: "write",
            path,
            source,
        })
    }

    /// The disks with absolute paths for this host: resident ones under
    /// `snapshot_dir`, layers under `store_root`. Lexical only; the
    /// preflight checks where they really lead.
    pub fn storage(&self, snapshot_dir: &Path, store_root: &Path) -> Vec<StorageConfig> {
        self.disks
            .iter()
            .map(|d| {
                let base = if d.resident() {
                    snapshot_dir
                } else {
                    store_root
                };
                StorageConfig {
                    path: base.join(&d.config.path),
                    ..d.config.clone()
                }
            })
            .collect()
    }

    /// The resident file of that name.
    pub fn file(&self, name: &str) -> Option<&ResidentFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The digests this snapshot keeps alive in the image store: the
    /// image's and every layer's.
    pub fn store_roots(&self) -> Vec<Digest> {
        std::iter::once(self.image.digest.clone())
            .chain(
                self.disks
                    .iter()
                    .filter_map(|d| d.layer.as_ref().map(|l| l.digest.clone())),
            )
            .collect()
    }

    /// The role sequence, in disk order.
    pub fn roles(&self) -> Vec<DiskRole> {
        self.disks.iter().map(|d| d.config.role).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::disk::model::FsType;

    pub(crate) fn digest(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    fn disk(role: DiskRole, serial: &str, path: &str) -> SnapshotDisk {
        SnapshotDisk {
            config: StorageConfig {
                path: path.into(),
                read_only: role.read_only(),
                serial: serial.into(),
                role,
                mount_point: None,
                fstype: (role == DiskRole::Data).then_some(FsType::None),
                direct_io: None,
            },
            layer: (role == DiskRole::Layer).then(|| LayerRef {
                digest: digest(serial),
                size: 1 << 20,
            }),
        }
    }

    pub(crate) fn sample() -> Sidecar {
        Sidecar {
            version: SIDECAR_VERSION_1_0,
            name: "s1".into(),
            created: "2026-12-02T01:00:00Z".into(),
            source_vm: "v1".into(),
            image: ImageInfo {
                digest: digest("image"),
                reference: Some("oci://example/img:1".into()),
            },
            vmm_state_version: StateVersion(cocoon_vmm::snapshot::FORMAT_VERSION),
            cpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![
                disk(DiskRole::Layer, "cocoon-layer0", "blobs/sha256/aa"),
                disk(DiskRole::Cow, "cocoon-root", "disks/cow.raw"),
                disk(DiskRole::Data, "logs", "disks/data-logs.raw"),
            ],
            nics: Vec::new(),
            boot: None,
            files: vec![ResidentFile {
                name: "state".into(),
                size: 10,
                sha256: digest("state"),
            }],
        }
    }

    #[test]
    fn nics_are_kept_as_1_1_and_a_1_0_sidecar_without_them_loads() {
        let mut s = sample();
        // 1.0 had no nics field: what this host wrote before it still loads.
        let old = s.to_json();
        assert!(!String::from_utf8_lossy(&old).contains("nics"));
        assert_eq!(Sidecar::parse(Path::new("old"), &old).unwrap(), s);
        s.nics = crate::net::resolve(
            vec![
                "tap=mine0".parse().unwrap(),
                crate::net::NicSpec {
                    attach: crate::net::Attachment::Bridge("br0".into()),
                    mac: None,
                    addressing: crate::net::Addressing::Dhcp,
                },
            ],
            &Default::default(),
        )
        .unwrap();
        s.version = Sidecar::version_for(&s.nics, false);
        assert_eq!(s.version, SIDECAR_VERSION);
        let json = s.to_json();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["version"], "1.1");
        assert_eq!(v["nics"][0]["attach"], serde_json::json!({"tap": "mine0"}));
        assert_eq!(v["nics"][1]["mac"], s.nics[1].mac.to_string());
        assert_eq!(Sidecar::parse(Path::new("new"), &json).unwrap(), s);
        assert_eq!(Sidecar::version_for(&[], false), SIDECAR_VERSION_1_0);
        assert_eq!(Sidecar::version_for(&[], true), SIDECAR_VERSION);
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample();
        s.write(dir.path()).unwrap();
        assert_eq!(Sidecar::read(dir.path()).unwrap(), s);
        let text = std::fs::read_to_string(dir.path().join(SIDECAR_FILE)).unwrap();
        // The sample has neither NICs nor boot files: 1.0, as before them.
        assert!(text.contains(r#""version": "1.0""#), "{text}");
        let vmm = cocoon_vmm::snapshot::FORMAT_VERSION.to_string();
        assert!(
            text.contains(&format!(r#""vmm_state_version": "{vmm}""#)),
            "{text}"
        );
        // Only the sidecar: the temp file was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(
            s.storage(Path::new("/snap"), Path::new("/store"))
                .iter()
                .map(|d| d.path.clone())
                .collect::<Vec<_>>(),
            [
                PathBuf::from("/store/blobs/sha256/aa"),
                "/snap/disks/cow.raw".into(),
                "/snap/disks/data-logs.raw".into()
            ]
        );
        assert_eq!(s.store_roots(), [digest("image"), digest("cocoon-layer0")]);
    }

    #[test]
    fn refusals_name_the_problem() {
        let p = Path::new("/s/snapshot.json");
        let json = String::from_utf8(sample().to_json()).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (
                json.replacen(r#""cpus""#, r#""extra": 1, "cpus""#, 1),
                "unknown field `extra`",
            ),
            (
                json.replacen(r#""role": "cow""#, r#""role": "swap""#, 1),
                "unknown variant `swap`",
            ),
            (
                json.replacen(
                    r#""read_only": false"#,
                    r#""read_only": false, "size": 1"#,
                    1,
                ),
                "unknown field `size`",
            ),
            (
                json.replacen(r#""version": "1.0""#, r#""version": "2.0""#, 1),
                "has version 2.0; this cocoon-host reads 1.0 to 1.1",
            ),
            (
                json.replacen(r#""version": "1.0""#, r#""version": "1.2""#, 1),
                "has version 1.2",
            ),
            (
                json.replacen(r#""version": "1.0""#, r#""version": "one""#, 1),
                "not MAJOR.MINOR",
            ),
            (
                json.replacen(
                    &format!(r#""{}""#, cocoon_vmm::snapshot::FORMAT_VERSION),
                    r#""1.0""#,
                    1,
                ),
                "not MAJOR.MINOR.PATCH",
            ),
            (
                json.replacen("sha256:", "md5:", 1),
                "is not sha256:<64 lower-case hex digits>",
            ),
            ("[]".into(), "does not parse"),
        ];
        for (text, want) in cases {
            let e = Sidecar::parse(p, text.as_bytes()).unwrap_err();
            let msg = crate::error_chain(&e);
            assert!(msg.contains(want), "{want}: {msg}");
        }
        assert!(matches!(
            Sidecar::parse(p, json.replacen(r#""1.0""#, r#""7.3""#, 1).as_bytes()),
            Err(SidecarError::UnsupportedVersion { found, .. }) if found == SidecarVersion { major: 7, minor: 3 }
        ));
    }

    #[test]
    fn a_1_0_sidecar_reads_and_boot_round_trips() {
        let p = Path::new("/s/snapshot.json");
        let json = String::from_utf8(sample().to_json()).unwrap();
        assert!(!json.contains("boot"), "no boot, no field: {json}");
        let old = json.replacen(r#""version": "1.1""#, r#""version": "1.0""#, 1);
        let s = Sidecar::parse(p, old.as_bytes()).unwrap();
        assert_eq!(s.boot, None);
        let mut s = sample();
        s.boot = Some(SnapshotBoot {
            kernel: KERNEL_FILE.into(),
            initrd: Some(INITRD_FILE.into()),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
        });
        let back = Sidecar::parse(p, &s.to_json()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn an_oversized_sidecar_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join(SIDECAR_FILE)).unwrap();
        f.set_len(MAX_SIDECAR_BYTES + 1).unwrap();
        assert!(matches!(
            Sidecar::read(dir.path()),
            Err(SidecarError::TooLarge { .. })
        ));
    }
}
