//! The packet parser and the NAT rewrite, against etherparse as an independent oracle.

use etherparse::{LinkExtSlice, NetSlice, SlicedPacket, TcpHeader, TransportSlice};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    addr::{is_v4_mapped, v4_mapped},
    csum::CsumDelta,
    icmp::{ICMP_HLEN, QUOTED_L4_MIN, parse_icmp_error},
    parse::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_CHECK_OFFSET, IPV4_DST_OFFSET,
        IPV4_SRC_OFFSET, IPV4_TTL_OFFSET, IPV6_DST_OFFSET, IPV6_HOP_LIMIT_OFFSET, IPV6_SRC_OFFSET,
        Parsed, Skip, parse,
    },
};

/// What etherparse sees in a frame, reduced to what `lb_common::parse` reports.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    src: [u8; 16],
    dst: [u8; 16],
    ipv6: bool,
    proto: u8,
    sport: u16,
    dport: u16,
    ttl: u8,
    tcp_flags: u8,
}

fn tcp_flags(t: &TcpHeader) -> u8 {
    [t.fin, t.syn, t.rst, t.psh, t.ack, t.urg, t.ece, t.cwr]
        .iter()
        .enumerate()
        .fold(0, |acc, (bit, set)| acc | (u8::from(*set) << bit))
}

/// The IP layer of a frame as etherparse's strict slicer reads it (lengths checked at every
/// layer), when it has at most one 802.1Q/802.1ad tag and no IPv4 or IPv6 extension header.
fn sliced(frame: &[u8]) -> Option<SlicedPacket<'_>> {
    let outer = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let s = SlicedPacket::from_ethernet(frame).ok()?;
    let tagged = matches!(outer, ETH_P_8021Q | ETH_P_8021AD);
    let one_tag = s.link_exts.len() == 1 && matches!(s.link_exts[0], LinkExtSlice::Vlan(_));
    if !(tagged && one_tag || matches!(outer, ETH_P_IP | ETH_P_IPV6) && s.link_exts.is_empty()) {
        return None;
    }
    Some(s)
}

/// etherparse's reading of `frame`, when it is a frame xlb balances: Ethernet with at most
/// one 802.1Q/802.1ad tag, IPv4 that is no fragment or IPv6 without extension headers and
/// without IPv4-mapped addresses (RFC 4291 2.5.5.2: never on the wire), and TCP or UDP. A length field of 0 (IPv6 payload, UDP) means "the rest of the frame" to
/// etherparse, as in IPv6 jumbograms (RFC 2675), which need a hop-by-hop header xlb does not
/// balance; xlb calls them malformed. `None` for anything else, including frames etherparse
/// rejects.
fn etherparse_view(frame: &[u8]) -> Option<Expected> {
    let s = sliced(frame)?;
    let (src, dst, ipv6, proto, ttl) = match s.net.as_ref()? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            if ip.is_payload_fragmented() || !ip.extensions().is_empty() {
                return None;
            }
            (
                v4_mapped(h.source()),
                v4_mapped(h.destination()),
                false,
                h.protocol().0,
                h.ttl(),
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            if !ip.extensions().is_empty()
                || h.payload_length() == 0
                || h.source_addr().to_ipv4_mapped().is_some()
                || h.destination_addr().to_ipv4_mapped().is_some()
            {
                return None;
            }
            (
                h.source(),
                h.destination(),
                true,
                h.next_header().0,
                h.hop_limit(),
            )
        }
        _ => return None,
    };
    let (sport, dport, tcp_flags) = match s.transport.as_ref()? {
        TransportSlice::Tcp(t) => (
            t.source_port(),
            t.destination_port(),
            tcp_flags(&t.to_header()),
        ),
        TransportSlice::Udp(u) if u.length() != 0 => (u.source_port(), u.destination_port(), 0),
        _ => return None,
    };
    Some(Expected {
        src,
        dst,
        ipv6,
        proto,
        sport,
        dport,
        ttl,
        tcp_flags,
    })
}

