//! Golden packet tests: the compiled XDP program, run by the kernel with `BPF_PROG_TEST_RUN`,
//! against tables of {description, input packet, expected action, expected output packet}
//! (as katran's `KatranBaseTestFixtures.h`), plus the global counters each packet must move.
//!
//! Inputs and expected outputs are built with etherparse, which computes every checksum from
//! scratch, and every rewritten output's checksums are verified with etherparse again.
//!
//! Each test runs on its own thread in a fresh network namespace (see `xlb_tests::host`):
//! `BPF_PROG_TEST_RUN` feeds the frame in through that namespace's `lo` (or, with
//! `Case::arriving_on`, through an interface the test made, via `xdp_md.ingress_ifindex`), and
//! `bpf_fib_lookup` sees only the routes and neighbours the test made. The program rewrites the
//! frame in place, so every run uses repeat = 1.
//!
//! Test runs never transmit: `XDP_TX` and `XDP_REDIRECT` are only verdicts here, with the
//! frame as the program left it.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder};
use lb_common::{
    Counter::{
        self, ConntrackHit, ConntrackMiss, Fragment, Ipv6ExtHeader, Malformed, NextHopFailure,
        NoBackend, NotForUs, NotTcpUdp, ReverseNat, TtlExpired, ViaStack,
    },
    program_names,
};
use lb_userspace::balancer::{BackendState, VipSpec};
use xlb_tests::{
    harness::{Action, Case, Expect, Lab},
    host::{BACKEND_MAC, EGRESS_MAC, GoldenHost, Iface},
    packet::{CLIENT_MAC, LB_MAC, Packet, assert_checksums},
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

// Addresses: VIPs in 192.0.2.0/24 and 2001:db8:f::/64, backends in 198.51.100.0/24 and
// 2001:db8:b::/64, clients in 203.0.113.0/24 and 2001:db8:c::/64 (documentation ranges).
const V4_CLIENT: &str = "203.0.113.7";
const V6_CLIENT: &str = "2001:db8:c::7";

fn v4_client(port: u16) -> SocketAddr {
    SocketAddr::new(V4_CLIENT.parse().expect("address"), port)
}

fn v6_client(port: u16) -> SocketAddr {
    SocketAddr::new(V6_CLIENT.parse().expect("address"), port)
}

/// The four VIPs of the main table, three backends each, and one VIP without backends.
struct Services {
    v4_tcp: VipSpec,
    v4_udp: VipSpec,
    v6_tcp: VipSpec,
    v6_udp: VipSpec,
    v4_empty: VipSpec,
    v6_empty: VipSpec,
}

impl Services {
    fn install(lab: &mut Lab) -> Self {
        let s = Self {
            v4_tcp: lab.add_vip("192.0.2.10:80/tcp"),
            v4_udp: lab.add_vip("192.0.2.10:53/udp"),
            v6_tcp: lab.add_vip("[2001:db8:f::10]:443/tcp"),
            v6_udp: lab.add_vip("[2001:db8:f::10]:53/udp"),
            v4_empty: lab.add_vip("192.0.2.20:80/tcp"),
            v6_empty: lab.add_vip("[2001:db8:f::20]:80/udp"),
        };
        for i in 1..=3 {
            lab.add_backend(&s.v4_tcp, sa(&format!("198.51.100.{i}:8080")), 1);
            lab.add_backend(&s.v4_udp, sa(&format!("198.51.100.{i}:5353")), 1);
            lab.add_backend(&s.v6_tcp, sa(&format!("[2001:db8:b::{i}]:8443")), 1);
            lab.add_backend(&s.v6_udp, sa(&format!("[2001:db8:b::{i}]:5353")), 1);
        }
        s
    }
}

/// A payload that makes `packet`'s checksum, once its destination is `to`, come out as the
/// one's complement "zero" (the 16-bit sum of everything else is 0xffff).
fn payload_for_zero_sum(packet: &Packet, to: SocketAddr) -> Vec<u8> {
    let c = packet.clone().dst(to).payload([0, 0]).transport_checksum();
    c.to_be_bytes().to_vec()
}

/// The well-formed packets the untouched tables start from: one per family and protocol, to
/// the main VIPs, from port 41000.
struct Bent {
    tcp4: Packet,
    tcp6: Packet,
    udp4: Packet,
    udp6: Packet,
}

impl Bent {
    fn to(s: &Services) -> Self {
        let (c4, c6) = (v4_client(41_000), v6_client(41_000));
        Self {
            tcp4: Packet::tcp(c4, s.v4_tcp.addr),
            tcp6: Packet::tcp(c6, s.v6_tcp.addr),
            udp4: Packet::udp(c4, s.v4_udp.addr),
            udp6: Packet::udp(c6, s.v6_udp.addr),
        }
    }
}

/// A frame the program must pass to the stack as it is.
fn pass(name: &str, frame: Vec<u8>, counters: &[Counter]) -> Case {
    Case::unmodified(name, frame, Action::Pass, counters)
}

/// Every way a packet that is not load-balanced can look: passed to the stack byte for byte.
fn not_balanced_cases(s: &Services) -> Vec<Case> {
    let (c4, c6) = (v4_client(41_000), v6_client(41_000));
    let Bent {
        tcp4,
        tcp6,
        udp4,
        udp6,
    } = Bent::to(s);

    let mut cases = vec![
        pass(
            "ipv4 tcp to an address that is no vip",
            Packet::tcp(c4, sa("192.0.2.99:80")).bytes(),
            &[NotForUs],
        ),
        pass(
            "ipv4 tcp to the vip address on another port",
            Packet::tcp(c4, sa("192.0.2.10:81")).bytes(),
            &[NotForUs],
        ),
        pass(
            "ipv4 udp to a port that is a tcp vip",
            Packet::udp(c4, s.v4_tcp.addr).bytes(),
            &[NotForUs],
        ),
        pass(
            "ipv6 tcp to an address that is no vip",
            Packet::tcp(c6, sa("[2001:db8:f::99]:443")).bytes(),
            &[NotForUs],
        ),
        pass(
            "ipv6 tcp to a port that is a udp vip",
            Packet::tcp(c6, s.v6_udp.addr).bytes(),
            &[NotForUs],
        ),
        pass(
            "ipv4 tcp from a backend address to a client with no flow",
            Packet::tcp(sa("198.51.100.1:8080"), v4_client(9)).bytes(),
            &[NotForUs],
        ),
        pass(
            "icmp echo to the vip address",
            {
                let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                    .ipv4([203, 0, 113, 7], [192, 0, 2, 10], 64)
                    .icmpv4_echo_request(1, 1);
                let mut f = Vec::new();
                b.write(&mut f, b"ping").expect("Vec write");
                f
            },
            &[NotTcpUdp],
        ),
        pass(
            "arp request for the vip address",
            {
                let arp = ArpPacket::new(
                    ArpHardwareId::ETHERNET,
                    EtherType::IPV4,
                    ArpOperation::REQUEST,
                    &CLIENT_MAC,
                    &[203, 0, 113, 7],
                    &[0; 6],
                    &[192, 0, 2, 10],
                )
                .expect("valid ARP");
                let b = PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6]).arp(arp);
                let mut f = Vec::new();
                b.write(&mut f).expect("Vec write");
                f
            },
            &[NotTcpUdp],
        ),
        // Fragments: the ports are missing or cannot be trusted; the stack reassembles.
        pass(
            "ipv4 first fragment (MF, offset 0) to the vip",
            tcp4.clone().fragment(0, true).bytes(),
            &[Fragment],
        ),
        pass(
            "ipv4 middle fragment (MF, offset 185) to the vip",
            udp4.clone().fragment(185, true).bytes(),
            &[Fragment],
        ),
        pass(
            "ipv4 last fragment (offset 185, no MF) to the vip",
            udp4.clone().fragment(185, false).bytes(),
            &[Fragment],
        ),
        pass(
            "ipv6 fragment header to the vip",
            udp6.clone().fragment(0, true).bytes(),
            &[Fragment],
        ),
        pass(
            "ipv6 hop-by-hop header before tcp to the vip",
            tcp6.clone().hop_by_hop().bytes(),
            &[Ipv6ExtHeader],
        ),
        pass(
            "ipv6 hop-by-hop header before udp to the vip",
            udp6.clone().hop_by_hop().bytes(),
            &[Ipv6ExtHeader],
        ),
    ];

    // Two tags (QinQ): the parser goes one tag deep only, so this is not IP to it.
    let inner = tcp4.clone().vlan(42).bytes();
    let qinq = [&inner[..12], &[0x88, 0xa8, 0x00, 0x07], &inner[12..]].concat();
    cases.push(pass(
        "qinq (802.1ad + 802.1q) ipv4 tcp to the vip",
        qinq,
        &[NotTcpUdp],
    ));

    cases
}

