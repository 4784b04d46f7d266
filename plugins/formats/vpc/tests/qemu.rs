//! Conformance against qemu-img: images made by qemu-img from mixed source
//! data, rebuilt from our extent map, must equal `qemu-img convert -O raw`.

use cocoon_format_common::test_support::*;
use cocoon_format_common::FormatError;
use cocoon_format_vpc::Vpc;

const SIZE: usize = 9 * (1 << 20) + 3 * 512;

fn no_codec(codec: u32, _: &[u8], _: u32) -> Result<Vec<u8>, FormatError> {
    panic!("VHD has no compressed extents (codec {codec})")
}

fn check(name: &str, opts: &str) -> (Stats, u64) {
    let dir = Scratch::new(name);
    let data = source_data(SIZE);
    let img = qemu_image(&dir, name, &data, "vpc", opts);
    let file = std::fs::read(&img).unwrap();
    let vpc = Vpc::open(&file).expect("open");
    let expected = qemu_raw(&dir, &img, "vpc");
    assert_eq!(vpc.virtual_size(), expected.len() as u64);
    let (raw, stats) = rebuild(
        &file,
        vpc.virtual_size(),
        6,
        &|off, max| vpc.map(&file, off, max),
        &no_codec,
    );
    assert_eq!(sha256(&raw), sha256(&expected));
    (stats, vpc.virtual_size())
}

#[test]
fn dynamic_matches_qemu() {
    // Without force_size qemu-img rounds the size up to a CHS geometry and
    // writes that as the current size too.
    let (stats, size) = check("vpc-dynamic", "");
    assert!(size >= SIZE as u64);
    assert!(
        stats.zero_bytes > 0,
        "unallocated blocks map to zero extents"
    );
    assert!(stats.data_bytes > 0);
}

#[test]
fn dynamic_force_size_matches_qemu() {
    let (_, size) = check("vpc-dynamic-force", "force_size=on");
    assert_eq!(size, SIZE as u64);
}

#[test]
fn fixed_force_size_matches_qemu() {
    let (stats, size) = check("vpc-fixed", "subformat=fixed,force_size=on");
    assert_eq!(size, SIZE as u64, "force_size keeps the exact size");
    assert_eq!(stats.data_bytes, size);
}

#[test]
fn empty_one_tebibyte_image_is_one_zero_run() {
    let dir = Scratch::new("vpc-1t");
    let file = qemu_create(&dir, "empty", "vpc", "force_size=on", "1T");
    let vpc = Vpc::open(&file).expect("open");
    assert_eq!(vpc.virtual_size(), 1 << 40);
    let pages = zero_walk(vpc.virtual_size(), &|off, max| vpc.map(&file, off, max));
    assert!(pages <= 8, "{pages} pages");
}
