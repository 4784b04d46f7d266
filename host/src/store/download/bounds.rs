//! The bounds of one download: size, rate, time and free space. Pure
//! rules, so they are tested without a clock or a disk.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Failure;
use crate::store::settings::StoreSettings;
use crate::store::StoreError;

/// Free space left over after a download, so the store never fills the
/// filesystem to the last block.
pub const SPACE_RESERVE: u64 = 64 << 20;

/// The bounds of one download.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_bytes: u64,
    pub min_rate: u64,
    pub window: Duration,
    pub deadline: Duration,
}

impl From<&StoreSettings> for Limits {
    fn from(s: &StoreSettings) -> Self {
        Limits {
            max_bytes: s.max_download_bytes,
            min_rate: s.min_rate_bytes_per_sec,
            window: s.rate_window(),
            deadline: s.download_deadline(),
        }
    }
}

/// The minimum-rate rule: every `window`, at least `min_rate × window`
/// bytes must have arrived since the window began. Pure, so the rule is
/// tested without a clock.
#[derive(Debug, Clone)]
pub struct RateGuard {
    min_rate: u64,
    window: Duration,
    since: Instant,
    bytes_then: u64,
}

impl RateGuard {
    pub fn new(min_rate: u64, window: Duration, now: Instant, bytes: u64) -> Self {
        RateGuard {
            min_rate,
            window,
            since: now,
            bytes_then: bytes,
        }
    }

    /// When the current window ends.
    pub fn window_end(&self) -> Instant {
        self.since + self.window
    }

    /// Checks the rule at `now` with `bytes` received in all; a window
    /// that ended opens the next one.
    pub fn check(&mut self, now: Instant, bytes: u64) -> Result<(), Failure> {
        if now < self.window_end() {
            return Ok(());
        }
        let got = bytes - self.bytes_then;
        let secs = self.window.as_secs().max(1);
        if got < self.min_rate.saturating_mul(secs) {
            return Err(Failure::Stalled {
                bytes: got,
                secs,
                min_rate: self.min_rate,
            });
        }
        self.since = now;
        self.bytes_then = bytes;
        Ok(())
    }
}

/// Whether `available` bytes of free space hold `needed` more with the
/// reserve left over.
pub fn enough_space(available: u64, needed: u64) -> bool {
    needed
        .checked_add(SPACE_RESERVE)
        .is_some_and(|n| available >= n)
}

/// Fails with [`StoreError::NoSpace`] when the filesystem of `dir` cannot
/// take `needed` more bytes.
pub fn check_space(dir: &Path, needed: u64) -> Result<(), StoreError> {
    let st = rustix::fs::statvfs(dir)
        .map_err(|e| StoreError::io("checking free space of", dir)(e.into()))?;
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    if enough_space(available, needed) {
        Ok(())
    } else {
        Err(StoreError::NoSpace {
            path: dir.to_path_buf(),
            needed,
            available,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_rule() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = RateGuard::new(100, s(2), t0, 0);
        // Inside the window nothing is judged.
        assert!(g.check(t0 + Duration::from_millis(1999), 0).is_ok());
        // 200 bytes in 2 s is the minimum: passes, and opens a new window.
        assert!(g.check(t0 + s(2), 200).is_ok());
        assert_eq!(g.window_end(), t0 + s(4));
        // 199 more in the next window is too slow.
        match g.check(t0 + s(4), 399) {
            Err(Failure::Stalled {
                bytes: 199,
                secs: 2,
                min_rate: 100,
            }) => {}
            other => panic!("{other:?}"),
        }
        // A rate of 0 never stalls (but the deadline still holds).
        let mut g = RateGuard::new(0, s(1), t0, 5);
        assert!(g.check(t0 + s(10), 5).is_ok());
        // Bytes resumed from an earlier attempt do not count as progress.
        let mut g = RateGuard::new(10, s(1), t0, 1000);
        assert!(g.check(t0 + s(1), 1005).is_err());
    }

    #[test]
    fn free_space_keeps_the_reserve() {
        assert!(enough_space(SPACE_RESERVE + 10, 10));
        assert!(!enough_space(SPACE_RESERVE + 9, 10));
        assert!(!enough_space(u64::MAX, u64::MAX));
        assert!(enough_space(u64::MAX, 0));
    }
}
