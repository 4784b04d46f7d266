//! Hostile inputs end in a clear error: no panic, no read outside the file,
//! bounded memory and time.

use cocoon_format_common::test_support::*;
use cocoon_format_common::{ErrorKind, FormatError};
use cocoon_format_vhdx::{crc32c, Vhdx};

const KIB: usize = 1024;

fn fixture(name: &str) -> Vec<u8> {
    hostile_fixture("vhdx", name, "block_size=1M")
}

fn outcome(file: &[u8]) -> Result<(), FormatError> {
    cocoon_format_common::test_support::outcome::<Vhdx>(file)
}

fn refused(file: &[u8], needle: &str) -> FormatError {
    refused_as::<Vhdx>(file, needle)
}

/// (offset, length) of the region whose GUID starts with `first` (the
/// little-endian first field), from the first region table.
fn region(file: &[u8], first: u32) -> (usize, usize) {
    let table = 192 * KIB;
    let count = le32(file, table + 8) as usize;
    (0..count)
        .map(|i| table + 16 + 32 * i)
        .find(|&e| le32(file, e) == first)
        .map(|e| (le64(file, e + 16) as usize, le32(file, e + 24) as usize))
        .expect("region present")
}

fn bat(file: &[u8]) -> usize {
    region(file, 0x2dc2_7766).0
}

/// Offset of the virtual disk size item's value.
fn virtual_size_item(file: &[u8]) -> usize {
    let (meta, _) = region(file, 0x8b7c_a206);
    let count = u16::from_le_bytes([file[meta + 10], file[meta + 11]]) as usize;
    (0..count)
        .map(|i| meta + 32 + 32 * i)
        .find(|&e| le32(file, e) == 0x2fa5_4224)
        .map(|e| meta + le32(file, e + 16) as usize)
        .expect("virtual disk size item")
}

/// Rewrites both headers' checksums after a patch.
fn reseal_headers(file: &mut [u8]) {
    for off in [64 * KIB, 128 * KIB] {
        file[off + 4..off + 8].fill(0);
        let crc = crc32c(&file[off..off + 4 * KIB]);
        file[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

#[test]
fn truncated_headers() {
    let file = fixture("vhdx-trunc");
    refused(&file[..100 * KIB], "no valid region table");
    refused(&file[..66 * KIB], "no valid header");
    assert!(outcome(&file[..4]).is_err());
}

#[test]
fn random_bytes_after_the_magic() {
    let mut rng = Rng::new(11);
    for round in 0..50 {
        let mut file = vec![0u8; 320 * KIB];
        rng.fill(&mut file);
        file[..8].copy_from_slice(b"vhdxfile");
        assert!(outcome(&file).is_err(), "random image {round} was accepted");
    }
}

#[test]
fn block_past_eof() {
    let mut file = fixture("vhdx-eof");
    let at = bat(&file);
    let far = (1u64 << 30) << 20 | 6; // 1 Mi MiB in, fully present
    file[at..at + 8].copy_from_slice(&far.to_le_bytes());
    refused(&file, "past the end");
}

#[test]
fn block_pointing_into_the_header() {
    let mut file = fixture("vhdx-header");
    let at = bat(&file);
    file[at..at + 8].copy_from_slice(&6u64.to_le_bytes()); // offset 0, present
    refused(&file, "into metadata");
}

#[test]
fn unknown_block_state() {
    let mut file = fixture("vhdx-state");
    let at = bat(&file);
    file[at..at + 8].copy_from_slice(&4u64.to_le_bytes());
    refused(&file, "unknown state 4");
}

#[test]
fn huge_virtual_size_on_a_tiny_file() {
    let mut file = fixture("vhdx-huge");
    let item = virtual_size_item(&file);
    file[item..item + 8].copy_from_slice(&(60u64 << 40).to_le_bytes());
    refused(&file, "cannot hold");
    file[item..item + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&file, "over 64 TiB");
}

#[test]
fn region_past_eof() {
    let mut file = fixture("vhdx-region");
    let table = 192 * KIB;
    file[table + 16 + 16..table + 16 + 24].copy_from_slice(&(1u64 << 50).to_le_bytes());
    file[table + 4..table + 8].fill(0);
    let crc = crc32c(&file[table..table + 64 * KIB]);
    file[table + 4..table + 8].copy_from_slice(&crc.to_le_bytes());
    refused(&file, "not inside the file");
}

/// Offset and length of the log, from the first header.
fn log_region(file: &[u8]) -> (usize, usize) {
    (
        le64(file, 64 * KIB + 72) as usize,
        le32(file, 64 * KIB + 68) as usize,
    )
}

#[test]
fn non_empty_log_is_refused() {
    let mut file = fixture("vhdx-log");
    for off in [64 * KIB, 128 * KIB] {
        file[off + 48..off + 64].copy_from_slice(&[0xab; 16]);
    }
    reseal_headers(&mut file);
    // An entry of the current GUID in the log's third 4 KiB sector.
    let (log, len) = log_region(&file);
    assert!(len >= 12 * KIB);
    let entry = log + 8 * KIB;
    file[entry..entry + 4].copy_from_slice(b"loge");
    file[entry + 32..entry + 48].copy_from_slice(&[0xab; 16]);
    let err = refused(&file, "log is not empty");
    assert_eq!(err.kind, ErrorKind::Unsupported);

    // The log region itself outside the file.
    for off in [64 * KIB, 128 * KIB] {
        file[off + 72..off + 80].copy_from_slice(&(1u64 << 50).to_le_bytes());
    }
    reseal_headers(&mut file);
    refused(&file, "log at offset");
}

#[test]
fn mutated_metadata_never_panics() {
    let file = fixture("vhdx-mutate");
    let (meta, _) = region(&file, 0x8b7c_a206);
    let at = bat(&file);
    mutate(&file, 0..320 * KIB, 300, &outcome);
    mutate(&file, meta..meta + 64 * KIB + 64, 300, &outcome);
    // The BAT has no checksum: every mutation reaches the map.
    mutate(&file, at..at + 64, 300, &outcome);
}

/// A BAT file offset near 2^64: the end check must not overflow.
#[test]
fn block_offset_at_the_top_of_u64() {
    let mut file = fixture("vhdx-top");
    let at = bat(&file);
    let top = !0xf_ffffu64 | 6;
    file[at..at + 8].copy_from_slice(&top.to_le_bytes());
    refused(&file, "past the end");
}
