//! The `[store]` table of the host config file: the bounds of network
//! work.
//!
//! ```toml
//! [store]
//! max_download_bytes = 137438953472  # cap of a download whose size nobody announced
//! min_rate_bytes_per_sec = 1024      # slower than this over a window is a stall
//! rate_window_secs = 30              # that window (also the longest wait for an answer)
//! download_deadline_secs = 43200     # one artifact's download, retries included
//! ```

use std::time::Duration;

/// What the operator says about the store; every key optional.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// The most bytes one download may bring when neither the source nor
    /// the server announced a size (and the cap of any announced size).
    pub max_download_bytes: u64,
    /// A transfer slower than this, averaged over `rate_window_secs`, is
    /// abandoned (and retried).
    pub min_rate_bytes_per_sec: u64,
    /// The window of the minimum rate, and the longest wait for a server's
    /// first answer.
    pub rate_window_secs: u64,
    /// The longest one artifact's download may take, retries included.
    pub download_deadline_secs: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            max_download_bytes: 128 << 30,
            min_rate_bytes_per_sec: 1024,
            rate_window_secs: 30,
            download_deadline_secs: 12 * 3600,
        }
    }
}

/// A key of `[store]` with a value it cannot have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSetting {
    pub field: &'static str,
    pub value: u64,
    pub reason: &'static str,
}

impl StoreSettings {
    /// The first key whose value makes no sense, if any.
    pub fn check(&self) -> Result<(), BadSetting> {
        let bad = |field, value, reason| {
            Err(BadSetting {
                field,
                value,
                reason,
            })
        };
        if self.max_download_bytes == 0 {
            return bad("store.max_download_bytes", 0, "must be at least 1");
        }
        if self.rate_window_secs == 0 {
            return bad("store.rate_window_secs", 0, "must be at least 1");
        }
        if self.download_deadline_secs == 0 {
            return bad("store.download_deadline_secs", 0, "must be at least 1");
        }
        if self.download_deadline_secs < self.rate_window_secs {
            return bad(
                "store.download_deadline_secs",
                self.download_deadline_secs,
                "must be at least store.rate_window_secs",
            );
        }
        Ok(())
    }

    pub fn rate_window(&self) -> Duration {
        Duration::from_secs(self.rate_window_secs)
    }

    pub fn download_deadline(&self) -> Duration {
        Duration::from_secs(self.download_deadline_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert_eq!(StoreSettings::default().check(), Ok(()));
        let cases: [(StoreSettings, Option<&str>); 6] = [
            (
                StoreSettings {
                    max_download_bytes: 0,
                    ..Default::default()
                },
                Some("store.max_download_bytes"),
            ),
            (
                StoreSettings {
                    rate_window_secs: 0,
                    ..Default::default()
                },
                Some("store.rate_window_secs"),
            ),
            (
                StoreSettings {
                    download_deadline_secs: 0,
                    ..Default::default()
                },
                Some("store.download_deadline_secs"),
            ),
            (
                StoreSettings {
                    rate_window_secs: 10,
                    download_deadline_secs: 5,
                    ..Default::default()
                },
                Some("store.download_deadline_secs"),
            ),
            (
                StoreSettings {
                    min_rate_bytes_per_sec: 0,
                    ..Default::default()
                },
                None,
            ),
            (
                StoreSettings {
                    rate_window_secs: 1,
                    download_deadline_secs: 1,
                    max_download_bytes: 1,
                    min_rate_bytes_per_sec: 1,
                },
                None,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(s.check().err().map(|e| e.field), want, "{s:?}");
        }
    }
}
