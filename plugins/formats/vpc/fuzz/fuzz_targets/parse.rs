//! Opens arbitrary bytes as vpc and walks the whole map in bounded pages,
//! checking the invariants the host relies on: extents contiguous, inside
//! the virtual disk, and data inside the file.
#![no_main]

use cocoon_format_common::Run;
use cocoon_format_vpc::Vpc;
use libfuzzer_sys::fuzz_target;

/// Pages per input: enough for any image a fuzzer builds, and a bound on
/// the time one input may take.
const MAX_PAGES: usize = 4096;
const PAGE: usize = 64;

fuzz_target!(|data: &[u8]| {
    let _ = cocoon_format_vpc::probe(data, data);
    let src = data.to_vec();
    let size = src.len() as u64;
    let Ok(image) = Vpc::open(&src) else {
        return;
    };
    let virtual_size = image.virtual_size();
    let mut pos = 0u64;
    for _ in 0..MAX_PAGES {
        let Ok(page) = image.map(&src, pos, PAGE) else {
            return;
        };
        if page.is_empty() {
            assert!(pos >= virtual_size, "map ended early at {pos}");
            return;
        }
        assert!(page.len() <= PAGE);
        for e in page {
            assert_eq!(e.offset, pos, "extents must be contiguous");
            assert!(e.length > 0);
            let end = e
                .offset
                .checked_add(e.length)
                .expect("extent end overflows");
            assert!(end <= virtual_size, "extent {e:?} past the virtual size");
            match e.run {
                Run::Data(at) => {
                    let data_end = at.checked_add(e.length);
                    assert!(
                        data_end.is_some_and(|x| x <= size),
                        "data run {e:?} past the end of the file"
                    );
                }
                Run::Compressed { .. } => panic!("{e:?}: this format has no compression"),
                Run::Zero | Run::Backing => {}
            }
            pos = end;
        }
    }
});
