//! A VM's record, `vms/ID/vm.json`: everything needed to start the VM
//! again and to say what happened to it. Written temp, fsync, rename;
//! unknown fields are refused, as in every file the host reads back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::model::StorageConfig;
use crate::store::Digest;

/// The record's own format version; a record of another version is
/// refused rather than half-understood.
pub const RECORD_VERSION: u32 = 1;
pub const RECORD_FILE: &str = "vm.json";

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The placeholder of a create in progress (or one that was killed:
    /// the next command removes it with every file it made).
    Creating,
    /// Every file exists; never started, or stopped and started again.
    Created,
    Running,
    Paused,
    Stopped,
    /// The monitor failed, or the VMM stopped on an error.
    Error,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    /// Whether a monitor process owns the VM in this state.
    pub fn has_monitor(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the last run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitKind {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (the VM stops: a reboot is a new `start`).
    Reset,
    /// `stop`, or a signal to the monitor.
    Stopped,
    /// The VMM stopped on an error.
    Error,
    /// The monitor process died without saying why (killed).
    MonitorDied,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitInfo {
    pub kind: ExitKind,
    /// For people: what happened, with the VMM's error when there was one.
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

/// What the VMM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// The image a VM was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// What the user asked for, credentials removed.
    pub reference: String,
    /// The pulled artifact's digest (a gc root while the VM exists).
    pub digest: Digest,
    /// The converted base the VM's root was copied from, if a disk image
    /// (also a gc root).
    pub base: Option<Digest>,
    /// The read-only layers of a layered image, base first (gc roots).
    #[serde(default)]
    pub layers: Vec<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub version: u32,
    pub id: String,
    pub name: String,
    pub state: VmState,
    /// The process that owns the VM now: the creating command while
    /// `creating`, the monitor while running or paused.
    pub pid: Option<u32>,
    pub machine: Machine,
    pub image: Option<ImageInfo>,
    /// The disk policy that planned the disks.
    pub policy: String,
    /// The disks in plan order (layers, cow, data, cidata).
    pub storage: Vec<StorageConfig>,
    /// The NICs in device order, MACs fixed at create. Absent when there
    /// are none, so a record without NICs is what version 1 always was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::net::Nic>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub exit: Option<ExitInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM record {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("VM record {path} has format version {found}; this cocoon-host reads version {RECORD_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Records are small; anything bigger was not written by us.
const MAX_RECORD_BYTES: u64 = 1 << 20;

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VmRecord {
    pub fn path(vm_dir: &Path) -> PathBuf {
        vm_dir.join(RECORD_FILE)
    }

    /// Reads `vm_dir/vm.json`. A missing record is `Ok(None)` (a create
    /// that was killed before it wrote its placeholder).
    pub fn load(vm_dir: &Path) -> Result<Option<VmRecord>, RecordError> {
        let path = Self::path(vm_dir);
        let bytes = match crate::fsutil::input::read_bounded(&path, MAX_RECORD_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Io {
                    what: "reading",
                    path,
                    source,
                })
            }
        };
        // The version first, so that a newer record says so instead of
        // failing on a field this version does not know.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        if let Ok(v) = serde_json::from_slice::<Versioned>(&bytes) {
            if v.version != RECORD_VERSION {
                return Err(RecordError::Version {
                    path,
                    found: v.version,
                });
            }
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RecordError::Parse { path, source })
    }

    /// Writes the record atomically (temp, fsync, rename, fsync of the
    /// directory): a reader sees the old record or the new, never half.
    pub fn save(&self, vm_dir: &Path) -> Result<(), RecordError> {
        let path = Self::path(vm_dir);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Parse {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        crate::fsutil::write_atomic(&path, &bytes, 0o600).map_err(|source| RecordError::Io {
            what: "writing",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> VmRecord {
        VmRecord {
            version: RECORD_VERSION,
            id: "0123456789abcdef".into(),
            name: "web".into(),
            state: VmState::Created,
            pid: None,
            machine: Machine {
                cpus: 1,
                memory: 256 << 20,
                kernel: "/k".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            image: None,
            policy: "default-policy".into(),
            storage: Vec::new(),
            nics: Vec::new(),
            created_at: 1,
            started_at: None,
            exit: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_what_it_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(VmRecord::load(dir.path()).unwrap(), None);
        let r = sample();
        r.save(dir.path()).unwrap();
        assert_eq!(VmRecord::load(dir.path()).unwrap(), Some(r.clone()));

        let mut v: serde_json::Value = serde_json::to_value(&r).unwrap();
        v["surprise"] = 1.into();
        std::fs::write(VmRecord::path(dir.path()), v.to_string()).unwrap();
        let e = VmRecord::load(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Parse { .. }), "{e}");
        assert!(crate::error_chain(&e).contains("surprise"), "{e}");

        // NICs are kept, and a record without them has no `nics` field
        // (what the records written before NICs existed look like).
        assert!(v.get("nics").is_none());
        let mut with = r.clone();
        with.nics = crate::net::resolve(
            vec!["tap=t0,mac=02:00:00:00:00:01".parse().unwrap()],
            &Default::default(),
        )
        .unwrap();
        with.save(dir.path()).unwrap();
        assert_eq!(VmRecord::load(dir.path()).unwrap(), Some(with.clone()));
        let mut w: serde_json::Value = serde_json::to_value(&with).unwrap();
        assert_eq!(
            w["nics"],
            serde_json::json!([{"attach": {"tap": "t0"}, "mac": "02:00:00:00:00:01", "addressing": "dhcp"}])
        );
        w["nics"][0]["vlan"] = 3.into();
        std::fs::write(VmRecord::path(dir.path()), w.to_string()).unwrap();
        let e = VmRecord::load(dir.path()).unwrap_err();
        assert!(crate::error_chain(&e).contains("vlan"), "{e}");
        w["nics"][0].as_object_mut().unwrap().remove("vlan");
        w["nics"][0]["mac"] = "01:00:00:00:00:01".into();
        std::fs::write(VmRecord::path(dir.path()), w.to_string()).unwrap();
        let e = VmRecord::load(dir.path()).unwrap_err();
        assert!(crate::error_chain(&e).contains("multicast"), "{e}");

        v["version"] = 2.into();
        std::fs::write(VmRecord::path(dir.path()), v.to_string()).unwrap();
        let e = VmRecord::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
    }
}
