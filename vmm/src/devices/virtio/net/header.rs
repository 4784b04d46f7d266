//! The virtio-net header (virtio 1.2, 5.1.6) and the feature rules that
//! decide which headers may cross the device in each direction.
//!
//! A VERSION_1 device always uses the 12-byte `virtio_net_hdr_v1` (with
//! `num_buffers`), whether or not MRG_RXBUF is negotiated, and the tap is
//! set to the same size, so a header passes between guest and tap
//! unchanged once it has been checked here.

use virtio_bindings::virtio_net as vn;

/// Bytes of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` inside the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// An Ethernet header: the shortest frame worth sending.
pub const ETH_HLEN: usize = 14;
/// The largest frame either way: a 64 KiB GSO packet behind an Ethernet
/// header (Linux's GSO_MAX_SIZE plus ETH_HLEN). Anything longer is dropped.
pub const MAX_FRAME_LEN: usize = 65536 + ETH_HLEN;
/// A header and the largest frame.
pub const MAX_BUFFER_LEN: usize = HDR_LEN + MAX_FRAME_LEN;

pub const fn bit(b: u32) -> u64 {
    1 << b
}

pub const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
pub const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
pub const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
pub const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
pub const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
pub const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
pub const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
pub const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
pub const F_HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
pub const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
pub const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);

/// The offload features, offered only when the tap takes TUNSETOFFLOAD.
pub const OFFLOAD_FEATURES: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN;

pub const FLAG_NEEDS_CSUM: u8 = byte(vn::VIRTIO_NET_HDR_F_NEEDS_CSUM);
pub const FLAG_DATA_VALID: u8 = byte(vn::VIRTIO_NET_HDR_F_DATA_VALID);
pub const GSO_NONE: u8 = byte(vn::VIRTIO_NET_HDR_GSO_NONE);
pub const GSO_TCPV4: u8 = byte(vn::VIRTIO_NET_HDR_GSO_TCPV4);
pub const GSO_TCPV6: u8 = byte(vn::VIRTIO_NET_HDR_GSO_TCPV6);
pub const GSO_ECN: u8 = byte(vn::VIRTIO_NET_HDR_GSO_ECN);

/// A header flag or GSO type (a u32 in virtio_bindings) as the header's
/// u8 field; used in consts, so a value that does not fit fails the build.
#[allow(
    clippy::cast_possible_truncation,
    reason = "asserted to fit in the line before"
)]
const fn byte(v: u32) -> u8 {
    assert!(v <= 0xff);
    v as u8
}

/// `virtio_net_hdr_v1`, decoded (all fields little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    pub fn parse(b: &[u8; HDR_LEN]) -> NetHdr {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Why a header was refused; the frame it came with is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    FrameTooShort(usize),
    #[error("flags {0:#x} carry bits this direction does not allow")]
    Flags(u8),
    #[error("partial checksum without the checksum feature")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    CsumOutsideFrame { start: u16, offset: u16, len: usize },
    #[error("GSO type {0:#x} was not negotiated")]
    GsoNotNegotiated(u8),
    #[error("GSO without a partial checksum or with a zero segment size")]
    GsoIncomplete,
}

/// Which GSO types `features` lets through, as (type, feature) pairs for
/// each direction: the guest's sends need HOST_*, its receives GUEST_*.
fn gso_allowed(gso_type: u8, features: u64, tso4: u64, tso6: u64, ecn: u64) -> bool {
    if gso_type & GSO_ECN != 0 && features & ecn == 0 {
        return false;
    }
    match gso_type & !GSO_ECN {
        GSO_NONE => gso_type & GSO_ECN == 0,
        GSO_TCPV4 => features & tso4 != 0,
        GSO_TCPV6 => features & tso6 != 0,
        _ => false,
    }
}

/// Checks the header of a frame the guest sends (`frame_len` bytes after
/// the header) against the features it acked (virtio 1.2, 5.1.6.2.1).
pub fn check_tx(hdr: &NetHdr, frame_len: usize, acked: u64) -> Result<(), HeaderError> {
    if frame_len < ETH_HLEN {
        return Err(HeaderError::FrameTooShort(frame_len));
    }
    // DATA_VALID and RSC_INFO are device-to-driver only.
    if hdr.flags & !FLAG_NEEDS_CSUM != 0 {
        return Err(HeaderError::Flags(hdr.flags));
    }
    let needs_csum = hdr.flags & FLAG_NEEDS_CSUM != 0;
    if needs_csum {
        if acked & F_CSUM == 0 {
            return Err(HeaderError::CsumNotNegotiated);
        }
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::CsumOutsideFrame {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: frame_len,
            });
        }
    }
    if !gso_allowed(hdr.gso_type, acked, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN) {
        return Err(HeaderError::GsoNotNegotiated(hdr.gso_type));
    }
    if hdr.gso_type != GSO_NONE && (!needs_csum || hdr.gso_size == 0) {
        return Err(HeaderError::GsoIncomplete);
    }
    Ok(())
}

