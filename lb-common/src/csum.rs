//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, eqn. 3).
//!
//! Words are 16-bit, and a delta and the checksum it applies to must agree on their byte
//! order: big-endian, as the words read from the packet (`replace`), or native, as the CPU
//! loads them (`replace_u32`, and `replace_u16` of native loads). One's complement sums
//! commute with byte swapping (RFC 1071 §2(B)), so a checksum loaded, updated and stored in
//! native order comes out right, with no byte swap on the data path. All loops run over compile-time lengths, so the eBPF build
//! unrolls them into straight-line code without a verifier-visible loop.

/// Folds a 32-bit one's complement accumulator to 16 bits (end-around carry).
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The accumulated change of a set of replaced 16-bit words: `Σ(~old + new)`.
///
/// Build one per checksum (the IPv4 header's, the L4 one), then `apply` it. The sum is kept
/// unfolded: each replaced 16-bit word adds at most 2 × 0xffff, so a `u32` holds the change
/// of 32,000 words, far more than any header rewrite merges; folding once, in `apply`, saves
/// the data path a fold per `merge`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CsumDelta(u32);

impl CsumDelta {
    #[inline(always)]
    #[must_use]
    pub const fn new() -> Self {
        Self(0)
    }

    #[inline(always)]
    #[must_use]
    pub const fn replace_u16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u32 + new as u32)
    }

    /// The replacement of a 32-bit word (two 16-bit ones, in either order: see the module).
    #[inline(always)]
    #[must_use]
    pub const fn replace_u32(self, old: u32, new: u32) -> Self {
        let old = !old;
        Self(self.0 + (old >> 16) + (old & 0xffff) + (new >> 16) + (new & 0xffff))
    }

    /// The change of lowering by one a byte that is at least 1 (a TTL the caller checked),
    /// at `index` (0 or 1) of its 16-bit word, native order. Taking 1 from the byte takes 1
    /// from its word without a borrow, which to a one's complement sum is replacing a word
    /// holding that 1 with 0: a constant, whatever the byte and its neighbour.
    #[inline(always)]
    #[must_use]
    pub const fn byte_decrement(self, index: usize) -> Self {
        let mut one = [0u8; 2];
        one[index] = 1;
        self.replace_u16(u16::from_ne_bytes(one), 0)
    }

    /// The replacement of `N` bytes, as big-endian 16-bit words.
    #[inline(always)]
    #[must_use]
    pub fn replace<const N: usize>(self, old: &[u8; N], new: &[u8; N]) -> Self {
        let mut acc = self.0;
        let mut i = 0;
        while i + 1 < N {
            let o = u16::from_be_bytes([old[i], old[i + 1]]);
            let n = u16::from_be_bytes([new[i], new[i + 1]]);
            acc += u32::from(!o) + u32::from(n);
            i += 2;
        }
        Self(acc)
    }

    /// Merges two deltas (e.g. an address change shared by the IPv4 and the L4 checksum).
    #[inline(always)]
    #[must_use]
    pub const fn merge(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    /// The accumulated change folded to 16 bits (big-endian word order), for checksum code
    /// that applies deltas itself (the kernel's checksum helpers).
    #[inline(always)]
    #[must_use]
    pub const fn folded(self) -> u16 {
        fold(self.0)
    }

    /// The new checksum: `HC' = ~(~HC + Σ(~m + m'))`.
    #[inline(always)]
    #[must_use]
    pub const fn apply(self, check: u16) -> u16 {
        // `fold` takes any u32: the unfolded sum plus 0xffff cannot overflow (see the type).
        !fold((!check) as u32 + self.0)
    }

    /// As `apply`, for a UDP checksum: 0 means "no checksum" (IPv4 only) and stays 0, and a
    /// computed 0 is sent as 0xffff (RFC 768).
    #[inline(always)]
    #[must_use]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }
}

