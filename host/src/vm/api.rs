//! The monitor's REST API, as both sides see it (docs/api.md). JSON
//! bodies; the console is raw bytes.

use serde::{Deserialize, Serialize};

use super::record::VmState;
use crate::disk::model::StorageConfig;

pub const PATH_VM: &str = "/v1/vm";
pub const PATH_PAUSE: &str = "/v1/vm/pause";
pub const PATH_RESUME: &str = "/v1/vm/resume";
pub const PATH_SHUTDOWN: &str = "/v1/vm/shutdown";
pub const PATH_STOP: &str = "/v1/vm/stop";
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
