//! The `cocoon.net.*` parameters: what the guest does with its network
//! devices. Pure parsing, like the rest of the command line.

use core::fmt;

/// Ethernet + IPv4 + UDP headers: the shortest UDP frame.
pub const UDP_MIN_FRAME: u32 = 14 + 20 + 8;
/// Ethernet + IPv4 + TCP headers: the shortest TCP (TSO) frame.
pub const TCP_MIN_FRAME: u32 = 14 + 20 + 20;
/// A standard Ethernet frame without FCS.
pub const MAX_PLAIN_FRAME: u32 = 1514;
/// The largest TSO frame: an IPv4 packet of 65535 bytes behind Ethernet.
pub const MAX_TSO_FRAME: u32 = 14 + 65535;

/// One `cocoon.net.*` parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetAction {
    /// `cocoon.net.arp=NIC:SENDER_IP:TARGET_IP`: a broadcast ARP request.
    Arp {
        nic: usize,
        sender: [u8; 4],
        target: [u8; 4],
    },
    /// `cocoon.net.udp=NIC:SRC_IP:DST_IP:PORT:LEN[:DST_MAC]`: one UDP
    /// datagram in a frame of LEN bytes, to DST_MAC (`02-00-…`, default
    /// broadcast), both ports PORT.
    Udp {
        nic: usize,
        src: [u8; 4],
        dst: [u8; 4],
        port: u16,
        len: u32,
        dst_mac: [u8; 6],
    },
    /// `cocoon.net.recv=NIC:COUNT:MS`: report up to COUNT received frames,
    /// waiting at most MS milliseconds in all.
    Recv { nic: usize, count: u32, ms: u32 },
    /// `cocoon.net.echo=NIC:COUNT:MS`: for each of up to COUNT received
    /// frames, send it back (to its source, from the MAC the driver read),
    /// reporting each; waiting at most MS milliseconds in all.
    Echo { nic: usize, count: u32, ms: u32 },
    /// `cocoon.net.blast=NIC:LEN:COUNT[:tso]`: send COUNT copies of one
    /// frame of LEN bytes as fast as the device takes them, and time it.
    /// Plain frames are UDP; `tso` sends TCP segments for the device to
    /// cut (VIRTIO_NET_F_HOST_TSO4).
    Blast {
        nic: usize,
        len: u32,
        count: u32,
        tso: bool,
    },
}

impl NetAction {
    pub fn nic(&self) -> usize {
        match *self {
            NetAction::Arp { nic, .. }
            | NetAction::Udp { nic, .. }
            | NetAction::Recv { nic, .. }
            | NetAction::Echo { nic, .. }
            | NetAction::Blast { nic, .. } => nic,
        }
    }
}

pub const BROADCAST: [u8; 6] = [0xff; 6];

/// The action as its command-line parameter.
impl fmt::Display for NetAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NetAction::Arp {
                nic,
                sender,
                target,
            } => write!(f, "cocoon.net.arp={nic}:{}:{}", Ip(sender), Ip(target)),
            NetAction::Udp {
                nic,
                src,
                dst,
                port,
                len,
                dst_mac,
            } => {
                write!(
                    f,
                    "cocoon.net.udp={nic}:{}:{}:{port}:{len}",
                    Ip(src),
                    Ip(dst)
                )?;
                if dst_mac != BROADCAST {
                    write!(f, ":{}", Mac(dst_mac, '-'))?;
                }
                Ok(())
            }
            NetAction::Recv { nic, count, ms } => write!(f, "cocoon.net.recv={nic}:{count}:{ms}"),
            NetAction::Echo { nic, count, ms } => write!(f, "cocoon.net.echo={nic}:{count}:{ms}"),
            NetAction::Blast {
                nic,
                len,
                count,
                tso,
            } => {
                write!(f, "cocoon.net.blast={nic}:{len}:{count}")?;
                if tso {
                    f.write_str(":tso")?;
                }
                Ok(())
            }
        }
    }
}

