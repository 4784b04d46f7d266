//! Disk planning: the host builds the policy request from the VM request,
//! asks a disk policy (a plugin in production, anything implementing
//! [`DiskPolicy`] in tests), and turns the answer into the VM's
//! [`StorageConfig`]s. The policy proposes roles, order, sizes and
//! options; the host assigns every path and every host serial, and
//! refuses a plan that breaks a rule, naming the policy and every broken
//! rule.
//!
//! Host-assigned, whatever the plan says:
//! - layer `k` is the request's layer `k` (its store path), serial
//!   `cocoon-layerK`;
//! - the cow is `cow.raw` in the VM's directory (blank, or the per-VM copy
//!   of a disk image's base), serial `cocoon-cow`;
//! - data disk `NAME` is `data-NAME.raw`, serial `NAME`;
//! - the cloud-init seed is `cidata.img`, serial `cocoon-cidata`.
//!
//! A plan may name another file for a cow, data or cidata disk; it must be
//! a plain file name in the VM's directory (no `/`, no `..`, no leading
//! dot: the host's lock and temp files start with one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::model::{DiskRole, FsType, StorageConfig};
use super::rules::{self, Context, Violation, Violations};
use super::spec::DataDisk;
use crate::store::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("disk policy {policy} refused the request")]
    Policy {
        policy: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("disk policy {policy} returned a plan the host refuses")]
    Refused {
        policy: String,
        #[source]
        violations: Violations,
    },
}

/// One read-only layer of a layered image, base first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerImage {
    pub digest: Digest,
    /// The layer's file in the image store.
    pub path: PathBuf,
}

/// A disk image's converted base, as the store hands it out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseImage {
    /// The conversion cache's file: copied per VM, never used itself.
    pub path: PathBuf,
    /// Its digest file's digest, re-checked while copying when given.
    pub digest: Option<Digest>,
    pub size: u64,
}

/// What the VM's image contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageDisks {
    /// Read-only layers (OCI) under a blank writable cow.
    Layered {
        /// The image kind the policy sees, e.g. `oci`.
        kind: String,
        layers: Vec<LayerImage>,
    },
    /// A disk image whose per-VM copy is the writable root.
    Disk {
        /// The image kind the policy sees, e.g. `cloudimg`.
        kind: String,
        base: BaseImage,
    },
}

impl ImageDisks {
    pub fn kind(&self) -> &str {
        match self {
            ImageDisks::Layered { kind, .. } | ImageDisks::Disk { kind, .. } => kind,
        }
    }

    fn layers(&self) -> &[LayerImage] {
        match self {
            ImageDisks::Layered { layers, .. } => layers,
            ImageDisks::Disk { .. } => &[],
        }
    }
}

/// Everything the host knows about a VM's disks before planning.
#[derive(Debug, Clone)]
pub struct DiskRequest {
    /// The VM's name (the policy sees it).
    pub vm_name: String,
    /// Where the VM's own disks go; must exist at create time.
    pub vm_dir: PathBuf,
    /// The image store's root: layer and base paths lie under it.
    pub store_dir: PathBuf,
    pub image: ImageDisks,
    /// The requested cow size (`--cow-size`), if any.
    pub cow_size: Option<u64>,
    /// Resolved `--data-disk` flags ([`super::spec::resolve`]).
    pub data_disks: Vec<DataDisk>,
    /// Whether the VM gets a cloud-init seed.
    pub cidata: bool,
    /// Site settings for the policy, from the host's config file.
    pub settings: BTreeMap<String, String>,
}

/// What a disk policy is asked: the host-side form of the WIT
/// `vm-request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    pub name: String,
    pub image_kind: String,
    /// Layer digests, base first (empty for a disk image).
    pub layers: Vec<String>,
    /// The requested cow size; for a disk image, at least the base's size.
    pub cow_size: Option<u64>,
    pub data_disks: Vec<DataDisk>,
    pub cidata: bool,
    pub settings: Vec<(String, String)>,
}

