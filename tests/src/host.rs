//! The host a golden test runs on, described once and built the same way for every test.
//!
//! `BPF_PROG_TEST_RUN` runs an XDP program as if the frame arrived on the loopback device of
//! the caller's network namespace (or, with `ingress_ifindex`, on an interface of it), and
//! `bpf_fib_lookup` consults that namespace's routes and neighbours. Each test therefore runs
//! on a thread of its own in a namespace of its own (`xlb_netns::in_fresh_netns`): the
//! routes it sees are exactly the ones its [`GoldenHost`] describes, tests cannot disturb
//! each other or the host, and the namespace (with its interfaces) is gone when the thread
//! ends.

use std::{net::IpAddr, time::Duration};

use xlb_netns::{Netns, in_fresh_netns, ipnet::IpNet};

use crate::{
    harness::{Lab, chain},
    packet::LB_MAC,
};

/// Upper bound for one test, namespace set-up and program load included (a load takes well
/// under a second; the rest is a few hundred test runs).
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(120);

/// An interface of the golden host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iface {
    /// Where test_run feeds frames in when no ingress interface is given.
    Lo,
    /// `xlb-in`: clients arrive here; its MAC is `LB_MAC`, the fixtures' destination.
    ClientLeg,
    /// `xlb-out`: backends (or the router to them) sit behind it.
    BackendLeg,
}

impl Iface {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Lo => "lo",
            Self::ClientLeg => "xlb-in",
            Self::BackendLeg => "xlb-out",
        }
    }

    /// The other end of a leg's veth pair, left in the same namespace and up so the leg is
    /// up.
    const fn peer_name(self) -> &'static str {
        match self {
            Self::Lo => "lo",
            Self::ClientLeg => "xlb-in-peer",
            Self::BackendLeg => "xlb-out-peer",
        }
    }
}

/// The MAC addresses of the two legs' veth pairs that tests name in their frames; the client
/// leg's own is always `LB_MAC`.
#[derive(Clone, Copy, Debug)]
pub struct LegMacs {
    pub client_peer: [u8; 6],
    pub backend_leg: [u8; 6],
    pub backend_peer: [u8; 6],
}

/// The backend leg's MAC in the golden tests' two-legged hosts.
pub const EGRESS_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0xee, 0x01];
/// Where the two-legged hosts' backends are.
pub const BACKEND_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0xbb, 0x01];
/// The legs of [`GoldenHost::two_legged`].
pub const LEGS: LegMacs = LegMacs {
    client_peer: [0x02, 0x00, 0x00, 0x00, 0xcc, 0x02],
    backend_leg: EGRESS_MAC,
    backend_peer: [0x02, 0x00, 0x00, 0x00, 0xee, 0x02],
};

/// The legs' own addresses: the clients' and the backends' networks' `.254` / `::fe`.
const CLIENT_LEG_ADDRS: [&str; 2] = ["203.0.113.254/24", "2001:db8:c::fe/64"];
const BACKEND_LEG_ADDRS: [&str; 2] = ["198.51.100.254/24", "2001:db8:b::fe/64"];

/// What a golden test's namespace holds, applied in this order when the test starts: `lo` up
/// and forwarding on or off, the two legs, permanent neighbours, routes.
#[derive(Clone, Debug)]
#[must_use]
pub struct GoldenHost {
    name: String,
    limit: Duration,
    lo_up: bool,
    forwarding: Option<bool>,
    legs: Option<LegMacs>,
    neighbours: Vec<(Iface, IpAddr, [u8; 6])>,
    routes: Vec<(IpNet, Iface, Option<IpAddr>)>,
}

