use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{Error, Netns, cleanup_stale};

/// Role names become interface names on the other side of each link, which
/// Linux caps at 15 bytes; 12 leaves room for a `-N` suffix when two
/// namespaces are joined twice.
const MAX_ROLE_LEN: usize = 12;

/// Leaves room for a 12-byte role, `-`, the pid and a counter within
/// [`Netns::create`]'s prefix limit.
const MAX_NETWORK_PREFIX_LEN: usize = 16;

/// Index of a namespace in the [`Network`] that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId(usize);

/// One end of a veth pair: what a test needs to attach XDP to it, to build
/// frames for it, or to connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ns: NsId,
    pub ifname: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// This end's address with the link's prefix length, e.g. `10.10.0.1/24`.
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
}

impl Endpoint {
    #[must_use]
    pub fn ip4(&self) -> Ipv4Addr {
        self.v4.addr()
    }

    #[must_use]
    pub fn ip6(&self) -> Ipv6Addr {
        self.v6.addr()
    }
}

/// A veth pair made by [`Network::connect`]; `a` and `b` follow its
/// arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub a: Endpoint,
    pub b: Endpoint,
}

struct Node {
    role: String,
    ns: Netns,
    /// Names already used in this namespace, so a second link between the
    /// same two namespaces gets a distinct name.
    ifnames: Vec<String>,
}

/// A set of namespaces joined by veth pairs: the generic form behind
/// [`Topology`], also meant for shapes like "flow generator -> LB -> sink".
///
/// Dropping it deletes every namespace, and with them every link.
pub struct Network {
    prefix: String,
    nodes: Vec<Node>,
    links: Vec<Veth>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("prefix", &self.prefix)
            .field(
                "namespaces",
                &self
                    .nodes
                    .iter()
                    .map(|n| (&n.role, n.ns.name()))
                    .collect::<Vec<_>>(),
            )
            .field("links", &self.links)
            .finish()
    }
}

impl Network {
    /// Namespaces will be named `{prefix}{role}-{pid}-{n}`.
    ///
    /// Removes leftovers of dead processes with the same prefix first, so a
    /// test run killed by a timeout does not leak namespaces into the next.
    ///
    /// # Errors
    /// Invalid prefix (1-16 ASCII alphanumerics, `-`, `_`), or the stale
    /// cleanup failed.
    pub fn new(prefix: &str) -> Result<Self, Error> {
        validate(prefix, MAX_NETWORK_PREFIX_LEN)?;
        cleanup_stale(prefix)?;
        Ok(Self {
            prefix: prefix.to_owned(),
            nodes: Vec::new(),
            links: Vec::new(),
        })
    }

    /// Creates a namespace for `role` (e.g. `lb`, `client`, `b0`).
    ///
    /// The role also names interfaces: the end of a link that lives in
    /// another namespace is called after this role, so `ip -n LB link` lists
    /// `client`, `b0`, ...
    ///
    /// # Errors
    /// Invalid role (1-12 ASCII alphanumerics, `-`, `_`), or creation failed.
    pub fn add_namespace(&mut self, role: &str) -> Result<NsId, Error> {
        validate(role, MAX_ROLE_LEN)?;
        let ns = Netns::create(&format!("{}{role}-", self.prefix))?;
        self.nodes.push(Node {
            role: role.to_owned(),
            ns,
            ifnames: vec!["lo".to_owned()],
        });
        Ok(NsId(self.nodes.len() - 1))
    }

    /// Joins `a` and `b` with a veth pair, addresses it (`a` gets the first
    /// host of each subnet, `b` the second), brings both ends up with GRO on
    /// and TX checksum offload off (see [`Netns::set_tx_checksum`]), and
    /// returns both ends' details.
    ///
    /// GRO goes on at both ends because whichever end XDP redirects into
    /// drops frames without it (see [`Netns::set_gro`]), and which direction a
    /// benchmark redirects in is up to the benchmark.
    ///
    /// # Errors
    /// A subnet smaller than /30 (/126), more than 99 links between the same
    /// two namespaces, or netlink failed.
    ///
    /// # Panics
    /// If `a` or `b` comes from another `Network`.
    pub fn connect(&mut self, a: NsId, b: NsId, v4: Ipv4Net, v6: Ipv6Net) -> Result<Veth, Error> {
        self.join(a, b, v4, v6, true)
    }

