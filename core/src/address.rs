//! Addresses that can never work as a VIP or a backend, refused before they reach the data
//! plane, and the warning for a backend whose replies would bypass xlb.
//!
//! The data plane keys VIPs and backends by a 16-byte address (IPv4 mapped into
//! `::ffff:0:0/96`), a port and a protocol, and forwards translated packets out of the host.
//! So an IPv6 scope id or an IPv4-mapped spelling names an address the data plane already
//! knows under another name (accepting it would replace the live VIP's entry), and a backend
//! on a loopback, link-local or local address is one a forwarded packet cannot reach.
//!
//! These checks need nothing but the addresses; the agent asks the kernel (over netlink)
//! what its own namespace holds and routes, and words the answer with [`Reason::Local`],
//! [`Reason::LocalRoute`] and [`route_warning`].

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use thiserror::Error;

use crate::model::{Forwarding, VipSpec};

/// Whether an address was given as a VIP or as a backend: the reasons differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Vip,
    Backend,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vip => "VIP",
            Self::Backend => "backend",
        })
    }
}

/// Why an address is refused; shown after the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    PortZero,
    Unspecified,
    Broadcast,
    Multicast,
    Loopback,
    LinkLocal,
    /// An IPv6 scope id (`%N`); carries the address without it.
    ScopeId {
        id: u32,
        plain: SocketAddr,
    },
    /// `::ffff:a.b.c.d`; carries the IPv4 spelling.
    V4Mapped {
        plain: SocketAddr,
    },
    /// A backend on the address of a VIP (its own or another one).
    IsVip {
        vip: VipSpec,
    },
    /// A VIP on the address of a backend of some VIP.
    IsBackend {
        vip: VipSpec,
        backend: SocketAddr,
    },
    /// A backend on an address of the agent's own network namespace.
    Local {
        iface: String,
    },
    /// A backend the agent's namespace routes to itself (a `local` route, no interface
    /// holds it).
    LocalRoute,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{role} {addr} {reason}")]
pub struct AddressError {
    pub role: Role,
    /// As the operator wrote it (with `/proto` for a VIP).
    pub addr: String,
    pub reason: Reason,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PortZero => f.write_str("has port 0, which is not a service port"),
            Self::Unspecified => f.write_str("is the unspecified address, which names no host"),
            Self::Broadcast => {
                f.write_str("is a broadcast address: xlb balances unicast flows only")
            }
            Self::Multicast => f.write_str("is a multicast address: xlb balances unicast flows only"),
            Self::Loopback => f.write_str(
                "is a loopback address: packets to it never cross an interface xlb is attached to",
            ),
            Self::LinkLocal => f.write_str(
                "is link-local: the data plane keeps no interface scope, so it cannot tell which link it is on (use a global or unique-local address)",
            ),
            Self::ScopeId { id, plain } => write!(
                f,
                "carries a scope id (%{id}): the data plane matches addresses without one, so it would stand for {plain} (write that)"
            ),
            Self::V4Mapped { plain } => write!(
                f,
                "is an IPv4-mapped IPv6 address: the data plane stores it as {plain} (write that)"
            ),
            Self::IsVip { vip } => write!(
                f,
                "is the address of VIP {vip}: translated packets would come back to the load balancer instead of reaching a server"
            ),
            Self::IsBackend { vip, backend } => write!(
                f,
                "is the address of backend {backend} of VIP {vip}: an address is either a VIP or a backend"
            ),
            Self::Local { iface } => write!(
                f,
                "is this host's own address (on {iface}, in the agent's network namespace): the data plane forwards packets out of the host, it cannot deliver them to itself"
            ),
            Self::LocalRoute => f.write_str(
                "is delivered locally in the agent's network namespace (a local route): the data plane forwards packets out of the host, it cannot deliver them to itself",
            ),
        }
    }
}

