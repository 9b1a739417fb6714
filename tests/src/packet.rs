//! A fluent packet builder over `etherparse`, and checksum verification with it.
//!
//! Fixtures are described field by field (`Packet::tcp(client, vip).ttl(1).vlan(42)`) and
//! serialised by etherparse, which computes every length and checksum from scratch. The
//! expected output of a rewrite is the same description with the rewritten fields changed, so
//! the data plane's incremental checksum updates are judged against a full recomputation by an
//! independent library, never against `lb-common`'s own checksum code.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header, Ipv4HeaderSlice,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, NetHeaders, NetSlice, PacketBuilder,
    PacketHeaders, PayloadSlice, SingleVlanHeader, SlicedPacket, TcpHeader, TransportHeader,
    TransportSlice, UdpHeader, VlanId,
};

/// The client-side router's MAC: source of every fixture frame.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0c];
/// The load balancer's MAC: destination of every fixture frame.
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x1b];
/// Payload of fixtures that do not choose one (odd length on purpose: the checksum of an odd
/// payload pads a zero byte, which an incremental update must not disturb).
pub const DEFAULT_PAYLOAD: &[u8] = b"xlb golden payload!";

#[derive(Clone, Debug)]
enum Net {
    V4(Ipv4Header),
    V6(Ipv6Header, Option<V6Ext>),
}

#[derive(Clone, Copy, Debug)]
enum V6Ext {
    HopByHop,
    Fragment { offset: u16, more: bool },
}

#[derive(Clone, Debug)]
enum Transport {
    Tcp(TcpHeader),
    Udp {
        source: u16,
        destination: u16,
        zero_checksum: bool,
    },
}

/// A fixture that serialises to one whole Ethernet frame, for the harness's cases.
pub trait Frame {
    fn frame(&self) -> Vec<u8>;
}

impl Frame for Packet {
    fn frame(&self) -> Vec<u8> {
        self.bytes()
    }
}

impl Frame for IcmpError {
    fn frame(&self) -> Vec<u8> {
        self.bytes()
    }
}

/// One Ethernet frame carrying TCP or UDP over IPv4 or IPv6, described by its fields.
#[derive(Clone, Debug)]
pub struct Packet {
    eth: Ethernet2Header,
    vlan: Option<u16>,
    net: Net,
    transport: Transport,
    payload: Vec<u8>,
}

fn net_for(src: IpAddr, dst: IpAddr, protocol: IpNumber) -> Net {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(0, 64, protocol, s.octets(), d.octets())
                .expect("an empty payload fits");
            h.identification = 0x1c46;
            Net::V4(h)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => Net::V6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: etherparse::Ipv6FlowLabel::try_new(0x1_2345).expect("20 bits"),
                payload_length: 0,
                next_header: protocol,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            },
            None,
        ),
        _ => panic!("fixture mixes address families: {src} -> {dst}"),
    }
}

