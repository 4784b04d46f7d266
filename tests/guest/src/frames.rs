//! Ethernet frames the guest sends and the reading of those it receives:
//! ARP requests, UDP datagrams and TCP segments over IPv4, with their
//! checksums. Pure byte work, tested on the host.

pub const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// Where the TCP checksum sits, from the start of the frame, for
/// VIRTIO_NET_HDR_F_NEEDS_CSUM: the TCP header's start and the field's
/// offset in it.
pub const TCP_CSUM_START: u16 = (ETH_HLEN + IP_HLEN) as u16;
pub const TCP_CSUM_OFFSET: u16 = 16;
/// The TCP segment size the device cuts a TSO frame into (1500-byte MTU).
pub const TSO_MSS: u16 = 1460;
/// Ethernet + IPv4 + TCP: what comes before a TSO payload.
pub const TCP_HEADERS_LEN: u16 = (ETH_HLEN + IP_HLEN + TCP_HLEN) as u16;

/// Byte `i` of every payload the guest sends; a receiver checks it.
pub fn payload_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7)
}

/// The 16-bit ones' complement sum of `data` added to `sum`, unfolded.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

/// The unfolded sum of the IPv4 pseudo-header.
fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut s = sum16(0, &src);
    s = sum16(s, &dst);
    s + u32::from(proto) + len as u32
}

fn put_eth(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// An IPv4 header at `buf[..20]` for a packet of `total` bytes.
fn put_ipv4(buf: &mut [u8], src: [u8; 4], dst: [u8; 4], proto: u8, total: usize) {
    buf[0] = 0x45;
    buf[1] = 0;
    buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    buf[4..6].copy_from_slice(&0x0001u16.to_be_bytes()); // id
    buf[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    buf[8] = 64; // TTL
    buf[9] = proto;
    buf[10..12].fill(0);
    buf[12..16].copy_from_slice(&src);
    buf[16..20].copy_from_slice(&dst);
    let c = checksum(&buf[..IP_HLEN]);
    buf[10..12].copy_from_slice(&c.to_be_bytes());
}

/// A broadcast ARP request (who has `target`? tell `sender`); returns its
/// length (42).
pub fn arp_request(buf: &mut [u8], mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> usize {
    put_eth(buf, [0xff; 6], mac, ETHERTYPE_ARP);
    let a = &mut buf[ETH_HLEN..ETH_HLEN + 28];
    a[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    a[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&sender);
    a[18..24].fill(0);
    a[24..28].copy_from_slice(&target);
    ETH_HLEN + 28
}

/// The addresses of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub port: u16,
}

/// A UDP datagram filling a frame of `len` bytes (at least 42), payload
/// from [`payload_byte`], with IPv4 and UDP checksums.
pub fn udp(buf: &mut [u8], e: &Endpoints, len: usize) -> usize {
    put_eth(buf, e.dst_mac, e.src_mac, ETHERTYPE_IPV4);
    let ip_len = len - ETH_HLEN;
    put_ipv4(&mut buf[ETH_HLEN..], e.src_ip, e.dst_ip, PROTO_UDP, ip_len);
    let u = &mut buf[ETH_HLEN + IP_HLEN..len];
    let udp_len = u.len();
    u[0..2].copy_from_slice(&e.port.to_be_bytes());
    u[2..4].copy_from_slice(&e.port.to_be_bytes());
    u[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    u[6..8].fill(0);
    for (i, b) in u[UDP_HLEN..].iter_mut().enumerate() {
        *b = payload_byte(i);
    }
    let sum = sum16(pseudo_header(e.src_ip, e.dst_ip, PROTO_UDP, udp_len), u);
    // A computed zero is sent as all ones (RFC 768): zero means "none".
    let c = match !fold(sum) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    len
}

/// A TCP segment filling a frame of `len` bytes (at least 54), for the
/// device to cut into [`TSO_MSS`] segments: its checksum field holds the
/// pseudo-header sum, as a partial checksum does (the device or the host
/// finishes it from [`TCP_CSUM_START`]).
pub fn tcp_for_tso(buf: &mut [u8], e: &Endpoints, len: usize) -> usize {
    put_eth(buf, e.dst_mac, e.src_mac, ETHERTYPE_IPV4);
    let ip_len = len - ETH_HLEN;
    put_ipv4(&mut buf[ETH_HLEN..], e.src_ip, e.dst_ip, PROTO_TCP, ip_len);
    let t = &mut buf[ETH_HLEN + IP_HLEN..len];
    let tcp_len = t.len();
    t[0..2].copy_from_slice(&e.port.to_be_bytes());
    t[2..4].copy_from_slice(&e.port.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
    t[8..12].fill(0); // ack
    t[12] = 5 << 4; // data offset
    t[13] = 0x18; // PSH | ACK
    t[14..16].copy_from_slice(&0xffffu16.to_be_bytes()); // window
    t[16..18].fill(0);
    t[18..20].fill(0);
    for (i, b) in t[TCP_HLEN..].iter_mut().enumerate() {
        *b = payload_byte(i);
    }
    let partial = fold(pseudo_header(e.src_ip, e.dst_ip, PROTO_TCP, tcp_len));
    t[16..18].copy_from_slice(&partial.to_be_bytes());
    len
}

/// Whether a checksum held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    Ok,
    Bad,
    /// UDP without a checksum (zero).
    None,
}

impl Csum {
    pub fn name(self) -> &'static str {
        match self {
            Csum::Ok => "ok",
            Csum::Bad => "bad",
            Csum::None => "none",
        }
    }
}

/// What the guest reads of a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
    pub kind: Kind<'a>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    Arp {
        op: u16,
        sha: [u8; 6],
        spa: [u8; 4],
        tpa: [u8; 4],
    },
    Ipv4 {
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        header_csum: Csum,
        udp: Option<Udp<'a>>,
    },
    Other,
    /// Too short for what its headers claim.
    Truncated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp<'a> {
    pub sport: u16,
    pub dport: u16,
    pub csum: Csum,
    pub payload: &'a [u8],
}

fn mac_at(b: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[..6]);
    m
}

