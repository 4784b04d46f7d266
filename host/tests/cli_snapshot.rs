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

    /// The console log's length: where the next run's output starts, once
    /// the VM is stopped.
    fn log_len(&self, name: &str) -> usize {
        self.ok(&["logs", name]).len()
    }

    /// The counts logged since byte `from` of the log.
    fn counts_since(&self, name: &str, from: usize) -> Vec<u64> {
        counts(self.ok(&["logs", name]).get(from..).unwrap_or_default())
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
    cold_boot(&h, "c1");
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

/// The staged copies (`fsutil::temp` temps) in `dir`.
fn staged_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cocoon-tmp-"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_restore_that_fails_while_staging_costs_the_running_vm_nothing() {
    if !kvm_or_skip("a_restore_that_fails_while_staging_costs_the_running_vm_nothing") {
        return;
    }
    let h = Host::new();
    running_with_snapshot(&h, "src", "s1");
    let pid = h.vm("src")["pid"].as_u64().unwrap();
    let vm_dir = PathBuf::from(h.record("src")["dir"].as_str().unwrap());

    // A byte changed in the snapshot's 16 MiB data disk: above the
    // preflight's hash limit, so the preflight passes, and the copy being
    // staged (hashed on the way) finds it.
    let data = h.snapshot_dir("s1").join("disks/data-scratch.raw");
    let good = sector(&data, 100);
    set_sector(&data, 100, good[0] ^ 0xff);
    let e = h.fails(&["restore", "src", "s1"]);
    assert!(e.contains("the VM was not touched"), "{e}");
    assert!(
        e.contains("data-scratch.raw has changed since the snapshot"),
        "{e}"
    );
    assert!(e.contains("the sidecar records sha256:"), "{e}");
    assert_eq!(
        staged_files(&vm_dir),
        Vec::<String>::new(),
        "no staged file"
    );
    assert_eq!(h.state_of("src"), "running");
    assert_eq!(h.vm("src")["pid"].as_u64().unwrap(), pid, "never stopped");
    let now = *h.counts("src").last().unwrap();
    h.wait_counts("src", now + 3);
    assert_consecutive("the untouched VM", &h.counts("src"));
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(&good, 100 * 512).unwrap();
    drop(f);

    // Killed right after staging: the VM still runs, the staged copies
    // (the cow and the data disk) are left, and the next command sweeps
    // them.
    let o = h
        .cmd()
        .env("COCOON_CRASH_AT", "restore-staged")
        .args(["restore", "src", "s1"])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let left = staged_files(&vm_dir);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|n| n.ends_with(".stage")), "{left:?}");
    assert_eq!(h.vm("src")["pid"].as_u64().unwrap(), pid, "never stopped");
    assert_eq!(staged_files(&vm_dir), Vec::<String>::new(), "swept by list");
    let now = *h.counts("src").last().unwrap();
    h.wait_counts("src", now + 3);

    // With the snapshot whole again, the restore goes through.
    let out = h.ok(&["restore", "src", "s1"]);
    assert!(out.contains("src restored from s1, running"), "{out}");
    assert_ne!(h.vm("src")["pid"].as_u64().unwrap(), pid);
    assert_eq!(staged_files(&vm_dir), Vec::<String>::new());
}