/// One disk of a policy's plan: the host-side form of the WIT `disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    /// For data disks, the name (and serial); for the others, a label the
    /// host does not use.
    pub name: String,
    pub role: DiskRole,
    pub read_only: bool,
    /// Bytes, for the disks the host creates (cow, data).
    pub size_bytes: Option<u64>,
    /// A file name in the VM's directory instead of the host's default.
    pub file: Option<String>,
    pub mount_point: Option<String>,
    pub fstype: Option<FsType>,
    pub direct_io: Option<bool>,
}

/// A disk policy: the built-in default, a site's plugin, or a test's fake.
pub trait DiskPolicy {
    /// Named in every refusal.
    fn name(&self) -> &str;
    /// The ordered plan for `request`, or the policy's own refusal.
    fn plan(
        &self,
        request: &PolicyRequest,
    ) -> Result<Vec<PlannedDisk>, Box<dyn std::error::Error + Send + Sync>>;
}

/// How the host makes a planned disk's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A layer: the store's file, used read-only as is.
    Layer { digest: Digest },
    /// A sparse, blank file.
    Blank { size: u64 },
    /// A per-VM copy of a disk image's base, grown to `size`.
    BaseCopy { base: BaseImage, size: u64 },
    /// A sparse data disk, formatted if ext4.
    Data { size: u64, fstype: FsType },
    /// The cloud-init seed image.
    Cidata,
}

/// One disk of an accepted plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStorage {
    pub config: StorageConfig,
    pub source: DiskSource,
}

/// An accepted plan: every path and serial assigned, every rule checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The policy that proposed it.
    pub policy: String,
    pub disks: Vec<PlannedStorage>,
}

impl Plan {
    /// The disks as VM records and the VMM take them, in plan order.
    pub fn storage(&self) -> Vec<StorageConfig> {
        self.disks.iter().map(|d| d.config.clone()).collect()
    }

    /// The writable disks: the ones to lock ([`super::lock::DiskLocks`]).
    pub fn writable(&self) -> Vec<PathBuf> {
        self.disks
            .iter()
            .filter(|d| !d.config.read_only)
            .map(|d| d.config.path.clone())
            .collect()
    }
}

/// Host serials of the host's own disks.
pub const COW_SERIAL: &str = "cocoon-cow";
pub const CIDATA_SERIAL: &str = "cocoon-cidata";
pub fn layer_serial(k: usize) -> String {
    format!("cocoon-layer{k}")
}
/// Default file names in the VM's directory.
pub const COW_FILE: &str = "cow.raw";
pub const CIDATA_FILE: &str = "cidata.img";
pub fn data_file(name: &str) -> String {
    format!("data-{name}.raw")
}

