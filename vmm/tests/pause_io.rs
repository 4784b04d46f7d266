//! Pause quiesces the disk I/O threads: no disk read happens while a VM is
//! paused, and reads go on after resume. Its own test binary, because it
//! finds the I/O thread by name and other tests' VMs would have the same.

mod support;

use std::time::{Duration, Instant};

use cocoon_vmm::{DiskConfig, ExitReason, SerialOutput, Vm, VmConfig};
use support::{kvm_or_skip, test_guest, wait_for_log};

/// Bytes read so far by this process's thread named `name`.
fn thread_rchar(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let task = task.ok()?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let io = std::fs::read_to_string(task.join("io")).ok()?;
            return io
                .lines()
                .find_map(|l| l.strip_prefix("rchar: "))
                .and_then(|v| v.trim().parse().ok());
        }
    }
    None
}

#[test]
fn pause_stops_disk_io_and_resume_restarts_it() {
    if !kvm_or_skip("pause quiesces disk I/O") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("big.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let log = dir.path().join("serial.log");
    let mut config = VmConfig::new(test_guest());
    config.disks.push(DiskConfig::new(&disk));
    // Far more than the test lets it read: the guest is reading throughout.
    config.cmdline = "cocoon.seqread=0:4G".into();
    config.serial = SerialOutput::File(log.clone());
    let mut vm = Vm::start(config).unwrap();
    wait_for_log(&log, "the disk probe", |s| {
        s.contains("cocoon-guest: disk ")
    });
    let t0 = Instant::now();
    while thread_rchar("virtio-blk0").unwrap_or(0) < (8 << 20) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the guest never read"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for round in 0..10 {
        vm.pause();
        let at_pause = thread_rchar("virtio-blk0").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            thread_rchar("virtio-blk0").unwrap(),
            at_pause,
            "round {round}: the disk thread read while paused"
        );
        vm.resume();
        let t0 = Instant::now();
        while thread_rchar("virtio-blk0").unwrap() == at_pause {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: no disk I/O after resume"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}
