//! ICMP errors that quote a TCP or UDP packet: ICMPv4 destination unreachable (fragmentation
//! needed among its codes), time exceeded and parameter problem; ICMPv6 destination
//! unreachable, packet too big, time exceeded and parameter problem.
//!
//! An error carries the head of the packet it is about: its IP header and at least the first
//! eight bytes of its transport header, which hold the ports. The data plane finds the
//! balanced flow from that quote and rewrites the quote and the error's own header, so that
//! each end hears about the packet it sent itself (a client about client → VIP, a backend
//! about backend → client). Whatever this parser refuses is passed on untouched: an error
//! left alone is only lost, one rewritten wrongly misleads its receiver.
//!
//! Like `parse`, it is generic over [`PacketBytes`] and reads in 2/4/8/16-byte pieces.

use crate::{
    IPPROTO_TCP, IPPROTO_UDP,
    addr::{is_v4_mapped, v4_mapped},
    parse::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN,
        PacketBytes, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, VLAN_HLEN,
    },
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Type, code, checksum and four type-specific bytes (the next-hop MTU of fragmentation
/// needed and packet too big); the quote follows.
pub const ICMP_HLEN: usize = 8;
pub const ICMP_CHECK_OFFSET: usize = 2;
/// The part of the quoted transport header every error carries (RFC 792, RFC 4443 quote
/// more when they can): the ports, and UDP's checksum, but not TCP's.
pub const QUOTED_L4_MIN: usize = 8;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;

/// An ICMP error about a TCP or UDP packet of the same IP family. 8-aligned with the
/// addresses first, like the map keys built from it (see `abi`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// The error's own source and destination, IPv4 mapped.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The quoted packet's source and destination, IPv4 mapped.
    pub quoted_src: [u8; 16],
    pub quoted_dst: [u8; 16],
    pub l3_offset: usize,
    pub icmp_offset: usize,
    pub quoted_l3_offset: usize,
    pub quoted_l4_offset: usize,
    pub ipv6: bool,
    /// TCP or UDP.
    pub quoted_proto: u8,
    pub quoted_sport_be: u16,
    pub quoted_dport_be: u16,
    /// The error's TTL or hop limit.
    pub ttl: u8,
    /// The quote reaches the quoted transport checksum; a TCP checksum lies past the eight
    /// bytes a quote is sure to hold.
    pub quoted_l4_check: bool,
}

impl IcmpError {
    /// A placeholder to parse into.
    pub const EMPTY: Self = Self {
        src: [0; 16],
        dst: [0; 16],
        quoted_src: [0; 16],
        quoted_dst: [0; 16],
        l3_offset: 0,
        icmp_offset: 0,
        quoted_l3_offset: 0,
        quoted_l4_offset: 0,
        ipv6: false,
        quoted_proto: 0,
        quoted_sport_be: 0,
        quoted_dport_be: 0,
        ttl: 0,
        quoted_l4_check: false,
    };

    /// Offset of the ICMP (or ICMPv6) checksum.
    #[must_use]
    pub const fn icmp_check_offset(&self) -> usize {
        self.icmp_offset + ICMP_CHECK_OFFSET
    }

    /// Offset of the quoted transport checksum (inside the frame only if
    /// `quoted_l4_check`).
    #[must_use]
    pub const fn quoted_l4_check_offset(&self) -> usize {
        self.quoted_l4_offset + l4_check_offset(self.quoted_proto)
    }
}

const fn l4_check_offset(proto: u8) -> usize {
    if proto == IPPROTO_TCP {
        TCP_CHECK_OFFSET
    } else {
        UDP_CHECK_OFFSET
    }
}

#[inline(always)]
const fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// An IP header's fields the error parser checks, IPv4 or IPv6, but the addresses, which
/// go straight where they are kept: the eBPF build's stack has no room for copies.
struct IpHeader {
    header_len: usize,
    /// Header and payload, as the header says.
    total_len: usize,
    proto: u8,
    ttl: u8,
}

