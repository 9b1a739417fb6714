//! Header parsing: Ethernet (at most one 802.1Q tag), IPv4 (options skipped by IHL), IPv6
//! (fixed header only), TCP and UDP.
//!
//! The parser is generic over [`PacketBytes`], so the same code runs on a byte slice in unit
//! tests and on the XDP context in the kernel (where every read is bounds-checked against
//! `data_end`, which is what the verifier needs to see). It only reads; the data plane rewrites
//! at the offsets it returns.

use crate::{
    Counter, IPPROTO_TCP, IPPROTO_UDP,
    addr::{is_v4_mapped_words, load_u32_words, load_u64_words, v4_mapped_words},
    icmp::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Offsets of fields the data plane rewrites.
pub const IPV4_TTL_OFFSET: usize = 8;
pub const IPV4_CHECK_OFFSET: usize = 10;
pub const IPV4_SRC_OFFSET: usize = 12;
pub const IPV4_DST_OFFSET: usize = 16;
pub const IPV6_HOP_LIMIT_OFFSET: usize = 7;
pub const IPV6_SRC_OFFSET: usize = 8;
pub const IPV6_DST_OFFSET: usize = 24;
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;

/// Bits of `Parsed::tcp_flags` (the TCP header's flags byte).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
const IPV6_NEXT_FRAGMENT: u8 = 44;

/// Read access to a packet's bytes.
pub trait PacketBytes {
    /// Bytes from the start of the Ethernet header to the end of the frame.
    fn len(&self) -> usize;

    /// A copy of the `N` bytes at `offset`, or `None` where they run past the end.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PacketBytes for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// A TCP or UDP packet over IPv4 or IPv6, as far as load balancing cares. 8-aligned with
/// the addresses first, like the map keys built from it (see `abi`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Source and destination, IPv4 mapped.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub ipv6: bool,
    pub proto: u8,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TTL or hop limit.
    pub ttl: u8,
    /// The TCP flags byte (`TCP_SYN`, ...); 0 for UDP.
    pub tcp_flags: u8,
}

impl Parsed {
    /// A placeholder to parse into.
    pub const EMPTY: Self = Self {
        src: [0; 16],
        dst: [0; 16],
        l3_offset: 0,
        l4_offset: 0,
        ipv6: false,
        proto: 0,
        sport_be: 0,
        dport_be: 0,
        ttl: 0,
        tcp_flags: 0,
    };

    /// The source address as four native words (`addr::load_u32_words`); an IPv4 source is
    /// the last.
    #[inline(always)]
    #[must_use]
    pub fn src_words(&self) -> [u32; 4] {
        // SAFETY: `Parsed` is 8-aligned with `src` at offset 0 (asserted below).
        unsafe { load_u32_words(&self.src) }
    }

    /// As `src_words`, for the destination (offset 16).
    #[inline(always)]
    #[must_use]
    pub fn dst_words(&self) -> [u32; 4] {
        // SAFETY: as in `src_words`.
        unsafe { load_u32_words(&self.dst) }
    }

    /// The destination as two native 8-byte words.
    #[inline(always)]
    #[must_use]
    pub fn dst_u64_words(&self) -> [u64; 2] {
        // SAFETY: as in `src_words`; offset 16 is 8-aligned too.
        unsafe { load_u64_words(&self.dst) }
    }

    /// Offset of the L4 checksum field.
    #[must_use]
    pub const fn l4_check_offset(&self) -> usize {
        self.l4_offset
            + if self.proto == IPPROTO_TCP {
                TCP_CHECK_OFFSET
            } else {
                UDP_CHECK_OFFSET
            }
    }
}

/// Why a packet is not load-balanced; each maps to the global counter it is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, a second VLAN tag, ...).
    NotIp,
    /// IP, but neither TCP nor UDP.
    NotTcpUdp,
    /// ICMP over IPv4 or ICMPv6 over IPv6: maybe an error about a balanced flow, which
    /// `icmp::parse_icmp_error` reads further.
    Icmp,
    /// An IPv4 fragment or an IPv6 fragment header: ports absent or incomplete.
    Fragment,
    /// IPv6 with an extension header before the transport header.
    Ipv6ExtHeader,
    /// Truncated or self-contradictory headers.
    Malformed,
}

