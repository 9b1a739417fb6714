//! Golden packet tests for ICMP errors about balanced flows, in the style of `golden.rs`: the
//! compiled XDP program run by the kernel with `BPF_PROG_TEST_RUN` on etherparse-built
//! errors, checked against etherparse-built expectations byte for byte, with every checksum
//! of the output (the error's IPv4 header, its ICMP checksum, the quoted IPv4 header, and
//! the quoted TCP/UDP checksum where the quote holds the whole packet) recomputed by
//! etherparse, and the global counters each packet must move.
//!
//! Two directions:
//! - from the backend side (the backend, or a router behind xlb), about a packet client →
//!   backend that xlb forwarded: to the client, quoting client → VIP, from the VIP when
//!   the backend sent it;
//! - from the client side (the client, or a router in front of it), to the VIP, about a
//!   reply VIP → client: to the backend, quoting backend → client.

use std::net::{IpAddr, SocketAddr};

use lb_common::Counter::{
    self, ConntrackMiss, IcmpTranslated, NextHopFailure, NotTcpUdp, TtlExpired, ViaStack,
};
use lb_userspace::balancer::VipSpec;
use xlb_tests::{
    harness::{Action, Case, Expect, Lab},
    host::{BACKEND_MAC, EGRESS_MAC, GoldenHost},
    packet::{CLIENT_MAC, IcmpError, LB_MAC, Packet},
};

// Documentation ranges, as in golden.rs: VIPs 192.0.2.0/24 and 2001:db8:f::/64, backends
// 198.51.100.0/24 and 2001:db8:b::/64, clients 203.0.113.0/24 and 2001:db8:c::/64; the
// routers are .254 / ::fe of the backends' and the clients' networks.
const V4_CLIENT: &str = "203.0.113.7";
const V6_CLIENT: &str = "2001:db8:c::7";
const V4_BACKEND_ROUTER: &str = "198.51.100.254";
const V6_BACKEND_ROUTER: &str = "2001:db8:b::fe";
const V4_CLIENT_ROUTER: &str = "203.0.113.254";
const V6_CLIENT_ROUTER: &str = "2001:db8:c::fe";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn client(v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(ip(if v6 { V6_CLIENT } else { V4_CLIENT }), port)
}

/// An error the program must rewrite into `output`.
fn icmp_case(
    name: impl Into<String>,
    input: &IcmpError,
    action: Action,
    output: &IcmpError,
    counters: &[Counter],
) -> Case {
    Case {
        name: name.into(),
        input: input.bytes(),
        action,
        output: Expect::Frame(output.bytes()),
        counters: counters.to_vec(),
        ingress: None,
    }
}

/// The flow's first packet, client → VIP, through the program (for TCP after the SYN that
/// opens the connection): returns the backend it went to and the packet as xlb sent it on
/// (through the stack here: no route to the backends), as a router behind xlb receives it.
fn open_flow(lab: &Lab, input: &Packet, vip: &VipSpec, client: SocketAddr) -> (SocketAddr, Packet) {
    let backend = lab.new_flow_backend(client, vip);
    let forwarded = input.clone().dst(backend);
    if input.is_tcp() {
        lab.assert(&Case::rewritten(
            format!("flow {client} -> {}: SYN to {backend}", vip.addr),
            &input.clone().syn(),
            Action::Pass,
            &forwarded.clone().syn(),
            &[ConntrackMiss, NextHopFailure, ViaStack],
        ));
    }
    lab.assert(&Case::rewritten(
        format!("flow {client} -> {}: opened on {backend}", vip.addr),
        input,
        Action::Pass,
        &forwarded,
        &[ConntrackMiss, NextHopFailure, ViaStack],
    ));
    (backend, forwarded.decrement_ttl())
}

