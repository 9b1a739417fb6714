//! Golden packets for direct server return: a client's packet to a tunnelled backend leaves
//! as the very same bytes inside an outer header (IPIP, IPv6 in IPv6, GUE over either),
//! addressed from the balancer's own address on the route to the backend; a packet too big
//! for the route once tunnelled comes back as ICMP from the VIP announcing the MTU that
//! fits. Outputs are taken apart with etherparse, not with xlb's own parser, at both hooks.
//!
//! Needs root (BPF_PROG_TEST_RUN, a fresh network namespace per test).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, Ipv6Header, UdpHeader,
    icmpv4::DestUnreachableHeader,
};
use lb_common::{
    Counter::{ConntrackHit, ConntrackMiss, TooBigForTunnel},
    FORWARD_GUE, FORWARD_IPIP,
};
use lb_userspace::balancer::{Forwarding, VipSpec};
use xlb_tests::{
    harness::{Action, Hook, Lab},
    host::{GoldenHost, Host, Iface, LegMacs},
    packet::{CLIENT_MAC, LB_MAC, Packet},
};

const EGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xe0];
const LEGS: LegMacs = LegMacs {
    client_peer: [0x02, 0, 0, 0, 0, 0xc1],
    backend_leg: EGRESS_MAC,
    backend_peer: [0x02, 0, 0, 0, 0, 0xe1],
};
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
/// The balancer's address on the backends' side: the outer source when none is configured.
const LB_OUT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const LB_OUT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0xfe);
/// Backends sit behind a router on the balancer's backend leg, as on another host.
const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1);
const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 5);
const BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 5);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A host with a client leg and a backend leg (MTU 1500), forwarding on, backends' networks
/// routed through a router whose MAC is known.
fn host(name: &str) -> GoldenHost {
    GoldenHost::new(name)
        .forwarding()
        .two_legs(LEGS)
        .neighbours(
            Iface::BackendLeg,
            &[&ROUTER_V4.to_string(), &ROUTER_V6.to_string()],
            ROUTER_MAC,
        )
        .route(
            "10.20.0.0/24",
            Iface::BackendLeg,
            Some(&ROUTER_V4.to_string()),
        )
        .route(
            "fd00:20::/64",
            Iface::BackendLeg,
            Some(&ROUTER_V6.to_string()),
        )
}

/// A VIP whose one backend, `backend` at the VIP's port, is reached by `forwarding`, set up
/// through the balancer as the agent does.
fn tunnelled_vip(lab: &mut Lab, vip: &str, backend: IpAddr, forwarding: u8) -> VipSpec {
    let vip: VipSpec = vip.parse().expect("VIP");
    let method = match forwarding {
        FORWARD_IPIP => Forwarding::Ipip,
        FORWARD_GUE => Forwarding::Gue,
        other => panic!("forwarding {other}"),
    };
    lab.balancer
        .add_vip_with(vip, None, method)
        .expect("a tunnelled VIP");
    lab.add_backend(&vip, SocketAddr::new(backend, vip.addr.port()), 1);
    vip
}