impl Skip {
    #[must_use]
    pub const fn counter(self) -> Counter {
        match self {
            // ICMP counts here unless the data plane translates it.
            Self::NotIp | Self::NotTcpUdp | Self::Icmp => Counter::NotTcpUdp,
            Self::Fragment => Counter::Fragment,
            Self::Ipv6ExtHeader => Counter::Ipv6ExtHeader,
            Self::Malformed => Counter::Malformed,
        }
    }
}

#[inline(always)]
const fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses Ethernet, IP and the TCP/UDP ports.
///
/// # Errors
/// [`Skip`] says why the packet is not one xlb balances.
#[inline(always)]
pub fn parse<P: PacketBytes + ?Sized>(pkt: &P) -> Result<Parsed, Skip> {
    let mut out = Parsed::EMPTY;
    parse_into(pkt, &mut out)?;
    Ok(out)
}

/// As [`parse`], into `out` (garbage after an error). The data plane's form.
#[inline(always)]
pub fn parse_into<P: PacketBytes + ?Sized>(pkt: &P, out: &mut Parsed) -> Result<(), Skip> {
    let h = parse_headers(pkt)?;
    // IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2; the kernel drops a
    // packet from one). Here one would pass for an IPv4 VIP, backend or flow, all keyed by
    // the same 16 bytes, and have an IPv4 rewrite applied to an IPv6 header.
    if h.ipv6 && (is_v4_mapped_words(h.src) || is_v4_mapped_words(h.dst)) {
        return Err(Skip::Malformed);
    }
    // Each address goes in as two 8-byte stores. Built byte by byte (what a copy of
    // `[u8; 16]` values compiles to), the forward path's 8-byte loads of it would each wait
    // for eight byte stores to drain, a failed store-to-load forward: 7 ns a packet, profiled.
    // SAFETY: `Parsed` is 8-aligned with its addresses at offsets 0 and 16 (asserted below),
    // so each is an 8-aligned, 16-byte place for a `[u64; 2]`.
    unsafe {
        (&raw mut out.src).cast::<[u64; 2]>().write(h.src);
        (&raw mut out.dst).cast::<[u64; 2]>().write(h.dst);
    }
    out.l3_offset = h.l3_offset;
    out.l4_offset = h.l4_offset;
    out.ipv6 = h.ipv6;
    out.proto = h.proto;
    out.sport_be = h.sport_be;
    out.dport_be = h.dport_be;
    out.ttl = h.ttl;
    out.tcp_flags = h.tcp_flags;
    Ok(())
}

const _: () =
    assert!(core::mem::offset_of!(Parsed, src) == 0 && core::mem::offset_of!(Parsed, dst) == 16);

/// What `parse_headers` found: a `Parsed` with its addresses as native words (see
/// `parse_into`).
struct Headers {
    src: [u64; 2],
    dst: [u64; 2],
    l3_offset: usize,
    l4_offset: usize,
    ipv6: bool,
    proto: u8,
    sport_be: u16,
    dport_be: u16,
    ttl: u8,
    tcp_flags: u8,
}

