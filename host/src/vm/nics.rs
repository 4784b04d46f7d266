//! A VM's NICs through its life, on top of [`crate::net`]:
//!
//! - create: the `--nic`/`--network` specs become [`Nic`]s with every MAC
//!   fixed ([`plan`], MACs drawn apart from the host's other VMs') and
//!   are checked against the host's interfaces ([`check`]) before any
//!   file of the VM exists; the record keeps them;
//! - start: the monitor puts a tap behind each ([`attach`]): a user's tap
//!   is checked, a bridge NIC gets a tap the host creates, named after the
//!   VM ([`tap_name`]);
//! - stop and the monitor's exit: [`release`] deletes the taps the host
//!   created, found by name; after a monitor was killed, the next start
//!   ([`attach`]) or `rm` ([`release_leftovers`]) does. A user's own tap
//!   is never deleted.
//!
//! The names carry the VM's id, so a tap left by a killed monitor is found
//! again without any state written at start, and no VM can take or delete
//! another's. Taps live in the network namespace of the monitor that made
//! them; commands that release them must run in that namespace too.

use std::collections::HashSet;

use serde::Serialize;

use super::Vms;
use crate::net::tap::LinkKind;
use crate::net::{
    self, Addressing, AttachedNic, Attachment, MacAddr, MacError, Netlink, NetworkSpec, Nic,
    NicSpec, SpecError, TapError,
};
use cocoon_vmm::devices::virtio::net::tap::TapError as VmmTapError;

#[derive(Debug, thiserror::Error)]
pub enum NicsError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Mac(#[from] MacError),
    #[error("NIC {spec}: --no-cidata writes no cloud-init seed, so ip= and gw= have nothing to configure")]
    StaticWithoutSeed { spec: String },
    #[error("nic{index} ({what})")]
    Check {
        index: usize,
        what: String,
        // Boxed: netlink's errors are large, and results carry this one.
        #[source]
        source: Box<TapError>,
    },
    #[error(transparent)]
    Tap(Box<TapError>),
    #[error(
        "snapshot {snapshot}'s nic{index} is on tap {tap}, a tap of the user's (--nic tap=), which \
         a clone cannot share with its source: give the clone a tap of its own with \
         `clone --nic tap=NAME` (one for each such NIC, in order)"
    )]
    CloneNeedsTap {
        snapshot: String,
        index: usize,
        tap: String,
    },
    #[error(
        "snapshot {snapshot} has {want} NICs on a user's tap; the clone was given {given} --nic"
    )]
    CloneTapCount {
        snapshot: String,
        want: usize,
        given: usize,
    },
    #[error("--nic {spec}: a clone keeps its snapshot's addressing (the restored guest has it configured); ip= and gw= cannot be given")]
    CloneAddressing { spec: String },
}

impl From<TapError> for NicsError {
    fn from(e: TapError) -> Self {
        NicsError::Tap(Box::new(e))
    }
}

/// The NICs of a new VM, in order (every `--nic`, then every `--network
/// bridge=`), each with its MAC: the given one, or a random one that no
/// NIC in `taken` has. Static addresses need a seed to reach the guest.
pub fn plan(
    nics: &[NicSpec],
    networks: &[NetworkSpec],
    seed: bool,
    taken: &HashSet<MacAddr>,
) -> Result<Vec<Nic>, NicsError> {
    let specs = net::spec::plan(nics, networks)?;
    if !seed {
        if let Some(s) = specs.iter().find(|s| s.addressing != Addressing::Dhcp) {
            return Err(NicsError::StaticWithoutSeed {
                spec: s.to_string(),
            });
        }
    }
    Ok(net::resolve(specs, taken)?)
}