/// Checks the header the tap put before a frame for the guest, and returns
/// it as the guest must see it (`num_buffers` is filled in later).
pub fn check_rx(hdr: &NetHdr, acked: u64) -> Result<NetHdr, HeaderError> {
    let mut out = NetHdr {
        num_buffers: 0,
        ..*hdr
    };
    if acked & F_GUEST_CSUM == 0 {
        // The tap computes checksums itself unless told it may not
        // (TUN_F_CSUM); a partial one here would be a guest it cannot reach.
        if hdr.flags & FLAG_NEEDS_CSUM != 0 {
            return Err(HeaderError::CsumNotNegotiated);
        }
        // virtio 1.2, 5.1.6.4.1: without GUEST_CSUM the flags are zero.
        out.flags = 0;
    } else if hdr.flags & !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID) != 0 {
        return Err(HeaderError::Flags(hdr.flags));
    }
    if !gso_allowed(hdr.gso_type, acked, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN) {
        return Err(HeaderError::GsoNotNegotiated(hdr.gso_type));
    }
    Ok(out)
}

/// The TUNSETOFFLOAD flags for what the guest can receive: the tap hands
/// us only frames the guest acked it can take.
pub fn tap_offload(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if acked & F_GUEST_ECN != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// The feature dependencies of virtio 1.2, 5.1.3.1, as (feature, what it
/// needs one of). A driver that acks a feature without what it depends on
/// is refused at DRIVER_OK.
const DEPENDENCIES: [(u64, u64); 6] = [
    (F_GUEST_TSO4, F_GUEST_CSUM),
    (F_GUEST_TSO6, F_GUEST_CSUM),
    (F_GUEST_ECN, F_GUEST_TSO4 | F_GUEST_TSO6),
    (F_HOST_TSO4, F_CSUM),
    (F_HOST_TSO6, F_CSUM),
    (F_HOST_ECN, F_HOST_TSO4 | F_HOST_TSO6),
];

/// The first acked feature whose dependency is missing.
pub fn missing_dependency(acked: u64) -> Option<u64> {
    DEPENDENCIES
        .iter()
        .find(|(feature, needs)| acked & feature != 0 && acked & needs == 0)
        .map(|(feature, _)| *feature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso_type: u8, gso_size: u16, csum: (u16, u16)) -> NetHdr {
        NetHdr {
            flags,
            gso_type,
            gso_size,
            csum_start: csum.0,
            csum_offset: csum.1,
            ..NetHdr::default()
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = NetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 0x3412,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 3);
        assert_eq!(NetHdr::parse(&b), h);
    }

    #[test]
    fn tx_headers() {
        let all = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN;
        let ok: &[(NetHdr, usize, u64)] = &[
            (NetHdr::default(), 60, 0),
            (NetHdr::default(), ETH_HLEN, 0),
            (hdr(FLAG_NEEDS_CSUM, GSO_NONE, 0, (34, 6)), 42, F_CSUM),
            (hdr(FLAG_NEEDS_CSUM, GSO_TCPV4, 1448, (34, 16)), 65000, all),
            (hdr(FLAG_NEEDS_CSUM, GSO_TCPV6, 1428, (54, 16)), 65000, all),
            (
                hdr(FLAG_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1448, (34, 16)),
                9000,
                all,
            ),
        ];
        for (h, len, acked) in ok {
            assert_eq!(check_tx(h, *len, *acked), Ok(()), "{h:?}");
        }
        let bad: &[(NetHdr, usize, u64, HeaderError)] = &[
            (NetHdr::default(), 13, all, HeaderError::FrameTooShort(13)),
            (
                hdr(FLAG_DATA_VALID, GSO_NONE, 0, (0, 0)),
                60,
                all,
                HeaderError::Flags(FLAG_DATA_VALID),
            ),
            (
                hdr(FLAG_NEEDS_CSUM, GSO_NONE, 0, (34, 6)),
                60,
                0,
                HeaderError::CsumNotNegotiated,
            ),
            (
                hdr(FLAG_NEEDS_CSUM, GSO_NONE, 0, (50, 9)),
                60,
                F_CSUM,
                HeaderError::CsumOutsideFrame {
                    start: 50,
                    offset: 9,
                    len: 60,
                },
            ),
            (
                hdr(FLAG_NEEDS_CSUM, GSO_TCPV4, 1448, (34, 16)),
                9000,
                F_CSUM,
                HeaderError::GsoNotNegotiated(GSO_TCPV4),
            ),
            (
                hdr(FLAG_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1448, (34, 16)),
                9000,
                F_CSUM | F_HOST_TSO4,
                HeaderError::GsoNotNegotiated(GSO_TCPV4 | GSO_ECN),
            ),
            (
                hdr(FLAG_NEEDS_CSUM, 3, 1448, (34, 6)),
                9000,
                all,
                HeaderError::GsoNotNegotiated(3),
            ),
            (
                hdr(0, GSO_NONE | GSO_ECN, 0, (0, 0)),
                60,
                all,
                HeaderError::GsoNotNegotiated(GSO_ECN),
            ),
            (
                hdr(0, GSO_TCPV4, 1448, (0, 0)),
                9000,
                all,
                HeaderError::GsoIncomplete,
            ),
            (
                hdr(FLAG_NEEDS_CSUM, GSO_TCPV4, 0, (34, 16)),
                9000,
                all,
                HeaderError::GsoIncomplete,
            ),
        ];
        for (h, len, acked, want) in bad {
            assert_eq!(check_tx(h, *len, *acked), Err(*want), "{h:?}");
        }
    }

    #[test]
    fn rx_headers() {
        // Without GUEST_CSUM the flags are cleared (DATA_VALID is a hint
        // the guest did not ask for) and a partial checksum is refused.
        let got = check_rx(&hdr(FLAG_DATA_VALID, GSO_NONE, 0, (0, 0)), 0).unwrap();
        assert_eq!(got.flags, 0);
        assert_eq!(
            check_rx(&hdr(FLAG_NEEDS_CSUM, GSO_NONE, 0, (34, 6)), 0),
            Err(HeaderError::CsumNotNegotiated)
        );
        let csum = F_GUEST_CSUM;
        let got = check_rx(
            &NetHdr {
                num_buffers: 7,
                ..hdr(FLAG_NEEDS_CSUM | FLAG_DATA_VALID, GSO_NONE, 0, (34, 6))
            },
            csum,
        )
        .unwrap();
        assert_eq!(got.flags, FLAG_NEEDS_CSUM | FLAG_DATA_VALID);
        assert_eq!(got.num_buffers, 0);
        assert_eq!(
            check_rx(&hdr(4, GSO_NONE, 0, (0, 0)), csum),
            Err(HeaderError::Flags(4))
        );
        let tso = hdr(FLAG_NEEDS_CSUM, GSO_TCPV4, 1448, (34, 16));
        assert_eq!(
            check_rx(&tso, csum),
            Err(HeaderError::GsoNotNegotiated(GSO_TCPV4))
        );
        assert!(check_rx(&tso, csum | F_GUEST_TSO4).is_ok());
        assert_eq!(
            check_rx(
                &hdr(FLAG_NEEDS_CSUM, GSO_TCPV6, 1448, (54, 16)),
                csum | F_GUEST_TSO4
            ),
            Err(HeaderError::GsoNotNegotiated(GSO_TCPV6))
        );
    }

    #[test]
    fn tap_offload_follows_guest_receive_features() {
        let cases: &[(u64, u32)] = &[
            (0, 0),
            (F_CSUM | F_HOST_TSO4, 0),
            (F_GUEST_CSUM, libc::TUN_F_CSUM),
            (
                F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN,
                libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
            ),
            // TSO without checksums is never asked of the tap.
            (F_GUEST_TSO4, 0),
        ];
        for (acked, want) in cases {
            assert_eq!(tap_offload(*acked), *want, "{acked:#x}");
        }
    }

    #[test]
    fn feature_dependencies() {
        let ok = [
            0,
            F_MAC | F_STATUS | F_MRG_RXBUF,
            F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_ECN,
            F_CSUM | F_HOST_TSO6 | F_HOST_ECN,
            OFFLOAD_FEATURES,
        ];
        for acked in ok {
            assert_eq!(missing_dependency(acked), None, "{acked:#x}");
        }
        let bad = [
            (F_GUEST_TSO4, F_GUEST_TSO4),
            (F_GUEST_CSUM | F_GUEST_ECN, F_GUEST_ECN),
            (F_HOST_TSO6, F_HOST_TSO6),
            (F_CSUM | F_HOST_ECN, F_HOST_ECN),
        ];
        for (acked, want) in bad {
            assert_eq!(missing_dependency(acked), Some(want), "{acked:#x}");
        }
    }
}
