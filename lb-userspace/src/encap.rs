//! The node's settings for direct server return: the outer source address of tunnelled
//! packets (one per family; none: the source of the kernel's route to the backend, which is
//! the balancer's own address towards it) and the UDP port GUE packets go to. Given by
//! `xlb run --encap-source ADDR --gue-port PORT` or the config's `[agent]` keys
//! `encap_source` and `gue_port`, and written into the one entry of `XLB_ENCAP`
//! ([`lb_common::EncapSettings`]) at start and on every reload.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{DEFAULT_GUE_PORT, EncapSettings};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::validate::{self, NetlinkError};

/// What the operator gave; each part unset means the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encap {
    /// Outer source of IPv4 tunnels; none: the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source of IPv6 tunnels; none: the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v6: Option<Ipv6Addr>,
    /// UDP destination port of GUE packets; none: `DEFAULT_GUE_PORT` (6080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncapError {
    #[error(
        "two IPv{family} encap sources, {first} and {second}: give at most one per address family"
    )]
    TwoOfAFamily {
        family: u8,
        first: IpAddr,
        second: IpAddr,
    },
    #[error(
        "encap source {0} is not a unicast address a packet can come from (leave it out to use the route's source)"
    )]
    NotUnicast(IpAddr),
    #[error("GUE port 0 is not a port (leave it out for {DEFAULT_GUE_PORT})")]
    GuePortZero,
}

#[derive(Debug, Error)]
pub enum EncapCheckError {
    #[error(
        "encap source {0} is not an address of this host: tunnelled packets from it would be spoofed (add it to an interface, or leave --encap-source out to use the route's source)"
    )]
    NotLocal(IpAddr),
    #[error("could not check whether encap source {addr} is this host's address")]
    Lookup {
        addr: IpAddr,
        #[source]
        source: NetlinkError,
    },
}

impl Encap {
    /// Settings from a list of sources (at most one per family) and a GUE port.
    ///
    /// # Errors
    /// Two sources of one family, a source no packet can come from, or port 0.
    pub fn new(sources: &[IpAddr], gue_port: Option<u16>) -> Result<Self, EncapError> {
        let mut encap = Self {
            gue_port,
            ..Self::default()
        };
        if gue_port == Some(0) {
            return Err(EncapError::GuePortZero);
        }
        for &addr in sources {
            let unusable = addr.is_unspecified()
                || addr.is_multicast()
                || addr.is_loopback()
                || matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
            if unusable {
                return Err(EncapError::NotUnicast(addr));
            }
            let taken = match addr {
                IpAddr::V4(v4) => encap.source_v4.replace(v4).map(IpAddr::V4),
                IpAddr::V6(v6) => encap.source_v6.replace(v6).map(IpAddr::V6),
            };
            if let Some(first) = taken {
                return Err(EncapError::TwoOfAFamily {
                    family: if addr.is_ipv4() { 4 } else { 6 },
                    first,
                    second: addr,
                });
            }
        }
        Ok(encap)
    }

    /// `self` (the command line's) over `file`'s, part by part: a flag wins over the config
    /// file, as for every other `[agent]` setting.
    #[must_use]
    pub fn over(self, file: Self) -> Self {
        Self {
            source_v4: self.source_v4.or(file.source_v4),
            source_v6: self.source_v6.or(file.source_v6),
            gue_port: self.gue_port.or(file.gue_port),
        }
    }

    /// The sources given, IPv4 first.
    #[must_use]
    pub fn sources(&self) -> Vec<IpAddr> {
        self.source_v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.source_v6.map(IpAddr::V6))
            .collect()
    }

    #[must_use]
    pub fn gue_port(&self) -> u16 {
        self.gue_port.unwrap_or(DEFAULT_GUE_PORT)
    }

    /// The `XLB_ENCAP` entry: unset sources all zero (the route's), the port big-endian.
    #[must_use]
    pub fn settings(&self) -> EncapSettings {
        EncapSettings {
            src_v4: self.source_v4.map_or([0; 4], |a| a.octets()),
            gue_port_be: self.gue_port().to_be(),
            _pad: 0,
            src_v6: self.source_v6.map_or([0; 16], |a| a.octets()),
        }
    }

    /// Refuses a source that is not an address of the agent's network namespace: the
    /// backend's decapsulation (and every firewall on the way) would see spoofed packets.
    ///
    /// # Errors
    /// A source this host does not have, or netlink failing.
    pub fn check_local(&self) -> Result<(), EncapCheckError> {
        for addr in self.sources() {
            match validate::local_owner(addr) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(EncapCheckError::NotLocal(addr)),
                Err(source) => return Err(EncapCheckError::Lookup { addr, source }),
            }
        }
        Ok(())
    }
}