/// The full checksum of `data` (odd lengths padded with a zero byte), seeded with `initial`
/// (a pseudo-header sum, or 0). Userspace and tests only: the data plane never recomputes.
#[must_use]
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    let (pairs, rest) = data.as_chunks::<2>();
    for pair in pairs {
        sum += u64::from(u16::from_be_bytes(*pair));
    }
    if let [last] = rest {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header sum of a TCP/UDP segment (RFC 793 / RFC 8200 §8.1), for `checksum`.
#[must_use]
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: u32) -> u32 {
    let mut sum = 0u32;
    for pair in src.as_chunks::<2>().0.iter().chain(dst.as_chunks::<2>().0) {
        sum += u32::from(u16::from_be_bytes(*pair));
    }
    sum + u32::from(proto) + (l4_len >> 16) + (l4_len & 0xffff)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A random IPv4 header with a valid checksum.
    fn ipv4_header(bytes: [u8; 20]) -> [u8; 20] {
        let mut h = bytes;
        h[0] = 0x45;
        h[10] = 0;
        h[11] = 0;
        let c = checksum(0, &h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// `ipv4_header` with TTL `ttl`, its checksum valid.
    fn ipv4_header_with_ttl(raw: [u8; 20], ttl: u8) -> [u8; 20] {
        let mut bytes = raw;
        bytes[8] = ttl;
        ipv4_header(bytes)
    }

    /// The checksum `h` should carry once forwarded to `new_dst` (TTL lowered by one),
    /// recomputed in full.
    fn forwarded_checksum(mut h: [u8; 20], new_dst: [u8; 4]) -> u16 {
        h[16..20].copy_from_slice(&new_dst);
        h[8] -= 1;
        h[10] = 0;
        h[11] = 0;
        checksum(0, &h)
    }

    fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, seg: &[u8]) -> u16 {
        checksum(pseudo_header_sum(src, dst, proto, seg.len() as u32), seg)
    }

    proptest! {
        #[test]
        fn ipv4_header_update_matches_recomputation(
            raw in any::<[u8; 20]>(), new_dst in any::<[u8; 4]>(), ttl in 2u8..=255
        ) {
            let h = ipv4_header_with_ttl(raw, ttl);
            let c = u16::from_be_bytes([h[10], h[11]]);
            let old_dst: [u8; 4] = h[16..20].try_into().unwrap();
            let old_ttl_word = u16::from_be_bytes([h[8], h[9]]);
            let delta = CsumDelta::new()
                .replace(&old_dst, &new_dst)
                .replace_u16(old_ttl_word, old_ttl_word - 0x100);
            prop_assert_eq!(delta.apply(c), forwarded_checksum(h, new_dst));
        }

        /// The data path's form: every word loaded, updated and stored in native order.
        #[test]
        fn native_order_update_matches_recomputation(
            raw in any::<[u8; 20]>(), new_dst in any::<[u8; 4]>(), ttl in 2u8..=255
        ) {
            let h = ipv4_header_with_ttl(raw, ttl);
            let native_check = u16::from_ne_bytes([h[10], h[11]]);
            let old_dst = u32::from_ne_bytes(h[16..20].try_into().unwrap());
            let delta = CsumDelta::new()
                .replace_u32(old_dst, u32::from_ne_bytes(new_dst))
                .byte_decrement(0);
            prop_assert_eq!(
                delta.apply(native_check).to_ne_bytes(),
                forwarded_checksum(h, new_dst).to_be_bytes()
            );
        }

        /// The IPv6 hop limit's position: the second byte of its word.
        #[test]
        fn byte_decrement_matches_recomputation(data in any::<[u8; 16]>(), at in 0usize..16) {
            let mut d = data;
            d[at] = d[at].max(1);
            let c = checksum(0, &d);
            let native_check = u16::from_ne_bytes(c.to_be_bytes());
            let incremental = CsumDelta::new().byte_decrement(at % 2).apply(native_check);
            d[at] -= 1;
            prop_assert_eq!(incremental.to_ne_bytes(), checksum(0, &d).to_be_bytes());
        }

        #[test]
        fn l4_update_matches_recomputation_v4_and_v6(
            v6 in any::<bool>(),
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_dst in any::<[u8; 16]>(),
            payload in proptest::collection::vec(any::<u8>(), 8..200),
            new_port in any::<u16>(), tcp in any::<bool>(),
        ) {
            let alen = if v6 { 16 } else { 4 };
            let proto = if tcp { 6 } else { 17 };
            let mut seg = payload.clone();
            seg[6] = 0; // checksum field at offset 6 in this synthetic segment
            seg[7] = 0;
            let c = l4_checksum(&src[..alen], &dst[..alen], proto, &seg);
            seg[6..8].copy_from_slice(&c.to_be_bytes());

            let old_port = u16::from_be_bytes([seg[2], seg[3]]);
            let mut delta = CsumDelta::new().replace_u16(old_port, new_port);
            delta = if v6 {
                delta.replace(&dst, &new_dst)
            } else {
                let o: [u8; 4] = dst[..4].try_into().unwrap();
                let n: [u8; 4] = new_dst[..4].try_into().unwrap();
                delta.replace(&o, &n)
            };
            let incremental = delta.apply(c);

            seg[2..4].copy_from_slice(&new_port.to_be_bytes());
            seg[6] = 0;
            seg[7] = 0;
            prop_assert_eq!(incremental, l4_checksum(&src[..alen], &new_dst[..alen], proto, &seg));
        }

        #[test]
        fn merged_deltas_equal_one_delta(old in any::<[u8; 8]>(), new in any::<[u8; 8]>(), check in any::<u16>()) {
            let a: [u8; 4] = old[..4].try_into().unwrap();
            let b: [u8; 4] = new[..4].try_into().unwrap();
            let c: [u8; 4] = old[4..].try_into().unwrap();
            let d: [u8; 4] = new[4..].try_into().unwrap();
            let split = CsumDelta::new().replace(&a, &b).merge(CsumDelta::new().replace(&c, &d));
            let whole = CsumDelta::new().replace(&old, &new);
            prop_assert_eq!(fold(u32::from(split.apply(check))), fold(u32::from(whole.apply(check))));
        }
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        let delta = CsumDelta::new().replace(&[10, 0, 0, 1], &[10, 0, 0, 2]);
        assert_eq!(delta.apply_udp(0), 0);
    }

    #[test]
    fn udp_checksum_never_becomes_zero() {
        // ~check + ~0x0000 + check folds to 0xffff, so the one's complement result is 0x0000.
        let check = 0x1234u16;
        let (old, new) = (0x0000u16, check);
        let delta = CsumDelta::new().replace_u16(old, new);
        assert_eq!(delta.apply(check), 0);
        assert_eq!(delta.apply_udp(check), 0xffff);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(
            checksum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
