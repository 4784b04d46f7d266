//! Disk policies as the host sees them: the request it builds, the plan a
//! policy proposes, and the checked calls that carry them across the WIT
//! boundary. These are host types, not the generated bindings: disk
//! planning (`crate::disk`) consumes [`PlannedDisk`], turns it into
//! `StorageConfig`s, assigns paths and runs `disk::rules::validate`.
//!
//! What is checked here is what a plan must satisfy whatever the VM (the
//! plan answers the request it was given; file names are plain names in the
//! VM's directory; sizes of answers are bounded). The role invariants are
//! `disk::rules`', applied by the caller to the finished disk list.
//!
//! ```no_run
//! # fn main() -> Result<(), cocoon_host::plugin::PluginError> {
//! use cocoon_host::config::HostConfig;
//! use cocoon_host::plugin::policy::{ImageKind, Policy, PolicyRequest};
//! use cocoon_host::plugin::{Registry, Runtime};
//! let config = HostConfig::at("/tmp/state".as_ref());
//! let runtime = Runtime::new(None)?;
//! let registry = Registry::discover(&config);
//! let policy = Policy::load(&runtime, &registry, &config.vm.policy)?;
//! let request = PolicyRequest {
//!     name: "vm1".into(),
//!     image: ImageKind::Layered { layers: vec!["sha256:…".into()] },
//!     cow_size: None,
//!     data_disks: vec![],
//!     cidata: true,
//!     settings: config.vm.settings.clone(),
//! };
//! let plan = policy.plan(&request)?; // validate first, then plan, both checked
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::bindings::disk_policy::exports::cocoon::plugin::policy as wit;
use super::error::PluginError;
use super::manifest::PluginKind;
use super::registry::Registry;
use super::runtime::{LoadedPlugin, Runtime};
pub use crate::disk::{DiskRole, FsType};

/// Most disks a plan may hold.
pub const MAX_PLAN_DISKS: usize = 64;
/// Longest string (name, mount point, message) a policy may answer with.
pub const MAX_ANSWER_STRING: usize = 4096;
/// Most violations one validate call may report.
pub const MAX_VIOLATIONS: usize = 256;
/// Longest file name a plan may give (a Linux file name).
pub const MAX_FILE_NAME: usize = 255;

/// What the VM boots from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageKind {
    /// A layered (OCI) image: its layer digests (`sha256:<hex>`), base
    /// first. The plan's layer disks are these layers, in this order.
    Layered { layers: Vec<String> },
    /// A disk image converted to raw, copied into the VM's directory as
    /// its writable root (the plan's cow disk).
    Disk { digest: String, virtual_size: u64 },
}

/// A data disk the user asked for, as the host parsed it (names, default
/// mount points and fstype are resolved before the policy sees it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataDiskRequest {
    /// The disk's name and serial (`/dev/disk/by-id/virtio-NAME`).
    pub name: String,
    pub size_bytes: u64,
    pub fstype: FsType,
    /// Where the guest mounts it; `None`: not mounted.
    #[serde(default)]
    pub mount_point: Option<String>,
    /// O_DIRECT: `Some(true)` on, `Some(false)` off, `None` the host's
    /// choice.
    #[serde(default)]
    pub direct_io: Option<bool>,
}

/// What the host asks a policy about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    /// The VM's name.
    pub name: String,
    pub image: ImageKind,
    /// The writable root's size the user asked for; `None`: the policy's
    /// choice (for a disk image: the image's own size).
    #[serde(default)]
    pub cow_size: Option<u64>,
    /// In the order the user gave them.
    #[serde(default)]
    pub data_disks: Vec<DataDiskRequest>,
    /// Whether the VM gets a cloud-init seed.
    #[serde(default)]
    pub cidata: bool,
    /// Site settings (`[vm] settings` in the host config).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// One disk of a policy's plan, checked by [`check_plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedDisk {
    /// The disk's name, which is the guest's serial for it.
    pub name: String,
    pub role: DiskRole,
    pub read_only: bool,
    /// The size of a disk the host creates (data, a layered image's cow),
    /// or the size a disk image's cow grows to.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub mount_point: Option<String>,
    #[serde(default)]
    pub fstype: Option<FsType>,
    #[serde(default)]
    pub direct_io: Option<bool>,
    /// A plain file name in the VM's directory; `None`: the host picks one.
    /// Never set on layer disks.
    #[serde(default)]
    pub file: Option<String>,
}

