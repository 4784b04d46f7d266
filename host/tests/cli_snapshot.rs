//! `snapshot save|list|inspect|rm|export|import|push|pull`, `clone` and
//! `restore` end to end, through the binary, with the test guest as the
//! kernel: the guest writes a sector of its data disk, then counts in its
//! memory and prints each count, so a VM restored from a snapshot goes on
//! counting from where the snapshot caught it (a cold boot starts at 1),
//! and the data disk shows whether the snapshot's copy came along.

mod store_common;
mod vm_common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vm_common::Host;
use vmm_support::{kvm_or_skip, test_guest};

/// Writes 0x5a over sector 4 of disk 1 (the data disk), then counts every
/// 50 ms for ever.
const GUEST: &str = "console=ttyS0 cocoon.write=1:4:5a cocoon.count=50:0";
const DATA_SECTOR: u64 = 4;

impl Host {
    fn run_detached(&self, name: &str) {
        assert_eq!(self.run_detached_with(&test_guest(), name, GUEST), name);
    }

    fn record(&self, name: &str) -> Value {
        self.json(&["inspect", name, "-o", "json"])
    }

    fn counts(&self, name: &str) -> Vec<u64> {
        counts(&self.ok(&["logs", name]))
    }

    fn wait_counts(&self, name: &str, n: u64) {
        eventually(&format!("{name} counting to {n}"), || {
            self.counts(name).last().is_some_and(|&c| c >= n)
        });
    }

    /// The path of `name`'s disk with `serial`.
    fn disk(&self, name: &str, serial: &str) -> PathBuf {
        let r = self.record(name);
        let d = r["record"]["storage"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["serial"] == serial)
            .unwrap_or_else(|| panic!("{name} has no disk {serial}: {r}"));
        PathBuf::from(d["path"].as_str().unwrap())
    }

    /// (device, inode) of every writable disk of `name`.
    fn writable_files(&self, name: &str) -> Vec<(u64, u64)> {
        let r = self.record(name);
        r["record"]["storage"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["read_only"] == false)
            .map(|d| {
                let m = std::fs::metadata(d["path"].as_str().unwrap()).unwrap();
                (m.dev(), m.ino())
            })
            .collect()
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.state_dir().join("snapshots").join(name)
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every `count n=N` the guest printed, in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim_end().strip_prefix("cocoon-guest: count n="))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect()
}

fn assert_consecutive(what: &str, counts: &[u64]) {
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: the counter skipped or repeated: {counts:?}"
    );
}

fn sector(path: &Path, n: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 512];
    f.read_exact_at(&mut buf, n * 512).unwrap();
    buf
}

fn set_sector(path: &Path, n: u64, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[byte; 512], n * 512).unwrap();
    f.sync_all().unwrap();
}

/// Runs `src`, lets it count, saves `snap`; (last count before the save,
/// last count right after it).
fn running_with_snapshot(h: &Host, src: &str, snap: &str) -> (u64, u64) {
    h.run_detached(src);
    h.wait_counts(src, 3);
    let before = *h.counts(src).last().unwrap();
    let taken = h.json(&["snapshot", "save", src, "--name", snap, "-o", "json"]);
    let after = *h.counts(src).last().unwrap();
    assert_eq!(taken["name"], snap, "{taken}");
    assert!(taken["paused_ms"].as_f64().unwrap() > 0.0, "{taken}");
    let serials: Vec<&str> = taken["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    assert_eq!(
        serials,
        ["cocoon-root", "scratch", "cocoon-cidata"],
        "{taken}"
    );
    (before, after)
}

