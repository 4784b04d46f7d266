//! Conformance against qemu-img: images made by qemu-img from mixed source
//! data, rebuilt from our extent map, must equal `qemu-img convert -O raw`.

use cocoon_format_common::test_support::*;
use cocoon_format_common::FormatError;
use cocoon_format_vhdx::Vhdx;

/// Covers three default (8 MiB) blocks, the middle one all zeros.
const SIZE: usize = 25 * (1 << 20) + 3 * 512;

fn no_codec(codec: u32, _: &[u8], _: u32) -> Result<Vec<u8>, FormatError> {
    panic!("VHDX has no compressed extents (codec {codec})")
}

fn check(name: &str, opts: &str) -> Stats {
    let dir = Scratch::new(name);
    let data = source_data(SIZE);
    let img = qemu_image(&dir, name, &data, "vhdx", opts);
    let file = std::fs::read(&img).unwrap();
    let vhdx = Vhdx::open(&file).expect("open");
    let expected = qemu_raw(&dir, &img, "vhdx");
    assert_eq!(vhdx.virtual_size(), expected.len() as u64);
    let (raw, stats) = rebuild(
        &file,
        vhdx.virtual_size(),
        5,
        &|off, max| vhdx.map(&file, off, max),
        &no_codec,
    );
    assert_eq!(sha256(&raw), sha256(&expected));
    stats
}

#[test]
fn dynamic_default_matches_qemu() {
    let stats = check("vhdx-default", "");
    assert!(
        stats.zero_bytes > 0,
        "unallocated blocks map to zero extents"
    );
    assert!(stats.data_bytes > 0);
}

#[test]
fn dynamic_1m_blocks_matches_qemu() {
    let stats = check("vhdx-1m", "block_size=1M");
    assert!(stats.zero_bytes > 0);
}

#[test]
fn fixed_matches_qemu() {
    // qemu-img marks blocks it wrote zeros to as PAYLOAD_ZERO even in a
    // fixed image, so both kinds of extent appear.
    let stats = check("vhdx-fixed", "subformat=fixed");
    assert!(stats.data_bytes > 0);
}

#[test]
fn empty_one_tebibyte_image_is_one_zero_run() {
    let dir = Scratch::new("vhdx-1t");
    let file = qemu_create(&dir, "empty", "vhdx", "block_size=1M", "1T");
    let vhdx = Vhdx::open(&file).expect("open");
    assert_eq!(vhdx.virtual_size(), 1 << 40);
    // 2^20 blocks, scanned 2^16 per call at most.
    let pages = zero_walk(vhdx.virtual_size(), &|off, max| vhdx.map(&file, off, max));
    assert!(pages <= 16, "{pages} pages");
}

/// A writer set a log GUID but logged nothing: there is nothing to replay,
/// and qemu reads the image as it is.
#[test]
fn log_guid_without_entries_matches_qemu() {
    let dir = Scratch::new("vhdx-guid");
    let img = qemu_image(&dir, "guid", &source_data(SIZE), "vhdx", "block_size=1M");
    let mut file = std::fs::read(&img).unwrap();
    for off in [64 << 10, 128 << 10] {
        file[off + 48..off + 64].copy_from_slice(&[0x5a; 16]);
        file[off + 4..off + 8].fill(0);
        let crc = cocoon_format_vhdx::crc32c(&file[off..off + 4096]);
        file[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
    }
    let patched = dir.path("guid-patched.vhdx");
    std::fs::write(&patched, &file).unwrap();
    let vhdx = Vhdx::open(&file).expect("open");
    let expected = qemu_raw(&dir, &patched, "vhdx");
    let (raw, _) = rebuild(
        &file,
        vhdx.virtual_size(),
        64,
        &|off, max| vhdx.map(&file, off, max),
        &no_codec,
    );
    assert_eq!(sha256(&raw), sha256(&expected));
}
