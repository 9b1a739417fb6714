//! The next hops of tunnelled backends, kept resolved by the kernel.
//!
//! The data path sends a tunnelled packet only to a next hop whose MAC the kernel's
//! neighbour table holds (`bpf_fib_lookup`), and unlike a NAT-ed packet it cannot leave one
//! to the stack to resolve: the stack would see its own address as the source. Replies
//! never come back through the balancer either, so nothing else makes the kernel resolve a
//! backend on the balancer's own link. A "managed" neighbour entry (Linux 5.16,
//! `NTF_EXT_MANAGED`) makes the kernel resolve the next hop and keep it resolved, as
//! Cilium does for its XDP load balancer's backends.

use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::{
    neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteType},
};

use crate::validate::{NetlinkError, with_netlink};

/// Where a backend's packets go next: the interface and the neighbour on it (the gateway, or
/// the backend itself on a directly connected network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub neighbour: IpAddr,
}

/// Makes sure the kernel keeps the next hop towards each of `backends` resolved. A next
/// hop with an entry already (learned, or set by the operator) keeps it as it is; the next
/// call makes a managed entry once a learned one has expired. Backends without a route, or
/// local, have no next hop and are skipped (the address checks report those). Returns the
/// next hops that now have a managed entry.
///
/// # Errors
/// Netlink failing for another reason than a missing route or an existing entry.
pub fn keep_resolved(backends: &[IpAddr]) -> Result<Vec<NextHop>, NetlinkError> {
    let backends = backends.to_vec();
    with_netlink(async move |handle| {
        let mut managed = Vec::new();
        for backend in backends {
            let Some(hop) = next_hop(&handle, backend).await? else {
                continue;
            };
            if managed.contains(&hop) {
                continue;
            }
            let mut request = handle
                .neighbours()
                .add(hop.ifindex, hop.neighbour)
                .state(NeighbourState::None);
            request
                .message_mut()
                .attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            match request.execute().await {
                Ok(()) => managed.push(hop),
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code().abs() == nix::libc::EEXIST => {}
                Err(source) => {
                    return Err(NetlinkError::Request {
                        what: "adding a managed neighbour entry",
                        source,
                    });
                }
            }
        }
        Ok(managed)
    })
}

/// `ip route get BACKEND`: the interface and the gateway, or the backend itself when the
/// route has none. `None` for no route and for local or broadcast destinations.
async fn next_hop(
    handle: &rtnetlink::Handle,
    backend: IpAddr,
) -> Result<Option<NextHop>, NetlinkError> {
    let prefix = if backend.is_ipv4() { 32 } else { 128 };
    let request = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(backend, prefix)
        .expect("a host prefix of the address's own family")
        .build();
    let message = match handle.route().get(request).execute().try_next().await {
        Ok(Some(message)) => message,
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
        Err(source) => {
            return Err(NetlinkError::Request {
                what: "looking up a route",
                source,
            });
        }
    };
    if message.header.kind != RouteType::Unicast {
        return Ok(None);
    }
    let mut ifindex = None;
    let mut gateway = None;
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    Ok(ifindex.map(|ifindex| NextHop {
        ifindex,
        neighbour: gateway.unwrap_or(backend),
    }))
}