/// What a tunnelled frame must be: Ethernet to the router from the backend leg, the outer
/// header (and UDP for GUE) from the balancer to the backend, then `inner` byte for byte.
fn assert_tunnelled(name: &str, out: &[u8], inner: &[u8], forwarding: u8) -> u16 {
    assert_eq!(&out[..6], &ROUTER_MAC, "{name}: destination MAC");
    assert_eq!(&out[6..12], &EGRESS_MAC, "{name}: source MAC");
    let ethertype = u16::from_be_bytes([out[12], out[13]]);
    let l3 = &out[14..];
    let (payload, next, entropy) = match ethertype {
        0x0800 => {
            let (ip, rest) = Ipv4Header::from_slice(l3).expect("outer IPv4 header");
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "{name}: checksum"
            );
            assert_eq!(ip.source, LB_OUT_V4.octets(), "{name}: outer source");
            assert_eq!(
                ip.destination,
                BACKEND_V4.octets(),
                "{name}: outer destination"
            );
            assert_eq!(ip.time_to_live, 64, "{name}: outer TTL");
            assert!(ip.dont_fragment, "{name}: outer DF");
            assert_eq!(ip.total_len as usize, l3.len(), "{name}: outer length");
            (rest, ip.protocol, 0)
        }
        0x86dd => {
            let (ip, rest) = Ipv6Header::from_slice(l3).expect("outer IPv6 header");
            assert_eq!(ip.source, LB_OUT_V6.octets(), "{name}: outer source");
            assert_eq!(
                ip.destination,
                BACKEND_V6.octets(),
                "{name}: outer destination"
            );
            assert_eq!(ip.hop_limit, 64, "{name}: outer hop limit");
            assert_eq!(
                ip.payload_length as usize,
                rest.len(),
                "{name}: outer length"
            );
            assert_ne!(ip.flow_label.value(), 0, "{name}: flow label");
            (rest, ip.next_header, ip.flow_label.value())
        }
        other => panic!("{name}: ethertype {other:#06x}"),
    };
    let (inner_out, entropy) = if forwarding == FORWARD_GUE {
        assert_eq!(next, IpNumber::UDP, "{name}: outer protocol");
        let (udp, rest) = UdpHeader::from_slice(payload).expect("GUE UDP header");
        assert_eq!(udp.destination_port, 6080, "{name}: GUE port");
        assert!(udp.source_port >= 0xc000, "{name}: GUE source port");
        assert_eq!(udp.length as usize, payload.len(), "{name}: UDP length");
        assert_eq!(udp.checksum, 0, "{name}: UDP checksum");
        (rest, udp.source_port)
    } else {
        let expected = if ethertype == 0x0800 {
            IpNumber::IPV4
        } else {
            IpNumber::IPV6
        };
        assert_eq!(next, expected, "{name}: outer protocol");
        (payload, entropy as u16)
    };
    assert_eq!(inner_out, inner, "{name}: the client's packet, untouched");
    entropy
}

/// Both hooks, each family, IPIP and GUE, TCP and UDP: the first packet of a flow and a
/// later one leave through the tunnel, identical apart from nothing.
#[test]
fn client_packets_leave_inside_the_tunnel_untouched() {
    host("golden-dsr-encap").run(|host| {
        let (lb_in, _) = host.legs();
        let mut lab = Lab::new();
        lab.load_tc();
        host.allow_egress_on_legs(&mut lab);
        let cases = [
            ("ipip v4 tcp", "192.0.2.10:80/tcp", FORWARD_IPIP, true),
            ("ipip v4 udp", "192.0.2.10:53/udp", FORWARD_IPIP, true),
            ("gue v4 tcp", "192.0.2.11:80/tcp", FORWARD_GUE, true),
            ("gue v4 udp", "192.0.2.11:53/udp", FORWARD_GUE, true),
            (
                "ipip v6 tcp",
                "[2001:db8:f::10]:443/tcp",
                FORWARD_IPIP,
                false,
            ),
            (
                "ipip v6 udp",
                "[2001:db8:f::10]:53/udp",
                FORWARD_IPIP,
                false,
            ),
            ("gue v6 tcp", "[2001:db8:f::11]:443/tcp", FORWARD_GUE, false),
            ("gue v6 udp", "[2001:db8:f::11]:53/udp", FORWARD_GUE, false),
        ];
        for (i, (name, vip, forwarding, v4)) in cases.into_iter().enumerate() {
            let backend = if v4 {
                IpAddr::V4(BACKEND_V4)
            } else {
                IpAddr::V6(BACKEND_V6)
            };
            let vip = tunnelled_vip(&mut lab, vip, backend, forwarding);
            let client = if v4 {
                sa(&format!("203.0.113.7:{}", 40_000 + i))
            } else {
                sa(&format!("[2001:db8:c::7]:{}", 40_000 + i))
            };
            let input = if vip.proto.number() == 6 {
                Packet::tcp(client, vip.addr).tcp_ack_flag()
            } else {
                Packet::udp(client, vip.addr)
            };
            let frame = input.bytes();
            let inner = &frame[14..];

            let before = lab.counters();
            let (action, out) = lab.run_on(&frame, Some(lb_in));
            assert_eq!(action, Action::Redirect as u32, "{name}: XDP action");
            let first = assert_tunnelled(&format!("{name} (xdp, new)"), &out, inner, forwarding);
            let after = lab.counters();
            assert_eq!(
                after[ConntrackMiss as usize] - before[ConntrackMiss as usize],
                1,
                "{name}: a new flow"
            );

            let (action, out) = lab.run_on(&frame, Some(lb_in));
            assert_eq!(action, Action::Redirect as u32, "{name}: XDP action, again");
            let again = assert_tunnelled(&format!("{name} (xdp, known)"), &out, inner, forwarding);
            assert_eq!(first, again, "{name}: a flow keeps its entropy");
            assert_eq!(
                lab.counters()[ConntrackHit as usize] - after[ConntrackHit as usize],
                1,
                "{name}: the flow's entry decided"
            );

            let (action, out) = lab
                .run_tc_on(&frame, lb_in)
                .unwrap_or_else(|| panic!("{name}: TC took the frame"));
            assert_eq!(action, Action::Redirect as u32, "{name}: TC verdict");
            let tc = assert_tunnelled(&format!("{name} (tc)"), &out, inner, forwarding);
            assert_eq!(first, tc, "{name}: both hooks give a flow the same entropy");
        }
    });
}

