//! Family-agnostic 16-byte addresses: IPv6 as is, IPv4 mapped into `::ffff:0:0/96`.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{FlowKey, VipKey};

#[must_use]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = octets[0];
    out[13] = octets[1];
    out[14] = octets[2];
    out[15] = octets[3];
    out
}

/// Whether `addr` is in `::ffff:0:0/96`. As two words, not a slice comparison: the eBPF
/// build calls it per IPv6 packet and must neither call `memcmp` nor copy the address.
#[inline(always)]
#[must_use]
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let head = u64::from_ne_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let tail = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
    head == 0 && tail == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[must_use]
pub fn to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[must_use]
pub fn from_bytes(addr: &[u8; 16]) -> IpAddr {
    if is_v4_mapped(addr) {
        IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

impl VipKey {
    #[must_use]
    pub fn new(addr: SocketAddr, proto: u8) -> Self {
        Self {
            addr: to_bytes(addr.ip()),
            port_be: addr.port().to_be(),
            proto,
            _pad: [0; 5],
        }
    }

    #[must_use]
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(from_bytes(&self.addr), u16::from_be(self.port_be))
    }
}

impl FlowKey {
    /// The key of a flow from `client` to `vip`, as the data plane builds it from a packet.
    #[must_use]
    pub fn new(client: SocketAddr, vip: SocketAddr, proto: u8) -> Self {
        Self {
            src: to_bytes(client.ip()),
            dst: to_bytes(vip.ip()),
            sport_be: client.port().to_be(),
            dport_be: vip.port().to_be(),
            proto,
            _pad: [0; 3],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for ip in ["192.0.2.10", "2001:db8::1", "::1", "0.0.0.0"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_bytes(&to_bytes(ip)), ip);
        }
        assert!(is_v4_mapped(&to_bytes("10.0.0.1".parse().unwrap())));
        assert!(!is_v4_mapped(&to_bytes("2001:db8::1".parse().unwrap())));
    }

    #[test]
    fn vip_key_keeps_port_in_network_order() {
        let key = VipKey::new("192.0.2.10:80".parse().unwrap(), crate::IPPROTO_TCP);
        assert_eq!(key.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(key.socket_addr(), "192.0.2.10:80".parse().unwrap());
    }
}