    /// As [`Network::connect`], but the veth keeps the kernel's defaults (TX checksum offload
    /// and TSO on, GRO off), as the veths of a user's containers do: for tests and demos of
    /// what xlb does on an untuned host.
    ///
    /// # Errors
    /// As for [`Network::connect`].
    ///
    /// # Panics
    /// If `a` or `b` comes from another `Network`.
    pub fn connect_untuned(
        &mut self,
        a: NsId,
        b: NsId,
        v4: Ipv4Net,
        v6: Ipv6Net,
    ) -> Result<Veth, Error> {
        self.join(a, b, v4, v6, false)
    }

    fn join(
        &mut self,
        a: NsId,
        b: NsId,
        v4: Ipv4Net,
        v6: Ipv6Net,
        tuned_for_xdp: bool,
    ) -> Result<Veth, Error> {
        let (a4, b4) = two_hosts_v4(v4)?;
        let (a6, b6) = two_hosts_v6(v6)?;
        let a_if = self.claim_ifname(a, &self.node(b).role.clone())?;
        let b_if = self.claim_ifname(b, &self.node(a).role.clone())?;
        let (na, nb) = (&self.node(a).ns, &self.node(b).ns);

        na.add_veth(&a_if, nb, &b_if)?;
        let end = |ns: &Netns, id, ifname: String, v4, v6| -> Result<Endpoint, Error> {
            ns.add_address(&ifname, v4)?;
            ns.add_address(&ifname, v6)?;
            if tuned_for_xdp {
                ns.set_tx_checksum(&ifname, false)?;
            }
            ns.set_link_up(&ifname)?;
            let info = ns.link(&ifname)?;
            Ok(Endpoint {
                ns: id,
                mac: info.mac.ok_or_else(|| Error::NoMac {
                    ifname: ifname.clone(),
                    ns: ns.name().to_owned(),
                })?,
                ifindex: info.ifindex,
                ifname,
                v4,
                v6,
            })
        };
        let veth = Veth {
            a: end(na, a, a_if, a4, a6)?,
            b: end(nb, b, b_if, b4, b6)?,
        };
        // GRO only after both ends are up: a veth decides whether it accepts
        // redirected frames when it comes up, from its peer's GRO setting at
        // that moment, so GRO turned on before the peer is up does not count.
        if tuned_for_xdp {
            na.set_gro(&veth.a.ifname, true)?;
            nb.set_gro(&veth.b.ifname, true)?;
        }
        self.links.push(veth.clone());
        Ok(veth)
    }

    /// # Panics
    /// If `id` comes from another `Network`.
    #[must_use]
    pub fn ns(&self, id: NsId) -> &Netns {
        &self.node(id).ns
    }

    /// # Panics
    /// If `id` comes from another `Network`.
    #[must_use]
    pub fn role(&self, id: NsId) -> &str {
        &self.node(id).role
    }

    /// The namespace created for `role`, if any.
    #[must_use]
    pub fn find(&self, role: &str) -> Option<NsId> {
        self.nodes.iter().position(|n| n.role == role).map(NsId)
    }

    /// Every link made so far, in creation order.
    #[must_use]
    pub fn links(&self) -> &[Veth] {
        &self.links
    }

    fn node(&self, id: NsId) -> &Node {
        self.nodes
            .get(id.0)
            .unwrap_or_else(|| panic!("NsId({}) is not from this Network", id.0))
    }

    fn claim_ifname(&mut self, id: NsId, want: &str) -> Result<String, Error> {
        let used = &self.nodes[id.0].ifnames;
        let name = std::iter::once(want.to_owned())
            .chain((1..100).map(|k| format!("{want}-{k}")))
            .find(|n| !used.contains(n))
            .ok_or_else(|| Error::InvalidName {
                name: want.to_owned(),
                max: MAX_ROLE_LEN,
                why: "too many links between the same two namespaces",
            })?;
        self.nodes[id.0].ifnames.push(name.clone());
        Ok(name)
    }
}

