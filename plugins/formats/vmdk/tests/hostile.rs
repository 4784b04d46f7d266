//! Hostile inputs end in a clear error: no panic, no read outside the file,
//! bounded memory and time.

use cocoon_format_common::test_support::*;
use cocoon_format_common::{ErrorKind, FormatError};
use cocoon_format_vmdk::{decode, zlib_codec, Vmdk};

fn fixture(name: &str, opts: &str) -> Vec<u8> {
    hostile_fixture("vmdk", name, opts)
}

fn outcome(file: &[u8]) -> Result<(), FormatError> {
    cocoon_format_common::test_support::outcome::<Vmdk>(file)
}

fn refused(file: &[u8], needle: &str) -> FormatError {
    refused_as::<Vmdk>(file, needle)
}

/// Offset of the first grain table and of its first non-zero entry.
fn first_grain_entry(file: &[u8]) -> (usize, usize) {
    let gd = le64(file, 56) as usize * 512;
    let gt = le32(file, gd) as usize * 512;
    let entry = (0..512)
        .map(|i| gt + 4 * i)
        .find(|&at| le32(file, at) != 0)
        .unwrap();
    (gt, entry)
}

#[test]
fn truncated_header() {
    let file = fixture("vmdk-trunc", "");
    refused(&file[..100], "truncated");
    assert!(outcome(&file[..3]).is_err());
    assert!(outcome(&[]).is_err());
}

#[test]
fn random_bytes_after_the_magic() {
    let mut rng = Rng::new(7);
    for round in 0..300 {
        let mut file = vec![0u8; 512 + (round % 8) * 4096];
        rng.fill(&mut file);
        file[..4].copy_from_slice(b"KDMV");
        assert!(
            outcome(&file).is_err(),
            "random header {round} was accepted"
        );
    }
}

#[test]
fn grain_directory_past_eof() {
    let mut file = fixture("vmdk-gd", "");
    let past = (file.len() as u64 / 512) + 10;
    file[56..64].copy_from_slice(&past.to_le_bytes());
    refused(&file, "does not fit");
}