impl Packet {
    /// A TCP segment (ACK|PSH) from `src` to `dst`, TTL/hop limit 64.
    #[must_use]
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        let mut tcp = TcpHeader::new(src.port(), dst.port(), 0x0102_0304, 64_240);
        tcp.ack = true;
        tcp.psh = true;
        tcp.acknowledgment_number = 0x0a0b_0c0d;
        Self::with_transport(src, dst, IpNumber::TCP, Transport::Tcp(tcp))
    }

    /// Whether this is a TCP segment.
    #[must_use]
    pub const fn is_tcp(&self) -> bool {
        matches!(self.transport, Transport::Tcp(_))
    }

    /// TCP only: a connection's first segment (SYN alone, no ACK).
    #[must_use]
    pub fn syn(self) -> Self {
        self.tcp_header(|t| {
            (t.syn, t.ack, t.psh, t.acknowledgment_number) = (true, false, false, 0);
        })
    }

    /// TCP only: the ACK flag set too (with `syn`, a SYN-ACK).
    #[must_use]
    pub fn tcp_ack_flag(self) -> Self {
        self.tcp_header(|t| (t.ack, t.acknowledgment_number) = (true, 0x0a0b_0c0d))
    }

    /// TCP only: FIN|ACK, the sender is done sending.
    #[must_use]
    pub fn fin(self) -> Self {
        self.tcp_header(|t| (t.fin, t.psh) = (true, false))
    }

    /// TCP only: RST alone (no ACK), the connection is aborted.
    #[must_use]
    pub fn rst(self) -> Self {
        self.tcp_header(|t| (t.rst, t.ack, t.psh) = (true, false, false))
    }

    fn tcp_header(mut self, change: impl FnOnce(&mut TcpHeader)) -> Self {
        let Transport::Tcp(t) = &mut self.transport else {
            panic!("TCP flags on a UDP fixture")
        };
        change(t);
        self
    }

    /// A UDP datagram from `src` to `dst` with its checksum computed, TTL/hop limit 64.
    #[must_use]
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        let udp = Transport::Udp {
            source: src.port(),
            destination: dst.port(),
            zero_checksum: false,
        };
        Self::with_transport(src, dst, IpNumber::UDP, udp)
    }

    fn with_transport(src: SocketAddr, dst: SocketAddr, proto: IpNumber, t: Transport) -> Self {
        let net = net_for(src.ip(), dst.ip(), proto);
        Self {
            eth: Ethernet2Header {
                source: CLIENT_MAC,
                destination: LB_MAC,
                ether_type: EtherType::IPV4,
            },
            vlan: None,
            net,
            transport: t,
            payload: DEFAULT_PAYLOAD.to_vec(),
        }
    }

    #[must_use]
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// TTL (IPv4) or hop limit (IPv6).
    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        match &mut self.net {
            Net::V4(h) => h.time_to_live = ttl,
            Net::V6(h, _) => h.hop_limit = ttl,
        }
        self
    }

    #[must_use]
    pub fn get_ttl(&self) -> u8 {
        match &self.net {
            Net::V4(h) => h.time_to_live,
            Net::V6(h, _) => h.hop_limit,
        }
    }

    /// What a router does to the frame it forwards: TTL/hop limit one lower.
    #[must_use]
    pub fn decrement_ttl(self) -> Self {
        let ttl = self.get_ttl();
        self.ttl(ttl.checked_sub(1).expect("TTL 0 cannot be forwarded"))
    }

    #[must_use]
    pub fn macs(mut self, source: [u8; 6], destination: [u8; 6]) -> Self {
        self.eth.source = source;
        self.eth.destination = destination;
        self
    }

    /// One 802.1Q tag with this VLAN id.
    #[must_use]
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// IPv4 options (a multiple of 4 bytes; IHL becomes 5 + len/4).
    #[must_use]
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        let Net::V4(h) = &mut self.net else {
            panic!("IPv4 options on an IPv6 fixture")
        };
        h.options = options
            .try_into()
            .expect("options: multiple of 4, at most 40 bytes");
        self
    }

    /// IPv4: sets More Fragments and the fragment offset (in 8-byte units). IPv6: adds a
    /// fragment extension header with them.
    #[must_use]
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        match &mut self.net {
            Net::V4(h) => {
                h.dont_fragment = false;
                h.more_fragments = more;
                h.fragment_offset = IpFragOffset::try_new(offset).expect("13-bit offset");
            }
            Net::V6(_, ext) => *ext = Some(V6Ext::Fragment { offset, more }),
        }
        self
    }

    /// IPv6 only: a hop-by-hop options header (one PadN option) before the transport header.
    #[must_use]
    pub fn hop_by_hop(mut self) -> Self {
        let Net::V6(_, ext) = &mut self.net else {
            panic!("hop-by-hop header on an IPv4 fixture")
        };
        *ext = Some(V6Ext::HopByHop);
        self
    }

    /// UDP only: sends checksum 0 ("no checksum", legal over IPv4 only).
    #[must_use]
    pub fn udp_zero_checksum(mut self) -> Self {
        let Transport::Udp { zero_checksum, .. } = &mut self.transport else {
            panic!("zero UDP checksum on a TCP fixture")
        };
        *zero_checksum = true;
        self
    }

    /// Replaces the source address and port (same family).
    #[must_use]
    pub fn src(mut self, to: SocketAddr) -> Self {
        self.set_endpoint(to, true);
        self
    }

    /// Replaces the destination address and port (same family).
    #[must_use]
    pub fn dst(mut self, to: SocketAddr) -> Self {
        self.set_endpoint(to, false);
        self
    }

    fn set_endpoint(&mut self, to: SocketAddr, source: bool) {
        match (&mut self.net, to.ip()) {
            (Net::V4(h), IpAddr::V4(a)) if source => h.source = a.octets(),
            (Net::V4(h), IpAddr::V4(a)) => h.destination = a.octets(),
            (Net::V6(h, _), IpAddr::V6(a)) if source => h.source = a.octets(),
            (Net::V6(h, _), IpAddr::V6(a)) => h.destination = a.octets(),
            _ => panic!("rewriting a fixture to another address family ({to})"),
        }
        match &mut self.transport {
            Transport::Tcp(t) if source => t.source_port = to.port(),
            Transport::Tcp(t) => t.destination_port = to.port(),
            Transport::Udp { source: p, .. } if source => *p = to.port(),
            Transport::Udp { destination: p, .. } => *p = to.port(),
        }
    }

    /// Offset of the IP header in the frame.
    #[must_use]
    pub fn l3_offset(&self) -> usize {
        Ethernet2Header::LEN
            + if self.vlan.is_some() {
                SingleVlanHeader::LEN
            } else {
                0
            }
    }

    /// Serialises the frame; etherparse fills in every length and checksum.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        let transport = self.transport_bytes();
        let mut frame = Vec::with_capacity(128 + transport.len());
        let ip_type = match self.net {
            Net::V4(_) => EtherType::IPV4,
            Net::V6(..) => EtherType::IPV6,
        };
        let mut eth = self.eth.clone();
        if let Some(id) = self.vlan {
            eth.ether_type = EtherType::VLAN_TAGGED_FRAME;
            eth.write(&mut frame).expect("Vec write");
            SingleVlanHeader {
                vlan_id: VlanId::try_new(id).expect("12-bit VLAN id"),
                ether_type: ip_type,
                ..Default::default()
            }
            .write(&mut frame)
            .expect("Vec write");
        } else {
            eth.ether_type = ip_type;
            eth.write(&mut frame).expect("Vec write");
        }
        match &self.net {
            Net::V4(h) => {
                let mut h = h.clone();
                h.set_payload_len(transport.len())
                    .expect("fits an IPv4 packet");
                // `write` computes the header checksum.
                h.write(&mut frame).expect("Vec write");
            }
            Net::V6(h, ext) => {
                let mut h = h.clone();
                let ext_bytes = ext.map(|e| self.v6_ext_bytes(e)).unwrap_or_default();
                if let Some(e) = ext {
                    h.next_header = match e {
                        V6Ext::HopByHop => IpNumber::IPV6_HEADER_HOP_BY_HOP,
                        V6Ext::Fragment { .. } => IpNumber::IPV6_FRAGMENTATION_HEADER,
                    };
                }
                h.set_payload_length(ext_bytes.len() + transport.len())
                    .expect("fits an IPv6 packet");
                h.write(&mut frame).expect("Vec write");
                frame.extend_from_slice(&ext_bytes);
            }
        }
        frame.extend_from_slice(&transport);
        frame
    }

    fn v6_ext_bytes(&self, ext: V6Ext) -> Vec<u8> {
        let next = self.protocol();
        match ext {
            V6Ext::HopByHop => Ipv6RawExtHeader::new_raw(next, &[1, 4, 0, 0, 0, 0])
                .expect("6-byte payload")
                .to_bytes()
                .to_vec(),
            V6Ext::Fragment { offset, more } => Ipv6FragmentHeader::new(
                next,
                IpFragOffset::try_new(offset).expect("13-bit offset"),
                more,
                0xfeed,
            )
            .to_bytes()
            .to_vec(),
        }
    }

    fn protocol(&self) -> IpNumber {
        match self.transport {
            Transport::Tcp(_) => IpNumber::TCP,
            Transport::Udp { .. } => IpNumber::UDP,
        }
    }

    /// The transport header with its checksum (over the current addresses) and the payload.
    fn transport_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.transport {
            Transport::Tcp(t) => {
                let mut t = t.clone();
                t.checksum = match &self.net {
                    Net::V4(ip) => t.calc_checksum_ipv4(ip, &self.payload),
                    Net::V6(ip, _) => t.calc_checksum_ipv6(ip, &self.payload),
                }
                .expect("payload fits");
                t.write(&mut out).expect("Vec write");
            }
            Transport::Udp {
                source,
                destination,
                zero_checksum,
            } => {
                let mut u = match &self.net {
                    Net::V4(ip) => {
                        UdpHeader::with_ipv4_checksum(*source, *destination, ip, &self.payload)
                    }
                    Net::V6(ip, _) => {
                        UdpHeader::with_ipv6_checksum(*source, *destination, ip, &self.payload)
                    }
                }
                .expect("payload fits");
                if *zero_checksum {
                    u.checksum = 0;
                }
                u.write(&mut out).expect("Vec write");
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }

    /// The TCP/UDP checksum etherparse computes for this packet as it stands.
    #[must_use]
    pub fn transport_checksum(&self) -> u16 {
        let bytes = self.transport_bytes();
        let at = match self.transport {
            Transport::Tcp(_) => 16,
            Transport::Udp { .. } => 6,
        };
        u16::from_be_bytes([bytes[at], bytes[at + 1]])
    }
}

