//! Direct server return: the outer headers a tunnelled packet gets, and the ICMP "too big"
//! a client gets when its packet would no longer fit once tunnelled. Pure functions over
//! byte arrays, so the XDP program writes each header with one store of a built array and
//! the tests check every byte on the host.

use crate::{
    FORWARD_GUE, FORWARD_IPIP, GUE_V4_OVERHEAD, GUE_V6_OVERHEAD, IPIP_V4_OVERHEAD, IPIP_V6_OVERHEAD,
};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// Hop limit of the outer header and of the ICMP errors xlb originates (Linux's default).
pub const OUTER_TTL: u8 = 64;
/// IPv4 "don't fragment": the outer header carries it, since xlb answers too-big packets
/// itself rather than have routers fragment tunnels.
const IPV4_DF: u16 = 0x4000;
/// IPv6's minimum link MTU: no packet-too-big may announce less (RFC 8200 §5).
pub const IPV6_MIN_MTU: u16 = 1280;
/// The smallest IPv4 MTU a fragmentation-needed may announce (RFC 791's 68).
pub const IPV4_MIN_MTU: u16 = 68;

/// Bytes of the client's packet an ICMP "too big" quotes: its IP header (without options,
/// which the data path then refuses to answer) and the first 8 bytes of its TCP or UDP
/// header, which carry the ports (and TCP's sequence number) the sender's stack matches.
pub const ICMP4_QUOTE: usize = 20 + 8;
pub const ICMP6_QUOTE: usize = 40 + 8;
/// An ICMP error's own header: type, code, checksum, 4 bytes of type-specific data.
pub const ICMP_HLEN: usize = 8;

/// The bytes a forwarding method puts in front of a packet of the given family; `None` for
/// NAT (and unknown methods), which adds nothing.
#[inline(always)]
#[must_use]
pub const fn overhead(forwarding: u8, ipv6: bool) -> Option<u16> {
    match (forwarding, ipv6) {
        (FORWARD_IPIP, false) => Some(IPIP_V4_OVERHEAD),
        (FORWARD_IPIP, true) => Some(IPIP_V6_OVERHEAD),
        (FORWARD_GUE, false) => Some(GUE_V4_OVERHEAD),
        (FORWARD_GUE, true) => Some(GUE_V6_OVERHEAD),
        _ => None,
    }
}

/// The RFC 1071 sum of `words` 16-bit big-endian words, not yet complemented.
#[inline(always)]
fn sum_words<const N: usize>(bytes: &[u8; N], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
const fn finish(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// An IPv4 header without options: `payload_len` bytes follow it, `tos` is the inner
/// packet's (DSCP and ECN travel with it), don't-fragment set, checksum filled in.
#[inline(always)]
#[must_use]
pub fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    tos: u8,
    payload_len: u16,
    dont_fragment: bool,
) -> [u8; 20] {
    let total = payload_len.saturating_add(20).to_be_bytes();
    let frag = if dont_fragment { IPV4_DF } else { 0 }.to_be_bytes();
    let mut h = [
        0x45, tos, total[0], total[1], 0, 0, frag[0], frag[1], OUTER_TTL, proto, 0, 0, src[0],
        src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    let check = finish(sum_words(&h, 0)).to_be_bytes();
    h[10] = check[0];
    h[11] = check[1];
    h
}

/// An IPv6 header: `payload_len` bytes follow it; the traffic class is the inner packet's,
/// the flow label the flow's entropy (routers and NICs hash on it).
#[inline(always)]
#[must_use]
pub fn ipv6_header(
    src: &[u8; 16],
    dst: &[u8; 16],
    next_header: u8,
    traffic_class: u8,
    flow_label: u32,
    payload_len: u16,
) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60 | traffic_class >> 4;
    h[1] = traffic_class << 4 | ((flow_label >> 16) & 0x0f) as u8;
    h[2] = (flow_label >> 8) as u8;
    h[3] = flow_label as u8;
    let len = payload_len.to_be_bytes();
    h[4] = len[0];
    h[5] = len[1];
    h[6] = next_header;
    h[7] = OUTER_TTL;
    h[8..24].copy_from_slice(src);
    h[24..40].copy_from_slice(dst);
    h
}

/// A GUE (variant 1) UDP header: `payload_len` bytes of inner IP packet follow. The
/// checksum is 0: the inner packet carries its own, and RFC 6935/6936 allow a zero UDP
/// checksum for tunnels over IPv6 (Linux's `fou` accepts it unless told otherwise).
#[inline(always)]
#[must_use]
pub fn gue_udp_header(source_port: u16, port_be: u16, payload_len: u16) -> [u8; 8] {
    let sport = source_port.to_be_bytes();
    let dport = port_be.to_ne_bytes();
    let len = payload_len.saturating_add(8).to_be_bytes();
    [sport[0], sport[1], dport[0], dport[1], len[0], len[1], 0, 0]
}

/// The GUE source port for a flow: from its hash, in the dynamic range (49152-65535), so
/// the backend's NIC spreads flows over its queues while a flow stays on one.
#[inline(always)]
#[must_use]
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    0xc000 | (flow_hash >> 18) as u16
}