/// An IPv4 header at `offset` that is no fragment, its addresses (IPv4 mapped) into `src`
/// and `dst`; `None` if it is short or inconsistent. `total_len` is not checked against the
/// frame: a quoted header's describes a packet of which the quote holds only the head.
#[inline(always)]
fn ipv4_header<P: PacketBytes + ?Sized>(
    pkt: &P,
    offset: usize,
    src: &mut [u8; 16],
    dst: &mut [u8; 16],
) -> Option<IpHeader> {
    // Nearest piece first: a quoted header sits at a variable offset, where the verifier
    // only credits a bounds check to the access it guards, and the compiler drops checks
    // implied by earlier ones (see `parse::parse_ports`).
    let w0: [u8; 4] = pkt.read(offset)?;
    let w1: [u8; 4] = pkt.read(offset + 4)?;
    let w2: [u8; 4] = pkt.read(offset + 8)?;
    *src = v4_mapped(pkt.read(offset + 12)?);
    *dst = v4_mapped(pkt.read(offset + 16)?);
    let header_len = usize::from(w0[0] & 0x0f) * 4;
    // A fragment's ports are missing or not its own; xlb passes fragments untouched, so no
    // error about one concerns a flow it translated.
    let fragment = be16([w1[2], w1[3]]) & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET_MASK);
    if w0[0] >> 4 != 4 || header_len < IPV4_MIN_HLEN || fragment != 0 {
        return None;
    }
    Some(IpHeader {
        header_len,
        total_len: usize::from(be16([w0[2], w0[3]])),
        proto: w2[1],
        ttl: w2[0],
    })
}

/// The fixed IPv6 header at `offset`; as [`ipv4_header`].
#[inline(always)]
fn ipv6_header<P: PacketBytes + ?Sized>(
    pkt: &P,
    offset: usize,
    src: &mut [u8; 16],
    dst: &mut [u8; 16],
) -> Option<IpHeader> {
    let fixed: [u8; 8] = pkt.read(offset)?;
    *src = pkt.read(offset + 8)?;
    *dst = pkt.read(offset + 24)?;
    if fixed[0] >> 4 != 6 {
        return None;
    }
    Some(IpHeader {
        header_len: IPV6_HLEN,
        total_len: IPV6_HLEN + usize::from(be16([fixed[4], fixed[5]])),
        proto: fixed[6],
        ttl: fixed[7],
    })
}

/// The ICMP types that quote the packet they are about.
#[inline(always)]
const fn is_error(ipv6: bool, icmp_type: u8) -> bool {
    if ipv6 {
        matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAMETER_PROBLEM
        )
    } else {
        matches!(
            icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    }
}

/// Parses an ICMP error about a TCP or UDP packet: Ethernet (at most one VLAN tag), IPv4
/// with options or the fixed IPv6 header, the ICMP header, and the quoted IP header and
/// ports. `None` for every other ICMP message, for quotes of other protocols, of fragments
/// or of the other IP family, for truncated or inconsistent headers, and for errors not
/// addressed to the quoted packet's source (where every error about it goes).
#[inline(always)]
pub fn parse_icmp_error<P: PacketBytes + ?Sized>(pkt: &P) -> Option<IcmpError> {
    let mut e = IcmpError::EMPTY;
    parse_icmp_error_into(pkt, &mut e)?;
    Some(e)
}

/// As [`parse_icmp_error`], into `out`, which holds garbage after `None`. The data plane's
/// form: it builds no second copy of the result on its stack.
#[inline(always)]
pub fn parse_icmp_error_into<P: PacketBytes + ?Sized>(pkt: &P, out: &mut IcmpError) -> Option<()> {
    let mut ethertype = be16(pkt.read(ETH_HLEN - 2)?);
    let mut l3_offset = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(pkt.read(ETH_HLEN + 2)?);
        l3_offset += VLAN_HLEN;
    }
    let ipv6 = match ethertype {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return None,
    };
    let outer = if ipv6 {
        ipv6_header(pkt, l3_offset, &mut out.src, &mut out.dst)?
    } else {
        ipv4_header(pkt, l3_offset, &mut out.src, &mut out.dst)?
    };
    let icmp_proto = if ipv6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    // The error's own end, as its IP header says; Ethernet padding may follow.
    let end = l3_offset + outer.total_len;
    if outer.proto != icmp_proto
        || outer.total_len < outer.header_len
        || outer.total_len > pkt.len().saturating_sub(l3_offset)
    {
        return None;
    }
    let icmp_offset = l3_offset + outer.header_len;
    let icmp: [u8; 4] = pkt.read(icmp_offset)?;
    if !is_error(ipv6, icmp[0]) {
        return None;
    }
    let quoted_l3_offset = icmp_offset + ICMP_HLEN;
    let quoted = if ipv6 {
        ipv6_header(
            pkt,
            quoted_l3_offset,
            &mut out.quoted_src,
            &mut out.quoted_dst,
        )?
    } else {
        ipv4_header(
            pkt,
            quoted_l3_offset,
            &mut out.quoted_src,
            &mut out.quoted_dst,
        )?
    };
    let quoted_l4_offset = quoted_l3_offset + quoted.header_len;
    if (quoted.proto != IPPROTO_TCP && quoted.proto != IPPROTO_UDP)
        || quoted_l4_offset + QUOTED_L4_MIN > end
        || out.dst != out.quoted_src
    {
        return None;
    }
    // As the main parser: an IPv4-mapped address on the wire would pass for an IPv4 flow's
    // (the error's destination is the quote's source, checked above).
    if ipv6 && (is_v4_mapped(&out.quoted_src) || is_v4_mapped(&out.quoted_dst)) {
        return None;
    }
    let ports: [u8; 4] = pkt.read(quoted_l4_offset)?;
    out.l3_offset = l3_offset;
    out.icmp_offset = icmp_offset;
    out.quoted_l3_offset = quoted_l3_offset;
    out.quoted_l4_offset = quoted_l4_offset;
    out.ipv6 = ipv6;
    out.quoted_proto = quoted.proto;
    out.quoted_sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    out.quoted_dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    out.ttl = outer.ttl;
    out.quoted_l4_check = quoted_l4_offset + l4_check_offset(quoted.proto) + 2 <= end;
    Some(())
}