/// Parses `frame` with etherparse and checks the IPv4 header checksum and the TCP/UDP
/// checksum against etherparse's own computation. Returns the transport checksum found.
///
/// A UDP checksum of 0 is accepted over IPv4 only ("no checksum", RFC 768).
///
/// An ICMP error (ICMPv4 or ICMPv6) is checked as [`verify_icmp_error_checksums`] does.
///
/// # Errors
/// The frame does not parse as Ethernet/IP/TCP-or-UDP (or ICMP), or a checksum is wrong.
pub fn verify_checksums(frame: &[u8]) -> Result<u16, String> {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .map_err(|e| format!("etherparse cannot parse {}: {e}", hex(frame)))?;
    let payload = match h.payload {
        PayloadSlice::Tcp(p) | PayloadSlice::Udp(p) => p,
        PayloadSlice::Icmpv4(_) | PayloadSlice::Icmpv6(_) => {
            return verify_icmp_error_checksums(frame);
        }
        ref other => return Err(format!("no TCP/UDP payload in {}: {other:?}", hex(frame))),
    };
    verify_transport(h.net.as_ref(), h.transport.as_ref(), payload)
}

fn check(what: &str, got: u16, want: u16) -> Result<u16, String> {
    if got == want {
        Ok(got)
    } else {
        Err(format!(
            "{what} checksum is {got:#06x}, etherparse computes {want:#06x}"
        ))
    }
}