#[inline(always)]
fn parse_headers<P: PacketBytes + ?Sized>(pkt: &P) -> Result<Headers, Skip> {
    // Fields are read in 2/4/8/16-byte pieces: the XDP implementation turns each into one
    // load, where a whole-header copy would be assembled byte by byte.
    let mut ethertype = be16(pkt.read(ETH_HLEN - 2).ok_or(Skip::Malformed)?);
    let mut l3_offset = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(pkt.read(ETH_HLEN + 2).ok_or(Skip::Malformed)?);
        l3_offset += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, l3_offset),
        ETH_P_IPV6 => parse_ipv6(pkt, l3_offset),
        _ => Err(Skip::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(pkt: &P, l3_offset: usize) -> Result<Headers, Skip> {
    // The farthest piece first: once it is in bounds, so are the others.
    let dst: [u8; 4] = pkt
        .read(l3_offset + IPV4_DST_OFFSET)
        .ok_or(Skip::Malformed)?;
    let src: [u8; 4] = pkt
        .read(l3_offset + IPV4_SRC_OFFSET)
        .ok_or(Skip::Malformed)?;
    let w0: [u8; 4] = pkt.read(l3_offset).ok_or(Skip::Malformed)?;
    let w1: [u8; 4] = pkt.read(l3_offset + 4).ok_or(Skip::Malformed)?;
    let w2: [u8; 4] = pkt
        .read(l3_offset + IPV4_TTL_OFFSET)
        .ok_or(Skip::Malformed)?;
    if w0[0] >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    let header_len = usize::from(w0[0] & 0x0f) * 4;
    let total_len = usize::from(be16([w0[2], w0[3]]));
    if header_len < IPV4_MIN_HLEN
        || total_len < header_len
        || total_len > pkt.len().saturating_sub(l3_offset)
    {
        return Err(Skip::Malformed);
    }
    let frag = be16([w1[2], w1[3]]);
    if frag & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET_MASK) != 0 {
        return Err(Skip::Fragment);
    }
    let proto = w2[1];
    if proto == IPPROTO_ICMP {
        return Err(Skip::Icmp);
    }
    let l4_offset = l3_offset + header_len;
    let (sport_be, dport_be, tcp_flags) =
        parse_ports(pkt, proto, l4_offset, total_len - header_len)?;
    Ok(Headers {
        src: v4_mapped_words(src),
        dst: v4_mapped_words(dst),
        l3_offset,
        l4_offset,
        ipv6: false,
        proto,
        sport_be,
        dport_be,
        ttl: w2[0],
        tcp_flags,
    })
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(pkt: &P, l3_offset: usize) -> Result<Headers, Skip> {
    // Read in pieces: a 40-byte copy would cost the eBPF build that much stack.
    let fixed: [u8; 8] = pkt.read(l3_offset).ok_or(Skip::Malformed)?;
    // The addresses as four 8-byte words: read as 16-byte arrays, the eBPF build split
    // them into 32 byte loads and spilled them, 256 bytes of the parser's stack frame.
    let word = |offset: usize| -> Result<u64, Skip> {
        pkt.read(l3_offset + offset)
            .map(u64::from_ne_bytes)
            .ok_or(Skip::Malformed)
    };
    // The farthest piece first, as in `parse_ipv4`.
    let dst_tail = word(IPV6_DST_OFFSET + 8)?;
    let dst = [word(IPV6_DST_OFFSET)?, dst_tail];
    let src = [word(IPV6_SRC_OFFSET)?, word(IPV6_SRC_OFFSET + 8)?];
    if fixed[0] >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let payload_len = usize::from(be16([fixed[4], fixed[5]]));
    if payload_len > pkt.len().saturating_sub(l3_offset + IPV6_HLEN) {
        return Err(Skip::Malformed);
    }
    let proto = fixed[6];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(match proto {
            IPV6_NEXT_FRAGMENT => Skip::Fragment,
            IPPROTO_ICMPV6 => Skip::Icmp,
            // Hop-by-hop, routing, destination options, AH, ESP, mobility, HIP, shim6.
            0 | 43 | 60 | 51 | 50 | 135 | 139 | 140 => Skip::Ipv6ExtHeader,
            _ => Skip::NotTcpUdp,
        });
    }
    let l4_offset = l3_offset + IPV6_HLEN;
    let (sport_be, dport_be, tcp_flags) = parse_ports(pkt, proto, l4_offset, payload_len)?;
    Ok(Headers {
        src,
        dst,
        l3_offset,
        l4_offset,
        ipv6: true,
        proto,
        sport_be,
        dport_be,
        ttl: fixed[IPV6_HOP_LIMIT_OFFSET],
        tcp_flags,
    })
}