fn ip_at(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

/// Reads an Ethernet frame; `None` if it is shorter than a header.
pub fn parse(frame: &[u8]) -> Option<Parsed<'_>> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let body = &frame[ETH_HLEN..];
    let kind = match ethertype {
        ETHERTYPE_ARP if body.len() >= 28 => Kind::Arp {
            op: u16::from_be_bytes([body[6], body[7]]),
            sha: mac_at(&body[8..]),
            spa: ip_at(&body[14..]),
            tpa: ip_at(&body[24..]),
        },
        ETHERTYPE_IPV4 => parse_ipv4(body),
        ETHERTYPE_ARP => Kind::Truncated,
        _ => Kind::Other,
    };
    Some(Parsed {
        dst: mac_at(frame),
        src: mac_at(&frame[6..]),
        ethertype,
        kind,
    })
}

fn parse_ipv4(p: &[u8]) -> Kind<'_> {
    if p.len() < IP_HLEN || p[0] >> 4 != 4 {
        return Kind::Truncated;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < IP_HLEN || total < ihl || total > p.len() {
        return Kind::Truncated;
    }
    let header_csum = if checksum(&p[..ihl]) == 0 {
        Csum::Ok
    } else {
        Csum::Bad
    };
    let (src, dst, proto) = (ip_at(&p[12..]), ip_at(&p[16..]), p[9]);
    let l4 = &p[ihl..total];
    let udp = if proto == PROTO_UDP && l4.len() >= UDP_HLEN {
        let udp_len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        if udp_len < UDP_HLEN || udp_len > l4.len() {
            return Kind::Truncated;
        }
        let d = &l4[..udp_len];
        let stored = u16::from_be_bytes([d[6], d[7]]);
        let csum = if stored == 0 {
            Csum::None
        } else if fold(sum16(pseudo_header(src, dst, PROTO_UDP, udp_len), d)) == 0xffff {
            Csum::Ok
        } else {
            Csum::Bad
        };
        Some(Udp {
            sport: u16::from_be_bytes([d[0], d[1]]),
            dport: u16::from_be_bytes([d[2], d[3]]),
            csum,
            payload: &d[UDP_HLEN..],
        })
    } else {
        None
    };
    Kind::Ipv4 {
        src,
        dst,
        proto,
        header_csum,
        udp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: Endpoints = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [0xff; 6],
        src_ip: [10, 0, 0, 2],
        dst_ip: [10, 0, 0, 1],
        port: 4000,
    };

    #[test]
    fn rfc1071_example() {
        // RFC 1071, 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&d), !0xddf2);
        assert_eq!(checksum(&[0xab]), !0xab00);
    }

    #[test]
    fn udp_round_trips_with_valid_checksums() {
        for len in [42usize, 43, 100, 1514] {
            let mut buf = [0u8; 1514];
            assert_eq!(udp(&mut buf, &E, len), len);
            let p = parse(&buf[..len]).unwrap();
            assert_eq!((p.src, p.dst, p.ethertype), (E.src_mac, E.dst_mac, 0x0800));
            let Kind::Ipv4 {
                src,
                dst,
                proto,
                header_csum,
                udp: Some(u),
            } = p.kind
            else {
                panic!("{:?}", p.kind)
            };
            assert_eq!((src, dst, proto), (E.src_ip, E.dst_ip, 17));
            assert_eq!((header_csum, u.csum), (Csum::Ok, Csum::Ok), "{len}");
            assert_eq!((u.sport, u.dport), (4000, 4000));
            assert_eq!(u.payload.len(), len - 42);
            assert!(
                u.payload
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == payload_byte(i))
            );
            // One flipped bit breaks the UDP checksum, not the IP one.
            buf[len - 1] ^= 1;
            if len > 42 {
                let Some(Parsed {
                    kind:
                        Kind::Ipv4 {
                            udp: Some(u),
                            header_csum,
                            ..
                        },
                    ..
                }) = parse(&buf[..len])
                else {
                    panic!()
                };
                assert_eq!((header_csum, u.csum), (Csum::Ok, Csum::Bad));
            }
        }
    }

    #[test]
    fn arp_request_fields() {
        let mut buf = [0u8; 64];
        let n = arp_request(&mut buf, E.src_mac, E.src_ip, E.dst_ip);
        assert_eq!(n, 42);
        let p = parse(&buf[..n]).unwrap();
        assert_eq!(p.dst, [0xff; 6]);
        assert_eq!(
            p.kind,
            Kind::Arp {
                op: 1,
                sha: E.src_mac,
                spa: E.src_ip,
                tpa: E.dst_ip
            }
        );
    }

    #[test]
    fn tcp_partial_checksum_completes_to_a_valid_one() {
        let mut buf = [0u8; 3000];
        let n = tcp_for_tso(&mut buf, &E, 3000);
        // Finish it as the device would: sum from csum_start, store ~sum.
        let start = usize::from(TCP_CSUM_START);
        let c = checksum(&buf[start..n]);
        let at = start + usize::from(TCP_CSUM_OFFSET);
        buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
        let full = fold(sum16(
            pseudo_header(E.src_ip, E.dst_ip, PROTO_TCP, n - start),
            &buf[start..n],
        ));
        // A receiver checks it with the pseudo-header, as for any segment.
        assert_eq!(full, 0xffff);
        let Some(Parsed {
            kind: Kind::Ipv4 {
                proto, header_csum, ..
            },
            ..
        }) = parse(&buf[..n])
        else {
            panic!()
        };
        assert_eq!((proto, header_csum), (PROTO_TCP, Csum::Ok));
    }

    #[test]
    fn short_and_lying_frames_are_truncated_not_a_panic() {
        assert_eq!(parse(&[0u8; 13]), None);
        let mut buf = [0u8; 100];
        udp(&mut buf, &E, 100);
        for cut in [14, 20, 33, 34, 41, 60, 99] {
            let p = parse(&buf[..cut]).unwrap();
            assert_eq!(p.kind, Kind::Truncated, "{cut}");
        }
        let mut arp = [0u8; 42];
        arp_request(&mut arp, E.src_mac, E.src_ip, E.dst_ip);
        assert_eq!(parse(&arp[..30]).unwrap().kind, Kind::Truncated);
    }
}
