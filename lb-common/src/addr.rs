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
    is_v4_mapped_words(words(*addr))
}

/// An address as two native words (the in-memory layout of its 16 bytes): what the parser
/// stores, with two 8-byte stores (see `parse::parse_into`).
#[inline(always)]
#[must_use]
pub const fn words(a: [u8; 16]) -> [u64; 2] {
    [
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    ]
}

/// A 16-byte address field as four native 32-bit words, read with four 4-byte loads. In
/// eBPF, reading the bytes of a `[u8; 16]` assembles each word from four byte loads: the
/// array's alignment is 1 and the BPF ISA has no unaligned loads.
///
/// # Safety
/// `addr` must be 4-aligned: a field at a 4-aligned offset of a struct aligned to 4 or more
/// (each caller asserts its struct's layout).
#[inline(always)]
#[must_use]
pub unsafe fn load_u32_words(addr: &[u8; 16]) -> [u32; 4] {
    // SAFETY: the caller vouches for the alignment; both types are 16 bytes, and any bits
    // are a valid `[u32; 4]`.
    unsafe { core::ptr::read(core::ptr::from_ref(addr).cast::<[u32; 4]>()) }
}

/// As `load_u32_words`, as two 8-byte words.
///
/// # Safety
/// `addr` must be 8-aligned: a field at an 8-aligned offset of a struct aligned to 8.
#[inline(always)]
#[must_use]
pub unsafe fn load_u64_words(addr: &[u8; 16]) -> [u64; 2] {
    // SAFETY: as in `load_u32_words`.
    unsafe { core::ptr::read(core::ptr::from_ref(addr).cast::<[u64; 2]>()) }
}

/// `v4_mapped` as two native words.
#[inline(always)]
#[must_use]
pub const fn v4_mapped_words(a: [u8; 4]) -> [u64; 2] {
    [
        0,
        u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]),
    ]
}

/// `is_v4_mapped` of an address given as `words`.
#[inline(always)]
#[must_use]
pub const fn is_v4_mapped_words(w: [u64; 2]) -> bool {
    w[0] == 0 && w[1] as u32 == u32::from_ne_bytes([0, 0, 0xff, 0xff])
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
    fn address_words_are_the_addresses_bytes() {
        let v4 = v4_mapped([192, 0, 2, 10]);
        assert_eq!(v4_mapped_words([192, 0, 2, 10]), words(v4));
        assert!(is_v4_mapped_words(words(v4)) && is_v4_mapped(&v4));
        let v6: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4,
        ];
        assert!(!is_v4_mapped_words(words(v6)) && !is_v4_mapped(&v6));
        let mut almost = v4;
        almost[9] = 1;
        assert!(!is_v4_mapped_words(words(almost)) && !is_v4_mapped(&almost));
    }

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
