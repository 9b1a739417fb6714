//! Deterministic, seeded hashes. Every xlb node given the same seed computes the same values,
//! which is what lets several nodes behind ECMP agree on a flow's backend without talking.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn murmur_round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(bytes: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
}

/// MurmurHash3 (x86, 32-bit) of a flow's 5-tuple: the value the data plane reduces modulo the
/// ring size to pick a Maglev slot. Fixed ten rounds: straight-line code in eBPF.
#[inline(always)]
#[must_use]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    h = murmur_round(h, word(&key.src, 0));
    h = murmur_round(h, word(&key.src, 4));
    h = murmur_round(h, word(&key.src, 8));
    h = murmur_round(h, word(&key.src, 12));
    h = murmur_round(h, word(&key.dst, 0));
    h = murmur_round(h, word(&key.dst, 4));
    h = murmur_round(h, word(&key.dst, 8));
    h = murmur_round(h, word(&key.dst, 12));
    h = murmur_round(h, ((key.sport_be as u32) << 16) | key.dport_be as u32);
    h = murmur_round(h, key.proto as u32);
    fmix32(h ^ 37)
}

/// A 64-bit hash of arbitrary bytes (FNV-1a, then the MurmurHash3 64-bit finaliser to spread
/// FNV's weak low bits). Used for the Maglev permutation of each backend.
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
    hash % ring_size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
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

    #[test]
    fn hash64_differs_by_seed() {
        assert_ne!(hash64(b"10.0.0.1:80", 0), hash64(b"10.0.0.1:80", 1));
        assert_eq!(hash64(b"x", 3), hash64(b"x", 3));
    }
}
