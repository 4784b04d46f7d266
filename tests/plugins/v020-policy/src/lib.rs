//! A disk policy built against the frozen 0.2.0 contract (wit/v0.2.0),
//! without the SDK. 0.2.1 only added the layer-reader world, so the host
//! must keep loading it and calling it, host imports included.

wit_bindgen::generate!({
    world: "disk-policy",
    path: "../../../wit/v0.2.0",
});

use cocoon::plugin::host::{log, LogLevel};
use cocoon::plugin::types::Error;
use exports::cocoon::plugin::policy::{Disk, DiskRole, Guest, Violation, VmRequest};

struct V020Policy;

impl Guest for V020Policy {
    fn plan(request: VmRequest) -> Result<Vec<Disk>, Error> {
        log(LogLevel::Info, "v0.2.0 policy planning", &[]);
        Ok(vec![Disk {
            name: "cocoon-root".into(),
            role: DiskRole::Cow,
            read_only: false,
            size_bytes: request.cow_size.or(Some(1 << 30)),
            mount_point: None,
            fstype: None,
            direct_io: None,
            file: None,
        }])
    }

    fn validate(request: VmRequest) -> Vec<Violation> {
        if request.name == "refused" {
            vec![Violation {
                field: "name".into(),
                message: "refused by the 0.2.0 policy".into(),
            }]
        } else {
            Vec::new()
        }
    }
}

export!(V020Policy);
