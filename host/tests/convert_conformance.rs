//! Conformance of the conversion engine and the converter plugins against
//! qemu-img. Fixtures are made at test time with Debian's qemu-img from
//! source data that mixes random bytes, repeated text, zero runs and a
//! written last sector. For every vector our raw output must be
//! byte-identical (sha256) to `qemu-img convert -f FMT -O raw`, and every
//! zero extent the converter reports must be a hole in our output.

use cocoon_host::cast::usize_from;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cocoon_format_common::test_support::Rng;
use cocoon_host::config::HostConfig;
use cocoon_host::convert::{
    self, ConvertError, ConvertReport, ConvertRequest, Converters, DirResolver, NoBacking, Silent,
};
use cocoon_host::plugin::calls::{ExtentKind, MAX_EXTENTS_PER_PAGE};
use cocoon_host::plugin::{Registry, Runtime};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// The source disk: big enough for several 2 MiB clusters.
const SOURCE_SIZE: u64 = 24 * MIB;

struct Env {
    converters: Converters,
    source: PathBuf,
}

/// Shared by every test of this binary: the converters and the source
/// data. They live in Cargo's per-target temp dir, not in a TempDir: a
/// static is never dropped, so a TempDir here would leak at every run.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("convert_conformance");
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = Box::leak(Box::new(Runtime::new(None).unwrap()));
        let registry = Registry::discover(&HostConfig::at(&dir.join("state")));
        let converters = Converters::load(runtime, &registry).unwrap();
        let source = dir.join("source.raw");
        write_source(&source, SOURCE_SIZE);
        Env { converters, source }
    })
}

/// Reproducible "random" bytes.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Random runs, text runs, zero runs (left as holes), scattered small
/// writes that land inside otherwise empty clusters, and the last sector.
fn write_source(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let text: Vec<u8> = b"cocoon conformance: the quick brown fox jumps over the lazy dog\n"
        .iter()
        .copied()
        .cycle()
        .take(usize_from(3 * MIB))
        .collect();
    f.write_all_at(&random_bytes(1, usize_from(2 * MIB)), 0)
        .unwrap();
    f.write_all_at(&text, 3 * MIB).unwrap();
    f.write_all_at(&random_bytes(2, usize_from(MIB / 2)), 6 * MIB + MIB / 2)
        .unwrap();
    for (i, at) in [
        8 * MIB + 4096,
        9 * MIB + 70_000,
        11 * MIB + 512,
        13 * MIB - 512,
        17 * MIB + 123 * 512,
    ]
    .iter()
    .enumerate()
    {
        f.write_all_at(&random_bytes(10 + i as u64, 1536), *at)
            .unwrap();
    }
    f.write_all_at(&text[..usize_from(MIB)], 20 * MIB).unwrap();
    // Smaller sources keep only what fits.
    f.set_len(size).unwrap();
    f.write_all_at(&random_bytes(3, 512), size - 512).unwrap();
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-deps for qemu-utils)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn qemu_io(image: &str, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(image));
}

fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn convert_file(
    src: &Path,
    dest: &Path,
    format: Option<&str>,
    backing: &dyn convert::BackingResolver,
) -> Result<ConvertReport, ConvertError> {
    let req = ConvertRequest {
        source: src,
        dest,
        format,
        backing,
        jobs: 0,
    };
    convert::convert_with(&env().converters, &req, &Silent)
}

