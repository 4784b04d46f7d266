//! Shared by the benchmarks: building the test guest, medians.

// Each bench binary uses a different subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn build_guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let target_dir = target.with_file_name(format!("{name}-guest"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .current_dir(root.join("tests/guest"))
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--manifest-path",
        ])
        .arg(root.join("tests/guest/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run cargo")
        .success();
    assert!(ok, "building the test guest failed");
    target_dir.join("x86_64-unknown-none/release/cocoon-test-guest")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `--runs N` from the command line, or `default`.
pub fn runs_arg(default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether KVM can run the guest here (else says so and the bench ends)
/// and whether QEMU is there to compare with.
pub fn preflight() -> Option<bool> {
    if let Err(e) = cocoon_vmm::check_kvm() {
        eprintln!("SKIPPED: {e}");
        return None;
    }
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_qemu {
        eprintln!("qemu-system-x86_64 is missing (scripts/install-deps): measuring ours only");
    }
    Some(have_qemu)
}

/// Runs `config` as this process's VM and exits: 0 on guest power-off, 1
/// on another stop, 2 when it cannot start.
pub fn run_vmm_process(config: cocoon_vmm::VmConfig) -> ! {
    let reason = cocoon_vmm::Vm::start(config).map(|mut vm| vm.wait());
    std::process::exit(match reason {
        Ok(cocoon_vmm::ExitReason::PowerOff) => 0,
        Ok(r) => {
            eprintln!("vmm: {r}");
            1
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            2
        }
    });
}

/// Resident KiB of process `pid` minus the resident part of its guest RAM
/// mapping(s): every mapping at least as large as guest RAM.
pub fn overhead_kib(pid: u32, guest_ram_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest, mut size_kib) = (0u64, 0u64, 0u64);
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Size:"), Some(v)) => size_kib = v.parse().ok()?,
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().ok()?;
                total += rss;
                if size_kib >= guest_ram_mib * 1024 {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Some(total - guest)
}
