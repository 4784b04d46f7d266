//! A disk policy built against the frozen 0.1.0 contract. The policy
//! interface changed in 0.2.0, so the host must refuse it, naming both
//! versions.

wit_bindgen::generate!({
    world: "disk-policy",
    path: "../../../wit/v0.1.0",
});

use cocoon::plugin::types::Error;
use exports::cocoon::plugin::policy::{Disk, Guest, Violation, VmRequest};

struct LegacyPolicy;

impl Guest for LegacyPolicy {
    fn plan(_request: VmRequest) -> Result<Vec<Disk>, Error> {
        Ok(Vec::new())
    }

    fn validate(_request: VmRequest) -> Vec<Violation> {
        Vec::new()
    }
}

export!(LegacyPolicy);
