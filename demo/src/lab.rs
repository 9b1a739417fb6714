//! The demo's network: a client, the LB, and one namespace per container, each joined to the
//! LB by a veth pair. The LB routes between them; the client and the containers have default
//! routes via the LB, so the client sends VIP traffic (which nobody owns) to the LB, where
//! xlb's XDP program claims it.
//!
//! Address plan (only inside these namespaces):
//!
//! | link               | subnet          | LB end | other end |
//! |--------------------|-----------------|--------|-----------|
//! | client -- lb       | `10.210.0.0/24` | `.1`   | `.2`      |
//! | lb -- container i  | `10.211.i.0/24` | `.1`   | `.2`      |
//!
//! The veths keep the kernel's defaults, as a user's containers have them (TSO/GSO, TX
//! checksum offload): xlb's default `--xdp-mode auto` puts them on the TC hook, which takes
//! that traffic as it is. Only when the demo is asked for an XDP mode on every interface are
//! the veths tuned the way XDP needs (TX checksum offload off, GRO on at the far ends; see
//! `xlb_netns::Netns::set_tx_checksum`).
//!
//! (IPv6 link addresses exist too, as `xlb-netns` always adds both families, but the demo
//! only uses IPv4.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use anyhow::{Context, Result};
use xlb_netns::{
    Netns, Network, NsId,
    ipnet::{Ipv4Net, Ipv6Net},
};

use crate::{
    Interrupt, PREFIX,
    podman::{self, BRIDGE, HostLink, Podman},
};

/// A replicated service behind one VIP.
pub struct Service {
    /// Container names are `{key}-{n}`.
    pub key: &'static str,
    pub label: &'static str,
    pub vip: SocketAddrV4,
    /// The port the containers listen on; xlb translates the VIP's port to it.
    pub backend_port: u16,
    pub replicas: u8,
    /// The client's source ports for this VIP are `first_port..first_port + requests`.
    pub first_port: u16,
}

impl Service {
    /// The VIP as the `xlb` CLI takes it.
    pub fn vip_arg(&self) -> String {
        format!("{}/tcp", self.vip)
    }
}

pub const SERVICES: [Service; 3] = [
    Service {
        key: "web",
        label: "web server",
        vip: SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 10), 80),
        backend_port: 8080,
        replicas: 3,
        first_port: 41000,
    },
    Service {
        key: "db",
        label: "database",
        vip: SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 20), 5432),
        backend_port: 5432,
        replicas: 2,
        first_port: 42000,
    },
    Service {
        key: "proc",
        label: "processing",
        vip: SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 30), 9000),
        backend_port: 9000,
        replicas: 2,
        first_port: 43000,
    },
];

/// The web replica that is removed live, and the one added in its place (index into
/// [`SERVICES`] and replica numbers).
pub const LIVE_SERVICE: usize = 0;
pub const LIVE_REMOVE: u8 = 1;
pub const LIVE_ADD: u8 = 4;

pub struct Container {
    pub name: String,
    pub service: usize,
    /// The container's namespace (namespace mode).
    pub ns: Option<NsId>,
    /// podman's name for it (podman mode).
    pub podman: Option<String>,
    pub addr: Ipv4Addr,
    /// In the VIP's backend set from the start (web-4 only joins live).
    pub initial: bool,
}

impl Container {
    /// The backend's address as `xlb backend del` takes it.
    pub fn addr_arg(&self) -> String {
        SocketAddrV4::new(self.addr, SERVICES[self.service].backend_port).to_string()
    }

    /// How `xlb backend add` names the backend: by podman container name when there is one
    /// (xlb resolves it with `podman inspect`), else by address.
    pub fn backend_args(&self) -> Vec<String> {
        match &self.podman {
            Some(name) => vec![
                "--container".to_owned(),
                format!("{name}:{}", SERVICES[self.service].backend_port),
            ],
            None => vec![self.addr_arg()],
        }
    }
}

pub struct Lab {
    pub net: Network,
    pub client: NsId,
    pub client_addr: Ipv4Addr,
    /// Where the agent runs: the LB namespace, or the host's (`None`, podman mode).
    pub lb: Option<NsId>,
    /// Every LB-side interface; the agent attaches to all of them (the reverse NAT runs on
    /// the containers' side).
    pub lb_ifaces: Vec<String>,
    pub containers: Vec<Container>,
    /// Podman mode: the client's veth into the host namespace.
    pub host_link: Option<HostLink>,
}

/// The containers to create, in order: every service's replicas, then the live addition.
pub fn container_plan() -> Vec<(String, usize, bool)> {
    let mut plan = Vec::new();
    for (s, svc) in SERVICES.iter().enumerate() {
        for n in 1..=svc.replicas {
            plan.push((format!("{}-{n}", svc.key), s, true));
        }
    }
    plan.push((
        format!("{}-{LIVE_ADD}", SERVICES[LIVE_SERVICE].key),
        LIVE_SERVICE,
        false,
    ));
    plan
}

