use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{Error, Netns, Network, Veth};

/// Several balancer nodes behind one router, for scale-out tests: `client -- router`,
/// `router -- node_i` and `router -- b_j`, routed, IPv4 and IPv6.
///
/// | link            | IPv4           | IPv6            | router end (`a`) | other end (`b`) |
/// |-----------------|----------------|-----------------|------------------|-----------------|
/// | router -- client| `10.60.0.0/24` | `fd00:60::/64`  | `.1`, `::1`      | `.2`, `::2`     |
/// | router -- node i| `10.61.i.0/24` | `fd00:61:i::/64`| `.1`, `::1`      | `.2`, `::2`     |
/// | router -- b j   | `10.62.j.0/24` | `fd00:62:j::/64`| `.1`, `::1`      | `.2`, `::2`     |
///
/// Every namespace but the router has default routes via the router, which forwards. The
/// router has no route to [`ScaleOutTopology::VIP_V4`] until something (BGP) gives it one:
/// that is what the nodes announce. Interface names: in the router `client`, `node0`…,
/// `b0`…; in every other namespace `router`.
#[derive(Debug)]
pub struct ScaleOutTopology {
    pub net: Network,
    /// `a` is the router's end.
    pub client_link: Veth,
    /// One per node; `a` is the router's end.
    pub node_links: Vec<Veth>,
    /// One per backend; `a` is the router's end.
    pub backend_links: Vec<Veth>,
}

impl ScaleOutTopology {
    /// The service address the nodes announce; outside every link subnet.
    pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

    const MAX: usize = 100;

    /// Builds it with namespaces named `{prefix}{role}-{pid}-{n}`.
    ///
    /// # Errors
    /// More than 100 nodes or backends, an invalid prefix, or a setup step failing
    /// (everything created so far is torn down).
    pub fn new(prefix: &str, nodes: usize, backends: usize) -> Result<Self, Error> {
        for (what, n) in [("nodes", nodes), ("backends", backends)] {
            if n > Self::MAX {
                return Err(Error::TooMany {
                    what,
                    n,
                    max: Self::MAX,
                });
            }
        }
        let mut net = Network::new(prefix)?;
        let router = net.add_namespace("router")?;
        let client = net.add_namespace("client")?;
        let client_link = net.connect(router, client, v4(60, 0), v6(0x60, 0))?;
        let mut node_links = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let node = net.add_namespace(&format!("node{i}"))?;
            node_links.push(net.connect(router, node, v4(61, i), v6(0x61, i))?);
        }
        let mut backend_links = Vec::with_capacity(backends);
        for j in 0..backends {
            let backend = net.add_namespace(&format!("b{j}"))?;
            backend_links.push(net.connect(router, backend, v4(62, j), v6(0x62, j))?);
        }
        net.ns(router).enable_forwarding()?;
        for link in std::iter::once(&client_link)
            .chain(&node_links)
            .chain(&backend_links)
        {
            let ns = net.ns(link.b.ns);
            ns.add_default_route(link.a.ip4().into())?;
            ns.add_default_route(link.a.ip6().into())?;
        }
        Ok(Self {
            net,
            client_link,
            node_links,
            backend_links,
        })
    }

    #[must_use]
    pub fn router(&self) -> &Netns {
        self.net.ns(self.client_link.a.ns)
    }

    #[must_use]
    pub fn client(&self) -> &Netns {
        self.net.ns(self.client_link.b.ns)
    }

    /// # Panics
    /// If `i` is not below the number of nodes.
    #[must_use]
    pub fn node(&self, i: usize) -> &Netns {
        self.net.ns(self.node_links[i].b.ns)
    }

    /// # Panics
    /// If `j` is not below the number of backends.
    #[must_use]
    pub fn backend(&self, j: usize) -> &Netns {
        self.net.ns(self.backend_links[j].b.ns)
    }
}

fn v4(second: u8, third: usize) -> Ipv4Net {
    let third = u8::try_from(third).expect("checked against MAX");
    Ipv4Net::new(Ipv4Addr::new(10, second, third, 0), 24).expect("valid prefix")
}

fn v6(second: u16, third: usize) -> Ipv6Net {
    let third = u16::try_from(third).expect("checked against MAX");
    Ipv6Net::new(Ipv6Addr::new(0xfd00, second, third, 0, 0, 0, 0, 0), 64).expect("valid prefix")
}
