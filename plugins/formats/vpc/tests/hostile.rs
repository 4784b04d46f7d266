//! Hostile inputs end in a clear error: no panic, no read outside the file,
//! bounded memory and time.

use cocoon_format_common::test_support::*;
use cocoon_format_common::{ErrorKind, FormatError};
use cocoon_format_vpc::Vpc;

fn fixture(name: &str, opts: &str) -> Vec<u8> {
    hostile_fixture("vpc", name, opts)
}

fn outcome(file: &[u8]) -> Result<(), FormatError> {
    cocoon_format_common::test_support::outcome::<Vpc>(file)
}

fn refused(file: &[u8], needle: &str) -> FormatError {
    refused_as::<Vpc>(file, needle)
}

/// Rewrites the checksum of the 512-byte footer at `at`.
fn reseal_footer(file: &mut [u8], at: usize) {
    file[at + 64..at + 68].fill(0);
    let sum = file[at..at + 512]
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    file[at + 64..at + 68].copy_from_slice(&(!sum).to_be_bytes());
}

/// Sets the current size in both footer copies of a dynamic disk.
fn set_size(file: &mut [u8], size: u64) {
    let end = file.len() - 512;
    for at in [0, end] {
        file[at + 48..at + 56].copy_from_slice(&size.to_be_bytes());
        reseal_footer(file, at);
    }
}

/// Offset of the BAT of a dynamic disk.
fn bat(file: &[u8]) -> usize {
    let header = be64(file, 16) as usize;
    be64(file, header + 16) as usize
}

/// Index of the first allocated BAT entry.
fn first_allocated(file: &[u8]) -> usize {
    let at = bat(file);
    (0..)
        .map(|i| at + 4 * i)
        .find(|&e| be32(file, e) != u32::MAX)
        .unwrap()
}

#[test]
fn truncated_files() {
    let file = fixture("vpc-trunc", "");
    refused(&file[..100], "truncated");
    // The head copy survives, but the dynamic header it points to is gone.
    refused(&file[..1000], "past the end");
    assert!(outcome(&[]).is_err());
}

#[test]
fn random_bytes_after_the_magic() {
    let mut rng = Rng::new(13);
    for round in 0..300 {
        let mut file = vec![0u8; 4096];
        rng.fill(&mut file);
        file[..8].copy_from_slice(b"conectix");
        let end = file.len() - 512;
        file[end..end + 8].copy_from_slice(b"conectix");
        assert!(outcome(&file).is_err(), "random image {round} was accepted");
    }
}

#[test]
fn block_past_eof() {
    let mut file = fixture("vpc-eof", "");
    let e = first_allocated(&file);
    file[e..e + 4].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
    refused(&file, "past the end");
}

#[test]
fn block_pointing_into_the_header() {
    let mut file = fixture("vpc-header", "");
    let e = first_allocated(&file);
    file[e..e + 4].copy_from_slice(&1u32.to_be_bytes());
    refused(&file, "overlaps metadata");
}

#[test]
fn bat_past_eof() {
    let mut file = fixture("vpc-bat", "");
    let header = be64(&file, 16) as usize;
    file[header + 16..header + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    file[header + 36..header + 40].fill(0);
    let sum = file[header..header + 1024]
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    file[header + 36..header + 40].copy_from_slice(&(!sum).to_be_bytes());
    refused(&file, "not inside");
}

#[test]
fn huge_virtual_size_on_a_tiny_file() {
    let mut file = fixture("vpc-huge", "");
    set_size(&mut file, 1 << 50);
    refused(&file, "BAT has");

    let mut fixed = fixture("vpc-huge-fixed", "subformat=fixed,force_size=on");
    let end = fixed.len() - 512;
    fixed[end + 48..end + 56].copy_from_slice(&(1u64 << 50).to_be_bytes());
    reseal_footer(&mut fixed, end);
    refused(&fixed, "larger than");
}

#[test]
fn bad_checksum_is_refused() {
    let mut file = fixture("vpc-sum", "subformat=fixed,force_size=on");
    let end = file.len() - 512;
    file[end + 48] ^= 1;
    refused(&file, "checksum");
}

#[test]
fn differencing_is_refused() {
    let mut file = fixture("vpc-diff", "");
    let end = file.len() - 512;
    for at in [0, end] {
        file[at + 60..at + 64].copy_from_slice(&4u32.to_be_bytes());
        reseal_footer(&mut file, at);
    }
    assert_eq!(refused(&file, "differencing").kind, ErrorKind::Unsupported);
}

#[test]
fn mutated_metadata_never_panics() {
    let file = fixture("vpc-mutate", "");
    let at = bat(&file);
    mutate(&file, 0..2048, 300, &outcome);
    // The BAT and bitmaps have no checksum: every mutation reaches the map.
    mutate(&file, at..at + 64, 300, &outcome);
    let block = be32(&file, first_allocated(&file)) as usize * 512;
    mutate(&file, block..block + 512, 300, &outcome);
}