/// The usual xlb test shape: `client -- lb -- backend_i`, routed, IPv4 and
/// IPv6.
///
/// Address plan (backend `i` in `0..256`; in IPv6, `i` is written in hex):
///
/// | link            | IPv4            | IPv6               | LB end (`a`)        | other end (`b`)     |
/// |-----------------|-----------------|--------------------|---------------------|---------------------|
/// | client -- lb    | `10.10.0.0/24`  | `fd00:10::/64`     | `.1`, `::1`         | `.2`, `::2`         |
/// | lb -- backend i | `10.11.i.0/24`  | `fd00:11:i::/64`   | `.1`, `::1`         | `.2`, `::2`         |
///
/// The client and every backend have default routes (both families) via the
/// LB's address on their link, and the LB forwards, so without any XDP
/// program the client reaches `10.11.i.2` by plain routing. Nobody owns
/// [`Topology::VIP_V4`] / [`Topology::VIP_V6`]; the client's default route
/// sends them to the LB, where an XDP program (or an address a test adds)
/// can claim them.
///
/// Interface names follow [`Network::add_namespace`]: in the LB they are
/// `client`, `b0`, `b1`, ...; in the client `lb`; in each backend `lb`.
/// GRO is on at every veth end.
#[derive(Debug)]
pub struct Topology {
    pub net: Network,
    /// `a` is the LB's end, `b` the client's.
    pub client_link: Veth,
    /// One per backend, in order; `a` is the LB's end, `b` the backend's.
    pub backend_links: Vec<Veth>,
}

impl Topology {
    /// A service address for tests to balance; outside every link subnet.
    pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
    pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

    const MAX_BACKENDS: usize = 256;

    /// Builds the topology with namespaces named `xlbt-{role}-{pid}-{n}`.
    ///
    /// # Errors
    /// As for [`Topology::with_prefix`].
    pub fn new(backends: usize) -> Result<Self, Error> {
        Self::with_prefix("xlbt-", backends)
    }

    /// Builds the topology; a distinct `prefix` keeps one suite's
    /// [`cleanup_stale`] away from another's namespaces.
    ///
    /// # Errors
    /// More than 256 backends, an invalid prefix, or any setup step failed
    /// (everything created so far is torn down).
    pub fn with_prefix(prefix: &str, backends: usize) -> Result<Self, Error> {
        if backends > Self::MAX_BACKENDS {
            return Err(Error::TooMany {
                what: "backends",
                n: backends,
                max: Self::MAX_BACKENDS,
            });
        }
        let mut net = Network::new(prefix)?;
        let client = net.add_namespace("client")?;
        let lb = net.add_namespace("lb")?;
        let client_link = net.connect(
            lb,
            client,
            Ipv4Net::new(Ipv4Addr::new(10, 10, 0, 0), 24).expect("valid prefix"),
            Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0), 64).expect("valid prefix"),
        )?;
        let mut backend_links = Vec::with_capacity(backends);
        for i in 0..backends {
            let i8 = u8::try_from(i).expect("checked against MAX_BACKENDS");
            let b = net.add_namespace(&format!("b{i}"))?;
            backend_links.push(
                net.connect(
                    lb,
                    b,
                    Ipv4Net::new(Ipv4Addr::new(10, 11, i8, 0), 24).expect("valid prefix"),
                    Ipv6Net::new(
                        Ipv6Addr::new(0xfd00, 0x11, u16::from(i8), 0, 0, 0, 0, 0),
                        64,
                    )
                    .expect("valid prefix"),
                )?,
            );
        }
        net.ns(lb).enable_forwarding()?;
        let c = net.ns(client);
        c.add_default_route(client_link.a.ip4().into())?;
        c.add_default_route(client_link.a.ip6().into())?;
        for link in &backend_links {
            let b = net.ns(link.b.ns);
            b.add_default_route(link.a.ip4().into())?;
            b.add_default_route(link.a.ip6().into())?;
        }
        Ok(Self {
            net,
            client_link,
            backend_links,
        })
    }

    #[must_use]
    pub fn client(&self) -> &Netns {
        self.net.ns(self.client_link.b.ns)
    }

    #[must_use]
    pub fn lb(&self) -> &Netns {
        self.net.ns(self.client_link.a.ns)
    }

    /// # Panics
    /// If `i` is not below the number of backends.
    #[must_use]
    pub fn backend(&self, i: usize) -> &Netns {
        self.net.ns(self.backend_links[i].b.ns)
    }
}