/// Frames too short for their headers, or whose headers contradict themselves or the frame:
/// passed to the stack byte for byte, counted as malformed.
fn malformed_cases(s: &Services) -> Vec<Case> {
    let Bent {
        tcp4,
        tcp6,
        udp4,
        udp6,
    } = Bent::to(s);
    let mut cases = Vec::new();

    // Frames cut short at every header boundary and inside each header.
    let (v4, v6) = (tcp4.bytes(), tcp6.bytes());
    let cut_short: [(&str, Vec<u8>, Vec<usize>); 4] = [
        (
            "ipv4 tcp to the vip",
            v4.clone(),
            vec![14, 15, 22, 33, 34, 40, 53, v4.len() - 1],
        ),
        ("ipv4 udp to the vip", udp4.bytes(), vec![34, 41]),
        (
            "ipv6 tcp to the vip",
            v6.clone(),
            vec![14, 21, 30, 53, 54, 60, 73, v6.len() - 1],
        ),
        (
            "vlan-tagged ipv4 tcp",
            tcp4.clone().vlan(42).bytes(),
            vec![16, 17, 18, 30],
        ),
    ];
    for (what, frame, cuts) in cut_short {
        for cut in cuts {
            cases.push(pass(
                &format!("{what} cut to {cut} of {} bytes", frame.len()),
                frame[..cut].to_vec(),
                &[Malformed],
            ));
        }
    }

    // Headers that contradict themselves or the frame: (case, frame, the lie told in it).
    type Lie = fn(&mut [u8]);
    let lies: [(&str, &Packet, Lie); 9] = [
        ("ipv4 udp to the vip with ihl 0", &udp4, |f| f[14] = 0x40),
        ("ipv4 udp to the vip with ihl 4", &udp4, |f| f[14] = 0x44),
        // IHL 15: 60 bytes of header in a 47-byte packet.
        ("ipv4 udp to the vip with ihl past the frame", &udp4, |f| {
            f[14] = 0x4f;
        }),
        ("ipv4 ethertype carrying version 6", &tcp4, |f| f[14] = 0x65),
        ("ipv4 total length one past the frame", &tcp4, |f| {
            let total = u16::from_be_bytes([f[16], f[17]]) + 1;
            f[16..18].copy_from_slice(&total.to_be_bytes());
        }),
        ("tcp data offset 4", &tcp4, |f| f[34 + 12] = 4 << 4),
        ("tcp data offset past the segment", &tcp4, |f| {
            f[34 + 12] = 15 << 4;
        }),
        ("udp length 7", &udp4, |f| {
            f[34 + 4..34 + 6].copy_from_slice(&7u16.to_be_bytes());
        }),
        ("ipv6 payload length past the frame", &udp6, |f| {
            f[14 + 4..14 + 6].copy_from_slice(&200u16.to_be_bytes());
        }),
    ];
    for (name, packet, lie) in lies {
        let mut frame = packet.bytes();
        lie(&mut frame);
        cases.push(pass(name, frame, &[Malformed]));
    }

    // IPv4-mapped addresses never appear in an IPv6 header on the wire (RFC 4291 2.5.5.2).
    // xlb keys IPv4 as mapped 16-byte addresses, so such a packet would otherwise pass for
    // an IPv4 client or VIP.
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    };
    let client4 = v4_client(41_000);
    let mapped_rows: [(&str, Packet); 3] = [
        (
            "ipv6 between the mapped addresses of an ipv4 client and vip",
            Packet::tcp(mapped(client4), mapped(s.v4_tcp.addr)),
        ),
        (
            "ipv6 from a mapped ipv4 client to the ipv6 vip",
            Packet::tcp(mapped(client4), s.v6_tcp.addr),
        ),
        (
            "ipv6 udp to the mapped address of the ipv4 vip",
            Packet::udp(v6_client(41_000), mapped(s.v4_udp.addr)),
        ),
    ];
    for (name, packet) in mapped_rows {
        cases.push(pass(name, packet.bytes(), &[Malformed]));
    }
    cases
}

/// A packet from `client` to `vip`, TCP or UDP as the VIP is.
fn packet_to(vip: &VipSpec, client: SocketAddr) -> Packet {
    if vip.proto.number() == 6 {
        Packet::tcp(client, vip.addr)
    } else {
        Packet::udp(client, vip.addr)
    }
}

/// A row of a "rewritten, handed to the stack" table: (case, VIP, client, how the packet
/// differs from `packet_to`'s, how its frame differs from the packet's bytes). The frame
/// change applies to the expected output alike.
type StackRow<'a> = (
    &'a str,
    &'a VipSpec,
    SocketAddr,
    fn(Packet) -> Packet,
    fn(Vec<u8>) -> Vec<u8>,
);

fn as_built(packet: Packet) -> Packet {
    packet
}

fn whole(frame: Vec<u8>) -> Vec<u8> {
    frame
}