impl GoldenHost {
    /// A namespace as the kernel makes it (only `lo`, down), for a test that must finish
    /// within [`DEFAULT_LIMIT`]. `name` names the thread, so it shows in a failure.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            limit: DEFAULT_LIMIT,
            lo_up: false,
            forwarding: None,
            legs: None,
            neighbours: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// The load balancer most golden tests forward through: forwarding on, [`LEGS`], and the
    /// first backend of each family (198.51.100.1, 2001:db8:b::1) resolved to `BACKEND_MAC`
    /// behind the backend leg.
    pub fn two_legged(name: &str) -> Self {
        Self::new(name).forwarding().two_legs(LEGS).neighbours(
            Iface::BackendLeg,
            &["198.51.100.1", "2001:db8:b::1"],
            BACKEND_MAC,
        )
    }

    pub const fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    pub const fn lo_up(mut self) -> Self {
        self.lo_up = true;
        self
    }

    /// `lo` up and forwarding on, as on a load balancer host: `bpf_fib_lookup` answers
    /// "forwarding disabled" otherwise, and then nothing but the absence of a route is being
    /// tested.
    pub const fn forwarding(mut self) -> Self {
        self.lo_up = true;
        self.forwarding = Some(true);
        self
    }

    /// A load balancer with two legs, as a real one has: `xlb-in` towards the clients
    /// (203.0.113.254/24, 2001:db8:c::fe/64), `xlb-out` towards the backends
    /// (198.51.100.254/24, 2001:db8:b::fe/64), each a veth whose peer stays here.
    pub const fn two_legs(mut self, macs: LegMacs) -> Self {
        self.legs = Some(macs);
        self
    }

    /// A permanent neighbour entry: `ip` is at `mac` behind `iface`, no resolution needed.
    ///
    /// # Panics
    /// `ip` is no address.
    pub fn neighbour(mut self, iface: Iface, ip: &str, mac: [u8; 6]) -> Self {
        self.neighbours.push((iface, parse(ip), mac));
        self
    }

    /// The same neighbour entry for each of `ips`.
    ///
    /// # Panics
    /// One of `ips` is no address.
    pub fn neighbours(self, iface: Iface, ips: &[&str], mac: [u8; 6]) -> Self {
        ips.iter()
            .fold(self, |host, ip| host.neighbour(iface, ip, mac))
    }

    /// A route to `dest` (`address/length`) out of `iface`, through `via` or (`None`) straight
    /// to the neighbours on that link.
    ///
    /// # Panics
    /// `dest` or `via` do not parse.
    pub fn route(mut self, dest: &str, iface: Iface, via: Option<&str>) -> Self {
        let net = dest
            .parse()
            .unwrap_or_else(|e| panic!("route destination {dest}: {e}"));
        self.routes.push((net, iface, via.map(parse)));
        self
    }

