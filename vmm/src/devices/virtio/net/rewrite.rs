//! MAC translation for a NIC restored under another address (a clone).
//!
//! The guest's driver read the device's MAC when it probed and keeps
//! using it: after a restore the guest still believes in the saved
//! address (the *guest MAC*), while the network must see the clone's own
//! (the *wire MAC*), or the clone would answer for its origin's address
//! on the same bridge. So the device translates, on the frame as it sits
//! in the host buffer (header first, whole, however the guest split it
//! over descriptors):
//!
//! - transmit: an Ethernet source equal to the guest MAC becomes the wire
//!   MAC, and so does the sender hardware address of an ARP packet for
//!   IPv4 over Ethernet;
//! - receive: an Ethernet destination equal to the wire MAC becomes the
//!   guest MAC, and so does the target hardware address of such an ARP
//!   packet.
//!
//! Only those fields are touched; no checksum covers them (Ethernet's FCS
//! is not in the frame, ARP has none), so nothing else changes. Limits:
//! addresses inside other protocols are not rewritten: IPv6 neighbour
//! discovery's link-layer address options, DHCP's `chaddr` (a DHCP server
//! sees the guest MAC there and may lease by it), ARP inside a VLAN tag,
//! and any payload that quotes a MAC. A frame for the guest MAC itself
//! (the clone's origin's address, say flooded by a bridge that has not
//! learned where the origin is) is not translated and reaches the guest as
//! if it were its own. A driver reset ends the translation: the next
//! driver reads the wire MAC from config space and uses it.

// Where the frame starts in the host buffer: after the virtio-net header.
use super::header::HDR_LEN;

const ETH_HLEN: usize = 14;
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// htype Ethernet (1), ptype IPv4 (0x0800), hlen 6, plen 4.
const ARP_ETH_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
/// Sender and target hardware addresses, from the start of the ARP packet.
const ARP_SHA: usize = 8;
const ARP_THA: usize = 18;
/// The ARP fields up to the end of the target hardware address.
const ARP_THA_END: usize = ARP_THA + 6;

/// The two addresses of a translated NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacRewrite {
    /// What the guest's driver uses.
    pub guest: [u8; 6],
    /// What the network sees (and config space reports).
    pub wire: [u8; 6],
}

impl MacRewrite {
    /// A translation from `guest` to `wire`; none when they are the same.
    pub fn between(guest: [u8; 6], wire: [u8; 6]) -> Option<MacRewrite> {
        (guest != wire).then_some(MacRewrite { guest, wire })
    }

    /// A frame the guest sends, virtio-net header first: guest MAC to
    /// wire MAC in the Ethernet source and the ARP sender. A frame too
    /// short for a field keeps it as it is.
    pub fn outbound(&self, packet: &mut [u8]) {
        let Some(frame) = packet.get_mut(HDR_LEN..) else {
            return;
        };
        replace(frame, 6, self.guest, self.wire);
        if let Some(arp) = arp_mut(frame) {
            replace(arp, ARP_SHA, self.guest, self.wire);
        }
    }

    /// A frame for the guest, virtio-net header first: wire MAC to guest
    /// MAC in the Ethernet destination and the ARP target.
    pub fn inbound(&self, packet: &mut [u8]) {
        let Some(frame) = packet.get_mut(HDR_LEN..) else {
            return;
        };
        replace(frame, 0, self.wire, self.guest);
        if let Some(arp) = arp_mut(frame) {
            replace(arp, ARP_THA, self.wire, self.guest);
        }
    }
}

/// The six bytes at `at` become `to` where they are `from`.
fn replace(bytes: &mut [u8], at: usize, from: [u8; 6], to: [u8; 6]) {
    if let Some(field) = bytes.get_mut(at..at + 6) {
        if *field == from {
            field.copy_from_slice(&to);
        }
    }
}

