//! VMs: records under `STATE/vms/ID/`, the monitor process that runs each
//! VM and serves its API, the client the CLI uses, and the create and
//! start steps of `cocoon-host run`.

pub mod api;
pub mod client;
pub mod clone_boot;
pub mod create;
pub mod guest_boot;
pub mod monitor;
pub mod monitor_lock;
pub mod name;
pub mod nics;
pub mod record;
pub mod roots;
pub mod snapshot;
pub mod spawn;
pub mod vms;

use std::path::{Path, PathBuf};

pub use record::{ExitKind, VmRecord, VmState};
pub use vms::{VmEntry, Vms};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error(transparent)]
    Lock(crate::disk::lock::LockError),
    #[error("no VM named {vm} (and no VM id starts with it)")]
    NotFound { vm: String },
    #[error("{count} VM ids start with {vm}; give more of the id or the name")]
    Ambiguous { vm: String, count: usize },
    #[error("VM name {name:?} {why}")]
    BadName { name: String, why: &'static str },
    #[error("a VM named {name} exists already")]
    NameTaken { name: String },
    #[error("VM {vm} is {state}; {what}")]
    WrongState {
        vm: String,
        state: VmState,
        what: &'static str,
    },
    #[error("VM {vm} is busy: {holder}")]
    Busy { vm: String, holder: String },
    #[error("VM {vm}: its monitor did not start: {reason}")]
    MonitorStart { vm: String, reason: String },
    #[error("VM {vm}: the API")]
    Api {
        vm: String,
        #[source]
        source: client::ClientError,
    },
}

impl VmError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
        let path = path.to_path_buf();
        move |source| VmError::Io { what, path, source }
    }
}
