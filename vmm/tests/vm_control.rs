//! The VM handle: pause and resume hold a running guest still and let it
//! go on; stop ends it with the host-request reason.

mod support;

use std::time::{Duration, Instant};

use cocoon_vmm::{DiskConfig, ExitReason, SerialOutput, Vm, VmConfig};
use support::{counts, kvm_or_skip, report, test_guest, wait_for_log};

#[test]
fn pause_holds_the_guest_and_resume_lets_it_finish() {
    if !kvm_or_skip("pause/resume") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("big.img");
    let f = std::fs::File::create(&disk).unwrap();
    // Sparse: reads cost no host disk. 64 MiB takes the guest well under
    // the pause below, so a pause that did not hold would show.
    f.set_len(64 << 20).unwrap();
    let log = dir.path().join("serial.log");
    let mut config = VmConfig::new(test_guest());
    config.disks.push(DiskConfig::new(&disk));
    config.cmdline = "cocoon.seqread=0:67108864".into();
    config.serial = SerialOutput::File(log.clone());
    let mut vm = Vm::start(config).unwrap();

    // Pause as soon as the guest is under way.
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("cocoon-guest: start")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "guest never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause();
    assert!(vm.is_paused());
    let frozen = std::fs::read_to_string(&log).unwrap();
    assert!(
        !frozen.contains("done"),
        "the guest finished before the pause: {frozen}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        frozen,
        "output while paused"
    );
    assert_eq!(vm.exit_reason(), None);
    vm.resume();
    let reason = vm.wait_timeout(Duration::from_secs(60));
    assert_eq!(reason, Some(ExitReason::PowerOff));
    assert_eq!(vm.wait(), ExitReason::PowerOff);
    let out = std::fs::read_to_string(&log).unwrap();
    let lines = report(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("seqread index=0 bytes=67108864")),
        "{out}"
    );
    assert!(lines.iter().any(|l| l == "done disks=1"), "{out}");
}

#[test]
fn stop_is_reported_as_host_request() {
    if !kvm_or_skip("host stop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("big.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let mut config = VmConfig::new(test_guest());
    config.disks.push(DiskConfig::new(&disk));
    // Long enough that the guest is still reading when we stop it.
    config.cmdline = "cocoon.seqread=0:1073741824".into();
    let mut vm = Vm::start(config).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.stop();
    let t0 = Instant::now();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_kernel_that_is_not_there_is_an_error() {
    if !kvm_or_skip("missing kernel") {
        return;
    }
    let e = Vm::start(VmConfig::new("/nonexistent/kernel"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("cannot load the kernel"), "{e}");
}

#[test]
fn many_pauses_each_take_one_kick_and_hold_the_guest() {
    if !kvm_or_skip("pause latency") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut config = VmConfig::new(test_guest());
    config.cpus = 2;
    config.cmdline = "cocoon.count=10:0".into();
    config.serial = SerialOutput::File(log.clone());
    let mut vm = Vm::start(config).unwrap();
    wait_for_log(&log, "first count", |s| !counts(s).is_empty());

    let mut latencies = Vec::new();
    std::thread::scope(|s| {
        for i in 0..100u32 {
            // Pause at varying points of the guest's work, including right
            // after a resume, where a kick lost before KVM_RUN used to hide.
            std::thread::sleep(Duration::from_micros(u64::from(i % 10) * 700));
            let (tx, rx) = std::sync::mpsc::channel();
            let vm = &vm;
            s.spawn(move || {
                let t0 = Instant::now();
                vm.pause();
                tx.send(t0.elapsed()).unwrap();
            });
            let took = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("pause {i} did not return within 10 s"));
            latencies.push(took);
            assert!(vm.is_paused());
            if i % 25 == 0 {
                // Held: nothing is printed while paused.
                let before = std::fs::read_to_string(&log).unwrap();
                std::thread::sleep(Duration::from_millis(150));
                assert_eq!(std::fs::read_to_string(&log).unwrap(), before, "pause {i}");
            }
            vm.resume();
        }
    });
    latencies.sort();
    eprintln!(
        "pause latency over {} pauses: median {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    // The guest went on counting, one by one, across every pause.
    let before = counts(&std::fs::read_to_string(&log).unwrap());
    let last = *before.last().unwrap();
    let after = wait_for_log(&log, "counting after the pauses", |s| {
        counts(s).last().is_some_and(|&n| n >= last + 3)
    });
    let all = counts(&after);
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "counter skipped or repeated: {all:?}"
    );
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}

#[test]
fn memory_above_the_hosts_ram_is_refused_before_kvm() {
    // No KVM and no kernel needed: the check comes before both.
    let mut config = VmConfig::new("/nonexistent/kernel");
    config.memory = 1 << 40;
    let e = Vm::start(config).err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains("1099511627776 bytes") && text.contains("MemTotal"),
        "{text}"
    );
}
