//! Announcing VIPs to routers through the kernel's routing table.
//!
//! xlb does not speak BGP itself: the agent writes each VIP address it announces as a host
//! route (`VIP/32 dev lo proto 176`, `/128` for IPv6) into a routing table of its own
//! (`--announce-table N`), and the node's routing daemon learns that table and advertises
//! its routes (BIRD: `protocol kernel { kernel table N; learn; }`, FRR: `redistribute table
//! N`). Any daemon that reads the kernel works, the agent needs no daemon-specific code or
//! credentials, and `ip route show table N` shows exactly what the node announces. No rule
//! points packets at the table, so its routes never change how the node itself forwards.
//!
//! Which addresses are announced is decided in the core (`xlb_core::announce`); this module
//! only makes the table hold them.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use thiserror::Error;
use xlb_core::announce::RouteChanges;

use crate::validate::{NetlinkError, with_netlink};

/// The `proto` xlb's routes carry: routes of other origins in the same table are left
/// alone, and a daemon can filter on it (BIRD: `krt_source = 176`). Unassigned in
/// iproute2's `rt_protos`.
pub const XLB_ROUTE_PROTOCOL: u8 = 176;

/// The loopback interface's index, the same in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

#[derive(Debug, Error)]
pub enum AnnounceError {
    #[error(
        "routing table {0} cannot hold announcements: use a table of its own, 1..=252 or \
         256 and above (0 is unspecified, 253-255 are the kernel's default, main and local)"
    )]
    ReservedTable(u32),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The routing table the agent announces through, and what it holds of xlb's.
#[derive(Debug)]
pub struct AnnounceTable {
    table: u32,
    announced: BTreeSet<IpAddr>,
}

impl AnnounceTable {
    /// Takes over `table`, with whatever xlb routes it holds already (a previous agent that
    /// kept the data path attached left them, and they stay announced until decided
    /// otherwise).
    ///
    /// # Errors
    /// A table number the kernel reserves, or netlink failing.
    pub fn open(table: u32) -> Result<Self, AnnounceError> {
        if table == 0 || (253..=255).contains(&table) {
            return Err(AnnounceError::ReservedTable(table));
        }
        let announced = xlb_routes(table)?;
        Ok(Self { table, announced })
    }

    #[must_use]
    pub const fn table(&self) -> u32 {
        self.table
    }

    /// The addresses announced now.
    #[must_use]
    pub const fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// Makes the table hold exactly `wanted`; returns what changed. A route that was
    /// already there, or already gone, counts as done: an operator or a previous agent may
    /// have got there first.
    ///
    /// # Errors
    /// Netlink failing: what was done before the failure is kept, the rest is retried by
    /// the next call.
    pub fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<RouteChanges, NetlinkError> {
        let changes = RouteChanges::between(&self.announced, wanted);
        if changes.is_empty() {
            return Ok(changes);
        }
        for addr in &changes.announce {
            announce(*addr, self.table)?;
            self.announced.insert(*addr);
        }
        for addr in &changes.withdraw {
            withdraw(*addr, self.table)?;
            self.announced.remove(addr);
        }
        Ok(changes)
    }

    /// Withdraws everything announced.
    ///
    /// # Errors
    /// As [`Self::sync`].
    pub fn withdraw_all(&mut self) -> Result<RouteChanges, NetlinkError> {
        self.sync(&BTreeSet::new())
    }
}

fn announce(addr: IpAddr, table: u32) -> Result<(), NetlinkError> {
    with_netlink(
        async |handle| match handle.route().add(host_route(addr, table)).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == nix::libc::EEXIST => {
                Ok(())
            }
            Err(source) => Err(NetlinkError::Request {
                what: "announcing a VIP",
                source,
            }),
        },
    )
}

fn withdraw(addr: IpAddr, table: u32) -> Result<(), NetlinkError> {
    with_netlink(
        async |handle| match handle.route().del(host_route(addr, table)).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e))
                if [nix::libc::ESRCH, nix::libc::ENOENT].contains(&e.raw_code().abs()) =>
            {
                Ok(())
            }
            Err(source) => Err(NetlinkError::Request {
                what: "withdrawing a VIP",
                source,
            }),
        },
    )
}

/// `addr/32 dev lo proto 176 table N` (`/128` for IPv6).
fn host_route(addr: IpAddr, table: u32) -> RouteMessage {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    rtnetlink::RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, prefix)
        .expect("a host prefix of the address's own family")
        .output_interface(LOOPBACK_INDEX)
        .table_id(table)
        .protocol(RouteProtocol::Other(XLB_ROUTE_PROTOCOL))
        .build()
}

/// The host routes of xlb's protocol in `table`, both families.
fn xlb_routes(table: u32) -> Result<BTreeSet<IpAddr>, NetlinkError> {
    with_netlink(async |handle| {
        let mut found = BTreeSet::new();
        for request in [
            rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build(),
            rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = handle.route().get(request).execute();
            while let Some(route) =
                routes
                    .try_next()
                    .await
                    .map_err(|source| NetlinkError::Request {
                        what: "listing routes",
                        source,
                    })?
            {
                if let Some(addr) = xlb_host_route(&route, table) {
                    found.insert(addr);
                }
            }
        }
        Ok(found)
    })
}

/// The address of a host route of xlb's in `table`, `None` for any other route.
fn xlb_host_route(route: &RouteMessage, table: u32) -> Option<IpAddr> {
    if route.header.protocol != RouteProtocol::Other(XLB_ROUTE_PROTOCOL) {
        return None;
    }
    let mut route_table = u32::from(route.header.table);
    let mut destination = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Table(t) => route_table = *t,
            RouteAttribute::Destination(d) => destination = Some(d),
            _ => {}
        }
    }
    if route_table != table {
        return None;
    }
    let addr = match destination? {
        rtnetlink::packet_route::route::RouteAddress::Inet(a) => IpAddr::V4(*a),
        rtnetlink::packet_route::route::RouteAddress::Inet6(a) => IpAddr::V6(*a),
        _ => return None,
    };
    let host = if addr.is_ipv4() { 32 } else { 128 };
    (route.header.destination_prefix_length == host).then_some(addr)
}
