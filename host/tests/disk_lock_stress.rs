//! Per-disk locks under load: 32 operations in separate processes, each
//! replacing an overlapping set of disks (in random order, so only the
//! lock's own sorting prevents deadlock), plus processes killed with
//! SIGKILL in the middle of operations. Afterwards every committed write
//! is on every disk it touched, every write that is on one disk is on all
//! of its disks (replacement is all or none, crash included), writes that
//! share disks are in one order everywhere, and no temp, backup or journal
//! file is left.
//!
//! The test re-executes its own binary as the worker processes (the role
//! comes from the environment).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_host::disk::lock::{DiskLocks, Wait};

const DISKS: usize = 8;
const OPS: usize = 32;
const VICTIMS: usize = 4;
const DEADLINE: Duration = Duration::from_secs(120);

fn disk_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("d{i}.raw"))
}

/// One operation: lock the disks, append `id` to each, replace them all.
fn operation(dir: &Path, id: &str, set: &[usize], pause: Duration) {
    let paths: Vec<PathBuf> = set.iter().map(|&i| disk_path(dir, i)).collect();
    let locks = DiskLocks::acquire(&paths, "stress", Wait::Yes).unwrap();
    let set_text: Vec<String> = set.iter().map(|i| i.to_string()).collect();
    let line = format!("{id}:{}\n", set_text.join(","));
    let mut staged = Vec::new();
    for p in &paths {
        let mut text = std::fs::read(p).unwrap();
        text.extend_from_slice(line.as_bytes());
        let s = locks.staging_path(p).unwrap();
        let mut f = std::fs::File::create(&s).unwrap();
        f.write_all(&text).unwrap();
        f.sync_all().unwrap();
        staged.push((p.clone(), s));
    }
    std::thread::sleep(pause);
    locks.replace(&staged).unwrap();
}

fn worker(dir: &Path) {
    let id = std::env::var("COCOON_STRESS_ID").unwrap();
    let set: Vec<usize> = std::env::var("COCOON_STRESS_SET")
        .unwrap()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let out = std::io::stdout();
    if std::env::var("COCOON_STRESS_VICTIM").is_ok() {
        // Until killed: every commit is announced after it returns.
        for k in 0.. {
            let op = format!("{id}.{k}");
            operation(dir, &op, &set, Duration::from_millis(10));
            writeln!(out.lock(), "committed {op}").unwrap();
        }
    }
    let delay: u64 = std::env::var("COCOON_STRESS_DELAY_MS")
        .unwrap()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(delay));
    operation(dir, &id, &set, Duration::from_millis(1));
    writeln!(out.lock(), "committed {id}").unwrap();
}

/// xorshift: the same sets every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// 2 to 4 distinct disks, in random order.
    fn set(&mut self) -> Vec<usize> {
        let n = 2 + (self.next() % 3) as usize;
        let mut set = Vec::new();
        while set.len() < n {
            let d = usize::try_from(self.next() % DISKS as u64).unwrap();
            if !set.contains(&d) {
                set.push(d);
            }
        }
        set
    }
}