/// The NICs of a clone of snapshot `snapshot`, whose VM had `nics`: the
/// same NICs, each with a new MAC ([`net::clone_nics`], apart from
/// `taken`). A bridge NIC gets its own tap on the same bridge when the
/// clone starts, as any VM's does; a NIC on a user's tap (`--nic tap=`)
/// takes the next of `taps` (the clone's `--nic`, whose MAC is used when
/// given), since the source VM may still hold its tap.
pub fn plan_clone(
    snapshot: &str,
    nics: &[Nic],
    taps: &[NicSpec],
    taken: &HashSet<MacAddr>,
) -> Result<Vec<Nic>, NicsError> {
    let on_taps: Vec<(usize, &str)> = nics
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match &n.attach {
            Attachment::Tap(t) => Some((i, t.as_str())),
            Attachment::Bridge(_) => None,
        })
        .collect();
    if let Some(spec) = taps.iter().find(|s| s.addressing != Addressing::Dhcp) {
        return Err(NicsError::CloneAddressing {
            spec: spec.to_string(),
        });
    }
    if taps.is_empty() {
        if let Some(&(index, tap)) = on_taps.first() {
            return Err(NicsError::CloneNeedsTap {
                snapshot: snapshot.into(),
                index,
                tap: tap.into(),
            });
        }
    }
    if taps.len() != on_taps.len() {
        return Err(NicsError::CloneTapCount {
            snapshot: snapshot.into(),
            want: on_taps.len(),
            given: taps.len(),
        });
    }
    let mut avoid = taken.clone();
    avoid.extend(taps.iter().filter_map(|s| s.mac));
    let mut clone = net::clone_nics(nics, &avoid)?;
    for (&(index, _), spec) in on_taps.iter().zip(taps) {
        clone[index].attach = spec.attach.clone();
        if let Some(mac) = spec.mac {
            // Another VM's, or the source's: the clone would answer for it.
            if taken.contains(&mac) || nics.iter().any(|n| n.mac == mac) {
                return Err(MacError::Duplicate(mac).into());
            }
            clone[index].mac = mac;
        }
    }
    Ok(clone)
}

/// The MACs of every NIC of the host's VMs.
pub fn taken_macs(vms: &Vms) -> Result<HashSet<MacAddr>, super::VmError> {
    Ok(vms
        .list()?
        .iter()
        .flat_map(|e| e.record.nics.iter().map(|n| n.mac))
        .collect())
}

/// The tap the host creates for NIC `index` of the VM with id `vm_id`:
/// `cc`, ten digits of the id, `n`, the index (at most 15 bytes, the
/// kernel's limit, for the VMM's at most 19 devices).
pub fn tap_name(vm_id: &str, index: usize) -> String {
    let id = vm_id.get(..10).unwrap_or(vm_id);
    format!("cc{id}n{index}")
}

/// The tap behind NIC `index` while the VM runs, and whether the host
/// creates it.
pub fn tap_of(vm_id: &str, index: usize, nic: &Nic) -> (String, bool) {
    match &nic.attach {
        Attachment::Tap(t) => (t.clone(), false),
        Attachment::Bridge(_) => (tap_name(vm_id, index), true),
    }
}

/// Checks the host's interfaces before a VM is made: a given tap exists
/// and is a tap (and, with `free`, no process holds it); a bridge exists
/// and is a bridge. Says which NIC and what is wrong.
pub fn check(nics: &[Nic], free: bool) -> Result<(), NicsError> {
    if nics.is_empty() {
        return Ok(());
    }
    let nl = Netlink::new()?;
    for (index, nic) in nics.iter().enumerate() {
        let err = |source: TapError| NicsError::Check {
            index,
            what: describe(&nic.attach),
            source: Box::new(source),
        };
        match &nic.attach {
            Attachment::Tap(name) => {
                if free {
                    nl.check_tap(name).map_err(err)?;
                } else {
                    match nl.kind(name).map_err(err)? {
                        None => return Err(err(VmmTapError::NotFound(name.clone()).into())),
                        Some((_, LinkKind::Tap { .. })) => {}
                        Some(_) => return Err(err(VmmTapError::NotATap(name.clone()).into())),
                    }
                }
            }
            Attachment::Bridge(bridge) => match nl.kind(bridge).map_err(err)? {
                None => return Err(err(TapError::NoBridge(bridge.clone()))),
                Some((_, LinkKind::Bridge)) => {}
                Some(_) => return Err(err(TapError::NotABridge(bridge.clone()))),
            },
        }
    }
    Ok(())
}

fn describe(a: &Attachment) -> String {
    match a {
        Attachment::Tap(t) => format!("tap={t}"),
        Attachment::Bridge(b) => format!("bridge={b}"),
    }
}

/// Puts a tap behind every NIC of the VM `vm_id` (in the monitor, as it
/// starts). A tap of this VM's name that a killed monitor left behind is
/// deleted first (unless a process holds it). All or nothing.
pub fn attach(vm_id: &str, nics: &[Nic]) -> Result<Vec<AttachedNic>, NicsError> {
    if nics.is_empty() {
        return Ok(Vec::new());
    }
    let nl = Netlink::new()?;
    for (index, nic) in nics.iter().enumerate() {
        if let (name, true) = tap_of(vm_id, index, nic) {
            remove_leftover(&nl, &name)?;
        }
    }
    Ok(net::attach_named(&nl, nics, |i| tap_name(vm_id, i))?)
}