/// What is wrong with `addr` as such, whatever it is used for.
fn address_problem(addr: SocketAddr) -> Option<Reason> {
    if let SocketAddr::V6(v6) = addr
        && let Some(v4) = v6.ip().to_ipv4_mapped()
    {
        return Some(Reason::V4Mapped {
            plain: SocketAddr::new(v4.into(), addr.port()),
        });
    }
    let ip = addr.ip();
    if ip.is_unspecified() {
        return Some(Reason::Unspecified);
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Some(Reason::Broadcast);
    }
    if ip.is_multicast() {
        return Some(Reason::Multicast);
    }
    if ip.is_loopback() {
        return Some(Reason::Loopback);
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if link_local {
        return Some(Reason::LinkLocal);
    }
    if let SocketAddr::V6(v6) = addr
        && v6.scope_id() != 0
    {
        return Some(Reason::ScopeId {
            id: v6.scope_id(),
            plain: SocketAddr::new(ip, addr.port()),
        });
    }
    if addr.port() == 0 {
        return Some(Reason::PortZero);
    }
    None
}

/// Refuses VIPs no client packet could ever be balanced for, or that alias another VIP.
///
/// # Errors
/// The first problem found.
pub fn check_vip(vip: &VipSpec) -> Result<(), AddressError> {
    match address_problem(vip.addr) {
        Some(reason) => Err(AddressError {
            role: Role::Vip,
            addr: vip.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Refuses backends no forwarded packet could reach, including the VIP's own address.
///
/// # Errors
/// The first problem found.
pub fn check_backend(vip: &VipSpec, backend: SocketAddr) -> Result<(), AddressError> {
    check_backend_against_vips(backend, std::iter::once(*vip))
}

/// [`check_backend`], and refuses the address of any of `vips` too.
///
/// # Errors
/// The first problem found.
pub fn check_backend_against_vips(
    backend: SocketAddr,
    vips: impl IntoIterator<Item = VipSpec>,
) -> Result<(), AddressError> {
    let refuse = |reason| AddressError {
        role: Role::Backend,
        addr: backend.to_string(),
        reason,
    };
    if let Some(reason) = address_problem(backend) {
        return Err(refuse(reason));
    }
    match vips.into_iter().find(|v| v.addr.ip() == backend.ip()) {
        Some(vip) => Err(refuse(Reason::IsVip { vip })),
        None => Ok(()),
    }
}

/// Refuses a VIP on the address of one of `backends` (pairs of VIP and backend).
///
/// # Errors
/// The backend it collides with.
pub fn check_vip_against_backends(
    vip: &VipSpec,
    backends: impl IntoIterator<Item = (VipSpec, SocketAddr)>,
) -> Result<(), AddressError> {
    match backends.into_iter().find(|(_, b)| b.ip() == vip.addr.ip()) {
        Some((of, backend)) => Err(AddressError {
            role: Role::Vip,
            addr: vip.to_string(),
            reason: Reason::IsBackend { vip: of, backend },
        }),
        None => Ok(()),
    }
}

/// A container name xlb will hand to `podman`/`docker inspect`.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error(
    "'{0}' is not a valid container name: podman and docker names are [a-zA-Z0-9][a-zA-Z0-9_.-]*"
)]
pub struct ContainerNameError(pub String);

/// Refuses what podman and docker would never accept as a container name (their rule:
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; a full or short id fits it too). Above all a name starting
/// with `-`, which `inspect` would read as an option (`--latest` inspects another container).
///
/// # Errors
/// The name breaking that rule.
pub fn check_container_name(name: &str) -> Result<(), ContainerNameError> {
    let mut bytes = name.bytes();
    let valid = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ContainerNameError(name.to_owned()))
    }
}

/// Where the agent's namespace sends packets for an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Delivered to the host itself.
    Local,
    /// A directed broadcast address of one of the namespace's subnets.
    Broadcast,
    /// Out of this interface.
    Out { ifindex: u32, ifname: String },
    /// The kernel knows no way there (or refuses one: unreachable, prohibit, blackhole).
    None(String),
}

