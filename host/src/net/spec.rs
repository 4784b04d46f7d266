//! `--nic` and `--network`: what the user asks of a VM's network.
//!
//! - `--nic tap=NAME[,mac=MAC][,ip=CIDR[,gw=ADDR]]`: an existing tap;
//! - `--network bridge=BR[,mac=MAC][,ip=CIDR[,gw=ADDR]]`: a tap the host
//!   creates on the existing bridge BR (and deletes when the VM stops);
//! - `--network none`: no NIC (the default; it stands alone).
//!
//! Both repeat, one NIC each: the `--nic` ones first, then the
//! `--network` ones, each in the order given. Without `ip=` the guest asks
//! DHCP; `ip=` gives a static address and `gw=` a default route through a
//! gateway inside that subnet.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use cocoon_vmm::devices::virtio::net::tap::{validate_name, TapError};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::mac::{MacAddr, MacError};

/// What a NIC's tap is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attachment {
    /// An existing tap, used as it is.
    Tap(String),
    /// A tap the host creates on this existing bridge.
    Bridge(String),
}

/// How the guest configures the NIC (its cidata `network-config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Addressing {
    Dhcp,
    Static {
        /// The guest's address with its prefix, `10.0.0.2/24`.
        address: IpNet,
        gateway: Option<IpAddr>,
    },
}

/// One NIC as asked for; its MAC may still be open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub attach: Attachment,
    pub mac: Option<MacAddr>,
    pub addressing: Addressing,
}

/// One `--network` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkSpec {
    None,
    Bridge(NicSpec),
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{flag} {spec:?}: expected {want}")]
    Expected {
        flag: &'static str,
        spec: String,
        want: &'static str,
    },
    #[error("{flag} {spec:?}: bad interface name")]
    BadName {
        flag: &'static str,
        spec: String,
        #[source]
        source: TapError,
    },
    #[error("{flag} {spec:?}: unknown option {option:?} (expected mac=, ip= or gw=)")]
    UnknownOption {
        flag: &'static str,
        spec: String,
        option: String,
    },
    #[error("{flag} {spec:?}: option {option} given twice")]
    Duplicate {
        flag: &'static str,
        spec: String,
        option: String,
    },
    #[error("{flag} {spec:?}: bad mac=")]
    Mac {
        flag: &'static str,
        spec: String,
        #[source]
        source: MacError,
    },
    #[error("{flag} {spec:?}: ip={value:?} is not an address with a prefix length (10.0.0.2/24, fd00::2/64)")]
    BadCidr {
        flag: &'static str,
        spec: String,
        value: String,
    },
    #[error(
        "{flag} {spec:?}: ip={value} is the subnet's network or broadcast address, not a host's"
    )]
    NotAHostAddress {
        flag: &'static str,
        spec: String,
        value: IpNet,
    },
    #[error("{flag} {spec:?}: gw={value:?} is not an IP address")]
    BadGateway {
        flag: &'static str,
        spec: String,
        value: String,
    },
    #[error("{flag} {spec:?}: gw= needs ip= (a DHCP NIC learns its gateway)")]
    GatewayWithoutIp { flag: &'static str, spec: String },
    #[error(
        "{flag} {spec:?}: gateway {gateway} is not inside {address}'s subnet, or is that address"
    )]
    GatewayOutside {
        flag: &'static str,
        spec: String,
        gateway: IpAddr,
        address: IpNet,
    },
    #[error("--network none cannot be combined with another NIC")]
    NoneWithOthers,
    #[error("tap {0} is named by two NICs")]
    TapTwice(String),
}

const NIC: &str = "--nic";
const NETWORK: &str = "--network";