#[test]
fn save_list_inspect_then_restore_goes_on_counting_with_the_snapshots_disks() {
    if !kvm_or_skip("save_list_inspect_then_restore_goes_on_counting_with_the_snapshots_disks") {
        return;
    }
    let h = Host::new();
    let (before, after) = running_with_snapshot(&h, "src", "s1");
    assert_eq!(h.state_of("src"), "running", "a save resumes the guest");
    h.wait_counts("src", after + 3);

    let list = h.json(&["snapshot", "list", "-o", "json"]);
    let rows = list["snapshots"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{list}");
    assert_eq!(rows[0]["name"], "s1");
    assert_eq!(rows[0]["source_vm"], "src");
    assert_eq!(rows[0]["cpus"], 1);
    assert_eq!(rows[0]["memory_bytes"], 64 << 20);
    assert_eq!(rows[0]["disks"], 3);
    assert!(rows[0]["error"].is_null(), "{list}");

    let inspect = h.json(&["snapshot", "inspect", "s1", "--check", "-o", "json"]);
    assert_eq!(inspect["preflight"]["ok"], true, "{inspect}");
    let roles: Vec<&str> = inspect["sidecar"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["config"]["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["cow", "data", "cidata"], "{inspect}");
    assert_eq!(inspect["sidecar"]["source_vm"], "src");
    let snap_data = h.snapshot_dir("s1").join("disks/data-scratch.raw");
    assert_eq!(sector(&snap_data, DATA_SECTOR), [0x5a; 512], "the copy");

    // Refusals that name what is wrong.
    let e = h.fails(&["snapshot", "save", "src", "--name", "s1"]);
    assert!(e.contains("snapshot s1 already exists"), "{e}");
    let e = h.fails(&["snapshot", "save", "src", "--name", "../x"]);
    assert!(e.contains("snapshot name \"../x\""), "{e}");

    // The VM's data disk changes after the snapshot; a restore brings the
    // snapshot's contents back, and the guest's memory with them.
    let data = h.disk("src", "scratch");
    set_sector(&data, DATA_SECTOR, 0x11);
    let pid_before = h.vm("src")["pid"].as_u64().unwrap();
    let out = h.ok(&["restore", "src", "s1"]);
    assert!(out.contains("src restored from s1, running"), "{out}");
    assert_eq!(h.state_of("src"), "running");
    assert_ne!(h.vm("src")["pid"].as_u64().unwrap(), pid_before);
    assert_eq!(sector(&data, DATA_SECTOR), [0x5a; 512], "the restored disk");
    let vm_dir = PathBuf::from(h.record("src")["dir"].as_str().unwrap());
    assert!(
        !vm_dir.join("start-from.json").exists(),
        "the note goes once the VM runs"
    );

    // In the log: the first run's counts, then the restored run's, which
    // start where the snapshot caught the counter.
    let mut all = Vec::new();
    eventually("the restored guest counting", || {
        all = h.counts("src");
        let back = all.windows(2).position(|w| w[1] <= w[0]);
        back.is_some_and(|i| all.len() > i + 5)
    });
    let i = all.windows(2).position(|w| w[1] <= w[0]).unwrap() + 1;
    let first = all[i];
    assert!(
        first > before && first <= after + 1,
        "the restored counter starts at {first}; the snapshot was taken between counts {before} and {after}"
    );
    assert_consecutive("the first run", &all[..i]);
    assert_consecutive("the restored run", &all[i..]);

    // A stopped VM cannot be snapshotted: it has no running state.
    h.ok(&["stop", "--force", "src"]);
    let e = h.fails(&["snapshot", "save", "src", "--name", "s2"]);
    assert!(e.contains("VM src is stopped"), "{e}");
    assert!(e.contains("start it first"), "{e}");

    h.ok(&["snapshot", "rm", "s1"]);
    assert!(h.json(&["snapshot", "list", "-o", "json"])["snapshots"]
        .as_array()
        .unwrap()
        .is_empty());
    let e = h.fails(&["snapshot", "inspect", "s1"]);
    assert!(e.contains("no snapshot s1"), "{e}");
}

#[test]
fn a_tampered_snapshot_is_refused_by_restore_and_the_vm_runs_on() {
    if !kvm_or_skip("a_tampered_snapshot_is_refused_by_restore_and_the_vm_runs_on") {
        return;
    }
    let h = Host::new();
    running_with_snapshot(&h, "src", "s1");
    let pid = h.vm("src")["pid"].as_u64().unwrap();

    // A flipped byte in the state file.
    let state = h.snapshot_dir("s1").join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();
    let e = h.fails(&["restore", "src", "s1"]);
    assert!(
        e.contains("fails its preflight; the VM was not touched"),
        "{e}"
    );
    assert!(e.contains("corrupt"), "{e}");
    bytes[mid] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();

    // A data disk gone from the snapshot.
    let data = h.snapshot_dir("s1").join("disks/data-scratch.raw");
    let aside = h.state.path().join("aside.raw");
    std::fs::rename(&data, &aside).unwrap();
    let e = h.fails(&["restore", "src", "s1"]);
    assert!(e.contains("fails its preflight"), "{e}");
    assert!(e.contains("missing"), "{e}");

    // The VM was never stopped: same monitor, still counting.
    assert_eq!(h.state_of("src"), "running");
    assert_eq!(h.vm("src")["pid"].as_u64().unwrap(), pid);
    let now = *h.counts("src").last().unwrap();
    h.wait_counts("src", now + 3);
    assert_consecutive("the untouched VM", &h.counts("src"));
}

#[test]
fn a_clone_runs_beside_its_source_with_its_own_files_and_the_snapshots_data() {
    if !kvm_or_skip("a_clone_runs_beside_its_source_with_its_own_files_and_the_snapshots_data") {
        return;
    }
    let h = Host::new();
    let (before, after) = running_with_snapshot(&h, "src", "s1");
    let c = h.json(&["clone", "s1", "--name", "c1", "-d", "-o", "json"]);
    assert_eq!(c["name"], "c1", "{c}");
    assert_eq!(c["snapshot"], "s1");
    assert_eq!(h.state_of("c1"), "running");
    assert_eq!(h.state_of("src"), "running");

    // Restored, not booted: the clone's counter starts where the snapshot
    // caught the source's.
    h.wait_counts("c1", after + 3);
    let cc = h.counts("c1");
    assert!(
        cc[0] > before && cc[0] <= after + 1,
        "the clone starts counting at {}; the snapshot was between {before} and {after}",
        cc[0]
    );
    assert_consecutive("the clone", &cc);
    let now = *h.counts("src").last().unwrap();
    h.wait_counts("src", now + 3);

    // Its own files: no writable disk shared with the source or the
    // snapshot; the data written before the snapshot is in its copy.
    let src_files = h.writable_files("src");
    for f in h.writable_files("c1") {
        assert!(!src_files.contains(&f), "the clone shares {f:?}");
    }
    let r = h.record("c1");
    let c1_dir = PathBuf::from(r["dir"].as_str().unwrap());
    for d in r["record"]["storage"].as_array().unwrap() {
        assert!(
            Path::new(d["path"].as_str().unwrap()).starts_with(&c1_dir),
            "{d}"
        );
    }
    assert_eq!(
        sector(&h.disk("c1", "scratch"), DATA_SECTOR),
        [0x5a; 512],
        "the data disk as the snapshot had it"
    );
    assert_ne!(r["record"]["id"], h.record("src")["record"]["id"]);
    assert!(!c1_dir.join("start-from.json").exists());

    // The snapshot is only read: the clone going does not touch it, and a
    // later start of the clone boots (the counter starts at 1).
    let e = h.fails(&["clone", "s1", "--name", "c1", "-d"]);
    assert!(e.contains("a VM named c1 exists already"), "{e}");
    h.ok(&["stop", "--force", "c1"]);
    h.ok(&["start", "c1"]);
    eventually("the cold boot counting", || {
        let all = h.counts("c1");
        let i = all.windows(2).position(|w| w[1] <= w[0]);
        i.is_some_and(|i| all.len() > i + 2)
    });
    let all = h.counts("c1");
    let i = all.windows(2).position(|w| w[1] <= w[0]).unwrap() + 1;
    assert_eq!(all[i], 1, "a second start boots: {all:?}");
}

#[test]
fn eight_clones_of_one_snapshot_start_at_once() {
    if !kvm_or_skip("eight_clones_of_one_snapshot_start_at_once") {
        return;
    }
    let h = Host::new();
    let (_, after) = running_with_snapshot(&h, "src", "s1");
    let children: Vec<_> = (0..8)
        .map(|i| {
            h.cmd()
                .args(["clone", "s1", "-d", "--name", &format!("c{i}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "clone {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut seen = Vec::new();
    for i in 0..8 {
        let name = format!("c{i}");
        assert_eq!(h.state_of(&name), "running");
        h.wait_counts(&name, after + 3);
        assert_consecutive(&name, &h.counts(&name));
        seen.extend(h.writable_files(&name));
    }
    let n = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "two clones share a writable file");
    assert_eq!(n, 8 * 2, "a cow and a data disk each");
}

#[test]
fn export_import_and_push_pull_round_trips_then_clone() {
    if !kvm_or_skip("export_import_and_push_pull_round_trips_then_clone") {
        return;
    }
    let h = Host::new();
    running_with_snapshot(&h, "src", "s1");
    let sidecar = std::fs::read(h.snapshot_dir("s1").join("snapshot.json")).unwrap();

    // Export, plain to a file and zstd to stdout; import both back.
    let tar = h.state.path().join("s1.tar");
    h.ok(&["snapshot", "export", "s1", "-o", tar.to_str().unwrap()]);
    let o = h
        .cmd()
        .args(["snapshot", "export", "s1", "--zstd"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&o.stdout[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd");
    let zst = h.state.path().join("s1.tar.zst");
    std::fs::write(&zst, &o.stdout).unwrap();

    let e = h.fails(&["snapshot", "import", tar.to_str().unwrap()]);
    assert!(e.contains("snapshot s1 already exists"), "{e}");
    h.ok(&["snapshot", "rm", "s1"]);
    assert_eq!(
        h.ok(&["snapshot", "import", tar.to_str().unwrap()]).trim(),
        "s1"
    );
    assert_eq!(
        std::fs::read(h.snapshot_dir("s1").join("snapshot.json")).unwrap(),
        sidecar
    );
    let o = h
        .cmd()
        .args(["snapshot", "import", "-", "--name", "s2"])
        .stdin(std::fs::File::open(&zst).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "s2");
    let inspect = h.json(&["snapshot", "inspect", "s2", "--check", "-o", "json"]);
    assert_eq!(inspect["preflight"]["ok"], true, "{inspect}");

    // The imported snapshot clones.
    h.ok(&["clone", "s2", "--name", "from-import", "-d"]);
    h.wait_counts("from-import", 3);

    // Push and pull through a real registry, when there is one.
    let Some(reg) = store_common::registry::Registry::start() else {
        return;
    };
    let reference = format!("oci://127.0.0.1:{}/snaps/src:v1", reg.port);
    let digest = h.ok(&["snapshot", "push", "s1", &reference]);
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    let pulled = h.ok(&["snapshot", "pull", &reference, "--name", "s3"]);
    assert_eq!(pulled.trim(), "s3");
    let inspect = h.json(&["snapshot", "inspect", "s3", "--check", "-o", "json"]);
    assert_eq!(inspect["preflight"]["ok"], true, "{inspect}");
    h.ok(&["clone", "s3", "--name", "from-registry", "-d"]);
    h.wait_counts("from-registry", 3);
}
