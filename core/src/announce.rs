//! Which VIP addresses a node announces to its routers, decided from the model alone.
//!
//! Several xlb nodes behind ECMP each announce the VIPs they can serve (through a BGP
//! daemon that learns them from a routing table the agent writes). A router sends a flow to
//! any node that announces its VIP's address, so a node announces an address only while
//! a packet sent there would be balanced: its data path is attached, the operator has not
//! drained the node, and at least one VIP on the address has a backend in its ring. The
//! unit is the address, not the VIP: a route cannot say "port 80 only", so an address
//! stays announced while any of its VIPs (ports, protocols) can take flows.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::VipSpec;

/// What the node as a whole allows, apart from its VIPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The data path is attached to the node's interfaces: packets routed here are balanced.
    pub attached: bool,
    /// `xlb node drain`: routers are to stop sending new flows here. Established flows still
    /// arrive until the routers' ECMP moves them (and are still forwarded while they do).
    pub drained: bool,
}

impl NodeState {
    /// Whether this node may announce anything at all.
    #[must_use]
    pub const fn serving(self) -> bool {
        self.attached && !self.drained
    }
}

/// The addresses to announce, given each VIP and whether it has a backend in its ring
/// (`Balancer::vip_readiness`).
#[must_use]
pub fn announced(
    vips: impl IntoIterator<Item = (VipSpec, bool)>,
    node: NodeState,
) -> BTreeSet<IpAddr> {
    if !node.serving() {
        return BTreeSet::new();
    }
    vips.into_iter()
        .filter(|(_, ready)| *ready)
        .map(|(vip, _)| vip.addr.ip())
        .collect()
}

/// Route changes that take the announced set from `current` to `wanted`: additions first
/// (a VIP that becomes ready is reachable as soon as possible), then withdrawals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub announce: Vec<IpAddr>,
    pub withdraw: Vec<IpAddr>,
}

impl RouteChanges {
    #[must_use]
    pub fn between(current: &BTreeSet<IpAddr>, wanted: &BTreeSet<IpAddr>) -> Self {
        Self {
            announce: wanted.difference(current).copied().collect(),
            withdraw: current.difference(wanted).copied().collect(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{balancer::Balancer, fake::FakeMaps, model::BackendState};

    const SERVING: NodeState = NodeState {
        attached: true,
        drained: false,
    };

    fn vip(s: &str) -> VipSpec {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn backend(n: u8) -> SocketAddr {
        format!("10.1.0.{n}:8080").parse().unwrap()
    }

    fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
        addrs.iter().map(|a| ip(a)).collect()
    }

    fn balancer() -> Balancer<FakeMaps> {
        Balancer::new(FakeMaps::new(), 8, 13)
    }

    #[test]
    fn a_vip_is_announced_only_while_a_backend_is_in_its_ring() {
        let mut b = balancer();
        let web = vip("192.0.2.1:80/tcp");
        b.add_vip(web).unwrap();
        assert_eq!(
            announced(b.vip_readiness(), SERVING),
            set(&[]),
            "no backend"
        );

        b.add_backend(&web, backend(1), 1).unwrap();
        b.add_backend(&web, backend(2), 1).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&["192.0.2.1"]));

        // One backend failing its checks leaves the other in the ring.
        b.set_health(&web, backend(1), false).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&["192.0.2.1"]));

        // Every way out of the ring counts: unhealthy, draining, weight 0, container stopped.
        b.update_backend(&web, backend(2), None, Some(BackendState::Draining))
            .unwrap();
        assert_eq!(
            announced(b.vip_readiness(), SERVING),
            set(&[]),
            "none in the ring"
        );
        b.update_backend(&web, backend(2), Some(0), Some(BackendState::Active))
            .unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&[]), "weight 0");
        b.update_backend(&web, backend(2), Some(1), None).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&["192.0.2.1"]));
        b.set_backend_container(&web, backend(2), Some("web-2".to_owned()), false)
            .unwrap();
        b.set_container_running(&web, backend(2), false).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&[]), "stopped");

        b.set_health(&web, backend(1), true).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&["192.0.2.1"]));
        b.remove_vip(&web).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&[]), "removed");
    }

    #[test]
    fn an_address_stays_announced_while_any_of_its_vips_is_ready() {
        let mut b = balancer();
        let http = vip("192.0.2.1:80/tcp");
        let dns = vip("192.0.2.1:53/udp");
        let v6 = vip("[2001:db8::1]:443/tcp");
        for v in [http, dns, v6] {
            b.add_vip(v).unwrap();
        }
        b.add_backend(&dns, backend(1), 1).unwrap();
        b.add_backend(&v6, "[fd00::2]:8443".parse().unwrap(), 1)
            .unwrap();
        assert_eq!(
            announced(b.vip_readiness(), SERVING),
            set(&["192.0.2.1", "2001:db8::1"])
        );
        b.set_health(&dns, backend(1), false).unwrap();
        assert_eq!(announced(b.vip_readiness(), SERVING), set(&["2001:db8::1"]));
    }

    #[test]
    fn a_drained_or_detached_node_announces_nothing() {
        let ready = [(vip("192.0.2.1:80/tcp"), true)];
        assert_eq!(announced(ready, SERVING), set(&["192.0.2.1"]));
        for node in [
            NodeState {
                attached: true,
                drained: true,
            },
            NodeState {
                attached: false,
                drained: false,
            },
        ] {
            assert!(!node.serving());
            assert_eq!(announced(ready, node), set(&[]), "{node:?}");
        }
    }

    #[test]
    fn changes_name_only_what_differs() {
        let current = set(&["192.0.2.1", "192.0.2.2"]);
        let wanted = set(&["192.0.2.2", "2001:db8::1"]);
        let changes = RouteChanges::between(&current, &wanted);
        assert_eq!(changes.announce, vec![ip("2001:db8::1")]);
        assert_eq!(changes.withdraw, vec![ip("192.0.2.1")]);
        assert!(RouteChanges::between(&wanted, &wanted).is_empty());
    }
}
