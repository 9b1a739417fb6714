use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
    },
};

use crate::{Error, Netns};

/// Netlink to the local kernel answers in microseconds; a bound only turns a
/// wedged socket into an error instead of a hung test.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

/// What tests need to know about an interface to attach XDP to it or to
/// address frames to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    /// `None` for links without an Ethernet address (`lo` has all zeros,
    /// which is reported as such; tunnels have none).
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// Index of the bridge (or bond) this link is enslaved to.
    pub master: Option<u32>,
}

/// An interface's traffic counters as the kernel keeps them (`ip -s link`), for tests that
/// assert which way packets went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// Failures inside a netlink session, before the namespace name is known.
enum Fail {
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    NotFound(String),
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    Timeout(String),
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Fail {
    let op = op.into();
    move |source| Fail::Netlink { op, source }
}

impl Netns {
    /// Runs one netlink session inside the namespace: a netlink socket
    /// operates on the namespace it was opened in, so it is opened on a thread
    /// that has entered it, with a runtime that lives as long as the session.
    fn netlink<F, Fut, T>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = Result<T, Fail>>,
        T: Send,
    {
        let result = self.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(|source| Fail::Io {
                    op: "start tokio runtime",
                    source,
                })?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Fail::Io {
                    op: "open netlink socket",
                    source,
                })?;
                let conn = tokio::spawn(conn);
                let out = tokio::time::timeout(NETLINK_TIMEOUT, f(handle)).await;
                conn.abort();
                out.unwrap_or_else(|_| Err(Fail::Timeout(what.to_owned())))
            })
        })?;
        let ns = self.name().to_owned();
        result.map_err(|fail| match fail {
            Fail::Netlink { op, source } => Error::Netlink { op, ns, source },
            Fail::NotFound(ifname) => Error::LinkNotFound { ifname, ns },
            Fail::Io { op, source } => Error::Runtime { op, ns, source },
            Fail::Timeout(op) => Error::NetlinkTimeout {
                op,
                ns,
                secs: NETLINK_TIMEOUT.as_secs(),
            },
        })
    }

    /// Index, MAC, MTU and master of `ifname` in one round trip.
    ///
    /// # Errors
    /// No such link, or netlink failed.
    pub fn link(&self, ifname: &str) -> Result<LinkInfo, Error> {
        self.netlink("get link", |h| async move {
            let msg = get_link(&h, ifname).await?;
            let mut info = LinkInfo {
                ifindex: msg.header.index,
                mac: None,
                mtu: None,
                master: None,
            };
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::Address(a) => info.mac = a.try_into().ok(),
                    LinkAttribute::Mtu(m) => info.mtu = Some(m),
                    LinkAttribute::Controller(m) => info.master = Some(m),
                    _ => {}
                }
            }
            Ok(info)
        })
    }

    /// The interface's packet and byte counters (`IFLA_STATS64`).
    ///
    /// # Errors
    /// No such link, or netlink failed.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats, Error> {
        self.netlink("get link stats", |h| async move {
            let msg = get_link(&h, ifname).await?;
            Ok(msg
                .attributes
                .into_iter()
                .find_map(|attr| match attr {
                    LinkAttribute::Stats64(s) => Some(LinkStats {
                        rx_packets: s.rx_packets,
                        rx_bytes: s.rx_bytes,
                        tx_packets: s.tx_packets,
                        tx_bytes: s.tx_bytes,
                    }),
                    _ => None,
                })
                .unwrap_or_default())
        })
    }

    /// # Errors
    /// No such link, or netlink failed.
    pub fn ifindex(&self, ifname: &str) -> Result<u32, Error> {
        Ok(self.link(ifname)?.ifindex)
    }

    /// # Errors
    /// No such link, the link has no 6-byte address, or netlink failed.
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6], Error> {
        self.link(ifname)?.mac.ok_or_else(|| Error::NoMac {
            ifname: ifname.to_owned(),
            ns: self.name().to_owned(),
        })
    }

    /// Creates a veth pair with `ifname` here and `peer_ifname` in `peer`,
    /// both down.
    ///
    /// The peer is created directly in its namespace (`IFLA_NET_NS_FD` on the
    /// peer), so it never exists in the caller's namespace, where its name
    /// could clash with another test's.
    ///
    /// # Errors
    /// A name is taken or invalid, or netlink failed.
    pub fn add_veth(&self, ifname: &str, peer: &Netns, peer_ifname: &str) -> Result<(), Error> {
        let peer_fd = peer.as_fd().as_raw_fd();
        self.netlink("add veth", |h| async move {
            let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
                .name(peer_ifname)
                .setns_by_fd(peer_fd)
                .build();
            let msg = LinkVeth::new(ifname, peer_ifname)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
                .build();
            h.link()
                .add(msg)
                .execute()
                .await
                .map_err(nl(format!("add veth {ifname} <-> {peer_ifname}")))
        })
    }

    /// # Errors
    /// No such link, or netlink failed.
    pub fn set_link_up(&self, ifname: &str) -> Result<(), Error> {
        self.set_link(ifname, "set up", LinkMessageBuilder::up)
    }

    /// Lets tests take a backend's link away, e.g. to exercise health checks.
    ///
    /// # Errors
    /// No such link, or netlink failed.
    pub fn set_link_down(&self, ifname: &str) -> Result<(), Error> {
        self.set_link(ifname, "set down", LinkMessageBuilder::down)
    }

    /// XDP on veth needs the MTU to fit a page with headroom, so tests that
    /// exercise large frames have to set it explicitly.
    ///
    /// # Errors
    /// No such link, the kernel refused the MTU, or netlink failed.
    pub fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), Error> {
        self.set_link(ifname, "set mtu", move |b| b.mtu(mtu))
    }

    /// Fixed addresses, for tests whose frames name the interface's MAC byte for byte.
    ///
    /// # Errors
    /// No such link, the kernel refused the address (e.g. the link is up and does not allow
    /// changing it live), or netlink failed.
    pub fn set_mac(&self, ifname: &str, mac: [u8; 6]) -> Result<(), Error> {
        self.set_link(ifname, "set address", move |b| b.address(mac.to_vec()))
    }

    /// Creates a bridge (up), for topologies where several namespaces share
    /// one L2 segment.
    ///
    /// # Errors
    /// The name is taken or invalid, or netlink failed.
    pub fn add_bridge(&self, name: &str) -> Result<(), Error> {
        self.netlink("add bridge", |h| async move {
            h.link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(nl(format!("add bridge {name}")))
        })
    }

    /// Enslaves `ifname` to `bridge`; both must be in this namespace.
    ///
    /// # Errors
    /// Either link is missing, or netlink failed.
    pub fn set_master(&self, ifname: &str, bridge: &str) -> Result<(), Error> {
        self.netlink("set master", |h| async move {
            let br = get_link(&h, bridge).await?.header.index;
            let idx = get_link(&h, ifname).await?.header.index;
            let msg = LinkUnspec::new_with_index(idx).controller(br).build();
            h.link()
                .set(msg)
                .execute()
                .await
                .map_err(nl(format!("attach {ifname} to {bridge}")))
        })
    }

    /// # Errors
    /// No such link, or netlink failed.
    pub fn delete_link(&self, ifname: &str) -> Result<(), Error> {
        self.netlink("delete link", |h| async move {
            let idx = get_link(&h, ifname).await?.header.index;
            h.link()
                .del(idx)
                .execute()
                .await
                .map_err(nl(format!("delete {ifname}")))
        })
    }

    /// Adds `addr` (address and prefix length, e.g. `10.0.0.1/24`) to
    /// `ifname`.
    ///
    /// IPv6 addresses get `IFA_F_NODAD` so they can be bound and used as a
    /// source at once instead of staying tentative for about a second.
    ///
    /// # Errors
    /// No such link, the address exists, or netlink failed.
    pub fn add_address(&self, ifname: &str, addr: impl Into<IpNet>) -> Result<(), Error> {
        let addr = addr.into();
        self.netlink("add address", |h| async move {
            let idx = get_link(&h, ifname).await?.header.index;
            let mut req = h.address().add(idx, addr.addr(), addr.prefix_len());
            if addr.addr().is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(nl(format!("add {addr} to {ifname}")))
        })
    }

    /// Routes `dest` via the gateway `via` (`ip route add DEST via VIA`).
    /// Host bits in `dest` are ignored.
    ///
    /// # Errors
    /// `dest` and `via` differ in family, the gateway is not reachable on a
    /// connected prefix, the route exists, or netlink failed.
    pub fn add_route(&self, dest: impl Into<IpNet>, via: IpAddr) -> Result<(), Error> {
        let dest = dest.into().trunc();
        let msg = match (dest, via) {
            (IpNet::V4(d), IpAddr::V4(gw)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .gateway(gw)
                .build(),
            (IpNet::V6(d), IpAddr::V6(gw)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .gateway(gw)
                .build(),
            _ => {
                return Err(Error::FamilyMismatch {
                    what: "add route",
                    detail: format!("{dest} via {via}"),
                });
            }
        };
        self.netlink("add route", |h| async move {
            h.route()
                .add(msg)
                .execute()
                .await
                .map_err(nl(format!("add route {dest} via {via}")))
        })
    }

    /// Routes `dest` straight out of `ifname`, with no gateway (`ip route add DEST dev
    /// IFNAME`): whatever is in `dest` is a neighbour on that link. Host bits in `dest` are
    /// ignored.
    ///
    /// # Errors
    /// No such link, the route exists, or netlink failed.
    pub fn add_route_dev(&self, dest: impl Into<IpNet>, ifname: &str) -> Result<(), Error> {
        let dest = dest.into().trunc();
        self.netlink("add route", |h| async move {
            let idx = get_link(&h, ifname).await?.header.index;
            let msg = match dest {
                IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .output_interface(idx)
                    .build(),
                IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .output_interface(idx)
                    .build(),
            };
            h.route()
                .add(msg)
                .execute()
                .await
                .map_err(nl(format!("add route {dest} dev {ifname}")))
        })
    }

    /// `ip route add default via VIA`, for the family of `via`.
    ///
    /// # Errors
    /// As for [`Netns::add_route`].
    pub fn add_default_route(&self, via: IpAddr) -> Result<(), Error> {
        let dest = match via {
            IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
            IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
        };
        self.add_route(dest, via)
    }

    /// Adds (or replaces) a permanent neighbour entry, so frames to `ip` go to
    /// `mac` without ARP/NDP: needed when the "neighbour" is a VIP that only
    /// an XDP program answers for, or to make a benchmark's first packets
    /// deterministic.
    ///
    /// # Errors
    /// No such link, or netlink failed.
    pub fn add_neighbour(&self, ifname: &str, ip: IpAddr, mac: [u8; 6]) -> Result<(), Error> {
        self.netlink("add neighbour", |h| async move {
            let idx = get_link(&h, ifname).await?.header.index;
            h.neighbours()
                .add(idx, ip)
                .link_layer_address(&mac)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add neighbour {ip} on {ifname}")))
        })
    }

    fn set_link(
        &self,
        ifname: &str,
        what: &'static str,
        edit: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec> + Send,
    ) -> Result<(), Error> {
        self.netlink(what, |h| async move {
            let idx = get_link(&h, ifname).await?.header.index;
            let msg = edit(LinkUnspec::new_with_index(idx)).build();
            h.link()
                .set(msg)
                .execute()
                .await
                .map_err(nl(format!("{what} {ifname}")))
        })
    }
}

async fn get_link(h: &Handle, ifname: &str) -> Result<LinkMessage, Fail> {
    let mut links = h.link().get().match_name(ifname).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(msg),
        Ok(None) => Err(Fail::NotFound(ifname.to_owned())),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(Fail::NotFound(ifname.to_owned()))
        }
        Err(source) => Err(Fail::Netlink {
            op: format!("look up {ifname}"),
            source,
        }),
    }
}
