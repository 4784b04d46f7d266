//! Shared by the integration tests: the KVM gate, the test guest build,
//! booting with a captured serial log, and parsing the guest's report.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cocoon_vmm::{ExitReason, SerialOutput, Vm, VmConfig};

/// Whether a test that needs /dev/kvm may run. Without KVM it skips with a
/// printed reason, unless COCOON_REQUIRE_KVM=1, where it fails.
pub fn kvm_or_skip(test: &str) -> bool {
    let reason = match cocoon_vmm::check_kvm() {
        Ok(()) => return true,
        Err(e) => {
            let mut msg = format!("KVM is not usable: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        }
    };
    if std::env::var("COCOON_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: {reason} (and COCOON_REQUIRE_KVM=1)");
    }
    eprintln!("SKIPPED {test}: {reason}");
    false
}

pub fn require_kvm() -> bool {
    std::env::var("COCOON_REQUIRE_KVM").as_deref() == Ok("1")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The directory beside this build's target directory where the guest is
/// built (it has its own target, profile and workspace).
fn guest_target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    target.with_file_name(format!("{name}-guest"))
}

/// Builds the test guest once per test binary and returns its path.
pub fn test_guest() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let root = repo_root();
            let target_dir = guest_target_dir();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // From inside tests/guest so that its .cargo/config.toml applies;
            // host RUSTFLAGS must not leak into a no_std target build.
            let status = Command::new(cargo)
                .current_dir(root.join("tests/guest"))
                .args(["build", "--release", "--manifest-path"])
                .arg(root.join("tests/guest/Cargo.toml"))
                .args(["--target", "x86_64-unknown-none"])
                .env("CARGO_TARGET_DIR", &target_dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("CARGO_BUILD_TARGET")
                .status()
                .expect("run cargo to build the test guest");
            assert!(status.success(), "building the test guest failed");
            let path = target_dir.join("x86_64-unknown-none/release/cocoon-test-guest");
            assert!(path.is_file(), "no test guest at {}", path.display());
            path
        })
        .clone()
}

/// Boots `config` with COM1 in a log file, waits up to `timeout` for the
/// guest to stop by itself (stopping it otherwise), and returns the exit
/// reason and everything the guest printed.
pub fn run_vm(mut config: VmConfig, timeout: Duration) -> (ExitReason, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    config.serial = SerialOutput::File(log.clone());
    let mut vm = Vm::start(config).expect("start the VM");
    if vm.wait_timeout(timeout).is_none() {
        vm.stop();
    }
    let reason = vm.wait();
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    (reason, out)
}

/// The guest's report lines (without the `cocoon-guest: ` prefix).
pub fn report(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("cocoon-guest: "))
        .map(str::to_string)
        .collect()
}

/// The `key=value` fields of the report lines starting with `kind `.
pub fn fields(report: &[String], kind: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    report
        .iter()
        .filter_map(|l| l.strip_prefix(kind).and_then(|r| r.strip_prefix(' ')))
        .map(|rest| {
            rest.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Deterministic, disk-specific contents (xorshift), so hashes differ.
pub fn disk_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Where `scripts/fetch-linux-kernel` leaves the uncompressed kernel.
pub fn linux_cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("COCOON_LINUX_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/cocoon-host/linux")
}

/// Runs `scripts/fetch-linux-kernel` (idempotent) and returns the vmlinux.
pub fn fetch_linux() -> Result<PathBuf, String> {
    let dir = linux_cache_dir();
    let vmlinux = dir.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-linux-kernel"))
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run scripts/fetch-linux-kernel: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/fetch-linux-kernel failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if vmlinux.is_file() {
        Ok(vmlinux)
    } else {
        Err(format!(
            "scripts/fetch-linux-kernel left no {}",
            vmlinux.display()
        ))
    }
}

/// Polls the serial log at `log` until `pred` holds (60 s at most) and
/// returns what it read.
pub fn wait_for_log(log: &std::path::Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if pred(&s) {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {s}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `count` lines of a serial log (`cocoon.count`): (n, tsc), in order.
pub fn count_lines(log: &str) -> Vec<(u64, u64)> {
    fields(&report(log), "count")
        .iter()
        .filter_map(|f| Some((f.get("n")?.parse().ok()?, f.get("tsc")?.parse().ok()?)))
        .collect()
}

/// The `count n=` values of a serial log, in order.
pub fn counts(log: &str) -> Vec<u64> {
    count_lines(log).into_iter().map(|(n, _)| n).collect()
}
