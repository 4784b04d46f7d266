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
//!   of a disk image's base), serial `cocoon-root`;
//! - data disk `NAME` is `data-NAME.raw`, serial `NAME`;
//! - the cloud-init seed is `cidata.img`, serial `cocoon-cidata`.
//!
//! The serials of the host's own disks never depend on the policy, so the
//! guest's init finds its root and layers whatever the site's policy (the
//! built-in default policy names its disks the same way).
//!
//! A plan may name another file for a cow, data or cidata disk; it must be
//! a plain file name in the VM's directory
//! ([`crate::plugin::policy::check_file_name`]).
//!
//! The request and plan types are the plugin API's host-side ones
//! ([`crate::plugin::policy`]); [`check_plan`] (does the plan answer the
//! request) and [`rules::validate`] (the role invariants) both run here,
//! for any [`DiskPolicy`], plugin or not.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::model::{DiskRole, FsType, StorageConfig};
use super::rules::{self, Context, Violation, Violations};
use super::spec::DataDisk;
pub use crate::plugin::policy::{
    check_file_name, check_plan, ImageKind, PlannedDisk, PolicyRequest,
};
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
    /// Its digest file's digest (the policy sees it).
    pub digest: Digest,
    pub size: u64,
    /// Re-hash the copy against `digest` before it is used (costs a read
    /// of the whole virtual size, holes included).
    pub verify: bool,
}

impl BaseImage {
    /// The store's converted image (its digest file's digest and size) as
    /// a VM's base.
    pub fn from_converted(
        image: &crate::store::convert_cache::ConvertedImage,
        verify: bool,
    ) -> Self {
        BaseImage {
            path: image.path.clone(),
            digest: image.digest.clone(),
            size: image.size,
            verify,
        }
    }
}

/// What the VM's image contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageDisks {
    /// Read-only layers (OCI), base first, under a blank writable cow.
    Layered { layers: Vec<LayerImage> },
    /// A disk image whose per-VM copy is the writable root.
    Disk { base: BaseImage },
}