/// Direct server return's shape: the balancer and the backends on different links, all
/// behind one router, so a backend's reply can reach the client without the balancer.
///
/// ```text
/// client --- router --- lb
///              |
///              +------- backend i
/// ```
///
/// Address plan (backend `i` in `0..256`; in IPv6, `i` is written in hex):
///
/// | link               | IPv4           | IPv6             | router end (`a`) | other end (`b`) |
/// |--------------------|----------------|------------------|------------------|-----------------|
/// | router -- client   | `10.30.0.0/24` | `fd00:30::/64`   | `.1`, `::1`      | `.2`, `::2`     |
/// | router -- lb       | `10.31.0.0/24` | `fd00:31::/64`   | `.1`, `::1`      | `.2`, `::2`     |
/// | router -- backend i| `10.32.i.0/24` | `fd00:32:i::/64` | `.1`, `::1`      | `.2`, `::2`     |
///
/// Only the router forwards (both families), with reverse-path filtering off (a backend's reply
/// comes from the VIP, which the router routes towards the balancer), and routes
/// [`DsrTopology::VIP_V4`] / [`DsrTopology::VIP_V6`] to the balancer's address. Client,
/// balancer and backends have default routes (both families) via the router: the balancer
/// reaches the backends through it, and the backends answer the client through it,
/// never through the balancer. Nobody owns the VIPs: a balancer's XDP program claims them,
/// and each backend puts them on its loopback (`xlb backend prepare`).
///
/// Interface names follow [`Network::add_namespace`]: in the router `client`, `lb`, `b0`,
/// `b1`, ...; in every other namespace `router`. GRO is on at every veth end.
#[derive(Debug)]
pub struct DsrTopology {
    pub net: Network,
    /// `a` is the router's end, `b` the client's.
    pub client_link: Veth,
    /// `a` is the router's end, `b` the balancer's.
    pub lb_link: Veth,
    /// One per backend, in order; `a` is the router's end, `b` the backend's.
    pub backend_links: Vec<Veth>,
}

