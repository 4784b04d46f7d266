//! The snapshot commands end to end, through the binary: `snapshot save`
//! of a running 256 MiB guest, `restore` to running, `clone -d` to running
//! and to the clone's first serial line, and 32 clones of one snapshot
//! started at once; the anchor, measured in the same run, is `run -d` of
//! the same image to its first serial line (a cold boot). Run by
//! `scripts/bench-snapshot-cli`, which records the table in
//! docs/benchmarks.md.

#[path = "../../vmm/benches/common/mod.rs"]
mod common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUEST_RAM: &str = "256M";
const CMDLINE: &str = "console=ttyS0 cocoon.count=20:0";
/// A guest that is mostly idle (halted), as a fleet's pre-booted VMs are:
/// it wakes to print once a second. The 20 ms counter above prints 50
/// lines a second, and 32 of them busy the 2 cores on their own.
const CMDLINE_IDLE: &str = "console=ttyS0 cocoon.count=1000:0";
const TIMEOUT: Duration = Duration::from_secs(60);
const CLONES_AT_ONCE: usize = 32;

struct Ours {
    bin: PathBuf,
    state: PathBuf,
    image: PathBuf,
    guest: PathBuf,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    run_first_line: Duration,
    save_cli: Duration,
    save_paused: Duration,
    restore_cli: Duration,
    clone_cli: Duration,
    clone_first_line: Duration,
    many_cli: Duration,
    many_first_lines: Duration,
    idle_many_cli: Duration,
    idle_many_first_lines: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Ours {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("COCOON_STATE_DIR", &self.state)
            .env("COCOON_CONFIG", "/dev/null");
        c
    }

