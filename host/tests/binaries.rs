//! The shipped binaries as files: both link with packed (RELR) relative
//! relocations. Without them the dynamic loader of every VM's monitor read,
//! and kept resident, hundreds of KiB of RELA entries (the monitor, a binary
//! added later, was once built without the flag).

use std::path::Path;

const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_RELASZ: u64 = 8;
const DT_RELR: u64 = 36;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn usize_at(b: &[u8], at: usize) -> usize {
    usize::try_from(u64_at(b, at)).expect("an offset in a file we read whole")
}

/// The (tag, value) entries of an ELF64 little-endian file's dynamic
/// section, found through its program headers.
fn dynamic_entries(path: &Path) -> Vec<(u64, u64)> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..4], b"\x7fELF", "{}: not an ELF file", path.display());
    assert_eq!((b[4], b[5]), (2, 1), "{}: not ELF64 LE", path.display());
    let (phoff, phentsize, phnum) = (
        usize_at(&b, 0x20),
        u16_at(&b, 0x36) as usize,
        u16_at(&b, 0x38) as usize,
    );
    let dynamic = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32_at(&b, ph) == PT_DYNAMIC)
        .unwrap_or_else(|| panic!("{}: no PT_DYNAMIC", path.display()));
    let (offset, size) = (usize_at(&b, dynamic + 8), usize_at(&b, dynamic + 32));
    (offset..offset + size)
        .step_by(16)
        .map(|at| (u64_at(&b, at), u64_at(&b, at + 8)))
        .take_while(|&(tag, _)| tag != DT_NULL)
        .collect()
}

#[test]
fn both_binaries_link_with_packed_relative_relocations() {
    for bin in [
        env!("CARGO_BIN_EXE_cocoon-host"),
        env!("CARGO_BIN_EXE_cocoon-monitor"),
    ] {
        let entries = dynamic_entries(Path::new(bin));
        assert!(
            entries.iter().any(|&(tag, _)| tag == DT_RELR),
            "{bin}: no DT_RELR, so its relative relocations are RELA entries \
             (build.rs must pass -z pack-relative-relocs for it)"
        );
        // What is left in RELA: symbol relocations, a few KiB.
        let rela = entries
            .iter()
            .find(|&&(tag, _)| tag == DT_RELASZ)
            .map_or(0, |&(_, v)| v);
        assert!(rela < 64 << 10, "{bin}: {rela} bytes of RELA relocations");
    }
}
