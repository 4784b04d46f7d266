//! A VM's disks: the model ([`StorageConfig`] with its [`DiskRole`]) and
//! the role invariants ([`rules::validate`]) that every create, start,
//! snapshot, clone and restore checks. A plugin may propose a plan; only
//! the host decides.

pub mod model;
pub mod rules;

pub use model::{DiskRole, FsType, StorageConfig};
pub use rules::{validate, Context, Violation, Violations};
