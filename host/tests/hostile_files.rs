//! Files that are not regular files, named where the CLI expects one: a
//! FIFO with no writer, /dev/zero (and a symlink to it), a character
//! device made with mknod, a loop device. Every command runs as a child
//! under a memory limit (RLIMIT_DATA) and a timeout: before the fix a FIFO
//! hung `plugin verify`, `image pull` and `image convert` forever and
//! /dev/zero grew them without bound. Each must fail fast with an error
//! naming the path and what it is, or, for a block device where an image
//! is expected, read the device whole.

mod support;

use std::ffi::OsStr;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{skip, test_name, wasm};

/// Private writable memory a command may map (RLIMIT_DATA): the wasm
/// engine's stack pool alone maps 2 GiB (untouched, so not resident), and
/// the rest leaves about 1 GiB of heap. Reading /dev/zero whole (23 GB
/// before the fix) fails within it, so a regression ends in an allocation
/// failure here instead of taking the machine's memory.
const MEMORY_LIMIT: u64 = 3 << 30;
/// Time a command may take: a hang fails the test instead of the suite.
const TIMEOUT: Duration = Duration::from_secs(60);

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "").unwrap();
        Host { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the CLI under [`MEMORY_LIMIT`] and [`TIMEOUT`].
    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cocoon-host"));
        cmd.args(args)
            .env("COCOON_STATE_DIR", self.path("state"))
            .env("COCOON_CONFIG", self.path("config.toml"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: MEMORY_LIMIT,
                    rlim_max: MEMORY_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap();
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if started.elapsed() > TIMEOUT {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{:?} still running after {TIMEOUT:?}: {}",
                    args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "succeeded: {stderr}");
        stderr
    }
}

/// The special files of one test, made in its own directory.
struct Specials {
    /// (path, what the error must call it)
    files: Vec<(PathBuf, &'static str)>,
}

impl Specials {
    fn make(host: &Host) -> Self {
        let fifo = host.path("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o600)).unwrap();
        let link = host.path("zero-link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let mut files = vec![
            (fifo, "a FIFO"),
            (PathBuf::from("/dev/zero"), "a character device"),
            (link, "a character device"),
        ];
        // Our own /dev/zero (1:5), made where the test owns the directory.
        let made = host.path("zero-node");
        if char_device(&made, 1, 5) {
            files.push((made, "a character device"));
        }
        Specials { files }
    }
}

/// Makes a character device node `major:minor` at `path`; false (and the
/// part skipped, with the reason) where this process may not.
fn char_device(path: &Path, major: u32, minor: u32) -> bool {
    match rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from(0o600),
        rustix::fs::makedev(major, minor),
    ) {
        Ok(()) => true,
        Err(e) => {
            skip(
                &format!("{} (character device part)", test_name()),
                &format!("cannot mknod a character device here: {e}"),
            );
            false
        }
    }
}

/// A loop device, detached when dropped.
struct Loop {
    device: PathBuf,
}

impl Loop {
    /// A read-only loop device over a file of the host's dir holding
    /// `data`; None (the part skipped) where none can be made.
    fn over(host: &Host, data: &[u8]) -> Option<Loop> {
        let backing = host.path("loop-backing.img");
        std::fs::write(&backing, data).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(&backing)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let device = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                Some(Loop { device })
            }
            Ok(o) => {
                skip(
                    &format!("{} (loop device part)", test_name()),
                    &format!(
                        "losetup cannot attach a loop device here: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                None
            }
            Err(e) => {
                skip(
                    &format!("{} (loop device part)", test_name()),
                    &format!("no losetup: {e}"),
                );
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn assert_names(stderr: &str, path: &Path, kind: &str) {
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains(kind),
        "the error should name {} and say it is {kind}: {stderr}",
        path.display()
    );
    assert!(stderr.len() < 2000, "a short error: {stderr}");
}

/// `image convert --format raw SRC DST`.
fn convert_raw(src: &Path, dst: &Path) -> [std::ffi::OsString; 6] {
    [
        OsStr::new("image"),
        OsStr::new("convert"),
        OsStr::new("--format"),
        OsStr::new("raw"),
        src.as_os_str(),
        dst.as_os_str(),
    ]
    .map(OsStr::to_os_string)
}

fn site_source_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/examples/site-source/plugin.toml")
}

#[test]
fn plugin_verify_refuses_special_files_as_wasm_and_manifest() {
    let host = Host::new();
    let manifest = site_source_manifest();
    let real = wasm("site-source");
    let plugin = |command: &str, wasm: &Path, manifest: &Path| {
        [
            OsStr::new("plugin"),
            OsStr::new(command),
            wasm.as_os_str(),
            OsStr::new("--manifest"),
            manifest.as_os_str(),
        ]
        .map(OsStr::to_os_string)
    };
    for (path, kind) in Specials::make(&host).files {
        for command in ["verify", "install"] {
            // As the wasm, and as the manifest.
            assert_names(&host.fails(&plugin(command, &path, &manifest)), &path, kind);
            assert_names(&host.fails(&plugin(command, &real, &path)), &path, kind);
        }
    }
    // The real plugin still verifies.
    let out = host.run(&plugin("verify", &real, &manifest));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn image_pull_refuses_special_files_and_reads_block_devices() {
    let host = Host::new();
    for (path, kind) in Specials::make(&host).files {
        let err = host.fails(&[OsStr::new("image"), OsStr::new("pull"), path.as_os_str()]);
        assert_names(&err, &path, kind);
    }
    // Nothing was staged.
    let tmp = host.path("state/images/tmp");
    let staged: u64 = std::fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert_eq!(staged, 0, "bytes left in {}", tmp.display());

    let data = support::Rng::new(7).bytes(1 << 20);
    let Some(dev) = Loop::over(&host, &data) else {
        return;
    };
    let out = host.run(&[
        OsStr::new("image"),
        OsStr::new("pull"),
        dev.device.as_os_str(),
        OsStr::new("-o"),
        OsStr::new("json"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&want),
        "the device's bytes, {want}: {stdout}"
    );
}

#[test]
fn plugin_probe_and_map_refuse_special_files() {
    let host = Host::new();
    for (path, kind) in Specials::make(&host).files {
        for call in ["probe", "map"] {
            let err = host.fails(&[
                OsStr::new("plugin"),
                OsStr::new("call"),
                OsStr::new("raw-converter"),
                OsStr::new(call),
                path.as_os_str(),
            ]);
            assert_names(&err, &path, kind);
        }
    }
}

#[test]
fn image_convert_refuses_special_sources_and_reads_block_devices() {
    let host = Host::new();
    let dest = host.path("out.raw");
    for (path, kind) in Specials::make(&host).files {
        let err = host.fails(&[
            OsStr::new("image"),
            OsStr::new("convert"),
            path.as_os_str(),
            dest.as_os_str(),
        ]);
        assert_names(&err, &path, kind);
        assert!(!dest.exists());
    }
    let mut data = vec![0u8; 2 << 20];
    data[..4096].fill(0x5a);
    data[(1 << 20)..(1 << 20) + 512].fill(0xa5);
    let Some(dev) = Loop::over(&host, &data) else {
        return;
    };
    let out = host.run(&[
        OsStr::new("image"),
        OsStr::new("convert"),
        OsStr::new("--format"),
        OsStr::new("raw"),
        dev.device.as_os_str(),
        dest.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Before: the device's metadata size (0) made an empty disk.
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

#[test]
fn image_convert_replaces_only_regular_files() {
    let host = Host::new();
    let src = host.path("src.raw");
    std::fs::write(&src, vec![0x11u8; 8192]).unwrap();
    let fifo = host.path("dst-fifo");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o600)).unwrap();
    let dir = host.path("dst-dir");
    std::fs::create_dir(&dir).unwrap();
    let target = host.path("target.raw");
    std::fs::write(&target, b"keep").unwrap();
    let link = host.path("dst-link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut cases = vec![
        (fifo.clone(), "a FIFO"),
        (dir.clone(), "a directory"),
        (link.clone(), "a symlink"),
    ];
    // A null device of our own (1:3): replacing it is what destroyed
    // /dev/null before.
    let null = host.path("dst-null");
    if char_device(&null, 1, 3) {
        cases.push((null.clone(), "a character device"));
    }
    for (dst, kind) in &cases {
        let err = host.fails(&convert_raw(&src, dst));
        assert_names(&err, dst, kind);
    }
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(dir.is_dir());
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    if null.exists() {
        assert!(std::fs::metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device());
    }
    // No temp file was left by any refusal.
    let temps: Vec<_> = std::fs::read_dir(host.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".cocoon"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");

    // A regular file is replaced, and a 254-byte name works.
    std::fs::write(&target, b"old").unwrap();
    let long = host.path(&"d".repeat(254));
    for dst in [&target, &long] {
        let out = host.run(&convert_raw(&src, dst));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(dst).unwrap(), vec![0x11u8; 8192]);
    }
}

#[test]
fn boot_refuses_special_kernels() {
    if !std::path::Path::new("/dev/kvm").exists() {
        // The kernel is opened after the VM is made; without KVM the
        // command fails before it gets there.
        skip(&test_name(), "no /dev/kvm");
        return;
    }
    let host = Host::new();
    for (path, kind) in Specials::make(&host).files {
        let err = host.fails(&[
            OsStr::new("boot"),
            OsStr::new("--memory"),
            OsStr::new("64M"),
            OsStr::new("--kernel"),
            path.as_os_str(),
        ]);
        assert_names(&err, &path, kind);
    }
}