/// The warning for a NAT backend whose traffic would leave through an interface xlb is not
/// attached to (its replies would reach clients untranslated), or for any backend that has
/// no route at all; `None` when the route is fine. `attached` holds (name, index) of the
/// agent's interfaces. A direct-server-return backend answers clients itself, so where its
/// route leaves does not matter.
#[must_use]
pub fn route_warning(
    backend: SocketAddr,
    forwarding: Forwarding,
    route: &Route,
    attached: &[(String, u32)],
) -> Option<String> {
    match route {
        Route::Out { ifindex, ifname }
            if !forwarding.is_dsr() && !attached.iter().any(|(_, i)| i == ifindex) =>
        {
            Some(format!(
                "backend {backend} is reached through {ifname}, which xlb is not attached to: its replies would not be translated back to the VIP (add --iface {ifname} to `xlb run`)"
            ))
        }
        Route::Out { .. } | Route::Local | Route::Broadcast => None,
        Route::None(why) => Some(format!(
            "backend {backend} has no route in the agent's network namespace ({why}): packets for it will be dropped until there is one"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(s: &str) -> VipSpec {
        s.parse().unwrap()
    }

    fn backend_reason(vip_text: &str, backend: &str) -> Option<Reason> {
        check_backend(&vip(vip_text), backend.parse().unwrap())
            .err()
            .map(|e| e.reason)
    }

    fn vip_reason(text: &str) -> Option<Reason> {
        check_vip(&vip(text)).err().map(|e| e.reason)
    }

    #[test]
    fn ordinary_addresses_pass() {
        for v in [
            "192.0.2.10:80/tcp",
            "10.100.0.1:53/udp",
            "[2001:db8::10]:443/tcp",
            "[fd00:100::1]:53/udp",
        ] {
            assert_eq!(vip_reason(v), None, "{v}");
        }
        for b in ["10.11.0.2:8080", "198.51.100.7:80", "192.168.1.255:80"] {
            assert_eq!(backend_reason("192.0.2.10:80/tcp", b), None, "{b}");
        }
        assert_eq!(
            backend_reason("[2001:db8::10]:443", "[fd00:11::2]:8443"),
            None
        );
    }

    #[test]
    fn addresses_that_cannot_work_are_refused() {
        let cases: &[(&str, Reason)] = &[
            ("0.0.0.0:80", Reason::Unspecified),
            ("[::]:80", Reason::Unspecified),
            ("255.255.255.255:80", Reason::Broadcast),
            ("224.0.0.1:80", Reason::Multicast),
            ("239.1.2.3:5000", Reason::Multicast),
            ("[ff02::1]:80", Reason::Multicast),
            ("127.0.0.1:80", Reason::Loopback),
            ("127.9.9.9:80", Reason::Loopback),
            ("[::1]:80", Reason::Loopback),
            ("169.254.1.1:80", Reason::LinkLocal),
            ("[fe80::1]:80", Reason::LinkLocal),
            ("[fe80::1%2]:80", Reason::LinkLocal),
        ];
        for (addr, reason) in cases {
            assert_eq!(
                vip_reason(&format!("{addr}/tcp")).as_ref(),
                Some(reason),
                "VIP {addr}"
            );
            let family_vip = if addr.starts_with('[') {
                "[2001:db8::10]:80/tcp"
            } else {
                "192.0.2.10:80/tcp"
            };
            assert_eq!(
                backend_reason(family_vip, addr).as_ref(),
                Some(reason),
                "backend {addr}"
            );
        }
        assert_eq!(
            backend_reason("192.0.2.10:80", "10.11.0.2:0"),
            Some(Reason::PortZero)
        );
    }

    #[test]
    fn aliases_of_an_address_are_refused_with_the_plain_spelling() {
        let e = check_vip(&vip("[::ffff:10.0.0.1]:80/tcp")).unwrap_err();
        assert_eq!(
            e.reason,
            Reason::V4Mapped {
                plain: "10.0.0.1:80".parse().unwrap()
            }
        );
        assert_eq!(
            e.to_string(),
            "VIP [::ffff:10.0.0.1]:80/tcp is an IPv4-mapped IPv6 address: the data plane stores it as 10.0.0.1:80 (write that)"
        );
        // Mapped loopback is named for what it maps, not as "loopback".
        assert!(matches!(
            vip_reason("[::ffff:127.0.0.1]:80"),
            Some(Reason::V4Mapped { .. })
        ));
        let e = check_vip(&vip("[fd00::1%1]:80/tcp")).unwrap_err();
        assert_eq!(
            e.reason,
            Reason::ScopeId {
                id: 1,
                plain: "[fd00::1]:80".parse().unwrap()
            }
        );
        assert!(
            e.to_string()
                .starts_with("VIP [fd00::1%1]:80/tcp carries a scope id (%1)"),
            "{e}"
        );
        assert!(matches!(
            backend_reason("[fd00::10]:80", "[fd00::2%3]:8080"),
            Some(Reason::ScopeId { id: 3, .. })
        ));
        assert!(matches!(
            backend_reason("[fd00::10]:80", "[::ffff:10.0.0.2]:8080"),
            Some(Reason::V4Mapped { .. })
        ));
    }

    #[test]
    fn a_vip_is_never_a_backend() {
        let web = vip("10.100.0.1:80/tcp");
        // Its own address, on its own port or another.
        for b in ["10.100.0.1:80", "10.100.0.1:8080"] {
            let e = check_backend(&web, b.parse().unwrap()).unwrap_err();
            assert_eq!(e.reason, Reason::IsVip { vip: web }, "{b}");
            assert!(
                e.to_string().starts_with(&format!(
                    "backend {b} is the address of VIP 10.100.0.1:80/tcp"
                )),
                "{e}"
            );
        }
        // Another VIP's address.
        let dns = vip("10.100.0.2:53/udp");
        let e =
            check_backend_against_vips("10.100.0.2:8080".parse().unwrap(), [web, dns]).unwrap_err();
        assert_eq!(e.reason, Reason::IsVip { vip: dns });
        assert!(check_backend_against_vips("10.11.0.2:80".parse().unwrap(), [web, dns]).is_ok());

        // And the other way round: a new VIP on a backend's address.
        let b0: SocketAddr = "10.11.0.2:8080".parse().unwrap();
        let e = check_vip_against_backends(&vip("10.11.0.2:80/tcp"), [(web, b0)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VIP 10.11.0.2:80/tcp is the address of backend 10.11.0.2:8080 of VIP 10.100.0.1:80/tcp: an address is either a VIP or a backend"
        );
        assert!(check_vip_against_backends(&vip("10.11.0.3:80/tcp"), [(web, b0)]).is_ok());
    }

    #[test]
    fn route_warnings_name_the_interface_and_the_fix() {
        let backend: SocketAddr = "10.12.0.2:80".parse().unwrap();
        let attached = vec![("eth0".to_owned(), 2), ("veth-b0".to_owned(), 5)];
        let out = |ifindex, ifname: &str| Route::Out {
            ifindex,
            ifname: ifname.to_owned(),
        };
        let nat = Forwarding::Nat;
        assert_eq!(
            route_warning(backend, nat, &out(5, "veth-b0"), &attached),
            None
        );
        assert_eq!(route_warning(backend, nat, &Route::Local, &attached), None);
        // Replies of a DSR backend go straight to the client: any way out is fine.
        assert_eq!(
            route_warning(backend, Forwarding::Gue, &out(7, "veth-b1"), &attached),
            None
        );
        let w = route_warning(backend, nat, &out(7, "veth-b1"), &attached).unwrap();
        assert_eq!(
            w,
            "backend 10.12.0.2:80 is reached through veth-b1, which xlb is not attached to: its replies would not be translated back to the VIP (add --iface veth-b1 to `xlb run`)"
        );
        for forwarding in Forwarding::ALL {
            let w = route_warning(
                backend,
                forwarding,
                &Route::None("network is unreachable".into()),
                &attached,
            )
            .unwrap();
            assert!(
                w.contains("has no route") && w.contains("network is unreachable"),
                "{w}"
            );
        }
    }

    #[test]
    fn container_names_follow_podmans_rule() {
        for good in ["web-1", "db.primary", "a", "0f3c9a1b2c3d", "svc_2"] {
            assert_eq!(check_container_name(good), Ok(()), "{good}");
        }
        for bad in [
            "", "-x", "--latest", ".hidden", "_x", "a b", "a/b", "a:b", "naïve",
        ] {
            assert!(check_container_name(bad).is_err(), "{bad:?}");
        }
    }
}