/// An ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) from a router between
/// the balancer and a backend, about a packet the balancer tunnelled there (direct server
/// return): the quote is the tunnel's outer header (IPIP, IPv6 in IPv6, or GUE), then the
/// client's own packet. The client must hear of it, about its own packet, with the MTU less
/// the tunnel's length. 8-aligned, addresses first (see `abi`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelTooBig {
    /// The client's packet as quoted: client → VIP, IPv4 mapped.
    pub client: [u8; 16],
    pub vip: [u8; 16],
    /// The tunnel's destination: the backend.
    pub backend: [u8; 16],
    /// Where the client's IP header starts in the frame; `TUNNEL_QUOTE` bytes from there
    /// are in it.
    pub inner_offset: usize,
    pub client_port_be: u16,
    pub vip_port_be: u16,
    pub proto: u8,
    pub ipv6: bool,
    /// The outer header's length (with UDP for GUE).
    pub overhead: u16,
    /// The MTU the router announced.
    pub mtu: u16,
}

impl TunnelTooBig {
    /// A placeholder to parse into.
    pub const EMPTY: Self = Self {
        client: [0; 16],
        vip: [0; 16],
        backend: [0; 16],
        inner_offset: 0,
        client_port_be: 0,
        vip_port_be: 0,
        proto: 0,
        ipv6: false,
        overhead: 0,
        mtu: 0,
    };
}

/// Bytes of the client's packet a translated error quotes (`crate::encap::ICMP4_QUOTE`,
/// `ICMP6_QUOTE`): its IP header without options and 8 bytes of TCP or UDP.
#[must_use]
pub const fn tunnel_quote(ipv6: bool) -> usize {
    if ipv6 {
        IPV6_HLEN + 8
    } else {
        IPV4_MIN_HLEN + 8
    }
}

/// Parses an error about a tunnelled packet (see [`TunnelTooBig`]): an untagged frame, the
/// error addressed to the quoted tunnel's source (the balancer), the tunnel IPIP / IPv6 in
/// IPv6 / UDP to `gue_port_be`, the client's packet of the same family, TCP or UDP, without
/// IPv4 options, quoted far enough to quote it again. `None` for everything else.
#[inline(always)]
pub fn parse_tunnel_too_big_into<P: PacketBytes + ?Sized>(
    pkt: &P,
    gue_port_be: u16,
    out: &mut TunnelTooBig,
) -> Option<()> {
    let ipv6 = match be16(pkt.read(ETH_HLEN - 2)?) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return None,
    };
    // `out`'s address fields hold the outer headers' addresses until the client's packet
    // is reached: no frame of its own for them (the XDP call chain is short of stack).
    // The error goes router → balancer.
    let error = if ipv6 {
        ipv6_header(pkt, ETH_HLEN, &mut out.client, &mut out.vip)?
    } else {
        ipv4_header(pkt, ETH_HLEN, &mut out.client, &mut out.vip)?
    };
    let end = ETH_HLEN + error.total_len;
    let icmp_proto = if ipv6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    if error.proto != icmp_proto || end > pkt.len() {
        return None;
    }
    let icmp_offset = ETH_HLEN + error.header_len;
    let icmp: [u8; 8] = pkt.read(icmp_offset)?;
    let too_big = if ipv6 {
        icmp[0] == ICMPV6_PACKET_TOO_BIG
    } else {
        icmp[0] == ICMP_DEST_UNREACH && icmp[1] == 4
    };
    if !too_big {
        return None;
    }
    // Packet too big carries 32 bits of MTU, fragmentation needed 16; either fits in 16
    // once it is about a link xlb can send on.
    let mtu = u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]) & 0xffff;
    let tunnel_offset = icmp_offset + ICMP_HLEN;
    // The tunnel goes balancer → backend: its source is the error's destination.
    let tunnel = if ipv6 {
        ipv6_header(pkt, tunnel_offset, &mut out.client, &mut out.backend)?
    } else {
        ipv4_header(pkt, tunnel_offset, &mut out.client, &mut out.backend)?
    };
    if out.client != out.vip {
        return None;
    }
    let ip_ip = if ipv6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    let header_len = if ipv6 { IPV6_HLEN } else { IPV4_MIN_HLEN };
    let udp_len = if tunnel.proto == ip_ip {
        0
    } else if tunnel.proto == IPPROTO_UDP {
        let ports: [u8; 4] = pkt.read(tunnel_offset + header_len)?;
        if u16::from_ne_bytes([ports[2], ports[3]]) != gue_port_be {
            return None;
        }
        8
    } else {
        return None;
    };
    if tunnel.header_len != header_len {
        return None;
    }
    let inner_offset = tunnel_offset + header_len + udp_len;
    let inner = if ipv6 {
        ipv6_header(pkt, inner_offset, &mut out.client, &mut out.vip)?
    } else {
        ipv4_header(pkt, inner_offset, &mut out.client, &mut out.vip)?
    };
    if inner.header_len != header_len
        || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP)
        || inner_offset + tunnel_quote(ipv6) > end
    {
        return None;
    }
    let ports: [u8; 4] = pkt.read(inner_offset + header_len)?;
    out.inner_offset = inner_offset;
    out.client_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
    out.vip_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
    out.proto = inner.proto;
    out.ipv6 = ipv6;
    out.overhead = (header_len + udp_len) as u16;
    out.mtu = mtu as u16;
    Some(())
}

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;

