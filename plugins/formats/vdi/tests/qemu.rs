//! Conformance against qemu-img: images made by qemu-img from mixed source
//! data, rebuilt from our extent map, must equal `qemu-img convert -O raw`.

use cocoon_format_common::test_support::*;
use cocoon_format_common::FormatError;
use cocoon_format_vdi::Vdi;

const SIZE: usize = 9 * (1 << 20) + 3 * 512;

fn no_codec(codec: u32, _: &[u8], _: u32) -> Result<Vec<u8>, FormatError> {
    panic!("VDI has no compressed extents (codec {codec})")
}

fn check(name: &str, opts: &str) -> Stats {
    let dir = Scratch::new(name);
    let data = source_data(SIZE);
    let img = qemu_image(&dir, name, &data, "vdi", opts);
    let file = std::fs::read(&img).unwrap();
    let vdi = Vdi::open(&file).expect("open");
    let expected = qemu_raw(&dir, &img, "vdi");
    assert_eq!(vdi.virtual_size(), expected.len() as u64);
    let (raw, stats) = rebuild(
        &file,
        vdi.virtual_size(),
        4,
        &|off, max| vdi.map(&file, off, max),
        &no_codec,
    );
    assert_eq!(sha256(&raw), sha256(&expected));
    stats
}

#[test]
fn dynamic_matches_qemu() {
    let stats = check("vdi-dynamic", "");
    assert!(
        stats.zero_bytes > 0,
        "unallocated blocks map to zero extents"
    );
    assert!(stats.data_bytes > 0);
}

#[test]
fn static_matches_qemu() {
    let stats = check("vdi-static", "static=on");
    assert_eq!(
        stats.zero_bytes, 0,
        "a static image has every block allocated"
    );
}

#[test]
fn empty_one_tebibyte_image_is_one_zero_run() {
    let dir = Scratch::new("vdi-1t");
    let file = qemu_create(&dir, "empty", "vdi", "", "1T");
    let vdi = Vdi::open(&file).expect("open");
    assert_eq!(vdi.virtual_size(), 1 << 40);
    let pages = zero_walk(vdi.virtual_size(), &|off, max| vdi.map(&file, off, max));
    assert!(pages <= 16, "{pages} pages");
}
