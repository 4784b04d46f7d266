//! MAC addresses of a VM's NICs: given ones are checked (unicast, not all
//! zeroes, six colon-separated hex octets), missing ones are drawn at
//! random as locally administered unicast addresses, and no two NICs of a
//! VM (nor any address the caller says is taken) share one.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("MAC address {0:?} is malformed: expected six hex octets like 02:00:5e:10:00:01")]
    Malformed(String),
    #[error("MAC address {0} is a multicast address (the first octet is odd); a NIC needs a unicast one")]
    Multicast(MacAddr),
    #[error("MAC address 00:00:00:00:00:00 is not a usable address")]
    Zero,
    #[error("MAC address {0} is given to two NICs")]
    Duplicate(MacAddr),
    #[error("cannot draw a random MAC address: {0}")]
    Random(String),
}

impl MacAddr {
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_locally_administered(self) -> bool {
        self.0[0] & 2 == 2
    }

    /// A random locally administered unicast address.
    pub fn random() -> Result<MacAddr, MacError> {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).map_err(|e| MacError::Random(e.to_string()))?;
        Ok(Self::local_unicast(b))
    }

    /// `bytes` with the locally administered bit set and the multicast bit
    /// cleared (IEEE 802: bits 1 and 0 of the first octet).
    pub fn local_unicast(mut bytes: [u8; 6]) -> MacAddr {
        bytes[0] = (bytes[0] | 0x02) & !0x01;
        MacAddr(bytes)
    }

    /// Refuses an address a NIC cannot have.
    pub fn check(self) -> Result<MacAddr, MacError> {
        if self.0 == [0; 6] {
            return Err(MacError::Zero);
        }
        if self.is_multicast() {
            return Err(MacError::Multicast(self));
        }
        Ok(self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Parses `02:00:5e:10:00:01` (either case) and checks it is usable.
impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<MacAddr, MacError> {
        let bad = || MacError::Malformed(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        MacAddr(out).check()
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One address per NIC: the requested one where given, else a fresh
/// random one. Given addresses must differ from each other; random ones
/// avoid every given one and everything in `taken` (other VMs' NICs).
pub fn assign(
    requested: &[Option<MacAddr>],
    taken: &HashSet<MacAddr>,
) -> Result<Vec<MacAddr>, MacError> {
    assign_with(requested, taken, MacAddr::random)
}

/// [`assign`] with the random source given (tests draw from a sequence).
pub fn assign_with(
    requested: &[Option<MacAddr>],
    taken: &HashSet<MacAddr>,
    mut draw: impl FnMut() -> Result<MacAddr, MacError>,
) -> Result<Vec<MacAddr>, MacError> {
    let mut used: HashSet<MacAddr> = taken.clone();
    let mut given = HashSet::new();
    for mac in requested.iter().flatten() {
        mac.check()?;
        if !given.insert(*mac) {
            return Err(MacError::Duplicate(*mac));
        }
        used.insert(*mac);
    }
    requested
        .iter()
        .map(|r| match r {
            Some(mac) => Ok(*mac),
            None => loop {
                let mac = draw()?;
                if used.insert(mac) {
                    break Ok(mac);
                }
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        let ok: &[(&str, [u8; 6])] = &[
            ("02:00:5e:10:00:01", [2, 0, 0x5e, 0x10, 0, 1]),
            ("52:54:00:AB:cd:EF", [0x52, 0x54, 0, 0xab, 0xcd, 0xef]),
            ("00:00:00:00:00:01", [0, 0, 0, 0, 0, 1]),
        ];
        for (s, want) in ok {
            let got = m(s);
            assert_eq!(got.0, *want, "{s}");
            assert_eq!(got.to_string(), s.to_lowercase());
        }
        let bad: &[(&str, MacError)] = &[
            ("", MacError::Malformed("".into())),
            (
                "02:00:5e:10:00",
                MacError::Malformed("02:00:5e:10:00".into()),
            ),
            (
                "02:00:5e:10:00:01:02",
                MacError::Malformed("02:00:5e:10:00:01:02".into()),
            ),
            (
                "02-00-5e-10-00-01",
                MacError::Malformed("02-00-5e-10-00-01".into()),
            ),
            (
                "2:00:5e:10:00:01",
                MacError::Malformed("2:00:5e:10:00:01".into()),
            ),
            (
                "02:00:5e:10:00:0g",
                MacError::Malformed("02:00:5e:10:00:0g".into()),
            ),
            (
                "+2:00:5e:10:00:01",
                MacError::Malformed("+2:00:5e:10:00:01".into()),
            ),
            (
                "01:00:5e:00:00:01",
                MacError::Multicast(MacAddr([1, 0, 0x5e, 0, 0, 1])),
            ),
            ("ff:ff:ff:ff:ff:ff", MacError::Multicast(MacAddr([0xff; 6]))),
            ("00:00:00:00:00:00", MacError::Zero),
        ];
        for (s, want) in bad {
            assert_eq!(s.parse::<MacAddr>().as_ref(), Err(want), "{s:?}");
        }
        assert!(MacError::Multicast(MacAddr([1, 0, 0x5e, 0, 0, 1]))
            .to_string()
            .contains("01:00:5e:00:00:01 is a multicast address"));
    }

    #[test]
    fn random_addresses_are_local_unicast() {
        for _ in 0..256 {
            let mac = MacAddr::random().unwrap();
            assert!(
                mac.is_locally_administered() && !mac.is_multicast(),
                "{mac}"
            );
        }
        assert_eq!(MacAddr::local_unicast([0xff; 6]).0[0], 0xfe);
        assert_eq!(MacAddr::local_unicast([0; 6]).0[0], 0x02);
    }

    #[test]
    fn serde_as_a_string_and_checked_on_the_way_in() {
        let mac = m("02:00:5e:10:00:01");
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"02:00:5e:10:00:01\""
        );
        assert_eq!(
            serde_json::from_str::<MacAddr>("\"02:00:5e:10:00:01\"").unwrap(),
            mac
        );
        assert!(serde_json::from_str::<MacAddr>("\"01:00:5e:10:00:01\"").is_err());
    }

    #[test]
    fn assignment_is_unique_per_vm() {
        let a = m("02:00:00:00:00:0a");
        let b = m("02:00:00:00:00:0b");
        let c = m("02:00:00:00:00:0c");
        let taken: HashSet<_> = [c].into();
        // The draws collide with a given address, then a taken one, then
        // with themselves: each collision is drawn again.
        let mut seq = vec![a, c, b, b, m("02:00:00:00:00:0d")].into_iter();
        let got = assign_with(&[Some(a), None, None], &taken, || Ok(seq.next().unwrap())).unwrap();
        assert_eq!(got, vec![a, b, m("02:00:00:00:00:0d")]);

        assert_eq!(
            assign_with(&[Some(a), Some(a)], &HashSet::new(), || unreachable!()),
            Err(MacError::Duplicate(a))
        );
        assert_eq!(
            assign_with(
                &[Some(MacAddr([1, 0, 0, 0, 0, 1]))],
                &HashSet::new(),
                || { unreachable!() }
            ),
            Err(MacError::Multicast(MacAddr([1, 0, 0, 0, 0, 1])))
        );
        let four = assign(&[None, None, None, None], &HashSet::new()).unwrap();
        assert_eq!(four.iter().collect::<HashSet<_>>().len(), 4);
    }
}