/// A site rule a request breaks, as the policy's `validate` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyViolation {
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// One way a plan fails to answer its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanProblem {
    /// The disk's index in the plan; `None` for the plan as a whole.
    pub index: Option<usize>,
    /// `name`, `file`, `mount_point`, `role`, `count`…
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for PlanProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "disk {i} {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// A disk-policy plugin, loaded and checked to be one.
pub struct Policy {
    plugin: LoadedPlugin,
}

impl Policy {
    /// Loads the disk-policy plugin `name` (`[vm] policy`, or a VM's
    /// `--policy`).
    pub fn load(runtime: &Runtime, registry: &Registry, name: &str) -> Result<Self, PluginError> {
        Self::from_plugin(registry.load(runtime, name)?)
    }

    /// Wraps a loaded plugin, which must be a disk policy.
    pub fn from_plugin(plugin: LoadedPlugin) -> Result<Self, PluginError> {
        plugin.expect_kind(PluginKind::DiskPolicy)?;
        Ok(Policy { plugin })
    }

    pub fn name(&self) -> &str {
        self.plugin.name()
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// The site rules `request` breaks (empty: acceptable).
    pub fn validate(&self, request: &PolicyRequest) -> Result<Vec<PolicyViolation>, PluginError> {
        self.plugin.policy_instance()?.validate(request)
    }

    /// The checked plan for `request`: the policy's `validate` first (any
    /// violation refuses the request with [`PluginError::PolicyRefused`]),
    /// then its `plan`, checked by [`check_plan`]
    /// ([`PluginError::BadPlan`] lists every problem).
    pub fn plan(&self, request: &PolicyRequest) -> Result<Vec<PlannedDisk>, PluginError> {
        let mut instance = self.plugin.policy_instance()?;
        let violations = instance.validate(request)?;
        if !violations.is_empty() {
            return Err(PluginError::PolicyRefused {
                plugin: self.name().to_string(),
                violations,
            });
        }
        instance.plan(request)
    }
}

/// Everything that makes `plan` a wrong answer to `request`, whatever the
/// VM: more than [`MAX_PLAN_DISKS`] disks; strings over
/// [`MAX_ANSWER_STRING`]; layer disks that are not the request's layers
/// (one per layer for a layered image, none for a disk image); a cidata
/// disk when none was asked for, or none when one was; a cow missing or
/// doubled; a file name that is not a plain name in the VM's directory, on
/// a layer, or used twice.
pub fn check_plan(request: &PolicyRequest, plan: &[PlannedDisk]) -> Vec<PlanProblem> {
    let mut out = Vec::new();
    let mut problem = |index: Option<usize>, field: &'static str, message: String| {
        out.push(PlanProblem {
            index,
            field,
            message,
        })
    };
    if plan.len() > MAX_PLAN_DISKS {
        problem(
            None,
            "count",
            format!("{} disks, at most {MAX_PLAN_DISKS}", plan.len()),
        );
        return out;
    }
    let mut files: HashMap<&str, usize> = HashMap::new();
    for (i, d) in plan.iter().enumerate() {
        let at = Some(i);
        for (field, value) in [
            ("name", Some(&d.name)),
            ("mount_point", d.mount_point.as_ref()),
            ("file", d.file.as_ref()),
        ] {
            if let Some(v) = value.filter(|v| v.len() > MAX_ANSWER_STRING) {
                problem(
                    at,
                    field,
                    format!("{} bytes long, at most {MAX_ANSWER_STRING}", v.len()),
                );
            }
        }
        let Some(file) = d.file.as_deref() else {
            continue;
        };
        if file.len() > MAX_ANSWER_STRING {
            continue;
        }
        if d.role == DiskRole::Layer {
            problem(
                at,
                "file",
                format!("{file:?}: layer disks are the image's own files in the store"),
            );
        } else if let Err(why) = check_file_name(file) {
            problem(at, "file", format!("{file:?}: {why}"));
        } else if let Some(first) = files.insert(file, i) {
            problem(at, "file", format!("{file:?} is also disk {first}'s file"));
        }
    }
    let count = |role: DiskRole| plan.iter().filter(|d| d.role == role).count();
    let layers = count(DiskRole::Layer);
    let wanted_layers = match &request.image {
        ImageKind::Layered { layers } => layers.len(),
        ImageKind::Disk { .. } => 0,
    };
    if layers != wanted_layers {
        problem(
            None,
            "role",
            format!(
                "{layers} layer disks for an image of {wanted_layers} layers{}",
                if matches!(request.image, ImageKind::Disk { .. }) {
                    " (a disk image boots from its cow copy)"
                } else {
                    ""
                }
            ),
        );
    }
    let cows = count(DiskRole::Cow);
    if cows != 1 {
        problem(
            None,
            "role",
            format!("{cows} cow disks; a VM has exactly one writable root"),
        );
    }
    let cidata = count(DiskRole::Cidata);
    let wanted_cidata = usize::from(request.cidata);
    if cidata != wanted_cidata {
        problem(
            None,
            "role",
            format!(
                "{cidata} cidata disks, and the request {} a cloud-init seed",
                if request.cidata {
                    "asks for"
                } else {
                    "does not ask for"
                }
            ),
        );
    }
    out
}

