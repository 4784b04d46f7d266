//! Disk policies through the host's typed API (`plugin::policy`): the
//! built-in default policy's plans, site settings, refusals, and the checks
//! every plan passes before disk planning sees it.

mod support;

use std::collections::BTreeMap;

use cocoon_host::config::HostConfig;
use cocoon_host::plugin::policy::{
    DataDiskRequest, DiskRole, FsType, ImageKind, PlannedDisk, Policy, PolicyRequest,
};
use cocoon_host::plugin::{PluginError, Registry, Runtime};

fn layered(n: usize) -> ImageKind {
    ImageKind::Layered {
        layers: (0..n).map(|i| format!("sha256:{i:064x}")).collect(),
    }
}

fn disk_image() -> ImageKind {
    ImageKind::Disk {
        digest: format!("sha256:{}", "d".repeat(64)),
        virtual_size: 2 << 30,
    }
}

fn data(name: &str, size: u64, fstype: FsType, mount: Option<&str>) -> DataDiskRequest {
    DataDiskRequest {
        name: name.into(),
        size_bytes: size,
        fstype,
        mount_point: mount.map(Into::into),
        direct_io: None,
    }
}

fn request(image: ImageKind) -> PolicyRequest {
    PolicyRequest {
        name: "vm1".into(),
        image,
        cow_size: None,
        data_disks: vec![
            data("logs", 1 << 30, FsType::Ext4, Some("/var/log")),
            DataDiskRequest {
                direct_io: Some(true),
                ..data("scratch", 64 << 20, FsType::None, None)
            },
        ],
        cidata: true,
        settings: BTreeMap::new(),
    }
}

fn default_policy(rt: &Runtime) -> Policy {
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::discover(&HostConfig::at(tmp.path()));
    Policy::load(rt, &registry, "default-policy").unwrap()
}

fn names(plan: &[PlannedDisk]) -> Vec<&str> {
    plan.iter().map(|d| d.name.as_str()).collect()
}

#[test]
fn default_policy_plans_layered_images() {
    let rt = Runtime::new(None).unwrap();
    let policy = default_policy(&rt);
    let plan = policy.plan(&request(layered(2))).unwrap();
    assert_eq!(
        names(&plan),
        [
            "cocoon-layer0",
            "cocoon-layer1",
            "cocoon-root",
            "logs",
            "scratch",
            "cocoon-cidata"
        ]
    );
    let roles: Vec<DiskRole> = plan.iter().map(|d| d.role).collect();
    use DiskRole::*;
    assert_eq!(roles, [Layer, Layer, Cow, Data, Data, Cidata]);
    let ro: Vec<bool> = plan.iter().map(|d| d.read_only).collect();
    assert_eq!(ro, [true, true, false, false, false, true]);
    assert_eq!(plan[2].size_bytes, Some(10 << 30), "the 10 GiB default");
    assert_eq!(plan[3].fstype, Some(FsType::Ext4));
    assert_eq!(plan[3].mount_point.as_deref(), Some("/var/log"));
    assert_eq!(plan[3].direct_io, None, "host's choice stays the host's");
    assert_eq!(plan[4].fstype, Some(FsType::None));
    assert_eq!(plan[4].direct_io, Some(true));
    assert!(plan.iter().all(|d| d.file.is_none()));

    // The root's size: the request's, else the site's, else the default.
    let mut r = request(layered(1));
    r.settings.insert("cow_size".into(), "3G".into());
    assert_eq!(policy.plan(&r).unwrap()[1].size_bytes, Some(3 << 30));
    r.cow_size = Some(5 << 30);
    assert_eq!(policy.plan(&r).unwrap()[1].size_bytes, Some(5 << 30));
}

#[test]
fn default_policy_plans_disk_images() {
    let rt = Runtime::new(None).unwrap();
    let policy = default_policy(&rt);
    let mut r = request(disk_image());
    let plan = policy.plan(&r).unwrap();
    assert_eq!(
        names(&plan),
        ["cocoon-root", "logs", "scratch", "cocoon-cidata"]
    );
    assert_eq!(plan[0].role, DiskRole::Cow);
    assert_eq!(plan[0].size_bytes, None, "the image's own size");
    r.cow_size = Some(4 << 30);
    assert_eq!(policy.plan(&r).unwrap()[0].size_bytes, Some(4 << 30));
    r.cidata = false;
    r.data_disks.clear();
    assert_eq!(names(&policy.plan(&r).unwrap()), ["cocoon-root"]);
}

#[test]
fn site_rules_refuse_the_request_with_every_violation() {
    let rt = Runtime::new(None).unwrap();
    let policy = default_policy(&rt);
    let mut r = request(disk_image());
    r.settings.insert("max_data_disks".into(), "1".into());
    r.settings.insert("cow_size".into(), "lots".into());
    r.cow_size = Some(1 << 30);
    let v = policy.validate(&r).unwrap();
    let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        ["settings.cow_size", "data_disks", "cow_size"],
        "{v:?}"
    );
    match policy.plan(&r).unwrap_err() {
        PluginError::PolicyRefused { plugin, violations } => {
            assert_eq!(plugin, "default-policy");
            assert_eq!(violations, v);
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let msg = policy.plan(&r).unwrap_err().to_string();
    assert!(
        msg.contains("default-policy") && msg.contains("this site allows 1"),
        "{msg}"
    );
}

#[test]
fn only_disk_policies_load_as_policies() {
    let rt = Runtime::new(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::discover(&HostConfig::at(tmp.path()));
    let err = Policy::load(&rt, &registry, "raw-converter").err().unwrap();
    assert!(matches!(err, PluginError::WrongKind { .. }), "{err}");
    let err = Policy::load(&rt, &registry, "no-such-policy")
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::NotFound(_)), "{err}");
}