fn remove_leftover(nl: &Netlink, name: &str) -> Result<(), TapError> {
    match nl.kind(name)? {
        None => Ok(()),
        Some((_, LinkKind::Tap { queues, .. })) if queues > 0 => {
            Err(VmmTapError::Busy(name.into()).into())
        }
        Some(_) => {
            tracing::info!("deleting {name}, a tap a killed monitor left");
            nl.delete_tap(name).map(drop)
        }
    }
}

/// Deletes the taps the host created for the VM `vm_id` (those still
/// there; a user's taps are left alone), held or not: for the monitor,
/// whose VM holds them. Tries every one; the first error.
pub fn release(vm_id: &str, nics: &[Nic]) -> Result<(), NicsError> {
    delete_taps(vm_id, nics, false)
}

/// [`release`] for a VM with no monitor (`rm`): a tap of its names that
/// some process holds is not one a dead monitor left (ten digits of an
/// id can repeat), so it is left alone, with a warning.
pub fn release_leftovers(vm_id: &str, nics: &[Nic]) -> Result<(), NicsError> {
    delete_taps(vm_id, nics, true)
}

fn delete_taps(vm_id: &str, nics: &[Nic], skip_held: bool) -> Result<(), NicsError> {
    let names: Vec<String> = nics
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match tap_of(vm_id, i, n) {
            (name, true) => Some(name),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let nl = Netlink::new()?;
    let mut first = None;
    for name in names {
        if skip_held {
            match nl.kind(&name) {
                Ok(Some((_, LinkKind::Tap { queues, .. }))) if queues > 0 => {
                    tracing::warn!("leaving tap {name}: a process holds it");
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    first.get_or_insert(e);
                    continue;
                }
            }
        }
        if let Err(e) = nl.delete_tap(&name) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), |e| Err(e.into()))
}

/// A NIC as `inspect` and `run`/`create` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicView {
    /// `nic0`, `nic1`…: the entry in the seed's `network-config`.
    pub id: String,
    /// The tap behind it while the VM runs.
    pub tap: String,
    /// The bridge the host puts its tap on, for `--network bridge=`.
    pub bridge: Option<String>,
    /// The host creates the tap at start and deletes it at stop.
    pub host_tap: bool,
    pub mac: MacAddr,
    /// `dhcp`, or the static address with its prefix.
    pub address: String,
    pub gateway: Option<String>,
}

pub fn views(vm_id: &str, nics: &[Nic]) -> Vec<NicView> {
    nics.iter()
        .enumerate()
        .map(|(i, n)| {
            let (tap, host_tap) = tap_of(vm_id, i, n);
            let (address, gateway) = match &n.addressing {
                Addressing::Dhcp => ("dhcp".to_string(), None),
                Addressing::Static { address, gateway } => {
                    (address.to_string(), gateway.map(|g| g.to_string()))
                }
            };
            NicView {
                id: format!("nic{i}"),
                tap,
                bridge: match &n.attach {
                    Attachment::Bridge(b) => Some(b.clone()),
                    Attachment::Tap(_) => None,
                },
                host_tap,
                mac: n.mac,
                address,
                gateway,
            }
        })
        .collect()
}

