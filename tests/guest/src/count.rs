//! `cocoon.count`: a counter kept in guest memory, printed every period by
//! the TSC. A VM restored from a snapshot goes on from the value it had,
//! which is what the snapshot tests look for.

use crate::input::Input;
use crate::say;
use crate::tsc;
use core::sync::atomic::{AtomicU64, Ordering};

/// The counter: a static, so it lives in guest RAM (the image's .bss).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Prints `count n=N tsc=T` every `period_ms`, `ticks` times (0: for ever),
/// watching the host's input meanwhile.
pub fn run(period_ms: u64, ticks: u64, input: &mut Input) {
    let mut printed = 0u64;
    while ticks == 0 || printed < ticks {
        input.wait_ms(period_ms);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
        say!("count n={n} tsc={}", tsc::now());
        printed += 1;
    }
}