fn spawn(dir: &Path, id: &str, set: &[usize], victim: bool, delay_ms: u64) -> Child {
    let set: Vec<String> = set.iter().map(|i| i.to_string()).collect();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "stress_disk_locks",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("COCOON_STRESS_DIR", dir)
    .env("COCOON_STRESS_ID", id)
    .env("COCOON_STRESS_SET", set.join(","))
    .env("COCOON_STRESS_DELAY_MS", delay_ms.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if victim {
        cmd.env("COCOON_STRESS_VICTIM", "1");
    }
    cmd.spawn().unwrap()
}

fn committed(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        // libtest's own "test … ... " may share the line.
        .filter_map(|l| l.split_once("committed ").map(|(_, op)| op))
        .map(str::to_string)
        .collect()
}

#[test]
fn stress_disk_locks() {
    if let Ok(dir) = std::env::var("COCOON_STRESS_DIR") {
        return worker(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    for i in 0..DISKS {
        std::fs::write(disk_path(dir.path(), i), b"").unwrap();
    }
    let mut rng = Rng(0x5eed_cafe);
    let mut sets: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut victims = Vec::new();
    for v in 0..VICTIMS {
        let id = format!("v{v}");
        let set = rng.set();
        let kill_at = 200 + rng.next() % 1000;
        victims.push((spawn(dir.path(), &id, &set, true, 0), kill_at));
        sets.insert(id, set);
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for n in 0..OPS {
        let id = format!("op{n}");
        let set = rng.set();
        let delay = rng.next() % 800;
        workers.push((id.clone(), spawn(dir.path(), &id, &set, false, delay)));
        sets.insert(id, set);
    }

    // Half the victims die at a random moment while the workers run (the
    // workers repair after them); the others while the last operations
    // run, or after (the final check's lock repairs after them).
    let mut victim_out = Vec::new();
    let kill = |mut child: Child, out: &mut Vec<String>| {
        child.kill().unwrap();
        out.extend(committed(&child.wait_with_output().unwrap().stdout));
    };
    let mut late = Vec::new();
    for (n, (child, at_ms)) in victims.into_iter().enumerate() {
        if n % 2 == 1 {
            late.push(child);
            continue;
        }
        let at = Duration::from_millis(at_ms);
        if let Some(left) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(left);
        }
        kill(child, &mut victim_out);
    }

    let mut done = Vec::new();
    for (id, mut child) in workers {
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("{id} did not finish within {DEADLINE:?}: deadlock");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = committed(&out.stdout);
        assert_eq!(c, vec![id.clone()], "{id}");
        done.extend(c);
    }
    // At once, so that neither repairs after the other.
    for child in &mut late {
        child.kill().unwrap();
    }
    for child in late {
        victim_out.extend(committed(&child.wait_with_output().unwrap().stdout));
    }
    let victim_commits = victim_out.len();
    done.extend(victim_out);

    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && !n.ends_with(".lock"))
        .collect();
    eprintln!("left by killed processes, before repair: {left:?}");
    // Repair whatever the killed ones left, then read every disk.
    let all: Vec<PathBuf> = (0..DISKS).map(|i| disk_path(dir.path(), i)).collect();
    drop(DiskLocks::acquire(&all, "check", Wait::No).unwrap());
    let mut on_disk: Vec<Vec<String>> = Vec::new();
    for p in &all {
        let text = std::fs::read_to_string(p).unwrap();
        on_disk.push(text.lines().map(str::to_string).collect());
    }
    let set_of = |op: &str| -> Vec<usize> {
        let base = op.split('.').next().unwrap();
        sets[base].clone()
    };

    // No lost write: every committed op is on each of its disks, once.
    for op in &done {
        for d in set_of(op) {
            let n = on_disk[d]
                .iter()
                .filter(|l| l.split(':').next() == Some(op.as_str()))
                .count();
            assert_eq!(n, 1, "{op} on disk {d}: {:?}", on_disk[d]);
        }
    }
    // All or none: an op on one disk is on every disk of its set, with
    // the set it wrote, and nowhere else.
    let mut seen = BTreeSet::new();
    for (d, lines) in on_disk.iter().enumerate() {
        for l in lines {
            let (op, set) = l.split_once(':').unwrap();
            let mut want: Vec<usize> = set.split(',').map(|s| s.parse().unwrap()).collect();
            assert_eq!(want, set_of(op), "{l}");
            want.sort();
            assert!(want.contains(&d), "{op} on disk {d}, not in its set");
            for other in want {
                assert!(
                    on_disk[other].iter().any(|x| x == l),
                    "{op} is on disk {d} but not on disk {other}: half a replacement"
                );
            }
            seen.insert(op.to_string());
        }
    }
    // One order: ops that share disks are ordered alike on each.
    for a in &on_disk {
        for b in &on_disk {
            let common: Vec<&String> = a.iter().filter(|l| b.contains(l)).collect();
            let in_b: Vec<&String> = b.iter().filter(|l| a.contains(l)).collect();
            assert_eq!(common, in_b, "two disks disagree on the order");
        }
    }
    assert!(OPS <= seen.len(), "{} ops on disk", seen.len());
    // No stale temp, backup or journal: only the disks and their locks.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..DISKS)
        .flat_map(|i| [format!(".d{i}.raw.lock"), format!("d{i}.raw")])
        .collect();
    want.sort();
    assert_eq!(names, want);
    eprintln!(
        "{} ops committed ({victim_commits} by killed processes), {} on disk, in {:?}",
        done.len(),
        seen.len(),
        started.elapsed()
    );
}