/// What a "too big" to the client must be: from the client leg's MAC to the client's, from
/// the VIP to the client, "fragmentation needed" (IPv4) or "packet too big" (IPv6)
/// announcing `mtu`, quoting the first 28 (48) bytes of `client_packet`'s IP packet, with
/// valid checksums.
fn assert_too_big(what: &str, out: &[u8], client_packet: &[u8], ipv6: bool, mtu: u16) {
    assert_eq!(&out[..6], &CLIENT_MAC, "{what}: to the client's MAC");
    assert_eq!(&out[6..12], &LB_MAC, "{what}: from the client leg's MAC");
    let quoted = &client_packet[14..];
    if ipv6 {
        let (ip, rest) = Ipv6Header::from_slice(&out[14..]).expect("IPv6 error");
        assert_eq!(ip.source, quoted[24..40], "{what}: from the VIP");
        assert_eq!(ip.destination, quoted[8..24], "{what}: to the client");
        assert_eq!(ip.next_header, IpNumber::IPV6_ICMP, "{what}");
        assert_eq!(ip.payload_length as usize, rest.len(), "{what}: length");
        let (icmp, quote) = etherparse::Icmpv6Header::from_slice(rest).expect("ICMPv6 header");
        assert_eq!(
            icmp.icmp_type,
            Icmpv6Type::PacketTooBig {
                mtu: u32::from(mtu)
            },
            "{what}"
        );
        assert_eq!(quote, &quoted[..48], "{what}: quotes IPv6 header + 8 bytes");
        assert_eq!(
            icmp.checksum,
            icmp.icmp_type
                .calc_checksum(ip.source, ip.destination, quote)
                .expect("checksum"),
            "{what}: ICMPv6 checksum"
        );
    } else {
        let (ip, rest) = Ipv4Header::from_slice(&out[14..]).expect("IPv4 error");
        assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{what}");
        assert_eq!(ip.source, quoted[16..20], "{what}: from the VIP");
        assert_eq!(ip.destination, quoted[12..16], "{what}: to the client");
        assert_eq!(ip.protocol, IpNumber::ICMP, "{what}");
        let (icmp, quote) = etherparse::Icmpv4Header::from_slice(rest).expect("ICMPv4 header");
        assert_eq!(
            icmp.icmp_type,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: mtu
            }),
            "{what}"
        );
        assert_eq!(quote, &quoted[..28], "{what}: quotes IP header + 8 bytes");
        assert_eq!(
            icmp.checksum,
            icmp.icmp_type.calc_checksum(quote),
            "{what}: ICMP checksum"
        );
    }
}

/// Both hooks loaded, both legs in the devmap, and two tunnelled VIPs: IPv4 over IPIP and
/// IPv6 over GUE.
fn lab_with_two_tunnels(host: &Host<'_>) -> (Lab, u32, u32, VipSpec, VipSpec) {
    let (lb_in, lb_out) = host.legs();
    let mut lab = Lab::new();
    lab.load_tc();
    host.allow_egress_on_legs(&mut lab);
    let v4 = tunnelled_vip(
        &mut lab,
        "192.0.2.10:80/tcp",
        IpAddr::V4(BACKEND_V4),
        FORWARD_IPIP,
    );
    let v6 = tunnelled_vip(
        &mut lab,
        "[2001:db8:f::10]:443/tcp",
        IpAddr::V6(BACKEND_V6),
        FORWARD_GUE,
    );
    (lab, lb_in, lb_out, v4, v6)
}