/// The ARP packet of an untagged Ethernet frame, when it is ARP for IPv4
/// over Ethernet and long enough to hold both hardware addresses.
fn arp_mut(frame: &mut [u8]) -> Option<&mut [u8]> {
    if frame.get(12..ETH_HLEN)? != ETHERTYPE_ARP {
        return None;
    }
    let arp = frame.get_mut(ETH_HLEN..)?;
    if arp.len() < ARP_THA_END || arp[..6] != ARP_ETH_IPV4 {
        return None;
    }
    Some(arp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
    const WIRE: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
    const PEER: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 3];

    fn rw() -> MacRewrite {
        MacRewrite::between(GUEST, WIRE).unwrap()
    }

    /// A header and an Ethernet frame of `ethertype` with `body`.
    fn packet(dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2], body: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN];
        p.extend_from_slice(&dst);
        p.extend_from_slice(&src);
        p.extend_from_slice(&ethertype);
        p.extend_from_slice(body);
        p
    }

    fn arp(op: u8, sha: [u8; 6], tha: [u8; 6]) -> Vec<u8> {
        let mut a = ARP_ETH_IPV4.to_vec();
        a.extend_from_slice(&[0, op]);
        a.extend_from_slice(&sha);
        a.extend_from_slice(&[10, 0, 0, 2]);
        a.extend_from_slice(&tha);
        a.extend_from_slice(&[10, 0, 0, 1]);
        a
    }

    #[test]
    fn the_same_address_needs_no_translation() {
        assert_eq!(MacRewrite::between(GUEST, GUEST), None);
    }

    #[test]
    fn outbound_rewrites_the_source_and_the_arp_sender_only() {
        let mut p = packet([0xff; 6], GUEST, ETHERTYPE_ARP, &arp(1, GUEST, [0; 6]));
        let header = p[..HDR_LEN].to_vec();
        rw().outbound(&mut p);
        assert_eq!(p[..HDR_LEN], header[..], "the virtio-net header");
        let want = packet([0xff; 6], WIRE, ETHERTYPE_ARP, &arp(1, WIRE, [0; 6]));
        assert_eq!(p, want);
        // A frame from another address (a bridge inside the guest) and an
        // ARP reply that quotes the guest MAC as target are left alone.
        let mut other = packet(PEER, PEER, ETHERTYPE_ARP, &arp(2, PEER, GUEST));
        let before = other.clone();
        rw().outbound(&mut other);
        assert_eq!(other, before);
    }

    #[test]
    fn inbound_rewrites_the_destination_and_the_arp_target_only() {
        let mut p = packet(WIRE, PEER, ETHERTYPE_ARP, &arp(2, PEER, WIRE));
        rw().inbound(&mut p);
        assert_eq!(p, packet(GUEST, PEER, ETHERTYPE_ARP, &arp(2, PEER, GUEST)));
        // Broadcast stays broadcast; a sender that is the wire MAC (our own
        // frame reflected) is not the guest's business to see renamed.
        let mut b = packet([0xff; 6], WIRE, ETHERTYPE_ARP, &arp(1, WIRE, [0; 6]));
        let before = b.clone();
        rw().inbound(&mut b);
        assert_eq!(b, before);
    }

    #[test]
    fn other_ethertypes_keep_their_payload() {
        // IPv4 and IPv6 whose payload happens to hold the MACs where ARP
        // would have them: only the Ethernet header changes.
        let body = arp(2, GUEST, WIRE);
        for ethertype in [[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00]] {
            let mut out = packet(PEER, GUEST, ethertype, &body);
            rw().outbound(&mut out);
            assert_eq!(out, packet(PEER, WIRE, ethertype, &body));
            let mut inp = packet(WIRE, PEER, ethertype, &body);
            rw().inbound(&mut inp);
            assert_eq!(inp, packet(GUEST, PEER, ethertype, &body));
        }
        // ARP for another protocol or hardware type is not parsed.
        let mut other = arp(1, GUEST, [0; 6]);
        other[3] = 0x06;
        let mut p = packet([0xff; 6], GUEST, ETHERTYPE_ARP, &other);
        rw().outbound(&mut p);
        assert_eq!(p, packet([0xff; 6], WIRE, ETHERTYPE_ARP, &other));
    }

    #[test]
    fn short_frames_are_translated_as_far_as_they_go_without_a_panic() {
        let full_out = packet([0xff; 6], GUEST, ETHERTYPE_ARP, &arp(1, GUEST, [0; 6]));
        let full_in = packet(WIRE, PEER, ETHERTYPE_ARP, &arp(2, PEER, WIRE));
        for len in 0..=full_out.len() {
            let mut p = full_out[..len].to_vec();
            rw().outbound(&mut p);
            let src_done = len >= HDR_LEN + 12;
            assert_eq!(
                &p[..len.min(HDR_LEN + 6)],
                &full_out[..len.min(HDR_LEN + 6)]
            );
            if src_done {
                assert_eq!(&p[HDR_LEN + 6..HDR_LEN + 12], &WIRE, "len {len}");
            } else {
                assert_eq!(p, full_out[..len], "len {len}");
            }
            let arp_whole = len >= HDR_LEN + ETH_HLEN + ARP_THA_END;
            let sha = HDR_LEN + ETH_HLEN + ARP_SHA;
            if len >= sha + 6 {
                let want = if arp_whole { WIRE } else { GUEST };
                assert_eq!(&p[sha..sha + 6], &want, "len {len}");
            }

            let mut q = full_in[..len].to_vec();
            rw().inbound(&mut q);
            if len >= HDR_LEN + 6 {
                assert_eq!(&q[HDR_LEN..HDR_LEN + 6], &GUEST, "len {len}");
            } else {
                assert_eq!(q, full_in[..len], "len {len}");
            }
            let tha = HDR_LEN + ETH_HLEN + ARP_THA;
            if len >= tha + 6 {
                assert_eq!(&q[tha..tha + 6], &GUEST, "len {len}");
            } else if len > tha {
                assert_eq!(&q[tha..], &full_in[tha..len], "len {len}");
            }
        }
    }
}
