//! `cocoon-host run -d` of a cached image to the guest's first serial line,
//! and the monitor's resident memory beyond guest RAM, beside QEMU's
//! microvm booting the same test guest in the same run. Run by
//! `scripts/bench-run`, which records the table in docs/benchmarks.md.

#[path = "../../vmm/benches/common/mod.rs"]
mod common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUEST_RAM_MIB: u64 = 128;
const CMDLINE: &str = "console=ttyS0 cocoon.count=1000:0";
const TIMEOUT: Duration = Duration::from_secs(30);
/// VMs run at once to measure what one more costs.
const FLEET: usize = 8;

/// Private KiB (Private_Clean + Private_Dirty) of process `pid` outside
/// its guest RAM mapping(s): what it alone holds. With several VMs running,
/// the binary's code is shared among their monitors and drops out, so this
/// is the memory one more VM costs.
fn private_kib(pid: u32, guest_ram_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut private, mut size_kib) = (0u64, 0u64);
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Size:"), Some(v)) => size_kib = v.parse().ok()?,
            (Some("Private_Clean:" | "Private_Dirty:"), Some(v))
                if size_kib < guest_ram_mib * 1024 =>
            {
                private += v.parse::<u64>().ok()?
            }
            _ => {}
        }
    }
    Some(private)
}

