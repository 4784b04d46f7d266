//! The files the host makes for a VM, checked by the real tools: the
//! cloud-init seed by mtools, blkid, cloud-init's own schema check and
//! PyYAML; ext4 data disks by e2fsck; creation all-or-nothing.

mod disk_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_host::disk::cidata::{self, Ethernet, MacMatch, NetworkConfig, SeedInput, SeedMount};
use cocoon_host::disk::lock::{DiskLocks, Wait};
use cocoon_host::disk::plan::{BaseImage, DiskSource, ImageDisks};
use cocoon_host::disk::spec::{resolve, DataDiskSpec};
use cocoon_host::disk::{create, plan, CreateError, FsType};
use disk_common::{names_in, require, run, DefaultShape, State};
use serde_json::{json, Value};

/// Debian's python3 has python3-yaml; a python3 earlier in PATH may not.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn seed(hostname: &str) -> SeedInput {
    SeedInput {
        instance_id: "iid-v1".into(),
        hostname: hostname.into(),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk me@laptop".into()],
        network: NetworkConfig::default(),
    }
}

fn mounts() -> Vec<SeedMount> {
    vec![
        SeedMount {
            serial: "logs".into(),
            mount_point: "/var/log".into(),
            fstype: FsType::Ext4,
        },
        SeedMount {
            serial: "data1".into(),
            mount_point: "/mnt/data1".into(),
            fstype: FsType::Ext4,
        },
    ]
}

/// Every YAML file in `paths` as PyYAML's safe_load reads it, as JSON.
fn pyyaml(paths: &[PathBuf]) -> Vec<Value> {
    let script = r#"
import json, sys, yaml
out = []
for p in sys.argv[1:]:
    with open(p, encoding="utf-8") as f:
        out.append(yaml.safe_load(f))
# default=repr: a value YAML typed as a date or such shows up as a string
# that differs from what was written.
print(json.dumps(out, default=repr))
"#;
    let stdout = run(Command::new(python()).arg("-c").arg(script).args(paths));
    serde_json::from_slice(&stdout).unwrap()
}

fn mtools(tool: &str, img: &Path, args: &[&str]) -> Vec<u8> {
    run(Command::new(tool)
        .arg("-i")
        .arg(img)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1"))
}

#[test]
fn the_seed_is_read_by_mtools_blkid_cloud_init_and_pyyaml() {
    let t = "the_seed_is_read_by_mtools_blkid_cloud_init_and_pyyaml";
    if !require(t, "mdir --version", "mtools")
        || !require(t, "cloud-init --version", "cloud-init")
        || !require(t, &format!("{} -c 'import yaml'", python()), "python3-yaml")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut input = seed("web1");
    input.network.ethernets.insert(
        "eth0".into(),
        Ethernet {
            matches: MacMatch {
                macaddress: "52:54:00:12:34:56".into(),
            },
            set_name: Some("eth0".into()),
            dhcp4: Some(true),
            ..Ethernet::default()
        },
    );
    let files = cidata::render(&input, &mounts()).unwrap();
    let img = dir.path().join("cidata.img");
    cidata::write_image(&img, &files).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);

    // mtools lists exactly the three files and extracts them unchanged.
    let listing = String::from_utf8(mtools("mdir", &img, &["-b", "::"])).unwrap();
    let mut listed: Vec<&str> = listing
        .lines()
        .map(|l| l.trim_start_matches("::/"))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["meta-data", "network-config", "user-data"],
        "{listing}"
    );
    for (name, text) in [
        ("meta-data", &files.meta_data),
        ("user-data", &files.user_data),
        ("network-config", &files.network_config),
    ] {
        let got = mtools("mcopy", &img, &[&format!("::{name}"), "-"]);
        assert_eq!(String::from_utf8(got).unwrap(), *text, "{name}");
    }
    // The label cloud-init's NoCloud looks for (blkid -t LABEL=cidata is
    // case-insensitive for vfat), and FAT12.
    let probe = run(Command::new("blkid").args(["-p", "-o", "export"]).arg(&img));
    let probe = String::from_utf8(probe).unwrap();
    for want in ["TYPE=vfat", "LABEL=CIDATA", "VERSION=FAT12"] {
        assert!(probe.lines().any(|l| l == want), "{want} not in {probe}");
    }

    // cloud-init's own schema check accepts the user-data it extracted.
    let user = dir.path().join("user-data");
    std::fs::write(&user, mtools("mcopy", &img, &["::user-data", "-"])).unwrap();
    let out = run(Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&user));
    assert!(
        String::from_utf8_lossy(&out).contains("Valid cloud-config"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // PyYAML reads what was meant.
    let paths: Vec<PathBuf> = ["meta-data", "user-data", "network-config"]
        .iter()
        .map(|n| {
            let p = dir.path().join(n);
            std::fs::write(&p, mtools("mcopy", &img, &[&format!("::{n}"), "-"])).unwrap();
            p
        })
        .collect();
    let got = pyyaml(&paths);
    assert_eq!(
        got,
        vec![
            json!({"instance-id": "iid-v1", "local-hostname": "web1"}),
            json!({
                "hostname": "web1",
                "mounts": [
                    ["/dev/disk/by-id/virtio-logs", "/var/log", "ext4", "defaults,nofail", "0", "2"],
                    ["/dev/disk/by-id/virtio-data1", "/mnt/data1", "ext4", "defaults,nofail", "0", "2"],
                ],
                "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk me@laptop"],
            }),
            json!({"version": 2, "ethernets": {"eth0": {
                "match": {"macaddress": "52:54:00:12:34:56"}, "set-name": "eth0", "dhcp4": true}}}),
        ]
    );
}

