//! Deterministic, seeded hashes. Every xlb node given the same seed computes the same values,
//! which is what lets several nodes behind ECMP agree on a flow's backend without talking.

use crate::FlowKey;

/// MurmurHash3's 64-bit finaliser: every input bit flips each output bit with probability
/// about 1/2. 64-bit arithmetic throughout: eBPF has no 32-bit rotate, and a 32-bit hash
/// there costs a mask after every step.
#[inline(always)]
pub(crate) const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
const fn half(bytes: &[u8; 16], i: usize) -> u64 {
    u64::from_le_bytes([
        bytes[i],
        bytes[i + 1],
        bytes[i + 2],
        bytes[i + 3],
        bytes[i + 4],
        bytes[i + 5],
        bytes[i + 6],
        bytes[i + 7],
    ])
}

/// The hash that places a flow in its VIP's ring: the client's address and port, seeded.
/// The VIP side of the 5-tuple (address, port, protocol) is the same for every flow of a
/// ring, so it is left out: two finaliser rounds per flow, for IPv4 and IPv6 alike.
#[inline(always)]
#[must_use]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let ports = ((key.sport_be as u64) << 16) | key.dport_be as u64;
    let h = fmix64(half(&key.src, 0) ^ ((seed as u64) << 32 | seed as u64));
    (fmix64(h ^ half(&key.src, 8) ^ (ports << 32)) >> 32) as u32
}

#[must_use]
pub const fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Where in a VIP's ring (`0..ring_size`) a flow with `hash` lands: the same rule for the
/// data path (`VipInfo::ring_slot`) and for `xlb explain`.
#[inline(always)]
#[must_use]
pub const fn ring_offset(hash: u32, ring_size: u32) -> u32 {
    // Lemire's multiply-shift: the same uniform spread as `hash % ring_size` for a uniform
    // hash, without a division on every new flow.
    ((hash as u64 * ring_size as u64) >> 32) as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP flow from 10.0.0.1:`sport` to 192.0.2.10:80 (also the flow table's tests').
    pub(crate) fn key(sport: u16) -> FlowKey {
        FlowKey::new(
            std::net::SocketAddr::from(([10, 0, 0, 1], sport)),
            "192.0.2.10:80".parse().unwrap(),
            crate::IPPROTO_TCP,
        )
    }

    #[test]
    fn flow_hash_is_deterministic_and_seeded() {
        assert_eq!(flow_hash(&key(1000), 7), flow_hash(&key(1000), 7));
        assert_ne!(flow_hash(&key(1000), 7), flow_hash(&key(1000), 8));
        assert_ne!(flow_hash(&key(1000), 7), flow_hash(&key(1001), 7));
    }

    #[test]
    fn flow_hash_spreads_sequential_ports_evenly() {
        let buckets = 16usize;
        let mut counts = vec![0u32; buckets];
        for port in 0..16_000u16 {
            counts[flow_hash(&key(port), 1) as usize % buckets] += 1;
        }
        for c in counts {
            assert!((900..1100).contains(&c), "uneven bucket: {c}");
        }
    }

    /// Clients that differ only in their address (one IPv4 subnet, or IPv6 hosts that differ
    /// only above the interface id) spread as evenly as ports do.
    #[test]
    fn flow_hash_spreads_sequential_addresses_evenly() {
        let vip: std::net::SocketAddr = "192.0.2.10:80".parse().unwrap();
        let vip6: std::net::SocketAddr = "[2001:db8::10]:80".parse().unwrap();
        let buckets = 16usize;
        let mut v4 = vec![0u32; buckets];
        let mut v6 = vec![0u32; buckets];
        for i in 0..16_000u32 {
            let client4 = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            let k4 = FlowKey::new((client4, 40_000).into(), vip, crate::IPPROTO_TCP);
            v4[flow_hash(&k4, 1) as usize % buckets] += 1;
            let client6 = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i) << 64);
            let k6 = FlowKey::new((client6, 40_000).into(), vip6, crate::IPPROTO_TCP);
            v6[flow_hash(&k6, 1) as usize % buckets] += 1;
        }
        for c in v4.into_iter().chain(v6) {
            assert!((900..1100).contains(&c), "uneven bucket: {c}");
        }
    }

    /// Every slot of a ring is reachable and none is favoured.
    #[test]
    fn ring_offsets_cover_the_ring_evenly() {
        let ring = 251u32;
        let mut counts = vec![0u32; ring as usize];
        for port in 0..=u16::MAX {
            let off = ring_offset(flow_hash(&key(port), 3), ring);
            assert!(off < ring);
            counts[off as usize] += 1;
        }
        // 65536 flows over 251 slots: 261 each on average.
        assert!(
            counts.iter().all(|&c| (180..350).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(ring_offset(u32::MAX, ring), ring - 1);
        assert_eq!(ring_offset(0, ring), 0);
    }

    #[test]
    fn hash64_differs_by_seed() {
        assert_ne!(hash64(b"10.0.0.1:80", 0), hash64(b"10.0.0.1:80", 1));
        assert_eq!(hash64(b"x", 3), hash64(b"x", 3));
    }
}