#[cfg(test)]
mod tests {
    use core::net::Ipv6Addr;

    use proptest::prelude::*;

    use super::*;

    const CLIENT: [u8; 4] = [203, 0, 113, 7];
    const BACKEND: [u8; 4] = [198, 51, 100, 1];
    const ROUTER: [u8; 4] = [198, 51, 100, 254];

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], options: usize, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + options;
        let mut ip = vec![0u8; hlen];
        ip[0] = 0x40 | (hlen / 4) as u8;
        ip[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        ip.extend_from_slice(payload);
        ip
    }

    fn ipv6(next: u8, src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        ip[6] = next;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
        ip.extend_from_slice(payload);
        ip
    }

    /// A TCP header (no options) and a short payload.
    fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[16..18].copy_from_slice(&0xbeefu16.to_be_bytes());
        t.extend_from_slice(b"data");
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&12u16.to_be_bytes());
        u[6..8].copy_from_slice(&0xcafeu16.to_be_bytes());
        u.extend_from_slice(b"data");
        u
    }

    fn icmp(kind: u8, code: u8, quote: &[u8]) -> Vec<u8> {
        let mut m = vec![kind, code, 0x12, 0x34, 0, 0, 0x05, 0x00];
        m.extend_from_slice(quote);
        m
    }

    fn frame(ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = eth(ethertype);
        f.extend_from_slice(l3);
        f
    }

    /// Fragmentation needed, from a router on the backend side, about client → backend
    /// (TCP, quoted whole).
    fn v4_frag_needed() -> Vec<u8> {
        let quote = ipv4(IPPROTO_TCP, CLIENT, BACKEND, 0, &tcp(40000, 8080));
        frame(
            ETH_P_IP,
            &ipv4(IPPROTO_ICMP, ROUTER, CLIENT, 0, &icmp(3, 4, &quote)),
        )
    }

    /// Packet too big, from the client side, about VIP → client (UDP).
    fn v6_packet_too_big() -> Vec<u8> {
        let quote = ipv6(
            IPPROTO_UDP,
            v6("2001:db8:f::10"),
            v6("2001:db8:c::7"),
            &udp(53, 40000),
        );
        frame(
            ETH_P_IPV6,
            &ipv6(
                IPPROTO_ICMPV6,
                v6("2001:db8:c::fe"),
                v6("2001:db8:f::10"),
                &icmp(2, 0, &quote),
            ),
        )
    }

    /// A frame of `client → vip` TCP inside a tunnel from the balancer to a backend,
    /// quoted by a router's too-big error to the balancer.
    fn tunnel_error(v6_tunnel: bool, gue: bool) -> Vec<u8> {
        if v6_tunnel {
            let (lb, backend) = (v6("2001:db8:b::fe"), v6("fd00:20::5"));
            let inner = ipv6(
                IPPROTO_TCP,
                v6("2001:db8:c::7"),
                v6("2001:db8:f::10"),
                &tcp(40000, 443),
            );
            let tunnel = if gue {
                let mut u = udp(0xc123, 6080);
                u.truncate(8);
                u.extend_from_slice(&inner);
                ipv6(IPPROTO_UDP, lb, backend, &u)
            } else {
                ipv6(41, lb, backend, &inner)
            };
            frame(
                ETH_P_IPV6,
                &ipv6(
                    IPPROTO_ICMPV6,
                    v6("2001:db8:b::1"),
                    lb,
                    &icmp(2, 0, &tunnel),
                ),
            )
        } else {
            let (lb, backend) = ([198, 51, 100, 254], [10, 20, 0, 5]);
            let inner = ipv4(IPPROTO_TCP, CLIENT, [192, 0, 2, 10], 0, &tcp(40000, 80));
            let tunnel = if gue {
                let mut u = udp(0xc123, 6080);
                u.truncate(8);
                u.extend_from_slice(&inner);
                ipv4(IPPROTO_UDP, lb, backend, 0, &u)
            } else {
                ipv4(4, lb, backend, 0, &inner)
            };
            frame(
                ETH_P_IP,
                &ipv4(IPPROTO_ICMP, ROUTER, lb, 0, &icmp(3, 4, &tunnel)),
            )
        }
    }

    #[test]
    fn too_big_errors_about_tunnels_name_the_client_flow() {
        for (v6_tunnel, gue, overhead) in [
            (false, false, 20),
            (false, true, 28),
            (true, false, 40),
            (true, true, 48),
        ] {
            let (ipv6, f) = (v6_tunnel, tunnel_error(v6_tunnel, gue));
            let mut e = TunnelTooBig::EMPTY;
            parse_tunnel_too_big_into(f.as_slice(), 6080u16.to_be(), &mut e)
                .unwrap_or_else(|| panic!("ipv6 {ipv6} gue {gue}"));
            assert_eq!(e.ipv6, ipv6);
            assert_eq!(e.overhead, overhead);
            assert_eq!(e.mtu, 0x0500, "the MTU field the test's icmp() writes");
            assert_eq!(e.proto, IPPROTO_TCP);
            assert_eq!(u16::from_be(e.client_port_be), 40000);
            let header = if ipv6 { 40 } else { 20 };
            assert_eq!(e.inner_offset, 14 + header + 8 + overhead as usize);
            if ipv6 {
                assert_eq!(e.client, v6("2001:db8:c::7"));
                assert_eq!(e.vip, v6("2001:db8:f::10"));
                assert_eq!(e.backend, v6("fd00:20::5"));
            } else {
                assert_eq!(e.client, v4_mapped(CLIENT));
                assert_eq!(e.vip, v4_mapped([192, 0, 2, 10]));
                assert_eq!(e.backend, v4_mapped([10, 20, 0, 5]));
            }
        }
    }

    #[test]
    fn other_errors_and_other_quotes_are_not_tunnel_errors() {
        let mut e = TunnelTooBig::EMPTY;
        let gue = 6080u16.to_be();
        // A GUE quote to another port, a plain flow's error, a cut quote, another type.
        assert!(
            parse_tunnel_too_big_into(
                tunnel_error(false, true).as_slice(),
                6081u16.to_be(),
                &mut e
            )
            .is_none()
        );
        assert!(parse_tunnel_too_big_into(v4_frag_needed().as_slice(), gue, &mut e).is_none());
        let mut cut = tunnel_error(true, false);
        cut.truncate(cut.len() - 30);
        assert!(parse_tunnel_too_big_into(cut.as_slice(), gue, &mut e).is_none());
        let mut unreachable = tunnel_error(false, false);
        unreachable[14 + 20 + 1] = 1;
        assert!(parse_tunnel_too_big_into(unreachable.as_slice(), gue, &mut e).is_none());
        // Not sent by the balancer: the tunnel's source is not the error's destination.
        let mut spoofed = tunnel_error(false, false);
        spoofed[14 + 20 + 8 + 12] ^= 1;
        assert!(parse_tunnel_too_big_into(spoofed.as_slice(), gue, &mut e).is_none());
    }

    #[test]
    fn ipv4_fragmentation_needed_about_tcp() {
        let e = parse_icmp_error(v4_frag_needed().as_slice()).unwrap();
        assert_eq!(
            (
                e.l3_offset,
                e.icmp_offset,
                e.quoted_l3_offset,
                e.quoted_l4_offset
            ),
            (14, 34, 42, 62)
        );
        assert_eq!((e.src, e.dst), (v4_mapped(ROUTER), v4_mapped(CLIENT)));
        assert_eq!(
            (e.quoted_src, e.quoted_dst),
            (v4_mapped(CLIENT), v4_mapped(BACKEND))
        );
        assert_eq!(
            (
                u16::from_be(e.quoted_sport_be),
                u16::from_be(e.quoted_dport_be)
            ),
            (40000, 8080)
        );
        assert_eq!((e.ipv6, e.quoted_proto, e.ttl), (false, IPPROTO_TCP, 64));
        assert!(e.quoted_l4_check);
        assert_eq!(e.icmp_check_offset(), 36);
        assert_eq!(e.quoted_l4_check_offset(), 62 + 16);
    }

    #[test]
    fn ipv6_packet_too_big_about_udp() {
        let e = parse_icmp_error(v6_packet_too_big().as_slice()).unwrap();
        assert_eq!(
            (
                e.l3_offset,
                e.icmp_offset,
                e.quoted_l3_offset,
                e.quoted_l4_offset
            ),
            (14, 54, 62, 102)
        );
        assert_eq!(e.quoted_src, v6("2001:db8:f::10"));
        assert_eq!(e.quoted_dst, v6("2001:db8:c::7"));
        assert_eq!(
            (e.ipv6, e.quoted_proto, u16::from_be(e.quoted_sport_be)),
            (true, IPPROTO_UDP, 53)
        );
        assert!(e.quoted_l4_check);
        assert_eq!(e.quoted_l4_check_offset(), 102 + 6);
    }

    #[test]
    fn ipv4_mapped_addresses_in_ipv6_headers_are_refused() {
        let mapped = v4_mapped(CLIENT);
        // Quoting a mapped address, and carried between mapped addresses.
        let quote = ipv6(IPPROTO_UDP, v6("2001:db8:f::10"), mapped, &udp(53, 40000));
        let quoting = frame(
            ETH_P_IPV6,
            &ipv6(
                IPPROTO_ICMPV6,
                v6("2001:db8:c::fe"),
                v6("2001:db8:f::10"),
                &icmp(2, 0, &quote),
            ),
        );
        assert_eq!(parse_icmp_error(quoting.as_slice()), None);
        let quote = ipv6(IPPROTO_UDP, mapped, v6("2001:db8:c::7"), &udp(53, 40000));
        let carried = frame(
            ETH_P_IPV6,
            &ipv6(
                IPPROTO_ICMPV6,
                v6("2001:db8:c::fe"),
                mapped,
                &icmp(2, 0, &quote),
            ),
        );
        assert_eq!(parse_icmp_error(carried.as_slice()), None);
        assert!(parse_icmp_error(v6_packet_too_big().as_slice()).is_some());
    }

    #[test]
    fn every_error_type_and_no_other_message() {
        let quote4 = ipv4(IPPROTO_UDP, CLIENT, BACKEND, 0, &udp(1, 2));
        for kind in 0..=255u8 {
            let f = frame(
                ETH_P_IP,
                &ipv4(IPPROTO_ICMP, ROUTER, CLIENT, 0, &icmp(kind, 0, &quote4)),
            );
            assert_eq!(
                parse_icmp_error(f.as_slice()).is_some(),
                matches!(kind, 3 | 11 | 12),
                "icmp type {kind}"
            );
        }
        let (c, v) = (v6("2001:db8:c::7"), v6("2001:db8:f::10"));
        let quote6 = ipv6(IPPROTO_TCP, v, c, &tcp(1, 2));
        for kind in 0..=255u8 {
            let f = frame(
                ETH_P_IPV6,
                &ipv6(IPPROTO_ICMPV6, c, v, &icmp(kind, 0, &quote6)),
            );
            assert_eq!(
                parse_icmp_error(f.as_slice()).is_some(),
                matches!(kind, 1..=4),
                "icmpv6 type {kind}"
            );
        }
    }

    #[test]
    fn options_and_vlan_move_the_offsets() {
        let quote = ipv4(IPPROTO_UDP, CLIENT, BACKEND, 8, &udp(40000, 5353));
        let mut f = eth(ETH_P_8021Q);
        f.extend_from_slice(&[0, 42, 0x08, 0x00]);
        f.extend_from_slice(&ipv4(IPPROTO_ICMP, BACKEND, CLIENT, 4, &icmp(3, 3, &quote)));
        let e = parse_icmp_error(f.as_slice()).unwrap();
        assert_eq!(
            (
                e.l3_offset,
                e.icmp_offset,
                e.quoted_l3_offset,
                e.quoted_l4_offset
            ),
            (18, 42, 50, 78)
        );
        assert_eq!(u16::from_be(e.quoted_dport_be), 5353);
    }

    #[test]
    fn the_shortest_quotes() {
        // Eight bytes of TCP: ports, no checksum.
        let mut quote = ipv4(IPPROTO_TCP, CLIENT, BACKEND, 0, &tcp(40000, 8080));
        quote.truncate(20 + 8);
        let f = frame(
            ETH_P_IP,
            &ipv4(IPPROTO_ICMP, BACKEND, CLIENT, 0, &icmp(3, 3, &quote)),
        );
        let e = parse_icmp_error(f.as_slice()).unwrap();
        assert!(!e.quoted_l4_check);
        // Up to TCP's checksum, not past it.
        let mut quote = ipv4(IPPROTO_TCP, CLIENT, BACKEND, 0, &tcp(40000, 8080));
        quote.truncate(20 + 18);
        let f = frame(
            ETH_P_IP,
            &ipv4(IPPROTO_ICMP, BACKEND, CLIENT, 0, &icmp(3, 3, &quote)),
        );
        assert!(parse_icmp_error(f.as_slice()).unwrap().quoted_l4_check);
        // Seven bytes of UDP: not enough.
        let mut quote = ipv4(IPPROTO_UDP, CLIENT, BACKEND, 0, &udp(40000, 5353));
        quote.truncate(20 + 7);
        let f = frame(
            ETH_P_IP,
            &ipv4(IPPROTO_ICMP, BACKEND, CLIENT, 0, &icmp(3, 3, &quote)),
        );
        assert_eq!(parse_icmp_error(f.as_slice()), None);
    }

    #[test]
    fn refusals() {
        let quote = |proto, payload: &[u8]| ipv4(proto, CLIENT, BACKEND, 0, payload);
        let error = |quote: &[u8]| {
            frame(
                ETH_P_IP,
                &ipv4(IPPROTO_ICMP, ROUTER, CLIENT, 0, &icmp(3, 4, quote)),
            )
        };
        let mut fragment_quote = quote(IPPROTO_UDP, &udp(1, 2));
        fragment_quote[6] = 0x20; // more fragments
        let mut later_fragment_quote = quote(IPPROTO_UDP, &udp(1, 2));
        later_fragment_quote[7] = 0x10;
        let mut fragmented_error = error(&quote(IPPROTO_UDP, &udp(1, 2)));
        fragmented_error[14 + 6] = 0x20;
        let mut short_quoted_ihl = quote(IPPROTO_UDP, &udp(1, 2));
        short_quoted_ihl[0] = 0x44;
        let mut bad_quoted_version = quote(IPPROTO_UDP, &udp(1, 2));
        bad_quoted_version[0] = 0x65;
        let mut addressed_elsewhere = error(&quote(IPPROTO_TCP, &tcp(1, 2)));
        addressed_elsewhere[14 + 19] ^= 1;
        let mut length_past_frame = v4_frag_needed();
        let total = u16::from_be_bytes([length_past_frame[16], length_past_frame[17]]) + 1;
        length_past_frame[16..18].copy_from_slice(&total.to_be_bytes());
        let mut length_short_of_ports = v4_frag_needed();
        length_short_of_ports[16..18].copy_from_slice(&(20u16 + 8 + 20 + 7).to_be_bytes());
        let mut length_below_header = v4_frag_needed();
        length_below_header[16..18].copy_from_slice(&19u16.to_be_bytes());
        let icmpv6_in_ipv4 = frame(
            ETH_P_IP,
            &ipv4(IPPROTO_ICMPV6, ROUTER, CLIENT, 0, &icmp(2, 0, &[0; 48])),
        );
        let icmp_in_ipv6 = {
            let mut f = v6_packet_too_big();
            f[14 + 6] = IPPROTO_ICMP;
            f
        };
        let ipv6_quoted_in_icmpv4 = error(&ipv6(
            IPPROTO_TCP,
            v6("::ffff:203.0.113.7"),
            v6("::ffff:198.51.100.1"),
            &tcp(1, 2),
        ));
        let v6_quote_past_payload = {
            let mut f = v6_packet_too_big();
            let len = u16::from_be_bytes([f[18], f[19]]);
            // Cut the error's payload one byte short of the quoted ports.
            let cut: u16 = 8 + 40 + 7;
            f[18..20].copy_from_slice(&cut.to_be_bytes());
            assert!(cut < len);
            f
        };
        let v6_quoted_extension_header = {
            let mut f = v6_packet_too_big();
            f[14 + 40 + 8 + 6] = 0; // hop-by-hop
            f
        };
        for (name, f) in [
            (
                "quoted icmp",
                error(&quote(IPPROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0, 0])),
            ),
            ("quoted sctp", error(&quote(132, &[0; 12]))),
            ("quoted first fragment", error(&fragment_quote)),
            ("quoted later fragment", error(&later_fragment_quote)),
            ("the error itself a fragment", fragmented_error),
            ("quoted ihl 4", error(&short_quoted_ihl)),
            (
                "quoted version 6 in an ipv4 quote",
                error(&bad_quoted_version),
            ),
            ("ipv6 quoted by icmpv4", ipv6_quoted_in_icmpv4),
            ("not addressed to the quoted source", addressed_elsewhere),
            ("total length past the frame", length_past_frame),
            ("total length short of the ports", length_short_of_ports),
            ("total length below the header", length_below_header),
            ("icmpv6 over ipv4", icmpv6_in_ipv4),
            ("icmp over ipv6", icmp_in_ipv6),
            ("ipv6 payload short of the ports", v6_quote_past_payload),
            ("quoted ipv6 extension header", v6_quoted_extension_header),
            ("arp", frame(0x0806, &[0; 28])),
            ("empty", vec![]),
        ] {
            assert_eq!(parse_icmp_error(f.as_slice()), None, "{name}");
        }
    }

    #[test]
    fn ethernet_padding_is_not_quote() {
        // An 8-byte TCP quote in a frame padded past where TCP's checksum would be: the
        // error's IP length, not the frame, says where the quote ends.
        let mut quote = ipv4(IPPROTO_TCP, CLIENT, BACKEND, 0, &tcp(40000, 8080));
        quote.truncate(20 + 8);
        let mut f = frame(
            ETH_P_IP,
            &ipv4(IPPROTO_ICMP, BACKEND, CLIENT, 0, &icmp(3, 3, &quote)),
        );
        f.resize(f.len() + 20, 0);
        let e = parse_icmp_error(f.as_slice()).unwrap();
        assert!(!e.quoted_l4_check);
    }

    proptest! {
        /// Cutting a valid error anywhere either leaves it acceptable (the cut is padding
        /// past the IP length, or the quote still holds the ports) or gets it refused; the
        /// slice impl would panic on any read past the end.
        #[test]
        fn truncated_frames_are_refused(cut in 0usize..120, v6 in any::<bool>()) {
            let f = if v6 { v6_packet_too_big() } else { v4_frag_needed() };
            let cut = cut.min(f.len());
            let r = parse_icmp_error(&f[..cut]);
            // Cutting the frame below the error's IP length makes that length a lie.
            prop_assert_eq!(r.is_some(), cut == f.len());
        }

        /// Cutting the quote (and fixing the error's lengths to match) keeps it acceptable
        /// exactly while the quoted ports are in it.
        #[test]
        fn truncated_quotes(keep in 0usize..64, v6 in any::<bool>()) {
            let (f, l3, quoted_l4) = if v6 {
                (v6_packet_too_big(), 14, 14 + 40 + 8 + 40)
            } else {
                (v4_frag_needed(), 14, 14 + 20 + 8 + 20)
            };
            let keep = keep.min(f.len() - quoted_l4);
            let mut cut = f[..quoted_l4 + keep].to_vec();
            let ip_len = (cut.len() - l3) as u16;
            if v6 {
                cut[l3 + 4..l3 + 6].copy_from_slice(&(ip_len - 40).to_be_bytes());
            } else {
                cut[l3 + 2..l3 + 4].copy_from_slice(&ip_len.to_be_bytes());
            }
            let r = parse_icmp_error(cut.as_slice());
            prop_assert_eq!(r.is_some(), keep >= QUOTED_L4_MIN);
            if let Some(e) = r {
                let check_end = e.quoted_l4_check_offset() + 2;
                prop_assert_eq!(e.quoted_l4_check, check_end <= cut.len());
            }
        }

        /// Random bytes after a plausible Ethernet header never panic the parser, and an
        /// accepted error's offsets lie inside the frame.
        #[test]
        fn random_frames_are_safe(
            v6 in any::<bool>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let f = frame(if v6 { ETH_P_IPV6 } else { ETH_P_IP }, &bytes);
            if let Some(e) = parse_icmp_error(f.as_slice()) {
                prop_assert!(e.quoted_l4_offset + QUOTED_L4_MIN <= f.len());
                prop_assert!(e.quoted_proto == IPPROTO_TCP || e.quoted_proto == IPPROTO_UDP);
                if e.quoted_l4_check {
                    prop_assert!(e.quoted_l4_check_offset() + 2 <= f.len());
                }
            }
        }

        /// Any single corrupted byte of a valid error is refused or parses to offsets inside
        /// the frame.
        #[test]
        fn corrupted_bytes_are_safe(at in 0usize..200, value in any::<u8>(), v6 in any::<bool>()) {
            let mut f = if v6 { v6_packet_too_big() } else { v4_frag_needed() };
            let at = at % f.len();
            f[at] = value;
            if let Some(e) = parse_icmp_error(f.as_slice()) {
                prop_assert!(e.quoted_l4_offset + QUOTED_L4_MIN <= f.len());
                prop_assert_eq!(e.dst, e.quoted_src);
            }
        }
    }
}
