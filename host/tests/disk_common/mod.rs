//! Shared by the disk tests: a stand-in policy with the default policy's
//! shape, requests, the skip rule for missing tools.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_host::disk::plan::{DiskRequest, ImageDisks, ImageKind, LayerImage};
use cocoon_host::disk::{DiskPolicy, DiskRole, PlannedDisk, PolicyRequest};

/// Layers read-only, one cow, the requested data disks, cidata last: what
/// the built-in default policy answers.
pub struct DefaultShape;

impl DiskPolicy for DefaultShape {
    fn name(&self) -> &str {
        "default-shape"
    }

    fn plan(
        &self,
        r: &PolicyRequest,
    ) -> Result<Vec<PlannedDisk>, Box<dyn std::error::Error + Send + Sync>> {
        let disk = |name: &str, role: DiskRole, size: Option<u64>| PlannedDisk {
            name: name.into(),
            role,
            read_only: role.read_only(),
            size_bytes: size,
            file: None,
            mount_point: None,
            fstype: None,
            direct_io: None,
        };
        let layers = match &r.image {
            ImageKind::Layered { layers } => layers.len(),
            ImageKind::Disk { .. } => 0,
        };
        let mut out: Vec<PlannedDisk> = (0..layers)
            .map(|i| disk(&format!("layer{i}"), DiskRole::Layer, None))
            .collect();
        let cow_size = r.cow_size.or(match &r.image {
            ImageKind::Disk { virtual_size, .. } => Some(*virtual_size),
            ImageKind::Layered { .. } => None,
        });
        out.push(disk("root", DiskRole::Cow, cow_size));
        for d in &r.data_disks {
            out.push(PlannedDisk {
                mount_point: d.mount_point.clone(),
                fstype: Some(d.fstype),
                direct_io: d.direct_io,
                ..disk(&d.name, DiskRole::Data, Some(d.size_bytes))
            });
        }
        if r.cidata {
            out.push(disk("cidata", DiskRole::Cidata, None));
        }
        Ok(out)
    }
}

/// A state directory with a VM directory and a store holding `layers`
/// files of the given contents.
pub struct State {
    pub dir: tempfile::TempDir,
    pub vm_dir: PathBuf,
    pub store_dir: PathBuf,
}

impl State {
    pub fn new() -> State {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vms/v1");
        let store_dir = dir.path().join("images");
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::create_dir_all(store_dir.join("sha256")).unwrap();
        State {
            dir,
            vm_dir,
            store_dir,
        }
    }

    /// A blob in the store, named by its digest.
    pub fn layer(&self, contents: &[u8]) -> LayerImage {
        let digest = cocoon_host::store::digest::Digest::of(contents);
        let path = self.store_dir.join("sha256").join(digest.hex());
        std::fs::write(&path, contents).unwrap();
        LayerImage { digest, path }
    }

    pub fn request(&self, image: ImageDisks) -> DiskRequest {
        DiskRequest {
            vm_name: "v1".into(),
            vm_dir: self.vm_dir.clone(),
            store_dir: self.store_dir.clone(),
            image,
            cow_size: Some(64 << 20),
            data_disks: Vec::new(),
            cidata: false,
            settings: BTreeMap::new(),
        }
    }
}

/// Whether `tool` (a command, or a shell test such as `python3 -c 'import
/// yaml'`) works. Missing in CI (`CI` set) it fails the test; elsewhere
/// the test is skipped with `SKIPPED <test>: <reason>` on stderr, and in
/// the file `COCOON_SKIP_LOG` names.
pub fn require(test: &str, check: &str, package: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("{{ {check}; }} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let reason = format!("`{check}` fails: install {package} (scripts/install-deps does)");
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason}");
    }
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("COCOON_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    false
}

/// Runs a command and returns its stdout, failing with its stderr.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