/// An IPv4 address, dotted.
pub struct Ip(pub [u8; 4]);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// A MAC address with the given separator.
pub struct Mac(pub [u8; 6], pub char);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "{}", self.1)?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Parses the value of `cocoon.net.NAME=VALUE`.
pub fn parse(name: &[u8], value: &[u8]) -> Result<NetAction, &'static str> {
    let mut fields = value.split(|&b| b == b':');
    let mut next = |what| fields.next().ok_or(what);
    let action = match name {
        b"arp" => {
            const F: &str = "expected NIC:SENDER_IP:TARGET_IP";
            NetAction::Arp {
                nic: index(next(F)?)?,
                sender: ipv4(next(F)?).ok_or("bad IPv4 address")?,
                target: ipv4(next(F)?).ok_or("bad IPv4 address")?,
            }
        }
        b"udp" => {
            const F: &str = "expected NIC:SRC_IP:DST_IP:PORT:LEN[:DST_MAC]";
            let nic = index(next(F)?)?;
            let src = ipv4(next(F)?).ok_or("bad IPv4 address")?;
            let dst = ipv4(next(F)?).ok_or("bad IPv4 address")?;
            let port = number(next(F)?)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or("bad port")?;
            let len = frame_len(next(F)?, UDP_MIN_FRAME, MAX_PLAIN_FRAME)?;
            let dst_mac = match fields.next() {
                Some(m) => mac(m).ok_or("bad MAC address (write it with '-')")?,
                None => BROADCAST,
            };
            NetAction::Udp {
                nic,
                src,
                dst,
                port,
                len,
                dst_mac,
            }
        }
        b"recv" | b"echo" => {
            const F: &str = "expected NIC:COUNT:MS";
            let nic = index(next(F)?)?;
            let count = u32_field(next(F)?).ok_or("bad count")?;
            let ms = u32_field(next(F)?).ok_or("bad milliseconds")?;
            if count == 0 {
                return Err("zero count");
            }
            if name == b"echo" {
                NetAction::Echo { nic, count, ms }
            } else {
                NetAction::Recv { nic, count, ms }
            }
        }
        b"blast" => {
            const F: &str = "expected NIC:LEN:COUNT[:tso]";
            let nic = index(next(F)?)?;
            let len = next(F)?;
            let count = u32_field(next(F)?).ok_or("bad count")?;
            let tso = match fields.next() {
                None => false,
                Some(b"tso") => true,
                Some(_) => return Err("expected tso after COUNT"),
            };
            let len = if tso {
                frame_len(len, TCP_MIN_FRAME, MAX_TSO_FRAME)?
            } else {
                frame_len(len, UDP_MIN_FRAME, MAX_PLAIN_FRAME)?
            };
            if count == 0 {
                return Err("zero count");
            }
            NetAction::Blast {
                nic,
                len,
                count,
                tso,
            }
        }
        _ => return Err("unknown parameter"),
    };
    if fields.next().is_some() {
        return Err("too many fields");
    }
    Ok(action)
}

fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(10)?;
        Some(acc * 10 + u64::from(d))
    })
}

fn u32_field(s: &[u8]) -> Option<u32> {
    number(s).and_then(|n| u32::try_from(n).ok())
}

fn index(s: &[u8]) -> Result<usize, &'static str> {
    number(s)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or("bad NIC index")
}

fn frame_len(s: &[u8], min: u32, max: u32) -> Result<u32, &'static str> {
    let n = u32_field(s).ok_or("bad frame length")?;
    if n < min || n > max {
        return Err("frame length out of range");
    }
    Ok(n)
}