impl std::fmt::Display for NicView {
    /// `nic0 bridge=br0 tap cc0123456789n0 (made at start) mac 02:… dhcp`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.bridge {
            Some(b) => write!(f, "{} bridge={b} tap {} (made at start)", self.id, self.tap)?,
            None => write!(f, "{} tap={}", self.id, self.tap)?,
        }
        write!(f, " mac {} {}", self.mac, self.address)?;
        if let Some(g) = &self.gateway {
            write!(f, " gw {g}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> NicSpec {
        s.parse().unwrap()
    }

    #[test]
    fn tap_names_fit_the_kernel_and_carry_the_vm() {
        assert_eq!(tap_name("0123456789abcdef", 0), "cc0123456789n0");
        let longest = tap_name(
            "0123456789abcdef",
            cocoon_vmm::memory::MAX_VIRTIO_DEVICES - 1,
        );
        assert_eq!(longest, "cc0123456789n18");
        assert!(longest.len() <= 15);
        cocoon_vmm::devices::virtio::net::tap::validate_name(&longest, false).unwrap();
        assert_ne!(
            tap_name("0123456789abcdef", 1),
            tap_name("0123456788abcdef", 1)
        );
        assert_ne!(
            tap_name("0123456789abcdef", 1),
            tap_name("0123456789abcdef", 2)
        );
        assert_ne!(
            tap_name("0123456789abcdef", 1),
            tap_name("1123456789abcdef", 1)
        );
    }

    #[test]
    fn plans_fix_macs_apart_from_other_vms_and_need_a_seed_for_static() {
        let mine: MacAddr = "02:00:00:00:00:07".parse().unwrap();
        let taken: HashSet<MacAddr> = [mine].into();
        let nics = plan(
            &[spec("tap=t0,mac=02:00:00:00:00:01")],
            &["bridge=br0".parse().unwrap(), "bridge=br0".parse().unwrap()],
            false,
            &taken,
        )
        .unwrap();
        assert_eq!(nics.len(), 3);
        assert_eq!(nics[0].mac.to_string(), "02:00:00:00:00:01");
        let macs: HashSet<MacAddr> = nics.iter().map(|n| n.mac).collect();
        assert_eq!(macs.len(), 3);
        assert!(!macs.contains(&mine));

        let e = plan(&[spec("tap=t0,ip=10.0.0.2/24")], &[], false, &taken).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NIC tap=t0,ip=10.0.0.2/24: --no-cidata writes no cloud-init seed, so ip= and gw= have nothing to configure"
        );
        assert!(plan(&[spec("tap=t0,ip=10.0.0.2/24")], &[], true, &taken).is_ok());
        let e = plan(&[spec("tap=t0")], &[NetworkSpec::None], true, &taken).unwrap_err();
        assert!(
            matches!(e, NicsError::Spec(SpecError::NoneWithOthers)),
            "{e}"
        );
        assert!(plan(&[], &[], true, &taken).unwrap().is_empty());
    }

    #[test]
    fn views_name_the_tap_and_the_addressing() {
        let nics = plan(
            &[spec("tap=mine0,mac=02:00:00:00:00:01")],
            &[
                "bridge=br0,mac=02:00:00:00:00:02,ip=10.0.0.2/24,gw=10.0.0.1"
                    .parse()
                    .unwrap(),
            ],
            true,
            &HashSet::new(),
        )
        .unwrap();
        let v = views("0123456789abcdef", &nics);
        assert_eq!(
            v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "nic0 tap=mine0 mac 02:00:00:00:00:01 dhcp",
                "nic1 bridge=br0 tap cc0123456789n1 (made at start) mac 02:00:00:00:00:02 10.0.0.2/24 gw 10.0.0.1",
            ]
        );
        assert!(!v[0].host_tap && v[1].host_tap);
        // No netlink for a VM without bridge NICs: nothing to release.
        release("0123456789abcdef", &nics[..1]).unwrap();
        release("0123456789abcdef", &[]).unwrap();
    }

    #[test]
    fn a_clone_gets_new_macs_and_needs_its_own_user_tap() {
        let nics = plan(
            &[spec("tap=mine0,mac=02:00:00:00:00:01")],
            &["bridge=br0,mac=02:00:00:00:00:02".parse().unwrap()],
            true,
            &HashSet::new(),
        )
        .unwrap();
        let bridged = &nics[1..];
        let c = plan_clone("s1", bridged, &[], &HashSet::new()).unwrap();
        assert_eq!(c[0].attach, bridged[0].attach);
        assert_ne!(c[0].mac, bridged[0].mac);

        let e = plan_clone("s1", &nics, &[], &HashSet::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot s1's nic0 is on tap mine0, a tap of the user's (--nic tap=), which a clone \
             cannot share with its source: give the clone a tap of its own with \
             `clone --nic tap=NAME` (one for each such NIC, in order)"
        );
        let c = plan_clone("s1", &nics, &[spec("tap=other0")], &HashSet::new()).unwrap();
        assert_eq!(c[0].attach, Attachment::Tap("other0".into()));
        assert_eq!(c[1].attach, nics[1].attach);
        assert!(c.iter().zip(&nics).all(|(c, n)| c.mac != n.mac));
        let c = plan_clone(
            "s1",
            &nics,
            &[spec("tap=other0,mac=02:00:00:00:00:07")],
            &HashSet::new(),
        )
        .unwrap();
        assert_eq!(c[0].mac.to_string(), "02:00:00:00:00:07");
        assert_ne!(c[1].mac.to_string(), "02:00:00:00:00:07");

        for (taps, want) in [
            (
                vec![spec("tap=a0"), spec("tap=b0")],
                "snapshot s1 has 1 NICs on a user's tap; the clone was given 2 --nic",
            ),
            (
                vec![spec("tap=a0,ip=10.0.0.2/24")],
                "a clone keeps its snapshot's addressing",
            ),
            (
                vec![spec("tap=a0,mac=02:00:00:00:00:01")],
                "02:00:00:00:00:01 is given to two NICs",
            ),
        ] {
            let e = plan_clone("s1", &nics, &taps, &HashSet::new()).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }
}