/// A file name a plan may give: one plain component, so it stays inside
/// the VM's directory; no leading dot (the host's temp and lock files).
pub fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_FILE_NAME {
        return Err("longer than 255 bytes");
    }
    if name.contains('/') {
        return Err("not a plain file name in the VM's directory (contains '/')");
    }
    if name.starts_with('.') {
        return Err("starts with '.' (\"..\", hidden and temp names are the host's)");
    }
    if name.chars().any(|c| c == '\0' || c.is_control()) {
        return Err("contains a control character");
    }
    Ok(())
}

// Conversions across the WIT boundary.

impl From<FsType> for wit::FsType {
    fn from(f: FsType) -> Self {
        match f {
            FsType::Ext4 => wit::FsType::Ext4,
            FsType::None => wit::FsType::None,
        }
    }
}

impl From<wit::FsType> for FsType {
    fn from(f: wit::FsType) -> Self {
        match f {
            wit::FsType::Ext4 => FsType::Ext4,
            wit::FsType::None => FsType::None,
        }
    }
}

impl From<wit::DiskRole> for DiskRole {
    fn from(r: wit::DiskRole) -> Self {
        match r {
            wit::DiskRole::Layer => DiskRole::Layer,
            wit::DiskRole::Cow => DiskRole::Cow,
            wit::DiskRole::Data => DiskRole::Data,
            wit::DiskRole::Cidata => DiskRole::Cidata,
        }
    }
}

