//! Shared by the snapshot tests: a state directory laid out as the host
//! lays it out (`vms/`, `images/`, `snapshots/`), a source VM planned and
//! created by the disk code (a layer, the cow, a data disk, the seed) and
//! booted with the test guest in-process, and small helpers.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_host::disk::cidata::SeedInput;
use cocoon_host::disk::lock::{DiskLocks, Wait};
use cocoon_host::disk::plan::{DiskRequest, ImageDisks, LayerImage};
use cocoon_host::disk::spec::{resolve, DataDiskSpec};
use cocoon_host::disk::{create, plan, StorageConfig};
use cocoon_host::snapshot::preflight::{self, DEFAULT_HASH_LIMIT};
use cocoon_host::snapshot::{ImageInfo, SaveMeta};
use cocoon_host::store::digest::Digest;
use cocoon_vmm::{SerialOutput, Vm, VmConfig};

#[path = "../disk_common/mod.rs"]
pub mod disk_common;
#[path = "../../../vmm/tests/support/mod.rs"]
pub mod vmm_support;

pub use vmm_support::{counts, kvm_or_skip, test_guest, wait_for_log};

/// The guest's memory: small, so 8 clones fit anywhere.
pub const MEMORY: u64 = 64 << 20;
/// The data disks' indices in the source VM (layer, cow, logs, cache,
/// cidata), and the seed's.
pub const DATA: usize = 2;
pub const CACHE: usize = 3;
pub const SEED: usize = 4;

pub struct Host {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub store_root: PathBuf,
    pub snapshots: PathBuf,
    pub layer: LayerImage,
    pub image: Digest,
}

impl Host {
    pub fn new() -> Host {
        Self::in_dir(tempfile::tempdir().unwrap())
    }

    /// A host whose state directory is `root/state` (made if missing):
    /// for a child process and its parent to share one.
    pub fn at(root: &Path) -> Host {
        Self::in_dir(tempfile::tempdir_in(root).unwrap()).with_state(root.join("state"))
    }

    fn with_state(mut self, state: PathBuf) -> Host {
        std::fs::create_dir_all(state.join("vms")).unwrap();
        let store_root = state.join("images");
        std::fs::create_dir_all(store_root.join("blobs/sha256")).unwrap();
        let path = store_root
            .join("blobs/sha256")
            .join(self.layer.digest.hex());
        std::fs::copy(&self.layer.path, &path).unwrap();
        self.layer.path = path;
        self.snapshots = state.join("snapshots");
        self.store_root = store_root;
        self.state = state;
        self
    }

    fn in_dir(dir: tempfile::TempDir) -> Host {
        let state = dir.path().join("state");
        let store_root = state.join("images");
        std::fs::create_dir_all(store_root.join("blobs/sha256")).unwrap();
        std::fs::create_dir_all(state.join("vms")).unwrap();
        let bytes = vmm_support::disk_bytes(7, 1 << 20);
        let digest = Digest::of(&bytes);
        let path = store_root.join("blobs/sha256").join(digest.hex());
        std::fs::write(&path, &bytes).unwrap();
        Host {
            snapshots: state.join("snapshots"),
            image: Digest::of(b"the image manifest"),
            layer: LayerImage { digest, path },
            store_root,
            state,
            dir,
        }
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state.join("vms").join(name)
    }

    /// The preflight options of this host: its store, which has the image.
    pub fn checks(&self) -> preflight::Options<'_> {
        preflight::Options {
            store_root: &self.store_root,
            target: None,
            image_present: &|_| true,
            hash_limit: DEFAULT_HASH_LIMIT,
            hashed_layers: &[],
        }
    }

    pub fn meta(&self, vm: &str) -> SaveMeta {
        SaveMeta {
            source_vm: vm.into(),
            image: ImageInfo {
                digest: self.image.clone(),
                reference: Some("oci://registry.test/guest:1".into()),
            },
            layers: vec![self.layer.digest.clone()],
            vm_dir: self.vm_dir(vm),
            store_root: self.store_root.clone(),
            nics: Vec::new(),
            boot: None,
        }
    }

    /// Plans and creates VM `name`'s disks (layer, 32 MiB cow, data disks
    /// `logs` (16 MiB) and `cache` (20 MiB) with no filesystem, the seed)
    /// and locks the writable ones, as `create` and `start` do.
    pub fn create_vm(&self, name: &str) -> (Vec<StorageConfig>, DiskLocks) {
        let vm_dir = self.vm_dir(name);
        std::fs::create_dir_all(&vm_dir).unwrap();
        let specs: Vec<DataDiskSpec> = [
            "size=16M,name=logs,fstype=none",
            "size=20M,name=cache,fstype=none",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let req = DiskRequest {
            vm_name: name.into(),
            vm_dir: vm_dir.clone(),
            store_dir: self.store_root.clone(),
            image: ImageDisks::Layered {
                layers: vec![self.layer.clone()],
            },
            cow_size: Some(32 << 20),
            data_disks: resolve(&specs, &[]).unwrap(),
            cidata: true,
            settings: Default::default(),
        };
        let plan = plan(&req, &disk_common::DefaultShape).unwrap();
        let locks = DiskLocks::acquire(&plan.writable(), "start", Wait::No).unwrap();
        let seed = SeedInput {
            instance_id: format!("iid-{name}"),
            hostname: name.into(),
            ssh_authorized_keys: vec![],
            network: Default::default(),
        };
        create(&plan, &locks, Some(&seed)).unwrap();
        (plan.storage(), locks)
    }
}

/// Boots the test guest on `storage` with `cmdline`, COM1 in `log`.
pub fn boot(storage: &[StorageConfig], cmdline: &str, log: &Path) -> Vm {
    let mut config = VmConfig::new(test_guest());
    config.memory = MEMORY;
    config.cmdline = cmdline.into();
    config.disks = storage.iter().map(|d| d.to_vmm_disk()).collect();
    config.serial = SerialOutput::File(log.to_path_buf());
    Vm::start(config).expect("start the VM")
}

pub fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until the log's counter reaches `n`.
pub fn wait_count(log: &Path, n: u64) -> String {
    wait_for_log(log, &format!("count {n}"), |s| {
        counts(s).last().is_some_and(|&c| c >= n)
    })
}

/// The last count in `log`.
pub fn last_count(log: &Path) -> u64 {
    *counts(&read(log)).last().expect("a count")
}

pub fn assert_consecutive(what: &str, counts: &[u64]) {
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: counter skipped or repeated: {counts:?}"
    );
}

/// Sector `n` (512 bytes) of `path`.
pub fn sector(path: &Path, n: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, n * 512).unwrap();
    buf
}

/// (device, inode) of a file.
pub fn file_id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// Stops `vm` and waits for it, at most 20 s.
pub fn stop(mut vm: Vm) {
    vm.stop();
    let t0 = Instant::now();
    vm.wait();
    assert!(t0.elapsed() < Duration::from_secs(20));
}