/// A packet that fits the link but not the tunnel on it: the client gets "fragmentation
/// needed" / "packet too big" from the VIP, with the MTU that leaves room for the tunnel,
/// quoting its own packet's header; nothing goes to the backend.
#[test]
fn packets_too_big_for_the_tunnel_are_answered_with_icmp() {
    host("golden-dsr-too-big").run(|host| {
        let (lab, lb_in, _, v4, v6) = lab_with_two_tunnels(host);
        // 1500 bytes of IP: fits the 1500-byte link, not with 20 (or 48) bytes in front.
        let big4 = Packet::tcp(sa("203.0.113.7:41000"), v4.addr)
            .tcp_ack_flag()
            .payload(vec![0x5a; 1500 - 20 - 20]);
        let big6 = Packet::tcp(sa("[2001:db8:c::7]:41001"), v6.addr)
            .tcp_ack_flag()
            .payload(vec![0xa5; 1500 - 40 - 20]);
        // Just small enough: 1480 bytes of IPv4 inside 20 of IPIP.
        let fits4 = Packet::tcp(sa("203.0.113.7:41002"), v4.addr)
            .tcp_ack_flag()
            .payload(vec![0x5a; 1480 - 20 - 20]);

        // (case, packet, what must come of it: the MTU announced back to the client, or
        // `None`: the tunnelled packet).
        let table = [
            ("ipv4, MTU 1500 - 20", &big4, Some(1480)),
            ("ipv6, MTU 1500 - 48", &big6, Some(1452)),
            ("ipv4 that fits", &fits4, None),
        ];
        for hook in [Hook::Xdp, Hook::Tc] {
            for (what, packet, announced) in table {
                let name = format!("{hook:?} {what}");
                let frame = packet.bytes();
                let before = lab.counters()[TooBigForTunnel as usize];
                let (action, out) = run(&lab, hook, &frame, lb_in);
                let too_big = lab.counters()[TooBigForTunnel as usize] - before;
                if let Some(mtu) = announced {
                    // XDP bounces the error out of the ingress device; TC redirects it there.
                    let sent_back = match hook {
                        Hook::Xdp => Action::Tx,
                        Hook::Tc => Action::Redirect,
                    };
                    assert_eq!(action, sent_back as u32, "{name}: error sent back");
                    assert_too_big(&name, &out, &frame, frame[12..14] == [0x86, 0xdd], mtu);
                    assert_eq!(too_big, 1, "{name}: counted as too big for the tunnel");
                } else {
                    assert_eq!(
                        action,
                        Action::Redirect as u32,
                        "{name}: a packet that fits"
                    );
                    assert_tunnelled(&name, &out, &frame[14..], FORWARD_IPIP);
                    assert_eq!(too_big, 0, "{name}: not counted as too big");
                }
            }
        }
    });
}

/// Every frame here is one the kernel makes a socket buffer of.
fn run(lab: &Lab, hook: Hook, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
    lab.run_at(hook, frame, ingress)
        .unwrap_or_else(|| panic!("{hook:?} took no {}-byte frame", frame.len()))
}