/// The IPv4 header checksum (if IPv4) and the TCP/UDP checksum of one parsed packet.
fn verify_transport(
    net: Option<&NetHeaders>,
    transport: Option<&TransportHeader>,
    payload: &[u8],
) -> Result<u16, String> {
    match (net, transport) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(t)) => {
            check("IPv4 header", ip.header_checksum, ip.calc_header_checksum())?;
            match t {
                TransportHeader::Tcp(tcp) => {
                    let want = tcp
                        .calc_checksum_ipv4(ip, payload)
                        .map_err(|e| e.to_string())?;
                    check("TCP", tcp.checksum, want)
                }
                TransportHeader::Udp(udp) if udp.checksum == 0 => Ok(0),
                TransportHeader::Udp(udp) => {
                    let want = udp
                        .calc_checksum_ipv4(ip, payload)
                        .map_err(|e| e.to_string())?;
                    check("UDP", udp.checksum, want)
                }
                other => Err(format!("not TCP/UDP: {other:?}")),
            }
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(t)) => match t {
            TransportHeader::Tcp(tcp) => {
                let want = tcp
                    .calc_checksum_ipv6(ip, payload)
                    .map_err(|e| e.to_string())?;
                check("TCP", tcp.checksum, want)
            }
            TransportHeader::Udp(udp) => {
                let want = udp
                    .calc_checksum_ipv6(ip, payload)
                    .map_err(|e| e.to_string())?;
                check("UDP", udp.checksum, want)
            }
            other => Err(format!("not TCP/UDP: {other:?}")),
        },
        (net, t) => Err(format!("not IP with TCP/UDP: {net:?} {t:?}")),
    }
}