/// Parses the options after the first item, into a spec for `attach`.
fn parse_nic(
    flag: &'static str,
    spec: &str,
    attach: Attachment,
    rest: &[&str],
) -> Result<NicSpec, SpecError> {
    let mut seen = HashSet::new();
    let (mut mac, mut ip, mut gw) = (None, None, None);
    for option in rest {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let known = matches!(key, "mac" | "ip" | "gw") && !value.is_empty();
        if !known {
            return Err(SpecError::UnknownOption {
                flag,
                spec: spec.into(),
                option: option.to_string(),
            });
        }
        if !seen.insert(key) {
            return Err(SpecError::Duplicate {
                flag,
                spec: spec.into(),
                option: key.into(),
            });
        }
        match key {
            "mac" => {
                mac = Some(value.parse::<MacAddr>().map_err(|source| SpecError::Mac {
                    flag,
                    spec: spec.into(),
                    source,
                })?)
            }
            "ip" => {
                let net: IpNet = value.parse().map_err(|_| SpecError::BadCidr {
                    flag,
                    spec: spec.into(),
                    value: value.into(),
                })?;
                let is_v4_host_subnet = matches!(net, IpNet::V4(n) if n.prefix_len() <= 30);
                if is_v4_host_subnet
                    && (net.addr() == net.network() || net.addr() == net.broadcast())
                {
                    return Err(SpecError::NotAHostAddress {
                        flag,
                        spec: spec.into(),
                        value: net,
                    });
                }
                ip = Some(net);
            }
            _ => {
                gw = Some(value.parse::<IpAddr>().map_err(|_| SpecError::BadGateway {
                    flag,
                    spec: spec.into(),
                    value: value.into(),
                })?)
            }
        }
    }
    let addressing = match (ip, gw) {
        (None, None) => Addressing::Dhcp,
        (None, Some(_)) => {
            return Err(SpecError::GatewayWithoutIp {
                flag,
                spec: spec.into(),
            })
        }
        (Some(address), gateway) => {
            if let Some(g) = gateway {
                if !address.contains(&g) || g == address.addr() {
                    return Err(SpecError::GatewayOutside {
                        flag,
                        spec: spec.into(),
                        gateway: g,
                        address,
                    });
                }
            }
            Addressing::Static { address, gateway }
        }
    };
    Ok(NicSpec {
        attach,
        mac,
        addressing,
    })
}

/// The first item: `KEY=NAME` with a valid interface name.
fn parse_head<'a>(
    flag: &'static str,
    spec: &'a str,
    key: &str,
    want: &'static str,
) -> Result<(&'a str, Vec<&'a str>), SpecError> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let name = head
        .strip_prefix(key)
        .and_then(|h| h.strip_prefix('='))
        .ok_or_else(|| SpecError::Expected {
            flag,
            spec: spec.into(),
            want,
        })?;
    validate_name(name, false).map_err(|source| SpecError::BadName {
        flag,
        spec: spec.into(),
        source,
    })?;
    Ok((name, parts.collect()))
}

impl FromStr for NicSpec {
    type Err = SpecError;

    /// `tap=NAME[,mac=MAC][,ip=CIDR[,gw=ADDR]]`
    fn from_str(spec: &str) -> Result<NicSpec, SpecError> {
        let (name, rest) = parse_head(NIC, spec, "tap", "tap=NAME[,mac=MAC][,ip=CIDR[,gw=ADDR]]")?;
        parse_nic(NIC, spec, Attachment::Tap(name.into()), &rest)
    }
}

impl FromStr for NetworkSpec {
    type Err = SpecError;

    /// `none`, or `bridge=BR[,mac=MAC][,ip=CIDR[,gw=ADDR]]`
    fn from_str(spec: &str) -> Result<NetworkSpec, SpecError> {
        if spec == "none" {
            return Ok(NetworkSpec::None);
        }
        let want = "none or bridge=BR[,mac=MAC][,ip=CIDR[,gw=ADDR]]";
        let (name, rest) = parse_head(NETWORK, spec, "bridge", want)?;
        parse_nic(NETWORK, spec, Attachment::Bridge(name.into()), &rest).map(NetworkSpec::Bridge)
    }
}

