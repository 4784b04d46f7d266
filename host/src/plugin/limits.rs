//! Resource limits of one plugin call: defaults per kind, overridden by the
//! plugin's manifest, then by the operator's config, within host ceilings.

use std::time::Duration;

use super::manifest::PluginKind;
use crate::config::LimitOverrides;

/// No override may go past these.
const MAX_DEADLINE: Duration = Duration::from_secs(600);
const MAX_MEMORY_MIB: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Wall-clock budget of one call into the plugin.
    #[serde(rename = "deadline_ms", serialize_with = "as_millis")]
    pub deadline: Duration,
    /// Cap on one instance's linear memory.
    pub memory_bytes: u64,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Limits {
    /// The defaults of a plugin kind. Image sources wait on the network
    /// through the host; converters decode large clusters; policies only
    /// compute over a small request; layer readers parse headers.
    pub fn for_kind(kind: PluginKind) -> Self {
        let (deadline_ms, memory_mib) = match kind {
            PluginKind::ImageSource => (30_000, 64),
            PluginKind::FormatConverter => (10_000, 256),
            PluginKind::DiskPolicy => (1_000, 32),
            // One call reads one page of tar headers.
            PluginKind::LayerReader => (10_000, 128),
        };
        Limits {
            deadline: Duration::from_millis(deadline_ms),
            memory_bytes: memory_mib << 20,
        }
    }

    /// These limits with `o`'s fields applied, clamped to the ceilings.
    pub fn apply(self, o: &LimitOverrides) -> Self {
        let deadline = o
            .deadline_ms
            .map_or(self.deadline, Duration::from_millis)
            .clamp(Duration::from_millis(1), MAX_DEADLINE);
        let memory_bytes = o
            .memory_mib
            .map_or(self.memory_bytes, |m| m.clamp(1, MAX_MEMORY_MIB) << 20);
        Limits {
            deadline,
            memory_bytes,
        }
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes >> 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_in_order_and_are_clamped() {
        let base = Limits::for_kind(PluginKind::DiskPolicy);
        assert_eq!(base.deadline, Duration::from_secs(1));
        let manifest = LimitOverrides {
            deadline_ms: Some(250),
            memory_mib: None,
        };
        let operator = LimitOverrides {
            deadline_ms: None,
            memory_mib: Some(1 << 20),
        };
        let l = base.apply(&manifest).apply(&operator);
        assert_eq!(l.deadline, Duration::from_millis(250));
        assert_eq!(l.memory_mib(), MAX_MEMORY_MIB);
        let huge = LimitOverrides {
            deadline_ms: Some(u64::MAX),
            memory_mib: None,
        };
        assert_eq!(base.apply(&huge).deadline, MAX_DEADLINE);
    }
}
