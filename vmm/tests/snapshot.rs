//! Snapshots with the test guest: a counter in guest memory goes on after
//! restore, data written to a disk before the snapshot is there after it,
//! two restores of one snapshot run side by side on their own disk copies,
//! a restored VM snapshots again, and damaged snapshots are refused, each
//! with its own error, before KVM is touched.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_vmm::snapshot::{
    self, format, RestoreConfig, RestoreError, SnapshotError, StateFileError, MEMORY_FILE,
    STATE_FILE,
};
use cocoon_vmm::{DiskConfig, ExitReason, SerialOutput, Vm, VmConfig};
use sha2::{Digest, Sha256};
use support::{count_lines, counts, kvm_or_skip, report, sparse_file, test_guest, wait_for_log};

/// Boots the test guest with `cmdline` (and `disks`), COM1 in `log`.
fn boot(cmdline: &str, disks: &[PathBuf], log: &Path) -> Vm {
    boot_cpus(1, cmdline, disks, log)
}

fn boot_cpus(cpus: u8, cmdline: &str, disks: &[PathBuf], log: &Path) -> Vm {
    let mut config = VmConfig::new(test_guest());
    config.cpus = cpus;
    config.cmdline = cmdline.into();
    config.disks = disks.iter().map(DiskConfig::new).collect();
    config.serial = SerialOutput::File(log.to_path_buf());
    Vm::start(config).expect("start the VM")
}

fn restore(dir: &Path, disks: &[PathBuf], log: &Path) -> Result<Vm, RestoreError> {
    Vm::restore(RestoreConfig {
        state: dir.join(STATE_FILE),
        memory: dir.join(MEMORY_FILE),
        disks: disks.iter().map(DiskConfig::new).collect(),
        nets: Vec::new(),
        serial: SerialOutput::File(log.to_path_buf()),
    })
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until the log's counter reaches `n`.
fn wait_count(log: &Path, n: u64) -> String {
    wait_for_log(log, &format!("count {n}"), |s| {
        counts(s).last().is_some_and(|&c| c >= n)
    })
}

fn assert_consecutive(what: &str, counts: &[u64]) {
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: counter skipped or repeated: {counts:?}"
    );
}

/// Pauses `vm`, snapshots it into `dir` and returns the last count it
/// printed.
fn pause_and_snapshot(vm: &Vm, dir: &Path, log: &Path) -> (u64, u64) {
    vm.pause();
    let info = vm.snapshot(dir).expect("snapshot");
    assert_eq!(info.version, snapshot::FORMAT_VERSION);
    assert_eq!(info.memory_bytes, vm.memory_bytes());
    assert!(info.memory_data_bytes > 0 && info.memory_data_bytes < info.memory_bytes);
    *count_lines(&read(log))
        .last()
        .expect("a count before the snapshot")
}

#[test]
fn the_counter_goes_on_after_restore() {
    if !kvm_or_skip("snapshot: counter") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, log2) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    // Two vCPUs: the second waits for a SIPI that never comes, and its
    // state goes through the snapshot too.
    let mut vm = boot_cpus(2, "cocoon.count=20:0", &[], &log);
    wait_count(&log, 5);
    let (last, last_tsc) = pause_and_snapshot(&vm, &snap, &log);
    let (_, state) = format::read(&snap.join(STATE_FILE)).unwrap();
    assert_eq!(state.vcpus.len(), 2);
    assert_ne!(
        state.vcpus[0].mp_state.mp_state,
        state.vcpus[1].mp_state.mp_state
    );
    // The TSC, and the TSC deadline KVM emulates, are among the MSRs.
    for index in [0x10, 0x6e0] {
        assert!(
            state.vcpus[0].msrs.iter().any(|m| m.index == index),
            "MSR {index:#x} not saved"
        );
    }
    let memory_bytes = vm.memory_bytes();
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);

    // Into a KVM VM made ahead, as a clone service would.
    let shell = snapshot::VmShell::new(memory_bytes).unwrap();
    let t0 = Instant::now();
    let mut restored = Vm::restore_with_shell(
        shell,
        RestoreConfig {
            state: snap.join(STATE_FILE),
            memory: snap.join(MEMORY_FILE),
            disks: Vec::new(),
            nets: Vec::new(),
            serial: SerialOutput::File(log2.clone()),
        },
    )
    .expect("restore");
    let restore_time = t0.elapsed();
    let out = wait_count(&log2, last + 5);
    let lines = count_lines(&out);
    // The first line is the one after the last the source printed (or the
    // one after that, when the pause fell between increment and print);
    // the TSC goes on from the saved value, not from zero.
    assert_goes_on("restored", &out, lines[0], last, last_tsc);
    eprintln!("restore into a shell took {restore_time:?}");
    restored.stop();
    assert_eq!(restored.wait(), ExitReason::HostRequest);
}

