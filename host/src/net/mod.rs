//! A VM's network: the `--nic` / `--network` specs ([`spec`]), MAC
//! addresses ([`mac`]), the taps behind the NICs ([`tap`], over netlink)
//! and the NICs' entries in the cloud-init seed ([`cidata`]).
//!
//! The flow for a VM: [`spec::plan`] the specs, [`resolve`] them to
//! [`Nic`]s (every MAC fixed), [`attach`] them (check the given taps,
//! create one per bridge NIC) and hand [`AttachedNic::vmm_config`] to the
//! VMM; when the VM stops, [`release`] deletes the taps the host created.

pub mod cidata;
pub mod mac;
pub mod spec;
pub mod tap;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

pub use mac::{MacAddr, MacError};
pub use spec::{Addressing, Attachment, NetworkSpec, NicSpec, SpecError};
pub use tap::{Netlink, TapError};

/// A NIC with its MAC fixed: what a VM record keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub attach: Attachment,
    pub mac: MacAddr,
    pub addressing: Addressing,
}

/// Fixes every NIC's MAC ([`mac::assign`]); `taken` holds addresses that
/// must not be drawn (other VMs' NICs on this host).
pub fn resolve(specs: Vec<NicSpec>, taken: &HashSet<MacAddr>) -> Result<Vec<Nic>, MacError> {
    let macs = mac::assign(&specs.iter().map(|s| s.mac).collect::<Vec<_>>(), taken)?;
    Ok(specs
        .into_iter()
        .zip(macs)
        .map(|(s, mac)| Nic {
            attach: s.attach,
            mac,
            addressing: s.addressing,
        })
        .collect())
}

/// A NIC with its tap in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedNic {
    pub nic: Nic,
    pub tap: String,
    /// The host created the tap (on a bridge) and deletes it on release.
    pub created: bool,
}

impl AttachedNic {
    pub fn vmm_config(&self) -> cocoon_vmm::NetConfig {
        cocoon_vmm::NetConfig {
            tap: self.tap.clone(),
            mac: self.nic.mac.0,
        }
    }
}

/// Puts a tap behind every NIC: a given tap is checked (it exists, is a
/// tap, nobody holds it), a bridge NIC gets a new tap named from
/// `tap_pattern` (`cctap%d`) on that bridge. All or nothing: on an error
/// the taps created so far are deleted again.
pub fn attach(
    netlink: &Netlink,
    nics: &[Nic],
    tap_pattern: &str,
) -> Result<Vec<AttachedNic>, TapError> {
    let mut done: Vec<AttachedNic> = Vec::new();
    for nic in nics {
        let step = match &nic.attach {
            Attachment::Tap(name) => netlink.check_tap(name).map(|()| (name.clone(), false)),
            Attachment::Bridge(bridge) => netlink
                .create_on_bridge(bridge, tap_pattern)
                .map(|name| (name, true)),
        };
        match step {
            Ok((tap, created)) => done.push(AttachedNic {
                nic: nic.clone(),
                tap,
                created,
            }),
            Err(e) => {
                let _ = release(netlink, &done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Deletes the taps the host created for these NICs (a tap already gone
/// is fine); taps the user gave are left alone. Tries every one and
/// returns the first error.
pub fn release(netlink: &Netlink, nics: &[AttachedNic]) -> Result<(), TapError> {
    let mut first = None;
    for n in nics.iter().filter(|n| n.created) {
        if let Err(e) = netlink.delete_tap(&n.tap) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