impl DsrTopology {
    /// The service address the router sends to the balancer; outside every link subnet and
    /// apart from [`Topology::VIP_V4`], so both shapes can exist at once.
    pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);

    /// Builds the topology with namespaces named `xlbd-{role}-{pid}-{n}`.
    ///
    /// # Errors
    /// As for [`DsrTopology::with_prefix`].
    pub fn new(backends: usize) -> Result<Self, Error> {
        Self::with_prefix("xlbd-", backends)
    }

    /// Builds the topology; a distinct `prefix` keeps one suite's [`cleanup_stale`] away
    /// from another's namespaces.
    ///
    /// # Errors
    /// More than 256 backends, an invalid prefix, or any setup step failed (everything
    /// created so far is torn down).
    pub fn with_prefix(prefix: &str, backends: usize) -> Result<Self, Error> {
        if backends > Topology::MAX_BACKENDS {
            return Err(Error::TooMany {
                what: "backends",
                n: backends,
                max: Topology::MAX_BACKENDS,
            });
        }
        let mut net = Network::new(prefix)?;
        let client = net.add_namespace("client")?;
        let router = net.add_namespace("router")?;
        let lb = net.add_namespace("lb")?;
        let client_link = net.connect(
            router,
            client,
            Ipv4Net::new(Ipv4Addr::new(10, 30, 0, 0), 24).expect("valid prefix"),
            Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0), 64).expect("valid prefix"),
        )?;
        let lb_link = net.connect(
            router,
            lb,
            Ipv4Net::new(Ipv4Addr::new(10, 31, 0, 0), 24).expect("valid prefix"),
            Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 0), 64).expect("valid prefix"),
        )?;
        let mut backend_links = Vec::with_capacity(backends);
        for i in 0..backends {
            let i8 = u8::try_from(i).expect("checked against MAX_BACKENDS");
            let b = net.add_namespace(&format!("b{i}"))?;
            backend_links.push(
                net.connect(
                    router,
                    b,
                    Ipv4Net::new(Ipv4Addr::new(10, 32, i8, 0), 24).expect("valid prefix"),
                    Ipv6Net::new(
                        Ipv6Addr::new(0xfd00, 0x32, u16::from(i8), 0, 0, 0, 0, 0),
                        64,
                    )
                    .expect("valid prefix"),
                )?,
            );
        }
        let r = net.ns(router);
        r.enable_forwarding()?;
        r.sysctl("net/ipv4/conf/all/rp_filter", "0")?;
        r.sysctl("net/ipv4/conf/default/rp_filter", "0")?;
        for link in std::iter::once(&client_link)
            .chain(std::iter::once(&lb_link))
            .chain(&backend_links)
        {
            r.sysctl(&format!("net/ipv4/conf/{}/rp_filter", link.a.ifname), "0")?;
        }
        r.add_route(Ipv4Net::from(Self::VIP_V4), lb_link.b.ip4().into())?;
        r.add_route(Ipv6Net::from(Self::VIP_V6), lb_link.b.ip6().into())?;
        for link in std::iter::once(&client_link)
            .chain(std::iter::once(&lb_link))
            .chain(&backend_links)
        {
            let ns = net.ns(link.b.ns);
            // A new namespace inherits the host's IPv4 forwarding: only the router routes,
            // so a packet to a VIP that nothing claims ends at the balancer.
            ns.sysctl("net/ipv4/ip_forward", "0")?;
            ns.sysctl("net/ipv6/conf/all/forwarding", "0")?;
            ns.add_default_route(link.a.ip4().into())?;
            ns.add_default_route(link.a.ip6().into())?;
        }
        Ok(Self {
            net,
            client_link,
            lb_link,
            backend_links,
        })
    }

    #[must_use]
    pub fn client(&self) -> &Netns {
        self.net.ns(self.client_link.b.ns)
    }

    #[must_use]
    pub fn router(&self) -> &Netns {
        self.net.ns(self.client_link.a.ns)
    }

    #[must_use]
    pub fn lb(&self) -> &Netns {
        self.net.ns(self.lb_link.b.ns)
    }

    /// # Panics
    /// If `i` is not below the number of backends.
    #[must_use]
    pub fn backend(&self, i: usize) -> &Netns {
        self.net.ns(self.backend_links[i].b.ns)
    }
}

fn validate(name: &str, max: usize) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.to_owned(),
            max,
            why: "bad length or character",
        })
    }
}

fn two_hosts_v4(net: Ipv4Net) -> Result<(Ipv4Net, Ipv4Net), Error> {
    if net.prefix_len() > 30 {
        return Err(Error::SubnetTooSmall { subnet: net.into() });
    }
    let base = net.network().to_bits();
    let host =
        |n| Ipv4Net::new(Ipv4Addr::from_bits(base + n), net.prefix_len()).expect("same length");
    Ok((host(1), host(2)))
}

fn two_hosts_v6(net: Ipv6Net) -> Result<(Ipv6Net, Ipv6Net), Error> {
    if net.prefix_len() > 126 {
        return Err(Error::SubnetTooSmall { subnet: net.into() });
    }
    let base = net.network().to_bits();
    let host =
        |n| Ipv6Net::new(Ipv6Addr::from_bits(base + n), net.prefix_len()).expect("same length");
    Ok((host(1), host(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ignore_host_bits() {
        let (a, b) = two_hosts_v4("10.1.2.77/24".parse().unwrap()).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("10.1.2.1/24".into(), "10.1.2.2/24".into())
        );
        let (a, b) = two_hosts_v6("fd00:1::5/64".parse().unwrap()).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("fd00:1::1/64".into(), "fd00:1::2/64".into())
        );
        assert!(two_hosts_v4("10.0.0.0/31".parse().unwrap()).is_err());
        assert!(two_hosts_v6("fd00::/127".parse().unwrap()).is_err());
    }
}
