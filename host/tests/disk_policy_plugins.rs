//! Disk planning with real disk-policy plugins: the built-in default
//! policy's plan becomes the VM's disks with host paths and serials; the
//! bad-policy fixture's plans are refused with the rule named; the quota
//! example refuses an over-quota request.

mod disk_common;
mod support;

use std::path::Path;

use cocoon_host::config::HostConfig;
use cocoon_host::disk::plan::{BaseImage, DiskSource, ImageDisks};
use cocoon_host::disk::spec::{resolve, DataDiskSpec};
use cocoon_host::disk::{plan, DiskRole, PlanError};
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

fn installed(rt: &Runtime, state: &State, wasm: &Path, manifest: &str) -> Policy {
    let config = HostConfig::at(state.dir.path());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join(manifest);
    let (report, _) = cocoon_host::plugin::registry::verify(rt, wasm, Some(&manifest)).unwrap();
    cocoon_host::plugin::registry::install(&config, &report).unwrap();
    Policy::load(rt, &Registry::discover(&config), &report.manifest.name).unwrap()
}

/// The bad-policy fixture's plans (its site setting `bad` picks one):
/// each is refused naming the plugin and the broken rule, whether the
/// plugin call's plan check or the disk rules catch it.
#[test]
fn bad_plans_of_a_plugin_are_refused_with_the_rule_named() {
    let rt = Runtime::new(None).unwrap();
    let state = State::new();
    let bad = installed(
        &rt,
        &state,
        &support::fixture("bad-policy"),
        "../tests/plugins/bad-policy/plugin.toml",
    );
    let layer = state.layer(b"layer");
    let request = |case: &str| {
        let mut r = state.request(ImageDisks::Layered {
            layers: vec![layer.clone()],
        });
        r.data_disks = resolve(&specs(&["size=1G,name=logs"]), &[]).unwrap();
        r.cidata = true;
        r.settings.insert("bad".into(), case.into());
        r
    };
    // Without `bad`: a good plan.
    plan(&request(""), &bad).unwrap();
    // (case, disk index, field, part of the message): the disk rules.
    let refused: &[(&str, Option<usize>, &str, &str)] = &[
        (
            "ro-cow",
            Some(1),
            "read_only",
            "a cow disk must be writable",
        ),
        (
            "rw-layer",
            Some(0),
            "read_only",
            "a layer disk must be read-only",
        ),
        (
            "dup-serial",
            Some(4),
            "serial",
            "\"dup\" is used by an earlier disk",
        ),
        ("cidata-not-last", Some(4), "role", "after a cidata disk"),
        ("data-no-size", Some(3), "size", "a data disk needs a size"),
        ("reserved-data", Some(3), "serial", "reserved"),
        ("mount-on-none", Some(3), "mount_point", "fstype none"),
    ];
    for (case, index, field, want) in refused {
        let e = plan(&request(case), &bad).expect_err(case);
        let PlanError::Refused { policy, violations } = &e else {
            panic!("{case}: {e}")
        };
        assert_eq!(policy, "bad-policy", "{case}");
        assert!(violations.has(*index, field), "{case}: {violations}");
        assert!(
            violations.to_string().contains(want),
            "{case}: {violations}"
        );
    }
    // Files outside the VM's directory: the plugin call's plan check.
    for (case, file) in [("file-dotdot", "\"../x\""), ("file-abs", "\"/etc/passwd\"")] {
        let e = plan(&request(case), &bad).expect_err(case);
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(
            matches!(e, PlanError::Policy { ref policy, .. } if policy == "bad-policy"),
            "{chain}"
        );
        assert!(
            chain.contains("file") && chain.contains(file),
            "{case}: {chain}"
        );
        assert!(!state.vm_dir.join("x").exists());
    }
}

/// The example quota policy: within its quota it plans (direct I/O forced
/// on every data disk); over it, the request is refused with the quota
/// named.
#[test]
fn the_quota_policy_refuses_an_over_quota_request() {
    let rt = Runtime::new(None).unwrap();
    let state = State::new();
    let quota = installed(
        &rt,
        &state,
        &support::wasm("quota-policy"),
        "../plugins/examples/quota-policy/plugin.toml",
    );
    let mut req = state.request(ImageDisks::Layered { layers: vec![] });
    req.settings.insert("max_data_disks".into(), "2".into());
    req.settings.insert("max_data_bytes".into(), "2G".into());
    req.data_disks = resolve(&specs(&["size=1G", "size=512M,fstype=none"]), &[]).unwrap();
    let ok = plan(&req, &quota).unwrap();
    let direct: Vec<Option<bool>> = ok
        .disks
        .iter()
        .filter(|d| d.config.role == DiskRole::Data)
        .map(|d| d.config.direct_io)
        .collect();
    assert_eq!(direct, [Some(true), Some(true)]);

    req.data_disks = resolve(&specs(&["size=1G", "size=1G", "size=1G"]), &[]).unwrap();
    let e = plan(&req, &quota).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        matches!(&e, PlanError::Policy { policy, .. } if policy == "quota-policy"),
        "{chain}"
    );
    assert!(
        chain.contains("3 data disks") && chain.contains("quota is 2"),
        "{chain}"
    );
}