/// Every block-aligned part of each zero extent of `image` is a hole in
/// `out`.
fn assert_zero_extents_are_holes(image: &Path, converter: &str, format: &str, out: &Path) -> u64 {
    let plugin = env()
        .converters
        .plugins
        .iter()
        .find(|p| p.name() == converter)
        .unwrap();
    let mut session = plugin.open_image(image, format).unwrap();
    let file = File::open(out).unwrap();
    let mut at = 0;
    let mut zero_bytes = 0;
    while at < session.virtual_size() {
        let page = session.map(at, MAX_EXTENTS_PER_PAGE).unwrap();
        for e in &page {
            if matches!(e.kind, ExtentKind::Zero) {
                let start = e.offset.next_multiple_of(4096);
                let end = (e.offset + e.length) / 4096 * 4096;
                if start < end {
                    zero_bytes += end - start;
                    match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(start)) {
                        Ok(data) => assert!(
                            data >= end,
                            "{}: zero extent {start}..{end} has data at {data}",
                            image.display()
                        ),
                        Err(e) => assert_eq!(e, rustix::io::Errno::NXIO),
                    }
                }
            }
        }
        at = page.last().map(|e| e.offset + e.length).unwrap();
    }
    zero_bytes
}

/// Converts `image` both ways and compares; checks the holes.
fn check(image: &Path, fmt: &str, backing: &dyn convert::BackingResolver) -> ConvertReport {
    let dir = image.parent().unwrap();
    let reference = dir.join("reference.raw");
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        image.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    let ours = dir.join("ours.raw");
    let report = convert_file(image, &ours, None, backing)
        .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    assert_eq!(report.format, fmt);
    assert_eq!(
        report.virtual_size,
        std::fs::metadata(&reference).unwrap().len()
    );
    assert_eq!(std::fs::metadata(&ours).unwrap().len(), report.virtual_size);
    assert_eq!(
        sha256_file(&ours),
        sha256_file(&reference),
        "{} differs from qemu-img's output",
        image.display()
    );
    let zero = assert_zero_extents_are_holes(image, &report.converter, fmt, &ours);
    assert!(
        report.allocated_bytes <= report.virtual_size - zero,
        "allocated {} with {zero} zero bytes",
        report.allocated_bytes
    );
    report
}

/// An image of format `fmt` made from the source with `qemu-img convert`
/// and `extra` options.
fn vector(fmt: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    vector_from(&env().source, fmt, extra)
}

fn vector_from(source: &Path, fmt: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("image.{fmt}"));
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    args.extend_from_slice(extra);
    args.push(source.to_str().unwrap());
    args.push(image.to_str().unwrap());
    qemu_img(&args);
    (dir, image)
}

macro_rules! vectors {
    ($($name:ident: $fmt:literal, [$($opt:literal),*];)*) => {$(
        #[test]
        fn $name() {
            let (_dir, image) = vector($fmt, &[$($opt),*]);
            check(&image, $fmt, &NoBacking);
        }
    )*};
}

vectors! {
    qcow2_compat_0_10: "qcow2", ["-o", "compat=0.10"];
    qcow2_compat_1_1: "qcow2", ["-o", "compat=1.1"];
    qcow2_zlib: "qcow2", ["-c"];
    qcow2_zstd: "qcow2", ["-c", "-o", "compression_type=zstd"];
    qcow2_cluster_512: "qcow2", ["-o", "cluster_size=512"];
    qcow2_cluster_2m: "qcow2", ["-o", "cluster_size=2M"];
    qcow2_cluster_2m_zlib: "qcow2", ["-c", "-o", "cluster_size=2M"];
    qcow2_extended_l2: "qcow2", ["-o", "extended_l2=on,cluster_size=128k"];
    qcow2_preallocation_metadata: "qcow2", ["-o", "preallocation=metadata"];
    qcow2_v2_preallocation_metadata: "qcow2", ["-o", "compat=0.10,preallocation=metadata"];
    vmdk_monolithic_sparse: "vmdk", ["-o", "subformat=monolithicSparse"];
    vmdk_stream_optimized: "vmdk", ["-o", "subformat=streamOptimized"];
    vhdx_default: "vhdx", [];
    vhdx_block_size_1m: "vhdx", ["-o", "block_size=1M"];
    vhdx_fixed: "vhdx", ["-o", "subformat=fixed"];
    vpc_dynamic: "vpc", ["-o", "subformat=dynamic"];
    vpc_dynamic_force_size: "vpc", ["-o", "subformat=dynamic,force_size=on"];
    vpc_fixed_force_size: "vpc", ["-o", "subformat=fixed,force_size=on"];
    vdi_default: "vdi", [];
    vdi_static: "vdi", ["-o", "static=on"];
}