/// Strings YAML would misread if they were pasted in, or that break a
/// document: each comes back from PyYAML exactly, in every field.
#[test]
fn hostile_strings_round_trip_through_pyyaml() {
    let t = "hostile_strings_round_trip_through_pyyaml";
    if !require(t, &format!("{} -c 'import yaml'", python()), "python3-yaml") {
        return;
    }
    let hostile = [
        "it's \"quoted\"",
        "key: value",
        "a:b",
        "# not a comment",
        "x #y",
        "- leading dash",
        "-",
        "*alias",
        "&anchor",
        "!!python/object",
        "!tag",
        "? key",
        "| block",
        "> folded",
        "{flow: map}",
        "[flow, seq]",
        "%YAML 1.1",
        "---",
        "...",
        "@at `tick`",
        "yes",
        "No",
        "on",
        "~",
        "null",
        "1:20",
        "0o17",
        "0x1F",
        "1_000",
        "1e3",
        ".inf",
        "2001-12-14",
        "ünïcödé 日本語 😀",
        "\u{feff}bom",
        "trailing space ",
        " leading space",
        "back\\slash",
        "tab\there",
        "=",
        "<<",
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    let mut want = Vec::new();
    for (i, s) in hostile.iter().enumerate() {
        let mount = format!("/mnt/{}", s.replace([' ', '\t'], "_"));
        let input = SeedInput {
            instance_id: s.to_string(),
            hostname: s.to_string(),
            ssh_authorized_keys: vec![format!("ssh-ed25519 AAAA {s}")],
            network: NetworkConfig::default(),
        };
        let m = vec![SeedMount {
            serial: "logs".into(),
            mount_point: mount.clone(),
            fstype: FsType::Ext4,
        }];
        let files = cidata::render(&input, &m).unwrap();
        for (n, text) in [("meta", &files.meta_data), ("user", &files.user_data)] {
            let p = dir.path().join(format!("{i}-{n}"));
            std::fs::write(&p, text).unwrap();
            paths.push(p);
        }
        want.push(json!({"instance-id": s, "local-hostname": s}));
        want.push(json!({
            "hostname": s,
            "mounts": [["/dev/disk/by-id/virtio-logs", mount, "ext4", "defaults,nofail", "0", "2"]],
            "ssh_authorized_keys": [format!("ssh-ed25519 AAAA {s}")],
        }));
    }
    let got = pyyaml(&paths);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{:?}", hostile[i / 2]);
    }
    assert_eq!(got.len(), want.len());
}