fn seen(p: &Parsed) -> Expected {
    Expected {
        src: p.src,
        dst: p.dst,
        ipv6: p.ipv6,
        proto: p.proto,
        sport: u16::from_be(p.sport_be),
        dport: u16::from_be(p.dport_be),
        ttl: p.ttl,
        tcp_flags: p.tcp_flags,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `lb_common::parse` never panics, accepts exactly the frames etherparse reads as balanceable
/// TCP/UDP, and reports the same addresses, ports, TTL and flags; its offsets stay inside the
/// frame. The ICMP error parser never panics either, and only takes what `parse` calls ICMP.
pub fn check_parse(frame: &[u8]) {
    let ours = parse(frame);
    let theirs = etherparse_view(frame);
    match (&ours, &theirs) {
        (Ok(p), Some(want)) => {
            assert_eq!(&seen(p), want, "frame {}", hex(frame));
            let header_end = p.l4_offset + if p.proto == IPPROTO_TCP { 20 } else { 8 };
            assert!(
                header_end <= frame.len(),
                "header past the end: {}",
                hex(frame)
            );
            assert!(p.l4_check_offset() + 2 <= header_end);
        }
        (Err(_), None) => {}
        (ours, theirs) => {
            panic!(
                "lb-common says {ours:?}, etherparse says {theirs:?} for {}",
                hex(frame)
            )
        }
    }
    if let Some(e) = parse_icmp_error(frame) {
        assert_eq!(
            ours,
            Err(Skip::Icmp),
            "an ICMP error parse sees {}",
            hex(frame)
        );
        assert!(e.icmp_offset + ICMP_HLEN <= e.quoted_l3_offset);
        assert!(e.quoted_l3_offset < e.quoted_l4_offset);
        assert!(e.quoted_l4_offset + QUOTED_L4_MIN <= frame.len());
        assert!(e.quoted_proto == IPPROTO_TCP || e.quoted_proto == IPPROTO_UDP);
        if e.quoted_l4_check {
            assert!(e.quoted_l4_check_offset() + 2 <= frame.len());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Destination,
    Source,
}

/// The parameters of one rewrite, taken from the head of the fuzz input.
struct Rewrite {
    endpoint: Endpoint,
    decrement_ttl: bool,
    addr: [u8; 16],
    port_be: u16,
}

/// Flags byte, 16 address bytes, 2 port bytes (big-endian); the frame follows.
const REWRITE_HEADER: usize = 19;

impl Rewrite {
    fn split(data: &[u8]) -> Option<(Self, &[u8])> {
        let (head, frame) = data.split_at_checked(REWRITE_HEADER)?;
        let rewrite = Self {
            endpoint: if head[0] & 1 == 0 {
                Endpoint::Destination
            } else {
                Endpoint::Source
            },
            decrement_ttl: head[0] & 2 != 0,
            addr: head[1..17].try_into().ok()?,
            port_be: u16::from_ne_bytes([head[17], head[18]]),
        };
        Some((rewrite, frame))
    }
}

fn read16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn write16(frame: &mut [u8], at: usize, value: u16) {
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn last4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// The XDP rewrite of `lb-ebpf/src/nat.rs` (`plan`, `write_fields`, `rewrite`) on a byte
/// slice: the same `lb_common` deltas, merged and applied the same way. lb-ebpf only builds
/// for the BPF target; a change there must be made here too (the golden packet tests check
/// the real program's output with etherparse).
fn rewrite_like_xdp(frame: &mut [u8], p: &Parsed, r: &Rewrite) {
    let ttl_decrement = || {
        let (old, new) = if p.ipv6 {
            ([p.proto, p.ttl], [p.proto, p.ttl - 1])
        } else {
            ([p.ttl, p.proto], [p.ttl - 1, p.proto])
        };
        CsumDelta::new().replace_u16(u16::from_be_bytes(old), u16::from_be_bytes(new))
    };
    let (old_addr, old_port_be, port_offset) = match r.endpoint {
        Endpoint::Destination => (&p.dst, p.dport_be, p.l4_offset + 2),
        Endpoint::Source => (&p.src, p.sport_be, p.l4_offset),
    };
    let port = CsumDelta::new().replace_u16(u16::from_be(old_port_be), u16::from_be(r.port_be));
    let l4_check_offset = p.l4_check_offset();
    let old_l4_check = read16(frame, l4_check_offset);
    let pseudo = if p.ipv6 {
        let offset = p.l3_offset
            + match r.endpoint {
                Endpoint::Destination => IPV6_DST_OFFSET,
                Endpoint::Source => IPV6_SRC_OFFSET,
            };
        frame[offset..offset + 16].copy_from_slice(&r.addr);
        if r.decrement_ttl {
            frame[p.l3_offset + IPV6_HOP_LIMIT_OFFSET] = p.ttl - 1;
        }
        CsumDelta::new().replace(old_addr, &r.addr)
    } else {
        let pseudo = CsumDelta::new().replace(&last4(old_addr), &last4(&r.addr));
        let ttl = if r.decrement_ttl {
            ttl_decrement()
        } else {
            CsumDelta::new()
        };
        let ip_check_offset = p.l3_offset + IPV4_CHECK_OFFSET;
        let old_ip_check = read16(frame, ip_check_offset);
        let offset = p.l3_offset
            + match r.endpoint {
                Endpoint::Destination => IPV4_DST_OFFSET,
                Endpoint::Source => IPV4_SRC_OFFSET,
            };
        frame[offset..offset + 4].copy_from_slice(&last4(&r.addr));
        if r.decrement_ttl {
            frame[p.l3_offset + IPV4_TTL_OFFSET] = p.ttl - 1;
        }
        write16(
            frame,
            ip_check_offset,
            pseudo.merge(ttl).apply(old_ip_check),
        );
        pseudo
    };
    frame[port_offset..port_offset + 2].copy_from_slice(&r.port_be.to_ne_bytes());
    let l4 = pseudo.merge(port);
    let new_l4_check = if p.proto == IPPROTO_UDP {
        l4.apply_udp(old_l4_check)
    } else {
        l4.apply(old_l4_check)
    };
    write16(frame, l4_check_offset, new_l4_check);
}

/// The checksums etherparse computes for a frame: the IPv4 header's (if IPv4) and the
/// TCP/UDP one, with a computed UDP 0 sent as 0xffff as RFC 768 wants.
struct Checksums {
    ipv4_header: Option<u16>,
    l4: u16,
}

fn etherparse_checksums(frame: &[u8]) -> Option<Checksums> {
    let s = sliced(frame)?;
    let (src, dst, ipv4_header): (Vec<u8>, Vec<u8>, _) = match s.net.as_ref()? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header().to_header();
            (
                h.source.to_vec(),
                h.destination.to_vec(),
                Some(h.calc_header_checksum()),
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            (h.source().to_vec(), h.destination().to_vec(), None)
        }
        _ => return None,
    };
    let l4 = match (s.transport.as_ref()?, <[u8; 4]>::try_from(&src[..])) {
        (TransportSlice::Tcp(t), Ok(src4)) => {
            t.to_header()
                .calc_checksum_ipv4_raw(src4, dst[..].try_into().ok()?, t.payload())
        }
        (TransportSlice::Udp(u), Ok(src4)) => {
            u.to_header()
                .calc_checksum_ipv4_raw(src4, dst[..].try_into().ok()?, u.payload())
        }
        (TransportSlice::Tcp(t), Err(_)) => t.to_header().calc_checksum_ipv6_raw(
            src[..].try_into().ok()?,
            dst[..].try_into().ok()?,
            t.payload(),
        ),
        (TransportSlice::Udp(u), Err(_)) => u.to_header().calc_checksum_ipv6_raw(
            src[..].try_into().ok()?,
            dst[..].try_into().ok()?,
            u.payload(),
        ),
        _ => return None,
    }
    .ok()?;
    Some(Checksums { ipv4_header, l4 })
}

/// For every balanceable frame with correct checksums (the input's are corrected first), the
/// incremental updates of a destination or source rewrite, with or without a TTL decrement,
/// give the checksums etherparse recomputes over the rewritten frame; an IPv4 UDP checksum
/// of 0 ("none") stays 0. Only the rewritten fields and the checksums change.
pub fn check_rewrite(data: &[u8]) {
    rewrite_is_checked(data);
}

/// As [`check_rewrite`], saying whether `data` got as far as a rewrite (the corpus test
/// makes sure the seeds do).
pub fn rewrite_is_checked(data: &[u8]) -> bool {
    let Some((mut r, input)) = Rewrite::split(data) else {
        return false;
    };
    let Ok(p) = parse(input) else { return false };
    // The data path rewrites an IPv6 packet only to an IPv6 backend, never to an IPv4-mapped
    // address (which the parser refuses in an IPv6 header).
    if p.ipv6 && is_v4_mapped(&r.addr) {
        return false;
    }
    // Only what the parser target has already checked etherparse agrees on.
    if etherparse_view(input).is_none() {
        return false;
    }
    let Some(sums) = etherparse_checksums(input) else {
        return false;
    };
    // The data plane decrements only a TTL above 1 (it drops the rest).
    r.decrement_ttl &= p.ttl > 1;
    let mut frame = input.to_vec();
    let l4_check_offset = p.l4_check_offset();
    let udp_without_checksum =
        !p.ipv6 && p.proto == IPPROTO_UDP && read16(&frame, l4_check_offset) == 0;
    if !udp_without_checksum {
        write16(&mut frame, l4_check_offset, sums.l4);
    }
    if let Some(c) = sums.ipv4_header {
        write16(&mut frame, p.l3_offset + IPV4_CHECK_OFFSET, c);
    }
    let before = frame.clone();

    rewrite_like_xdp(&mut frame, &p, &r);

    let after = parse(frame.as_slice()).unwrap_or_else(|skip| {
        panic!("rewritten frame {} no longer parses: {skip:?}", hex(&frame))
    });
    let (addr, port) = match r.endpoint {
        Endpoint::Destination => (after.dst, after.dport_be),
        Endpoint::Source => (after.src, after.sport_be),
    };
    let want_addr = if p.ipv6 {
        r.addr
    } else {
        v4_mapped(last4(&r.addr))
    };
    assert_eq!((addr, port), (want_addr, r.port_be));
    assert_eq!(after.ttl, p.ttl - u8::from(r.decrement_ttl));

    let recomputed = etherparse_checksums(&frame)
        .unwrap_or_else(|| panic!("etherparse cannot read the rewritten {}", hex(&frame)));
    let context = || format!("{} rewritten to {}", hex(&before), hex(&frame));
    if let Some(c) = recomputed.ipv4_header {
        let got = read16(&frame, p.l3_offset + IPV4_CHECK_OFFSET);
        assert_eq!(got, c, "IPv4 header checksum of {}", context());
    }
    let got = read16(&frame, l4_check_offset);
    if udp_without_checksum {
        assert_eq!(got, 0, "a UDP checksum of 0 must stay 0: {}", context());
    } else {
        assert_eq!(got, recomputed.l4, "L4 checksum of {}", context());
    }
    let changed: Vec<usize> = (0..frame.len())
        .filter(|&i| frame[i] != before[i])
        .collect();
    let addr_at = p.l3_offset
        + match (p.ipv6, r.endpoint) {
            (true, Endpoint::Destination) => IPV6_DST_OFFSET,
            (true, Endpoint::Source) => IPV6_SRC_OFFSET,
            (false, Endpoint::Destination) => IPV4_DST_OFFSET,
            (false, Endpoint::Source) => IPV4_SRC_OFFSET,
        };
    let addr_len = if p.ipv6 { 16 } else { 4 };
    let port_at = p.l4_offset + if r.endpoint == Endpoint::Source { 0 } else { 2 };
    let ttl_at = p.l3_offset
        + if p.ipv6 {
            IPV6_HOP_LIMIT_OFFSET
        } else {
            IPV4_TTL_OFFSET
        };
    for i in changed {
        let allowed = (addr_at..addr_at + addr_len).contains(&i)
            || (port_at..port_at + 2).contains(&i)
            || (l4_check_offset..l4_check_offset + 2).contains(&i)
            || (!p.ipv6 && (p.l3_offset + IPV4_CHECK_OFFSET..p.l3_offset + 12).contains(&i))
            || (r.decrement_ttl && i == ttl_at);
        assert!(allowed, "byte {i} changed: {}", context());
    }
    true
}
