//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4), with weights.
//!
//! Each backend walks its own permutation of the ring (`offset + j·skip mod M`, both derived
//! from a seeded hash of the backend's address), and backends take turns claiming their next
//! free slot. A backend of weight `w` claims `w` slots per turn. The result depends only on the
//! set of backends and the seed, never on insertion order, so every node builds the same ring.

use thiserror::Error;

use crate::hash::hash64;

const OFFSET_SEED: u64 = 0x6f66_6673_6574; // "offset"
const SKIP_SEED: u64 = 0x0000_736b_6970; // "skip"

/// Marks a slot no backend has claimed yet while building.
const EMPTY: u32 = u32::MAX;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// The value written into the ring (the backend's id in `XLB_BACKENDS`).
    pub id: u32,
    /// What the permutation is derived from: the backend's 16-byte address and port, so the
    /// same container gets the same slots on every node and after every restart.
    pub identity: [u8; 18],
    /// Slots claimed per turn; 0 keeps the backend out of the ring.
    pub weight: u32,
}

impl MaglevBackend {
    #[must_use]
    pub fn new(id: u32, addr: [u8; 16], port: u16, weight: u32) -> Self {
        let mut identity = [0u8; 18];
        identity[..16].copy_from_slice(&addr);
        identity[16..].copy_from_slice(&port.to_be_bytes());
        Self {
            id,
            identity,
            weight,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("ring size {0} is not a prime number (Maglev needs a prime ring size, e.g. 65537)")]
    NotPrime(u32),
    #[error("ring size {size} is too small for {backends} backends (need at least {backends})")]
    TooSmall { size: u32, backends: usize },
    #[error("backend id {0} is reserved")]
    ReservedId(u32),
}

#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Builds the ring: `ring_size` slots, each holding a backend id. Backends of weight 0 are
/// left out; with none left, the ring is empty (the VIP has nowhere to send new flows).
///
/// # Errors
/// The ring size must be prime and at least the number of weighted backends.
pub fn build_ring(backends: &[MaglevBackend], ring_size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(ring_size) {
        return Err(MaglevError::NotPrime(ring_size));
    }
    let mut members: Vec<MaglevBackend> =
        backends.iter().copied().filter(|b| b.weight > 0).collect();
    if let Some(b) = members.iter().find(|b| b.id == EMPTY) {
        return Err(MaglevError::ReservedId(b.id));
    }
    if members.is_empty() {
        return Ok(Vec::new());
    }
    if members.len() > ring_size as usize {
        return Err(MaglevError::TooSmall {
            size: ring_size,
            backends: members.len(),
        });
    }
    // Order-independence: the turn order is part of the result.
    members.sort_unstable_by_key(|b| (b.identity, b.id));
    // Weights 200:100 give the same shares as 2:1 with far fewer claims per turn.
    let common = members.iter().fold(0, |g, b| gcd(g, b.weight));

    let m = u64::from(ring_size);
    let mut cursors: Vec<(u64, u64, u64)> = members
        .iter()
        .map(|b| {
            let offset = hash64(&b.identity, OFFSET_SEED) % m;
            let skip = hash64(&b.identity, SKIP_SEED) % (m - 1) + 1;
            (offset, skip, 0)
        })
        .collect();

    let mut ring = vec![EMPTY; ring_size as usize];
    let mut filled = 0u64;
    loop {
        for (member, (offset, skip, next)) in members.iter().zip(cursors.iter_mut()) {
            for _ in 0..member.weight / common {
                let mut slot = (*offset + *next * *skip) % m;
                while ring[slot as usize] != EMPTY {
                    *next += 1;
                    slot = (*offset + *next * *skip) % m;
                }
                ring[slot as usize] = member.id;
                *next += 1;
                filled += 1;
                if filled == m {
                    return Ok(ring);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::addr::v4_mapped;

    const M: u32 = 65_537;

    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| {
                let octets = [10, 1, (i >> 8) as u8, i as u8];
                MaglevBackend::new(i, v4_mapped(octets), 8080, weight(i))
            })
            .collect()
    }

    fn shares(ring: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for id in ring {
            *counts.entry(*id).or_default() += 1;
        }
        counts
    }

    fn assert_balanced(set: &[MaglevBackend]) {
        let ring = build_ring(set, M).unwrap();
        assert_eq!(ring.len(), M as usize);
        let counts = shares(&ring);
        let total_weight: u32 = set.iter().map(|b| b.weight).sum();
        for b in set {
            let expected = f64::from(M) * f64::from(b.weight) / f64::from(total_weight);
            let got = counts.get(&b.id).copied().unwrap_or(0) as f64;
            let error = (got - expected).abs() / expected;
            assert!(
                error <= 0.01,
                "backend {} of {}: {got} slots, expected {expected:.0} ({:.3}% off)",
                b.id,
                set.len(),
                error * 100.0
            );
        }
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [3, 10, 100] {
            assert_balanced(&backends(n, |_| 1));
        }
    }

    #[test]
    fn weights_balance_within_one_percent() {
        for n in [3, 10, 100] {
            assert_balanced(&backends(n, |i| 1 + i % 4));
        }
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        for n in [3, 10, 100] {
            let all = backends(n, |_| 1);
            let before = build_ring(&all, M).unwrap();
            let removed = n / 2;
            let rest: Vec<_> = all.iter().copied().filter(|b| b.id != removed).collect();
            let after = build_ring(&rest, M).unwrap();

            let mut moved_others = 0usize;
            for (old, new) in before.iter().zip(&after) {
                assert_ne!(*new, removed);
                if *old != removed && old != new {
                    moved_others += 1;
                }
            }
            let others = before.iter().filter(|id| **id != removed).count();
            let fraction = moved_others as f64 / others as f64;
            assert!(
                fraction <= 0.01,
                "{n} backends: {moved_others} of {others} slots of the remaining backends moved"
            );
        }
    }

    #[test]
    fn result_does_not_depend_on_input_order() {
        let mut set = backends(10, |i| 1 + i % 3);
        let a = build_ring(&set, 251).unwrap();
        set.reverse();
        assert_eq!(a, build_ring(&set, 251).unwrap());
    }

    #[test]
    fn zero_weight_backends_get_no_slots() {
        let set = backends(4, |i| u32::from(i != 2));
        let counts = shares(&build_ring(&set, 251).unwrap());
        assert!(!counts.contains_key(&2));
        assert_eq!(counts.len(), 3);
        assert!(build_ring(&backends(2, |_| 0), 251).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            build_ring(&backends(3, |_| 1), 65_536),
            Err(MaglevError::NotPrime(65_536))
        );
        assert_eq!(
            build_ring(&backends(10, |_| 1), 7),
            Err(MaglevError::TooSmall {
                size: 7,
                backends: 10
            })
        );
        assert!(is_prime(65_537) && is_prime(16_381) && is_prime(2) && !is_prime(1));
    }
}
