//! A private network namespace in which the loaded program's next-hop lookups resolve the
//! same way on every machine: one veth end owns the backends' subnet, with permanent
//! neighbour entries, so VIP traffic takes the full path (rewrite, MACs, `XDP_REDIRECT`).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result};
use lb_common::program_names;
use lb_userspace::{
    balancer::{Balancer, Forwarding, Protocol, VipSpec},
    datapath::{Datapath, DatapathConfig, TestRunOutcome},
};
use xlb_netns::{Netns, ipnet::Ipv4Net};

/// The backends' subnet, reached through the bench namespace's `bench0`.
pub const BACKEND_NET: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 0);
pub const BACKEND_PORT: u16 = 8080;
/// Clients are numbered into 10.202.0.0/16.
pub const CLIENT_NET: [u8; 2] = [10, 202];
const PEER_MAC: [u8; 6] = [0x02, 0xb0, 0, 0, 0, 0x02];

/// The n-th backend address (n from 0): 10.201.x.y, never .0 or .255 in the last octet.
#[must_use]
pub fn backend_addr(n: u32) -> Ipv4Addr {
    let n = n + 1;
    Ipv4Addr::new(10, 201, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// The n-th client: distinct (address, port) for up to 16M clients.
#[must_use]
pub fn client(n: u64) -> SocketAddrV4 {
    let host = n / 50_000;
    SocketAddrV4::new(
        Ipv4Addr::new(CLIENT_NET[0], CLIENT_NET[1], (host >> 8) as u8, host as u8),
        10_000 + (n % 50_000) as u16,
    )
}

#[must_use]
pub fn vip(n: u32) -> VipSpec {
    VipSpec {
        addr: std::net::SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(10, 200, (n >> 8) as u8, n as u8),
            80,
        )),
        proto: Protocol::Tcp,
    }
}

/// The UDP VIP every benchmark environment also has: `vip(0)`'s address, port 53.
#[must_use]
pub fn udp_vip() -> SocketAddrV4 {
    match vip(0).addr {
        std::net::SocketAddr::V4(v) => SocketAddrV4::new(*v.ip(), 53),
        std::net::SocketAddr::V6(_) => unreachable!("bench VIPs are IPv4"),
    }
}

pub struct BenchEnv {
    pub ns: Netns,
    /// Holds the veth's other end: dropping it would delete `bench0` too.
    _peer: Netns,
    pub balancer: Balancer,
    /// The bench interface's MAC: the source MAC of redirected frames.
    pub egress_mac: [u8; 6],
}

impl BenchEnv {
    /// `vips` TCP VIPs on port 80 (and one UDP VIP on port 53 at `vip(0)`'s address), each
    /// with `backends` backends.
    pub fn new(config: DatapathConfig, vips: u32, backends: u32) -> Result<Self> {
        Self::with_forwarding(config, vips, backends, Forwarding::Nat)
    }

    /// As [`Self::new`], the VIPs reaching their backends by `forwarding`: a tunnelled
    /// VIP's backends serve its own port.
    pub fn with_forwarding(
        config: DatapathConfig,
        vips: u32,
        backends: u32,
        forwarding: Forwarding,
    ) -> Result<Self> {
        let ns = Netns::create("xlbbench").context("creating the benchmark namespace")?;
        let peer = Netns::create("xlbbenchp").context("creating the benchmark namespace")?;
        ns.add_veth("bench0", &peer, "bench1")?;
        ns.set_link_up("bench0")?;
        peer.set_link_up("bench1")?;
        ns.add_address(
            "bench0",
            Ipv4Net::new(Ipv4Addr::new(10, 201, 255, 254), 16)?,
        )?;
        ns.enable_forwarding()?;
        for n in 0..backends {
            ns.add_neighbour("bench0", backend_addr(n).into(), PEER_MAC)?;
        }
        let egress = ns.ifindex("bench0")?;
        let egress_mac = ns.mac("bench0")?;
        let datapath = Datapath::load(config).context("loading the XDP program")?;
        let mut balancer = Balancer::new(datapath);
        balancer.allow_egress(egress)?;
        let udp = VipSpec {
            addr: std::net::SocketAddr::V4(udp_vip()),
            proto: Protocol::Udp,
        };
        for spec in (0..vips).map(vip).chain(std::iter::once(udp)) {
            balancer.add_vip_with(spec, None, forwarding)?;
            let port = if forwarding == Forwarding::Nat {
                BACKEND_PORT
            } else {
                spec.addr.port()
            };
            for b in 0..backends {
                let addr = SocketAddrV4::new(backend_addr(b), port);
                balancer.add_backend(&spec, addr.into(), 1)?;
            }
        }
        for p in [program_names::FLOOR_PASS, program_names::FLOOR_PARSE] {
            balancer.datapath_mut().load_program(p)?;
        }
        Ok(Self {
            ns,
            _peer: peer,
            balancer,
            egress_mac,
        })
    }

    /// Runs `program` once on `frame` inside the namespace.
    pub fn run_once(
        &self,
        program: &'static str,
        frame: &[u8],
    ) -> Result<(TestRunOutcome, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let outcome = self
            .balancer
            .datapath()
            .test_run(program, frame, &mut out, 1)?;
        out.truncate(outcome.len);
        Ok((outcome, out))
    }

    pub fn peer_mac() -> [u8; 6] {
        PEER_MAC
    }
}
