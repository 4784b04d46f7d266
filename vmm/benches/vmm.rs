//! Side-by-side with QEMU's microvm, booting the same test guest in the same
//! run: process start to the guest's first serial line, a sequential read
//! of a 256 MiB disk inside the guest, and the VMM's resident memory beyond
//! guest RAM. Prints each ours/QEMU ratio, and a Markdown table on stdout
//! (between BEGIN/END markers) for `scripts/bench-vmm` to record.
//!
//! `cargo bench -p cocoon-vmm --bench vmm [-- --runs N]`
//!
//! Our side is this same binary re-executed as a VMM process (env
//! COCOON_BENCH_VMM=1), so both sides pay a process start.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cocoon_vmm::{DiskConfig, SerialOutput, VmConfig};

mod common;
use common::{build_guest, median, preflight, run_vmm_process, runs_arg};

const GUEST_RAM_MIB: u64 = 128;
const DISK_BYTES: u64 = 256 << 20;
const CMDLINE: &str = "cocoon.seqread=0:268435456";
const TIMEOUT: Duration = Duration::from_secs(120);

/// Our VMM as a process: `KERNEL DISK` in argv, COM1 on stdout.
fn vmm_main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let mut config = VmConfig::new(&args[1]);
    config.memory = GUEST_RAM_MIB << 20;
    config.cmdline = CMDLINE.into();
    config.disks.push(DiskConfig::new(&args[2]));
    config.serial = SerialOutput::Stdout;
    run_vmm_process(config)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    first_line: Duration,
    seqread_mib_s: f64,
    overhead_kib: u64,
}

fn run_one(mut cmd: Command) -> Result<Sample, String> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(0u64));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(kib) = common::overhead_kib(pid, GUEST_RAM_MIB) {
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(kib);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let stdout = child.stdout.take().unwrap();
    let mut first_line = None;
    let mut seqread = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if first_line.is_none() && line.starts_with("cocoon-guest: ") {
            first_line = Some(t0.elapsed());
        }
        if let Some(rest) = line.strip_prefix("cocoon-guest: seqread ") {
            let field = |k: &str| {
                rest.split(' ')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if let (Some(bytes), Some(ns)) = (field("bytes="), field("ns=")) {
                seqread = Some(bytes / (1 << 20) as f64 / (ns / 1e9));
            }
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = *peak.lock().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    Ok(Sample {
        first_line: first_line.ok_or_else(|| format!("no serial line; stderr: {err}"))?,
        seqread_mib_s: seqread.ok_or_else(|| format!("no seqread line; stderr: {err}"))?,
        overhead_kib: peak,
    })
}

fn ours(guest: &Path, disk: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env("COCOON_BENCH_VMM", "1").arg(guest).arg(disk);
    c
}

fn qemu(guest: &Path, disk: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-m"])
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
        .args(["-append", CMDLINE, "-drive"])
        .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    c
}

fn main() {
    if std::env::var("COCOON_BENCH_VMM").is_ok() {
        vmm_main();
    }
    let runs = runs_arg(5);
    let Some(have_qemu) = preflight() else {
        return;
    };
    let guest = build_guest();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    // Real data, not a sparse file, read once so both sides hit the page
    // cache alike.
    std::fs::write(
        &disk,
        vec![0x5au8; cocoon_vmm::cast::usize_from(DISK_BYTES)],
    )
    .unwrap();

    let mut o = Vec::new();
    let mut q = Vec::new();
    // One warm-up each, then alternate so drift hits both alike.
    let _ = run_one(ours(&guest, &disk));
    if have_qemu {
        let _ = run_one(qemu(&guest, &disk));
    }
    for i in 0..runs {
        let s = run_one(ours(&guest, &disk)).unwrap_or_else(|e| panic!("ours, run {i}: {e}"));
        eprintln!("ours  run {i}: {s:?}");
        o.push(s);
        if have_qemu {
            let s = run_one(qemu(&guest, &disk)).unwrap_or_else(|e| panic!("qemu, run {i}: {e}"));
            eprintln!("qemu  run {i}: {s:?}");
            q.push(s);
        }
    }
    let start = |v: &[Sample]| median(v.iter().map(|s| s.first_line.as_secs_f64() * 1e3).collect());
    let read = |v: &[Sample]| median(v.iter().map(|s| s.seqread_mib_s).collect());
    let rss = |v: &[Sample]| median(v.iter().map(|s| s.overhead_kib as f64 / 1024.0).collect());
    let rows: [(&str, f64, Option<f64>, &str); 3] = [
        (
            "process start → first guest serial line (ms)",
            start(&o),
            (!q.is_empty()).then(|| start(&q)),
            "lower is better",
        ),
        (
            "sequential read of 256 MiB in the guest (MiB/s)",
            read(&o),
            (!q.is_empty()).then(|| read(&q)),
            "higher is better",
        ),
        (
            "VMM resident memory beyond guest RAM (MiB)",
            rss(&o),
            (!q.is_empty()).then(|| rss(&q)),
            "lower is better",
        ),
    ];
    println!("BEGIN-VMM-BENCH");
    println!("| metric (median of {runs}) | cocoon-vmm | QEMU microvm | ours/QEMU | |");
    println!("|---|---:|---:|---:|---|");
    for (name, ours, qemu, better) in rows {
        match qemu {
            Some(qv) => println!(
                "| {name} | {ours:.1} | {qv:.1} | {:.2} | {better} |",
                ours / qv
            ),
            None => println!("| {name} | {ours:.1} | n/a | n/a | {better} |"),
        }
    }
    println!("END-VMM-BENCH");
}