/// A policy plugin installed in a fresh plugin directory, loaded by name
/// through the registry as the host does, with `settings` as its site
/// settings.
fn installed(
    rt: &Runtime,
    tmp: &std::path::Path,
    wasm: &std::path::Path,
    manifest: &str,
) -> (Policy, HostConfig) {
    let config = HostConfig::at(tmp);
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(manifest);
    let (report, _) = cocoon_host::plugin::registry::verify(rt, wasm, Some(&manifest)).unwrap();
    cocoon_host::plugin::registry::install(&config, &report).unwrap();
    let registry = Registry::discover(&config);
    let policy = Policy::load(rt, &registry, &report.manifest.name).unwrap();
    (policy, config)
}

#[test]
fn the_quota_example_enforces_its_site_quota() {
    let rt = Runtime::new(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (quota, _) = installed(
        &rt,
        tmp.path(),
        &support::wasm("quota-policy"),
        "../plugins/examples/quota-policy/plugin.toml",
    );
    let mut r = request(layered(1));
    r.settings = BTreeMap::from([
        ("max_data_disks".to_string(), "2".to_string()),
        ("max_data_bytes".to_string(), "2G".to_string()),
    ]);
    // Within the quota: planned, direct I/O forced on every data disk.
    let plan = quota.plan(&r).unwrap();
    assert_eq!(
        names(&plan),
        [
            "cocoon-layer0",
            "cocoon-root",
            "logs",
            "scratch",
            "cocoon-cidata"
        ]
    );
    let direct: Vec<Option<bool>> = plan.iter().map(|d| d.direct_io).collect();
    assert_eq!(direct, [None, None, Some(true), Some(true), None]);

    // Over the quota, every broken rule is named.
    let mut over = r.clone();
    over.data_disks
        .push(data("more", 2 << 30, FsType::Ext4, Some("/more")));
    over.data_disks[0].direct_io = Some(false);
    let v = quota.validate(&over).unwrap();
    let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        ["data_disks", "data_disks", "data_disks[0].direct_io"],
        "{v:?}"
    );
    assert!(v[0].message.contains("3 data disks") && v[0].message.contains("quota is 2"));
    assert!(v[1]
        .message
        .contains(&format!("{} bytes", (1u64 << 30) + (64 << 20) + (2 << 30))));
    let err = quota.plan(&over).unwrap_err();
    assert!(
        matches!(&err, PluginError::PolicyRefused { plugin, violations } if plugin == "quota-policy" && violations.len() == 3),
        "{err}"
    );

    // Forcing can be turned off; a bad setting is named.
    r.settings.insert("force_direct_io".into(), "false".into());
    assert_eq!(quota.plan(&r).unwrap()[2].direct_io, None);
    r.settings.insert("max_data_bytes".into(), "2 GB".into());
    let v = quota.validate(&r).unwrap();
    assert_eq!(v[0].field, "settings.max_data_bytes", "{v:?}");
}

/// The bad-policy fixture with `bad` as its site setting.
fn bad_plan(policy: &Policy, bad: &str, image: ImageKind) -> Result<Vec<PlannedDisk>, PluginError> {
    let mut r = request(image);
    r.settings.insert("bad".into(), bad.into());
    policy.plan(&r)
}

#[test]
fn plans_that_do_not_answer_their_request_are_refused_with_each_problem() {
    let rt = Runtime::new(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (bad, _) = installed(
        &rt,
        tmp.path(),
        &support::fixture("bad-policy"),
        "../tests/plugins/bad-policy/plugin.toml",
    );
    // Without `bad` it plans like the default.
    assert_eq!(
        names(&bad_plan(&bad, "", layered(1)).unwrap()),
        [
            "cocoon-layer0",
            "cocoon-root",
            "logs",
            "scratch",
            "cocoon-cidata"
        ]
    );
    for (case, want) in [("file-dotdot", "\"../x\""), ("file-abs", "\"/etc/passwd\"")] {
        match bad_plan(&bad, case, disk_image()).unwrap_err() {
            PluginError::BadPlan { plugin, problems } => {
                assert_eq!(plugin, "bad-policy");
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert_eq!((problems[0].index, problems[0].field), (Some(0), "file"));
                assert!(problems[0].message.contains(want), "{problems:?}");
            }
            other => panic!("{case}: expected a bad plan, got {other}"),
        }
    }
    // The role invariants are the disk rules' (disk::rules, run by disk
    // planning): these plans pass the plan checks and reach them.
    for case in [
        "ro-cow",
        "rw-layer",
        "dup-serial",
        "cidata-not-last",
        "data-no-size",
        "reserved-data",
        "mount-on-none",
    ] {
        let plan = bad_plan(&bad, case, layered(1)).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(plan.len() >= 4, "{case}: {plan:?}");
    }
    // A failing, trapping or refusing policy is an error naming it.
    let err = bad_plan(&bad, "error", layered(1)).unwrap_err();
    assert!(
        matches!(err, PluginError::Returned { .. }) && err.to_string().contains("bad-policy"),
        "{err}"
    );
    let err = bad_plan(&bad, "panic", layered(1)).unwrap_err();
    assert!(
        matches!(err, PluginError::Trap { .. }) && err.to_string().contains("panics on purpose"),
        "{err}"
    );
    let err = bad_plan(&bad, "refuse", layered(1)).unwrap_err();
    assert!(matches!(err, PluginError::PolicyRefused { .. }), "{err}");
}
