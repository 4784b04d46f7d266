//! Interrupted commands leave no files: SIGINT, SIGTERM and SIGHUP during
//! `image convert` (while the output is written, and while a .gz source
//! is unpacked) remove the temp files and exit with 128 + the signal; the
//! temp a SIGKILL leaves is removed by the next conversion into the same
//! directory (never a temp some live process still holds) and by
//! `image gc`.

mod support;

use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use support::Rng;

/// Every temp the engine writes starts with this.
const TEMP_PREFIX: &str = ".cocoon-tmp-";

/// A raw source large enough that converting it takes a while, shared by
/// the tests of this binary (random, so nothing in it is a hole).
fn big_raw() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("interrupted-big.raw");
        if std::fs::metadata(&p).map(|m| m.len()).ok() != Some(384 << 20) {
            let mut f = File::create(&p).unwrap();
            let mut rng = Rng::new(42);
            let mut buf = vec![0u8; 8 << 20];
            for _ in 0..48 {
                rng.fill(&mut buf);
                f.write_all(&buf).unwrap();
            }
        }
        p
    })
}

/// The big source, gzipped (fast level: random data stays its size).
fn big_gz() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("interrupted-big.raw.gz");
        if !p.exists() {
            let tmp = p.with_extension("tmp");
            let mut e = flate2::write::GzEncoder::new(
                File::create(&tmp).unwrap(),
                flate2::Compression::fast(),
            );
            std::io::copy(&mut File::open(big_raw()).unwrap(), &mut e).unwrap();
            e.finish().unwrap();
            std::fs::rename(&tmp, &p).unwrap();
        }
        p
    })
}

fn convert(dir: &Path, src: &Path, dst: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
        .args([
            "--config",
            "/dev/null",
            "image",
            "convert",
            "--format",
            "raw",
        ])
        .arg(src)
        .arg(dst)
        .env("COCOON_STATE_DIR", dir.join("state"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn temps(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".cocoon"))
        .map(|e| e.path())
        .collect()
}

/// Waits until a temp whose name ends with `suffix` exists in `dir`.
fn wait_for_temp(dir: &Path, suffix: &str, child: &mut Child) -> PathBuf {
    let started = Instant::now();
    loop {
        if let Some(t) = temps(dir)
            .into_iter()
            .find(|p| p.to_string_lossy().ends_with(suffix))
        {
            return t;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the conversion ended ({status}) before its {suffix} temp was seen");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no {suffix} temp"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill reads no memory; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

fn wait(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn termination_signals_remove_the_temps_and_exit_128_plus_the_signal() {
    for (source, suffix) in [(big_raw(), ".part"), (big_gz(), ".unpack")] {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let dir = tempfile::tempdir().unwrap();
            let dst = dir.path().join("out.raw");
            let mut child = convert(dir.path(), source, &dst);
            let temp = wait_for_temp(dir.path(), suffix, &mut child);
            signal(&child, sig);
            let (status, stderr) = wait(child);
            assert_eq!(
                status.code(),
                Some(128 + sig),
                "{} during {suffix}: {status} {stderr}",
                sig
            );
            assert!(!temp.exists(), "{} left after signal {sig}", temp.display());
            assert_eq!(temps(dir.path()), Vec::<PathBuf>::new(), "signal {sig}");
            assert!(!dst.exists());
        }
    }
}

#[test]
fn a_killed_conversions_temp_goes_with_the_next_conversion_but_a_live_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("out.raw");
    let mut child = convert(dir.path(), big_raw(), &dst);
    let stale = wait_for_temp(dir.path(), ".part", &mut child);
    signal(&child, libc::SIGKILL);
    let (status, _) = wait(child);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(stale.exists(), "SIGKILL cannot clean up");

    // Some other process's temp, being written: it holds the lock.
    let live = dir.path().join(format!("{TEMP_PREFIX}live01.part"));
    let held = File::create(&live).unwrap();
    flock(&held, FlockOperation::NonBlockingLockExclusive).unwrap();

    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    let (status, stderr) = wait(convert(dir.path(), &small, &dir.path().join("next.raw")));
    assert!(status.success(), "{stderr}");
    assert!(
        !stale.exists(),
        "the next conversion removes the stale temp"
    );
    assert!(live.exists(), "a locked temp belongs to a live writer");
    drop(held);
}

#[test]
fn image_gc_removes_stale_conversion_temps_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
            .args(["--config", "/dev/null"])
            .args(args)
            .env("COCOON_STATE_DIR", dir.path().join("state"))
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    run(&["image", "list", "-o", "json"]);
    // Where the store's conversions write: converted/<source>/<target>/.
    let target = dir
        .path()
        .join(format!("state/images/converted/{}/raw", "ab".repeat(32)));
    std::fs::create_dir_all(&target).unwrap();
    let stale = target.join(format!("{TEMP_PREFIX}dead01.part"));
    std::fs::write(&stale, vec![7u8; 1 << 20]).unwrap();
    // (A live temp cannot be there: conversions hold the store's writer
    // lock, which gc takes exclusively.)
    let report = run(&["image", "gc", "-o", "json"]);
    assert!(!stale.exists(), "{report}");
    assert!(
        report["freed_bytes"].as_u64().unwrap() >= 1 << 20,
        "the stale temp's megabyte is counted: {report}"
    );
}