/// The VM directories under `vms`.
fn vm_dirs(vms: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(vms)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Whether the console log at `log` has the guest's first line.
fn has_first_line(log: &Path) -> bool {
    std::fs::read(log)
        .map(|b| b.windows(14).any(|w| w == b"cocoon-guest: "))
        .unwrap_or(false)
}

/// How long after `t0` a VM directory not in `before` had the guest's
/// first line in its console.log.
fn first_line_of_new_vm(vms: &Path, before: &[PathBuf], t0: Instant) -> Result<Duration, String> {
    loop {
        for dir in vm_dirs(vms).iter().filter(|d| !before.contains(d)) {
            if has_first_line(&dir.join("console.log")) {
                return Ok(t0.elapsed());
            }
        }
        if t0.elapsed() > TIMEOUT {
            return Err("no serial line".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

struct Ours {
    bin: PathBuf,
    state: PathBuf,
    image: PathBuf,
    guest: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// `run -d` returned (the VM's monitor said it runs).
    cli: Duration,
    first_line: Duration,
    overhead_kib: u64,
    /// The part of it that is anonymous memory, the process's own: file
    /// pages (the binary's and libraries' code) are page cache that other
    /// processes, the other VMs' monitors among them, map too.
    anon_kib: u64,
    /// User + system CPU time of the `run -d` process (load stretches
    /// wall time much more than CPU time).
    cpu: Duration,
}

/// User + system CPU time of this process's waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage into the zeroed value it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Anonymous KiB of process `pid` outside its guest RAM mapping(s) (every
/// mapping at least as large as guest RAM, as in `common::overhead_kib`).
fn anon_kib(pid: u32, guest_ram_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut anon, mut size_kib) = (0u64, 0u64);
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Size:"), Some(v)) => size_kib = v.parse().ok()?,
            (Some("Anonymous:"), Some(v)) if size_kib < guest_ram_mib * 1024 => {
                anon += v.parse::<u64>().ok()?;
            }
            _ => {}
        }
    }
    Some(anon)
}

impl Ours {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("COCOON_STATE_DIR", &self.state)
            .env("COCOON_CONFIG", "/dev/null");
        c
    }

    /// `run -d` of the cached image as VM `name`.
    fn run_detached(&self, name: &str) -> Result<(), String> {
        let o = self
            .cmd()
            .args(["run", "-d", "--no-cidata", "--name", name, "--memory"])
            .arg(format!("{GUEST_RAM_MIB}M"))
            .arg("--kernel")
            .arg(&self.guest)
            .args(["--cmdline", CMDLINE])
            .arg(&self.image)
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        let rm = self
            .cmd()
            .args(["rm", "-f", name])
            .output()
            .map_err(|e| e.to_string())?;
        if !rm.status.success() {
            return Err(String::from_utf8_lossy(&rm.stderr).into_owned());
        }
        Ok(())
    }

    /// Each monitor's private memory beyond guest RAM with `n` VMs
    /// running at once (see [`private_kib`]).
    fn fleet(&self, n: usize) -> Result<Vec<u64>, String> {
        let names: Vec<String> = (0..n).map(|i| format!("fleet{i}")).collect();
        let measured = (|| {
            let mut pids = Vec::new();
            for name in &names {
                self.run_detached(name)?;
                let log = self.vm_dir(name)?.join("console.log");
                let t0 = Instant::now();
                while !has_first_line(&log) {
                    if t0.elapsed() > TIMEOUT {
                        return Err(format!("{name}: no serial line"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                pids.push(self.pid(name)?);
            }
            std::thread::sleep(Duration::from_millis(100));
            pids.iter()
                .map(|&p| private_kib(p, GUEST_RAM_MIB).ok_or_else(|| "no smaps".to_string()))
                .collect()
        })();
        for name in &names {
            let _ = self.remove(name);
        }
        measured
    }

    fn run_one(&self, i: usize) -> Result<Sample, String> {
        let name = format!("bench{i}");
        let vms = self.state.join("vms");
        let before = vm_dirs(&vms);
        let cpu0 = children_cpu();
        let t0 = Instant::now();
        // Watched from the start, beside the run: the line may come before
        // `run -d` returns, and asking the CLI where the VM is (another
        // process) would add its own time to the figure.
        let watcher = std::thread::spawn(move || first_line_of_new_vm(&vms, &before, t0));
        self.run_detached(&name)?;
        let cli = t0.elapsed();
        let cpu = children_cpu() - cpu0;
        let first_line = watcher.join().map_err(|_| "the watcher panicked")??;
        let pid = self.pid(&name)?;
        // Once it has booted and printed, as in the VMM benchmark.
        std::thread::sleep(Duration::from_millis(100));
        let overhead_kib = common::overhead_kib(pid, GUEST_RAM_MIB).ok_or("no smaps")?;
        let anon_kib = anon_kib(pid, GUEST_RAM_MIB).ok_or("no smaps")?;
        self.remove(&name)?;
        Ok(Sample {
            cli,
            first_line,
            overhead_kib,
            anon_kib,
            cpu,
        })
    }

    fn inspect(&self, name: &str) -> Result<serde_json::Value, String> {
        let o = self
            .cmd()
            .args(["inspect", "-o", "json", name])
            .output()
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
    }

    fn vm_dir(&self, name: &str) -> Result<PathBuf, String> {
        let v = self.inspect(name)?;
        v["dir"].as_str().map(PathBuf::from).ok_or("no dir".into())
    }

    fn pid(&self, name: &str) -> Result<u32, String> {
        let v = self.inspect(name)?;
        v["record"]["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or("no pid".into())
    }
}

/// A QEMU microvm booting the test guest, and when its first line came.
fn qemu_started(guest: &Path) -> Result<(std::process::Child, Duration), String> {
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off", "-enable-kvm", "-m"])
        .arg(format!("{GUEST_RAM_MIB}M"))
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(guest)
        .args(["-append", CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu: {e}"))?;
    let mut first_line = None;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        if line.starts_with("cocoon-guest: ") {
            first_line = Some(t0.elapsed());
            break;
        }
        if t0.elapsed() > TIMEOUT {
            break;
        }
    }
    // Its later lines must not fill the pipe and stall it.
    std::thread::spawn(move || lines.for_each(drop));
    match first_line {
        Some(t) => Ok((child, t)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err("qemu: no serial line".into())
        }
    }
}

/// [`Ours::fleet`] for QEMU: `n` at once.
fn qemu_fleet(guest: &Path, n: usize) -> Result<Vec<u64>, String> {
    let mut children = Vec::new();
    let measured = (|| {
        for _ in 0..n {
            children.push(qemu_started(guest)?.0);
        }
        std::thread::sleep(Duration::from_millis(100));
        children
            .iter()
            .map(|c| private_kib(c.id(), GUEST_RAM_MIB).ok_or_else(|| "qemu: no smaps".into()))
            .collect()
    })();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    measured
}

fn qemu_one(guest: &Path) -> Result<Sample, String> {
    let (mut child, first_line) = qemu_started(guest)?;
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(100));
    let overhead_kib = common::overhead_kib(pid, GUEST_RAM_MIB);
    let anon = anon_kib(pid, GUEST_RAM_MIB);
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sample {
        cli: Duration::ZERO,
        first_line,
        overhead_kib: overhead_kib.ok_or("qemu: no smaps")?,
        anon_kib: anon.ok_or("qemu: no smaps")?,
        cpu: Duration::ZERO,
    })
}

fn main() {
    let runs = common::runs_arg(5);
    if cocoon_vmm::check_kvm().is_err() {
        eprintln!("bench run: /dev/kvm is not usable");
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
    let o = ours
        .cmd()
        .args(["image", "pull", "--convert", "raw"])
        .arg(&ours.image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let _ = ours.run_one(1000).unwrap();
    if have_qemu {
        let _ = qemu_one(&ours.guest);
    }
    let (mut us, mut them) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let s = ours
            .run_one(i)
            .unwrap_or_else(|e| panic!("ours, run {i}: {e}"));
        eprintln!("ours  run {i}: {s:?}");
        us.push(s);
        if have_qemu {
            let s = qemu_one(&ours.guest).unwrap_or_else(|e| panic!("qemu, run {i}: {e}"));
            eprintln!("qemu  run {i}: {s:?}");
            them.push(s);
        }
    }
    let ms = |v: &[Sample], f: fn(&Sample) -> Duration| {
        common::median(v.iter().map(|s| f(s).as_secs_f64() * 1e3).collect())
    };
    let kib = |v: &[Sample]| common::median(v.iter().map(|s| s.overhead_kib as f64).collect());
    let first = ms(&us, |s| s.first_line);
    let cli = ms(&us, |s| s.cli);
    let mem = kib(&us) / 1024.0;
    let anon =
        |v: &[Sample]| common::median(v.iter().map(|s| s.anon_kib as f64).collect()) / 1024.0;
    let own = anon(&us);
    let cpu = ms(&us, |s| s.cpu);
    println!("BEGIN-RUN-BENCH");
    println!("| measure | cocoon-host | QEMU microvm | ratio | goal |");
    println!("|---|---:|---:|---:|---|");
    if have_qemu {
        let q_first = ms(&them, |s| s.first_line);
        let q_mem = kib(&them) / 1024.0;
        println!(
            "| `run -d` (cached image) → first guest serial line; QEMU: process start → first line (ms) | {first:.1} | {q_first:.1} | {:.2} | < 50 ms: {} |",
            first / q_first,
            if first < 50.0 { "met" } else { "not met" }
        );
        println!(
            "| resident memory beyond guest RAM (MiB) | {mem:.1} | {q_mem:.1} | {:.2} | < 5 MiB: {} |",
            mem / q_mem,
            if mem < 5.0 { "met" } else { "not met" }
        );
        let q_own = anon(&them);
        println!(
            "| of which anonymous (the rest is shared code) (MiB) | {own:.1} | {q_own:.1} | {:.2} | |",
            own / q_own
        );
    } else {
        println!("| `run -d` → first line (ms) | {first:.1} | (no QEMU) | | |");
        println!("| resident memory beyond guest RAM (MiB) | {mem:.1} | (no QEMU) | | |");
        println!(
            "| of which anonymous (the rest is shared code) (MiB) | {own:.1} | (no QEMU) | | |"
        );
    }
    let fleet_mib =
        |v: Vec<u64>| common::median(v.into_iter().map(|k| k as f64).collect()) / 1024.0;
    let ours_fleet = fleet_mib(
        ours.fleet(FLEET)
            .unwrap_or_else(|e| panic!("ours, fleet: {e}")),
    );
    let fleet_row = format!(
        "| with {FLEET} VMs running: each one's private memory beyond guest RAM, the cost of one more VM (MiB) | {ours_fleet:.1} |"
    );
    let fleet_goal = if ours_fleet < 5.0 { "met" } else { "not met" };
    if have_qemu {
        let q = fleet_mib(
            qemu_fleet(&ours.guest, FLEET).unwrap_or_else(|e| panic!("qemu, fleet: {e}")),
        );
        println!(
            "{fleet_row} {q:.1} | {:.2} | < 5 MiB: {fleet_goal} |",
            ours_fleet / q
        );
    } else {
        println!("{fleet_row} (no QEMU) | | < 5 MiB: {fleet_goal} |");
    }
    println!("| ours: `run -d` returned (create + monitor start) (ms) | {cli:.1} | | | |");
    println!("| ours: CPU time of the `run -d` process, user + system (ms) | {cpu:.1} | | | |");
    println!("END-RUN-BENCH");
}