/// The LAPIC register at `offset` of a saved `kvm_lapic_state`.
fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

#[test]
fn a_guest_halted_with_its_timer_armed_goes_on_counting_after_restore() {
    if !kvm_or_skip("snapshot: halted with a timer armed") {
        return;
    }
    const APIC_IRR1: usize = 0x210;
    const APIC_LVTT: usize = 0x320;
    const APIC_TMCCT: usize = 0x390;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    const TIMER_VECTOR: u32 = 0x20;
    const LVT_MASKED: u32 = 1 << 16;
    let dir = tempfile::tempdir().unwrap();
    let (log, log2) = (dir.path().join("a.log"), dir.path().join("b.log"));
    // The guest waits 50 ms between lines, halted with the LAPIC timer
    // armed to wake it. A pause catches it so nearly always; when it caught
    // it printing or polling, resume and try again.
    let mut vm = boot("cocoon.count=50:0", &[], &log);
    wait_count(&log, 3);
    let mut found = None;
    for attempt in 0..20 {
        let snap = dir.path().join(format!("snap{attempt}"));
        std::fs::create_dir(&snap).unwrap();
        let (last, last_tsc) = pause_and_snapshot(&vm, &snap, &log);
        let (_, state) = format::read(&snap.join(STATE_FILE)).unwrap();
        if state.vcpus[0].mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED {
            found = Some((snap, last, last_tsc, state));
            break;
        }
        vm.resume();
        std::thread::sleep(Duration::from_millis(7 * attempt + 3));
    }
    let (snap, last, last_tsc, state) = found.expect("the vCPU was never halted when paused");
    let lvtt = lapic_reg(&state.vcpus[0].lapic, APIC_LVTT);
    assert_eq!(lvtt & 0xff, TIMER_VECTOR, "LVTT {lvtt:#x}");
    assert_eq!(lvtt & LVT_MASKED, 0, "the timer is masked: LVTT {lvtt:#x}");
    // Armed (a deadline or a count to go), or fired with the interrupt
    // waiting in the IRR (bit 0x20: register 1, bit 0).
    let msr = |index| {
        state.vcpus[0]
            .msrs
            .iter()
            .find(|m| m.index == index)
            .map(|m| m.data)
    };
    let irr1 = lapic_reg(&state.vcpus[0].lapic, APIC_IRR1);
    let armed = match (lvtt >> 17) & 0b11 {
        0b10 => msr(MSR_IA32_TSC_DEADLINE).is_some_and(|d| d != 0),
        _ => lapic_reg(&state.vcpus[0].lapic, APIC_TMCCT) != 0,
    };
    assert!(
        armed || irr1 & 1 != 0,
        "halted with no timer armed nor pending: LVTT {lvtt:#x}, deadline {:?}, TSC {:?}",
        msr(MSR_IA32_TSC_DEADLINE),
        msr(MSR_IA32_TSC)
    );
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);

    // Only the timer can wake the restored vCPU: if the restore lost it, the
    // guest stays halted and prints nothing.
    let t0 = Instant::now();
    let mut restored = restore(&snap, &[], &log2).expect("restore");
    while counts(&read(&log2)).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no count line 10 s after the restore: the halted vCPU's timer was lost"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let woke = t0.elapsed();
    let out = wait_count(&log2, last + 5);
    let lines = count_lines(&out);
    assert_goes_on("restored from a halt", &out, lines[0], last, last_tsc);
    eprintln!("restored from a halt: first count line after {woke:?}");
    restored.stop();
    assert_eq!(restored.wait(), ExitReason::HostRequest);
}