#[test]
fn grain_table_past_eof() {
    let mut file = fixture("vmdk-gt", "");
    let gd = le64(&file, 56) as usize * 512;
    file[gd..gd + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    refused(&file, "past the end");
}

#[test]
fn grain_past_eof() {
    let mut file = fixture("vmdk-grain", "");
    let (_, entry) = first_grain_entry(&file);
    file[entry..entry + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    refused(&file, "past the end");
}

#[test]
fn grain_pointing_into_the_header() {
    let mut file = fixture("vmdk-into-header", "");
    let (_, entry) = first_grain_entry(&file);
    // Sector 2 is inside the embedded descriptor.
    file[entry..entry + 4].copy_from_slice(&2u32.to_le_bytes());
    refused(&file, "points into the metadata");
}

#[test]
fn compressed_grain_past_eof() {
    let mut file = fixture("vmdk-stream-eof", "subformat=streamOptimized");
    let (_, entry) = first_grain_entry(&file);
    let marker = le32(&file, entry) as usize * 512;
    // The marker's compressed size: just under the 2-grain cap, but the
    // file ends before.
    let n = file.len();
    file.truncate(marker + 4096);
    file[marker + 8..marker + 12].copy_from_slice(&100_000u32.to_le_bytes());
    assert!(n > file.len());
    let err = outcome(&file).expect_err("refused");
    assert_eq!(err.kind, ErrorKind::InvalidInput, "{err}");
}

#[test]
fn compressed_grain_size_out_of_range() {
    let mut file = fixture("vmdk-stream-size", "subformat=streamOptimized");
    let (_, entry) = first_grain_entry(&file);
    let marker = le32(&file, entry) as usize * 512;
    file[marker + 8..marker + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    refused(&file, "compressed size");
}

#[test]
fn huge_capacity_on_a_tiny_file() {
    let file = fixture("vmdk-huge", "");
    let mut tiny = file[..64 * 1024].to_vec();
    // 2^40 sectors (512 TiB): the grain directory alone would be 256 MiB.
    tiny[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    refused(&tiny, "does not fit");
    tiny[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&tiny, "overflows");
}

#[test]
fn descriptor_file_naming_etc_shadow() {
    let text = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\n\n# Extent description\n\
                 RW 2048 FLAT \"/etc/shadow\" 0\n";
    assert_eq!(cocoon_format_vmdk::probe(text), Some(100));
    let err = refused(text, "/etc/shadow");
    assert_eq!(err.kind, ErrorKind::Unsupported);
}

#[test]
fn embedded_descriptor_naming_etc_shadow() {
    // qemu follows the embedded descriptor of a KDMV file whose capacity
    // is 0; that must not lead anywhere.
    let mut file = fixture("vmdk-embedded", "");
    file[12..20].copy_from_slice(&0u64.to_le_bytes());
    let desc = le64(&file, 28) as usize * 512;
    let text = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicSparse\"\n\
                 RW 2048 SPARSE \"/etc/shadow\"\n\0";
    file[desc..desc + text.len()].copy_from_slice(text);
    let err = refused(&file, "/etc/shadow");
    assert_eq!(err.kind, ErrorKind::Unsupported);

    // A non-zero capacity and a sole sparse extent, but named by a path.
    let mut file = fixture("vmdk-embedded1", "");
    let text = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicSparse\"\n\
                 RW 12288 SPARSE \"/etc/shadow\"\n\0";
    file[desc..desc + text.len()].copy_from_slice(text);
    refused(&file, "/etc/shadow");

    // Same with a non-zero capacity but a second, external extent.
    let mut file = fixture("vmdk-embedded2", "");
    let text = b"# Disk DescriptorFile\nversion=1\ncreateType=\"twoGbMaxExtentSparse\"\n\
                 RW 2048 SPARSE \"a.vmdk\"\nRW 2048 FLAT \"/etc/shadow\" 0\n\0";
    file[desc..desc + text.len()].copy_from_slice(text);
    refused(&file, "/etc/shadow");
}

#[test]
fn footer_missing_when_gd_at_end() {
    let mut file = fixture("vmdk-nofooter", "subformat=streamOptimized");
    file[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&file, "footer");
}

#[test]
fn decode_refuses_garbage() {
    let codec = zlib_codec(128);
    assert!(decode(codec, b"not zlib at all", 65536).is_err());
    assert!(decode(codec, &[], 512).is_err());
    // A valid stream that inflates to fewer bytes than asked for.
    let short = miniz_oxide::deflate::compress_to_vec_zlib(&[7u8; 100], 6);
    assert!(decode(codec, &short, 512).is_err());
    assert_eq!(decode(codec, &short, 100).unwrap(), vec![7u8; 100]);
    // More than a grain: refused, like qemu.
    let long = miniz_oxide::deflate::compress_to_vec_zlib(&vec![1u8; 65537], 6);
    assert!(decode(codec, &long, 65536).is_err());
}

#[test]
fn mutated_metadata_never_panics() {
    for opts in ["", "subformat=streamOptimized"] {
        let file = fixture("vmdk-mutate", opts);
        let gd = le64(&file, 56) as usize * 512;
        mutate(&file, 0..512, 300, &outcome);
        mutate(&file, gd..gd + 8192, 300, &outcome);
    }
}

/// Found by the fuzzer: a descriptor range that overflows u64.
#[test]
fn descriptor_range_overflow() {
    let mut file = fixture("vmdk-desc-overflow", "");
    file[28..36].copy_from_slice(&((1u64 << 55) - 1).to_le_bytes());
    file[36..44].copy_from_slice(&2u64.to_le_bytes());
    refused(&file, "overflow");
}