impl fmt::Display for NicSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.attach {
            Attachment::Tap(t) => write!(f, "tap={t}")?,
            Attachment::Bridge(b) => write!(f, "bridge={b}")?,
        }
        if let Some(m) = self.mac {
            write!(f, ",mac={m}")?;
        }
        if let Addressing::Static { address, gateway } = &self.addressing {
            write!(f, ",ip={address}")?;
            if let Some(g) = gateway {
                write!(f, ",gw={g}")?;
            }
        }
        Ok(())
    }
}

/// The NICs of a VM, in order: every `--nic`, then every `--network
/// bridge=`. `none` must stand alone; one tap cannot back two NICs.
pub fn plan(nics: &[NicSpec], networks: &[NetworkSpec]) -> Result<Vec<NicSpec>, SpecError> {
    let has_none = networks.contains(&NetworkSpec::None);
    if has_none && (networks.len() > 1 || !nics.is_empty()) {
        return Err(SpecError::NoneWithOthers);
    }
    let mut out: Vec<NicSpec> = nics.to_vec();
    out.extend(networks.iter().filter_map(|n| match n {
        NetworkSpec::Bridge(spec) => Some(spec.clone()),
        NetworkSpec::None => None,
    }));
    let mut taps = HashSet::new();
    for n in &out {
        if let Attachment::Tap(t) = &n.attach {
            if !taps.insert(t.clone()) {
                return Err(SpecError::TapTwice(t.clone()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nic_specs() {
        let ok: &[(&str, NicSpec)] = &[
            (
                "tap=tap0",
                NicSpec {
                    attach: Attachment::Tap("tap0".into()),
                    mac: None,
                    addressing: Addressing::Dhcp,
                },
            ),
            (
                "tap=vm-1,mac=02:00:00:00:00:01",
                NicSpec {
                    attach: Attachment::Tap("vm-1".into()),
                    mac: Some(mac("02:00:00:00:00:01")),
                    addressing: Addressing::Dhcp,
                },
            ),
            (
                "tap=t,ip=10.0.0.2/24,gw=10.0.0.1",
                NicSpec {
                    attach: Attachment::Tap("t".into()),
                    mac: None,
                    addressing: Addressing::Static {
                        address: net("10.0.0.2/24"),
                        gateway: Some("10.0.0.1".parse().unwrap()),
                    },
                },
            ),
            (
                "tap=t,gw=fd00::1,ip=fd00::2/64,mac=52:54:00:12:34:56",
                NicSpec {
                    attach: Attachment::Tap("t".into()),
                    mac: Some(mac("52:54:00:12:34:56")),
                    addressing: Addressing::Static {
                        address: net("fd00::2/64"),
                        gateway: Some("fd00::1".parse().unwrap()),
                    },
                },
            ),
            (
                "tap=t,ip=192.168.7.9/32",
                NicSpec {
                    attach: Attachment::Tap("t".into()),
                    mac: None,
                    addressing: Addressing::Static {
                        address: net("192.168.7.9/32"),
                        gateway: None,
                    },
                },
            ),
        ];
        for (s, want) in ok {
            let got: NicSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(&got, want, "{s}");
            // Display is a spec that parses back to the same.
            assert_eq!(&got.to_string().parse::<NicSpec>().unwrap(), want);
        }
        let bad: &[(&str, &str)] = &[
            ("", "--nic \"\": expected tap=NAME"),
            ("bridge=br0", "expected tap=NAME"),
            ("tap=", "bad interface name"),
            ("tap=a/b", "bad interface name"),
            ("tap=0123456789abcdef", "bad interface name"),
            ("tap=t,color=red", "unknown option \"color=red\""),
            ("tap=t,mac", "unknown option \"mac\""),
            ("tap=t,mac=", "unknown option \"mac=\""),
            ("tap=t,", "unknown option \"\""),
            (
                "tap=t,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02",
                "option mac given twice",
            ),
            ("tap=t,mac=01:00:5e:00:00:01", "bad mac="),
            ("tap=t,mac=zz", "bad mac="),
            (
                "tap=t,ip=10.0.0.2",
                "ip=\"10.0.0.2\" is not an address with a prefix length",
            ),
            (
                "tap=t,ip=10.0.0.2/33",
                "is not an address with a prefix length",
            ),
            (
                "tap=t,ip=10.0.0.0/24",
                "ip=10.0.0.0/24 is the subnet's network or broadcast address",
            ),
            (
                "tap=t,ip=10.0.0.255/24",
                "is the subnet's network or broadcast address",
            ),
            (
                "tap=t,ip=10.0.0.2/24,gw=router",
                "gw=\"router\" is not an IP address",
            ),
            ("tap=t,gw=10.0.0.1", "gw= needs ip="),
            (
                "tap=t,ip=10.0.0.2/24,gw=10.0.1.1",
                "gateway 10.0.1.1 is not inside 10.0.0.2/24's subnet",
            ),
            (
                "tap=t,ip=10.0.0.2/24,gw=10.0.0.2",
                "gateway 10.0.0.2 is not inside",
            ),
            (
                "tap=t,ip=10.0.0.2/24,gw=fd00::1",
                "gateway fd00::1 is not inside",
            ),
        ];
        for (s, want) in bad {
            let e = s.parse::<NicSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(
                e.contains(&format!("{s:?}")),
                "the error names the spec: {e}"
            );
        }
    }

    #[test]
    fn the_mac_error_keeps_its_cause() {
        let e = "tap=t,mac=01:00:5e:00:00:01"
            .parse::<NicSpec>()
            .unwrap_err();
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("multicast"), "{cause}");
    }

    #[test]
    fn network_specs() {
        assert_eq!("none".parse::<NetworkSpec>().unwrap(), NetworkSpec::None);
        let NetworkSpec::Bridge(b) = "bridge=br0,ip=10.1.0.5/16,gw=10.1.0.1".parse().unwrap()
        else {
            panic!()
        };
        assert_eq!(b.attach, Attachment::Bridge("br0".into()));
        assert_eq!(b.to_string(), "bridge=br0,ip=10.1.0.5/16,gw=10.1.0.1");
        for (s, want) in [
            ("None", "expected none or bridge=BR"),
            ("tap=t", "expected none or bridge=BR"),
            ("bridge=", "bad interface name"),
            ("bridge=br0,vlan=3", "unknown option \"vlan=3\""),
            ("none,mac=02:00:00:00:00:01", "expected none or bridge=BR"),
        ] {
            let e = s.parse::<NetworkSpec>().unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("--network"), "{s}: {e}");
        }
    }

    #[test]
    fn plans() {
        let tap = |t: &str| t.parse::<NicSpec>().unwrap();
        let bridge = |b: &str| b.parse::<NetworkSpec>().unwrap();
        assert_eq!(plan(&[], &[]).unwrap(), vec![]);
        assert_eq!(plan(&[], &[bridge("none")]).unwrap(), vec![]);
        let got = plan(
            &[tap("tap=a"), tap("tap=b")],
            &[bridge("bridge=br0"), bridge("bridge=br0")],
        )
        .unwrap();
        let names: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["tap=a", "tap=b", "bridge=br0", "bridge=br0"]);
        assert!(matches!(
            plan(&[tap("tap=a")], &[bridge("none")]),
            Err(SpecError::NoneWithOthers)
        ));
        assert!(matches!(
            plan(&[], &[bridge("none"), bridge("bridge=br0")]),
            Err(SpecError::NoneWithOthers)
        ));
        assert!(matches!(
            plan(&[tap("tap=a"), tap("tap=a,mac=02:00:00:00:00:01")], &[]),
            Err(SpecError::TapTwice(t)) if t == "a"
        ));
    }
}
