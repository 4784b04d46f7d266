//! The conversion engine's own rules, end to end through the real plugins:
//! backing names refused, forced formats checked against the probe,
//! compressed downloads unpacked, hostile images ending in clear errors
//! with no output left behind, and the `image convert` command line.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cocoon_format_common::test_support::Rng;
use cocoon_host::config::HostConfig;
use cocoon_host::convert::{
    self, BackingResolver, ConvertError, ConvertReport, ConvertRequest, Converters, NoBacking,
    Silent,
};
use cocoon_host::plugin::{PluginError, Registry, Runtime};

fn converters() -> &'static Converters {
    static C: OnceLock<Converters> = OnceLock::new();
    C.get_or_init(|| {
        // No compiled-component cache and no plugin directory: nothing is
        // left behind by a static that is never dropped.
        let runtime = Box::leak(Box::new(Runtime::new(None).unwrap()));
        let state = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("convert_engine-state");
        let registry = Registry::discover(&HostConfig::at(&state));
        Converters::load(runtime, &registry).unwrap()
    })
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("qemu-img (scripts/install-deps)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 4 MiB qcow2 with some data, and the raw it was made from.
fn small_qcow2(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("src.raw");
    let f = File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[0x5a; 100_000], 300_000).unwrap();
    f.write_all_at(b"last", (4 << 20) - 4).unwrap();
    let img = dir.join("img.qcow2");
    qemu_img(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "src.raw",
            "img.qcow2",
        ],
    );
    (img, raw)
}

fn convert(
    src: &Path,
    dest: &Path,
    format: Option<&str>,
    backing: &dyn BackingResolver,
) -> Result<ConvertReport, ConvertError> {
    let req = ConvertRequest {
        source: src,
        dest,
        format,
        backing,
        jobs: 2,
    };
    convert::convert_with(converters(), &req, &Silent)
}

/// Nothing but `keep` in `dir`: no temp or partial output left behind.
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut keep: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    keep.sort();
    assert_eq!(names, keep);
}

#[test]
fn hostile_backing_names_are_refused_before_resolution() {
    struct Panics;
    impl BackingResolver for Panics {
        fn resolve(&self, _: &Path, name: &str) -> Option<PathBuf> {
            panic!("{name} reached the resolver");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, name) in [
        "../../etc/passwd",
        "/etc/passwd",
        r#"json:{"file":{"driver":"file","filename":"/etc/shadow"}}"#,
        "nbd:localhost:10809",
    ]
    .iter()
    .enumerate()
    {
        let img = format!("ov{i}.qcow2");
        // -u: qemu-img does not open the backing file, it just stores the name.
        qemu_img(
            d,
            &[
                "create", "-f", "qcow2", "-u", "-b", name, "-F", "raw", &img, "1M",
            ],
        );
        let e = convert(&d.join(&img), &d.join("out.raw"), None, &Panics).unwrap_err();
        assert!(
            matches!(&e, ConvertError::BackingName { name: n, .. } if n == name),
            "{name}: {e}"
        );
        assert!(e.to_string().contains("refused"), "{e}");
    }
    let mut keep: Vec<String> = (0..4).map(|i| format!("ov{i}.qcow2")).collect();
    keep.sort();
    assert_only(d, &keep.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn a_forced_format_must_agree_with_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, raw) = small_qcow2(d);
    let out = d.join("out.raw");
    for forced in ["vmdk", "vhdx", "vpc", "vdi"] {
        let e = convert(&img, &out, Some(forced), &NoBacking).unwrap_err();
        assert!(
            matches!(&e, ConvertError::FormatMismatch { forced: f, probed, .. } if f == forced && probed.starts_with("qcow2")),
            "{forced}: {e}"
        );
    }
    let r = convert(&img, &out, Some("qcow2"), &NoBacking).unwrap();
    assert_eq!(r.format, "qcow2");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
    // A raw file is not a qcow2 either.
    let e = convert(&raw, &out, Some("qcow2"), &NoBacking).unwrap_err();
    assert!(matches!(e, ConvertError::FormatMismatch { .. }), "{e}");
}

#[test]
fn compressed_downloads_are_unpacked_never_taken_for_raw() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, raw) = small_qcow2(d);
    let bytes = std::fs::read(&img).unwrap();
    let gz = d.join("img.qcow2.gz");
    let mut e =
        flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
    e.write_all(&bytes).unwrap();
    e.finish().unwrap();
    let xz = d.join("img.qcow2.xz");
    let mut e = xz2::write::XzEncoder::new(File::create(&xz).unwrap(), 3);
    e.write_all(&bytes).unwrap();
    e.finish().unwrap();
    let zst = d.join("img.qcow2.zst");
    std::fs::write(&zst, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
    let want = std::fs::read(&raw).unwrap();
    for (path, codec) in [(&gz, "gzip"), (&xz, "xz"), (&zst, "zstd")] {
        let out = d.join(format!("{codec}.raw"));
        let r = convert(path, &out, None, &NoBacking).unwrap();
        assert_eq!(
            (r.format.as_str(), r.decompressed.clone()),
            ("qcow2", vec![codec])
        );
        assert_eq!(std::fs::read(&out).unwrap(), want, "{codec}");
    }
    // A truncated download is an error, not a short raw disk.
    let cut = d.join("cut.xz");
    std::fs::write(&cut, &std::fs::read(&xz).unwrap()[..200]).unwrap();
    let e = convert(&cut, &d.join("cut.raw"), None, &NoBacking).unwrap_err();
    assert!(
        matches!(e, ConvertError::Decompress { codec: "xz", .. }),
        "{e}"
    );
    assert!(!d.join("cut.raw").exists());
}