/// Reads the ports (and TCP's flags), checking the transport header fits in the IP payload
/// (`l4_len` bytes).
#[inline(always)]
fn parse_ports<P: PacketBytes + ?Sized>(
    pkt: &P,
    proto: u8,
    l4_offset: usize,
    l4_len: usize,
) -> Result<(u16, u16, u8), Skip> {
    match proto {
        IPPROTO_TCP => {
            // Nearest piece first: at a variable offset the verifier only credits a bounds
            // check to the access it guards, and the compiler drops checks implied by
            // earlier ones. Bytes 12..20 (data offset to urgent pointer) prove the minimum
            // header is present.
            let ports: [u8; 4] = pkt.read(l4_offset).ok_or(Skip::Malformed)?;
            let tail: [u8; 8] = pkt.read(l4_offset + 12).ok_or(Skip::Malformed)?;
            let header_len = usize::from(tail[0] >> 4) * 4;
            if header_len < TCP_MIN_HLEN || header_len > l4_len {
                return Err(Skip::Malformed);
            }
            Ok((
                u16::from_ne_bytes([ports[0], ports[1]]),
                u16::from_ne_bytes([ports[2], ports[3]]),
                tail[1],
            ))
        }
        IPPROTO_UDP => {
            let udp: [u8; UDP_HLEN] = pkt.read(l4_offset).ok_or(Skip::Malformed)?;
            let udp_len = usize::from(be16([udp[4], udp[5]]));
            if udp_len < UDP_HLEN || udp_len > l4_len {
                return Err(Skip::Malformed);
            }
            Ok((
                u16::from_ne_bytes([udp[0], udp[1]]),
                u16::from_ne_bytes([udp[2], udp[3]]),
                0,
            ))
        }
        _ => Err(Skip::NotTcpUdp),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::addr::v4_mapped;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, options: usize, l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + options;
        let mut ip = vec![0u8; hlen];
        ip[0] = 0x40 | (hlen / 4) as u8;
        ip[2..4].copy_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[192, 0, 2, 10]);
        ip.extend_from_slice(l4);
        ip
    }

    fn ipv6(next: u8, l4: &[u8]) -> Vec<u8> {
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        ip[6] = next;
        ip[7] = 64;
        ip[8..24].copy_from_slice(
            &"2001:db8::1"
                .parse::<core::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ip[24..40].copy_from_slice(
            &"2001:db8::10"
                .parse::<core::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ip.extend_from_slice(l4);
        ip
    }

    fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        tcp_with_flags(sport, dport, TCP_ACK)
    }

    fn tcp_with_flags(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let mut u = vec![0u8; 8 + payload];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        u
    }

    fn frame(ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = eth(ethertype);
        f.extend_from_slice(l3);
        f
    }

    #[test]
    fn ipv4_tcp() {
        let f = frame(ETH_P_IP, &ipv4(IPPROTO_TCP, 0, &tcp(40000, 80)));
        let p = parse(f.as_slice()).unwrap();
        assert_eq!(
            (p.l3_offset, p.l4_offset, p.ipv6, p.proto),
            (14, 34, false, 6)
        );
        assert_eq!(u16::from_be(p.sport_be), 40000);
        assert_eq!(u16::from_be(p.dport_be), 80);
        assert_eq!(p.dst, v4_mapped([192, 0, 2, 10]));
        assert_eq!(p.l4_check_offset(), 34 + 16);
    }

    #[test]
    fn tcp_flags_are_read_and_udp_has_none() {
        for flags in [
            TCP_SYN,
            TCP_SYN | TCP_ACK,
            TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            0xff,
        ] {
            let v4 = frame(
                ETH_P_IP,
                &ipv4(IPPROTO_TCP, 8, &tcp_with_flags(1, 80, flags)),
            );
            assert_eq!(parse(v4.as_slice()).unwrap().tcp_flags, flags, "{flags:#x}");
            let v6 = frame(
                ETH_P_IPV6,
                &ipv6(IPPROTO_TCP, &tcp_with_flags(1, 80, flags)),
            );
            assert_eq!(parse(v6.as_slice()).unwrap().tcp_flags, flags, "{flags:#x}");
        }
        let udp = frame(ETH_P_IP, &ipv4(IPPROTO_UDP, 0, &udp(1, 53, 4)));
        assert_eq!(parse(udp.as_slice()).unwrap().tcp_flags, 0);
    }

    #[test]
    fn ipv4_options_are_skipped_by_ihl() {
        let f = frame(ETH_P_IP, &ipv4(IPPROTO_UDP, 12, &udp(53, 5353, 4)));
        let p = parse(f.as_slice()).unwrap();
        assert_eq!(p.l4_offset, 14 + 32);
        assert_eq!(u16::from_be(p.dport_be), 5353);
        assert_eq!(p.l4_check_offset(), 14 + 32 + 6);
    }

    #[test]
    fn ipv6_udp_and_vlan() {
        let mut f = eth(ETH_P_8021Q);
        f.extend_from_slice(&[0, 42, 0x86, 0xdd]);
        f.extend_from_slice(&ipv6(IPPROTO_UDP, &udp(1000, 443, 0)));
        let p = parse(f.as_slice()).unwrap();
        assert_eq!((p.l3_offset, p.l4_offset, p.ipv6), (18, 58, true));
        assert_eq!(u16::from_be(p.sport_be), 1000);
    }

    #[test]
    fn skips_with_reasons() {
        let cases: Vec<(&str, Vec<u8>, Skip)> = vec![
            ("arp", frame(0x0806, &[0; 28]), Skip::NotIp),
            (
                "icmp",
                frame(ETH_P_IP, &ipv4(1, 0, &[8, 0, 0, 0, 0, 0, 0, 0])),
                Skip::Icmp,
            ),
            (
                "icmpv6",
                frame(ETH_P_IPV6, &ipv6(58, &[128, 0, 0, 0, 0, 0, 0, 0])),
                Skip::Icmp,
            ),
            (
                "icmpv6's number over ipv4",
                frame(ETH_P_IP, &ipv4(58, 0, &[128, 0, 0, 0, 0, 0, 0, 0])),
                Skip::NotTcpUdp,
            ),
            (
                "icmp's number over ipv6",
                frame(ETH_P_IPV6, &ipv6(1, &[8, 0, 0, 0, 0, 0, 0, 0])),
                Skip::NotTcpUdp,
            ),
            (
                "v6 hop-by-hop",
                frame(ETH_P_IPV6, &ipv6(0, &[0; 16])),
                Skip::Ipv6ExtHeader,
            ),
            (
                "v6 fragment",
                frame(ETH_P_IPV6, &ipv6(44, &[0; 16])),
                Skip::Fragment,
            ),
            (
                "qinq",
                {
                    let mut f = eth(ETH_P_8021AD);
                    f.extend_from_slice(&[0, 1, 0x81, 0x00, 0, 2, 0x08, 0x00]);
                    f.extend_from_slice(&ipv4(6, 0, &tcp(1, 2)));
                    f
                },
                Skip::NotIp,
            ),
            ("short ethernet", vec![0; 13], Skip::Malformed),
            (
                "v6 from an ipv4-mapped address",
                {
                    let mut ip = ipv6(IPPROTO_TCP, &tcp(1, 80));
                    ip[8..24].copy_from_slice(&v4_mapped([10, 0, 0, 1]));
                    frame(ETH_P_IPV6, &ip)
                },
                Skip::Malformed,
            ),
            (
                "v6 to an ipv4-mapped address",
                {
                    let mut ip = ipv6(IPPROTO_UDP, &udp(1, 53, 0));
                    ip[24..40].copy_from_slice(&v4_mapped([192, 0, 2, 10]));
                    frame(ETH_P_IPV6, &ip)
                },
                Skip::Malformed,
            ),
            (
                "truncated tcp",
                {
                    let mut f = frame(ETH_P_IP, &ipv4(6, 0, &tcp(1, 2)));
                    f.truncate(f.len() - 1);
                    f
                },
                Skip::Malformed,
            ),
        ];
        for (name, f, want) in cases {
            assert_eq!(parse(f.as_slice()), Err(want), "{name}");
        }
    }

    #[test]
    fn fragments_are_never_parsed_for_ports() {
        for frag in [0x2000u16, 0x0001, 0x2010] {
            let mut ip = ipv4(IPPROTO_UDP, 0, &udp(1, 2, 8));
            ip[6..8].copy_from_slice(&frag.to_be_bytes());
            assert_eq!(parse(frame(ETH_P_IP, &ip).as_slice()), Err(Skip::Fragment));
        }
        // Don't-fragment alone is not a fragment.
        let mut ip = ipv4(IPPROTO_UDP, 0, &udp(1, 2, 8));
        ip[6] = 0x40;
        assert!(parse(frame(ETH_P_IP, &ip).as_slice()).is_ok());
    }

    #[test]
    fn inconsistent_lengths_are_malformed() {
        let good = ipv4(IPPROTO_TCP, 0, &tcp(1, 2));
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x44;
        let mut bad_version = good.clone();
        bad_version[0] = 0x55;
        let mut total_too_long = good.clone();
        total_too_long[2..4].copy_from_slice(&100u16.to_be_bytes());
        let mut total_shorter_than_ihl = good.clone();
        total_shorter_than_ihl[2..4].copy_from_slice(&19u16.to_be_bytes());
        let mut tcp_doff_small = good.clone();
        tcp_doff_small[20 + 12] = 4 << 4;
        let mut tcp_doff_past_end = good.clone();
        tcp_doff_past_end[20 + 12] = 15 << 4;
        let mut udp_len_small = ipv4(IPPROTO_UDP, 0, &udp(1, 2, 4));
        udp_len_small[20 + 4..20 + 6].copy_from_slice(&7u16.to_be_bytes());
        let mut ihl_past_end = ipv4(IPPROTO_UDP, 0, &[]);
        ihl_past_end[0] = 0x4f;
        for (name, ip) in [
            ("ihl < 5", bad_ihl),
            ("version", bad_version),
            ("total length past frame", total_too_long),
            ("total length < ihl", total_shorter_than_ihl),
            ("tcp data offset < 5", tcp_doff_small),
            ("tcp data offset past payload", tcp_doff_past_end),
            ("udp length < 8", udp_len_small),
            ("ihl past end", ihl_past_end),
        ] {
            assert_eq!(
                parse(frame(ETH_P_IP, &ip).as_slice()),
                Err(Skip::Malformed),
                "{name}"
            );
        }
        let mut v6_payload_too_long = ipv6(IPPROTO_TCP, &tcp(1, 2));
        v6_payload_too_long[4..6].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(
            parse(frame(ETH_P_IPV6, &v6_payload_too_long).as_slice()),
            Err(Skip::Malformed)
        );
    }

    #[test]
    fn ethernet_padding_is_allowed() {
        let mut f = frame(ETH_P_IP, &ipv4(IPPROTO_UDP, 0, &udp(1, 2, 0)));
        f.resize(60, 0);
        assert!(parse(f.as_slice()).is_ok());
    }

    proptest! {
        /// Any truncation of a valid frame parses to the same result or is rejected, and never
        /// reads past the end (the slice impl would panic).
        #[test]
        fn truncations_never_misparse(cut in 0usize..74, v6 in any::<bool>()) {
            let f = if v6 {
                frame(ETH_P_IPV6, &ipv6(IPPROTO_TCP, &tcp(1, 2)))
            } else {
                frame(ETH_P_IP, &ipv4(IPPROTO_TCP, 0, &tcp(1, 2)))
            };
            let cut = cut.min(f.len());
            let r = parse(&f[..cut]);
            if cut < f.len() {
                prop_assert_eq!(r, Err(Skip::Malformed));
            } else {
                prop_assert!(r.is_ok());
            }
        }

        /// Random bytes never panic the parser, and anything accepted is self-consistent.
        #[test]
        fn random_frames_are_safe(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(p) = parse(bytes.as_slice()) {
                prop_assert!(p.l4_offset + UDP_HLEN <= bytes.len());
                prop_assert!(p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP);
            }
        }
    }
}