/// Without a route to the backends: errors to clients leave like replies (back out of the
/// client's ingress, here `lo`: `XDP_TX`), errors to backends go through the stack.
#[test]
fn icmp_errors_are_translated_both_ways() {
    GoldenHost::new("golden-icmp").forwarding().run(|_| {
        let mut lab = Lab::new();
        let v4_tcp = lab.add_vip("192.0.2.10:80/tcp");
        let v4_udp = lab.add_vip("192.0.2.10:53/udp");
        let v6_tcp = lab.add_vip("[2001:db8:f::10]:443/tcp");
        let v6_udp = lab.add_vip("[2001:db8:f::10]:53/udp");
        for i in 1..=2 {
            lab.add_backend(&v4_tcp, sa(&format!("198.51.100.{i}:8080")), 1);
            lab.add_backend(&v4_udp, sa(&format!("198.51.100.{i}:5353")), 1);
            lab.add_backend(&v6_tcp, sa(&format!("[2001:db8:b::{i}]:8443")), 1);
            lab.add_backend(&v6_udp, sa(&format!("[2001:db8:b::{i}]:5353")), 1);
        }
        let to_client = |e: &IcmpError| e.clone().decrement_ttl().macs(LB_MAC, CLIENT_MAC);
        let mut cases = Vec::new();

        // From the backend side, about client → backend.
        let c = client(false, 40_001);
        let (_, fwd) = open_flow(&lab, &Packet::tcp(c, v4_tcp.addr), &v4_tcp, c);
        let error =
            IcmpError::fragmentation_needed(ip(V4_BACKEND_ROUTER), c.ip(), 1400, fwd.clone())
                .macs(BACKEND_MAC, LB_MAC);
        cases.push(icmp_case(
            "ipv4 fragmentation needed from a router behind xlb: quotes the vip, router's source kept",
            &error,
            Action::Tx,
            &to_client(&error.clone().quoted(fwd.clone().dst(v4_tcp.addr))),
            &[IcmpTranslated],
        ));

        let c = client(false, 40_002);
        let (backend, fwd) = open_flow(&lab, &Packet::udp(c, v4_udp.addr), &v4_udp, c);
        let error = IcmpError::port_unreachable(backend.ip(), c.ip(), fwd.clone())
            .macs(BACKEND_MAC, LB_MAC);
        cases.push(icmp_case(
            "ipv4 port unreachable from the backend itself: from the vip, quoting the vip",
            &error,
            Action::Tx,
            &to_client(
                &error
                    .clone()
                    .src(v4_udp.addr.ip())
                    .quoted(fwd.dst(v4_udp.addr)),
            ),
            &[IcmpTranslated],
        ));

        let c = client(true, 40_003);
        let (_, fwd) = open_flow(&lab, &Packet::tcp(c, v6_tcp.addr), &v6_tcp, c);
        let error = IcmpError::packet_too_big(ip(V6_BACKEND_ROUTER), c.ip(), 1280, fwd.clone())
            .macs(BACKEND_MAC, LB_MAC);
        cases.push(icmp_case(
            "ipv6 packet too big from a router behind xlb: quotes the vip",
            &error,
            Action::Tx,
            &to_client(&error.clone().quoted(fwd.clone().dst(v6_tcp.addr))),
            &[IcmpTranslated],
        ));
        // Cut after the TCP checksum: the payload is gone, the checksum still updated.
        let cut = error.clone().quote_len(40 + 18);
        cases.push(icmp_case(
            "ipv6 packet too big quoting 18 bytes of tcp: checksum in the quote updated",
            &cut,
            Action::Tx,
            &to_client(&cut.clone().quoted(fwd.dst(v6_tcp.addr))),
            &[IcmpTranslated],
        ));

        let c = client(true, 40_004);
        let (backend, fwd) = open_flow(&lab, &Packet::udp(c, v6_udp.addr), &v6_udp, c);
        let error = IcmpError::port_unreachable(backend.ip(), c.ip(), fwd.clone())
            .macs(BACKEND_MAC, LB_MAC);
        cases.push(icmp_case(
            "ipv6 port unreachable from the backend itself: from the vip (pseudo-header changes)",
            &error,
            Action::Tx,
            &to_client(
                &error
                    .clone()
                    .src(v6_udp.addr.ip())
                    .quoted(fwd.dst(v6_udp.addr)),
            ),
            &[IcmpTranslated],
        ));

        // The shortest quote: IP header and 8 bytes, no TCP checksum.
        let c = client(false, 40_005);
        let (_, fwd) = open_flow(&lab, &Packet::tcp(c, v4_tcp.addr), &v4_tcp, c);
        let error =
            IcmpError::fragmentation_needed(ip(V4_BACKEND_ROUTER), c.ip(), 1400, fwd.clone())
                .quote_len(20 + 8)
                .macs(BACKEND_MAC, LB_MAC);
        cases.push(icmp_case(
            "ipv4 fragmentation needed quoting 8 bytes of tcp",
            &error,
            Action::Tx,
            &to_client(&error.clone().quoted(fwd.clone().dst(v4_tcp.addr))),
            &[IcmpTranslated],
        ));
        // An error whose TTL expires here is translated and left to the stack.
        let expiring = error.clone().quote_len(20 + 8).ttl(1);
        cases.push(icmp_case(
            "ipv4 error with ttl 1: translated, left to the stack",
            &expiring,
            Action::Pass,
            &expiring.clone().quoted(fwd.dst(v4_tcp.addr)),
            &[IcmpTranslated, TtlExpired],
        ));

        // UDP without a checksum: it stays without.
        let c = client(false, 40_006);
        let input = Packet::udp(c, v4_udp.addr).udp_zero_checksum();
        let (backend, fwd) = open_flow(&lab, &input, &v4_udp, c);
        let error = IcmpError::port_unreachable(backend.ip(), c.ip(), fwd.clone())
            .macs(BACKEND_MAC, LB_MAC);
        cases.push(icmp_case(
            "ipv4 port unreachable quoting udp with checksum 0: stays 0",
            &error,
            Action::Tx,
            &to_client(
                &error
                    .clone()
                    .src(v4_udp.addr.ip())
                    .quoted(fwd.dst(v4_udp.addr)),
            ),
            &[IcmpTranslated],
        ));

        // From the client side, to the VIP, about a reply VIP → client: to the flow's
        // backend, through the stack here (no route).
        for (name, v6, vip, tcp, from_router) in [
            (
                "ipv4 fragmentation needed from a router in front of the client",
                false,
                &v4_tcp,
                true,
                true,
            ),
            (
                "ipv4 port unreachable from the client itself",
                false,
                &v4_udp,
                false,
                false,
            ),
            (
                "ipv6 packet too big from a router in front of the client",
                true,
                &v6_tcp,
                true,
                true,
            ),
            (
                "ipv6 port unreachable from the client itself",
                true,
                &v6_udp,
                false,
                false,
            ),
        ] {
            let c = client(v6, if tcp { 41_000 } else { 41_001 });
            let input = if tcp {
                Packet::tcp(c, vip.addr)
            } else {
                Packet::udp(c, vip.addr)
            };
            let (backend, _) = open_flow(&lab, &input, vip, c);
            let reply = if tcp {
                Packet::tcp(vip.addr, c)
            } else {
                Packet::udp(vip.addr, c)
            }
            .payload(b"a reply too big".to_vec())
            .decrement_ttl();
            let source = match (from_router, v6) {
                (false, _) => c.ip(),
                (true, false) => ip(V4_CLIENT_ROUTER),
                (true, true) => ip(V6_CLIENT_ROUTER),
            };
            let error = match (tcp, v6) {
                (false, _) => IcmpError::port_unreachable(source, vip.addr.ip(), reply.clone()),
                (true, false) => {
                    IcmpError::fragmentation_needed(source, vip.addr.ip(), 1280, reply.clone())
                }
                (true, true) => {
                    IcmpError::packet_too_big(source, vip.addr.ip(), 1280, reply.clone())
                }
            };
            cases.push(icmp_case(
                format!("{name}: to {backend}, quoting {backend} -> client"),
                &error,
                Action::Pass,
                &error.clone().dst(backend.ip()).quoted(reply.src(backend)),
                // No route to the backends here: the error retries the backend's next hop,
                // fails, and goes to the stack translated.
                &[IcmpTranslated, NextHopFailure, ViaStack],
            ));
        }

        // Errors this is not for: passed untouched.
        let c = client(false, 40_001);
        let backend = lab.explain(c, &v4_tcp).1.expect("flow 40001 is tracked");
        let untouched = |name: &str, error: IcmpError| {
            Case::unmodified(name, error.bytes(), Action::Pass, &[NotTcpUdp])
        };
        let about = |from: SocketAddr, to: SocketAddr| Packet::tcp(from, to).decrement_ttl();
        cases.push(untouched(
            "quoting client -> backend of no flow (another client port)",
            IcmpError::fragmentation_needed(
                ip(V4_BACKEND_ROUTER),
                c.ip(),
                1400,
                about(client(false, 9), backend),
            ),
        ));
        let other_backend = (1..=2)
            .map(|i| sa(&format!("198.51.100.{i}:8080")))
            .find(|b| *b != backend)
            .expect("two backends");
        cases.push(untouched(
            "quoting the flow's client port towards another backend",
            IcmpError::fragmentation_needed(
                ip(V4_BACKEND_ROUTER),
                c.ip(),
                1400,
                about(c, other_backend),
            ),
        ));
        cases.push(untouched(
            "quoting vip -> client of no flow",
            IcmpError::packet_too_big(
                ip(V6_CLIENT_ROUTER),
                v6_tcp.addr.ip(),
                1280,
                about(v6_tcp.addr, client(true, 9)),
            ),
        ));
        cases.push(untouched(
            "quoting a known flow, cut one byte short of the ports",
            IcmpError::fragmentation_needed(ip(V4_BACKEND_ROUTER), c.ip(), 1400, about(c, backend))
                .quote_len(20 + 7),
        ));
        cases.push(untouched(
            "quoting a known flow, not addressed to the quoted source",
            IcmpError::fragmentation_needed(
                ip(V4_BACKEND_ROUTER),
                ip("203.0.113.99"),
                1400,
                about(c, backend),
            ),
        ));
        let not_an_error = IcmpError::new(
            ip(V4_BACKEND_ROUTER),
            c.ip(),
            5,
            1,
            [198, 51, 100, 1],
            about(c, backend),
        )
        .macs(BACKEND_MAC, LB_MAC);
        cases.push(untouched("a redirect quoting a known flow", not_an_error));
        lab.assert_all(&cases);
    });
}

