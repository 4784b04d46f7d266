//! An idle guest costs its host next to nothing: the test guest, counting
//! with `cocoon.count` (so it waits nearly all the time), halts its vCPU
//! between timer interrupts instead of spinning. Its vCPU thread's CPU time
//! over a second of wall time, read from /proc, is far below that second;
//! so is that of the same guest restored from a snapshot (a clone).
//!
//! Not a performance benchmark: it asserts the guest halts. One test in this
//! binary, so that no other VM's threads are counted.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_vmm::snapshot::{RestoreConfig, MEMORY_FILE, STATE_FILE};
use cocoon_vmm::{ExitReason, SerialOutput, Vm, VmConfig};
use support::{counts, kvm_or_skip, report, test_guest, wait_for_log};

/// The busiest the vCPU may be while its guest waits: a spinning guest
/// keeps it at 100%.
const MAX_BUSY: f64 = 0.30;
/// The count period: most of it is a wait.
const PERIOD_MS: u64 = 50;

/// This process's threads named `name` (a vCPU thread is `vcpuN`).
fn threads_named(prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let tid = entry.unwrap().file_name().to_string_lossy().into_owned();
        let comm =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            out.push(tid);
        }
    }
    out
}

/// utime + stime of `/proc/<stat>` in seconds (fields 14 and 15, after the
/// parenthesised command name, which may hold spaces).
fn cpu_seconds(stat: &Path) -> f64 {
    let text = std::fs::read_to_string(stat).unwrap();
    let after = &text[text.rfind(')').expect("a comm in stat") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    ticks as f64 / hz as f64
}

fn vcpu_seconds(tids: &[String]) -> f64 {
    tids.iter()
        .map(|t| cpu_seconds(Path::new(&format!("/proc/self/task/{t}/stat"))))
        .sum()
}

/// Measures `vm`'s vCPU thread and this process over a second while its
/// guest counts into `log`, and asserts both stayed well below busy.
fn assert_idles(what: &str, vm: &Vm, log: &Path, tsc_line: &str) {
    let vcpus = threads_named("vcpu");
    assert_eq!(vcpus.len(), 1, "{what}: one vCPU thread: {vcpus:?}");
    let (vcpu0, process0) = (
        vcpu_seconds(&vcpus),
        cpu_seconds(Path::new("/proc/self/stat")),
    );
    let n0 = counts(&std::fs::read_to_string(log).unwrap()).len();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let wall = t0.elapsed().as_secs_f64();
    let (vcpu1, process1) = (
        vcpu_seconds(&vcpus),
        cpu_seconds(Path::new("/proc/self/stat")),
    );
    let out = std::fs::read_to_string(log).unwrap();
    let ticks = counts(&out).len() - n0;

    let vcpu_busy = (vcpu1 - vcpu0) / wall;
    let process_busy = (process1 - process0) / wall;
    eprintln!(
        "idle, {what}: {ticks} count lines in {wall:.2} s; vCPU thread busy {:.1}%, whole process {:.1}% ({tsc_line})",
        vcpu_busy * 100.0,
        process_busy * 100.0
    );
    // It was counting all along: the measurement is of a running guest,
    // not of one that stopped.
    assert!(
        ticks >= 5,
        "{what}: only {ticks} count lines in {wall:.2} s: {out}"
    );
    assert!(vm.exit_reason().is_none(), "{what}: the VM stopped: {out}");
    assert!(
        tsc_line.contains(" idle=hlt-"),
        "the guest found no APIC timer to halt with: {tsc_line}"
    );
    assert!(
        vcpu_busy < MAX_BUSY,
        "{what}: the vCPU thread was busy {:.1}% of {wall:.2} s while its guest waited",
        vcpu_busy * 100.0
    );
    assert!(
        process_busy < MAX_BUSY,
        "{what}: the VM's process was busy {:.1}% of {wall:.2} s while its guest waited",
        process_busy * 100.0
    );
}

#[test]
fn a_counting_guest_halts_between_ticks_and_so_does_its_clone() {
    if !kvm_or_skip("idle: a counting guest halts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, log2) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut config = VmConfig::new(test_guest());
    config.cmdline = format!("cocoon.count={PERIOD_MS}:0");
    config.serial = SerialOutput::File(log.clone());
    let mut vm = Vm::start(config).expect("start the VM");
    let s = wait_for_log(&log, "three count lines", |s| counts(s).len() >= 3);
    let tsc_line = report(&s)
        .into_iter()
        .find(|l| l.starts_with("tsc "))
        .expect("a tsc line");
    assert_idles("booted", &vm, &log, &tsc_line);

    // A clone: restored from a snapshot of it, the source gone.
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    vm.pause();
    vm.snapshot(&snap).expect("snapshot");
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    let mut clone = Vm::restore(RestoreConfig {
        state: snap.join(STATE_FILE),
        memory: snap.join(MEMORY_FILE),
        disks: Vec::new(),
        nets: Vec::new(),
        serial: SerialOutput::File(log2.clone()),
    })
    .expect("restore");
    wait_for_log(&log2, "three count lines after the restore", |s| {
        counts(s).len() >= 3
    });
    assert_idles("restored", &clone, &log2, &tsc_line);
    clone.stop();
    assert_eq!(clone.wait(), ExitReason::HostRequest);
}