#[test]
fn qcow2_lazy_refcounts_with_the_dirty_bit_set() {
    let (_dir, image) = vector("qcow2", &["-o", "lazy_refcounts=on"]);
    // A writer that crashed leaves incompatible feature bit 0 set.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, 72).unwrap();
    let v = u64::from_be_bytes(word) | 1;
    f.write_all_at(&v.to_be_bytes(), 72).unwrap();
    drop(f);
    check(&image, "qcow2", &NoBacking);
}

#[test]
fn qcow2_size_not_cluster_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("odd.raw");
    // 7 sectors past a 64 KiB boundary, the last one written.
    write_source(&source, 5 * MIB + 7 * 512);
    for (i, extra) in [
        &[][..],
        &["-c"][..],
        &["-c", "-o", "compression_type=zstd"][..],
    ]
    .iter()
    .enumerate()
    {
        let (_d, image) = vector_from(&source, "qcow2", extra);
        let r = check(&image, "qcow2", &NoBacking);
        assert_eq!(r.virtual_size, 5 * MIB + 7 * 512, "variant {i}");
    }
}

#[test]
fn qcow2_virtual_size_not_whole_sectors_matches_qemu_img() {
    // A header size of 1000 bytes (qemu-img itself only writes whole
    // sectors; other writers need not): qemu reads 1 sector.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("odd.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, "1K"]);
    qemu_io(path, "qcow2", &["write -P 0x5a 0 1024"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&1000u64.to_be_bytes(), 24).unwrap();
    drop(f);
    let r = check(&image, "qcow2", &NoBacking);
    assert_eq!(r.virtual_size, 512);
}

#[test]
fn qcow2_backing_chain_of_two_overlays() {
    let (dir, base) = vector("qcow2", &[]);
    let d = dir.path();
    let (ov1, ov2) = (d.join("ov1.qcow2"), d.join("ov2.qcow2"));
    // Names are stored as given: plain names, resolved in the directory.
    run(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        "image.qcow2",
        "-F",
        "qcow2",
        "ov1.qcow2",
    ]));
    qemu_io(
        ov1.to_str().unwrap(),
        "qcow2",
        &[
            "write -P 0xab 1M 64k",
            "write -z 3M 128k",
            "write -P 0x11 23M 1M",
        ],
    );
    // The second overlay is smaller-clustered and writes across the first.
    run(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "ov1.qcow2",
        "-F",
        "qcow2",
        "ov2.qcow2",
    ]));
    qemu_io(
        ov2.to_str().unwrap(),
        "qcow2",
        &[
            "write -P 0xcd 1052672 8k",
            "write -z 0 4k",
            "write -P 0x22 9M 12k",
        ],
    );
    let resolver = DirResolver::new(d).unwrap();
    let r = check(&ov2, "qcow2", &resolver);
    let canon = |p: &Path| p.canonicalize().unwrap();
    assert_eq!(r.backing_chain, vec![canon(&ov1), canon(&base)]);
    // Without a resolver the chain is refused, not guessed.
    let e = convert_file(&ov2, &d.join("x.raw"), None, &NoBacking).unwrap_err();
    assert!(
        matches!(e, ConvertError::BackingNotFound { ref name, .. } if name == "ov1.qcow2"),
        "{e}"
    );
    assert!(!d.join("x.raw").exists());
}

#[test]
fn qcow2_empty_1tib_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("empty.qcow2");
    qemu_img(&["create", "-f", "qcow2", image.to_str().unwrap(), "1T"]);
    let out = dir.path().join("out.raw");
    let started = Instant::now();
    let r = convert_file(&image, &out, None, &NoBacking).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.virtual_size, 1 << 40);
    assert_eq!(r.allocated_bytes, 0);
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 1 << 40);
    assert_eq!(std::os::unix::fs::MetadataExt::blocks(&meta), 0);
}