fn ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for o in &mut out {
        let p = parts.next()?;
        if p.len() > 3 {
            return None;
        }
        *o = u8::try_from(number(p)?).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn mac(s: &[u8]) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(|&b| b == b'-');
    for o in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        let hi = (p[0] as char).to_digit(16)?;
        let lo = (p[1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions() {
        let ok: &[(&str, &str, NetAction)] = &[
            (
                "arp",
                "0:10.0.0.2:10.0.0.1",
                NetAction::Arp {
                    nic: 0,
                    sender: [10, 0, 0, 2],
                    target: [10, 0, 0, 1],
                },
            ),
            (
                "udp",
                "1:10.0.0.2:10.0.0.1:4000:100",
                NetAction::Udp {
                    nic: 1,
                    src: [10, 0, 0, 2],
                    dst: [10, 0, 0, 1],
                    port: 4000,
                    len: 100,
                    dst_mac: BROADCAST,
                },
            ),
            (
                "udp",
                "0:1.2.3.4:5.6.7.8:9:42:02-aa-BB-0c-0d-0e",
                NetAction::Udp {
                    nic: 0,
                    src: [1, 2, 3, 4],
                    dst: [5, 6, 7, 8],
                    port: 9,
                    len: 42,
                    dst_mac: [2, 0xaa, 0xbb, 0x0c, 0x0d, 0x0e],
                },
            ),
            (
                "recv",
                "0:3:2000",
                NetAction::Recv {
                    nic: 0,
                    count: 3,
                    ms: 2000,
                },
            ),
            (
                "echo",
                "1:4:60000",
                NetAction::Echo {
                    nic: 1,
                    count: 4,
                    ms: 60000,
                },
            ),
            (
                "blast",
                "0:1514:500",
                NetAction::Blast {
                    nic: 0,
                    len: 1514,
                    count: 500,
                    tso: false,
                },
            ),
            (
                "blast",
                "0:65549:20:tso",
                NetAction::Blast {
                    nic: 0,
                    len: 65549,
                    count: 20,
                    tso: true,
                },
            ),
        ];
        for (name, value, want) in ok {
            let got = parse(name.as_bytes(), value.as_bytes()).unwrap();
            assert_eq!(&got, want, "{name}={value}");
        }
    }

    #[test]
    fn display_is_the_parameter() {
        let a = NetAction::Udp {
            nic: 0,
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            port: 9,
            len: 42,
            dst_mac: [2, 0xaa, 0xbb, 0x0c, 0x0d, 0x0e],
        };
        assert_eq!(
            a.to_string(),
            "cocoon.net.udp=0:1.2.3.4:5.6.7.8:9:42:02-aa-bb-0c-0d-0e"
        );
        let e = NetAction::Echo {
            nic: 0,
            count: 3,
            ms: 500,
        };
        assert_eq!(e.to_string(), "cocoon.net.echo=0:3:500");
        assert_eq!(parse(b"echo", b"0:3:500"), Ok(e));
    }

    #[test]
    fn bad_actions() {
        let bad: &[(&str, &str, &str)] = &[
            ("arp", "0:10.0.0.2", "expected NIC:SENDER_IP:TARGET_IP"),
            ("arp", "0:10.0.0.256:10.0.0.1", "bad IPv4 address"),
            ("arp", "0:10.0.0:10.0.0.1", "bad IPv4 address"),
            ("udp", "0:1.2.3.4:5.6.7.8:70000:100", "bad port"),
            ("udp", "0:1.2.3.4:5.6.7.8:9:41", "frame length out of range"),
            (
                "udp",
                "0:1.2.3.4:5.6.7.8:9:1515",
                "frame length out of range",
            ),
            (
                "udp",
                "0:1.2.3.4:5.6.7.8:9:42:02:aa",
                "bad MAC address (write it with '-')",
            ),
            ("recv", "0:0:100", "zero count"),
            ("echo", "0:0:100", "zero count"),
            ("echo", "0:1", "expected NIC:COUNT:MS"),
            ("echo", "0:1:1:1", "too many fields"),
            ("blast", "0:1514:10:fast", "expected tso after COUNT"),
            ("blast", "0:65550:10:tso", "frame length out of range"),
            ("blast", "0:1514:0", "zero count"),
            ("recv", "0:1:1:1", "too many fields"),
            ("ping", "0", "unknown parameter"),
            ("recv", "x:1:1", "bad NIC index"),
        ];
        for (name, value, want) in bad {
            assert_eq!(
                parse(name.as_bytes(), value.as_bytes()),
                Err(*want),
                "{name}={value}"
            );
        }
    }
}
