//! Disk planning with real disk-policy plugins: the built-in default
//! policy's plan becomes the VM's disks with host paths and serials.

mod disk_common;

use cocoon_host::config::HostConfig;
use cocoon_host::disk::plan::{BaseImage, DiskSource, ImageDisks};
use cocoon_host::disk::spec::{resolve, DataDiskSpec};
use cocoon_host::disk::{plan, DiskRole};
use cocoon_host::plugin::policy::Policy;
use cocoon_host::plugin::{Registry, Runtime};
use disk_common::State;

fn policy(rt: &Runtime, state: &State, name: &str) -> Policy {
    let registry = Registry::discover(&HostConfig::at(state.dir.path()));
    Policy::load(rt, &registry, name).unwrap()
}

fn specs(flags: &[&str]) -> Vec<DataDiskSpec> {
    flags.iter().map(|f| f.parse().unwrap()).collect()
}

#[test]
fn the_default_policy_plans_a_layered_vm() {
    let rt = Runtime::new(None).unwrap();
    let state = State::new();
    let layers = vec![state.layer(b"base"), state.layer(b"top")];
    let mut req = state.request(ImageDisks::Layered {
        layers: layers.clone(),
    });
    req.data_disks = resolve(&specs(&["size=1G,name=logs", "size=64M,fstype=none"]), &[]).unwrap();
    req.cidata = true;
    let plan = plan(&req, &policy(&rt, &state, "default-policy")).unwrap();
    assert_eq!(plan.policy, "default-policy");
    let got: Vec<(DiskRole, String, String, bool)> = plan
        .disks
        .iter()
        .map(|d| {
            (
                d.config.role,
                d.config
                    .path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                d.config.serial.clone(),
                d.config.read_only,
            )
        })
        .collect();
    use DiskRole::*;
    let vm = |s: &str| s.to_string();
    assert_eq!(
        got,
        vec![
            (
                Layer,
                layers[0].digest.hex().to_string(),
                vm("cocoon-layer0"),
                true
            ),
            (
                Layer,
                layers[1].digest.hex().to_string(),
                vm("cocoon-layer1"),
                true
            ),
            (Cow, vm("cow.raw"), vm("cocoon-root"), false),
            (Data, vm("data-logs.raw"), vm("logs"), false),
            (Data, vm("data-data1.raw"), vm("data1"), false),
            (Cidata, vm("cidata.img"), vm("cocoon-cidata"), true),
        ]
    );
    assert_eq!(plan.disks[0].config.path, layers[0].path);
    assert_eq!(
        plan.disks[3].config.mount_point.as_deref(),
        Some("/mnt/logs")
    );
    assert!(matches!(plan.disks[2].source, DiskSource::Blank { size } if size == 64 << 20));
}

#[test]
fn the_default_policy_plans_a_disk_image_vm_on_a_copy() {
    let rt = Runtime::new(None).unwrap();
    let state = State::new();
    let base = BaseImage {
        path: state.store_dir.join("converted-image"),
        digest: cocoon_host::store::digest::Digest::of(b"x"),
        size: 1 << 30,
        verify: false,
    };
    let mut req = state.request(ImageDisks::Disk { base: base.clone() });
    req.cow_size = None;
    let plan = plan(&req, &policy(&rt, &state, "default-policy")).unwrap();
    assert_eq!(plan.disks[0].config.role, DiskRole::Cow);
    assert_eq!(plan.disks[0].config.path, state.vm_dir.join("cow.raw"));
    assert!(
        matches!(&plan.disks[0].source, DiskSource::BaseCopy { base: b, size } if *b == base && *size >= base.size),
        "{:?}",
        plan.disks[0].source
    );
}