impl ImageDisks {
    fn layers(&self) -> &[LayerImage] {
        match self {
            ImageDisks::Layered { layers } => layers,
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
    /// Site settings for the policy: `[vm] settings` (`HostConfig::vm`).
    pub settings: BTreeMap<String, String>,
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

/// A disk-policy plugin: its `validate`, then its `plan`, through the
/// plugin runtime's one checked call.
impl DiskPolicy for crate::plugin::policy::Policy {
    fn name(&self) -> &str {
        crate::plugin::policy::Policy::name(self)
    }

    fn plan(
        &self,
        request: &PolicyRequest,
    ) -> Result<Vec<PlannedDisk>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(crate::plugin::policy::Policy::plan(self, request)?)
    }
}

/// How the host makes a planned disk's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A layer: the store's file, used read-only as is.
    Layer { digest: Digest },
    /// A layered root's cow: a sparse file, formatted ext4 by the host
    /// (the guest's init puts the overlay's upper and work dirs on it).
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
pub const COW_SERIAL: &str = "cocoon-root";
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
        PolicyRequest {
            name: self.vm_name.clone(),
            image: match &self.image {
                ImageDisks::Layered { layers, .. } => ImageKind::Layered {
                    layers: layers.iter().map(|l| l.digest.to_string()).collect(),
                },
                ImageDisks::Disk { base, .. } => ImageKind::Disk {
                    digest: base.digest.to_string(),
                    virtual_size: base.size,
                },
            },
            cow_size: self.cow_size,
            data_disks: self.data_disks.clone(),
            cidata: self.cidata,
            settings: self.settings.clone(),
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
/// rule: does the plan answer the request ([`check_plan`]), the host's
/// own (data disks asked for are there, a disk image's cow holds its
/// base, one file per disk), and the role invariants
/// ([`rules::validate`]).
pub fn accept(
    request: &DiskRequest,
    asked: &PolicyRequest,
    proposed: &[PlannedDisk],
) -> Result<Vec<PlannedStorage>, Violations> {
    let mut out: Vec<Violation> = check_plan(asked, proposed)
        .into_iter()
        .map(|p| Violation {
            index: p.index,
            field: p.field,
            message: p.message,
        })
        .collect();
    if out.iter().any(|v| v.field == "count") {
        // Too many disks to look at one by one.
        return Err(Violations(out));
    }
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
        // A bad file name is check_plan's to report; the default stands in.
        let in_vm_dir = |default: String| {
            let name = p
                .file
                .clone()
                .filter(|f| check_file_name(f).is_ok())
                .unwrap_or(default);
            request.vm_dir.join(name)
        };
        let (path, serial, source) = match p.role {
            DiskRole::Layer => {
                let k = next_layer;
                next_layer += 1;
                match layers.get(k) {
                    Some(l) => (
                        l.path.clone(),
                        layer_serial(k),
                        DiskSource::Layer {
                            digest: l.digest.clone(),
                        },
                    ),
                    // check_plan reports the count.
                    None => (
                        request.store_dir.join(format!("missing-layer-{k}")),
                        layer_serial(k),
                        DiskSource::Blank { size: 0 },
                    ),
                }
            }
            DiskRole::Cow => {
                let source = match &request.image {
                    ImageDisks::Disk { base } => {
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
                    ImageDisks::Layered { .. } => match p.size_bytes {
                        Some(size) if size > 0 => DiskSource::Blank { size },
                        _ => {
                            v(at, "size", "unknown; a cow disk needs a size".into());
                            DiskSource::Blank { size: 0 }
                        }
                    },
                };
                (in_vm_dir(COW_FILE.into()), COW_SERIAL.to_string(), source)
            }
            DiskRole::Data => (
                in_vm_dir(data_file(&p.name)),
                p.name.clone(),
                DiskSource::Data {
                    size: p.size_bytes.unwrap_or(0),
                    fstype: p.fstype.unwrap_or(FsType::None),
                },
            ),
            DiskRole::Cidata => (
                in_vm_dir(CIDATA_FILE.into()),
                CIDATA_SERIAL.to_string(),
                DiskSource::Cidata,
            ),
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
                base: BaseImage {
                    path: format!("{STORE}/converted/x/raw/y/image").into(),
                    digest: digest(9),
                    size: 2 << 30,
                    verify: true,
                },
            },
            cow_size: None,
            ..layered()
        }
    }

    /// A disk of `role` with nothing else set.
    fn bare(name: &str, role: DiskRole) -> PlannedDisk {
        PlannedDisk {
            name: name.into(),
            role,
            read_only: role.read_only(),
            size_bytes: None,
            file: None,
            mount_point: None,
            fstype: None,
            direct_io: None,
        }
    }

    /// The plan a well-behaved policy returns (the default policy's shape).
    fn good(request: &PolicyRequest) -> Vec<PlannedDisk> {
        let (layers, base) = match &request.image {
            ImageKind::Layered { layers } => (layers.len(), None),
            ImageKind::Disk { virtual_size, .. } => (0, Some(*virtual_size)),
        };
        let mut out: Vec<PlannedDisk> = (0..layers)
            .map(|i| bare(&format!("layer{i}"), DiskRole::Layer))
            .collect();
        out.push(PlannedDisk {
            size_bytes: request.cow_size.or(base),
            ..bare("root", DiskRole::Cow)
        });
        for d in &request.data_disks {
            out.push(PlannedDisk {
                size_bytes: Some(d.size_bytes),
                mount_point: d.mount_point.clone(),
                fstype: Some(d.fstype),
                direct_io: d.direct_io,
                ..bare(&d.name, DiskRole::Data)
            });
        }
        if request.cidata {
            out.push(bare("cidata", DiskRole::Cidata));
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
        assert_eq!(
            asked.image,
            ImageKind::Layered {
                layers: vec![digest(0).to_string(), digest(1).to_string()]
            }
        );
        assert_eq!(asked.cow_size, Some(4 << 30));
        assert_eq!(asked.settings, req.settings);
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
                (format!("{VM}/cow.raw"), "cocoon-root", false),
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
        assert_eq!(
            asked.image,
            ImageKind::Disk {
                digest: digest(9).to_string(),
                virtual_size: 2 << 30
            }
        );
        assert_eq!(asked.cow_size, None, "the policy's choice");
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
                "file",
                "not a plain file name in the VM's directory",
            ),
            (
                "absolute file",
                layered,
                |p| p[3].file = Some("/etc/passwd".into()),
                Some(3),
                "file",
                "not a plain file name in the VM's directory",
            ),
            (
                "dot file",
                layered,
                |p| p[5].file = Some(".lock".into()),
                Some(5),
                "file",
                "starts with '.'",
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
                "1 layer disks for an image of 2 layers",
            ),
            (
                "a layer too many",
                layered,
                |p| {
                    let l = p[0].clone();
                    p.insert(0, l);
                },
                None,
                "role",
                "3 layer disks for an image of 2 layers",
            ),
            (
                "a layer with a file",
                layered,
                |p| p[0].file = Some("x".into()),
                Some(0),
                "file",
                "layer disks are the image's own files",
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
                "0 cow disks",
            ),
            (
                "unrequested cidata",
                || DiskRequest {
                    cidata: false,
                    ..layered()
                },
                |p| p.push(bare("cidata", DiskRole::Cidata)),
                None,
                "role",
                "does not ask for a cloud-init seed",
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
        assert!(violations.has(Some(5), "file"), "{violations}");
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
}