    /// Builds the host on a fresh namespace's thread and runs `f` there.
    ///
    /// # Panics
    /// Not root, a netlink or sysctl operation failing, `f` panicking, or the limit passing.
    pub fn run<T, F>(self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&Host<'_>) -> T + Send + 'static,
    {
        let name = self.name.clone();
        in_fresh_netns(&name, self.limit, move |ns| {
            let host = Host { ns };
            self.build(&host);
            f(&host)
        })
        .unwrap_or_else(|e| {
            let hint = if matches!(e, xlb_netns::Error::Sys { .. }) {
                " (the golden tests run as root)"
            } else {
                ""
            };
            panic!("golden host {name}{hint}: {}", chain(&e))
        })
    }

    fn build(&self, host: &Host<'_>) {
        let ns = host.ns;
        if self.lo_up {
            must(ns.set_link_up("lo"), "lo up");
        }
        if let Some(on) = self.forwarding {
            host.set_forwarding(on);
        }
        if let Some(macs) = self.legs {
            for (leg, own, peer, addrs) in [
                (Iface::ClientLeg, LB_MAC, macs.client_peer, CLIENT_LEG_ADDRS),
                (
                    Iface::BackendLeg,
                    macs.backend_leg,
                    macs.backend_peer,
                    BACKEND_LEG_ADDRS,
                ),
            ] {
                let (name, peer_name) = (leg.name(), leg.peer_name());
                must(ns.add_veth(name, ns, peer_name), format!("veth {name}"));
                for (ifname, mac) in [(name, own), (peer_name, peer)] {
                    must(ns.set_mac(ifname, mac), format!("{ifname} address"));
                    must(ns.set_link_up(ifname), format!("{ifname} up"));
                }
                // Frames name these byte for byte: a MAC the kernel did not take would make
                // every expectation on this leg wrong for a reason no case names.
                assert_eq!(host.mac(leg), own, "{name}'s MAC");
                for addr in addrs {
                    let net: IpNet = addr.parse().expect("a leg's address");
                    must(ns.add_address(name, net), format!("{addr} on {name}"));
                }
            }
        }
        for &(iface, ip, mac) in &self.neighbours {
            host.add_neighbour(iface, ip, mac);
        }
        for &(dest, iface, via) in &self.routes {
            let ifname = iface.name();
            match via {
                None => must(
                    ns.add_route_dev(dest, ifname),
                    format!("{dest} dev {ifname}"),
                ),
                // The gateway's own connected route picks the interface.
                Some(gw) => must(ns.add_route(dest, gw), format!("{dest} via {gw}")),
            }
        }
    }
}

/// A golden host while its test runs: the namespace, and what the test may still change.
pub struct Host<'a> {
    ns: &'a Netns,
}

impl Host<'_> {
    #[must_use]
    pub const fn netns(&self) -> &Netns {
        self.ns
    }

    /// # Panics
    /// No such interface (a leg on a host without legs).
    #[must_use]
    pub fn ifindex(&self, iface: Iface) -> u32 {
        must(self.ns.ifindex(iface.name()), iface.name())
    }

    /// # Panics
    /// No such interface, or one without a MAC.
    #[must_use]
    pub fn mac(&self, iface: Iface) -> [u8; 6] {
        must(self.ns.mac(iface.name()), iface.name())
    }

    /// `(client leg, backend leg)` ifindexes, what test runs take as `ingress_ifindex`.
    ///
    /// # Panics
    /// A host without legs.
    #[must_use]
    pub fn legs(&self) -> (u32, u32) {
        (
            self.ifindex(Iface::ClientLeg),
            self.ifindex(Iface::BackendLeg),
        )
    }

    /// Puts both legs in the redirect map, so the program may forward out of either itself.
    ///
    /// # Panics
    /// A host without legs, or the map refusing a leg.
    pub fn allow_egress_on_legs(&self, lab: &mut Lab) {
        let (client_leg, backend_leg) = self.legs();
        for leg in [client_leg, backend_leg] {
            lab.balancer
                .allow_egress(leg)
                .unwrap_or_else(|e| panic!("leg {leg} in the redirect map: {}", chain(&e)));
        }
    }

    /// As [`GoldenHost::neighbour`], while the test runs (replacing an entry for `ip`).
    ///
    /// # Panics
    /// Netlink refusing.
    pub fn add_neighbour(&self, iface: Iface, ip: IpAddr, mac: [u8; 6]) {
        must(
            self.ns.add_neighbour(iface.name(), ip, mac),
            format!("neighbour {ip} on {}", iface.name()),
        );
    }

    /// Routing on or off for both families, on every interface.
    ///
    /// # Panics
    /// The sysctl write failing.
    pub fn set_forwarding(&self, on: bool) {
        must(self.ns.set_forwarding(on), format!("forwarding {on}"));
    }
}

fn parse(ip: &str) -> IpAddr {
    ip.parse().unwrap_or_else(|e| panic!("address {ip}: {e}"))
}

fn must<T>(result: Result<T, xlb_netns::Error>, what: impl std::fmt::Display) -> T {
    result.unwrap_or_else(|e| panic!("golden host: {what}: {}", chain(&e)))
}
