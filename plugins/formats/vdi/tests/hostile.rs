//! Hostile inputs end in a clear error: no panic, no read outside the file,
//! bounded memory and time.

use cocoon_format_common::test_support::*;
use cocoon_format_common::{ErrorKind, FormatError};
use cocoon_format_vdi::Vdi;

fn fixture(name: &str) -> Vec<u8> {
    hostile_fixture("vdi", name, "")
}

fn outcome(file: &[u8]) -> Result<(), FormatError> {
    cocoon_format_common::test_support::outcome::<Vdi>(file)
}

fn refused(file: &[u8], needle: &str) -> FormatError {
    refused_as::<Vdi>(file, needle)
}

fn put32(file: &mut [u8], at: usize, v: u32) {
    file[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn truncated_header() {
    let file = fixture("vdi-trunc");
    refused(&file[..100], "truncated");
    assert!(outcome(&[]).is_err());
}

#[test]
fn random_bytes_after_the_magic() {
    let mut rng = Rng::new(17);
    for round in 0..300 {
        let mut file = vec![0u8; 4096];
        rng.fill(&mut file);
        file[..0x40].copy_from_slice(&[b'<'; 0x40]);
        put32(&mut file, 0x40, 0xbeda_107f);
        assert!(outcome(&file).is_err(), "random image {round} was accepted");
    }
}

#[test]
fn block_past_eof() {
    let mut file = fixture("vdi-eof");
    let bmap = le32(&file, 0x154) as usize;
    put32(&mut file, bmap, 0x7fff_0000);
    refused(&file, "past the end");
}

#[test]
fn block_map_into_the_header() {
    let mut file = fixture("vdi-header");
    put32(&mut file, 0x154, 0);
    refused(&file, "after the header");
}

#[test]
fn data_offset_into_the_block_map() {
    let mut file = fixture("vdi-data");
    let bmap = le32(&file, 0x154);
    put32(&mut file, 0x158, bmap);
    refused(&file, "before the end of the block map");
}

#[test]
fn huge_virtual_size_on_a_tiny_file() {
    let mut file = fixture("vdi-huge");
    file[0x170..0x178].copy_from_slice(&(1u64 << 50).to_le_bytes());
    refused(&file, "needs more than");
    put32(&mut file, 0x180, 1 << 30);
    refused(&file, "not inside");
    file[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&file, "overflows");
}

#[test]
fn differencing_is_refused() {
    let mut file = fixture("vdi-diff");
    file[0x1b8] = 1;
    assert_eq!(refused(&file, "parent").kind, ErrorKind::Unsupported);
}

#[test]
fn mutated_metadata_never_panics() {
    let file = fixture("vdi-mutate");
    mutate(&file, 0..1024, 600, &outcome);
}
