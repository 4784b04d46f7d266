//! `create`: a VM's record and every file it owns, or nothing. The
//! placeholder record comes first (state `creating`, held by this
//! process); the disks are planned by the policy, checked, locked and
//! made; the record is finished last. An error removes everything; a kill
//! leaves a placeholder nobody holds, which the next command sweeps.

use std::path::{Path, PathBuf};

use super::record::{ImageInfo, Machine};
use super::vms::{VmEntry, Vms};
use super::VmError;
use crate::disk::cidata::SeedInput;
use crate::disk::create::Created;
use crate::disk::lock::{DiskLocks, Wait};
use crate::disk::plan::{DiskPolicy, DiskRequest, ImageDisks, Plan};
use crate::disk::spec::DataDiskSpec;

/// The image store's root, seen from a VM's directory
/// (`STATE/vms/ID` → `STATE/images`).
pub fn store_root(vm_dir: &Path) -> PathBuf {
    vm_dir
        .parent()
        .and_then(Path::parent)
        .map(|state| state.join("images"))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
}

/// Everything `create` needs; the image has been pulled and converted.
pub struct CreateRequest<'a> {
    pub name: Option<&'a str>,
    pub machine: Machine,
    pub image: ImageDisks,
    pub image_info: Option<ImageInfo>,
    pub cow_size: Option<u64>,
    pub data_disks: &'a [DataDiskSpec],
    /// Whether the VM gets a cloud-init seed.
    pub cidata: bool,
    pub ssh_authorized_keys: Vec<String>,
    pub settings: std::collections::BTreeMap<String, String>,
    /// The NICs, MACs fixed ([`super::nics::plan`]) and checked.
    pub nics: Vec<crate::net::Nic>,
    /// What a Linux guest boots, decided once the disks exist
    /// ([`super::guest_boot`]); `None` keeps `machine` as given (the demo).
    pub boot: Option<super::guest_boot::BootRequest>,
}

/// What `create` made, for the CLI to report.
pub struct CreateReport {
    pub vm: VmEntry,
    pub plan: Plan,
    pub created: Created,
    pub boot: Option<super::guest_boot::Booted>,
}

pub fn create(
    vms: &Vms,
    req: CreateRequest<'_>,
    policy: &dyn DiskPolicy,
) -> Result<CreateReport, CreateError> {
    let mut creating = vms.begin_create(req.name, req.machine)?;
    let data_disks = crate::disk::spec::resolve(req.data_disks, &[])?;
    let request = DiskRequest {
        vm_name: creating.record.name.clone(),
        vm_dir: creating.dir.clone(),
        store_dir: store_root(&creating.dir),
        image: req.image,
        cow_size: req.cow_size,
        data_disks,
        cidata: req.cidata,
        settings: req.settings,
    };
    let plan = crate::disk::plan::plan(&request, policy)?;
    let locks = DiskLocks::acquire(&plan.writable(), "create", Wait::No).map_err(VmError::Lock)?;
    let seed = SeedInput {
        instance_id: creating.record.id.clone(),
        hostname: creating.record.name.clone(),
        ssh_authorized_keys: req.ssh_authorized_keys,
        network: crate::net::cidata::network_config(&req.nics),
    };
    let created = crate::disk::create::create(&plan, &locks, Some(&seed))?;
    creating.record.storage = plan.storage();
    creating.record.policy = plan.policy.clone();
    creating.record.image = req.image_info;
    let boot = match &req.boot {
        Some(b) => {
            let booted = super::guest_boot::prepare(b, &creating.dir, &creating.record.storage)?;
            let m = &mut creating.record.machine;
            m.kernel.clone_from(&booted.kernel);
            m.initrd.clone_from(&booted.initrd);
            m.cmdline.clone_from(&booted.cmdline);
            Some(booted)
        }
        None => None,
    };
    creating.record.nics = req.nics;
    // The record is finished while the disks are still locked: no other
    // command sees the files before the record names them.
    let vm = creating.finish()?;
    drop(locks);
    Ok(CreateReport {
        vm,
        plan,
        created,
        boot,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Spec(#[from] crate::disk::spec::SpecError),
    #[error(transparent)]
    Plan(#[from] crate::disk::plan::PlanError),
    #[error(transparent)]
    Disks(#[from] crate::disk::create::CreateError),
    #[error(transparent)]
    Boot(#[from] super::guest_boot::BootError),
}

impl From<super::record::RecordError> for CreateError {
    fn from(e: super::record::RecordError) -> Self {
        CreateError::Vm(VmError::Record(e))
    }
}
