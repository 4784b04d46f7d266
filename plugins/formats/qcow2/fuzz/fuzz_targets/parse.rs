//! Opens arbitrary bytes as qcow2, walks the whole map in bounded pages and
//! decodes the first compressed clusters, checking the invariants the host
//! relies on: extents contiguous, inside the virtual disk, data and
//! compressed runs starting inside the file, decode output of the asked
//! length.
#![no_main]

use cocoon_format_common::Run;
use cocoon_format_qcow2::Qcow2;
use libfuzzer_sys::fuzz_target;

/// Pages per input: a bound on the time one input may take.
const MAX_PAGES: usize = 4096;
const PAGE: u32 = 64;
/// Compressed clusters decoded per input.
const MAX_DECODES: usize = 4;

fuzz_target!(|data: &[u8]| {
    let _ = cocoon_format_qcow2::probe(data);
    let src = data.to_vec();
    let size = src.len() as u64;
    let Ok(image) = Qcow2::open(src) else {
        return;
    };
    let virtual_size = image.virtual_size();
    let mut pos = 0u64;
    let mut decodes = 0;
    for _ in 0..MAX_PAGES {
        let Ok(page) = image.map(pos, PAGE) else {
            return;
        };
        if page.is_empty() {
            assert!(pos >= virtual_size, "map ended early at {pos}");
            return;
        }
        assert!(page.len() <= PAGE as usize);
        for e in page {
            assert_eq!(e.offset, pos, "extents must be contiguous");
            assert!(e.length > 0);
            let end = e
                .offset
                .checked_add(e.length)
                .expect("extent end overflows");
            assert!(end <= virtual_size, "extent {e:?} past the virtual size");
            match e.run {
                Run::Data(at) => assert!(at < size, "data extent {e:?} starts past the file"),
                Run::Compressed {
                    source_offset,
                    source_length,
                    codec,
                } => {
                    let end = source_offset + source_length as u64;
                    assert!(end <= size, "compressed extent {e:?} past the file");
                    if decodes < MAX_DECODES {
                        decodes += 1;
                        let input = &data[source_offset as usize..end as usize];
                        if let Ok(out) =
                            cocoon_format_qcow2::decode(codec, input, e.length as usize)
                        {
                            assert_eq!(out.len() as u64, e.length);
                        }
                    }
                }
                Run::Zero | Run::Backing => {}
            }
            pos = end;
        }
    }
});