impl DiskRequest {
    /// The request the policy sees.
    pub fn policy_request(&self) -> PolicyRequest {
        let cow_size = match &self.image {
            ImageDisks::Disk { base, .. } => Some(self.cow_size.unwrap_or(0).max(base.size)),
            ImageDisks::Layered { .. } => self.cow_size,
        };
        PolicyRequest {
            name: self.vm_name.clone(),
            image_kind: self.image.kind().to_string(),
            layers: self
                .image
                .layers()
                .iter()
                .map(|l| l.digest.to_string())
                .collect(),
            cow_size,
            data_disks: self.data_disks.clone(),
            cidata: self.cidata,
            settings: self
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// Asks `policy` for a plan and turns it into the VM's disks, or refuses
/// it with every broken rule.
pub fn plan(request: &DiskRequest, policy: &dyn DiskPolicy) -> Result<Plan, PlanError> {
    let policy_request = request.policy_request();
    let proposed = policy
        .plan(&policy_request)
        .map_err(|source| PlanError::Policy {
            policy: policy.name().to_string(),
            source,
        })?;
    accept(request, &policy_request, &proposed)
        .map_err(|violations| PlanError::Refused {
            policy: policy.name().to_string(),
            violations,
        })
        .map(|disks| Plan {
            policy: policy.name().to_string(),
            disks,
        })
}

/// The host's half of planning, pure: paths, serials, sources, and every
/// rule (the plan-specific ones here, the role invariants in
/// [`rules::validate`]).
pub fn accept(
    request: &DiskRequest,
    asked: &PolicyRequest,
    proposed: &[PlannedDisk],
) -> Result<Vec<PlannedStorage>, Violations> {
    let mut out: Vec<Violation> = Vec::new();
    let mut v = |index: Option<usize>, field: &'static str, message: String| {
        out.push(Violation {
            index,
            field,
            message,
        })
    };
    let layers = request.image.layers();
    let mut next_layer = 0usize;
    let mut disks = Vec::with_capacity(proposed.len());
    for (i, p) in proposed.iter().enumerate() {
        let at = Some(i);
        let in_vm_dir =
            |default: String, v: &mut dyn FnMut(Option<usize>, &'static str, String)| {
                let name = p.file.clone().unwrap_or(default);
                if let Err(e) = check_file_name(&name) {
                    v(at, "path", e);
                }
                request.vm_dir.join(name)
            };
        let (path, serial, source) = match p.role {
            DiskRole::Layer => {
                let k = next_layer;
                next_layer += 1;
                if p.file.is_some() {
                    v(
                        at,
                        "path",
                        "a layer's file is the image store's; a plan cannot name one".into(),
                    );
                }
                match layers.get(k) {
                    Some(l) => (
                        l.path.clone(),
                        layer_serial(k),
                        DiskSource::Layer {
                            digest: l.digest.clone(),
                        },
                    ),
                    None => {
                        v(
                            at,
                            "role",
                            format!("layer disk {k}, but the image has {} layers", layers.len()),
                        );
                        (
                            request.store_dir.join("missing-layer"),
                            layer_serial(k),
                            DiskSource::Blank { size: 0 },
                        )
                    }
                }
            }
            DiskRole::Cow => {
                let path = in_vm_dir(COW_FILE.into(), &mut v);
                let source = match &request.image {
                    ImageDisks::Disk { base, .. } => {
                        let size = p.size_bytes.unwrap_or(base.size);
                        if size < base.size {
                            v(
                                at,
                                "size",
                                format!("{size} bytes; the base image needs {}", base.size),
                            );
                        }
                        DiskSource::BaseCopy {
                            base: base.clone(),
                            size: size.max(base.size),
                        }
                    }
                    ImageDisks::Layered { .. } => match p.size_bytes.or(asked.cow_size) {
                        Some(0) | None => {
                            v(at, "size", "unknown; a cow disk needs a size".into());
                            DiskSource::Blank { size: 0 }
                        }
                        Some(size) => DiskSource::Blank { size },
                    },
                };
                (path, COW_SERIAL.to_string(), source)
            }
            DiskRole::Data => {
                let path = in_vm_dir(data_file(&p.name), &mut v);
                let source = DiskSource::Data {
                    size: p.size_bytes.unwrap_or(0),
                    fstype: p.fstype.unwrap_or(FsType::None),
                };
                (path, p.name.clone(), source)
            }
            DiskRole::Cidata => {
                if !request.cidata {
                    v(
                        at,
                        "role",
                        "a cidata disk, but the request asked for no cloud-init seed".into(),
                    );
                }
                (
                    in_vm_dir(CIDATA_FILE.into(), &mut v),
                    CIDATA_SERIAL.to_string(),
                    DiskSource::Cidata,
                )
            }
        };
        disks.push(PlannedStorage {
            config: StorageConfig {
                path,
                read_only: p.read_only,
                serial,
                role: p.role,
                mount_point: p.mount_point.clone(),
                fstype: p.fstype,
                direct_io: p.direct_io,
            },
            source,
        });
    }
    if next_layer < layers.len() {
        v(
            None,
            "role",
            format!(
                "{next_layer} layer disks, but the image has {} layers",
                layers.len()
            ),
        );
    }
    if matches!(request.image, ImageDisks::Disk { .. })
        && !proposed.iter().any(|p| p.role == DiskRole::Cow)
    {
        v(
            None,
            "role",
            "no cow disk; a disk image boots from its per-VM copy".into(),
        );
    }
    for want in &request.data_disks {
        if !proposed
            .iter()
            .any(|p| p.role == DiskRole::Data && p.name == want.name)
        {
            v(
                None,
                "data",
                format!("the requested data disk {:?} is not in the plan", want.name),
            );
        }
    }
    for (i, d) in disks.iter().enumerate() {
        if let Some(j) = disks[..i]
            .iter()
            .position(|e| e.config.path == d.config.path)
        {
            v(Some(i), "path", format!("the same file as disk {j}"));
        }
    }

    let storage: Vec<StorageConfig> = disks.iter().map(|d| d.config.clone()).collect();
    let roots = [request.vm_dir.clone(), request.store_dir.clone()];
    let size_of = |i: usize, _: &StorageConfig| proposed[i].size_bytes;
    let ctx = Context {
        roots: &roots,
        size_of: &size_of,
    };
    if let Err(Violations(more)) = rules::validate(&storage, &ctx) {
        out.extend(more);
    }
    if out.is_empty() {
        Ok(disks)
    } else {
        out.sort_by_key(|v| v.index.unwrap_or(usize::MAX));
        Err(Violations(out))
    }
}

/// A plan's file name for a disk: one plain component in the VM's
/// directory.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        "is empty"
    } else if name.contains('/') || name == ".." || name == "." {
        "is outside the VM's directory; a plan names a plain file in it"
    } else if name.starts_with('.') {
        "starts with a dot, which the host's own files use"
    } else if name.len() > 100 {
        "is longer than 100 bytes"
    } else if name.chars().any(|c| c.is_control()) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(format!("file {name:?} {problem}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "/state/vms/v1";
    const STORE: &str = "/state/images";

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn data(name: &str, fstype: FsType, mount: Option<&str>) -> DataDisk {
        DataDisk {
            name: name.into(),
            size_bytes: 1 << 30,
            fstype,
            mount_point: mount.map(str::to_string),
            direct_io: None,
        }
    }

    fn layered() -> DiskRequest {
        DiskRequest {
            vm_name: "v1".into(),
            vm_dir: VM.into(),
            store_dir: STORE.into(),
            image: ImageDisks::Layered {
                kind: "oci".into(),
                layers: (0..2)
                    .map(|i| LayerImage {
                        digest: digest(i),
                        path: format!("{STORE}/sha256/{}", digest(i).hex()).into(),
                    })
                    .collect(),
            },
            cow_size: Some(4 << 30),
            data_disks: vec![
                data("logs", FsType::Ext4, Some("/var/log")),
                data("scratch", FsType::None, None),
            ],
            cidata: true,
            settings: BTreeMap::from([("site".to_string(), "x".to_string())]),
        }
    }

    fn disk_image() -> DiskRequest {
        DiskRequest {
            image: ImageDisks::Disk {
                kind: "cloudimg".into(),
                base: BaseImage {
                    path: format!("{STORE}/converted/x/raw/y/image").into(),
                    digest: Some(digest(9)),
                    size: 2 << 30,
                },
            },
            cow_size: None,
            ..layered()
        }
    }

    /// The plan a well-behaved policy returns (the default policy's shape).
    fn good(request: &PolicyRequest) -> Vec<PlannedDisk> {
        let mut out: Vec<PlannedDisk> = request
            .layers
            .iter()
            .enumerate()
            .map(|(i, _)| PlannedDisk {
                name: format!("layer{i}"),
                role: DiskRole::Layer,
                read_only: true,
                size_bytes: None,
                file: None,
                mount_point: None,
                fstype: None,
                direct_io: None,
            })
            .collect();
        out.push(PlannedDisk {
            name: "root".into(),
            role: DiskRole::Cow,
            read_only: false,
            size_bytes: request.cow_size,
            ..out.first().cloned().unwrap_or_else(|| PlannedDisk {
                name: String::new(),
                role: DiskRole::Cow,
                read_only: false,
                size_bytes: None,
                file: None,
                mount_point: None,
                fstype: None,
                direct_io: None,
            })
        });
        for d in &request.data_disks {
            out.push(PlannedDisk {
                name: d.name.clone(),
                role: DiskRole::Data,
                read_only: false,
                size_bytes: Some(d.size_bytes),
                file: None,
                mount_point: d.mount_point.clone(),
                fstype: Some(d.fstype),
                direct_io: d.direct_io,
            });
        }
        if request.cidata {
            out.push(PlannedDisk {
                name: "cidata".into(),
                role: DiskRole::Cidata,
                read_only: true,
                size_bytes: None,
                file: None,
                mount_point: None,
                fstype: None,
                direct_io: None,
            });
        }
        out
    }

    struct Fake<F>(F);

    impl<F> DiskPolicy for Fake<F>
    where
        F: Fn(&PolicyRequest) -> Result<Vec<PlannedDisk>, String>,
    {
        fn name(&self) -> &str {
            "fake-policy"
        }
        fn plan(
            &self,
            request: &PolicyRequest,
        ) -> Result<Vec<PlannedDisk>, Box<dyn std::error::Error + Send + Sync>> {
            (self.0)(request).map_err(Into::into)
        }
    }

    #[test]
    fn a_layered_plan_gets_host_paths_and_serials() {
        let req = layered();
        let seen = std::cell::RefCell::new(None);
        let plan = plan(
            &req,
            &Fake(|r: &PolicyRequest| {
                *seen.borrow_mut() = Some(r.clone());
                Ok(good(r))
            }),
        )
        .unwrap();
        let asked = seen.into_inner().unwrap();
        assert_eq!(asked.image_kind, "oci");
        assert_eq!(
            asked.layers,
            vec![digest(0).to_string(), digest(1).to_string()]
        );
        assert_eq!(asked.cow_size, Some(4 << 30));
        assert_eq!(asked.settings, vec![("site".to_string(), "x".to_string())]);
        assert!(asked.cidata);
        assert_eq!(asked.data_disks, req.data_disks);

        assert_eq!(plan.policy, "fake-policy");
        let got: Vec<(String, &str, bool)> = plan
            .disks
            .iter()
            .map(|d| {
                (
                    d.config.path.to_string_lossy().into_owned(),
                    d.config.serial.as_str(),
                    d.config.read_only,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    format!("{STORE}/sha256/{}", digest(0).hex()),
                    "cocoon-layer0",
                    true
                ),
                (
                    format!("{STORE}/sha256/{}", digest(1).hex()),
                    "cocoon-layer1",
                    true
                ),
                (format!("{VM}/cow.raw"), "cocoon-cow", false),
                (format!("{VM}/data-logs.raw"), "logs", false),
                (format!("{VM}/data-scratch.raw"), "scratch", false),
                (format!("{VM}/cidata.img"), "cocoon-cidata", true),
            ]
        );
        assert_eq!(
            plan.disks[0].source,
            DiskSource::Layer { digest: digest(0) }
        );
        assert_eq!(plan.disks[2].source, DiskSource::Blank { size: 4 << 30 });
        assert_eq!(
            plan.disks[3].source,
            DiskSource::Data {
                size: 1 << 30,
                fstype: FsType::Ext4
            }
        );
        assert_eq!(
            plan.disks[3].config.mount_point.as_deref(),
            Some("/var/log")
        );
        assert_eq!(plan.disks[5].source, DiskSource::Cidata);
        assert_eq!(
            plan.writable(),
            vec![
                PathBuf::from(format!("{VM}/cow.raw")),
                format!("{VM}/data-logs.raw").into(),
                format!("{VM}/data-scratch.raw").into()
            ]
        );
        assert_eq!(plan.storage().len(), 6);
    }

    #[test]
    fn a_disk_image_plan_copies_the_base() {
        let req = disk_image();
        let asked = req.policy_request();
        assert!(asked.layers.is_empty());
        assert_eq!(asked.cow_size, Some(2 << 30), "at least the base's size");
        let plan = plan(&req, &Fake(|r: &PolicyRequest| Ok(good(r)))).unwrap();
        let ImageDisks::Disk { base, .. } = &req.image else {
            unreachable!()
        };
        assert_eq!(
            plan.disks[0].source,
            DiskSource::BaseCopy {
                base: base.clone(),
                size: 2 << 30
            }
        );
        assert_eq!(
            plan.disks[0].config.path,
            PathBuf::from(format!("{VM}/cow.raw"))
        );
        assert_ne!(plan.disks[0].config.path, base.path, "never the cache file");
        // A plan may name the file, inside the VM's directory.
        let plan = super::plan(
            &req,
            &Fake(|r: &PolicyRequest| {
                let mut p = good(r);
                p[0].file = Some("root.img".into());
                p[0].size_bytes = Some(3 << 30);
                Ok(p)
            }),
        )
        .unwrap();
        assert_eq!(
            plan.disks[0].config.path,
            PathBuf::from(format!("{VM}/root.img"))
        );
        assert!(
            matches!(plan.disks[0].source, DiskSource::BaseCopy { size, .. } if size == 3 << 30)
        );
    }

    /// Each bad plan is refused naming the policy and the broken rule.
    #[test]
    fn bad_plans_are_refused_with_each_rule_named() {
        type Edit = fn(&mut Vec<PlannedDisk>);
        type Request = fn() -> DiskRequest;
        type Case = (
            &'static str,
            Request,
            Edit,
            Option<usize>,
            &'static str,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                "read-only cow",
                layered,
                |p| p[2].read_only = true,
                Some(2),
                "read_only",
                "must be writable",
            ),
            (
                "duplicate serial",
                layered,
                |p| p[4].name = "logs".into(),
                Some(4),
                "serial",
                "earlier disk",
            ),
            (
                "cidata not last",
                layered,
                |p| p.swap(4, 5),
                Some(5),
                "role",
                "after a cidata disk",
            ),
            (
                "file outside",
                layered,
                |p| p[3].file = Some("../v2/data.raw".into()),
                Some(3),
                "path",
                "outside the VM's directory",
            ),
            (
                "absolute file",
                layered,
                |p| p[3].file = Some("/etc/passwd".into()),
                Some(3),
                "path",
                "outside the VM's directory",
            ),
            (
                "dot file",
                layered,
                |p| p[5].file = Some(".lock".into()),
                Some(5),
                "path",
                "starts with a dot",
            ),
            (
                "two disks, one file",
                layered,
                |p| p[4].file = Some("data-logs.raw".into()),
                Some(4),
                "path",
                "the same file as disk 3",
            ),
            (
                "data without size",
                layered,
                |p| p[3].size_bytes = None,
                Some(3),
                "size",
                "needs a size",
            ),
            (
                "tiny data disk",
                layered,
                |p| p[3].size_bytes = Some(1 << 20),
                Some(3),
                "size",
                "at least 16 MiB",
            ),
            (
                "data without fstype",
                layered,
                |p| p[4].fstype = None,
                Some(4),
                "fstype",
                "needs one",
            ),
            (
                "a layer too few",
                layered,
                |p| {
                    p.remove(1);
                },
                None,
                "role",
                "1 layer disks, but the image has 2",
            ),
            (
                "a layer too many",
                layered,
                |p| {
                    let l = p[0].clone();
                    p.insert(0, l);
                },
                Some(2),
                "role",
                "the image has 2 layers",
            ),
            (
                "a layer with a file",
                layered,
                |p| p[0].file = Some("x".into()),
                Some(0),
                "path",
                "image store's",
            ),
            (
                "dropped data disk",
                layered,
                |p| {
                    p.remove(4);
                },
                None,
                "data",
                "\"scratch\" is not in the plan",
            ),
            (
                "cow without size",
                layered,
                |p| p[2].size_bytes = Some(0),
                Some(2),
                "size",
                "cow disk needs a size",
            ),
            (
                "mount on the cow",
                layered,
                |p| p[2].mount_point = Some("/x".into()),
                Some(2),
                "mount_point",
                "only data disks",
            ),
            (
                "cow smaller than base",
                disk_image,
                |p| p[0].size_bytes = Some(1 << 30),
                Some(0),
                "size",
                "the base image needs",
            ),
            (
                "no cow for a disk image",
                disk_image,
                |p| {
                    p.remove(0);
                },
                None,
                "role",
                "no cow disk",
            ),
            (
                "unrequested cidata",
                || DiskRequest {
                    cidata: false,
                    ..layered()
                },
                |p| {
                    p.push(PlannedDisk {
                        name: "cidata".into(),
                        role: DiskRole::Cidata,
                        read_only: true,
                        size_bytes: None,
                        file: None,
                        mount_point: None,
                        fstype: None,
                        direct_io: None,
                    })
                },
                Some(5),
                "role",
                "asked for no cloud-init seed",
            ),
        ];
        for (name, request, edit, index, field, want) in cases {
            let req = request();
            let e = plan(
                &req,
                &Fake(|r: &PolicyRequest| {
                    let mut p = good(r);
                    edit(&mut p);
                    Ok(p)
                }),
            )
            .expect_err(name);
            let PlanError::Refused { policy, violations } = &e else {
                panic!("{name}: {e}")
            };
            assert_eq!(policy, "fake-policy");
            assert!(violations.has(*index, field), "{name}: {violations}");
            assert!(
                violations.to_string().contains(want),
                "{name}: {violations}"
            );
            assert!(e.to_string().contains("fake-policy"), "{name}: {e}");
        }
    }

    #[test]
    fn every_broken_rule_is_listed() {
        let e = plan(
            &layered(),
            &Fake(|r: &PolicyRequest| {
                let mut p = good(r);
                p[2].read_only = true;
                p[3].size_bytes = None;
                p[5].file = Some("/etc/x".into());
                Ok(p)
            }),
        )
        .unwrap_err();
        let PlanError::Refused { violations, .. } = e else {
            panic!()
        };
        assert!(violations.has(Some(2), "read_only"), "{violations}");
        assert!(violations.has(Some(3), "size"), "{violations}");
        assert!(violations.has(Some(5), "path"), "{violations}");
    }

    #[test]
    fn a_policy_refusal_names_the_policy_and_keeps_its_reason() {
        let e = plan(
            &layered(),
            &Fake(|_: &PolicyRequest| Err("over quota".to_string())),
        )
        .unwrap_err();
        assert!(
            matches!(&e, PlanError::Policy { policy, .. } if policy == "fake-policy"),
            "{e}"
        );
        assert_eq!(
            std::error::Error::source(&e).map(|s| s.to_string()),
            Some("over quota".to_string())
        );
    }

    #[test]
    fn file_names() {
        for ok in ["cow.raw", "data-x.raw", "root image.img"] {
            check_file_name(ok).unwrap();
        }
        for (bad, want) in [
            ("", "empty"),
            ("..", "outside"),
            (".", "outside"),
            ("a/b", "outside"),
            ("/abs", "outside"),
            (".hidden", "dot"),
            ("a\nb", "control"),
        ] {
            let e = check_file_name(bad).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        check_file_name(&"x".repeat(101)).unwrap_err();
    }
}
