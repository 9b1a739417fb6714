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

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use lb_common::Counter::{
    ConntrackMiss, IcmpTranslated, NextHopFailure, NotTcpUdp, TtlExpired, ViaStack,
};
use lb_userspace::balancer::VipSpec;
use xlb_tests::{
    harness::{Action, Case, Lab},
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

/// A packet from `client` to `vip`, TCP or UDP as the VIP is.
fn packet_to(vip: &VipSpec, client: SocketAddr) -> Packet {
    if vip.proto.number() == 6 {
        Packet::tcp(client, vip.addr)
    } else {
        Packet::udp(client, vip.addr)
    }
}

/// A row of the backend-side table: an error about the packet client → backend that xlb
/// forwarded for the flow `client` → `vip`. It comes from a router behind xlb
/// (fragmentation needed, MTU 1400 / packet too big, MTU 1280) unless `from_the_backend`
/// (port unreachable), quoting the whole packet unless `quote_len` says how many bytes of
/// its IP packet.
struct BackendSide<'a> {
    name: &'a str,
    client: SocketAddr,
    vip: &'a VipSpec,
    /// How the flow's packet differs from `packet_to`'s.
    flow: fn(Packet) -> Packet,
    from_the_backend: bool,
    quote_len: Option<usize>,
    /// TTL 1: translated, then left to the stack, which answers time-exceeded.
    expiring: bool,
}

impl<'a> BackendSide<'a> {
    fn new(name: &'a str, client: SocketAddr, vip: &'a VipSpec) -> Self {
        Self {
            name,
            client,
            vip,
            flow: |packet| packet,
            from_the_backend: false,
            quote_len: None,
            expiring: false,
        }
    }

    const fn sent_by_the_backend(mut self) -> Self {
        self.from_the_backend = true;
        self
    }

    const fn quoting(mut self, len: usize) -> Self {
        self.quote_len = Some(len);
        self
    }

    const fn expiring(mut self) -> Self {
        self.expiring = true;
        self
    }

    const fn flow(mut self, flow: fn(Packet) -> Packet) -> Self {
        self.flow = flow;
        self
    }
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

        // From the backend side, about client → backend. Rows about one client share its
        // flow, opened by the first of them.
        let from_backend_side = [
            BackendSide::new(
                "ipv4 fragmentation needed from a router behind xlb: quotes the vip, router's source kept",
                client(false, 40_001),
                &v4_tcp,
            ),
            BackendSide::new(
                "ipv4 port unreachable from the backend itself: from the vip, quoting the vip",
                client(false, 40_002),
                &v4_udp,
            )
            .sent_by_the_backend(),
            BackendSide::new(
                "ipv6 packet too big from a router behind xlb: quotes the vip",
                client(true, 40_003),
                &v6_tcp,
            ),
            // Cut after the TCP checksum: the payload is gone, the checksum still updated.
            BackendSide::new(
                "ipv6 packet too big quoting 18 bytes of tcp: checksum in the quote updated",
                client(true, 40_003),
                &v6_tcp,
            )
            .quoting(40 + 18),
            BackendSide::new(
                "ipv6 port unreachable from the backend itself: from the vip (pseudo-header changes)",
                client(true, 40_004),
                &v6_udp,
            )
            .sent_by_the_backend(),
            // The shortest quote: IP header and 8 bytes, no TCP checksum.
            BackendSide::new(
                "ipv4 fragmentation needed quoting 8 bytes of tcp",
                client(false, 40_005),
                &v4_tcp,
            )
            .quoting(20 + 8),
            // An error whose TTL expires here is translated and left to the stack.
            BackendSide::new(
                "ipv4 error with ttl 1: translated, left to the stack",
                client(false, 40_005),
                &v4_tcp,
            )
            .quoting(20 + 8)
            .expiring(),
            // UDP without a checksum: it stays without.
            BackendSide::new(
                "ipv4 port unreachable quoting udp with checksum 0: stays 0",
                client(false, 40_006),
                &v4_udp,
            )
            .sent_by_the_backend()
            .flow(Packet::udp_zero_checksum),
        ];
        let mut flows = HashMap::new();
        for row in &from_backend_side {
            let c = row.client;
            let (backend, fwd) = flows
                .entry(c)
                .or_insert_with(|| open_flow(&lab, &(row.flow)(packet_to(row.vip, c)), row.vip, c))
                .clone();
            let error = match (row.from_the_backend, c.is_ipv6()) {
                (true, _) => IcmpError::port_unreachable(backend.ip(), c.ip(), fwd.clone()),
                (false, false) => {
                    IcmpError::fragmentation_needed(ip(V4_BACKEND_ROUTER), c.ip(), 1400, fwd.clone())
                }
                (false, true) => {
                    IcmpError::packet_too_big(ip(V6_BACKEND_ROUTER), c.ip(), 1280, fwd.clone())
                }
            };
            let error = match row.quote_len {
                Some(len) => error.quote_len(len),
                None => error,
            }
            .macs(BACKEND_MAC, LB_MAC);
            let error = if row.expiring { error.ttl(1) } else { error };
            let mut translated = error.clone().quoted(fwd.dst(row.vip.addr));
            if row.from_the_backend {
                translated = translated.src(row.vip.addr.ip());
            }
            cases.push(if row.expiring {
                Case::rewritten(
                    row.name,
                    &error,
                    Action::Pass,
                    &translated,
                    &[IcmpTranslated, TtlExpired],
                )
            } else {
                Case::rewritten(
                    row.name,
                    &error,
                    Action::Tx,
                    &to_client(&translated),
                    &[IcmpTranslated],
                )
            });
        }

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
            cases.push(Case::rewritten(
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
        let about = |from: SocketAddr, to: SocketAddr| Packet::tcp(from, to).decrement_ttl();
        let other_backend = (1..=2)
            .map(|i| sa(&format!("198.51.100.{i}:8080")))
            .find(|b| *b != backend)
            .expect("two backends");
        let frag_needed = |to: IpAddr, quoted: Packet| {
            IcmpError::fragmentation_needed(ip(V4_BACKEND_ROUTER), to, 1400, quoted)
        };
        for (name, error) in [
            (
                "quoting client -> backend of no flow (another client port)",
                frag_needed(c.ip(), about(client(false, 9), backend)),
            ),
            (
                "quoting the flow's client port towards another backend",
                frag_needed(c.ip(), about(c, other_backend)),
            ),
            (
                "quoting vip -> client of no flow",
                IcmpError::packet_too_big(
                    ip(V6_CLIENT_ROUTER),
                    v6_tcp.addr.ip(),
                    1280,
                    about(v6_tcp.addr, client(true, 9)),
                ),
            ),
            (
                "quoting a known flow, cut one byte short of the ports",
                frag_needed(c.ip(), about(c, backend)).quote_len(20 + 7),
            ),
            (
                "quoting a known flow, not addressed to the quoted source",
                frag_needed(ip("203.0.113.99"), about(c, backend)),
            ),
            (
                "a redirect quoting a known flow",
                IcmpError::new(
                    ip(V4_BACKEND_ROUTER),
                    c.ip(),
                    5,
                    1,
                    [198, 51, 100, 1],
                    about(c, backend),
                )
                .macs(BACKEND_MAC, LB_MAC),
            ),
        ] {
            cases.push(Case::unmodified(
                name,
                error.bytes(),
                Action::Pass,
                &[NotTcpUdp],
            ));
        }
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
                Case::rewritten(
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
                Case::rewritten(
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