fn specs(flags: &[&str]) -> Vec<DataDiskSpec> {
    flags.iter().map(|f| f.parse().unwrap()).collect()
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn data_disks_ext4_pass_e2fsck_and_none_stays_blank() {
    let t = "data_disks_ext4_pass_e2fsck_and_none_stays_blank";
    if !require(
        t,
        "command -v mkfs.ext4 || test -x /usr/sbin/mkfs.ext4 || test -x /sbin/mkfs.ext4",
        "e2fsprogs",
    ) {
        return;
    }
    let state = State::new();
    let layer = state.layer(&[1u8; 1 << 20]);
    let mut req = state.request(ImageDisks::Layered {
        layers: vec![layer.clone()],
    });
    req.data_disks = resolve(
        &specs(&[
            "size=64M,name=logs,mount=/var/log",
            "size=1G",
            "size=16M,fstype=none",
        ]),
        &[],
    )
    .unwrap();
    req.cidata = true;
    let plan = plan(&req, &DefaultShape).unwrap();
    let locks = DiskLocks::acquire(&plan.writable(), "create", Wait::No).unwrap();
    let made = create(&plan, &locks, Some(&seed("v1"))).unwrap();
    let vm = &state.vm_dir;
    assert_eq!(
        made.paths,
        [
            "cow.raw",
            "data-logs.raw",
            "data-data1.raw",
            "data-data2.raw",
            "cidata.img"
        ]
        .map(|n| vm.join(n))
    );
    assert!(
        std::fs::read(&layer.path).unwrap() == vec![1u8; 1 << 20],
        "layer untouched"
    );

    let e2fsck = ["/usr/sbin/e2fsck", "/sbin/e2fsck"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("e2fsck");
    for (name, size) in [("logs", 64u64 << 20), ("data1", 1 << 30)] {
        let p = vm.join(format!("data-{name}.raw"));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), size);
        run(Command::new(e2fsck).arg("-fn").arg(&p));
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes[1080..1082], [0x53, 0xef], "ext4 magic on {name}");
        assert!(
            allocated(&p) < size / 4,
            "{name} is sparse: {}",
            allocated(&p)
        );
    }
    let none = vm.join("data-data2.raw");
    assert_eq!(std::fs::metadata(&none).unwrap().len(), 16 << 20);
    assert_eq!(allocated(&none), 0, "fstype none stays a hole");
    // The layered cow is ext4 too (the guest's init has no mkfs), and
    // sparse.
    let cow = vm.join("cow.raw");
    assert_eq!(std::fs::metadata(&cow).unwrap().len(), 64 << 20);
    run(Command::new(e2fsck).arg("-fn").arg(&cow));
    assert_eq!(
        std::fs::read(&cow).unwrap()[1080..1082],
        [0x53, 0xef],
        "ext4 magic on the cow"
    );
    assert!(
        allocated(&cow) < (64 << 20) / 4,
        "the cow is sparse: {}",
        allocated(&cow)
    );

    // The seed mounts the ext4 disks by serial, not the blank one.
    let files = cidata::read_image(&std::fs::read(vm.join("cidata.img")).unwrap()).unwrap();
    let user = String::from_utf8(files["user-data"].clone()).unwrap();
    let user: Value = serde_json::from_str(user.strip_prefix("#cloud-config\n").unwrap()).unwrap();
    assert_eq!(
        user["mounts"],
        json!([
            [
                "/dev/disk/by-id/virtio-logs",
                "/var/log",
                "ext4",
                "defaults,nofail",
                "0",
                "2"
            ],
            [
                "/dev/disk/by-id/virtio-data1",
                "/mnt/data1",
                "ext4",
                "defaults,nofail",
                "0",
                "2"
            ],
        ])
    );
    // Only the disks and their locks: no temp file.
    assert!(
        names_in(vm)
            .iter()
            .all(|n| !n.starts_with('.') || n.ends_with(".lock")),
        "{:?}",
        names_in(vm)
    );
    // Creating again never overwrites a disk.
    let e = create(&plan, &locks, Some(&seed("v1"))).unwrap_err();
    assert!(matches!(e, CreateError::Exists { .. }), "{e}");
}

#[test]
fn a_failed_create_removes_what_it_made() {
    let state = State::new();
    let mut req = state.request(ImageDisks::Layered { layers: vec![] });
    req.data_disks = resolve(&specs(&["size=16M,fstype=none"]), &[]).unwrap();
    req.cidata = true;
    let plan = plan(&req, &DefaultShape).unwrap();
    let locks = DiskLocks::acquire(&plan.writable(), "create", Wait::No).unwrap();
    // The seed is made last and fails: the cow and data disk go too.
    let e = create(&plan, &locks, Some(&seed("bad\nname"))).unwrap_err();
    assert!(matches!(e, CreateError::Cidata { .. }), "{e}");
    let left: Vec<String> = names_in(&state.vm_dir)
        .into_iter()
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
    // No seed for a plan with cidata: refused, nothing left either.
    assert!(matches!(
        create(&plan, &locks, None),
        Err(CreateError::NoSeed)
    ));
    assert!(!state.vm_dir.join("cow.raw").exists());
    // Without the disk locks: refused before anything is made.
    drop(locks);
    let other = DiskLocks::acquire(&[], "create", Wait::No).unwrap();
    assert!(matches!(
        create(&plan, &other, Some(&seed("v1"))),
        Err(CreateError::NotLocked { .. })
    ));
}

#[test]
fn a_disk_image_boots_from_a_verified_per_vm_copy() {
    let state = State::new();
    let base_path = state.store_dir.join("image");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[512..1024].fill(0xab);
    std::fs::write(&base_path, &bytes).unwrap();
    let base = BaseImage {
        path: base_path.clone(),
        digest: cocoon_host::store::digest::Digest::of(&bytes),
        size: bytes.len() as u64,
        verify: true,
    };
    let mut req = state.request(ImageDisks::Disk { base: base.clone() });
    req.cow_size = Some(8 << 20);
    let plan = plan(&req, &DefaultShape).unwrap();
    assert!(matches!(plan.disks[0].source, DiskSource::BaseCopy { .. }));
    let locks = DiskLocks::acquire(&plan.writable(), "create", Wait::No).unwrap();
    let made = create(&plan, &locks, None).unwrap();
    let report = made.base_copy.unwrap();
    assert!(report.verified);
    let cow = std::fs::read(state.vm_dir.join("cow.raw")).unwrap();
    assert_eq!(cow.len(), 8 << 20);
    assert_eq!(cow[..bytes.len()], bytes[..]);
    drop(locks);

    // A base that changed since its digest was taken is not copied.
    std::fs::remove_file(state.vm_dir.join("cow.raw")).unwrap();
    bytes[100] = 1;
    std::fs::write(&base_path, &bytes).unwrap();
    let locks = DiskLocks::acquire(&plan.writable(), "create", Wait::No).unwrap();
    let e = create(&plan, &locks, None).unwrap_err();
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(text.contains("digest mismatch"), "{text}");
    assert!(!state.vm_dir.join("cow.raw").exists());
}