/// The restored VM's output `out`, whose first count line is `first`,
/// goes on from the source's last count `last` (or the one after it, when
/// the pause fell between increment and print) at a later TSC, in order,
/// without a reboot.
fn assert_goes_on(what: &str, out: &str, first: (u64, u64), last: u64, last_tsc: u64) {
    let (first, first_tsc) = first;
    assert!(
        first == last + 1 || first == last + 2,
        "source ended at {last}, the restored VM began at {first}: {out}"
    );
    assert!(
        first_tsc > last_tsc,
        "TSC went back: {last_tsc} then {first_tsc}"
    );
    assert_consecutive(what, &counts(out));
    assert!(
        !out.contains("cocoon-guest: start"),
        "the guest rebooted: {out}"
    );
}

fn sha256_of_sector(byte: u8) -> String {
    hex::encode(Sha256::digest([byte; 512]))
}

fn sector(disk: &Path, n: u64) -> Vec<u8> {
    let data = std::fs::read(disk).unwrap();
    let n = cocoon_vmm::cast::usize_from(n);
    data[n * 512..(n + 1) * 512].to_vec()
}

#[test]
fn disk_data_survives_and_two_clones_run_side_by_side_on_their_own_copies() {
    if !kvm_or_skip("snapshot: disks and clones") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse_file(dir.path(), "disk.img", 1 << 20);
    let log = dir.path().join("source.log");
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    // Write, count (the snapshot window), then read back and write again.
    let cmdline = "cocoon.write=0:4:5a cocoon.count=20:60 cocoon.hash=0:4:1 cocoon.write=0:8:c3";
    let mut vm = boot(cmdline, std::slice::from_ref(&disk), &log);
    wait_count(&log, 3);
    assert!(report(&read(&log)).contains(&"write index=0 sector=4 byte=5a outcome=ok".to_string()));
    let (last, _) = pause_and_snapshot(&vm, &snap, &log);
    // The host's part: a copy of the writable disk inside the pause window.
    let snap_disk = snap.join("disk.img");
    std::fs::copy(&disk, &snap_disk).unwrap();
    vm.stop();
    vm.wait();

    // Two clones, each on its own copy, at once.
    let copies: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| {
            let p = dir.path().join(format!("clone-{n}.img"));
            std::fs::copy(&snap_disk, &p).unwrap();
            p
        })
        .collect();
    let logs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| dir.path().join(format!("clone-{n}.log")))
        .collect();
    let mut clones: Vec<Vm> = copies
        .iter()
        .zip(&logs)
        .map(|(copy, log)| restore(&snap, std::slice::from_ref(copy), log).expect("restore"))
        .collect();
    // Both count at the same time: each has printed lines while neither has
    // finished.
    for l in &logs {
        wait_count(l, last + 2);
    }
    assert!(clones.iter().all(|c| c.exit_reason().is_none()));
    for (clone, l) in clones.iter_mut().zip(&logs) {
        assert_eq!(
            clone.wait_timeout(Duration::from_secs(60)),
            Some(ExitReason::PowerOff)
        );
        let out = read(l);
        let lines = report(&out);
        assert_eq!(counts(&out).last(), Some(&60), "{out}");
        let want = format!(
            "hash index=0 sector=4 count=1 sha256={}",
            sha256_of_sector(0x5a)
        );
        assert!(
            lines.contains(&want),
            "written before the snapshot, read after: {out}"
        );
        assert!(
            lines.contains(&"write index=0 sector=8 byte=c3 outcome=ok".to_string()),
            "{out}"
        );
        assert!(!lines.iter().any(|l| l.starts_with("error")), "{out}");
    }
    // Each clone wrote its own copy; the snapshot's disk and the source's
    // were not written.
    for copy in &copies {
        assert_eq!(sector(copy, 8), vec![0xc3; 512]);
        assert_eq!(sector(copy, 4), vec![0x5a; 512]);
    }
    assert_eq!(sector(&snap_disk, 8), vec![0; 512]);
    assert_eq!(sector(&disk, 8), vec![0; 512]);
}

#[test]
fn a_restored_vm_snapshots_again_into_its_own_directory() {
    if !kvm_or_skip("snapshot: again") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let logs: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("{i}.log")))
        .collect();
    let mut source = boot("cocoon.count=20:0", &[], &logs[0]);
    wait_count(&logs[0], 3);
    let (first, _) = pause_and_snapshot(&source, &snap, &logs[0]);
    source.stop();
    source.wait();

    let mut a = restore(&snap, &[], &logs[1]).expect("restore");
    wait_count(&logs[1], first + 5);
    // Into the directory whose memory file `a` runs on: the rename leaves
    // `a`'s mapping on the old file.
    let (second, _) = pause_and_snapshot(&a, &snap, &logs[1]);
    assert!(second >= first + 5);
    a.resume();
    let out = wait_count(&logs[1], second + 5);
    assert_consecutive("resumed after its own snapshot", &counts(&out));

    let mut b = restore(&snap, &[], &logs[2]).expect("restore the second snapshot");
    let out = wait_count(&logs[2], second + 3);
    let c = counts(&out);
    assert!(
        c[0] == second + 1 || c[0] == second + 2,
        "{second} then {c:?}"
    );
    assert_consecutive("restored twice", &c);
    for vm in [&mut a, &mut b] {
        vm.stop();
        assert_eq!(vm.wait(), ExitReason::HostRequest);
    }
}

