//! The NICs' entries in the cloud-init seed's `network-config` (version 2,
//! netplan's format): each matched by its MAC address, DHCP unless the NIC
//! has a static address, then that address and a default route through
//! its gateway.

use std::net::IpAddr;

use ipnet::IpNet;

use super::mac::MacAddr;
use super::spec::Addressing;
use super::Nic;
use crate::disk::cidata::{Ethernet, MacMatch, NetworkConfig, Route};

/// One `ethernets:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetEntry {
    /// The entry's id (`nic0`, `nic1`…); the interface keeps the name the
    /// guest gives it, since it is matched by MAC.
    pub id: String,
    pub mac: MacAddr,
    pub dhcp4: bool,
    pub dhcp6: bool,
    pub addresses: Vec<IpNet>,
    /// `(to, via)`: `0.0.0.0/0` or `::/0` through the gateway.
    pub default_route: Option<(IpNet, IpAddr)>,
}

/// The entries for `nics`, in NIC order.
pub fn entries(nics: &[Nic]) -> Vec<EthernetEntry> {
    nics.iter()
        .enumerate()
        .map(|(i, nic)| {
            let id = format!("nic{i}");
            match &nic.addressing {
                Addressing::Dhcp => EthernetEntry {
                    id,
                    mac: nic.mac,
                    dhcp4: true,
                    dhcp6: false,
                    addresses: Vec::new(),
                    default_route: None,
                },
                Addressing::Static { address, gateway } => EthernetEntry {
                    id,
                    mac: nic.mac,
                    dhcp4: false,
                    dhcp6: false,
                    addresses: vec![*address],
                    default_route: gateway.map(|g| {
                        let any = match g {
                            IpAddr::V4(_) => IpNet::V4(Default::default()),
                            IpAddr::V6(_) => IpNet::V6(Default::default()),
                        };
                        (any, g)
                    }),
                },
            }
        })
        .collect()
}

/// The seed's `network-config` for `nics`: one `ethernets:` entry per
/// NIC ([`entries`]), matched by MAC, with no `set-name` (the guest names
/// its interfaces).
pub fn network_config(nics: &[Nic]) -> NetworkConfig {
    let ethernets = entries(nics)
        .into_iter()
        .map(|e| {
            let ethernet = Ethernet {
                matches: MacMatch {
                    macaddress: e.mac.to_string(),
                },
                set_name: None,
                dhcp4: Some(e.dhcp4),
                // netplan's default; said only when asked for.
                dhcp6: e.dhcp6.then_some(true),
                addresses: e.addresses.iter().map(ToString::to_string).collect(),
                routes: e
                    .default_route
                    .map(|(to, via)| Route {
                        to: to.to_string(),
                        via: via.to_string(),
                    })
                    .into_iter()
                    .collect(),
                nameservers: None,
                mtu: None,
            };
            (e.id, ethernet)
        })
        .collect();
    NetworkConfig { ethernets }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::spec::Attachment;

    #[test]
    fn the_seed_network_config_is_matched_by_mac() {
        let nics = [
            nic("02:00:00:00:00:01", Addressing::Dhcp),
            nic(
                "02:00:00:00:00:02",
                Addressing::Static {
                    address: "10.0.0.2/24".parse().unwrap(),
                    gateway: Some("10.0.0.1".parse().unwrap()),
                },
            ),
        ];
        let input = crate::disk::cidata::SeedInput {
            instance_id: "i-1".into(),
            hostname: "h".into(),
            ssh_authorized_keys: Vec::new(),
            network: network_config(&nics),
        };
        let files = crate::disk::cidata::render(&input, &[]).unwrap();
        let got: serde_json::Value = serde_json::from_str(&files.network_config).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"version": 2, "ethernets": {
                "nic0": {"match": {"macaddress": "02:00:00:00:00:01"}, "dhcp4": true},
                "nic1": {
                    "match": {"macaddress": "02:00:00:00:00:02"},
                    "dhcp4": false,
                    "addresses": ["10.0.0.2/24"],
                    "routes": [{"to": "0.0.0.0/0", "via": "10.0.0.1"}],
                },
            }})
        );
        assert!(network_config(&[]).ethernets.is_empty());
    }

    fn nic(mac: &str, addressing: Addressing) -> Nic {
        Nic {
            attach: Attachment::Bridge("br0".into()),
            mac: mac.parse().unwrap(),
            addressing,
        }
    }

    #[test]
    fn dhcp_by_default_static_with_a_default_route() {
        let nics = [
            nic("02:00:00:00:00:01", Addressing::Dhcp),
            nic(
                "02:00:00:00:00:02",
                Addressing::Static {
                    address: "10.0.0.2/24".parse().unwrap(),
                    gateway: Some("10.0.0.1".parse().unwrap()),
                },
            ),
            nic(
                "02:00:00:00:00:03",
                Addressing::Static {
                    address: "fd00::2/64".parse().unwrap(),
                    gateway: Some("fd00::1".parse().unwrap()),
                },
            ),
            nic(
                "02:00:00:00:00:04",
                Addressing::Static {
                    address: "192.168.9.9/24".parse().unwrap(),
                    gateway: None,
                },
            ),
        ];
        let got = entries(&nics);
        let want = [
            ("nic0", "02:00:00:00:00:01", true, vec![], None),
            (
                "nic1",
                "02:00:00:00:00:02",
                false,
                vec!["10.0.0.2/24"],
                Some(("0.0.0.0/0", "10.0.0.1")),
            ),
            (
                "nic2",
                "02:00:00:00:00:03",
                false,
                vec!["fd00::2/64"],
                Some(("::/0", "fd00::1")),
            ),
            (
                "nic3",
                "02:00:00:00:00:04",
                false,
                vec!["192.168.9.9/24"],
                None,
            ),
        ];
        assert_eq!(got.len(), want.len());
        for (g, (id, mac, dhcp4, addrs, route)) in got.iter().zip(want) {
            assert_eq!(g.id, id);
            assert_eq!(g.mac.to_string(), mac);
            assert_eq!(g.dhcp4, dhcp4, "{id}");
            assert!(!g.dhcp6);
            let a: Vec<String> = g.addresses.iter().map(ToString::to_string).collect();
            assert_eq!(a, addrs, "{id}");
            let r = g
                .default_route
                .map(|(to, via)| (to.to_string(), via.to_string()));
            assert_eq!(
                r,
                route.map(|(t, v)| (t.to_string(), v.to_string())),
                "{id}"
            );
        }
    }
}