/// Patches `bytes` at `at` of a copy of `img`.
fn patched(img: &Path, name: &str, at: u64, bytes: &[u8]) -> PathBuf {
    let p = img.with_file_name(name);
    std::fs::copy(img, &p).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(bytes, at).unwrap();
    p
}

#[test]
fn hostile_qcow2_headers_end_in_clear_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = small_qcow2(d);
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            patched(&img, "l1.qcow2", 40, &(1u64 << 40).to_be_bytes()),
            "past the end",
        ),
        (
            patched(&img, "bits.qcow2", 20, &30u32.to_be_bytes()),
            "cluster_bits is 30",
        ),
        (
            patched(&img, "huge.qcow2", 24, &(1u64 << 60).to_be_bytes()),
            "l1_size",
        ),
        (
            patched(&img, "crypt.qcow2", 32, &1u32.to_be_bytes()),
            "encrypted",
        ),
        (
            patched(&img, "incompat.qcow2", 72, &(1u64 << 2).to_be_bytes()),
            "external data file",
        ),
        (
            patched(&img, "unknown.qcow2", 72, &(1u64 << 40).to_be_bytes()),
            "unknown incompatible feature",
        ),
    ];
    let trunc = d.join("trunc.qcow2");
    std::fs::write(&trunc, &std::fs::read(&img).unwrap()[..80]).unwrap();
    for (path, want) in cases
        .iter()
        .map(|(p, w)| (p.as_path(), *w))
        .chain([(trunc.as_path(), "truncated header")])
    {
        let out = d.join("out.raw");
        let e = convert(path, &out, None, &NoBacking).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ConvertError::Plugin(PluginError::Returned { .. })),
            "{}: {msg}",
            path.display()
        );
        assert!(
            msg.contains(want) && msg.contains("qcow2"),
            "{}: {msg}",
            path.display()
        );
        assert!(!out.exists());
    }
    let names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".part")), "{names:?}");
}

#[test]
fn random_bytes_after_a_valid_magic_never_crash_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng::new(0x1234_5678_9abc_def1);
    for round in 0..40 {
        let mut bytes = rng.bytes(4096 + round * 997);
        bytes[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        let path = d.join("rand.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        // Any answer is fine but a crash; nearly all are errors.
        let _ = convert(&path, &d.join("out.raw"), None, &NoBacking);
    }
}

#[test]
fn cli_converts_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, raw) = small_qcow2(d);
    let out = d.join("out.raw");
    let o = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
        .args([
            "--state-dir",
            d.join("state").to_str().unwrap(),
            "image",
            "convert",
            "-o",
            "json",
        ])
        .arg(&img)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 4 << 20);
    assert!(v["allocated_bytes"].as_u64().unwrap() > 0);
    assert!(v["duration"].as_f64().unwrap() > 0.0);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
    let o = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
        .args([
            "--state-dir",
            d.join("state").to_str().unwrap(),
            "image",
            "convert",
            "--format",
            "vdi",
        ])
        .arg(&img)
        .arg(d.join("x.raw"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("forced format vdi disagrees"), "{err}");
}