/// Checks every checksum of an ICMP error frame with etherparse: the error's IPv4 header
/// checksum, its ICMP checksum (ICMPv4: over the message; ICMPv6: with the pseudo-header of
/// the error's addresses), the quoted IPv4 header's checksum, and the quoted TCP/UDP
/// checksum when the quote holds the whole quoted packet (a cut quote's cannot be
/// recomputed). Returns the ICMP checksum found.
///
/// # Errors
/// The frame is no ICMP error with an IP quote, or a checksum is wrong.
pub fn verify_icmp_error_checksums(frame: &[u8]) -> Result<u16, String> {
    let sliced = SlicedPacket::from_ethernet(frame)
        .map_err(|e| format!("etherparse cannot slice {}: {e}", hex(frame)))?;
    let (icmp_check, quote) = match (&sliced.net, &sliced.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Icmpv4(icmp))) => {
            let header = ip.header().to_header();
            check(
                "IPv4 header",
                header.header_checksum,
                header.calc_header_checksum(),
            )?;
            // The raw type: etherparse's typed variants assume their unused bytes are zero.
            let raw = Icmpv4Type::Unknown {
                type_u8: icmp.type_u8(),
                code_u8: icmp.code_u8(),
                bytes5to8: icmp.bytes5to8(),
            };
            let c = check("ICMPv4", icmp.checksum(), raw.calc_checksum(icmp.payload()))?;
            (c, icmp.payload())
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) => {
            let h = ip.header();
            if !icmp.is_checksum_valid(h.source(), h.destination()) {
                return Err(format!(
                    "ICMPv6 checksum {:#06x} is wrong for its message and pseudo-header",
                    icmp.checksum()
                ));
            }
            (icmp.checksum(), icmp.payload())
        }
        (net, t) => return Err(format!("not an ICMP error over IP: {net:?} {t:?}")),
    };
    if quote.first().is_some_and(|b| b >> 4 == 4) {
        let quoted = Ipv4HeaderSlice::from_slice(quote)
            .map_err(|e| format!("quoted IPv4 header: {e}"))?
            .to_header();
        check(
            "quoted IPv4 header",
            quoted.header_checksum,
            quoted.calc_header_checksum(),
        )?;
    }
    // A whole quoted packet parses on its own; a cut one is refused as too short.
    if let Ok(h) = PacketHeaders::from_ip_slice(quote) {
        let payload = match h.payload {
            PayloadSlice::Tcp(p) | PayloadSlice::Udp(p) => p,
            ref other => return Err(format!("quote without TCP/UDP: {other:?}")),
        };
        verify_transport(h.net.as_ref(), h.transport.as_ref(), payload)
            .map_err(|e| format!("quoted packet: {e}"))?;
    }
    Ok(icmp_check)
}

/// An ICMP error about a TCP/UDP [`Packet`]: an IP header (of the quoted packet's family),
/// an ICMP or ICMPv6 header, and the quoted packet from its IP header on, whole or cut.
/// Serialised by etherparse, which computes every length and checksum.
#[derive(Clone, Debug)]
pub struct IcmpError {
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quoted: Packet,
    quote_len: Option<usize>,
}

impl IcmpError {
    /// An error of `icmp_type`/`code` (ICMPv4 or ICMPv6 after the addresses' family) from
    /// `src` to `dst`, TTL 64, with `rest` as header bytes 5 to 8.
    ///
    /// # Panics
    /// Addresses of different families, or of another family than the quote's.
    #[must_use]
    pub fn new(
        src: IpAddr,
        dst: IpAddr,
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quoted: Packet,
    ) -> Self {
        assert_eq!(src.is_ipv6(), dst.is_ipv6(), "error mixes families");
        assert_eq!(
            src.is_ipv6(),
            matches!(quoted.net, Net::V6(..)),
            "error and quote of different families"
        );
        Self {
            macs: (CLIENT_MAC, LB_MAC),
            src,
            dst,
            ttl: 64,
            icmp_type,
            code,
            rest,
            quoted,
            quote_len: None,
        }
    }

    /// ICMPv4 destination unreachable, fragmentation needed (type 3, code 4).
    #[must_use]
    pub fn fragmentation_needed(src: IpAddr, dst: IpAddr, mtu: u16, quoted: Packet) -> Self {
        let [hi, lo] = mtu.to_be_bytes();
        Self::new(src, dst, 3, 4, [0, 0, hi, lo], quoted)
    }

    /// ICMPv6 packet too big (type 2).
    #[must_use]
    pub fn packet_too_big(src: IpAddr, dst: IpAddr, mtu: u32, quoted: Packet) -> Self {
        Self::new(src, dst, 2, 0, mtu.to_be_bytes(), quoted)
    }

    /// Port unreachable: ICMPv4 type 3 code 3, or ICMPv6 type 1 code 4.
    #[must_use]
    pub fn port_unreachable(src: IpAddr, dst: IpAddr, quoted: Packet) -> Self {
        if src.is_ipv6() {
            Self::new(src, dst, 1, 4, [0; 4], quoted)
        } else {
            Self::new(src, dst, 3, 3, [0; 4], quoted)
        }
    }

