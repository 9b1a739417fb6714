//! Checks of VIP and backend addresses against the agent's own network namespace, asked of
//! the kernel over netlink ([`local_owner`], [`route_interface`]). The checks that need
//! nothing but the addresses live in `xlb_core::address` and are re-exported here.

use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use thiserror::Error;
pub use xlb_core::address::{
    AddressError, ContainerNameError, Reason, Role, Route, check_backend,
    check_backend_against_vips, check_container_name, check_vip, check_vip_against_backends,
    route_warning,
};

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket")]
    Open(#[source] std::io::Error),
    #[error("{what} over netlink")]
    Request {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the netlink helper thread panicked")]
    Panicked,
}

/// Runs a netlink conversation to completion from any context: a plain thread, a blocking
/// task, or the agent's event loop (where blocking on the runtime itself would panic). The
/// helper thread is created by the calling thread, so it shares its network namespace.
pub(crate) fn with_netlink<T: Send>(
    talk: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T, NetlinkError> + Send,
) -> Result<T, NetlinkError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(NetlinkError::Open)?;
                runtime.block_on(async {
                    let (connection, handle, _) =
                        rtnetlink::new_connection().map_err(NetlinkError::Open)?;
                    let task = tokio::spawn(connection);
                    let result = talk(handle).await;
                    task.abort();
                    result
                })
            })
            .join()
            .unwrap_or(Err(NetlinkError::Panicked))
    })
}

fn iface_name(index: u32) -> String {
    nix::net::if_::if_indextoname(index).map_or_else(
        |_| format!("interface #{index}"),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// The interface of the agent's network namespace that holds `ip`, if one does.
///
/// # Errors
/// Netlink failing.
pub fn local_owner(ip: IpAddr) -> Result<Option<String>, NetlinkError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let index = with_netlink(async move |handle| {
        let mut addresses = handle.address().get().execute();
        while let Some(message) =
            addresses
                .try_next()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: "listing addresses",
                    source,
                })?
        {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
            // point-to-point link, and the own one everywhere else.
            let mut local = None;
            let mut address = None;
            for attr in &message.attributes {
                match attr {
                    AddressAttribute::Local(a) => local = Some(*a),
                    AddressAttribute::Address(a) => address = Some(*a),
                    _ => {}
                }
            }
            if local.or(address) == Some(ip) {
                return Ok(Some(message.header.index));
            }
        }
        Ok(None)
    })?;
    Ok(index.map(iface_name))
}

/// `ip route get ADDR` in the agent's network namespace.
///
/// # Errors
/// Netlink failing for another reason than there being no route.
pub fn route_interface(ip: IpAddr) -> Result<Route, NetlinkError> {
    use rtnetlink::packet_route::route::{RouteAttribute, RouteType};
    let route = with_netlink(async move |handle| {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let request = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, prefix)
            .expect("a host prefix of the address's own family")
            .build();
        match handle.route().get(request).execute().try_next().await {
            Ok(Some(message)) => {
                match message.header.kind {
                    RouteType::Local => return Ok(Route::Local),
                    RouteType::Broadcast => return Ok(Route::Broadcast),
                    _ => {}
                }
                let oif = message.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                });
                Ok(match oif {
                    Some(index) => Route::Out {
                        ifindex: index,
                        ifname: String::new(),
                    },
                    None => Route::None(format!("a {:?} route", message.header.kind)),
                })
            }
            Ok(None) => Ok(Route::None("no route".to_owned())),
            // The kernel answers "network is unreachable" and the like with an error code.
            Err(rtnetlink::Error::NetlinkError(e)) => Ok(Route::None(
                nix::errno::Errno::from_raw(e.raw_code().abs())
                    .desc()
                    .to_lowercase(),
            )),
            Err(source) => Err(NetlinkError::Request {
                what: "looking up a route",
                source,
            }),
        }
    })?;
    Ok(match route {
        Route::Out { ifindex, .. } => Route::Out {
            ifindex,
            ifname: iface_name(ifindex),
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loopback interface exists in every namespace, with 127.0.0.1 on it.
    #[test]
    fn netlink_knows_the_loopback_address_and_route() {
        assert_eq!(
            local_owner("127.0.0.1".parse().unwrap())
                .unwrap()
                .as_deref(),
            Some("lo")
        );
        assert_eq!(local_owner("192.0.2.77".parse().unwrap()).unwrap(), None);
        assert_eq!(
            route_interface("127.0.0.1".parse().unwrap()).unwrap(),
            Route::Local
        );
    }
}