/// A real snapshot of a guest with one 1 MiB disk, taken once for the
/// tampering tests: (tempdir, snapshot dir, the disk copy).
fn one_snapshot() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse_file(dir.path(), "disk.img", 1 << 20);
    let log = dir.path().join("source.log");
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let mut vm = boot("cocoon.count=20:0", std::slice::from_ref(&disk), &log);
    wait_count(&log, 2);
    // A running VM is not snapshotted.
    assert!(matches!(vm.snapshot(&snap), Err(SnapshotError::NotPaused)));
    pause_and_snapshot(&vm, &snap, &log);
    vm.stop();
    vm.wait();
    (dir, snap, disk)
}

/// A copy of the snapshot in `snap` with its state file replaced by `state`.
fn tampered(root: &Path, name: &str, snap: &Path, state: &[u8]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(STATE_FILE), state).unwrap();
    std::os::unix::fs::symlink(snap.join(MEMORY_FILE), dir.join(MEMORY_FILE)).unwrap();
    dir
}

#[test]
fn damaged_snapshots_are_refused_each_with_its_own_error() {
    if !kvm_or_skip("snapshot: damaged") {
        return;
    }
    let (root, snap, disk) = one_snapshot();
    let root = root.path();
    let good = std::fs::read(snap.join(STATE_FILE)).unwrap();
    let disks = std::slice::from_ref(&disk);
    let log = root.join("restore.log");

    // The preflight reads the good one without KVM.
    let summary = snapshot::verify_state(&snap.join(STATE_FILE)).unwrap();
    assert_eq!(summary.disks.len(), 1);
    assert_eq!(summary.disks[0].capacity_bytes, 1 << 20);
    snapshot::check_memory_file(&snap.join(MEMORY_FILE), &summary).unwrap();

    let payload = &good[format::HEADER_LEN..good.len() - format::CHECKSUM_LEN];
    let mut flipped = good.clone();
    flipped[format::HEADER_LEN + payload.len() / 3] ^= 0x01;
    let next_major = format::FormatVersion {
        major: snapshot::FORMAT_VERSION.major + 1,
        minor: 0,
        patch: 0,
    };
    type Case = (&'static str, Vec<u8>, fn(&StateFileError) -> bool);
    let cases: Vec<Case> = vec![
        ("truncated", good[..good.len() - 100].to_vec(), |e| {
            matches!(e, StateFileError::Truncated { .. })
        }),
        ("flipped", flipped, |e| {
            matches!(e, StateFileError::Checksum { .. })
        }),
        (
            "major",
            format::encode_payload(next_major, payload).unwrap(),
            |e| matches!(e, StateFileError::UnsupportedVersion { .. }),
        ),
    ];
    for (name, bytes, is) in cases {
        let dir = tampered(root, name, &snap, &bytes);
        let pre = snapshot::verify_state(&dir.join(STATE_FILE)).unwrap_err();
        assert!(is(&pre), "{name}: preflight said {pre}");
        match restore(&dir, disks, &log) {
            Err(RestoreError::State(e)) => {
                assert!(is(&e), "{name}: restore said {e}");
                let file = dir.join(STATE_FILE).display().to_string();
                assert!(e.to_string().contains(&file), "{name}: {e}");
            }
            Err(e) => panic!("{name}: wrong error {e}"),
            Ok(_) => panic!("{name}: restored"),
        }
    }

    // Disks that do not fit the snapshot.
    let other = sparse_file(root, "other.img", 2 << 20);
    let e = restore(&snap, &[], &log).err().unwrap();
    assert!(
        matches!(e, RestoreError::DiskCount { saved: 1, given: 0 }),
        "{e}"
    );
    let e = restore(&snap, &[disk.clone(), disk.clone()], &log)
        .err()
        .unwrap();
    assert!(
        matches!(e, RestoreError::DiskCount { saved: 1, given: 2 }),
        "{e}"
    );
    let e = restore(&snap, std::slice::from_ref(&other), &log)
        .err()
        .unwrap();
    assert!(matches!(e, RestoreError::Disk { index: 0, .. }), "{e}");
    let mut ro = DiskConfig::new(&disk);
    ro.read_only = true;
    let e = Vm::restore(RestoreConfig {
        state: snap.join(STATE_FILE),
        memory: snap.join(MEMORY_FILE),
        disks: vec![ro],
        nets: Vec::new(),
        serial: SerialOutput::Sink,
    })
    .err()
    .unwrap();
    assert!(
        matches!(e, RestoreError::DiskReadOnly { index: 0, .. }),
        "{e}"
    );

    // A memory file of the wrong size.
    let short = tampered(root, "short-memory", &snap, &good);
    std::fs::remove_file(short.join(MEMORY_FILE)).unwrap();
    let f = std::fs::File::create(short.join(MEMORY_FILE)).unwrap();
    f.set_len(summary.memory_bytes - 4096).unwrap();
    let e = restore(&short, disks, &log).err().unwrap();
    assert!(matches!(e, RestoreError::MemoryFileSize { .. }), "{e}");

    // A shell of another size.
    let shell = snapshot::VmShell::new(summary.memory_bytes * 2).unwrap();
    let e = Vm::restore_with_shell(
        shell,
        RestoreConfig {
            state: snap.join(STATE_FILE),
            memory: snap.join(MEMORY_FILE),
            disks: vec![DiskConfig::new(&disk)],
            nets: Vec::new(),
            serial: SerialOutput::Sink,
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, RestoreError::ShellSize { .. }), "{e}");

    // After all that, the snapshot still restores.
    let mut vm = restore(&snap, disks, &log).expect("the good snapshot restores");
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}

#[test]
fn a_tsc_rate_this_host_cannot_run_is_refused_naming_both() {
    if !kvm_or_skip("snapshot: TSC rate") {
        return;
    }
    let (root, snap, disk) = one_snapshot();
    let good = std::fs::read(snap.join(STATE_FILE)).unwrap();
    let (_, mut state) = format::decode("state", &good).unwrap();
    let host = state.tsc_khz.expect("KVM reports the TSC rate here");
    state.tsc_khz = Some(host / 2);
    let dir = tampered(root.path(), "tsc", &snap, &format::encode(&state).unwrap());
    let can_scale = kvm_ioctls::Kvm::new()
        .unwrap()
        .check_extension(kvm_ioctls::Cap::TscControl);
    let r = restore(&dir, std::slice::from_ref(&disk), &root.path().join("log"));
    if can_scale {
        let mut vm = r.expect("scaled");
        vm.stop();
        vm.wait();
    } else {
        let e = r.err().expect("refused");
        let text = e.to_string();
        assert!(matches!(e, RestoreError::Tsc(_)), "{text}");
        assert!(
            text.contains(&format!("{} kHz", host / 2)) && text.contains(&format!("{host} kHz")),
            "{text}"
        );
    }
}

#[test]
fn eight_restores_of_one_snapshot_run_at_once() {
    if !kvm_or_skip("snapshot: eight restores") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let log = dir.path().join("source.log");
    let mut source = boot("cocoon.count=20:0", &[], &log);
    wait_count(&log, 2);
    let (last, _) = pause_and_snapshot(&source, &snap, &log);
    source.stop();
    source.wait();

    let t0 = Instant::now();
    let logs: Vec<PathBuf> = (0..8)
        .map(|i| dir.path().join(format!("r{i}.log")))
        .collect();
    let mut vms: Vec<Vm> = logs
        .iter()
        .map(|l| restore(&snap, &[], l).expect("restore"))
        .collect();
    let started = t0.elapsed();
    for l in &logs {
        let out = wait_count(l, last + 3);
        let c = counts(&out);
        assert!(c[0] == last + 1 || c[0] == last + 2, "{last} then {c:?}");
        assert_consecutive("one of eight", &c);
    }
    eprintln!(
        "8 restores: all started in {started:?}, all counting in {:?}",
        t0.elapsed()
    );
    for vm in &mut vms {
        vm.stop();
        assert_eq!(vm.wait(), ExitReason::HostRequest);
    }
}