impl From<&PolicyRequest> for wit::VmRequest {
    fn from(r: &PolicyRequest) -> Self {
        wit::VmRequest {
            name: r.name.clone(),
            image: match &r.image {
                ImageKind::Layered { layers } => wit::ImageKind::Layered(layers.clone()),
                ImageKind::Disk {
                    digest,
                    virtual_size,
                } => wit::ImageKind::Disk(wit::DiskImage {
                    digest: digest.clone(),
                    virtual_size: *virtual_size,
                }),
            },
            cow_size: r.cow_size,
            data_disks: r
                .data_disks
                .iter()
                .map(|d| wit::DataDiskSpec {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    fstype: d.fstype.into(),
                    mount_point: d.mount_point.clone(),
                    direct_io: d.direct_io,
                })
                .collect(),
            cidata: r.cidata,
            settings: r
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl From<wit::Disk> for PlannedDisk {
    fn from(d: wit::Disk) -> Self {
        PlannedDisk {
            name: d.name,
            role: d.role.into(),
            read_only: d.read_only,
            size_bytes: d.size_bytes,
            mount_point: d.mount_point,
            fstype: d.fstype.map(Into::into),
            direct_io: d.direct_io,
            file: d.file,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, role: DiskRole) -> PlannedDisk {
        PlannedDisk {
            name: name.into(),
            role,
            read_only: role.read_only(),
            size_bytes: None,
            mount_point: None,
            fstype: None,
            direct_io: None,
            file: None,
        }
    }

    fn request(image: ImageKind, cidata: bool) -> PolicyRequest {
        PolicyRequest {
            name: "vm".into(),
            image,
            cow_size: None,
            data_disks: Vec::new(),
            cidata,
            settings: BTreeMap::new(),
        }
    }

    fn layered(n: usize) -> ImageKind {
        ImageKind::Layered {
            layers: (0..n).map(|i| format!("sha256:{i:064}")).collect(),
        }
    }

    fn disk_image() -> ImageKind {
        ImageKind::Disk {
            digest: format!("sha256:{}", "a".repeat(64)),
            virtual_size: 1 << 30,
        }
    }

    fn with_file(mut d: PlannedDisk, file: &str) -> PlannedDisk {
        d.file = Some(file.into());
        d
    }

    #[test]
    fn plan_answers_its_request() {
        use DiskRole::*;
        let good_layered = vec![
            disk("cocoon-layer0", Layer),
            disk("cocoon-layer1", Layer),
            disk("cocoon-root", Cow),
            with_file(disk("logs", Data), "logs.img"),
            disk("cocoon-cidata", Cidata),
        ];
        let good_disk = vec![disk("cocoon-root", Cow), disk("scratch", Data)];
        assert_eq!(check_plan(&request(layered(2), true), &good_layered), []);
        assert_eq!(check_plan(&request(disk_image(), false), &good_disk), []);

        // (request, plan, disk index, field, part of the message)
        type Case<'a> = (
            PolicyRequest,
            Vec<PlannedDisk>,
            Option<usize>,
            &'a str,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                request(layered(2), true),
                good_layered[1..].to_vec(),
                None,
                "role",
                "1 layer disks for an image of 2 layers",
            ),
            (
                request(disk_image(), false),
                [vec![disk("cocoon-layer0", Layer)], good_disk.clone()].concat(),
                None,
                "role",
                "boots from its cow copy",
            ),
            (
                request(disk_image(), false),
                vec![disk("scratch", Data)],
                None,
                "role",
                "0 cow disks",
            ),
            (
                request(disk_image(), false),
                vec![disk("a", Cow), disk("b", Cow)],
                None,
                "role",
                "2 cow disks",
            ),
            (
                request(layered(2), false),
                good_layered.clone(),
                None,
                "role",
                "does not ask for",
            ),
            (
                request(disk_image(), true),
                good_disk.clone(),
                None,
                "role",
                "0 cidata disks, and the request asks for",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), "../x")],
                Some(0),
                "file",
                "contains '/'",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), "..")],
                Some(0),
                "file",
                "starts with '.'",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), "/etc/passwd")],
                Some(0),
                "file",
                "contains '/'",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), "a/b")],
                Some(0),
                "file",
                "contains '/'",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), "")],
                Some(0),
                "file",
                "empty",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), "a\nb")],
                Some(0),
                "file",
                "control character",
            ),
            (
                request(disk_image(), false),
                vec![with_file(disk("cocoon-root", Cow), &"x".repeat(256))],
                Some(0),
                "file",
                "longer than 255",
            ),
            (
                request(layered(1), false),
                vec![with_file(disk("l", Layer), "l.raw"), disk("r", Cow)],
                Some(0),
                "file",
                "layer disks are the image's own files",
            ),
            (
                request(disk_image(), false),
                vec![
                    with_file(disk("cocoon-root", Cow), "same.raw"),
                    with_file(disk("d", Data), "same.raw"),
                ],
                Some(1),
                "file",
                "also disk 0's file",
            ),
            (
                request(disk_image(), false),
                vec![disk(&"n".repeat(MAX_ANSWER_STRING + 1), Cow)],
                Some(0),
                "name",
                "bytes long",
            ),
            (
                request(disk_image(), false),
                vec![disk("d", Data); MAX_PLAN_DISKS + 1],
                None,
                "count",
                "65 disks",
            ),
        ];
        for (req, plan, index, field, want) in cases {
            let problems = check_plan(&req, &plan);
            assert!(
                problems
                    .iter()
                    .any(|p| p.index == index && p.field == field && p.message.contains(want)),
                "{want}: {problems:?}"
            );
        }
    }

    #[test]
    fn request_json_round_trips_and_refuses_unknown_fields() {
        let r = PolicyRequest {
            name: "vm".into(),
            image: layered(1),
            cow_size: Some(1 << 30),
            data_disks: vec![DataDiskRequest {
                name: "logs".into(),
                size_bytes: 1 << 30,
                fstype: FsType::Ext4,
                mount_point: Some("/var/log".into()),
                direct_io: None,
            }],
            cidata: true,
            settings: BTreeMap::from([("k".to_string(), "v".to_string())]),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""image":{"layered":{"layers":["#), "{json}");
        assert_eq!(serde_json::from_str::<PolicyRequest>(&json).unwrap(), r);
        let bad = json.replace(r#""cidata":true"#, r#""cidata":true,"extra":1"#);
        assert!(serde_json::from_str::<PolicyRequest>(&bad).is_err());
        let wit: wit::VmRequest = (&r).into();
        assert!(matches!(wit.image, wit::ImageKind::Layered(ref l) if l.len() == 1));
        assert_eq!(wit.data_disks[0].fstype, wit::FsType::Ext4);
        assert_eq!(wit.settings, vec![("k".to_string(), "v".to_string())]);
    }
}