/// The client's packet inside xlb's tunnel, as a router between the balancer and the
/// backend quotes it in a too-big error to the balancer, in a frame from that router.
fn path_error(inner: &[u8], ipv6: bool, gue: bool, mtu: u16) -> Vec<u8> {
    use lb_common::{
        csum::{checksum, pseudo_header_sum},
        encap::{gue_udp_header, ipv4_header, ipv6_header},
    };
    let mut tunnel_payload = Vec::new();
    if gue {
        tunnel_payload.extend_from_slice(&gue_udp_header(
            0xc001,
            6080u16.to_be(),
            inner.len() as u16,
        ));
    }
    tunnel_payload.extend_from_slice(inner);
    let mut frame: Vec<u8> = EGRESS_MAC.iter().chain(&ROUTER_MAC).copied().collect();
    if ipv6 {
        let next = if gue { 17 } else { 41 };
        let mut tunnel = ipv6_header(
            &LB_OUT_V6.octets(),
            &BACKEND_V6.octets(),
            next,
            0,
            1,
            tunnel_payload.len() as u16,
        )
        .to_vec();
        tunnel.extend_from_slice(&tunnel_payload);
        let mut icmp = vec![2, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&mtu.to_be_bytes());
        icmp.extend_from_slice(&tunnel);
        let sum = pseudo_header_sum(
            &ROUTER_V6.octets(),
            &LB_OUT_V6.octets(),
            58,
            icmp.len() as u32,
        );
        let c = checksum(sum, &icmp).to_be_bytes();
        icmp[2..4].copy_from_slice(&c);
        frame.extend_from_slice(&0x86ddu16.to_be_bytes());
        frame.extend_from_slice(&ipv6_header(
            &ROUTER_V6.octets(),
            &LB_OUT_V6.octets(),
            58,
            0,
            0,
            icmp.len() as u16,
        ));
        frame.extend_from_slice(&icmp);
    } else {
        let next = if gue { 17 } else { 4 };
        let mut tunnel = ipv4_header(
            LB_OUT_V4.octets(),
            BACKEND_V4.octets(),
            next,
            0,
            tunnel_payload.len() as u16,
            true,
        )
        .to_vec();
        tunnel.extend_from_slice(&tunnel_payload);
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&mtu.to_be_bytes());
        icmp.extend_from_slice(&tunnel);
        let c = checksum(0, &icmp).to_be_bytes();
        icmp[2..4].copy_from_slice(&c);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ipv4_header(
            ROUTER_V4.octets(),
            LB_OUT_V4.octets(),
            1,
            0,
            icmp.len() as u16,
            false,
        ));
        frame.extend_from_slice(&icmp);
    }
    frame
}

/// A router between the balancer and a backend says a tunnelled packet was too big: the
/// client hears it from the VIP about its own packet, with the MTU less the tunnel, out of
/// the interface its flow came in on, towards the MAC it came from. An error quoting a
/// flow xlb does not know is left to the stack.
#[test]
fn too_big_errors_from_the_tunnel_path_reach_the_client() {
    host("golden-dsr-path").run(|host| {
        let (lab, lb_in, lb_out, v4, v6) = lab_with_two_tunnels(host);
        for (name, vip, client, gue, ipv6, router_mtu, announced) in [
            (
                "ipip v4",
                v4,
                sa("203.0.113.7:42000"),
                false,
                false,
                1400u16,
                1380u16,
            ),
            (
                "gue v6",
                v6,
                sa("[2001:db8:c::7]:42001"),
                true,
                true,
                1400,
                1352,
            ),
        ] {
            let input = Packet::tcp(client, vip.addr)
                .tcp_ack_flag()
                .payload(vec![7; 1300]);
            let frame = input.bytes();
            // The flow exists: its first packet went through the tunnel.
            let (action, _) = lab.run_on(&frame, Some(lb_in));
            assert_eq!(action, Action::Redirect as u32, "{name}: the flow's packet");
            let error = path_error(&frame[14..], ipv6, gue, router_mtu);
            for hook in [Hook::Xdp, Hook::Tc] {
                let (action, out) = run(&lab, hook, &error, lb_out);
                assert_eq!(
                    action,
                    Action::Redirect as u32,
                    "{name} {hook:?}: out of the client leg"
                );
                assert_too_big(&format!("{name} {hook:?}"), &out, &frame, ipv6, announced);
            }
            // Another client's flow, never seen: the error is not xlb's to translate.
            let stranger = Packet::tcp(
                sa(if ipv6 {
                    "[2001:db8:c::8]:42009"
                } else {
                    "203.0.113.8:42009"
                }),
                vip.addr,
            )
            .tcp_ack_flag();
            let error = path_error(&stranger.bytes()[14..], ipv6, gue, router_mtu);
            let (action, out) = lab.run_on(&error, Some(lb_out));
            assert_eq!(
                (action, out),
                (Action::Pass as u32, error),
                "{name}: unknown flow passed untouched"
            );
        }
    });
}
