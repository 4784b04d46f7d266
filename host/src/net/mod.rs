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
#[serde(deny_unknown_fields)]
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

/// The NICs of a clone of a VM (or of a snapshot) that had `nics`: the
/// same attachments and addressing, and every MAC new, given ones too (a
/// clone on the same bridge as its origin must not answer for the
/// origin's addresses). The new MACs are random locally administered
/// unicast addresses, distinct from each other, from the origin's and from
/// everything in `taken` (the host's other VMs' NICs).
pub fn clone_nics(nics: &[Nic], taken: &HashSet<MacAddr>) -> Result<Vec<Nic>, MacError> {
    let mut avoid = taken.clone();
    avoid.extend(nics.iter().map(|n| n.mac));
    let macs = mac::assign(&vec![None; nics.len()], &avoid)?;
    Ok(nics
        .iter()
        .zip(macs)
        .map(|(n, mac)| Nic { mac, ..n.clone() })
        .collect())
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
    attach_named(netlink, nics, |_| tap_pattern.to_string())
}

/// [`attach`] with the name (or `%d` pattern) of each bridge NIC's new
/// tap given by NIC index.
pub fn attach_named(
    netlink: &Netlink,
    nics: &[Nic],
    tap_name: impl Fn(usize) -> String,
) -> Result<Vec<AttachedNic>, TapError> {
    let mut done: Vec<AttachedNic> = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        let step = match &nic.attach {
            Attachment::Tap(name) => netlink.check_tap(name).map(|()| (name.clone(), false)),
            Attachment::Bridge(bridge) => netlink
                .create_on_bridge(bridge, &tap_name(i))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_keeps_its_nics_but_gets_new_macs() {
        let nics = resolve(
            vec![
                "tap=mine0,mac=02:00:00:00:00:01".parse().unwrap(),
                NicSpec {
                    attach: Attachment::Bridge("br0".into()),
                    mac: None,
                    addressing: Addressing::Static {
                        address: "10.0.0.2/24".parse().unwrap(),
                        gateway: Some("10.0.0.1".parse().unwrap()),
                    },
                },
            ],
            &HashSet::new(),
        )
        .unwrap();
        let other: MacAddr = "02:00:00:00:00:99".parse().unwrap();
        let taken: HashSet<MacAddr> = [other].into();
        for _ in 0..64 {
            let clone = clone_nics(&nics, &taken).unwrap();
            assert_eq!(clone.len(), nics.len());
            for (c, n) in clone.iter().zip(&nics) {
                assert_eq!(c.attach, n.attach);
                assert_eq!(c.addressing, n.addressing);
                assert!(c.mac.is_locally_administered() && !c.mac.is_multicast());
                assert!(
                    nics.iter().all(|n| n.mac != c.mac),
                    "{} is the origin's",
                    c.mac
                );
                assert_ne!(c.mac, other);
            }
            assert_ne!(clone[0].mac, clone[1].mac);
        }
        assert!(clone_nics(&[], &taken).unwrap().is_empty());
    }
}