/// One line for `xlb status`: `outer source: route's (default); GUE port 6080 (default)`.
impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.source_v4, self.source_v6) {
            (None, None) => f.write_str("outer source: route's (default)")?,
            (v4, v6) => {
                let show =
                    |a: Option<IpAddr>| a.map_or_else(|| "route's".to_owned(), |a| a.to_string());
                write!(
                    f,
                    "outer source: IPv4 {}, IPv6 {}",
                    show(v4.map(IpAddr::V4)),
                    show(v6.map(IpAddr::V6))
                )?;
            }
        }
        match self.gue_port {
            Some(port) => write!(f, "; GUE port {port}"),
            None => write!(f, "; GUE port {DEFAULT_GUE_PORT} (default)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_source_per_family_and_a_port_make_the_map_entry() {
        let encap = Encap::new(&[ip("2001:db8::7"), ip("192.0.2.7")], Some(9000)).unwrap();
        let settings = encap.settings();
        assert_eq!(settings.src_v4, [192, 0, 2, 7]);
        assert_eq!(settings.src_v6, ip6_octets("2001:db8::7"));
        assert_eq!(settings.gue_port_be.to_ne_bytes(), 9000u16.to_be_bytes());
        assert_eq!(encap.sources(), [ip("192.0.2.7"), ip("2001:db8::7")]);
        assert_eq!(
            encap.to_string(),
            "outer source: IPv4 192.0.2.7, IPv6 2001:db8::7; GUE port 9000"
        );
    }

    fn ip6_octets(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn nothing_given_is_the_routes_source_and_port_6080() {
        let encap = Encap::new(&[], None).unwrap();
        let settings = encap.settings();
        assert_eq!((settings.src_v4, settings.src_v6), ([0; 4], [0; 16]));
        assert_eq!(u16::from_be(settings.gue_port_be), 6080);
        assert_eq!(
            encap.to_string(),
            "outer source: route's (default); GUE port 6080 (default)"
        );
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        assert_eq!(
            Encap::new(&[ip("192.0.2.7"), ip("192.0.2.8")], None)
                .unwrap_err()
                .to_string(),
            "two IPv4 encap sources, 192.0.2.7 and 192.0.2.8: give at most one per address family"
        );
        for bad in [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "127.0.0.1",
            "255.255.255.255",
            "ff02::1",
        ] {
            assert_eq!(
                Encap::new(&[ip(bad)], None),
                Err(EncapError::NotUnicast(ip(bad)))
            );
        }
        assert_eq!(Encap::new(&[], Some(0)), Err(EncapError::GuePortZero));
    }

    #[test]
    fn flags_win_over_the_file_part_by_part() {
        let flags = Encap::new(&[ip("192.0.2.7")], None).unwrap();
        let file = Encap::new(&[ip("192.0.2.9"), ip("2001:db8::9")], Some(7000)).unwrap();
        assert_eq!(
            flags.over(file),
            Encap::new(&[ip("192.0.2.7"), ip("2001:db8::9")], Some(7000)).unwrap()
        );
    }

    /// Needs no root: reading the namespace's addresses is allowed to anyone.
    #[test]
    fn a_source_this_host_lacks_is_refused() {
        let absent = Encap::new(&[ip("192.0.2.77")], None).unwrap();
        assert_eq!(
            absent.check_local().unwrap_err().to_string(),
            "encap source 192.0.2.77 is not an address of this host: tunnelled packets from it \
             would be spoofed (add it to an interface, or leave --encap-source out to use the \
             route's source)"
        );
        assert!(Encap::default().check_local().is_ok());
        let local = Encap {
            source_v4: Some(Ipv4Addr::LOCALHOST),
            ..Encap::default()
        };
        assert!(local.check_local().is_ok(), "every namespace has 127.0.0.1");
    }
}