/// A load balancer with a client leg (`xlb-in`) and a backend leg (`xlb-out`), as in
/// golden.rs: errors are forwarded by XDP itself, with the flow's cached next hops.
#[test]
fn icmp_errors_are_redirected_like_their_flows() {
    GoldenHost::two_legged("golden-icmp-redirect").run(|host| {
        let (lb_in, lb_out) = host.legs();
        let mut lab = Lab::new();
        host.allow_egress_on_legs(&mut lab);
        let v4 = lab.add_vip("192.0.2.10:80/tcp");
        let v6 = lab.add_vip("[2001:db8:f::10]:53/udp");
        let (b4, b6) = (sa("198.51.100.1:8080"), sa("[2001:db8:b::1]:5353"));
        lab.add_backend(&v4, b4, 1);
        lab.add_backend(&v6, b6, 1);

        let mut cases = Vec::new();
        for (name, input, vip, backend) in [
            ("ipv4 tcp", Packet::tcp(client(false, 1), v4.addr), &v4, b4),
            ("ipv6 udp", Packet::udp(client(true, 2), v6.addr), &v6, b6),
        ] {
            let c = client(vip.addr.is_ipv6(), if vip.addr.is_ipv6() { 2 } else { 1 });
            let forwarded = input.clone().dst(backend).decrement_ttl();
            lab.assert(
                &Case::rewritten(
                    format!("{name}: flow opened, redirected to {backend}"),
                    &input,
                    Action::Redirect,
                    &forwarded.clone().macs(EGRESS_MAC, BACKEND_MAC),
                    &[ConntrackMiss],
                )
                .arriving_on(lb_in),
            );
            // The backend's own error, arriving on the backend leg: to the client's leg.
            let error = if vip.addr.is_ipv6() {
                IcmpError::packet_too_big(backend.ip(), c.ip(), 1280, forwarded.clone())
            } else {
                IcmpError::fragmentation_needed(backend.ip(), c.ip(), 1400, forwarded.clone())
            }
            .macs(BACKEND_MAC, EGRESS_MAC);
            cases.push(
                icmp_case(
                    format!("{name}: the backend's error, redirected to the client leg"),
                    &error,
                    Action::Redirect,
                    &error
                        .clone()
                        .src(vip.addr.ip())
                        .quoted(forwarded.dst(vip.addr))
                        .decrement_ttl()
                        .macs(LB_MAC, CLIENT_MAC),
                    &[IcmpTranslated],
                )
                .arriving_on(lb_out),
            );
            // A client-side router's error about a reply, arriving on the client leg.
            let reply = if vip.addr.is_ipv6() {
                Packet::udp(vip.addr, c)
            } else {
                Packet::tcp(vip.addr, c)
            }
            .decrement_ttl();
            let router = ip(if vip.addr.is_ipv6() {
                V6_CLIENT_ROUTER
            } else {
                V4_CLIENT_ROUTER
            });
            let error = if vip.addr.is_ipv6() {
                IcmpError::packet_too_big(router, vip.addr.ip(), 1280, reply.clone())
            } else {
                IcmpError::fragmentation_needed(router, vip.addr.ip(), 1400, reply.clone())
            }
            .macs(CLIENT_MAC, LB_MAC);
            cases.push(
                icmp_case(
                    format!("{name}: a router's error about a reply, redirected to the backend"),
                    &error,
                    Action::Redirect,
                    &error
                        .clone()
                        .dst(backend.ip())
                        .quoted(reply.src(backend))
                        .decrement_ttl()
                        .macs(EGRESS_MAC, BACKEND_MAC),
                    &[IcmpTranslated],
                )
                .arriving_on(lb_in),
            );
        }
        lab.assert_all(&cases);
    });
}