/// The IPv6 flow label for a flow: 20 bits of its hash, never 0 (0 means "no label").
#[inline(always)]
#[must_use]
pub const fn flow_label(flow_hash: u32) -> u32 {
    match flow_hash >> 12 {
        0 => 1,
        label => label,
    }
}

/// The traffic class / TOS byte of an inner IP header, from its first two bytes.
#[inline(always)]
#[must_use]
pub const fn traffic_class(first_two: [u8; 2], ipv6: bool) -> u8 {
    if ipv6 {
        first_two[0] << 4 | first_two[1] >> 4
    } else {
        first_two[1]
    }
}

/// The MTU a "too big" announces to a client whose packet must fit `route_mtu` with
/// `overhead` bytes of tunnel in front: never below what the family allows.
#[inline(always)]
#[must_use]
pub const fn announced_mtu(route_mtu: u16, overhead: u16, ipv6: bool) -> u16 {
    let floor = if ipv6 { IPV6_MIN_MTU } else { IPV4_MIN_MTU };
    let mtu = route_mtu.saturating_sub(overhead);
    if mtu < floor { floor } else { mtu }
}

/// The RFC 1071 sum of `bytes` as big-endian 16-bit words (an even count), unfolded: what
/// an ICMP error's checksum needs of the bytes it quotes. The data path sums the quote in
/// place instead (`tunnel::quote_sum`); this is the reference.
#[must_use]
pub fn sum_be_words(bytes: &[u8]) -> u32 {
    bytes
        .as_chunks::<2>()
        .0
        .iter()
        .map(|w| u32::from(u16::from_be_bytes(*w)))
        .sum()
}

/// The IP and ICMP headers of an IPv4 "fragmentation needed" (type 3, code 4) from `src`
/// (the VIP) to `dst` (the client), announcing `mtu`; `quote_sum` is `sum_be_words` of the
/// `ICMP4_QUOTE` bytes it quotes (the client's IP header and 8 bytes of its payload).
#[inline(always)]
#[must_use]
pub fn icmp4_frag_needed(
    src: [u8; 4],
    dst: [u8; 4],
    mtu: u16,
    quote_sum: u32,
) -> ([u8; 20], [u8; ICMP_HLEN]) {
    let ip = ipv4_header(
        src,
        dst,
        IPPROTO_ICMP,
        0,
        (ICMP_HLEN + ICMP4_QUOTE) as u16,
        false,
    );
    let m = mtu.to_be_bytes();
    let mut icmp = [3, 4, 0, 0, 0, 0, m[0], m[1]];
    let check = finish(sum_words(&icmp, quote_sum)).to_be_bytes();
    icmp[2] = check[0];
    icmp[3] = check[1];
    (ip, icmp)
}