    fn ok(&self, args: &[&str]) -> Result<String, String> {
        let o = self.cmd().args(args).output().map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr)));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn vm_dir(&self, name: &str) -> Result<PathBuf, String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["inspect", "-o", "json", name])?)
                .map_err(|e| e.to_string())?;
        v["dir"].as_str().map(PathBuf::from).ok_or("no dir".into())
    }

    /// Waits until `log` holds a count line; when, from `t0`.
    fn first_count(log: &Path, t0: Instant) -> Result<Duration, String> {
        loop {
            if std::fs::read(log)
                .map(|b| b.windows(19).any(|w| w == b"cocoon-guest: count"))
                .unwrap_or(false)
            {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > TIMEOUT {
                return Err(format!("no count line in {}", log.display()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// `run -d` of the image with a data disk, booting the test guest.
    fn run_detached(&self, name: &str, cmdline: &str) -> Result<(), String> {
        self.ok(&[
            "run",
            "-d",
            "--no-cidata",
            "--name",
            name,
            "--memory",
            GUEST_RAM,
            "--kernel",
            self.guest.to_str().ok_or("guest path")?,
            "--cmdline",
            cmdline,
            "--data-disk",
            "size=16M,name=data,fstype=none",
            self.image.to_str().ok_or("image path")?,
        ])
        .map(drop)
    }

    /// [`CLONES_AT_ONCE`] `clone -d` of `snap` at once, named `prefix-K`:
    /// (until every command returned, until every clone printed a count
    /// line); the clones are removed after.
    fn many(&self, snap: &str, prefix: &str) -> Result<(Duration, Duration), String> {
        let t0 = Instant::now();
        let children = (0..CLONES_AT_ONCE)
            .map(|k| {
                self.cmd()
                    .args(["clone", snap, "-d", "--name", &format!("{prefix}-{k}")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        for c in children {
            let o = c.wait_with_output().map_err(|e| e.to_string())?;
            if !o.status.success() {
                return Err(format!("a clone: {}", String::from_utf8_lossy(&o.stderr)));
            }
        }
        let all_running = t0.elapsed();
        let mut first_lines = Duration::ZERO;
        for k in 0..CLONES_AT_ONCE {
            let log = self.vm_dir(&format!("{prefix}-{k}"))?.join("console.log");
            first_lines = first_lines.max(Self::first_count(&log, t0)?);
        }
        for k in 0..CLONES_AT_ONCE {
            self.ok(&["rm", "-f", &format!("{prefix}-{k}")])?;
        }
        Ok((all_running, first_lines))
    }

    fn one(&self, i: usize) -> Result<Sample, String> {
        let mut s = Sample::default();
        let src = format!("src{i}");
        let t0 = Instant::now();
        self.run_detached(&src, CMDLINE)?;
        s.run_first_line = Self::first_count(&self.vm_dir(&src)?.join("console.log"), t0)?;

        let snap = format!("snap{i}");
        let t0 = Instant::now();
        let taken: serde_json::Value = serde_json::from_str(
            &self.ok(&["snapshot", "save", &src, "--name", &snap, "-o", "json"])?,
        )
        .map_err(|e| e.to_string())?;
        s.save_cli = t0.elapsed();
        s.save_paused =
            Duration::from_secs_f64(taken["paused_ms"].as_f64().ok_or("paused_ms")? / 1e3);

        let t0 = Instant::now();
        self.ok(&["restore", &src, &snap])?;
        s.restore_cli = t0.elapsed();

        let clone = format!("clone{i}");
        let t0 = Instant::now();
        self.ok(&["clone", &snap, "-d", "--name", &clone])?;
        s.clone_cli = t0.elapsed();
        s.clone_first_line = Self::first_count(&self.vm_dir(&clone)?.join("console.log"), t0)?;

        for n in [src, clone] {
            self.ok(&["rm", "-f", &n])?;
        }
        (s.many_cli, s.many_first_lines) = self.many(&snap, &format!("many{i}"))?;

        let idle = format!("idle{i}");
        let idle_snap = format!("idlesnap{i}");
        let t0 = Instant::now();
        self.run_detached(&idle, CMDLINE_IDLE)?;
        Self::first_count(&self.vm_dir(&idle)?.join("console.log"), t0)?;
        self.ok(&["snapshot", "save", &idle, "--name", &idle_snap])?;
        self.ok(&["rm", "-f", &idle])?;
        (s.idle_many_cli, s.idle_many_first_lines) =
            self.many(&idle_snap, &format!("idlemany{i}"))?;
        self.ok(&["snapshot", "rm", &idle_snap])?;
        self.ok(&["snapshot", "rm", &snap])?;
        Ok(s)
    }
}

fn main() {
    let runs = common::runs_arg(5);
    if cocoon_vmm::check_kvm().is_err() {
        eprintln!("bench snapshot_cli: /dev/kvm is not usable");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 16 << 20]).unwrap();
    let ours = Ours {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_cocoon-host")),
        state: dir.path().join("state"),
        image,
        guest: vmm_support::test_guest(),
    };
    // The image is cached (pulled and converted) before anything is timed.
    ours.ok(&[
        "image",
        "pull",
        "--convert",
        "raw",
        ours.image.to_str().unwrap(),
    ])
    .unwrap();
    let _ = ours.one(1000).unwrap();
    let mut v = Vec::new();
    for i in 0..runs {
        let s = ours.one(i).unwrap_or_else(|e| panic!("run {i}: {e}"));
        eprintln!("run {i}: {s:?}");
        v.push(s);
    }
    let med = |f: fn(&Sample) -> Duration| common::median(v.iter().map(|s| ms(f(s))).collect());
    let anchor = med(|s| s.run_first_line);
    let row = |what: &str, value: f64, goal: Option<f64>| {
        let verdict = goal
            .map(|g| format!("< {g} ms: {}", if value < g { "met" } else { "not met" }))
            .unwrap_or_default();
        println!(
            "| {what} (ms) | {value:.1} | {:.2} | {verdict} |",
            value / anchor
        );
    };
    println!("BEGIN-SNAPSHOT-CLI-BENCH");
    println!("| measure (median of {runs}) | cocoon-host | / anchor | goal |");
    println!("|---|---:|---:|---|");
    println!(
        "| anchor: `run -d` (cached image) → first count line, a cold boot (ms) | {anchor:.1} | 1.00 | |"
    );
    row(
        "`snapshot save` of the running guest, CLI start → snapshot listed",
        med(|s| s.save_cli),
        None,
    );
    row(
        "  of which the guest was paused (state, memory, disk copies)",
        med(|s| s.save_paused),
        None,
    );
    row(
        "`restore VM SNAP` of the running VM → running again (preflight, stop, stage, commit, monitor restore)",
        med(|s| s.restore_cli),
        None,
    );
    row(
        "`clone SNAP -d` → running (the monitor said the restored VM runs)",
        med(|s| s.clone_cli),
        Some(30.0),
    );
    row(
        "`clone SNAP -d` → the clone's first count line",
        med(|s| s.clone_first_line),
        None,
    );
    row(
        &format!("{CLONES_AT_ONCE} `clone -d` of one snapshot at once → all running"),
        med(|s| s.many_cli),
        Some(1000.0),
    );
    row(
        &format!("{CLONES_AT_ONCE} clones at once → every one's first count line"),
        med(|s| s.many_first_lines),
        None,
    );
    row(
        &format!("{CLONES_AT_ONCE} `clone -d` of an idle guest's snapshot (a count line a second) at once → all running"),
        med(|s| s.idle_many_cli),
        Some(1000.0),
    );
    row(
        &format!("{CLONES_AT_ONCE} idle clones at once → every one's first count line (each within its 1 s period)"),
        med(|s| s.idle_many_first_lines),
        None,
    );
    println!("END-SNAPSHOT-CLI-BENCH");
}