    /// Quotes only the first `len` bytes of the quoted packet's IP packet.
    #[must_use]
    pub fn quote_len(mut self, len: usize) -> Self {
        self.quote_len = Some(len);
        self
    }

    #[must_use]
    pub fn macs(mut self, source: [u8; 6], destination: [u8; 6]) -> Self {
        self.macs = (source, destination);
        self
    }

    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// What a router does to the frame it forwards.
    #[must_use]
    pub fn decrement_ttl(mut self) -> Self {
        self.ttl = self.ttl.checked_sub(1).expect("TTL 0 cannot be forwarded");
        self
    }

    /// Replaces the error's source address.
    #[must_use]
    pub fn src(mut self, to: IpAddr) -> Self {
        self.src = to;
        self
    }

    /// Replaces the error's destination address.
    #[must_use]
    pub fn dst(mut self, to: IpAddr) -> Self {
        self.dst = to;
        self
    }

    /// Replaces the quoted packet (cut as before).
    #[must_use]
    pub fn quoted(mut self, quoted: Packet) -> Self {
        self.quoted = quoted;
        self
    }

    /// The quote as it goes into the message.
    #[must_use]
    pub fn quote(&self) -> Vec<u8> {
        let mut ip = self.quoted.bytes().split_off(self.quoted.l3_offset());
        if let Some(len) = self.quote_len {
            ip.truncate(len);
        }
        ip
    }

    /// Serialises the frame; etherparse fills in every length and checksum.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        let (source, destination) = self.macs;
        let l2 = PacketBuilder::ethernet2(source, destination);
        let quote = self.quote();
        let mut frame = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => l2
                .ipv4(s.octets(), d.octets(), self.ttl)
                .icmpv4_raw(self.icmp_type, self.code, self.rest)
                .write(&mut frame, &quote),
            (IpAddr::V6(s), IpAddr::V6(d)) => l2
                .ipv6(s.octets(), d.octets(), self.ttl)
                .icmpv6_raw(self.icmp_type, self.code, self.rest)
                .write(&mut frame, &quote),
            _ => unreachable!("checked by new"),
        }
        .expect("Vec write");
        frame
    }
}

/// As [`verify_checksums`], panicking on a problem.
///
/// # Panics
/// The frame does not parse as Ethernet/IP/TCP-or-UDP, or a checksum is wrong.
pub fn assert_checksums(frame: &[u8]) -> u16 {
    verify_checksums(frame).unwrap_or_else(|e| panic!("{e}"))
}

