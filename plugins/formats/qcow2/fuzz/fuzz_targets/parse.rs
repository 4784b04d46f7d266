//! Opens arbitrary bytes as qcow2 and walks the whole map in bounded pages,
//! checking the invariants the host relies on (see check_walk).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cocoon_format_common::check_walk::<cocoon_format_qcow2::Qcow2>(data);
});
