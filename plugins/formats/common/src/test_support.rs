//! Test support shared by the format parsers' tests (and the host's):
//! source data, qemu-img fixtures, a raw rebuild from an extent map,
//! hostile-input helpers, one deterministic generator, and the skip
//! convention of scripts/test. Built only with the `test-support` feature,
//! which the parsers enable for their tests alone.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Extent, Format, FormatError, Run};
use sha2::{Digest, Sha256};

/// Records that the running test skipped because something it needs is
/// missing here: prints `SKIPPED <test>: <reason>` on stderr and appends
/// the same line to the file `COCOON_SKIP_LOG` names, where scripts/test
/// counts it (the Rust harness reports the test as passed).
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("COCOON_SKIP_LOG") {
        // One short O_APPEND write per line: concurrent tests never
        // interleave within a line.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("COCOON_SKIP_LOG {}: {e}", Path::new(&log).display()));
        f.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("COCOON_SKIP_LOG {}: {e}", Path::new(&log).display()));
    }
}

/// The name of the running test: the harness names each test's thread
/// after it.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cocoon-fmt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic xorshift generator: fixtures must not change between
/// runs. The one generator of every test in the project.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// `n` bytes from the generator.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Source data for a disk of `size` bytes: random bytes, repeated text and
/// zero runs at unaligned boundaries, and a written last sector.
pub fn source_data(size: usize) -> Vec<u8> {
    const MIB: usize = 1 << 20;
    assert!(size >= 6 * MIB, "source data needs at least 6 MiB");
    let mut d = vec![0u8; size];
    let mut rng = Rng::new(0x5eed_cafe);
    rng.fill(&mut d[..MIB + 4096]);
    // [1 MiB + 4 KiB, 2 MiB + 777): zeros.
    let text = b"cocoon-host disk image conversion test, repeated text. ";
    for (i, b) in d[2 * MIB + 777..3 * MIB + MIB / 2].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    // A random island that straddles block and grain boundaries.
    rng.fill(&mut d[4 * MIB - 70_000..4 * MIB + 123_457]);
    // A single random sector far from the rest.
    rng.fill(&mut d[5 * MIB + 512 * 9..5 * MIB + 512 * 10]);
    let n = d.len();
    rng.fill(&mut d[n - 512..]);
    d
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is qemu-img installed? scripts/install-deps installs qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `data` as a raw file and converts it with
/// `qemu-img convert -f raw -O <fmt> [-o <opts>]`; returns the image path.
pub fn qemu_image(dir: &Scratch, name: &str, data: &[u8], fmt: &str, opts: &str) -> PathBuf {
    let raw = dir.path(&format!("{name}.src.raw"));
    std::fs::write(&raw, data).expect("write source");
    let img = dir.path(&format!("{name}.{fmt}"));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", fmt]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    cmd.arg(&raw).arg(&img);
    run(&mut cmd);
    img
}

/// The raw disk qemu-img reads from `img` (`qemu-img convert -f fmt -O raw`).
pub fn qemu_raw(dir: &Scratch, img: &Path, fmt: &str) -> Vec<u8> {
    let out = dir.path(&format!(
        "{}.qemu.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(img)
        .arg(&out));
    std::fs::read(&out).expect("read qemu-img output")
}

pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A parser's `map`, bound to its source.
pub type MapFn<'a> = dyn Fn(u64, usize) -> Result<Vec<Extent>, FormatError> + 'a;
/// A parser's `decode`.
pub type DecodeFn = dyn Fn(u32, &[u8], u32) -> Result<Vec<u8>, FormatError>;

/// What a rebuild saw, to assert on the shape of the map.
#[derive(Debug, Default)]
pub struct Stats {
    pub pages: usize,
    pub extents: usize,
    pub zero_bytes: u64,
    pub data_bytes: u64,
    pub compressed_bytes: u64,
}

/// Rebuilds the raw disk from an extent map, as the host does: data runs
/// copied from the file, compressed runs decoded, zero runs left zero. Pages
/// of `page` extents; checks the map is ordered, contiguous and in bounds.
pub fn rebuild(
    file: &[u8],
    virtual_size: u64,
    page: usize,
    map: &MapFn,
    decode: &DecodeFn,
) -> (Vec<u8>, Stats) {
    let mut out = vec![0u8; virtual_size as usize];
    let mut stats = Stats::default();
    let mut pos = 0u64;
    loop {
        let extents = map(pos, page).expect("map");
        if extents.is_empty() {
            break;
        }
        stats.pages += 1;
        assert!(
            extents.len() <= page,
            "page of {} extents, max {page}",
            extents.len()
        );
        for e in extents {
            assert_eq!(e.offset, pos, "extents must be contiguous");
            assert!(e.length > 0, "empty extent at {pos}");
            let end = e.offset + e.length;
            assert!(end <= virtual_size, "extent {e:?} past the virtual size");
            let dst = &mut out[e.offset as usize..end as usize];
            match e.run {
                Run::Zero => stats.zero_bytes += e.length,
                Run::Data(src) => {
                    let s = src as usize;
                    dst.copy_from_slice(&file[s..s + e.length as usize]);
                    stats.data_bytes += e.length;
                }
                Run::Compressed {
                    source_offset,
                    source_length,
                    codec,
                } => {
                    let s = source_offset as usize;
                    let input = &file[s..s + source_length as usize];
                    let bytes = decode(codec, input, e.length as u32).expect("decode");
                    assert_eq!(bytes.len() as u64, e.length);
                    dst.copy_from_slice(&bytes);
                    stats.compressed_bytes += e.length;
                }
                Run::Backing => panic!("unexpected backing extent {e:?}"),
            }
            stats.extents += 1;
            pos = end;
        }
    }
    assert_eq!(pos, virtual_size, "the map must cover the whole disk");
    (out, stats)
}

/// Walks the whole map of a (possibly hostile) image in bounded pages;
/// returns the first error. Panics if the walk does not end.
pub fn walk(virtual_size: u64, map: &MapFn) -> Result<(), FormatError> {
    let mut pos = 0u64;
    for _ in 0..1_000_000 {
        let extents = map(pos, 256)?;
        let Some(last) = extents.last() else {
            assert!(pos >= virtual_size, "map ended early at {pos}");
            return Ok(());
        };
        pos = last.offset + last.length;
    }
    panic!("map did not finish in a million pages");
}

/// Flips random bytes of `file` inside `range`, `rounds` times, and runs
/// `outcome` on each variant: any result is fine, a panic or a hang is not.
pub fn mutate(
    file: &[u8],
    range: std::ops::Range<usize>,
    rounds: usize,
    outcome: &dyn Fn(&[u8]) -> Result<(), FormatError>,
) -> usize {
    let mut rng = Rng::new(0xbad_f00d);
    let mut errors = 0;
    let mut copy = file.to_vec();
    let span = (range.end - range.start) as u64;
    for _ in 0..rounds {
        let flips = 1 + rng.next() % 8;
        let mut undo = Vec::new();
        for _ in 0..flips {
            let at = range.start + (rng.next() % span) as usize;
            undo.push((at, copy[at]));
            copy[at] = rng.next() as u8;
        }
        if outcome(&copy).is_err() {
            errors += 1;
        }
        for (at, b) in undo.into_iter().rev() {
            copy[at] = b;
        }
    }
    errors
}

pub use crate::bytes::{be32, be64, le16, le32, le64};

/// An empty image of `size` made by `qemu-img create`.
pub fn qemu_create(dir: &Scratch, name: &str, fmt: &str, opts: &str, size: &str) -> Vec<u8> {
    let img = dir.path(&format!("{name}.{fmt}"));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", fmt]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    cmd.arg(&img).arg(size);
    run(&mut cmd);
    std::fs::read(&img).expect("read created image")
}

/// Walks an image that must read as zeros only; returns the map pages it
/// took, so callers can check the walk stays short.
pub fn zero_walk(virtual_size: u64, map: &MapFn) -> usize {
    let mut pos = 0u64;
    let mut pages = 0;
    loop {
        let extents = map(pos, 1024).expect("map");
        let Some(last) = extents.last() else { break };
        pages += 1;
        for e in &extents {
            assert_eq!(e.run, Run::Zero, "{e:?} in an empty image");
        }
        pos = last.offset + last.length;
    }
    assert_eq!(pos, virtual_size);
    pages
}

/// The size of the images the hostile tests start from.
pub const HOSTILE_SIZE: usize = 6 * (1 << 20) + 512;

/// A qemu-img image of `fmt` (with `opts`) made from mixed source data.
pub fn hostile_fixture(fmt: &str, name: &str, opts: &str) -> Vec<u8> {
    let dir = Scratch::new(name);
    let img = qemu_image(&dir, name, &source_data(HOSTILE_SIZE), fmt, opts);
    std::fs::read(img).unwrap()
}

/// Opens `file` as `F` and walks its whole map.
pub fn outcome<F: Format>(file: &[u8]) -> Result<(), FormatError> {
    let src = file.to_vec();
    let image = F::open(&src)?;
    walk(image.virtual_size(), &|off, max| image.map(&src, off, max))
}

/// Asserts that `F` refuses `file` with an error that mentions `needle`.
pub fn refused_as<F: Format>(file: &[u8], needle: &str) -> FormatError {
    let err = outcome::<F>(file).expect_err("hostile input must be refused");
    assert!(
        err.message.contains(needle),
        "error {err} should mention {needle:?}"
    );
    err
}