/// The IPv6 and ICMPv6 headers of a "packet too big" (type 2) from `src` (the VIP) to `dst`
/// (the client), announcing `mtu`; `quote_sum` as for `icmp4_frag_needed`, over
/// `ICMP6_QUOTE` bytes.
#[inline(always)]
#[must_use]
pub fn icmp6_packet_too_big(
    src: &[u8; 16],
    dst: &[u8; 16],
    mtu: u16,
    quote_sum: u32,
) -> ([u8; 40], [u8; ICMP_HLEN]) {
    let len = (ICMP_HLEN + ICMP6_QUOTE) as u16;
    let ip = ipv6_header(src, dst, IPPROTO_ICMPV6, 0, 0, len);
    let m = mtu.to_be_bytes();
    let mut icmp = [2, 0, 0, 0, 0, 0, m[0], m[1]];
    // The pseudo-header: both addresses, the upper-layer length, the next header.
    let pseudo = sum_words(src, sum_words(dst, 0)) + u32::from(len) + u32::from(IPPROTO_ICMPV6);
    let check = finish(sum_words(&icmp, pseudo + quote_sum)).to_be_bytes();
    icmp[2] = check[0];
    icmp[3] = check[1];
    (ip, icmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::{checksum, pseudo_header_sum};

    #[test]
    fn ipv4_header_sums_to_zero_and_says_what_follows() {
        let h = ipv4_header([10, 0, 0, 1], [10, 0, 2, 5], IPPROTO_IPIP, 0xb8, 1480, true);
        assert_eq!(
            checksum(0, &h),
            0,
            "a header with its checksum sums to zero"
        );
        assert_eq!(h[0], 0x45);
        assert_eq!(h[1], 0xb8, "the inner TOS travels outside");
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 1500);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), 0x4000, "DF, no offset");
        assert_eq!(h[8], OUTER_TTL);
        assert_eq!(h[9], IPPROTO_IPIP);
        assert_eq!(&h[12..16], &[10, 0, 0, 1]);
        assert_eq!(&h[16..20], &[10, 0, 2, 5]);
    }

    #[test]
    fn ipv6_header_carries_class_label_and_length() {
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let h = ipv6_header(&src, &dst, IPPROTO_IPV6, 0xb8, 0xabcde, 1240);
        assert_eq!(h[0] >> 4, 6);
        assert_eq!(h[0] << 4 | h[1] >> 4, 0xb8);
        assert_eq!(u32::from_be_bytes([0, h[1] & 0x0f, h[2], h[3]]), 0xabcde);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 1240);
        assert_eq!(h[6], IPPROTO_IPV6);
        assert_eq!(h[7], OUTER_TTL);
        assert_eq!(&h[8..24], &src);
        assert_eq!(&h[24..40], &dst);
    }

    #[test]
    fn gue_header_has_length_and_ports() {
        let h = gue_udp_header(0xc123, 6080u16.to_be(), 100);
        assert_eq!(u16::from_be_bytes([h[0], h[1]]), 0xc123);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 6080);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 108);
        assert_eq!(&h[6..8], &[0, 0]);
    }

    #[test]
    fn entropy_stays_in_range_and_varies() {
        for hash in [0, 1, 0x3ffff, 0xffff_ffff, 0x8000_0000, 0x1234_5678] {
            assert!(gue_source_port(hash) >= 0xc000);
            assert!((1..1 << 20).contains(&flow_label(hash)));
        }
        assert_ne!(gue_source_port(0x1234_5678), gue_source_port(0x8765_4321));
    }

    #[test]
    fn traffic_class_is_read_from_either_family() {
        assert_eq!(traffic_class([0x45, 0xb8], false), 0xb8);
        assert_eq!(traffic_class([0x6b, 0x80], true), 0xb8);
    }

    #[test]
    fn announced_mtu_subtracts_the_tunnel_and_respects_the_floors() {
        assert_eq!(announced_mtu(1500, IPIP_V4_OVERHEAD, false), 1480);
        assert_eq!(announced_mtu(1500, GUE_V6_OVERHEAD, true), 1452);
        assert_eq!(announced_mtu(1300, GUE_V6_OVERHEAD, true), IPV6_MIN_MTU);
        assert_eq!(announced_mtu(40, IPIP_V4_OVERHEAD, false), IPV4_MIN_MTU);
    }

    #[test]
    fn overhead_per_method_and_family() {
        assert_eq!(overhead(FORWARD_IPIP, false), Some(20));
        assert_eq!(overhead(FORWARD_GUE, false), Some(28));
        assert_eq!(overhead(FORWARD_IPIP, true), Some(40));
        assert_eq!(overhead(FORWARD_GUE, true), Some(48));
        assert_eq!(overhead(crate::FORWARD_NAT, false), None);
        assert_eq!(overhead(7, true), None);
    }

    #[test]
    fn icmp4_frag_needed_checksums_over_header_and_quote() {
        let quote: [u8; ICMP4_QUOTE] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let (ip, icmp) =
            icmp4_frag_needed([10, 0, 0, 100], [10, 1, 0, 2], 1480, sum_be_words(&quote));
        assert_eq!(checksum(0, &ip), 0);
        assert_eq!(ip[9], IPPROTO_ICMP);
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]) as usize,
            20 + ICMP_HLEN + ICMP4_QUOTE
        );
        assert_eq!(&icmp[..2], &[3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1480);
        let mut message = icmp.to_vec();
        message.extend_from_slice(&quote);
        assert_eq!(checksum(0, &message), 0);
    }

    #[test]
    fn icmp6_packet_too_big_checksums_with_the_pseudo_header() {
        let quote: [u8; ICMP6_QUOTE] = core::array::from_fn(|i| (i * 13 + 1) as u8);
        let vip = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let client = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let (ip, icmp) = icmp6_packet_too_big(&vip, &client, 1452, sum_be_words(&quote));
        assert_eq!(ip[6], IPPROTO_ICMPV6);
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]) as usize,
            ICMP_HLEN + ICMP6_QUOTE
        );
        assert_eq!(&icmp[..2], &[2, 0]);
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            1452
        );
        let mut message = icmp.to_vec();
        message.extend_from_slice(&quote);
        let pseudo = pseudo_header_sum(&vip, &client, IPPROTO_ICMPV6, message.len() as u32);
        assert_eq!(checksum(pseudo, &message), 0);
    }
}
