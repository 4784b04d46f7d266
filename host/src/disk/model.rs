//! What a VM's disk is: its file, its role and the options that role
//! allows. Serialised in VM records and snapshot sidecars, so unknown
//! fields are refused rather than silently dropped.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a disk is for. The role decides whether the disk is writable and
/// which options it may carry (see [`super::rules`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    /// A read-only image layer or base.
    Layer,
    /// The writable root layer.
    Cow,
    /// A user data disk.
    Data,
    /// The cloud-init seed, read-only.
    Cidata,
}

impl DiskRole {
    /// Whether a disk of this role is offered read-only to the guest.
    pub fn read_only(self) -> bool {
        matches!(self, DiskRole::Layer | DiskRole::Cidata)
    }

    /// The position of the role in a disk plan: layers, then the cow, then
    /// data disks, then cidata last. The derived `Ord` follows it too.
    pub fn rank(self) -> u8 {
        match self {
            DiskRole::Layer => 0,
            DiskRole::Cow => 1,
            DiskRole::Data => 2,
            DiskRole::Cidata => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskRole::Layer => "layer",
            DiskRole::Cow => "cow",
            DiskRole::Data => "data",
            DiskRole::Cidata => "cidata",
        }
    }
}

impl fmt::Display for DiskRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The filesystem the host puts on a data disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// Formatted with `mkfs.ext4` by the host; may be mounted.
    Ext4,
    /// Left blank for the guest; never mounted.
    None,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::None => "none",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One disk of a VM, in the order the guest sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The disk file: under the VM's directory, or a blob or conversion in
    /// the image store (layers).
    pub path: PathBuf,
    pub read_only: bool,
    /// The virtio-blk serial (GET_ID); the guest sees
    /// `/dev/disk/by-id/virtio-<serial>`. For data disks it is the disk's
    /// name.
    pub serial: String,
    pub role: DiskRole,
    /// Where the guest mounts it (data disks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// The filesystem the host made on it (data disks only, required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<FsType>,
    /// O_DIRECT on the host side: `Some(true)` on, `Some(false)` off, `None`
    /// the host's choice (data disks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
}

impl StorageConfig {
    /// The disk as the VMM opens it. `direct_io: None` means the host's
    /// choice, which is the page cache.
    pub fn to_vmm_disk(&self) -> cocoon_vmm::DiskConfig {
        cocoon_vmm::DiskConfig {
            path: self.path.clone(),
            read_only: self.read_only,
            serial: Some(self.serial.clone()),
            direct: self.direct_io.unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_round_trip_and_unknown_fields_refused() {
        let d = StorageConfig {
            path: "/s/vms/a/data-logs.raw".into(),
            read_only: false,
            serial: "logs".into(),
            role: DiskRole::Data,
            mount_point: Some("/var/log".into()),
            fstype: Some(FsType::Ext4),
            direct_io: None,
        };
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<StorageConfig>(&json).unwrap(), d);
        assert!(json.contains(r#""role":"data""#), "{json}");
        assert!(!json.contains("direct_io"), "None is omitted: {json}");

        let extra = json.replace('}', r#","size":1}"#);
        let e = serde_json::from_str::<StorageConfig>(&extra).unwrap_err();
        assert!(e.to_string().contains("unknown field `size`"), "{e}");
        let bad_role = json.replace(r#""data""#, r#""swap""#);
        assert!(serde_json::from_str::<StorageConfig>(&bad_role).is_err());
    }

    #[test]
    fn role_order_and_read_only() {
        use DiskRole::*;
        let mut roles = vec![Cidata, Data, Layer, Cow];
        roles.sort();
        assert_eq!(roles, vec![Layer, Cow, Data, Cidata]);
        assert_eq!(
            roles.iter().map(|r| r.read_only()).collect::<Vec<_>>(),
            vec![true, false, false, true]
        );
    }
}
