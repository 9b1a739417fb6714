//! Address and port translation with incremental checksum updates (RFC 1624): the data plane
//! never sums a whole packet.

use lb_common::{
    IPPROTO_UDP,
    csum::CsumDelta,
    parse::{
        IPV4_CHECK_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, IPV4_TTL_OFFSET, IPV6_DST_OFFSET,
        IPV6_HOP_LIMIT_OFFSET, IPV6_SRC_OFFSET, Parsed,
    },
};

use crate::packet::XdpPacket;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Client → VIP becomes client → backend.
    Destination,
    /// Backend → client becomes VIP → client.
    Source,
}

#[inline(always)]
fn last4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Rewrites one endpoint of the packet to `addr`:`port_be`, and when `decrement_ttl` lowers the
/// TTL/hop limit by one (the caller forwards the frame itself and checked TTL > 1).
///
/// All old values are read before the first write; `None` means the frame was shorter than
/// the parser saw, which cannot happen, and the caller drops it rather than send it half-done.
#[inline(always)]
pub fn rewrite(
    pkt: &XdpPacket,
    p: &Parsed,
    endpoint: Endpoint,
    addr: &[u8; 16],
    port_be: u16,
    decrement_ttl: bool,
) -> Option<()> {
    let (old_addr, old_port_be, port_offset) = match endpoint {
        Endpoint::Destination => (&p.dst, p.dport_be, p.l4_offset + 2),
        Endpoint::Source => (&p.src, p.sport_be, p.l4_offset),
    };
    let l4_check_offset = p.l4_check_offset();
    let old_l4_check = pkt.read_u16(l4_check_offset)?;
    let mut l4 = CsumDelta::new().replace_u16(u16::from_be(old_port_be), u16::from_be(port_be));

    if p.ipv6 {
        l4 = l4.replace(old_addr, addr);
        let addr_offset = p.l3_offset
            + match endpoint {
                Endpoint::Destination => IPV6_DST_OFFSET,
                Endpoint::Source => IPV6_SRC_OFFSET,
            };
        pkt.write(addr_offset, *addr)?;
        if decrement_ttl {
            pkt.write(p.l3_offset + IPV6_HOP_LIMIT_OFFSET, [p.ttl - 1])?;
        }
    } else {
        let (old4, new4) = (last4(old_addr), last4(addr));
        l4 = l4.replace(&old4, &new4);
        let mut ip = CsumDelta::new().replace(&old4, &new4);
        if decrement_ttl {
            ip = ip.replace_u16(
                u16::from_be_bytes([p.ttl, p.proto]),
                u16::from_be_bytes([p.ttl - 1, p.proto]),
            );
        }
        let ip_check_offset = p.l3_offset + IPV4_CHECK_OFFSET;
        let old_ip_check = pkt.read_u16(ip_check_offset)?;
        let addr_offset = p.l3_offset
            + match endpoint {
                Endpoint::Destination => IPV4_DST_OFFSET,
                Endpoint::Source => IPV4_SRC_OFFSET,
            };
        pkt.write(addr_offset, new4)?;
        if decrement_ttl {
            pkt.write(p.l3_offset + IPV4_TTL_OFFSET, [p.ttl - 1])?;
        }
        pkt.write_u16(ip_check_offset, ip.apply(old_ip_check))?;
    }

    pkt.write(port_offset, port_be.to_ne_bytes())?;
    let new_l4_check = if p.proto == IPPROTO_UDP {
        l4.apply_udp(old_l4_check)
    } else {
        l4.apply(old_l4_check)
    };
    pkt.write_u16(l4_check_offset, new_l4_check)
}
