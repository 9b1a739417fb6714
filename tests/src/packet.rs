//! A fluent packet builder over `etherparse`, and checksum verification with it.
//!
//! Fixtures are described field by field (`Packet::tcp(client, vip).ttl(1).vlan(42)`) and
//! serialised by etherparse, which computes every length and checksum from scratch. The
//! expected output of a rewrite is the same description with the rewritten fields changed, so
//! the data plane's incremental checksum updates are judged against a full recomputation by an
//! independent library, never against `lb-common`'s own checksum code.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header,
    Ipv6RawExtHeader, NetHeaders, PacketHeaders, PayloadSlice, SingleVlanHeader, TcpHeader,
    TransportHeader, UdpHeader, VlanId,
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

    /// TCP only: a connection's first segment (SYN alone, no ACK).
    #[must_use]
    pub fn syn(self) -> Self {
        self.tcp_header(|t| {
            (t.syn, t.ack, t.psh, t.acknowledgment_number) = (true, false, false, 0);
        })
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
/// # Errors
/// The frame does not parse as Ethernet/IP/TCP-or-UDP, or a checksum is wrong.
pub fn verify_checksums(frame: &[u8]) -> Result<u16, String> {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .map_err(|e| format!("etherparse cannot parse {}: {e}", hex(frame)))?;
    let payload = match h.payload {
        PayloadSlice::Tcp(p) | PayloadSlice::Udp(p) => p,
        ref other => return Err(format!("no TCP/UDP payload in {}: {other:?}", hex(frame))),
    };
    let check = |what: &str, got: u16, want: u16| {
        if got == want {
            Ok(got)
        } else {
            Err(format!(
                "{what} checksum is {got:#06x}, etherparse computes {want:#06x}"
            ))
        }
    };
    match (&h.net, &h.transport) {
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
}