/// Lower-case hex, 16 bytes to a line with offsets, for failure messages.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = format!("({} bytes)", bytes.len());
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "\n  {:04x}:", i * 16);
        for b in chunk {
            let _ = write!(s, " {b:02x}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn built_frames_have_valid_checksums_and_corruption_is_found() {
        for p in [
            Packet::tcp(sa("203.0.113.7:1"), sa("192.0.2.10:80")),
            Packet::udp(sa("203.0.113.7:1"), sa("192.0.2.10:53")).vlan(5),
            Packet::tcp(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:80")).payload(vec![]),
            Packet::udp(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:53")),
            Packet::tcp(sa("203.0.113.7:1"), sa("192.0.2.10:80")).ipv4_options(&[1, 1, 1, 0]),
        ] {
            let frame = p.bytes();
            let c = assert_checksums(&frame);
            assert_eq!(c, p.transport_checksum());
            // Flipping a bit of the source address or of the last byte breaks a checksum.
            for at in [p.l3_offset() + 12, frame.len() - 1] {
                let mut bad = frame.clone();
                bad[at] ^= 0x40;
                assert!(verify_checksums(&bad).is_err(), "flip at {at} not caught");
            }
        }
    }

    #[test]
    fn zero_udp_checksum_is_accepted_over_ipv4_only() {
        let v4 = Packet::udp(sa("203.0.113.7:1"), sa("192.0.2.10:53")).udp_zero_checksum();
        assert_eq!(verify_checksums(&v4.bytes()), Ok(0));
        let v6 = Packet::udp(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:53")).udp_zero_checksum();
        assert!(verify_checksums(&v6.bytes()).is_err());
    }

    #[test]
    fn layout_of_the_default_frames() {
        let p = Packet::tcp(sa("203.0.113.7:40000"), sa("192.0.2.10:80"));
        let f = p.bytes();
        assert_eq!(f.len(), 14 + 20 + 20 + DEFAULT_PAYLOAD.len());
        assert_eq!(f[..12], [LB_MAC, CLIENT_MAC].concat());
        assert_eq!(f[12..14], [0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(f[22], 64, "TTL");
        assert_eq!(f[30..34], [192, 0, 2, 10]);
        assert_eq!(f[36..38], 80u16.to_be_bytes());
        let f = p.clone().ipv4_options(&[0x94, 4, 0, 0]).vlan(42).bytes();
        assert_eq!(f[12..18], [0x81, 0x00, 0x00, 42, 0x08, 0x00]);
        assert_eq!(f[18], 0x46);
        let f = Packet::udp(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:53"))
            .hop_by_hop()
            .bytes();
        assert_eq!(f[14 + 6], 0, "next header: hop-by-hop");
        assert_eq!(f[14 + 40], 17, "hop-by-hop's next header: UDP");
    }

    /// Moves one word of an ICMP message's bytes while keeping its ICMP checksum right:
    /// `at` gains one, the high byte of the next-hop MTU (an even offset into the message,
    /// as `at` must be; non-zero in these fixtures, so nothing borrows) loses one.
    fn shift_inside_message(frame: &[u8], icmp_offset: usize, at: usize) -> Vec<u8> {
        assert_eq!((at - icmp_offset) % 2, 0);
        let mut f = frame.to_vec();
        f[at] = f[at].wrapping_add(1);
        f[icmp_offset + 6] -= 1;
        f
    }

    #[test]
    fn icmp_error_checksums_are_each_verified() {
        let quoted4 = Packet::tcp(sa("203.0.113.7:40000"), sa("198.51.100.1:8080"));
        let e4 = IcmpError::fragmentation_needed(
            "198.51.100.254".parse().unwrap(),
            "203.0.113.7".parse().unwrap(),
            1400,
            quoted4,
        );
        let quoted6 = Packet::udp(sa("[2001:db8:f::10]:53"), sa("[2001:db8:c::7]:40000"));
        let e6 = IcmpError::packet_too_big(
            "2001:db8:c::fe".parse().unwrap(),
            "2001:db8:f::10".parse().unwrap(),
            1280,
            quoted6,
        );
        for e in [
            &e4,
            &e6,
            &e4.clone().quote_len(28),
            &e6.clone().quote_len(48),
        ] {
            verify_checksums(&e.bytes()).unwrap_or_else(|err| panic!("{err}"));
        }

        let f4 = e4.bytes();
        let icmp4 = 14 + 20;
        let err = |f: &[u8]| verify_checksums(f).expect_err("corruption caught");
        let mut bad = f4.clone();
        bad[14 + 12] ^= 1;
        assert!(
            err(&bad).starts_with("IPv4 header checksum"),
            "{}",
            err(&bad)
        );
        let mut bad = f4.clone();
        bad[icmp4 + 8 + 30] ^= 1;
        assert!(err(&bad).starts_with("ICMPv4 checksum"), "{}", err(&bad));
        // The quoted source address (message offset 8 + 12), the ICMP checksum kept right.
        let bad = shift_inside_message(&f4, icmp4, icmp4 + 8 + 12);
        assert!(err(&bad).starts_with("quoted IPv4 header"), "{}", err(&bad));
        // The last quoted payload byte: only the quoted TCP checksum notices.
        let last = f4.len() - 1 - (f4.len() - 1 - icmp4) % 2;
        let bad = shift_inside_message(&f4, icmp4, last);
        assert!(err(&bad).starts_with("quoted packet: TCP"), "{}", err(&bad));

        let f6 = e6.bytes();
        let icmp6 = 14 + 40;
        let mut bad = f6.clone();
        bad[14 + 8] ^= 1; // the error's source: in the pseudo-header only
        assert!(err(&bad).starts_with("ICMPv6 checksum"), "{}", err(&bad));
        let last = f6.len() - 1 - (f6.len() - 1 - icmp6) % 2;
        let bad = shift_inside_message(&f6, icmp6, last);
        assert!(err(&bad).starts_with("quoted packet: UDP"), "{}", err(&bad));
    }
}
