//! The monitor's REST API, as both sides see it (docs/api.md). JSON
//! bodies; the console is raw bytes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::record::VmState;
use crate::disk::model::StorageConfig;

pub const PATH_VM: &str = "/v1/vm";
pub const PATH_PAUSE: &str = "/v1/vm/pause";
pub const PATH_RESUME: &str = "/v1/vm/resume";
pub const PATH_SHUTDOWN: &str = "/v1/vm/shutdown";
pub const PATH_STOP: &str = "/v1/vm/stop";
pub const PATH_SNAPSHOT: &str = "/v1/vm/snapshot";
pub const PATH_CONSOLE: &str = "/v1/console";
pub const PATH_CONSOLE_INPUT: &str = "/v1/console/input";

/// Headers of a console read: where the bytes start (later than asked
/// when the ring dropped older output) and the offset to ask for next.
pub const HEADER_CONSOLE_START: &str = "cocoon-console-start";
pub const HEADER_CONSOLE_NEXT: &str = "cocoon-console-next";

/// Bodies larger than this are refused (413) before they are read whole.
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Console input per request.
pub const MAX_INPUT_BYTES: usize = 4 << 10;
/// Console bytes per read.
pub const MAX_CONSOLE_READ: usize = 256 << 10;
/// The longest a console read may wait for output.
pub const MAX_WAIT_MS: u64 = 30_000;

/// `GET /v1/vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub name: String,
    pub id: String,
    pub state: VmState,
    /// The monitor's pid.
    pub pid: u32,
    pub cpus: u8,
    pub memory: u64,
    pub disks: Vec<StorageConfig>,
    /// Unix seconds.
    pub started_at: u64,
    /// Console bytes written so far (the next read's offset for "now").
    pub console_end: u64,
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `PUT /v1/console/input`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputAccepted {
    pub accepted: usize,
}

/// `PUT /v1/vm/snapshot`: the snapshot to write under
/// `STATE/snapshots/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
}

/// The answer to `PUT /v1/vm/snapshot`: the snapshot exists, whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTaken {
    pub name: String,
    pub dir: PathBuf,
    /// How long the guest was paused for the snapshot, in milliseconds (0
    /// when it was paused already: it stays paused).
    pub paused_ms: f64,
    /// Writing the VMM's files and copying the disks (inside the pause).
    pub capture_ms: f64,
    /// Hashing every file, the sidecar and the rename (the guest runs).
    pub finish_ms: f64,
    pub memory_bytes: u64,
    /// Bytes of the memory file that hold data (the rest are holes).
    pub memory_data_bytes: u64,
    /// How each disk was copied: serial and `reflink` or `sparse`.
    pub copies: Vec<DiskCopy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCopy {
    pub serial: String,
    pub method: String,
}