/// Each row is a new flow's packet, with no route to any backend: the program rewrites the
/// destination to the flow's backend (as `explain` predicts it) and passes it to the stack,
/// MACs and TTL untouched.
fn to_the_stack(lab: &Lab, rows: &[StackRow<'_>]) -> Vec<Case> {
    rows.iter()
        .map(|&(name, vip, client, shape, frame)| {
            let input = shape(packet_to(vip, client));
            let output = input.clone().dst(lab.new_flow_backend(client, vip));
            Case {
                name: name.to_owned(),
                input: frame(input.bytes()),
                action: Action::Pass,
                output: Expect::Frame(frame(output.bytes())),
                counters: vec![ConntrackMiss, NextHopFailure, ViaStack],
                ingress: None,
            }
        })
        .collect()
}

/// The main table, in a namespace with forwarding on and no route to any backend: every
/// packet to a VIP is rewritten and passed to the stack, MACs and TTL untouched. Replies need
/// no route (they go back the way the client's packet came), so they leave by `XDP_TX`.
#[test]
fn golden_table_without_a_route_to_the_backends() {
    GoldenHost::new("golden-no-route").forwarding().run(|_| {
        let mut lab = Lab::new();
        let s = Services::install(&mut lab);
        let new_flow = [ConntrackMiss, NextHopFailure, ViaStack];
        let known_flow = [ConntrackHit, NextHopFailure, ViaStack];
        let mut cases = Vec::new();

        // Forward NAT, both families and protocols; a flow's second packet hits conntrack.
        let mut replies = Vec::new();
        for (name, vip, client) in [
            ("ipv4 tcp", &s.v4_tcp, v4_client(40_001)),
            ("ipv4 udp", &s.v4_udp, v4_client(40_002)),
            ("ipv6 tcp", &s.v6_tcp, v6_client(40_003)),
            ("ipv6 udp", &s.v6_udp, v6_client(40_004)),
        ] {
            let input = packet_to(vip, client);
            let tcp = input.is_tcp();
            let backend = lab.new_flow_backend(client, vip);
            let out = input.clone().dst(backend);
            cases.push(Case::rewritten(
                format!("{name} to the vip: destination becomes {backend}"),
                &input,
                Action::Pass,
                &out,
                &new_flow,
            ));
            cases.push(Case::rewritten(
                format!("{name} to the vip, same flow again"),
                &input,
                Action::Pass,
                &out,
                &known_flow,
            ));
            // The backend's answer, with a payload of its own.
            let reply = if tcp {
                Packet::tcp(backend, client)
            } else {
                Packet::udp(backend, client)
            }
            .payload(b"answer".to_vec())
            .macs(BACKEND_MAC, LB_MAC);
            // Replies go back the way the client's packet came: out of its ingress device
            // (here `lo`, so XDP_TX) to the MAC it came from; no route lookup is involved.
            replies.push(Case::rewritten(
                format!(
                    "{name} reply from {backend}: source becomes the vip, back to the client's mac"
                ),
                &reply,
                Action::Tx,
                &reply
                    .clone()
                    .src(vip.addr)
                    .decrement_ttl()
                    .macs(LB_MAC, CLIENT_MAC),
                &[ReverseNat],
            ));
            if tcp {
                replies.push(Case::unmodified(
                    format!("{name} reply with ttl 1: left to the stack"),
                    reply.clone().ttl(1).bytes(),
                    Action::Pass,
                    &[ReverseNat, TtlExpired],
                ));
            }
        }
        // Replies only after their flows exist.
        cases.extend(replies);

        // Checksum corner cases.
        let udp_without_checksum: &[StackRow] = &[(
            "ipv4 udp with checksum 0 (none): stays 0",
            &s.v4_udp,
            v4_client(40_010),
            Packet::udp_zero_checksum,
            whole,
        )];
        cases.extend(to_the_stack(&lab, udp_without_checksum));
        for (name, client, vip) in [
            ("ipv4 udp", v4_client(40_011), &s.v4_udp),
            ("ipv6 udp", v6_client(40_011), &s.v6_udp),
            ("ipv4 tcp", v4_client(40_012), &s.v4_tcp),
            ("ipv6 tcp", v6_client(40_012), &s.v6_tcp),
        ] {
            let base = packet_to(vip, client);
            let backend = lab.new_flow_backend(client, vip);
            let input = base.clone().payload(payload_for_zero_sum(&base, backend));
            let out = input.clone().dst(backend);
            let want = if base.is_tcp() { 0x0000 } else { 0xffff };
            assert_eq!(
                out.transport_checksum(),
                want,
                "{name}: fixture construction"
            );
            cases.push(Case::rewritten(
                format!("{name} whose rewritten checksum sums to zero: sent as {want:#06x}"),
                &input,
                Action::Pass,
                &out,
                &new_flow,
            ));
        }

        // Lengths and layouts; Ethernet padding after a short IP packet is carried along
        // untouched.
        let layouts: &[StackRow] = &[
            (
                "ipv4 tcp, empty payload",
                &s.v4_tcp,
                v4_client(40_020),
                |p| p.payload(vec![]),
                whole,
            ),
            (
                "ipv4 udp, empty payload",
                &s.v4_udp,
                v4_client(40_021),
                |p| p.payload(vec![]),
                whole,
            ),
            (
                "ipv6 tcp, empty payload",
                &s.v6_tcp,
                v6_client(40_022),
                |p| p.payload(vec![]),
                whole,
            ),
            (
                "ipv6 udp, empty payload",
                &s.v6_udp,
                v6_client(40_023),
                |p| p.payload(vec![]),
                whole,
            ),
            (
                "ipv4 tcp, 1400-byte payload",
                &s.v4_tcp,
                v4_client(40_024),
                |p| p.payload((0..1400u32).map(|i| (i * 7) as u8).collect::<Vec<_>>()),
                whole,
            ),
            (
                "ipv4 tcp with options (ihl 6: router alert)",
                &s.v4_tcp,
                v4_client(40_025),
                |p| p.ipv4_options(&[0x94, 0x04, 0x00, 0x00]),
                whole,
            ),
            (
                "ipv4 udp with 40 bytes of options (ihl 15)",
                &s.v4_udp,
                v4_client(40_026),
                |p| p.ipv4_options(&[[0x01; 39].as_slice(), &[0x00]].concat()),
                whole,
            ),
            (
                "ipv4 tcp with don't-fragment (not a fragment)",
                &s.v4_tcp,
                v4_client(40_027),
                as_built,
                whole,
            ),
            (
                "ipv4 udp padded to the 60-byte ethernet minimum",
                &s.v4_udp,
                v4_client(40_028),
                |p| p.payload(vec![]),
                |mut f| {
                    f.resize(60, 0xa5);
                    f
                },
            ),
        ];
        cases.extend(to_the_stack(&lab, layouts));

        // VLAN-tagged frames to a VIP are rewritten and left to the stack; a single 802.1ad
        // (S-)tag is parsed like an 802.1Q tag.
        let vlans: &[StackRow] = &[
            (
                "vlan 42 ipv4 tcp to the vip: rewritten, passed",
                &s.v4_tcp,
                v4_client(40_030),
                |p| p.vlan(42),
                whole,
            ),
            (
                "vlan 4094 ipv6 udp to the vip: rewritten, passed",
                &s.v6_udp,
                v6_client(40_031),
                |p| p.vlan(4094),
                whole,
            ),
            (
                "802.1ad-tagged ipv4 udp to the vip: rewritten, passed",
                &s.v4_udp,
                v4_client(40_032),
                |p| p.vlan(100),
                |mut f| {
                    assert_eq!(f[12..14], [0x81, 0x00]);
                    f[12..14].copy_from_slice(&[0x88, 0xa8]);
                    f
                },
            ),
        ];
        cases.extend(to_the_stack(&lab, vlans));

        // The reply to a VLAN-tagged flow has no remembered next hop: the FIB decides, and
        // with no route the stack gets it.
        let backend = lab.new_flow_backend(v4_client(40_030), &s.v4_tcp);
        let reply = Packet::tcp(backend, v4_client(40_030)).macs(BACKEND_MAC, LB_MAC);
        cases.push(Case::rewritten(
            "ipv4 tcp reply to the vlan 42 flow, no route: source rewritten, passed",
            &reply,
            Action::Pass,
            &reply.clone().src(s.v4_tcp.addr),
            &[ReverseNat, NextHopFailure, ViaStack],
        ));

        // TTL / hop limit 1 with no next hop: the stack gets the rewritten packet, TTL as it was
        // (the stack decrements it, and answers time-exceeded, when it forwards).
        let expiring: &[StackRow] = &[
            (
                "ipv4 tcp ttl 1, no route: rewritten, ttl kept",
                &s.v4_tcp,
                v4_client(40_040),
                |p| p.ttl(1),
                whole,
            ),
            (
                "ipv6 udp hop limit 1, no route: rewritten, ttl kept",
                &s.v6_udp,
                v6_client(40_041),
                |p| p.ttl(1),
                whole,
            ),
            (
                "ipv4 udp ttl 0, no route: rewritten, ttl kept",
                &s.v4_udp,
                v4_client(40_042),
                |p| p.ttl(0),
                whole,
            ),
        ];
        cases.extend(to_the_stack(&lab, expiring));

        // A VIP without backends drops (after counting the flow lookup as a miss).
        for (name, input) in [
            (
                "ipv4 tcp to a vip without backends",
                Packet::tcp(v4_client(40_050), s.v4_empty.addr),
            ),
            (
                "ipv6 udp to a vip without backends",
                Packet::udp(v6_client(40_051), s.v6_empty.addr),
            ),
        ] {
            cases.push(Case::unmodified(
                name,
                input.bytes(),
                Action::Drop,
                &[ConntrackMiss, NoBackend],
            ));
        }

        cases.extend(not_balanced_cases(&s));
        cases.extend(malformed_cases(&s));
        lab.assert_all(&cases);

        // The kernel itself refuses frames shorter than an Ethernet header.
        let mut out = [0u8; 64];
        let runt = lab
            .balancer
            .datapath()
            .test_run(program_names::XLB, &[0u8; 13], &mut out, 1);
        assert!(runt.is_err(), "test_run accepted a 13-byte frame: {runt:?}");
    });
}

/// Established flows stay on their backend when the ring changes under them (a backend added,
/// weights changed, a backend draining); new flows follow the ring, as `explain` predicts.
#[test]
fn conntrack_keeps_established_flows_when_the_ring_changes() {
    GoldenHost::new("golden-conntrack").forwarding().run(|_| {
        let mut lab = Lab::new();
        let vip = lab.add_vip("192.0.2.30:80/tcp");
        let a = sa("198.51.100.1:80");
        let b = sa("198.51.100.2:80");
        lab.add_backend(&vip, a, 1);

        let send_packet = |lab: &Lab, input: Packet, to: SocketAddr, counters: &[Counter], what| {
            lab.assert(&Case::rewritten(
                what,
                &input,
                Action::Pass,
                &input.clone().dst(to),
                counters,
            ));
        };
        let send = |lab: &Lab, port: u16, to: SocketAddr, counters: &[Counter], what: &str| {
            let input = Packet::tcp(v4_client(port), vip.addr);
            lab.assert(&Case::rewritten(
                format!("port {port}: {what}"),
                &input,
                Action::Pass,
                &input.clone().dst(to),
                counters,
            ));
        };
        let established: Vec<u16> = (10_000..10_032).collect();
        for &port in &established {
            send(
                &lab,
                port,
                a,
                &[ConntrackMiss, NextHopFailure, ViaStack],
                "new flow, only backend",
            );
        }

        let status = lab.balancer.vip_status(&vip).expect("vip status");
        assert_eq!(
            (status.packets, status.new_flows),
            (32, 32),
            "per-VIP counters"
        );
        let frame_len = Packet::tcp(v4_client(1), vip.addr).bytes().len() as u64;
        assert_eq!(
            status.bytes,
            32 * frame_len,
            "per-VIP bytes count whole frames"
        );
        let backend = &status.backends[0];
        assert_eq!(
            (backend.addr, backend.packets, backend.new_flows),
            (a, 32, 32),
            "per-backend counters"
        );

        // A second backend takes over part of the ring.
        lab.add_backend(&vip, b, 1);
        let moved = established
            .iter()
            .copied()
            .find(|p| lab.explain(v4_client(*p), &vip) == (Some(b), Some(a)))
            .expect("some established flow's ring slot now belongs to the new backend");
        send(
            &lab,
            moved,
            a,
            &[ConntrackHit, NextHopFailure, ViaStack],
            "established, ring says new backend: stays",
        );
        let fresh = (20_000..20_256)
            .find(|p| lab.explain(v4_client(*p), &vip) == (Some(b), None))
            .expect("some new flow hashes to the new backend");
        // A connection opens with a SYN; its entry comes with the handshake's ACK, which
        // follows the SYN even though the ring switched a moment ago.
        send_packet(
            &lab,
            Packet::tcp(v4_client(fresh), vip.addr).syn(),
            b,
            &[ConntrackMiss, NextHopFailure, ViaStack],
            format!("port {fresh}: SYN goes where explain says"),
        );
        send(
            &lab,
            fresh,
            b,
            &[ConntrackMiss, NextHopFailure, ViaStack],
            "the handshake's ACK follows its SYN",
        );
        assert_eq!(
            lab.explain(v4_client(fresh), &vip).1,
            Some(b),
            "explain reports the tracked backend"
        );

        // Weights: the new backend takes nearly the whole ring; established flows stay put.
        lab.balancer
            .update_backend(&vip, b, Some(1000), None)
            .expect("weight update");
        let still_a: Vec<u16> = established
            .iter()
            .copied()
            .filter(|p| lab.explain(v4_client(*p), &vip) == (Some(b), Some(a)))
            .collect();
        assert!(
            still_a.len() > 1,
            "weight 1000:1 moves most slots to the heavy backend"
        );
        for port in still_a {
            send(
                &lab,
                port,
                a,
                &[ConntrackHit, NextHopFailure, ViaStack],
                "established after a weight change: stays",
            );
        }

        // Draining: out of the ring, yet established flows (both ways) continue.
        lab.balancer
            .update_backend(&vip, a, None, Some(BackendState::Draining))
            .expect("drain");
        let drained = established[0];
        assert_eq!(lab.explain(v4_client(drained), &vip), (Some(b), Some(a)));
        send(
            &lab,
            drained,
            a,
            &[ConntrackHit, NextHopFailure, ViaStack],
            "established on a draining backend: stays",
        );
        let reply = Packet::tcp(a, v4_client(drained));
        lab.assert(&Case::rewritten(
            "reply from the draining backend: back to the client",
            &reply,
            Action::Tx,
            &reply
                .clone()
                .src(vip.addr)
                .decrement_ttl()
                .macs(LB_MAC, CLIENT_MAC),
            &[ReverseNat],
        ));
        for port in 30_000..30_016 {
            send_packet(
                &lab,
                Packet::tcp(v4_client(port), vip.addr).syn(),
                b,
                &[ConntrackMiss, NextHopFailure, ViaStack],
                format!("port {port}: a SYN never picks a draining backend"),
            );
        }
    });
}

/// A TCP connection's entry comes with the handshake's ACK; until then the SYN's record in
/// the handshake table says where it went. The backend's SYN-ACK finds it there, the ACK
/// follows it even across a ring change, and a backend's answer to a connection that never
/// went through the VIP (a direct connection, a health probe) is left alone.
#[test]
fn handshakes_finish_where_their_syn_went() {
    GoldenHost::new("golden-handshake").forwarding().run(|_| {
        let mut lab = Lab::new();
        let vip = lab.add_vip("192.0.2.50:80/tcp");
        let (a, b) = (sa("198.51.100.1:80"), sa("198.51.100.2:80"));
        lab.add_backend(&vip, a, 1);
        lab.add_backend(&vip, b, 1);
        let port = (40_000..41_000)
            .find(|p| lab.explain(v4_client(*p), &vip).0 == Some(a))
            .expect("a port whose new flow goes to a");
        let client = v4_client(port);
        let flow = Packet::tcp(client, vip.addr);
        let via = [ConntrackMiss, NextHopFailure, ViaStack];
        lab.assert(&Case::rewritten(
            "SYN: to a, recorded as a handshake",
            &flow.clone().syn(),
            Action::Pass,
            &flow.clone().syn().dst(a),
            &via,
        ));
        assert!(
            lab.flow_state(client, &vip).is_none(),
            "a SYN creates no entry"
        );
        assert!(
            lab.handshake_state(client, &vip).is_some(),
            "the SYN's handshake record"
        );
        let syn_ack = Packet::tcp(a, client).syn().tcp_ack_flag();
        lab.assert(&Case::rewritten(
            "SYN-ACK from a: from the vip, back to the client's mac",
            &syn_ack,
            Action::Tx,
            &syn_ack
                .clone()
                .src(vip.addr)
                .decrement_ttl()
                .macs(LB_MAC, CLIENT_MAC),
            &[ReverseNat],
        ));
        // The ring changes before the handshake's ACK: a drains, new flows go to b.
        lab.balancer
            .update_backend(&vip, a, None, Some(BackendState::Draining))
            .expect("drain");
        assert_eq!(lab.explain(client, &vip).0, Some(b));
        lab.assert(&Case::rewritten(
            "the handshake's ACK after the ring changed: still a",
            &flow,
            Action::Pass,
            &flow.clone().dst(a),
            &via,
        ));
        assert_eq!(
            lab.explain(client, &vip).1,
            Some(a),
            "the connection's entry names a"
        );
        lab.assert(&Case::rewritten(
            "the connection's next packet: a hit on a",
            &flow,
            Action::Pass,
            &flow.clone().dst(a),
            &[ConntrackHit, NextHopFailure, ViaStack],
        ));
        // b answers a client that reached it directly, never through the VIP.
        let direct = Packet::tcp(b, v4_client(port + 1)).syn().tcp_ack_flag();
        lab.assert(&Case::unmodified(
            "SYN-ACK of a direct connection to b: left alone",
            direct.bytes(),
            Action::Pass,
            &[NotForUs],
        ));
    });
}

/// A removed backend's flows are re-hashed onto the remaining ones on their next packet; when
/// the last backend goes, the VIP drops.
#[test]
fn removed_backend_flows_move_to_the_remaining_backends() {
    GoldenHost::new("golden-removal").forwarding().run(|_| {
        let mut lab = Lab::new();
        let vip = lab.add_vip("[2001:db8:f::30]:443/tcp");
        let a = sa("[2001:db8:b::1]:443");
        let b = sa("[2001:db8:b::2]:443");
        lab.add_backend(&vip, a, 1);
        lab.add_backend(&vip, b, 1);
        let on = |backend| {
            (50_000..50_256)
                .find(|p| lab.explain(v6_client(*p), &vip).0 == Some(backend))
                .expect("both backends own slots")
        };
        let (pa, pb) = (on(a), on(b));
        let flow = |port| Packet::tcp(v6_client(port), vip.addr);
        for (port, to) in [(pa, a), (pb, b)] {
            lab.assert(&Case::rewritten(
                format!("port {port}: SYN to {to}"),
                &flow(port).syn(),
                Action::Pass,
                &flow(port).syn().dst(to),
                &[ConntrackMiss, NextHopFailure, ViaStack],
            ));
            lab.assert(&Case::rewritten(
                format!("port {port}: the handshake's ACK, tracked on {to}"),
                &flow(port),
                Action::Pass,
                &flow(port).dst(to),
                &[ConntrackMiss, NextHopFailure, ViaStack],
            ));
        }

        lab.remove_backend(&vip, a);
        assert_eq!(lab.explain(v6_client(pa), &vip).0, Some(b));
        lab.assert(&Case::rewritten(
            "flow of the removed backend: re-hashed to the remaining one (stale entry is a miss)",
            &flow(pa),
            Action::Pass,
            &flow(pa).dst(b),
            &[ConntrackMiss, NextHopFailure, ViaStack],
        ));
        assert_eq!(
            lab.explain(v6_client(pa), &vip).1,
            Some(b),
            "the flow is tracked on its new backend"
        );
        lab.assert(&Case::rewritten(
            "the moved flow again: a hit on its new backend",
            &flow(pa),
            Action::Pass,
            &flow(pa).dst(b),
            &[ConntrackHit, NextHopFailure, ViaStack],
        ));
        lab.assert(&Case::rewritten(
            "flow of the remaining backend: untouched by the removal",
            &flow(pb),
            Action::Pass,
            &flow(pb).dst(b),
            &[ConntrackHit, NextHopFailure, ViaStack],
        ));

        lab.remove_backend(&vip, b);
        lab.assert(&Case::unmodified(
            "established flow after the last backend is removed: dropped",
            flow(pb).bytes(),
            Action::Drop,
            &[ConntrackMiss, NoBackend],
        ));
    });
}

/// A flow's entry holds only while the flow does: a SYN always takes a fresh choice, a reset
/// or FINs from both sides leave an entry `CLOSING_TIMEOUT_S` to live, an entry idle past its
/// VIP's timeout is a miss. Each is seen by where the next packet goes once the backend the
/// entry names is draining: still there while the entry holds, elsewhere once it does not.
#[test]
fn flow_entries_end_with_syn_fin_rst_and_idle_timeouts() {
    GoldenHost::new("golden-lifetime").forwarding().run(|_| {
        let mut lab = Lab::new();
        let vip = lab.add_vip("192.0.2.40:80/tcp");
        let udp = lab.add_vip_with_timeout("192.0.2.40:53/udp", 30);
        // Two VIPs sharing backend `shared`: its replies go through reverse-NAT entries.
        let shared_vip = lab.add_vip("192.0.2.41:80/tcp");
        let other_vip = lab.add_vip("192.0.2.42:80/tcp");
        let (a, b) = (sa("198.51.100.1:80"), sa("198.51.100.2:80"));
        let (ua, ub) = (sa("198.51.100.1:53"), sa("198.51.100.2:53"));
        let (shared, d) = (sa("198.51.100.3:80"), sa("198.51.100.4:80"));
        for (v, backend) in [
            (&vip, a),
            (&vip, b),
            (&udp, ua),
            (&udp, ub),
            (&shared_vip, shared),
            (&shared_vip, d),
            (&other_vip, shared),
        ] {
            lab.add_backend(v, backend, 1);
        }

        let new = [ConntrackMiss, NextHopFailure, ViaStack];
        // No route to the backends: every packet looks for a next hop, fails, and is counted.
        let hit = [ConntrackHit, NextHopFailure, ViaStack];
        let refreshed = hit;
        let send = |lab: &Lab, input: &Packet, to: SocketAddr, counters: &[Counter], what| {
            lab.assert(&Case::rewritten(
                what,
                input,
                Action::Pass,
                &input.clone().dst(to),
                counters,
            ));
        };
        let reply = |lab: &Lab, input: &Packet, v: &VipSpec, what| {
            lab.assert(&Case::rewritten(
                what,
                input,
                Action::Tx,
                &input
                    .clone()
                    .src(v.addr)
                    .decrement_ttl()
                    .macs(LB_MAC, CLIENT_MAC),
                &[ReverseNat],
            ));
        };
        // Distinct client ports whose new flows go to `backend`.
        let mut next_port = 40_000;
        let mut port_on = |lab: &Lab, v: &VipSpec, backend: SocketAddr| loop {
            next_port += 1;
            assert!(next_port < 41_000, "no port hashes to {backend}");
            if lab.explain(v4_client(next_port), v).0 == Some(backend) {
                return next_port;
            }
        };
        let flow = |port: u16, v: &VipSpec| Packet::tcp(v4_client(port), v.addr);

        let [reused, both_fins, client_fin, client_rst, backend_rst, idle] =
            [(); 6].map(|()| port_on(&lab, &vip, a));
        for port in [reused, both_fins, client_fin, client_rst, backend_rst, idle] {
            send(&lab, &flow(port, &vip).syn(), a, &new, "SYN: new flow");
            // The entry comes with the first packet after the SYN.
            send(&lab, &flow(port, &vip), a, &new, "ACK: established");
        }
        let via_shared = port_on(&lab, &shared_vip, shared);
        send(
            &lab,
            &flow(via_shared, &shared_vip).syn(),
            shared,
            &new,
            "SYN via shared",
        );
        // The endpoint serves two VIPs: the handshake's own reverse record says which.
        reply(
            &lab,
            &Packet::tcp(shared, v4_client(via_shared))
                .syn()
                .tcp_ack_flag(),
            &shared_vip,
            "SYN-ACK via shared: from the VIP the SYN went to",
        );
        send(
            &lab,
            &flow(via_shared, &shared_vip),
            shared,
            &new,
            "ACK via shared: established",
        );
        let udp_port = port_on(&lab, &udp, ua);
        let datagram = Packet::udp(v4_client(udp_port), udp.addr);
        send(&lab, &datagram, ua, &new, "UDP: new flow");

        let drain = |lab: &mut Lab, v: &VipSpec, backend| {
            lab.balancer
                .update_backend(v, backend, None, Some(BackendState::Draining))
                .expect("drain");
        };
        drain(&mut lab, &vip, a);
        drain(&mut lab, &udp, ua);
        drain(&mut lab, &shared_vip, shared);
        let live_on_a = |lab: &Lab| {
            let status = lab.balancer.vip_status_with_flows(&vip).expect("status");
            status
                .backends
                .iter()
                .find(|s| s.addr == a)
                .and_then(|s| s.live_flows)
        };
        assert_eq!(live_on_a(&lab), Some(6), "six open connections on a");

        // A SYN on a 5-tuple whose entry still names the draining backend: a new
        // connection (a client reusing its port), so a fresh choice.
        send(
            &lab,
            &flow(reused, &vip),
            a,
            &hit,
            "ACK of the open connection: stays on a",
        );
        send(
            &lab,
            &flow(reused, &vip).syn(),
            b,
            &new,
            "SYN on the same 5-tuple: fresh choice",
        );
        // The new connection's next packet finds the old entry on a draining backend and a
        // handshake recorded since: the handshake wins and takes the entry over.
        send(
            &lab,
            &flow(reused, &vip),
            b,
            &new,
            "the new connection's ACK: to b, where its SYN went",
        );
        assert_eq!(
            lab.explain(v4_client(reused), &vip).1,
            Some(b),
            "the entry is replaced"
        );
        send(
            &lab,
            &flow(reused, &vip),
            b,
            &hit,
            "the new connection stays on b",
        );

        // FINs both ways: closing. The last ACK still gets through; ten seconds on, the
        // entry is gone.
        let c = v4_client(both_fins);
        send(&lab, &flow(both_fins, &vip).fin(), a, &hit, "client FIN");
        reply(&lab, &Packet::tcp(a, c).fin(), &vip, "backend FIN");
        assert_eq!(live_on_a(&lab), Some(4), "a closing connection is not live");
        send(&lab, &flow(both_fins, &vip), a, &hit, "last ACK: still a");
        lab.age_flow(c, &vip, Duration::from_secs(9));
        send(
            &lab,
            &flow(both_fins, &vip),
            a,
            &refreshed,
            "9 s after: a retransmission still reaches a",
        );
        lab.age_flow(c, &vip, Duration::from_secs(11));
        assert_eq!(
            lab.explain(c, &vip).1,
            None,
            "explain: no tracked backend any more"
        );
        send(
            &lab,
            &flow(both_fins, &vip),
            b,
            &new,
            "11 s after closing: the entry is over",
        );

        // One FIN is a half-close: the other side may go on sending for as long as it likes.
        let c = v4_client(client_fin);
        send(
            &lab,
            &flow(client_fin, &vip).fin(),
            a,
            &hit,
            "client FIN alone",
        );
        lab.age_flow(c, &vip, Duration::from_secs(60));
        send(
            &lab,
            &flow(client_fin, &vip),
            a,
            &refreshed,
            "half-closed, 60 s on: still a",
        );

        // A reset from either side: closing at once.
        let c = v4_client(client_rst);
        send(&lab, &flow(client_rst, &vip).rst(), a, &hit, "client RST");
        lab.age_flow(c, &vip, Duration::from_secs(11));
        send(
            &lab,
            &flow(client_rst, &vip),
            b,
            &new,
            "11 s after the client's reset: over",
        );
        let c = v4_client(backend_rst);
        reply(&lab, &Packet::tcp(a, c).rst(), &vip, "backend RST");
        lab.age_flow(c, &vip, Duration::from_secs(11));
        send(
            &lab,
            &flow(backend_rst, &vip),
            b,
            &new,
            "11 s after the backend's reset: over",
        );

        // The backend's FIN reaches the entry through the reverse-NAT path too.
        let c = v4_client(via_shared);
        send(
            &lab,
            &flow(via_shared, &shared_vip).fin(),
            shared,
            &hit,
            "client FIN via shared",
        );
        reply(
            &lab,
            &Packet::tcp(shared, c).fin(),
            &shared_vip,
            "shared backend FIN",
        );
        lab.age_flow(c, &shared_vip, Duration::from_secs(11));
        send(
            &lab,
            &flow(via_shared, &shared_vip),
            d,
            &new,
            "shared: closed, then over",
        );

        // Idle timeouts: TCP's default (300 s), the UDP VIP's own (30 s).
        let c = v4_client(idle);
        lab.age_flow(c, &vip, Duration::from_secs(299));
        send(
            &lab,
            &flow(idle, &vip),
            a,
            &refreshed,
            "idle 299 s: still a",
        );
        lab.age_flow(c, &vip, Duration::from_secs(301));
        assert_eq!(live_on_a(&lab), Some(1), "idle past its timeout: not live");
        send(
            &lab,
            &flow(idle, &vip),
            b,
            &new,
            "idle 301 s: a fresh choice",
        );
        let c = v4_client(udp_port);
        lab.age_flow(c, &udp, Duration::from_secs(29));
        send(&lab, &datagram, ua, &refreshed, "UDP idle 29 s: still ua");
        lab.age_flow(c, &udp, Duration::from_secs(31));
        send(&lab, &datagram, ub, &new, "UDP idle 31 s: a fresh choice");
        // A timeout changed on the running VIP holds for its established flows too (their
        // packets read it from the backend's entry, not the VIP's).
        lab.set_idle_timeout(&udp, 60);
        lab.age_flow(c, &udp, Duration::from_secs(45));
        send(
            &lab,
            &datagram,
            ub,
            &refreshed,
            "UDP idle 45 s of 60: still ub",
        );
        lab.set_idle_timeout(&udp, 30);
        lab.age_flow(c, &udp, Duration::from_secs(31));
        send(
            &lab,
            &datagram,
            ub,
            &new,
            "UDP idle 31 s of 30 again: over, a fresh entry",
        );
        assert_eq!(
            live_on_a(&lab),
            Some(1),
            "only the half-closed connection is left"
        );
    });
}

/// With a resolvable next hop on an interface in the redirect map, the program forwards the
/// frame itself: `XDP_REDIRECT`, MACs set to (egress → next hop), TTL/hop limit decremented;
/// replies go back out of the client's leg to the MAC the client's packet came from.
#[test]
fn redirect_when_the_next_hop_resolves() {
    GoldenHost::two_legged("golden-redirect").run(|host| {
        let (lb_in, lb_out) = host.legs();
        let mut lab = Lab::new();
        let v4 = lab.add_vip("192.0.2.10:80/tcp");
        let v4u = lab.add_vip("192.0.2.10:53/udp");
        let v6 = lab.add_vip("[2001:db8:f::10]:443/tcp");
        let v6u = lab.add_vip("[2001:db8:f::10]:53/udp");
        let (b4, b4u) = (sa("198.51.100.1:8080"), sa("198.51.100.1:5353"));
        let (b6, b6u) = (sa("[2001:db8:b::1]:8443"), sa("[2001:db8:b::1]:5353"));
        lab.add_backend(&v4, b4, 1);
        lab.add_backend(&v4u, b4u, 1);
        lab.add_backend(&v6, b6, 1);
        lab.add_backend(&v6u, b6u, 1);

        // Before the backend leg is in the redirect map, a resolved next hop is not enough.
        let input = Packet::tcp(v4_client(1), v4.addr);
        lab.assert(
            &Case::rewritten(
                "egress not in the redirect map: rewritten, passed",
                &input,
                Action::Pass,
                &input.clone().dst(b4),
                &[ConntrackMiss, ViaStack],
            )
            .arriving_on(lb_in),
        );
        host.allow_egress_on_legs(&mut lab);

        let to_backend = |p: &Packet, to: SocketAddr| {
            p.clone()
                .dst(to)
                .decrement_ttl()
                .macs(EGRESS_MAC, BACKEND_MAC)
        };
        let mut cases = Vec::new();
        for (name, input, to) in [
            ("ipv4 tcp", Packet::tcp(v4_client(2), v4.addr), b4),
            ("ipv4 udp", Packet::udp(v4_client(3), v4u.addr), b4u),
            ("ipv6 tcp", Packet::tcp(v6_client(4), v6.addr), b6),
            ("ipv6 udp", Packet::udp(v6_client(5), v6u.addr), b6u),
            (
                "ipv4 udp checksum 0",
                Packet::udp(v4_client(6), v4u.addr).udp_zero_checksum(),
                b4u,
            ),
            (
                "ipv4 tcp with options",
                Packet::tcp(v4_client(7), v4.addr).ipv4_options(&[0x94, 0x04, 0, 0]),
                b4,
            ),
            (
                "ipv4 tcp ttl 2",
                Packet::tcp(v4_client(8), v4.addr).ttl(2),
                b4,
            ),
            (
                "ipv6 udp hop limit 2",
                Packet::udp(v6_client(9), v6u.addr).ttl(2),
                b6u,
            ),
            (
                "ipv4 tcp, empty payload",
                Packet::tcp(v4_client(10), v4.addr).payload(vec![]),
                b4,
            ),
        ] {
            let out = to_backend(&input, to);
            cases.push(
                Case::rewritten(
                    format!("{name}: redirected to {to}"),
                    &input,
                    Action::Redirect,
                    &out,
                    &[ConntrackMiss],
                )
                .arriving_on(lb_in),
            );
            cases.push(
                Case::rewritten(
                    format!("{name}, same flow: cached next hop"),
                    &input,
                    Action::Redirect,
                    &out,
                    &[ConntrackHit],
                )
                .arriving_on(lb_in),
            );
        }
        // Replies arrive on the backend leg and go back out of the client's leg, to the MAC
        // the client's packet came from, from the MAC it was sent to.
        for (name, reply, vip) in [
            ("ipv4 tcp", Packet::tcp(b4, v4_client(2)), v4.addr),
            ("ipv6 udp", Packet::udp(b6u, v6_client(5)), v6u.addr),
        ] {
            let reply = reply.macs(BACKEND_MAC, EGRESS_MAC);
            let out = reply
                .clone()
                .src(vip)
                .decrement_ttl()
                .macs(LB_MAC, CLIENT_MAC);
            cases.push(
                Case::rewritten(
                    format!("{name} reply: source becomes the vip, redirected to the client leg"),
                    &reply,
                    Action::Redirect,
                    &out,
                    &[ReverseNat],
                )
                .arriving_on(lb_out),
            );
            cases.push(
                Case::rewritten(
                    format!("{name} reply arriving on the client leg itself: sent back (tx)"),
                    &reply,
                    Action::Tx,
                    &out,
                    &[ReverseNat],
                )
                .arriving_on(lb_in),
            );
        }
        // Expiring TTL: left alone for the stack to answer time-exceeded.
        for (name, input) in [
            ("ipv4 tcp ttl 1", Packet::tcp(v4_client(20), v4.addr).ttl(1)),
            (
                "ipv6 tcp hop limit 1",
                Packet::tcp(v6_client(21), v6.addr).ttl(1),
            ),
            (
                "ipv4 udp ttl 0",
                Packet::udp(v4_client(22), v4u.addr).ttl(0),
            ),
        ] {
            cases.push(
                Case::unmodified(
                    format!("{name}: passed unmodified"),
                    input.bytes(),
                    Action::Pass,
                    &[ConntrackMiss, TtlExpired],
                )
                .arriving_on(lb_in),
            );
        }
        // A VLAN-tagged frame is still rewritten and handed to the stack; the reply has no
        // remembered next hop, so the FIB finds the client (a permanent neighbour here).
        let input = Packet::tcp(v4_client(30), v4.addr).vlan(7);
        cases.push(
            Case::rewritten(
                "vlan 7 ipv4 tcp: rewritten, passed, macs and ttl kept",
                &input,
                Action::Pass,
                &input.clone().dst(b4),
                &[ConntrackMiss, ViaStack],
            )
            .arriving_on(lb_in),
        );
        lab.assert_all(&cases);
        host.add_neighbour(Iface::ClientLeg, V4_CLIENT.parse().expect("ip"), CLIENT_MAC);
        let reply = Packet::tcp(b4, v4_client(30)).macs(BACKEND_MAC, EGRESS_MAC);
        lab.assert(
            &Case::rewritten(
                "reply to the vlan flow: next hop from the fib",
                &reply,
                Action::Redirect,
                &reply
                    .clone()
                    .src(v4.addr)
                    .decrement_ttl()
                    .macs(LB_MAC, CLIENT_MAC),
                &[ReverseNat],
            )
            .arriving_on(lb_out),
        );

        // A neighbour not resolved yet: the stack resolves it; the flow's next packet retries.
        let late = sa("198.51.100.50:8080");
        let vlate = lab.add_vip("192.0.2.50:80/tcp");
        lab.add_backend(&vlate, late, 1);
        let input = Packet::tcp(v4_client(40), vlate.addr);
        lab.assert(
            &Case::rewritten(
                "backend without a neighbour entry: rewritten, passed",
                &input,
                Action::Pass,
                &input.clone().dst(late),
                &[ConntrackMiss, NextHopFailure, ViaStack],
            )
            .arriving_on(lb_in),
        );
        host.add_neighbour(Iface::BackendLeg, late.ip(), BACKEND_MAC);
        lab.assert(
            &Case::rewritten(
                "same flow once the neighbour is known: redirected",
                &input,
                Action::Redirect,
                &to_backend(&input, late),
                &[ConntrackHit],
            )
            .arriving_on(lb_in),
        );

        // The redirected frames carry valid checksums as etherparse computes them (the harness
        // checks each; this documents it for one frame explicitly).
        let (_, out) = lab.run_on(&Packet::udp(v6_client(50), v6u.addr).bytes(), Some(lb_in));
        assert_checksums(&out);
    });
}

/// A reply whose client leg is not in the redirect map cannot be redirected there. The
/// forward direction hands such packets to the stack (rewritten); a reply should get the
/// same treatment, and at the least a reason counter.
///
/// Fails today: the reply is dropped (`xdp_drop` and `reverse_nat` move, nothing else), since
/// `reply_next_hop` caches the client's ingress without checking `XLB_EGRESS` and `emit`
/// turns the failed `bpf_redirect_map` into `XDP_DROP`.
#[test]
fn reply_to_a_client_leg_outside_the_redirect_map_is_not_dropped() {
    GoldenHost::two_legged("golden-reply-leg").run(|host| {
        let (lb_in, lb_out) = host.legs();
        let mut lab = Lab::new();
        let vip = lab.add_vip("192.0.2.10:80/tcp");
        let backend = sa("198.51.100.1:8080");
        lab.add_backend(&vip, backend, 1);
        lab.balancer
            .allow_egress(lb_out)
            .expect("backend leg in the devmap");
        let input = Packet::tcp(v4_client(1), vip.addr);
        lab.assert(
            &Case::rewritten(
                "client packet: redirected to the backend",
                &input,
                Action::Redirect,
                &input
                    .clone()
                    .dst(backend)
                    .decrement_ttl()
                    .macs(EGRESS_MAC, BACKEND_MAC),
                &[ConntrackMiss],
            )
            .arriving_on(lb_in),
        );
        let reply = Packet::tcp(backend, v4_client(1)).macs(BACKEND_MAC, EGRESS_MAC);
        lab.assert(
            &Case::rewritten(
                "reply, client leg not redirectable: rewritten, passed to the stack",
                &reply,
                Action::Pass,
                &reply.clone().src(vip.addr),
                &[ReverseNat, ViaStack],
            )
            .arriving_on(lb_out),
        );
    });
}

/// When the next hop is out of the interface the frame came in on, the program bounces it
/// back out itself: `XDP_TX`. Under test_run the ingress device is `lo`, so the backends are
/// routed out of `lo` here, with permanent neighbour entries there.
#[test]
fn tx_when_the_next_hop_is_behind_the_ingress_device() {
    let host = GoldenHost::new("golden-tx")
        .lo_up()
        .route("198.51.100.0/24", Iface::Lo, None)
        .route("2001:db8:b::/64", Iface::Lo, None)
        .neighbours(Iface::Lo, &["198.51.100.1", "2001:db8:b::1"], BACKEND_MAC);
    host.run(|host| {
        let lo_mac = host.mac(Iface::Lo);
        let mut lab = Lab::new();
        let v4 = lab.add_vip("192.0.2.10:80/tcp");
        let v6 = lab.add_vip("[2001:db8:f::10]:53/udp");
        let (b4, b6) = (sa("198.51.100.1:8080"), sa("[2001:db8:b::1]:5353"));
        lab.add_backend(&v4, b4, 1);
        lab.add_backend(&v6, b6, 1);

        // Forwarding off (a new namespace copies the host's setting, so set it): the FIB
        // lookup says so, and the stack gets the rewritten packet, MACs and TTL untouched.
        host.set_forwarding(false);
        let mut cases = Vec::new();
        for (name, input, to) in [
            ("ipv4 tcp", Packet::tcp(v4_client(100), v4.addr), b4),
            ("ipv6 udp", Packet::udp(v6_client(100), v6.addr), b6),
        ] {
            let out = input.clone().dst(to);
            cases.push(Case::rewritten(
                format!("{name}, forwarding disabled: rewritten, passed"),
                &input,
                Action::Pass,
                &out,
                &[ConntrackMiss, NextHopFailure, ViaStack],
            ));
        }
        lab.assert_all(&cases);

        host.set_forwarding(true);
        let mut cases = Vec::new();
        for (name, input, to) in [
            ("ipv4 tcp", Packet::tcp(v4_client(1), v4.addr), b4),
            ("ipv6 udp", Packet::udp(v6_client(2), v6.addr), b6),
        ] {
            let out = input
                .clone()
                .dst(to)
                .decrement_ttl()
                .macs(lo_mac, BACKEND_MAC);
            cases.push(Case::rewritten(
                format!("{name}: sent back out of the ingress device"),
                &input,
                Action::Tx,
                &out,
                &[ConntrackMiss],
            ));
            cases.push(Case::rewritten(
                format!("{name}, same flow"),
                &input,
                Action::Tx,
                &out,
                &[ConntrackHit],
            ));
        }
        lab.assert_all(&cases);
    });
}

/// The harness itself: a case whose expected bytes, action or counters are wrong is reported,
/// so a passing table means something.
#[test]
fn harness_reports_every_kind_of_mismatch() {
    GoldenHost::new("golden-harness").run(|_| {
        let mut lab = Lab::new();
        let vip = lab.add_vip("192.0.2.10:80/tcp");
        let backend = sa("198.51.100.1:8080");
        lab.add_backend(&vip, backend, 1);
        let input = Packet::tcp(v4_client(1), vip.addr);
        let right = input.clone().dst(backend);
        let counters = [ConntrackMiss, NextHopFailure, ViaStack];

        let wrong_ttl = Case::rewritten(
            "wrong ttl",
            &input,
            Action::Pass,
            &right.clone().ttl(63),
            &counters,
        );
        let err = lab.check(&wrong_ttl).expect_err("a wrong TTL is caught");
        assert!(
            err.contains("output differs (first at byte Some(22))"),
            "{err}"
        );

        let mut bad_checksum =
            Case::rewritten("bad checksum", &input, Action::Pass, &right, &counters);
        if let Expect::Frame(f) = &mut bad_checksum.output {
            f[24] ^= 0xff; // IPv4 header checksum
        }
        let err = lab
            .check(&bad_checksum)
            .expect_err("a wrong checksum is caught");
        assert!(
            err.contains("output differs (first at byte Some(24))"),
            "{err}"
        );

        let wrong_action = Case::rewritten(
            "wrong action",
            &input,
            Action::Tx,
            &right,
            &[ConntrackHit, NextHopFailure, ViaStack],
        );
        let err = lab
            .check(&wrong_action)
            .expect_err("a wrong action is caught");
        assert!(err.contains("action: got Some(Pass) (2), want Tx"), "{err}");

        let wrong_counters = Case::rewritten(
            "wrong counters",
            &input,
            Action::Pass,
            &right,
            &[ConntrackMiss, NextHopFailure, ViaStack],
        );
        let err = lab
            .check(&wrong_counters)
            .expect_err("wrong counters are caught");
        assert!(
            err.contains("counters: got [xdp_pass+1 conntrack_hit+1 next_hop_failure+1 via_stack+1], want [xdp_pass+1 conntrack_miss+1 next_hop_failure+1 via_stack+1]"),
            "{err}"
        );
        lab.assert(&Case::rewritten(
            "and the right expectation passes",
            &input,
            Action::Pass,
            &right,
            &[ConntrackHit, NextHopFailure, ViaStack],
        ));
    });
}
