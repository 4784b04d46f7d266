//! Conformance against qemu-img: images made by qemu-img from mixed source
//! data, rebuilt from our extent map, must equal `qemu-img convert -O raw`.

use cocoon_format_common::test_support::*;
use cocoon_format_vmdk::{decode, Vmdk};

const SIZE: usize = 9 * (1 << 20) + 3 * 512;

/// Rebuilds `file` through the parser and compares with qemu-img's raw
/// output of `img`.
fn check(dir: &Scratch, img: &std::path::Path, file: &[u8]) -> Stats {
    let vmdk = Vmdk::open(&file.to_vec()).expect("open");
    let expected = qemu_raw(dir, img, "vmdk");
    assert_eq!(vmdk.virtual_size(), expected.len() as u64);
    assert_eq!(vmdk.backing(), None);
    let src = file.to_vec();
    let (raw, stats) = rebuild(
        file,
        vmdk.virtual_size(),
        7,
        &|off, max| vmdk.map(&src, off, max),
        &decode,
    );
    assert_eq!(sha256(&raw), sha256(&expected));
    stats
}

#[test]
fn monolithic_sparse_matches_qemu() {
    let dir = Scratch::new("vmdk-sparse");
    let data = source_data(SIZE);
    let img = qemu_image(&dir, "sparse", &data, "vmdk", "");
    let file = std::fs::read(&img).unwrap();
    let stats = check(&dir, &img, &file);
    assert_eq!(stats.compressed_bytes, 0);
    assert!(stats.zero_bytes > 0, "zero runs must map to zero extents");
    assert!(stats.data_bytes > 0);
}

#[test]
fn stream_optimized_matches_qemu() {
    let dir = Scratch::new("vmdk-stream");
    let data = source_data(SIZE);
    let img = qemu_image(&dir, "stream", &data, "vmdk", "subformat=streamOptimized");
    let file = std::fs::read(&img).unwrap();
    let stats = check(&dir, &img, &file);
    assert_eq!(stats.data_bytes, 0);
    assert!(stats.compressed_bytes > 0);
    assert!(stats.zero_bytes > 0);
}

/// VMware writes streamOptimized images as a stream: the header says
/// GD_AT_END and the real grain directory offset is in a footer. qemu-img
/// writes the GD up front, so rewrite its output into the stream layout:
/// header gdOffset = GD_AT_END, then footer marker, footer, end-of-stream.
#[test]
fn stream_optimized_with_footer_matches_qemu() {
    let dir = Scratch::new("vmdk-footer");
    let data = source_data(SIZE);
    let img = qemu_image(&dir, "footer", &data, "vmdk", "subformat=streamOptimized");
    let mut file = std::fs::read(&img).unwrap();
    assert_eq!(file.len() % 512, 0);
    let footer_header = file[..512].to_vec();
    file[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut marker = vec![0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes()); // one sector follows
    marker[12..16].copy_from_slice(&3u32.to_le_bytes()); // MARKER_FOOTER
    file.extend_from_slice(&marker);
    file.extend_from_slice(&footer_header);
    file.extend_from_slice(&[0u8; 512]); // end-of-stream marker
    let patched = dir.path("footer-stream.vmdk");
    std::fs::write(&patched, &file).unwrap();
    let stats = check(&dir, &patched, &file);
    assert!(stats.compressed_bytes > 0);
}

#[test]
fn empty_one_tebibyte_image_is_one_zero_run() {
    let dir = Scratch::new("vmdk-1t");
    let file = qemu_create(&dir, "empty", "vmdk", "", "1T");
    let vmdk = Vmdk::open(&file).expect("open");
    assert_eq!(vmdk.virtual_size(), 1 << 40);
    // qemu preallocates every grain table: 2^24 grains, looked at 2^16 per
    // call at most.
    let pages = zero_walk(vmdk.virtual_size(), &|off, max| vmdk.map(&file, off, max));
    assert!(pages <= 256, "{pages} pages");
}

/// With the zero-grain flag, a grain-table entry of 1 reads as zeros.
#[test]
fn zeroed_grain_entries_match_qemu() {
    let dir = Scratch::new("vmdk-zeroed");
    let data = source_data(SIZE);
    let img = qemu_image(&dir, "zeroed", &data, "vmdk", "");
    let mut file = std::fs::read(&img).unwrap();
    let flags = le32(&file, 8) | 4;
    file[8..12].copy_from_slice(&flags.to_le_bytes());
    let gd = le64(&file, 56) as usize * 512;
    let gt = le32(&file, gd) as usize * 512;
    // Zero the first three allocated grains.
    let allocated: Vec<usize> = (0..512)
        .map(|i| gt + 4 * i)
        .filter(|&at| le32(&file, at) > 1)
        .take(3)
        .collect();
    assert_eq!(allocated.len(), 3);
    for at in allocated {
        file[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
    }
    let patched = dir.path("zeroed-patched.vmdk");
    std::fs::write(&patched, &file).unwrap();
    let stats = check(&dir, &patched, &file);
    assert!(stats.zero_bytes >= 3 * 65536);
}

/// A delta image names its parent; its unallocated grains read from it.
#[test]
fn delta_image_reports_its_parent() {
    let dir = Scratch::new("vmdk-delta");
    qemu_create(&dir, "base", "vmdk", "", "4M");
    let out = std::process::Command::new("qemu-img")
        .current_dir(&dir.0)
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            "delta.vmdk",
        ])
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::read(dir.path("delta.vmdk")).unwrap();
    let vmdk = Vmdk::open(&file).expect("open");
    assert_eq!(vmdk.backing(), Some("base.vmdk"));
    let map = vmdk.map(&file, 0, 16).unwrap();
    assert_eq!(map.len(), 1);
    assert_eq!(map[0].run, cocoon_format_common::Run::Backing);
    assert_eq!(map[0].length, 4 << 20);
}