/// Runs the CLI with its own state dir and an empty config.
fn cli(d: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .args(["--config", "/dev/null"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn format_raw_reads_a_file_that_starts_with_a_magic_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = small_qcow2(d);
    let out = d.join("as-raw.raw");
    let r = convert(&img, &out, Some("raw"), &NoBacking).unwrap();
    assert_eq!(r.format, "raw");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    // And on the command line.
    let o = cli(
        d,
        &[
            "image".as_ref(),
            "convert".as_ref(),
            "--format".as_ref(),
            "raw".as_ref(),
            img.as_os_str(),
            d.join("cli.raw").as_os_str(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(d.join("cli.raw")).unwrap(),
        std::fs::read(&img).unwrap()
    );
}

#[test]
fn a_fixed_vhd_whose_disk_holds_a_qcow2_converts_as_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The guest's disk is itself a qcow2 image (a VM that stores images).
    let (inner, _) = small_qcow2(d);
    let disk = d.join("disk.raw");
    let mut bytes = std::fs::read(&inner).unwrap();
    bytes.resize(8 << 20, 0);
    std::fs::write(&disk, &bytes).unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
            "disk.raw",
            "disk.vhd",
        ],
    );
    let out = d.join("out.raw");
    let r = convert(&d.join("disk.vhd"), &out, None, &NoBacking).unwrap();
    assert_eq!(r.format, "vpc", "the footer's rules win the tie");
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

#[test]
fn written_zeros_inside_data_become_holes_as_with_qemu_img() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("zeros.raw");
    // Written zeros: every block is data to the filesystem.
    std::fs::write(&src, vec![0u8; 64 << 20]).unwrap();
    let out = d.join("out.raw");
    let r = convert(&src, &out, Some("raw"), &NoBacking).unwrap();
    assert_eq!(r.virtual_size, 64 << 20);
    qemu_img(
        d,
        &["convert", "-f", "raw", "-O", "raw", "zeros.raw", "qemu.raw"],
    );
    let ours = std::fs::metadata(&out).unwrap().blocks() * 512;
    let theirs = std::fs::metadata(d.join("qemu.raw")).unwrap().blocks() * 512;
    assert!(
        ours <= theirs.max(4096),
        "ours allocates {ours} bytes, qemu-img's {theirs}"
    );
    assert_eq!(r.allocated_bytes, 0);
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn backing_dir_naming_a_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = small_qcow2(d);
    let o = cli(
        d,
        &[
            "image".as_ref(),
            "convert".as_ref(),
            "--backing-dir".as_ref(),
            img.as_os_str(),
            img.as_os_str(),
            d.join("out.raw").as_os_str(),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("--backing-dir {}", img.display()))
            && err.contains("it is a regular file, not a directory"),
        "{err}"
    );
}

#[test]
fn a_config_section_for_a_missing_plugin_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        "[plugins.qcow3]\ndisabled = true\n[plugins.qcow2]\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .arg("--config")
        .arg(&config)
        .args(["plugin", "list"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("[plugins.qcow3]") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("[plugins.qcow2]"), "{err}");
}

#[test]
fn an_empty_1tib_qcow2_converts_in_milliseconds_in_little_memory() {
    // The README's figure, measured: the command logs its own peak RSS
    // (VmHWM) at -v. (A child's ru_maxrss would count the test binary's
    // memory too: Linux carries it across exec.)
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "empty.qcow2", "1T"]);
    let convert = |out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
            .arg("--state-dir")
            .arg(d.join("state"))
            .args([
                "--config",
                "/dev/null",
                "-v",
                "image",
                "convert",
                "-o",
                "json",
            ])
            .arg(d.join("empty.qcow2"))
            .arg(d.join(out))
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        let kib: u64 = stderr
            .split("peak resident memory: ")
            .nth(1)
            .and_then(|r| r.split(" KiB").next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak in {stderr}"));
        (v["duration"].as_f64().unwrap(), kib << 10)
    };
    // The first run compiles the plugins into the state dir's cache, as
    // the first command after an install does.
    convert("first.raw");
    let (seconds, peak) = convert("second.raw");
    assert!(seconds < 1.0, "{seconds} s");
    let meta = std::fs::metadata(d.join("second.raw")).unwrap();
    assert_eq!(meta.len(), 1 << 40);
    assert_eq!(std::os::unix::fs::MetadataExt::blocks(&meta), 0);
    assert!(
        peak < 24 << 20,
        "peak RSS {} MiB (README: about 15 MiB)",
        peak >> 20
    );
}