fn mkfifo(path: &Path) {
    let o = std::process::Command::new("mkfifo")
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_clone_takes_a_users_file_for_a_data_disk_and_never_a_new_disk() {
    if !kvm_or_skip("a_clone_takes_a_users_file_for_a_data_disk_and_never_a_new_disk") {
        return;
    }
    let h = Host::new();
    running_with_snapshot(&h, "src", "s1");
    // The user's file: the snapshot's data disk with another sector 4.
    let mine = h.state.path().join("mine.raw");
    std::fs::copy(h.snapshot_dir("s1").join("disks/data-scratch.raw"), &mine).unwrap();
    set_sector(&mine, DATA_SECTOR, 0x77);
    let at = |spec: &str| format!("{spec},path={}", mine.display());

    // Refusals, each naming the flag and why; none leaves a VM behind.
    let e = h.fails(&[
        "clone",
        "s1",
        "--name",
        "x",
        "-d",
        "--data-disk",
        "size=16M,name=extra",
    ]);
    assert!(e.contains("a clone cannot get a new disk"), "{e}");
    assert!(e.contains("no disk hotplug"), "{e}");
    assert!(e.contains("\"size=16M,name=extra\""), "{e}");
    let e = h.fails(&[
        "clone",
        "s1",
        "--name",
        "x",
        "-d",
        "--data-disk",
        &at("index=7"),
    ]);
    assert!(
        e.contains("snapshot s1 has no disk 7 (its data disks: 1 scratch)"),
        "{e}"
    );
    assert!(e.contains("no disk hotplug"), "{e}");
    let e = h.fails(&[
        "clone",
        "s1",
        "--name",
        "x",
        "-d",
        "--data-disk",
        &at("name=logs"),
    ]);
    assert!(e.contains("has no disk named logs"), "{e}");
    let e = h.fails(&[
        "clone",
        "s1",
        "--name",
        "x",
        "-d",
        "--data-disk",
        &at("index=0"),
    ]);
    assert!(e.contains("disk 0 of snapshot s1 is its cow disk"), "{e}");
    let small = h.state.path().join("small.raw");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("name=scratch,path={}", small.display());
    let e = h.fails(&["clone", "s1", "--name", "x", "-d", "--data-disk", &spec]);
    assert!(
        e.contains("is 1048576 bytes; the snapshot's data disk scratch is 16777216 bytes"),
        "{e}"
    );
    let fifo = h.state.path().join("fifo.raw");
    mkfifo(&fifo);
    let spec = format!("name=scratch,path={}", fifo.display());
    let e = h.fails(&["clone", "s1", "--name", "x", "-d", "--data-disk", &spec]);
    assert!(e.contains("it is a FIFO, not a regular file"), "{e}");
    assert!(e.contains(&fifo.display().to_string()), "{e}");
    // The running source's own data disk: its monitor holds its lock.
    let spec = format!("name=scratch,path={}", h.disk("src", "scratch").display());
    let e = h.fails(&["clone", "s1", "--name", "x", "-d", "--data-disk", &spec]);
    assert!(e.contains("is in use"), "{e}");
    assert_eq!(h.state_of("x"), "absent");
    assert_eq!(h.vm_dirs().len(), 1, "only the source: {:?}", h.vm_dirs());

    // The clone gets a copy of the file in its own directory, and the
    // restored guest counts on with it.
    let c = h.json(&[
        "clone",
        "s1",
        "--name",
        "c1",
        "-d",
        "-o",
        "json",
        "--data-disk",
        &at("name=scratch"),
    ]);
    assert_eq!(c["name"], "c1", "{c}");
    h.wait_counts("c1", 3);
    assert_consecutive("the clone", &h.counts("c1"));
    let disk = h.disk("c1", "scratch");
    let c1_dir = PathBuf::from(h.record("c1")["dir"].as_str().unwrap());
    assert!(disk.starts_with(&c1_dir), "{}", disk.display());
    assert_eq!(sector(&disk, DATA_SECTOR), [0x77; 512], "the user's data");
    assert_ne!(
        std::fs::metadata(&disk).unwrap().ino(),
        std::fs::metadata(&mine).unwrap().ino(),
        "a copy, not the user's file"
    );
    // The user's file is free again once the clone is made.
    let spec = at("index=1");
    h.ok(&["clone", "s1", "--name", "c2", "-d", "--data-disk", &spec]);
    assert_eq!(h.state_of("c2"), "running");
}

#[test]
fn a_clone_owns_the_boot_files_of_its_sources_directory() {
    if !kvm_or_skip("a_clone_owns_the_boot_files_of_its_sources_directory") {
        return;
    }
    let h = Host::new();
    h.run_detached("src");
    h.wait_counts("src", 2);
    // The source boots a kernel of its own directory, as a VM does with
    // its image's kernel or its own initrd: the test guest, moved there.
    h.ok(&["stop", "--force", "src"]);
    let src_dir = PathBuf::from(h.record("src")["dir"].as_str().unwrap());
    std::fs::create_dir_all(src_dir.join("boot")).unwrap();
    let kernel = src_dir.join("boot/vmlinuz");
    std::fs::copy(test_guest(), &kernel).unwrap();
    let record_path = src_dir.join("vm.json");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["machine"]["kernel"] = kernel.to_str().unwrap().into();
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    let from = h.log_len("src");
    h.ok(&["start", "src"]);
    // Counting in this run (the last run's counts are in the log too).
    eventually("src counting again", || {
        h.counts_since("src", from).last().is_some_and(|&n| n >= 3)
    });
    h.ok(&["snapshot", "save", "src", "--name", "s1"]);
    let saved_at = *h.counts("src").last().unwrap();

    h.ok(&["clone", "s1", "--name", "c1", "-d"]);
    // The clone goes on from the snapshot's count before it is booted cold.
    h.wait_counts("c1", saved_at + 2);
    let c1 = h.record("c1");
    let c1_dir = PathBuf::from(c1["dir"].as_str().unwrap());
    let c1_kernel = PathBuf::from(c1["record"]["machine"]["kernel"].as_str().unwrap());
    assert_eq!(c1_kernel, c1_dir.join("boot/kernel"), "{c1}");
    assert_eq!(
        c1["record"]["machine"]["cmdline"], GUEST,
        "the snapshot's command line"
    );
    // The snapshot carries the kernel (so an export or push does too).
    let inspect = h.json(&["snapshot", "inspect", "s1", "-o", "json"]);
    assert_eq!(inspect["sidecar"]["version"], "1.1", "{inspect}");
    assert_eq!(inspect["sidecar"]["boot"]["kernel"], "kernel", "{inspect}");
    assert_eq!(
        std::fs::read(h.snapshot_dir("s1").join("kernel")).unwrap(),
        std::fs::read(test_guest()).unwrap()
    );

    // The source goes; the clone still cold-boots its own kernel.
    h.ok(&["rm", "-f", "src"]);
    assert!(!src_dir.exists());
    cold_boot(&h, "c1");

    // The snapshot gone too: the clone's kernel is its own.
    h.ok(&["snapshot", "rm", "s1"]);
    cold_boot(&h, "c1");
}

/// Stops `vm` and starts it again: a cold boot, whose counter starts
/// again at 1 (a restored run goes on from the snapshot's count, past 2).
/// Only what the new run appends to the log is looked at: a clone stopped
/// before its restored run printed a line has no earlier count to compare
/// with.
fn cold_boot(h: &Host, vm: &str) {
    h.ok(&["stop", "--force", vm]);
    // The monitor is gone, so the log is complete: the new run starts here.
    let from = h.log_len(vm);
    h.ok(&["start", vm]);
    eventually(&format!("{vm}'s cold boot counting"), || {
        h.counts_since(vm, from).windows(2).any(|w| w == [1, 2])
    });
    assert_eq!(h.state_of(vm), "running");
}

#[test]
fn a_clone_pulls_the_snapshots_missing_image_by_digest_or_changes_nothing() {
    if !kvm_or_skip("a_clone_pulls_the_snapshots_missing_image_by_digest_or_changes_nothing") {
        return;
    }
    let h = Host::new();
    running_with_snapshot(&h, "src", "s1");
    let inspect = h.json(&["snapshot", "inspect", "s1", "-o", "json"]);
    let digest = inspect["sidecar"]["image"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let reference = inspect["sidecar"]["image"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(reference, h.image.to_str().unwrap(), "{inspect}");
    let blob = h
        .state_dir()
        .join("images/blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap());
    assert!(blob.exists(), "{}", blob.display());

    // The blob gone, as on a host the snapshot was imported to: the clone
    // pulls it by digest from the sidecar's reference, then runs.
    std::fs::remove_file(&blob).unwrap();
    let c = h.json(&["clone", "s1", "--name", "c1", "-d", "-o", "json"]);
    assert_eq!(c["pulled_image"]["digest"], digest.as_str(), "{c}");
    assert_eq!(c["pulled_image"]["reference"], reference.as_str(), "{c}");
    assert!(blob.exists(), "pulled back into the store");
    h.wait_counts("c1", 3);
    let o = h.run(&["clone", "s1", "--name", "c2", "-d"]);
    assert!(o.status.success());
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("pulled it by digest"),
        "present now: no pull"
    );

    // The source gone too: a clear error naming both, and nothing made.
    std::fs::remove_file(&blob).unwrap();
    let aside = h.state.path().join("moved.raw");
    std::fs::rename(&h.image, &aside).unwrap();
    let before = h.vm_dirs();
    let e = h.fails(&["clone", "s1", "--name", "c3", "-d"]);
    assert!(e.contains(&digest), "{e}");
    assert!(
        e.contains(&format!("could not be pulled by digest from {reference}")),
        "{e}"
    );
    assert!(e.contains("nothing was changed"), "{e}");
    assert_eq!(h.state_of("c3"), "absent");
    assert_eq!(h.vm_dirs(), before);
    // A restore refuses the same way, before it touches the VM.
    let pid = h.vm("src")["pid"].as_u64().unwrap();
    let e = h.fails(&["restore", "src", "s1"]);
    assert!(e.contains("could not be pulled by digest"), "{e}");
    assert_eq!(h.vm("src")["pid"].as_u64().unwrap(), pid);
}