impl Lab {
    /// `tune_for_xdp`: the agent will run XDP on every interface (`--xdp-mode native|skb`).
    pub fn build(interrupt: &Interrupt, tune_for_xdp: bool) -> Result<Self> {
        let mut net = Network::new(PREFIX).context("cleaning up namespaces of earlier runs")?;
        let client = net.add_namespace("client")?;
        let lb = net.add_namespace("lb")?;
        let connect = |net: &mut Network, a, b, v4, v6| {
            if tune_for_xdp {
                net.connect(a, b, v4, v6)
            } else {
                net.connect_untuned(a, b, v4, v6)
            }
        };
        let client_link = connect(
            &mut net,
            lb,
            client,
            v4(Ipv4Addr::new(10, 210, 0, 0)),
            v6(Ipv6Addr::new(0xfd00, 0xd0, 0, 0, 0, 0, 0, 0)),
        )
        .context("connecting the client to the LB")?;
        net.ns(lb).enable_forwarding()?;
        net.ns(client)
            .add_default_route(IpAddr::V4(client_link.a.ip4()))?;
        if tune_for_xdp {
            refresh_gro(net.ns(client), &client_link.b.ifname)?;
        }
        let mut lb_ifaces = vec![client_link.a.ifname.clone()];
        let mut containers = Vec::new();
        for (i, (name, service, initial)) in container_plan().into_iter().enumerate() {
            interrupt.check()?;
            let n = u8::try_from(i + 1).context("too many containers")?;
            let ns = net.add_namespace(&name)?;
            let link = connect(
                &mut net,
                lb,
                ns,
                v4(Ipv4Addr::new(10, 211, n, 0)),
                v6(Ipv6Addr::new(0xfd00, 0xd1, n.into(), 0, 0, 0, 0, 0)),
            )
            .with_context(|| format!("connecting {name} to the LB"))?;
            net.ns(ns).add_default_route(IpAddr::V4(link.a.ip4()))?;
            if tune_for_xdp {
                refresh_gro(net.ns(ns), &link.b.ifname)?;
            }
            lb_ifaces.push(link.a.ifname.clone());
            containers.push(Container {
                name,
                service,
                ns: Some(ns),
                podman: None,
                addr: link.b.ip4(),
                initial,
            });
        }
        Ok(Self {
            net,
            client,
            client_addr: client_link.b.ip4(),
            lb: Some(lb),
            lb_ifaces,
            containers,
            host_link: None,
        })
    }

    /// Podman mode: a client namespace with a veth into the host, and every planned
    /// container started from [`podman::IMAGE`], answering HTTP with its name. Each podman
    /// name is pushed to `created` before the container is started, so teardown removes
    /// it whatever happens next.
    pub fn podman(
        podman: &Podman,
        created: &mut Vec<String>,
        interrupt: &Interrupt,
        tune_for_xdp: bool,
    ) -> Result<Self> {
        let pid = std::process::id();
        let mut net = Network::new(PREFIX).context("cleaning up namespaces of earlier runs")?;
        if HostLink::subnet_in_use() {
            anyhow::bail!(
                "10.212.0.0/30 is in use on the host: is another xlb-demo running in podman mode?"
            );
        }
        let client = net.add_namespace("client")?;
        let host_link = HostLink::create(net.ns(client), pid, tune_for_xdp)?;
        let mut containers = Vec::new();
        for (name, service, initial) in container_plan() {
            interrupt.check()?;
            let podman_name = podman::container_name(pid, &name);
            created.push(podman_name.clone());
            podman
                .start(&podman_name, &name, SERVICES[service].backend_port)
                .with_context(|| format!("starting container {podman_name}"))?;
            let addr = podman.addr(&podman_name)?;
            containers.push(Container {
                name,
                service,
                ns: None,
                podman: Some(podman_name),
                addr,
                initial,
            });
        }
        Ok(Self {
            net,
            client,
            client_addr: host_link.client_ip,
            lb: None,
            lb_ifaces: vec![host_link.host_if.clone(), BRIDGE.to_owned()],
            containers,
            host_link: Some(host_link),
        })
    }

    pub fn ns(&self, id: NsId) -> &Netns {
        self.net.ns(id)
    }

    pub fn container(&self, service: usize, replica: u8) -> &Container {
        let name = format!("{}-{replica}", SERVICES[service].key);
        self.containers
            .iter()
            .find(|c| c.name == name)
            .expect("the plan has every replica named in the demo")
    }
}

/// Turns GRO off and on again on `ifname` (a non-LB end, now that both ends are up).
///
/// XDP can redirect into an LB-side veth only if the kernel lists `ndo_xdp_xmit` among that
/// device's XDP features, which it computes from the *peer's* GRO setting when the LB end
/// comes up or when the peer's GRO changes while the peer is up. `Network::connect` turns
/// GRO on at each end before bringing it up, so the LB end is computed while the peer still
/// has GRO off and redirects into it are dropped (counted as `rx dropped` on the LB end).
/// Toggling GRO with both ends up makes the kernel recompute it.
fn refresh_gro(ns: &Netns, ifname: &str) -> Result<()> {
    ns.set_gro(ifname, false)?;
    ns.set_gro(ifname, true)?;
    Ok(())
}

fn v4(addr: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(addr, 24).expect("valid prefix length")
}

fn v6(addr: Ipv6Addr) -> Ipv6Net {
    Ipv6Net::new(addr, 64).expect("valid prefix length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_has_every_replica_and_the_live_addition_last() {
        let names: Vec<String> = container_plan().into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(
            names,
            [
                "web-1", "web-2", "web-3", "db-1", "db-2", "proc-1", "proc-2", "web-4"
            ]
        );
        assert!(
            container_plan()
                .iter()
                .filter(|(_, _, initial)| !initial)
                .count()
                == 1
        );
    }

    #[test]
    fn source_port_ranges_do_not_overlap() {
        for (i, a) in SERVICES.iter().enumerate() {
            for b in &SERVICES[i + 1..] {
                assert!(a.first_port.abs_diff(b.first_port) >= 1000);
            }
        }
    }
}
