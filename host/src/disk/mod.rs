//! A VM's disks: the model ([`StorageConfig`] with its [`DiskRole`]), the
//! role invariants ([`rules::validate`]) that every create, start,
//! snapshot, clone and restore checks, planning with a disk policy
//! ([`plan`]), `--data-disk` flags ([`spec`]), making the files
//! ([`create`], [`copy`], [`cidata`]) and the per-disk and per-VM locks
//! ([`lock`]). A plugin may propose a plan; only the host decides.

pub mod cidata;
pub mod copy;
pub mod create;
pub mod lock;
pub mod model;
mod newfile;
pub mod plan;
pub mod rules;
pub mod spec;

pub use create::{create, CreateError, Created};
pub use lock::{DiskLocks, LockError, VmLock, Wait};
pub use model::{DiskRole, FsType, StorageConfig};
pub use plan::{plan, DiskPolicy, DiskRequest, Plan, PlanError, PlannedDisk, PolicyRequest};
pub use rules::{validate, Context, Violation, Violations};
pub use spec::{DataDisk, DataDiskSpec, SpecError};
